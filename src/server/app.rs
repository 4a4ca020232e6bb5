//! A server built from its flags: the data folder taken, the stores chosen (the data folder's
//! peers, or PostgreSQL and the object store when scaled out), the model loaded and warmed up,
//! the services started, the job executor running where the role runs jobs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::config::{Role, ServeConfig};
use super::http::access::Access;
use super::http::state::AppState;
use super::service::admission::Admission;
use super::service::catalog::Catalog;
use super::service::datasets::Datasets;
use super::service::inference::{Engine, Inference, InferenceConfig};
use super::service::jobs::{self, JobSettings, Jobs, Runner};
use super::service::services::{Limits, ServerInfo, Services};
use super::storage::local::datasets::LocalDatasets;
use super::storage::local::jobs::LocalJobs;
use super::storage::local::models::LocalModels;
use super::storage::local::{DataDir, DataLock};
use super::storage::shared::datasets::SharedDatasets;
use super::storage::shared::jobs::SharedJobs;
use super::storage::shared::models::SharedModels;
use super::storage::shared::{default_instance_id, Shared, SharedSettings};
use super::storage::{DatasetStore, JobStore, ModelStore};

/// A built server: what the HTTP layer serves, and the data folder it holds.
pub struct App {
    pub state: AppState,
    /// Held for as long as the server runs: it keeps a second server off the folder.
    _lock: DataLock,
    /// Background tasks that end with the server (the job executor).
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for App {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What a test or a benchmark may put in place of the real parts.
#[derive(Default)]
pub struct Parts {
    /// Runs inference batches instead of the models' own `segment_batch_at`.
    pub engine: Option<Engine>,
    /// How long a batch may run before the server is not ready (default: the request timeout).
    pub stall_after: Option<Duration>,
}

impl App {
    pub async fn build(cfg: &ServeConfig) -> Result<Self> {
        Self::build_with(cfg, Parts::default()).await
    }

    pub async fn build_with(cfg: &ServeConfig, parts: Parts) -> Result<Self> {
        let (data, lock) = {
            let dir = cfg.data_dir.clone();
            tokio::task::spawn_blocking(move || DataDir::open(&dir)).await??
        };
        let shared = connect_shared(cfg).await?;
        let local_datasets = Arc::new(LocalDatasets::new(data.clone(), cfg.dataset_limits()));
        let (models, datasets, job_store): (Arc<dyn ModelStore>, Arc<dyn DatasetStore>, Arc<dyn JobStore>) = match &shared {
            None => (Arc::new(LocalModels::new(data.clone())), Arc::new(local_datasets), Arc::new(LocalJobs::open(&data).await?)),
            Some(sh) => (
                Arc::new(SharedModels::new(sh.clone(), data.clone())),
                Arc::new(SharedDatasets::new(sh.clone(), local_datasets)),
                Arc::new(SharedJobs::new(sh.clone(), data.clone())),
            ),
        };
        let catalog = Arc::new(Catalog::open(models.clone(), &cfg.models_dir, cfg.model.as_deref(), cfg.device, cfg.threads).await?);
        catalog.follow();
        let initial_time_per_image = warm_up(&catalog, cfg).await?;
        let config = InferenceConfig {
            capacity: cfg.max_concurrent,
            max_batch: cfg.max_batch,
            stall_after: parts.stall_after.unwrap_or(Duration::from_secs(cfg.request_timeout_secs.max(1))),
            refine: cfg.refinement(),
            initial_time_per_image,
        };
        let inference = match parts.engine {
            Some(engine) => Inference::start_with(config, engine),
            None => Inference::start(config),
        };
        let admission = Admission::new(cfg.max_concurrent, cfg.max_inflight_pixels, Duration::from_millis(cfg.max_queue_ms));
        // Submitting a job and deleting its dataset take turns.
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let watchers = (cfg.max_watchers_per_job, cfg.max_watchers);
        let jobs = Jobs::new(job_store.clone(), datasets.clone(), catalog.clone(), gate.clone(), watchers);
        let mut tasks = vec![];
        if cfg.role.runs_jobs() {
            let settings =
                JobSettings { device: cfg.device, threads: cfg.job_threads.max(1), quality: cfg.quality, refine: cfg.refinement() };
            let runner = Runner::new(catalog.clone(), models, datasets.clone(), job_store.clone(), data.checkpoints(), settings)?;
            tasks.push(jobs::start_executor(job_store.clone(), Arc::new(runner)).abort_handle());
        }
        let services = Services::new(
            catalog,
            Datasets::new(datasets, job_store, gate),
            jobs,
            inference,
            admission,
            cfg.quality,
            Limits { max_image_pixels: cfg.max_image_pixels },
            ServerInfo {
                role: cfg.role.as_str(),
                storage: if shared.is_some() { "shared" } else { "embedded" },
                requested_device: cfg.device.to_string(),
            },
        );
        let access = Access::new(cfg.api_key.as_deref(), cfg.protect_reads, &cfg.host);
        Ok(Self { state: AppState::new(Arc::new(services), access, cfg.http_limits()), _lock: lock, tasks })
    }

    pub fn router(&self) -> axum::Router {
        super::http::router::router(self.state.clone())
    }
}

/// Scaled out (`--database-url` and `--store`): connects to both and migrates the database.
/// `--role api` or `worker` without them is refused: alone, such a process could not share
/// anything with the others.
async fn connect_shared(cfg: &ServeConfig) -> Result<Option<Arc<Shared>>> {
    let (Some(db), Some(store)) = (cfg.database_url.as_deref(), cfg.store.as_deref()) else {
        anyhow::ensure!(
            cfg.role == Role::All,
            "--role {} needs --database-url and --store: replicas and workers share models, datasets and jobs through them",
            cfg.role.as_str()
        );
        return Ok(None);
    };
    let settings = SharedSettings {
        instance: cfg.instance_id.clone().filter(|s| !s.is_empty()).unwrap_or_else(default_instance_id),
        lease: Duration::from_secs(cfg.lease_secs.max(1)),
        sync_interval: Duration::from_millis(cfg.sync_interval_ms.max(10)),
        max_attempts: 3,
    };
    let sh = Shared::connect(db, store, settings).await.context("connecting to the shared database and object store")?;
    Ok(Some(Arc::new(sh)))
}

/// The first run allocates and optimises, so no request pays for it; then one street-frame-sized
/// image at the default quality, timed: the queue bound's time per image until real requests
/// have been measured. Varied colours, as a photo has, give a refinement its real work.
async fn warm_up(catalog: &Catalog, cfg: &ServeConfig) -> Result<Duration> {
    let (name, seg) = catalog.active();
    let (quality, refine) = (cfg.quality, cfg.refinement());
    let elapsed = tokio::task::spawn_blocking(move || -> Result<Duration> {
        let warm = image::RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128]));
        seg.segment(&warm).with_context(|| format!("warming up model `{name}`"))?;
        let frame = image::RgbImage::from_fn(480, 360, |x, y| image::Rgb([(x * 7 + y * 3) as u8, (x * y % 251) as u8, (x ^ y) as u8]));
        let started = Instant::now();
        seg.segment_batch_at(std::slice::from_ref(&frame), quality, &refine).with_context(|| format!("warming up model `{name}`"))?;
        let elapsed = started.elapsed();
        tracing::info!(model = %name, provider = seg.provider().as_str(), quality = %quality, warm_ms = elapsed.as_millis() as u64, "model loaded and warmed up");
        Ok(elapsed)
    })
    .await??;
    Ok(elapsed)
}
