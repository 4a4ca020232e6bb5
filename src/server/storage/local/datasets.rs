//! Datasets in the data folder: `datasets/<id>/dataset.json` (the index) and
//! `datasets/<id>/images/<sha256>.<ext>`. The index is replaced atomically once per upload, so a
//! failed or partial upload never corrupts a dataset; each dataset's writes take its lock.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use rand::Rng;

use super::index::{read_index_at, write_index_at, INDEX_FILE};
use super::{ingest, DataDir};
use crate::server::core::datasets::{Dataset, DatasetLimits, ImageEntry, Upload, UploadReport};
use crate::server::core::{valid_name, Page};
use crate::server::storage::{blocking, DatasetStore, Error, Result};

pub(crate) use super::index::Index;

pub struct LocalDatasets {
    dir: Arc<DataDir>,
    limits: DatasetLimits,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl LocalDatasets {
    pub fn new(dir: Arc<DataDir>, limits: DatasetLimits) -> Self {
        Self { dir, limits, locks: Default::default() }
    }

    pub fn limits(&self) -> &DatasetLimits {
        &self.limits
    }

    fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().expect("dataset locks").entry(id.to_string()).or_default().clone()
    }

    fn folder(&self, id: &str) -> PathBuf {
        self.dir.datasets().join(id)
    }

    /// The dataset's folder, or NotFound.
    fn existing(&self, id: &str) -> Result<PathBuf> {
        let p = self.folder(id);
        if !valid_name(id) || !p.join(INDEX_FILE).exists() {
            return Err(Error::NotFound(format!("dataset `{id}` not found")));
        }
        Ok(p)
    }

    /// The index (blocking).
    pub(crate) fn read_index(&self, id: &str) -> Result<Index> {
        read_index_at(&self.existing(id)?.join(INDEX_FILE))
    }

    /// Where the dataset's image files are (or will be) kept.
    pub(crate) fn images_folder(&self, id: &str) -> PathBuf {
        self.folder(id).join("images")
    }

    /// Writes an index kept elsewhere (the shared database) into this folder, creating the
    /// dataset's folders; the image files are fetched separately (blocking).
    pub(crate) fn materialize(&self, index: &Index) -> Result<()> {
        let dir = self.folder(&index.id);
        std::fs::create_dir_all(dir.join("images")).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        write_index_at(&dir.join(INDEX_FILE), index)
    }

    /// The blocking half of [`DatasetStore::add`], for a caller already on the blocking pool.
    pub(crate) async fn add_locked(self: &Arc<Self>, id: &str, uploads: Vec<Upload>) -> Result<UploadReport> {
        let guard = self.lock(id).lock_owned().await;
        let this = self.clone();
        let id = id.to_string();
        blocking("adding images", move || {
            let _guard = guard;
            let dir = match this.existing(&id) {
                Ok(d) => d,
                Err(e) => {
                    drop(uploads);
                    return Err(e);
                }
            };
            ingest::add_blocking(&dir, &this.dir.tmp(), &this.limits, uploads)
        })
        .await
    }

    /// Moves the folder aside, then removes it (under the dataset's lock).
    pub(crate) async fn delete_local(self: &Arc<Self>, id: &str) -> Result<()> {
        let guard = self.lock(id).lock_owned().await;
        let this = self.clone();
        let id = id.to_string();
        blocking("deleting a dataset", move || {
            let _guard = guard;
            let dir = this.existing(&id)?;
            let trash = this.dir.datasets().join(format!(".deleting-{id}-{}", crate::util::unique()));
            std::fs::rename(&dir, &trash).map_err(|e| Error::io(format!("moving {} aside", dir.display()), e))?;
            std::fs::remove_dir_all(&trash).map_err(|e| Error::io(format!("removing {}", trash.display()), e))
        })
        .await
    }

    /// A temporary file under the data folder's `tmp/` (blocking).
    pub(crate) fn temp_upload(&self, name: String) -> Result<(Upload, std::fs::File)> {
        let tmp = self.dir.tmp();
        let file = tempfile::NamedTempFile::new_in(&tmp).map_err(|e| Error::io(format!("creating a file in {}", tmp.display()), e))?;
        let handle = file.as_file().try_clone().map_err(|e| Error::io("opening an upload file", e))?;
        Ok((Upload { name, file }, handle))
    }

    /// A dataset's index and an empty images folder, for a new dataset (blocking).
    pub(crate) fn create_blocking(&self, name: &str) -> Result<Index> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(Error::Invalid("a dataset name has 1 to 100 characters".into()));
        }
        let id = format!("ds-{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff);
        let index = Index { id, name: name.to_string(), created_at: crate::package::now_rfc3339(), images: vec![] };
        self.materialize(&index)?;
        Ok(index)
    }
}

#[async_trait]
impl DatasetStore for Arc<LocalDatasets> {
    async fn create(&self, name: &str) -> Result<Dataset> {
        let (this, name) = (self.clone(), name.to_string());
        blocking("creating a dataset", move || Ok(this.create_blocking(&name)?.view(None))).await
    }

    async fn list(&self, page: Page) -> Result<(Vec<Dataset>, usize)> {
        let this = self.clone();
        blocking("listing datasets", move || {
            let root = this.dir.datasets();
            let mut all: Vec<Index> = std::fs::read_dir(&root)
                .map_err(|e| Error::io(format!("reading {}", root.display()), e))?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|id| valid_name(id))
                .filter_map(|id| this.read_index(&id).ok())
                .collect();
            all.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
            let total = all.len();
            Ok((page.slice(&all).iter().map(|i| i.view(None)).collect(), total))
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Dataset> {
        let (this, id) = (self.clone(), id.to_string());
        blocking("reading a dataset", move || Ok(this.read_index(&id)?.view(None))).await
    }

    async fn images(&self, id: &str, page: Page) -> Result<Vec<ImageEntry>> {
        let (this, id) = (self.clone(), id.to_string());
        blocking("reading a dataset", move || Ok(this.read_index(&id)?.view(Some(page)).images.unwrap_or_default())).await
    }

    async fn delete(&self, id: &str) -> Result<()> {
        self.delete_local(id).await
    }

    async fn new_upload(&self, name: String) -> Result<(Upload, std::fs::File)> {
        let this = self.clone();
        blocking("creating an upload file", move || this.temp_upload(name)).await
    }

    async fn add(&self, id: &str, uploads: Vec<Upload>) -> Result<UploadReport> {
        self.add_locked(id, uploads).await
    }

    async fn local_images(&self, id: &str) -> Result<Vec<PathBuf>> {
        let (this, id) = (self.clone(), id.to_string());
        blocking("reading a dataset", move || {
            let index = this.read_index(&id)?;
            let images = this.images_folder(&id);
            Ok(index.images.iter().map(|e| images.join(&e.file)).collect())
        })
        .await
    }
}
