//! Everything the HTTP layer calls, in one place.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{admission, catalog, datasets, inference, jobs, metrics};
use crate::infer::Quality;

/// Everything the HTTP layer calls.
pub struct Services {
    pub catalog: Arc<catalog::Catalog>,
    pub datasets: datasets::Datasets,
    pub jobs: jobs::Jobs,
    pub inference: inference::Inference,
    pub admission: admission::Admission,
    pub metrics: metrics::Metrics,
    /// `/segment`'s quality when the request names none.
    pub quality: Quality,
    pub limits: Limits,
    pub info: ServerInfo,
    /// False once the server is shutting down.
    ready: AtomicBool,
}

/// What a request may cost that the services check.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest image, in pixels, read from the header before decoding.
    pub max_image_pixels: u64,
}

/// How the server was started, for `/info`.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    /// `api`, `worker` or `all`.
    pub role: &'static str,
    /// `embedded` (the data folder) or `shared` (PostgreSQL and object storage).
    pub storage: &'static str,
    /// `--device` as given: `auto`, `cpu` or `cuda:N`.
    pub requested_device: String,
}

impl Services {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        catalog: Arc<catalog::Catalog>,
        datasets: datasets::Datasets,
        jobs: jobs::Jobs,
        inference: inference::Inference,
        admission: admission::Admission,
        quality: Quality,
        limits: Limits,
        info: ServerInfo,
    ) -> Self {
        Self {
            catalog,
            datasets,
            jobs,
            inference,
            admission,
            metrics: Default::default(),
            quality,
            limits,
            info,
            ready: AtomicBool::new(true),
        }
    }

    /// The server is up and not shutting down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn shutting_down(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }
}
