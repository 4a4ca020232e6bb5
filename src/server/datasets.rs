//! Uploaded image sets. Each image is decoded to prove it is one, deduplicated by the SHA-256 of
//! its bytes and stored under its hash; the index is rewritten atomically, so a failed or
//! partial upload never corrupts a dataset.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::store::valid_name;

#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct ImageEntry {
    /// SHA-256 of the file's bytes.
    pub sha256: String,
    /// The name it was uploaded under.
    pub original_name: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    #[serde(skip)]
    #[schema(ignore)]
    pub file: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct StoredEntry {
    sha256: String,
    original_name: String,
    width: u32,
    height: u32,
    bytes: u64,
    file: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Index {
    id: String,
    name: String,
    created_at: String,
    images: Vec<StoredEntry>,
}

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct Dataset {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub num_images: usize,
    pub images: Vec<ImageEntry>,
}

#[derive(Serialize, ToSchema, Clone, Debug, Default)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

#[derive(Serialize, ToSchema, Clone, Debug, Default)]
pub struct UploadReport {
    pub added: Vec<String>,
    /// Names whose content was already in the dataset.
    pub duplicates: Vec<String>,
    pub rejected: Vec<Rejected>,
    pub num_images: usize,
}

/// One uploaded file before validation.
pub struct Upload {
    pub name: String,
    pub bytes: Vec<u8>,
}

pub struct DatasetStore {
    dir: PathBuf,
    max_pixels: u64,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

const INDEX_FILE: &str = "dataset.json";

impl DatasetStore {
    pub fn open(data_dir: &Path, max_pixels: u64) -> anyhow::Result<Self> {
        let dir = data_dir.join("datasets");
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, max_pixels, locks: Default::default() })
    }

    fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().expect("dataset locks").entry(id.to_string()).or_default().clone()
    }

    fn path(&self, id: &str) -> ApiResult<PathBuf> {
        let p = self.dir.join(id);
        if !valid_name(id) || !p.join(INDEX_FILE).exists() {
            return Err(ApiError::NotFound(format!("dataset `{id}` not found")));
        }
        Ok(p)
    }

    fn read_index(&self, id: &str) -> ApiResult<Index> {
        let p = self.path(id)?.join(INDEX_FILE);
        let text = std::fs::read(&p).map_err(anyhow::Error::from)?;
        serde_json::from_slice(&text).map_err(|e| ApiError::Internal(format!("{}: {e}", p.display())))
    }

    fn write_index(&self, index: &Index) -> ApiResult<()> {
        let p = self.dir.join(&index.id).join(INDEX_FILE);
        crate::util::write_atomic(&p, &serde_json::to_vec_pretty(index).map_err(anyhow::Error::from)?)?;
        Ok(())
    }

    fn view(&self, index: Index) -> Dataset {
        Dataset {
            num_images: index.images.len(),
            images: index
                .images
                .into_iter()
                .map(|e| ImageEntry { sha256: e.sha256, original_name: e.original_name, width: e.width, height: e.height, bytes: e.bytes, file: e.file })
                .collect(),
            id: index.id,
            name: index.name,
            created_at: index.created_at,
        }
    }

    pub fn create(&self, name: &str) -> ApiResult<Dataset> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(ApiError::BadRequest("a dataset name has 1 to 100 characters".into()));
        }
        let id = format!("ds-{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff);
        let dir = self.dir.join(&id);
        std::fs::create_dir_all(dir.join("images")).map_err(anyhow::Error::from)?;
        let index = Index { id: id.clone(), name: name.to_string(), created_at: crate::package::now_rfc3339(), images: vec![] };
        self.write_index(&index)?;
        Ok(self.view(index))
    }

    pub fn list(&self) -> Vec<Dataset> {
        let mut out: Vec<Dataset> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter_map(|id| self.read_index(&id).ok())
                    .map(|i| self.view(i))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        out
    }

    pub fn get(&self, id: &str) -> ApiResult<Dataset> {
        Ok(self.view(self.read_index(id)?))
    }

    /// Paths of every image in the dataset.
    pub fn image_paths(&self, id: &str) -> ApiResult<Vec<PathBuf>> {
        let dir = self.path(id)?;
        Ok(self.read_index(id)?.images.iter().map(|e| dir.join("images").join(&e.file)).collect())
    }

    /// The folder holding the dataset's image files.
    pub fn images_dir(&self, id: &str) -> ApiResult<PathBuf> {
        Ok(self.path(id)?.join("images"))
    }

    pub async fn delete(&self, id: &str) -> ApiResult<()> {
        let lock = self.lock(id);
        let _g = lock.lock().await;
        let dir = self.path(id)?;
        let trash = self.dir.join(format!(".deleting-{id}-{}", crate::util::unique()));
        std::fs::rename(&dir, &trash).map_err(anyhow::Error::from)?;
        std::fs::remove_dir_all(&trash).map_err(anyhow::Error::from)?;
        Ok(())
    }

    /// Validates and stores uploaded files; archives (zip, tar) are opened and their images
    /// taken one by one. Rejected files are reported by name; the rest is kept.
    pub async fn add(&self, id: &str, uploads: Vec<Upload>) -> ApiResult<UploadReport> {
        let lock = self.lock(id);
        let _g = lock.lock().await;
        let dir = self.path(id)?;
        let mut index = self.read_index(id)?;
        let max_pixels = self.max_pixels;
        let (index, report) = tokio::task::spawn_blocking(move || {
            let mut report = UploadReport::default();
            let files = expand_archives(uploads, &mut report);
            for f in files {
                let hash = crate::package::sha256_hex(&f.bytes);
                if index.images.iter().any(|e| e.sha256 == hash) {
                    report.duplicates.push(f.name);
                    continue;
                }
                match crate::infer::decode_image(&f.bytes, max_pixels) {
                    Ok(img) => {
                        let ext = image::guess_format(&f.bytes).ok().and_then(|fm| fm.extensions_str().first().copied()).unwrap_or("img");
                        let file = format!("{hash}.{ext}");
                        if let Err(e) = crate::util::write_atomic(&dir.join("images").join(&file), &f.bytes) {
                            report.rejected.push(Rejected { name: f.name, reason: format!("could not be stored: {e}") });
                            continue;
                        }
                        index.images.push(StoredEntry {
                            sha256: hash,
                            original_name: f.name.clone(),
                            width: img.width(),
                            height: img.height(),
                            bytes: f.bytes.len() as u64,
                            file,
                        });
                        report.added.push(f.name);
                    }
                    Err(e) => report.rejected.push(Rejected { name: f.name, reason: e.to_string() }),
                }
            }
            report.num_images = index.images.len();
            (index, report)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        self.write_index(&index)?;
        Ok(report)
    }
}

fn is_zip(b: &[u8]) -> bool {
    b.starts_with(b"PK\x03\x04") || b.starts_with(b"PK\x05\x06")
}

fn is_tar(b: &[u8]) -> bool {
    b.len() > 262 && &b[257..262] == b"ustar"
}

/// No single file inside an archive may unpack to more than this (zip bombs).
pub const MAX_ENTRY_BYTES: u64 = 256 << 20;

/// Reads at most MAX_ENTRY_BYTES; a larger entry is an error, not an allocation.
fn read_capped(r: impl std::io::Read) -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![];
    std::io::Read::read_to_end(&mut r.take(MAX_ENTRY_BYTES + 1), &mut bytes)?;
    if bytes.len() as u64 > MAX_ENTRY_BYTES {
        return Err(std::io::Error::other(format!("unpacks to more than {MAX_ENTRY_BYTES} bytes")));
    }
    Ok(bytes)
}

/// Replaces zip and tar uploads by the files inside them (folders flattened, hidden files skipped).
fn expand_archives(uploads: Vec<Upload>, report: &mut UploadReport) -> Vec<Upload> {
    let mut out = vec![];
    for u in uploads {
        if is_zip(&u.bytes) {
            match zip::ZipArchive::new(std::io::Cursor::new(&u.bytes)) {
                Ok(mut z) => {
                    for i in 0..z.len() {
                        let Ok(entry) = z.by_index(i) else { continue };
                        if entry.is_dir() {
                            continue;
                        }
                        let name = format!("{}/{}", u.name, entry.name());
                        if hidden(entry.name()) {
                            continue;
                        }
                        match read_capped(entry) {
                            Ok(bytes) => out.push(Upload { name, bytes }),
                            Err(e) => report.rejected.push(Rejected { name, reason: format!("unreadable archive entry: {e}") }),
                        }
                    }
                }
                Err(e) => report.rejected.push(Rejected { name: u.name, reason: format!("broken zip archive: {e}") }),
            }
        } else if is_tar(&u.bytes) {
            let mut archive = tar::Archive::new(std::io::Cursor::new(&u.bytes));
            match archive.entries() {
                Ok(entries) => {
                    for entry in entries {
                        let entry = match entry {
                            Ok(e) => e,
                            Err(e) => {
                                report.rejected.push(Rejected { name: u.name.clone(), reason: format!("broken tar archive: {e}") });
                                break;
                            }
                        };
                        if !entry.header().entry_type().is_file() {
                            continue;
                        }
                        let inner = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
                        if hidden(&inner) {
                            continue;
                        }
                        let name = format!("{}/{inner}", u.name);
                        match read_capped(entry) {
                            Ok(bytes) => out.push(Upload { name, bytes }),
                            Err(e) => report.rejected.push(Rejected { name, reason: format!("unreadable archive entry: {e}") }),
                        }
                    }
                }
                Err(e) => report.rejected.push(Rejected { name: u.name, reason: format!("broken tar archive: {e}") }),
            }
        } else {
            out.push(u);
        }
    }
    out
}

fn hidden(path: &str) -> bool {
    path.rsplit('/').next().is_some_and(|n| n.starts_with('.')) || path.starts_with("__MACOSX")
}
