//! A dataset's index: its name and images, stored as `dataset.json` in its folder (or as a
//! document of the shared database), replaced atomically once per upload.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::server::core::datasets::{Dataset, ImageEntry};
use crate::server::core::{valid_name, Page};
use crate::server::storage::{Error, Result};

pub(crate) const INDEX_FILE: &str = "dataset.json";

#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct StoredEntry {
    pub sha256: String,
    pub original_name: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    pub file: String,
}

/// A dataset's index as stored (in its folder, or as a document in the shared database).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct Index {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub images: Vec<StoredEntry>,
}

impl Index {
    /// The API's view: the summary, with the images of `page` where asked.
    pub fn view(&self, page: Option<Page>) -> Dataset {
        Dataset {
            id: self.id.clone(),
            name: self.name.clone(),
            created_at: self.created_at.clone(),
            num_images: self.images.len(),
            bytes: self.images.iter().map(|e| e.bytes).sum(),
            images: page.map(|p| p.slice(&self.images).into_iter().map(StoredEntry::view).collect()),
        }
    }

    /// An index stored for dataset `id` (a document of the shared database), checked to be one.
    pub fn from_doc(id: &str, doc: serde_json::Value) -> Result<Index> {
        let index: Index = serde_json::from_value(doc).map_err(|e| Error::Corrupt(format!("the stored index of dataset `{id}`: {e}")))?;
        if !valid_name(id) || index.id != id {
            return Err(Error::Corrupt(format!("a stored dataset index names `{}`, not `{id}`", index.id)));
        }
        Ok(index)
    }
}

impl StoredEntry {
    fn view(self) -> ImageEntry {
        ImageEntry {
            sha256: self.sha256,
            original_name: self.original_name,
            width: self.width,
            height: self.height,
            bytes: self.bytes,
            file: self.file,
        }
    }
}

pub(crate) fn read_index_at(p: &Path) -> Result<Index> {
    let text = std::fs::read(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
    serde_json::from_slice(&text).map_err(|e| Error::Corrupt(format!("the index of dataset `{}`: {e}", dataset_of(p))))
}

fn dataset_of(index: &Path) -> String {
    index.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Replaces the index atomically (the one crash-safe write path, [`crate::util::write_atomic`]).
pub(crate) fn write_index_at(p: &Path, index: &Index) -> Result<()> {
    let json = serde_json::to_vec_pretty(index).map_err(|e| Error::Internal(e.to_string()))?;
    crate::util::write_atomic(p, &json).map_err(|e| Error::Internal(format!("{e:#}")))
}
