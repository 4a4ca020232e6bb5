//! What every handler shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::datasets::Datasets;
use super::jobs::Jobs;
use super::metrics::Metrics;
use super::shared::Role;
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
}

impl Limits {
    pub fn max_queue_wait(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.max_queue_ms)
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
            max_queue_ms: 2000,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub models: Arc<ModelRegistry>,
    pub worker: WorkerHandle,
    pub inference_permits: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
    pub datasets: Datasets,
    pub jobs: Jobs,
    pub limits: Limits,
    pub api_key: Option<Arc<String>>,
    pub requested_device: String,
    pub ready: Arc<AtomicBool>,
    /// `/segment`'s quality when the request names none.
    pub quality: crate::infer::Quality,
    pub role: Role,
    /// Scaled out: metadata in PostgreSQL, blobs in object storage.
    pub shared: bool,
}

impl AppState {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}
