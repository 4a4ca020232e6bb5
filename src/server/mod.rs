//! The HTTP API (axum). Layers, one direction of dependency: `router` and `routes` (HTTP) ->
//! `state`, `store`, `datasets`, `jobs` (storage and job bookkeeping) -> `infer` / `train`
//! (the model). Only `error` maps core errors to HTTP statuses.

pub mod config;
pub mod datasets;
pub mod error;
pub mod extract;
pub mod jobs;
pub mod metrics;
pub mod openapi;
pub mod probe;
pub mod render;
pub mod router;
pub mod routes;
pub mod runner;
pub mod shared;
pub mod state;
pub mod store;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

pub use config::ServeConfig;
use jobs::{JobManager, Jobs};
pub use openapi::{openapi_json, ApiDoc};
pub use router::router;
use state::{AppState, Limits};

/// Loads the model, warms it up, and builds the shared state. Call it inside a Tokio runtime
/// (the job runner is spawned on it).
pub fn build_state(cfg: &ServeConfig) -> Result<AppState> {
    let limits = Limits {
        max_body_bytes: cfg.max_body_bytes,
        max_upload_bytes: cfg.max_upload_bytes,
        max_image_pixels: cfg.max_image_pixels,
        max_concurrent: cfg.max_concurrent,
        request_timeout_secs: cfg.request_timeout_secs,
        max_queue_ms: cfg.max_queue_ms,
    };
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    // What a killed process left half-written goes before anything opens the folders.
    store::clean_leftovers(&cfg.data_dir);
    let shared = connect_shared(cfg)?;
    let models = Arc::new(match &shared {
        None => store::ModelRegistry::open(&cfg.models_dir, &cfg.data_dir, cfg.model.as_deref(), cfg.device, cfg.threads)?,
        Some(sh) => {
            store::ModelRegistry::open_shared(&cfg.models_dir, &cfg.data_dir, cfg.model.as_deref(), cfg.device, cfg.threads, sh.clone())?
        }
    });
    // Warm-up: the first run allocates and optimises; no request should pay for it.
    let (name, seg) = models.active();
    let warm = image::RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128]));
    seg.segment(&warm).with_context(|| format!("warming up model `{name}`"))?;
    // Then one street-frame-sized image at the default quality, timed: the queue bound's time
    // per image until real requests have been measured. Varied colours, as a photo has, give
    // the CRF its real work.
    let frame = image::RgbImage::from_fn(480, 360, |x, y| image::Rgb([(x * 7 + y * 3) as u8, (x * y % 251) as u8, (x ^ y) as u8]));
    let started = std::time::Instant::now();
    seg.segment_batch_at(std::slice::from_ref(&frame), cfg.quality, &cfg.refinement())
        .with_context(|| format!("warming up model `{name}`"))?;
    let initial_time_per_image = started.elapsed();
    tracing::info!(model = %name, provider = seg.provider().as_str(), quality = %cfg.quality, warm_ms = initial_time_per_image.as_millis() as u64, "model loaded and warmed up");

    let local = Arc::new(datasets::DatasetStore::open(&cfg.data_dir, cfg.dataset_limits())?);
    let datasets = match &shared {
        None => datasets::Datasets::Embedded(local),
        Some(sh) => datasets::Datasets::Shared(Arc::new(shared::datasets::SharedDatasets { local, shared: sh.clone() })),
    };
    let runner = || {
        runner::runner_for(
            models.clone(),
            datasets.clone(),
            cfg.data_dir.join("checkpoints"),
            runner::JobSettings::from_config(cfg),
            shared.clone(),
        )
    };
    let jobs = match &shared {
        None => Jobs::Embedded(JobManager::open(&cfg.data_dir, runner()?)?),
        Some(sh) => {
            let jobs = Arc::new(shared::jobs::SharedJobs { shared: sh.clone() });
            if cfg.role.runs_jobs() {
                jobs.clone().start_worker(runner()?);
            }
            // Every replica follows the model activated (or rewritten) on any other.
            let (models, every) = (models.clone(), sh.settings.sync_interval);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = models.sync().await {
                        tracing::warn!(error = %e, "cannot follow the shared model registry");
                    }
                }
            });
            Jobs::Shared(jobs)
        }
    };
    Ok(AppState {
        models,
        worker: worker::WorkerHandle::start(worker::WorkerConfig {
            capacity: cfg.max_concurrent,
            max_batch: cfg.max_batch,
            stall_after: std::time::Duration::from_secs(cfg.request_timeout_secs.max(1)),
            refine: cfg.refinement(),
            initial_time_per_image,
        }),
        quality: cfg.quality,
        inference_permits: Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent)),
        metrics: Default::default(),
        datasets,
        jobs,
        limits,
        api_key: cfg.api_key.clone().filter(|k| !k.is_empty()).map(Arc::new),
        requested_device: format!("{:?}", cfg.device).to_lowercase(),
        ready: Arc::new(AtomicBool::new(true)),
        role: cfg.role,
        shared: shared.is_some(),
    })
}

/// Scaled out (`--database-url` and `--store`): connects to both and migrates the database.
/// `--role api` or `worker` without them is refused: alone, such a process could not share
/// anything with the others.
fn connect_shared(cfg: &ServeConfig) -> Result<Option<Arc<shared::Shared>>> {
    let (Some(db), Some(store)) = (cfg.database_url.as_deref(), cfg.store.as_deref()) else {
        anyhow::ensure!(
            cfg.role == shared::Role::All,
            "--role {} needs --database-url and --store: replicas and workers share models, datasets and jobs through them",
            cfg.role.as_str()
        );
        return Ok(None);
    };
    let settings = shared::SharedSettings {
        instance: cfg.instance_id.clone().filter(|s| !s.is_empty()).unwrap_or_else(shared::default_instance_id),
        lease: std::time::Duration::from_secs(cfg.lease_secs.max(1)),
        sync_interval: std::time::Duration::from_millis(cfg.sync_interval_ms.max(10)),
        max_attempts: 3,
    };
    let sh =
        shared::block_on(shared::Shared::connect(db, store, settings)).context("connecting to the shared database and object store")?;
    Ok(Some(Arc::new(sh)))
}

/// Runs the server until SIGTERM or Ctrl-C; listens only once the model is warm.
pub async fn serve(cfg: ServeConfig) -> Result<()> {
    let state = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || build_state(&cfg)
    })
    .await??;
    let addr: SocketAddr =
        format!("{}:{}", cfg.host, cfg.port).parse().with_context(|| format!("bad address {}:{}", cfg.host, cfg.port))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    serve_on(listener, state, shutdown_signal()).await
}

/// Serves on a bound listener until `shutdown` completes, then lets in-flight requests finish.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let ready = state.ready.clone();
    if state.api_key.is_none() {
        tracing::warn!(
            "no --api-key (PICIE_API_KEY) set: routes that change state (uploads, jobs, model activation) accept only loopback clients; segmentation and reads are open to all"
        );
    } else {
        tracing::info!("routes that change state require the API key");
    }
    let app = router(state);
    tracing::info!(address = %listener.local_addr()?, "picie listening");
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            shutdown.await;
            ready.store(false, Ordering::Relaxed);
            tracing::info!("shutting down: finishing in-flight requests");
        })
        .await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
