//! Uploaded image sets as the API shows them, what an upload may cost, and what it reports.

use serde::{Deserialize, Serialize};
use tempfile::NamedTempFile;
use utoipa::ToSchema;

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

#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct ImageEntry {
    /// SHA-256 of the file's bytes.
    pub sha256: String,
    /// The name it was uploaded under.
    pub original_name: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    /// The stored file's name (the hash and the format's extension).
    #[serde(skip)]
    #[schema(ignore)]
    pub file: String,
}

/// A dataset; its images only where asked for (`GET /datasets/{id}?images=true`), a page at a time.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct Dataset {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub num_images: usize,
    /// Bytes of images in all.
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images: Option<Vec<ImageEntry>>,
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

/// One uploaded file, already streamed to a temporary file of the data folder (removed when
/// dropped unless it is moved into a dataset).
pub struct Upload {
    pub name: String,
    pub file: NamedTempFile,
}
