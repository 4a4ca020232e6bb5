//! Uploaded image sets. Each image is decoded to prove it is one, deduplicated by the SHA-256 of
//! its bytes and stored under its hash; the index is rewritten atomically once per upload, so a
//! failed or partial upload never corrupts a dataset.
//!
//! Memory stays bounded by configuration, not by input: the HTTP layer streams every uploaded file
//! into `DATA_DIR/tmp`; archives (zip, tar) are expanded from those files entry by entry, each
//! entry streamed into its own temporary file under caps ([`DatasetLimits`]) and hashed as it is
//! written, then decoded from disk and moved (renamed, not copied) into the dataset.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;
use utoipa::ToSchema;

use super::store::valid_name;
use crate::infer::DecodeError;

/// What dataset storage can fail with; the HTTP layer maps it to a status.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset `{0}` not found")]
    NotFound(String),
    /// The request itself is wrong (bad name...).
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt dataset index: {source}")]
    CorruptIndex {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Internal(String),
    /// The shared database or object store failed.
    #[error(transparent)]
    Shared(#[from] super::shared::SharedError),
}

pub type DatasetResult<T> = Result<T, DatasetError>;

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> DatasetError {
    let what = what.to_string();
    move |source| DatasetError::Io { what, source }
}

/// Default cap on one file (an archive entry or an uploaded image), in bytes.
pub const MAX_ENTRY_BYTES: u64 = 64 << 20;

/// Caps on what an upload may cost; every one is a `picie serve` flag.
#[derive(Clone, Debug)]
pub struct DatasetLimits {
    /// Largest image, in pixels, read from the header before decoding.
    pub max_image_pixels: u64,
    /// Largest file unpacked from an archive, or uploaded as is.
    pub max_entry_bytes: u64,
    /// An archive entry may unpack to at most this many times its compressed size.
    pub max_compression_ratio: u64,
    /// Entries in one archive; more refuses the whole archive.
    pub max_archive_entries: usize,
    /// Bytes unpacked from one archive in all; more refuses the whole archive.
    pub max_unpacked_bytes: u64,
    /// Images in one dataset.
    pub max_dataset_images: usize,
    /// Bytes of images in one dataset.
    pub max_dataset_bytes: u64,
}

impl Default for DatasetLimits {
    fn default() -> Self {
        Self {
            max_image_pixels: crate::infer::preprocess::DEFAULT_MAX_PIXELS,
            max_entry_bytes: MAX_ENTRY_BYTES,
            max_compression_ratio: 100,
            max_archive_entries: 10_000,
            max_unpacked_bytes: 4 << 30,
            max_dataset_images: 100_000,
            max_dataset_bytes: 64 << 30,
        }
    }
}

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

/// One uploaded file, already streamed to a temporary file under `DATA_DIR/tmp` (removed when
/// dropped unless it is moved into a dataset).
pub struct Upload {
    pub name: String,
    pub file: NamedTempFile,
}

pub struct DatasetStore {
    dir: PathBuf,
    tmp: PathBuf,
    limits: DatasetLimits,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

const INDEX_FILE: &str = "dataset.json";

fn read_index_at(p: &Path) -> DatasetResult<Index> {
    let text = std::fs::read(p).map_err(io_err(format!("reading {}", p.display())))?;
    serde_json::from_slice(&text).map_err(|source| DatasetError::CorruptIndex { path: p.to_path_buf(), source })
}

/// A stored index document of dataset `id`, checked to be one.
fn stored_index(id: &str, doc: &serde_json::Value) -> DatasetResult<Index> {
    let index: Index = serde_json::from_value(doc.clone()).map_err(|e| DatasetError::Internal(format!("a stored dataset index: {e}")))?;
    if !valid_name(id) || index.id != id {
        return Err(DatasetError::Internal(format!("a stored dataset index names `{}`, not `{id}`", index.id)));
    }
    Ok(index)
}

fn image_files(index: Index) -> Vec<(String, String, u64)> {
    index.images.into_iter().map(|e| (e.file, e.sha256, e.bytes)).collect()
}

/// Writes through a temporary file in the same folder, renamed into place once synced.
fn write_index_at(p: &Path, index: &Index) -> DatasetResult<()> {
    let dir = p.parent().unwrap_or(Path::new("."));
    let mut tmp = NamedTempFile::new_in(dir).map_err(io_err(format!("creating a file in {}", dir.display())))?;
    let json = serde_json::to_vec_pretty(index).map_err(|e| DatasetError::Internal(e.to_string()))?;
    tmp.write_all(&json).map_err(io_err(format!("writing {}", p.display())))?;
    tmp.as_file().sync_all().map_err(io_err(format!("syncing {}", p.display())))?;
    tmp.persist(p).map_err(|e| DatasetError::Io { what: format!("renaming into {}", p.display()), source: e.error })?;
    Ok(())
}

impl DatasetStore {
    /// Opens (creating) `DATA_DIR/datasets` and the scratch folder `DATA_DIR/tmp`.
    pub fn open(data_dir: &Path, limits: DatasetLimits) -> DatasetResult<Self> {
        let dir = data_dir.join("datasets");
        let tmp = data_dir.join("tmp");
        for d in [&dir, &tmp] {
            std::fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        Ok(Self { dir, tmp, limits, locks: Default::default() })
    }

    pub fn limits(&self) -> &DatasetLimits {
        &self.limits
    }

    /// A new temporary file under `DATA_DIR/tmp` (blocking: call it off the async runtime).
    pub fn temp_file(&self) -> DatasetResult<NamedTempFile> {
        NamedTempFile::new_in(&self.tmp).map_err(io_err(format!("creating a file in {}", self.tmp.display())))
    }

    /// An upload from bytes in memory (tests, fuzzing); blocking.
    pub fn upload_from_bytes(&self, name: &str, bytes: &[u8]) -> DatasetResult<Upload> {
        let mut file = self.temp_file()?;
        file.write_all(bytes).map_err(io_err("writing an upload"))?;
        Ok(Upload { name: name.to_string(), file })
    }

    fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().expect("dataset locks").entry(id.to_string()).or_default().clone()
    }

    fn path(&self, id: &str) -> DatasetResult<PathBuf> {
        let p = self.dir.join(id);
        if !valid_name(id) || !p.join(INDEX_FILE).exists() {
            return Err(DatasetError::NotFound(id.to_string()));
        }
        Ok(p)
    }

    /// Fails with NotFound unless the dataset exists.
    pub fn exists(&self, id: &str) -> DatasetResult<()> {
        self.path(id).map(|_| ())
    }

    fn read_index(&self, id: &str) -> DatasetResult<Index> {
        read_index_at(&self.path(id)?.join(INDEX_FILE))
    }

    fn view(&self, index: Index) -> Dataset {
        Dataset {
            num_images: index.images.len(),
            images: index
                .images
                .into_iter()
                .map(|e| ImageEntry {
                    sha256: e.sha256,
                    original_name: e.original_name,
                    width: e.width,
                    height: e.height,
                    bytes: e.bytes,
                    file: e.file,
                })
                .collect(),
            id: index.id,
            name: index.name,
            created_at: index.created_at,
        }
    }

    pub fn create(&self, name: &str) -> DatasetResult<Dataset> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(DatasetError::Invalid("a dataset name has 1 to 100 characters".into()));
        }
        let id = format!("ds-{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff);
        let dir = self.dir.join(&id);
        std::fs::create_dir_all(dir.join("images")).map_err(io_err(format!("creating {}", dir.display())))?;
        let index = Index { id: id.clone(), name: name.to_string(), created_at: crate::package::now_rfc3339(), images: vec![] };
        write_index_at(&dir.join(INDEX_FILE), &index)?;
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

    pub fn get(&self, id: &str) -> DatasetResult<Dataset> {
        Ok(self.view(self.read_index(id)?))
    }

    /// Paths of every image in the dataset.
    pub fn image_paths(&self, id: &str) -> DatasetResult<Vec<PathBuf>> {
        let dir = self.path(id)?;
        Ok(self.read_index(id)?.images.iter().map(|e| dir.join("images").join(&e.file)).collect())
    }

    /// The folder holding the dataset's image files.
    pub fn images_dir(&self, id: &str) -> DatasetResult<PathBuf> {
        Ok(self.path(id)?.join("images"))
    }

    /// The dataset's index as stored (what the shared database keeps).
    pub fn index_doc(&self, id: &str) -> DatasetResult<serde_json::Value> {
        serde_json::to_value(self.read_index(id)?).map_err(|e| DatasetError::Internal(e.to_string()))
    }

    /// The API's view of a stored index.
    pub fn view_doc(&self, doc: serde_json::Value) -> DatasetResult<Dataset> {
        let index: Index = serde_json::from_value(doc).map_err(|e| DatasetError::Internal(format!("a stored dataset index: {e}")))?;
        Ok(self.view(index))
    }

    /// Writes an index kept elsewhere (the shared database) into this folder, creating the
    /// dataset's folders: image files are fetched separately. Returns each image's file name,
    /// SHA-256 and size.
    pub fn materialize(&self, id: &str, doc: &serde_json::Value) -> DatasetResult<Vec<(String, String, u64)>> {
        let index = stored_index(id, doc)?;
        let dir = self.dir.join(id);
        std::fs::create_dir_all(dir.join("images")).map_err(io_err(format!("creating {}", dir.display())))?;
        write_index_at(&dir.join(INDEX_FILE), &index)?;
        Ok(image_files(index))
    }

    /// Each image's file name, SHA-256 and size in a stored index, as [`DatasetStore::materialize`]
    /// returns them, without writing anything.
    pub fn files_of(id: &str, doc: &serde_json::Value) -> DatasetResult<Vec<(String, String, u64)>> {
        Ok(image_files(stored_index(id, doc)?))
    }

    /// Where the dataset's image files are (or will be) kept.
    pub fn images_folder(&self, id: &str) -> PathBuf {
        self.dir.join(id).join("images")
    }

    /// Moves the folder aside, then removes it on the blocking pool.
    pub async fn delete(&self, id: &str) -> DatasetResult<()> {
        let guard = self.lock(id).lock_owned().await;
        let dir = self.path(id)?;
        let trash = self.dir.join(format!(".deleting-{id}-{}", crate::util::unique()));
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            std::fs::rename(&dir, &trash).map_err(io_err(format!("moving {} aside", dir.display())))?;
            std::fs::remove_dir_all(&trash).map_err(io_err(format!("removing {}", trash.display())))
        })
        .await
        .map_err(|e| DatasetError::Internal(format!("deleting dataset `{id}`: {e}")))?
    }

    /// Validates and stores uploaded files; archives (zip, tar) are opened and their images
    /// taken one by one under the caps of [`DatasetLimits`]. Rejected files are reported by
    /// name; the rest is kept. All the work (hashing, decoding, file I/O) runs on the blocking
    /// pool, holding the dataset's lock until the index is written, even if the caller goes away.
    pub async fn add(&self, id: &str, uploads: Vec<Upload>) -> DatasetResult<UploadReport> {
        let guard = self.lock(id).lock_owned().await;
        let dir = match self.path(id) {
            Ok(d) => d,
            Err(e) => {
                tokio::task::spawn_blocking(move || drop(uploads)).await.ok();
                return Err(e);
            }
        };
        let limits = self.limits.clone();
        let tmp = self.tmp.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            add_blocking(&dir, &tmp, &limits, uploads)
        })
        .await
        .map_err(|e| DatasetError::Internal(format!("adding images to dataset `{id}`: {e}")))?
    }
}

/// The whole of an upload, on a blocking thread: every file is taken in turn, then the index is
/// written once. On an error, image files written by this call are removed again.
fn add_blocking(dir: &Path, tmp: &Path, limits: &DatasetLimits, uploads: Vec<Upload>) -> DatasetResult<UploadReport> {
    let index_path = dir.join(INDEX_FILE);
    let index = read_index_at(&index_path)?;
    let mut ing = Ingest {
        images: dir.join("images"),
        tmp: tmp.to_path_buf(),
        limits: limits.clone(),
        known: index.images.iter().map(|e| e.sha256.clone()).collect(),
        total_bytes: index.images.iter().map(|e| e.bytes).sum(),
        index,
        report: UploadReport::default(),
        written: vec![],
    };
    let result = (|| {
        for u in uploads {
            ing.upload(u)?;
        }
        if !ing.written.is_empty() {
            // The renames into images/ are durable before the index names them.
            File::open(&ing.images).and_then(|d| d.sync_all()).ok();
            write_index_at(&index_path, &ing.index)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for p in &ing.written {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    ing.report.num_images = ing.index.images.len();
    Ok(ing.report)
}

/// Why an archive stops being read.
enum Stop {
    /// A per-archive cap: refuse the whole archive with this reason.
    Refuse(String),
    /// The server failed (disk full...): fail the request.
    Fatal(DatasetError),
}

impl From<DatasetError> for Stop {
    fn from(e: DatasetError) -> Self {
        Stop::Fatal(e)
    }
}

/// How much of a dataset's and request's state an archive may roll back.
struct Mark {
    images: usize,
    added: usize,
    duplicates: usize,
    rejected: usize,
    written: usize,
    total_bytes: u64,
}

/// An entry streamed out of an archive into a temporary file.
struct Unpacked {
    file: NamedTempFile,
    sha256: String,
    bytes: u64,
}

/// Why one entry was not unpacked.
enum EntryFail {
    /// Over a per-entry cap, or unreadable: the entry is rejected with this reason.
    Reject(String),
    Stop(Stop),
}

struct Ingest {
    images: PathBuf,
    tmp: PathBuf,
    limits: DatasetLimits,
    index: Index,
    known: HashSet<String>,
    total_bytes: u64,
    report: UploadReport,
    /// Image files this request moved into the dataset.
    written: Vec<PathBuf>,
}

impl Ingest {
    fn reject(&mut self, name: String, reason: impl Into<String>) {
        self.report.rejected.push(Rejected { name, reason: reason.into() });
    }

    fn upload(&mut self, u: Upload) -> DatasetResult<()> {
        let f = u.file.as_file();
        let size = f.metadata().map_err(io_err("reading an upload"))?.len();
        let mut head = [0u8; 512];
        let n = read_head(f, &mut head).map_err(io_err("reading an upload"))?;
        let head = &head[..n];
        if is_zip(head) {
            self.archive(u, Self::zip)
        } else if is_tar(head) {
            self.archive(u, Self::tar)
        } else if size > self.limits.max_entry_bytes {
            self.reject(u.name, format!("is larger than {} bytes (--max-entry-bytes)", self.limits.max_entry_bytes));
            Ok(())
        } else {
            let sha256 = hash_file(f).map_err(io_err("reading an upload"))?;
            self.take(u.name, Unpacked { file: u.file, sha256, bytes: size })
        }
    }

    fn mark(&self) -> Mark {
        Mark {
            images: self.index.images.len(),
            added: self.report.added.len(),
            duplicates: self.report.duplicates.len(),
            rejected: self.report.rejected.len(),
            written: self.written.len(),
            total_bytes: self.total_bytes,
        }
    }

    /// Forgets everything since `m`: index entries, report lines, and the image files written.
    fn rollback(&mut self, m: Mark) {
        for e in self.index.images.drain(m.images..) {
            self.known.remove(&e.sha256);
        }
        for p in self.written.drain(m.written..) {
            let _ = std::fs::remove_file(p);
        }
        self.report.added.truncate(m.added);
        self.report.duplicates.truncate(m.duplicates);
        self.report.rejected.truncate(m.rejected);
        self.total_bytes = m.total_bytes;
    }

    /// Runs `expand` over an archive; when it breaks a per-archive cap, nothing of it is kept
    /// and the archive is rejected by name.
    fn archive(&mut self, u: Upload, expand: fn(&mut Self, &Upload) -> Result<(), Stop>) -> DatasetResult<()> {
        let mark = self.mark();
        match expand(self, &u) {
            Ok(()) => Ok(()),
            Err(Stop::Refuse(reason)) => {
                self.rollback(mark);
                self.reject(u.name, reason);
                Ok(())
            }
            Err(Stop::Fatal(e)) => Err(e),
        }
    }

    fn too_many_entries(&self) -> Stop {
        Stop::Refuse(format!("holds more than {} entries (--max-archive-entries); nothing of it was kept", self.limits.max_archive_entries))
    }

    fn too_many_bytes(&self) -> Stop {
        Stop::Refuse(format!(
            "unpacks to more than {} bytes in all (--max-unpacked-bytes); nothing of it was kept",
            self.limits.max_unpacked_bytes
        ))
    }

    fn zip(&mut self, u: &Upload) -> Result<(), Stop> {
        let mut f = u.file.as_file();
        // The entry count is read from the end record before the central directory is parsed.
        if zip_declared_entries(f).is_some_and(|n| n > self.limits.max_archive_entries as u64) {
            return Err(self.too_many_entries());
        }
        rewind(&mut f).map_err(io_err("reading an upload"))?;
        let mut z = match zip::ZipArchive::new(BufReader::new(f)) {
            Ok(z) => z,
            Err(e) => {
                self.reject(u.name.clone(), format!("broken zip archive: {e}"));
                return Ok(());
            }
        };
        if z.len() > self.limits.max_archive_entries {
            return Err(self.too_many_entries());
        }
        if z.decompressed_size().is_some_and(|n| n > self.limits.max_unpacked_bytes as u128) {
            return Err(self.too_many_bytes());
        }
        let mut unpacked = 0u64;
        for i in 0..z.len() {
            let inner = z.name_for_index(i).unwrap_or_default().to_string();
            let name = format!("{}/{inner}", u.name);
            let entry = match z.by_index(i) {
                Ok(e) => e,
                Err(e) => {
                    self.reject(name, format!("unreadable archive entry: {e}"));
                    continue;
                }
            };
            if entry.is_dir() || hidden(&inner) {
                continue;
            }
            let compressed = entry.compressed_size().max(1);
            let ratio_cap = compressed.saturating_mul(self.limits.max_compression_ratio);
            let (cap, why) = if ratio_cap < self.limits.max_entry_bytes {
                (
                    ratio_cap,
                    format!(
                        "unpacks to more than {} times its compressed size of {compressed} bytes (--max-compression-ratio)",
                        self.limits.max_compression_ratio
                    ),
                )
            } else {
                (self.limits.max_entry_bytes, format!("unpacks to more than {} bytes (--max-entry-bytes)", self.limits.max_entry_bytes))
            };
            let declared = entry.size();
            self.entry(name, entry, declared, cap, why, &mut unpacked)?;
        }
        Ok(())
    }

    fn tar(&mut self, u: &Upload) -> Result<(), Stop> {
        let mut f = u.file.as_file();
        rewind(&mut f).map_err(io_err("reading an upload"))?;
        let mut archive = tar::Archive::new(BufReader::new(f));
        let entries = match archive.entries() {
            Ok(e) => e,
            Err(e) => {
                self.reject(u.name.clone(), format!("broken tar archive: {e}"));
                return Ok(());
            }
        };
        let mut unpacked = 0u64;
        for (count, entry) in entries.enumerate() {
            if count >= self.limits.max_archive_entries {
                return Err(self.too_many_entries());
            }
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    self.reject(u.name.clone(), format!("broken tar archive: {e}"));
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
            let cap = self.limits.max_entry_bytes;
            let why = format!("unpacks to more than {cap} bytes (--max-entry-bytes)");
            let declared = entry.size();
            self.entry(name, entry, declared, cap, why, &mut unpacked)?;
        }
        Ok(())
    }

    /// One archive entry: refused by name when its declared size is over `cap` (before
    /// inflating anything) or when it passes `cap` while unpacking; else taken into the dataset.
    fn entry(&mut self, name: String, r: impl Read, declared: u64, cap: u64, why: String, unpacked: &mut u64) -> Result<(), Stop> {
        let got = if declared > cap { Err(EntryFail::Reject(why)) } else { self.unpack(r, cap, &why, unpacked) };
        match got {
            Ok(file) => self.take(name, file)?,
            Err(EntryFail::Reject(reason)) => self.reject(name, reason),
            Err(EntryFail::Stop(s)) => return Err(s),
        }
        Ok(())
    }

    /// Streams one entry into a temporary file, hashing it, and stops as soon as it passes
    /// `cap` (the entry is rejected with `why`) or the archive passes its total.
    fn unpack(&self, mut r: impl Read, cap: u64, why: &str, unpacked: &mut u64) -> Result<Unpacked, EntryFail> {
        let fatal = |e: DatasetError| EntryFail::Stop(Stop::Fatal(e));
        let mut file =
            NamedTempFile::new_in(&self.tmp).map_err(io_err(format!("creating a file in {}", self.tmp.display()))).map_err(fatal)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut bytes = 0u64;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EntryFail::Reject(format!("unreadable archive entry: {e}"))),
            };
            bytes += n as u64;
            *unpacked += n as u64;
            if *unpacked > self.limits.max_unpacked_bytes {
                return Err(EntryFail::Stop(self.too_many_bytes()));
            }
            if bytes > cap {
                return Err(EntryFail::Reject(why.to_string()));
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(io_err("writing an archive entry")).map_err(fatal)?;
        }
        Ok(Unpacked { file, sha256: hex::encode(hasher.finalize()), bytes })
    }

    /// Deduplicates, checks the dataset caps, decodes and moves one file into the dataset.
    fn take(&mut self, name: String, u: Unpacked) -> DatasetResult<()> {
        if self.known.contains(&u.sha256) {
            self.report.duplicates.push(name);
            return Ok(());
        }
        let l = &self.limits;
        if self.index.images.len() >= l.max_dataset_images {
            let reason = format!("dataset is full: it holds {} images, the limit (--max-dataset-images)", self.index.images.len());
            self.reject(name, reason);
            return Ok(());
        }
        if self.total_bytes.saturating_add(u.bytes) > l.max_dataset_bytes {
            let reason = format!(
                "dataset is full: {} more bytes would pass its limit of {} bytes (--max-dataset-bytes)",
                u.bytes, l.max_dataset_bytes
            );
            self.reject(name, reason);
            return Ok(());
        }
        let max_pixels = l.max_image_pixels;
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_image(u.file.as_file(), u.bytes, max_pixels)))
            .unwrap_or_else(|_| Err(DecodeError::Corrupt("the decoder failed".into())));
        let (width, height, ext) = match checked {
            Ok(v) => v,
            Err(e) => {
                self.reject(name, e.to_string());
                return Ok(());
            }
        };
        let file = format!("{}.{ext}", u.sha256);
        let dest = self.images.join(&file);
        u.file.as_file().sync_all().map_err(io_err("syncing an image"))?;
        u.file.persist(&dest).map_err(|e| DatasetError::Io { what: format!("moving an image to {}", dest.display()), source: e.error })?;
        self.written.push(dest);
        self.known.insert(u.sha256.clone());
        self.total_bytes += u.bytes;
        self.index.images.push(StoredEntry { sha256: u.sha256, original_name: name.clone(), width, height, bytes: u.bytes, file });
        self.report.added.push(name);
        Ok(())
    }
}

fn rewind(f: &mut &File) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(0)).map(|_| ())
}

/// Reads up to `buf.len()` bytes from the start of the file.
fn read_head(mut f: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    rewind(&mut f)?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub(crate) fn hash_file(mut f: &File) -> std::io::Result<String> {
    rewind(&mut f)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Decodes the image from the file (bounded by `max_pixels`, read from the header first) to prove
/// it is one; returns its size after the EXIF orientation and its usual file extension.
fn check_image(mut f: &File, bytes: u64, max_pixels: u64) -> Result<(u32, u32, &'static str), DecodeError> {
    if bytes == 0 {
        return Err(DecodeError::Empty);
    }
    rewind(&mut f).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let (img, format) = crate::infer::preprocess::decode_reader(BufReader::new(f), max_pixels)?;
    Ok((img.width(), img.height(), format.extensions_str().first().copied().unwrap_or("img")))
}

/// The entry count a zip's end record declares (zip64 too), read without parsing the central
/// directory; None when the record cannot be found (the zip reader then decides).
fn zip_declared_entries(mut f: &File) -> Option<u64> {
    let len = f.metadata().ok()?.len();
    let tail_len = len.min(22 + 65535);
    f.seek(SeekFrom::Start(len - tail_len)).ok()?;
    let mut tail = vec![0u8; tail_len as usize];
    f.read_exact(&mut tail).ok()?;
    let eocd = (0..tail.len().saturating_sub(21)).rev().find(|&i| tail[i..].starts_with(b"PK\x05\x06"))?;
    let count = u16::from_le_bytes([tail[eocd + 10], tail[eocd + 11]]);
    if count != 0xffff {
        return Some(count as u64);
    }
    // Zip64: the locator sits just before the end record and points at the zip64 end record.
    let loc = eocd.checked_sub(20)?;
    if !tail[loc..].starts_with(b"PK\x06\x07") {
        return None;
    }
    let offset = u64::from_le_bytes(tail[loc + 8..loc + 16].try_into().ok()?);
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut rec = [0u8; 40];
    f.read_exact(&mut rec).ok()?;
    if !rec.starts_with(b"PK\x06\x06") {
        return None;
    }
    Some(u64::from_le_bytes(rec[32..40].try_into().ok()?))
}

fn is_zip(b: &[u8]) -> bool {
    b.starts_with(b"PK\x03\x04") || b.starts_with(b"PK\x05\x06")
}

fn is_tar(b: &[u8]) -> bool {
    b.len() > 262 && &b[257..262] == b"ustar"
}

fn hidden(path: &str) -> bool {
    path.rsplit('/').next().is_some_and(|n| n.starts_with('.')) || path.starts_with("__MACOSX")
}

/// The datasets the API serves: in the data folder (embedded), or in the shared database and
/// object store with the data folder as a cache (scaled out).
#[derive(Clone)]
pub enum Datasets {
    Embedded(Arc<DatasetStore>),
    Shared(Arc<super::shared::datasets::SharedDatasets>),
}

impl Datasets {
    /// The local store: uploads are streamed, checked and hashed there in both modes.
    pub fn local(&self) -> &Arc<DatasetStore> {
        match self {
            Datasets::Embedded(s) => s,
            Datasets::Shared(s) => &s.local,
        }
    }

    pub async fn create(&self, name: &str) -> DatasetResult<Dataset> {
        match self {
            Datasets::Embedded(s) => s.create(name),
            Datasets::Shared(s) => s.create(name).await,
        }
    }

    pub async fn list(&self) -> DatasetResult<Vec<Dataset>> {
        match self {
            Datasets::Embedded(s) => Ok(s.list()),
            Datasets::Shared(s) => s.list().await,
        }
    }

    pub async fn get(&self, id: &str) -> DatasetResult<Dataset> {
        match self {
            Datasets::Embedded(s) => s.get(id),
            Datasets::Shared(s) => s.get(id).await,
        }
    }

    /// Fails with NotFound unless the dataset exists.
    pub async fn exists(&self, id: &str) -> DatasetResult<()> {
        match self {
            Datasets::Embedded(s) => s.exists(id),
            Datasets::Shared(s) => s.exists(id).await,
        }
    }

    pub async fn delete(&self, id: &str) -> DatasetResult<()> {
        match self {
            Datasets::Embedded(s) => s.delete(id).await,
            Datasets::Shared(s) => s.delete(id).await,
        }
    }

    pub async fn add(&self, id: &str, uploads: Vec<Upload>) -> DatasetResult<UploadReport> {
        match self {
            Datasets::Embedded(s) => s.add(id, uploads).await,
            Datasets::Shared(s) => s.add(id, uploads).await,
        }
    }

    /// The dataset's images folder and image paths in this process's data folder, fetched
    /// first when scaled out. Call it from a blocking thread of the runtime (a job).
    pub fn local_images(&self, id: &str) -> DatasetResult<(PathBuf, Vec<PathBuf>)> {
        match self {
            Datasets::Embedded(s) => Ok((s.images_dir(id)?, s.image_paths(id)?)),
            Datasets::Shared(s) => super::shared::block_on(s.fetch(id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingest(tmp: &Path) -> Ingest {
        Ingest {
            images: tmp.to_path_buf(),
            tmp: tmp.to_path_buf(),
            limits: DatasetLimits { max_unpacked_bytes: 1 << 20, ..DatasetLimits::default() },
            index: Index { id: "x".into(), name: "x".into(), created_at: String::new(), images: vec![] },
            known: HashSet::new(),
            total_bytes: 0,
            report: UploadReport::default(),
            written: vec![],
        }
    }

    #[test]
    fn an_endless_entry_costs_only_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let ing = ingest(dir.path());
        let mut unpacked = 0;
        match ing.unpack(std::io::repeat(7), 100_000, "too big", &mut unpacked) {
            Err(EntryFail::Reject(r)) => assert_eq!(r, "too big"),
            _ => panic!("an endless entry must be refused"),
        }
        assert!(unpacked <= 100_000 + (64 << 10), "read {unpacked} bytes");
        // The archive total stops it too, whatever the entry cap.
        let mut unpacked = 0;
        assert!(matches!(ing.unpack(std::io::repeat(7), u64::MAX, "", &mut unpacked), Err(EntryFail::Stop(Stop::Refuse(_)))));
        assert!(unpacked <= (1 << 20) + (64 << 10));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no temporary file is left");
    }

    #[test]
    fn the_zip_end_record_gives_the_entry_count() {
        let mut bytes = vec![];
        {
            let mut z = zip::ZipWriter::new(std::io::Cursor::new(&mut bytes));
            for i in 0..7 {
                z.start_file(format!("{i}.txt"), zip::write::SimpleFileOptions::default()).unwrap();
                z.write_all(b"hello").unwrap();
            }
            z.set_comment("a comment after the end record");
            z.finish().unwrap();
        }
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes).unwrap();
        assert_eq!(zip_declared_entries(&f), Some(7));
        let mut g = tempfile::tempfile().unwrap();
        g.write_all(b"not a zip at all").unwrap();
        assert_eq!(zip_declared_entries(&g), None);
    }
}
