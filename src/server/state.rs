//! What every handler shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::datasets::{DatasetLimits, DatasetStore};
use super::jobs::JobManager;
use super::metrics::Metrics;
use super::store::ModelRegistry;
use super::worker::WorkerHandle;

/// Request limits, all configurable.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request body (`/segment`).
    pub max_body_bytes: usize,
    /// Largest body of a dataset upload (many files or an archive).
    pub max_upload_bytes: usize,
    /// Largest image, in pixels, read from the header before decoding.
    pub max_image_pixels: u64,
    /// Segment requests in flight (decoding, queued or running); more get 429.
    pub max_concurrent: usize,
    pub request_timeout_secs: u64,
    /// A segment request is refused (429) when the inference queue's expected wait is longer.
    pub max_queue_ms: u64,
    /// Largest file unpacked from an archive (or uploaded as is).
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

impl Limits {
    pub fn max_queue_wait(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.max_queue_ms)
    }

    /// The caps dataset storage enforces.
    pub fn datasets(&self) -> DatasetLimits {
        DatasetLimits {
            max_image_pixels: self.max_image_pixels,
            max_entry_bytes: self.max_entry_bytes,
            max_compression_ratio: self.max_compression_ratio,
            max_archive_entries: self.max_archive_entries,
            max_unpacked_bytes: self.max_unpacked_bytes,
            max_dataset_images: self.max_dataset_images,
            max_dataset_bytes: self.max_dataset_bytes,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 20 << 20,
            max_upload_bytes: 512 << 20,
            max_image_pixels: 40_000_000,
            max_concurrent: 32,
            request_timeout_secs: 60,
            max_queue_ms: 250,
            max_entry_bytes: DatasetLimits::default().max_entry_bytes,
            max_compression_ratio: DatasetLimits::default().max_compression_ratio,
            max_archive_entries: DatasetLimits::default().max_archive_entries,
            max_unpacked_bytes: DatasetLimits::default().max_unpacked_bytes,
            max_dataset_images: DatasetLimits::default().max_dataset_images,
            max_dataset_bytes: DatasetLimits::default().max_dataset_bytes,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub models: Arc<ModelRegistry>,
    pub worker: WorkerHandle,
    pub inference_permits: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
    pub datasets: Arc<DatasetStore>,
    pub jobs: JobManager,
    pub limits: Limits,
    pub api_key: Option<Arc<String>>,
    pub requested_device: String,
    pub ready: Arc<AtomicBool>,
}

impl AppState {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}
