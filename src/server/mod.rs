//! The HTTP API (axum): public routes (health, info, metrics, docs, segment) apart from the
//! guarded ones that change state (datasets, jobs, model activation and edits).

pub mod datasets;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod render;
pub mod routes;
pub mod state;
pub mod store;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use subtle::ConstantTimeEq;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use crate::infer::DeviceChoice;
use crate::train::cluster::recluster_package;
use crate::train::kmeans::KMeansConfig;
use error::ApiError;
use jobs::{JobManager, JobSpec, Runner};
use state::{AppState, Limits};

#[derive(OpenApi)]
#[openapi(
    info(title = "picie", description = "Unsupervised semantic segmentation (PiCIE): segment images into classes discovered without labels, upload image sets and re-cluster them in the background."),
    paths(
        routes::segment::segment,
        routes::ops::live, routes::ops::ready, routes::ops::info, routes::ops::metrics,
        routes::models::list, routes::models::show, routes::models::activate, routes::models::delete, routes::models::update_classes,
        routes::datasets::create, routes::datasets::list, routes::datasets::show, routes::datasets::delete, routes::datasets::upload,
        routes::jobs::submit, routes::jobs::list, routes::jobs::show, routes::jobs::cancel, routes::jobs::events,
    ),
    modifiers(&SecurityAddon),
    tags((name = "segment"), (name = "models"), (name = "datasets"), (name = "jobs"), (name = "operations"))
)]
pub struct ApiDoc;

struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "x-api-key",
                "Required on routes that change state when the server runs with --api-key (also accepted as `Authorization: Bearer`).",
            ))),
        );
    }
}

/// The OpenAPI document as served at `/openapi.json`.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().expect("OpenAPI serialises")
}

#[derive(clap::Args, Clone, Debug)]
pub struct ServeConfig {
    #[arg(long, env = "PICIE_HOST", default_value = "0.0.0.0")]
    pub host: String,
    #[arg(long, env = "PICIE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Where datasets, jobs and new model versions are kept.
    #[arg(long, env = "PICIE_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Folder of shipped model packages.
    #[arg(long, env = "PICIE_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Model to serve (default: the last one activated, else `default`).
    #[arg(long, env = "PICIE_MODEL")]
    pub model: Option<String>,
    /// When set, required (x-api-key or Bearer) on every route that changes state.
    #[arg(long, env = "PICIE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "PICIE_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// ONNX Runtime intra-op threads (default: ONNX Runtime's choice).
    #[arg(long, env = "PICIE_THREADS")]
    pub threads: Option<usize>,
    #[arg(long, env = "PICIE_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    #[arg(long, env = "PICIE_MAX_UPLOAD_BYTES", default_value_t = Limits::default().max_upload_bytes)]
    pub max_upload_bytes: usize,
    #[arg(long, env = "PICIE_MAX_IMAGE_PIXELS", default_value_t = Limits::default().max_image_pixels)]
    pub max_image_pixels: u64,
    #[arg(long, env = "PICIE_MAX_CONCURRENT", default_value_t = Limits::default().max_concurrent)]
    pub max_concurrent: usize,
    #[arg(long, env = "PICIE_REQUEST_TIMEOUT_SECS", default_value_t = Limits::default().request_timeout_secs)]
    pub request_timeout_secs: u64,
    /// Images per inference batch when requests queue up.
    #[arg(long, env = "PICIE_MAX_BATCH", default_value_t = 4)]
    pub max_batch: usize,
}

impl ServeConfig {
    /// The defaults of the command line, for `models_dir` and `data_dir`.
    pub fn new(models_dir: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        let l = Limits::default();
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            data_dir: data_dir.into(),
            models_dir: models_dir.into(),
            model: None,
            api_key: None,
            device: DeviceChoice::Auto,
            threads: None,
            max_body_bytes: l.max_body_bytes,
            max_upload_bytes: l.max_upload_bytes,
            max_image_pixels: l.max_image_pixels,
            max_concurrent: l.max_concurrent,
            request_timeout_secs: l.request_timeout_secs,
            max_batch: 4,
        }
    }
}

/// Loads the model, warms it up, and builds the shared state. Call it inside a Tokio runtime
/// (the job runner is spawned on it).
pub fn build_state(cfg: &ServeConfig) -> Result<AppState> {
    let limits = Limits {
        max_body_bytes: cfg.max_body_bytes,
        max_upload_bytes: cfg.max_upload_bytes,
        max_image_pixels: cfg.max_image_pixels,
        max_concurrent: cfg.max_concurrent,
        request_timeout_secs: cfg.request_timeout_secs,
    };
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let models = Arc::new(store::ModelRegistry::open(&cfg.models_dir, &cfg.data_dir, cfg.model.as_deref(), cfg.device, cfg.threads)?);
    // Warm-up: the first run allocates and optimises; no request should pay for it.
    let (name, seg) = models.active();
    let warm = image::RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128]));
    seg.segment(&warm).with_context(|| format!("warming up model `{name}`"))?;
    tracing::info!(model = %name, provider = seg.provider().as_str(), "model loaded and warmed up");

    let datasets = Arc::new(datasets::DatasetStore::open(&cfg.data_dir, cfg.max_image_pixels)?);
    let jobs = JobManager::open(&cfg.data_dir, job_runner(models.clone(), datasets.clone(), cfg.data_dir.join("checkpoints")))?;
    Ok(AppState {
        models,
        worker: worker::WorkerHandle::start(cfg.max_concurrent, cfg.max_batch),
        inference_permits: Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent)),
        metrics: Default::default(),
        datasets,
        jobs,
        limits,
        api_key: cfg.api_key.clone().filter(|k| !k.is_empty()).map(Arc::new),
        requested_device: format!("{:?}", cfg.device).to_lowercase(),
        ready: Arc::new(AtomicBool::new(true)),
    })
}

fn job_runner(models: Arc<store::ModelRegistry>, datasets: Arc<datasets::DatasetStore>, checkpoints: PathBuf) -> Runner {
    Arc::new(move |job, ctx| match &job.spec {
        JobSpec::Recluster { dataset, k, seed, name } => {
            ctx.progress("loading", 0.0);
            let paths = datasets.image_paths(dataset)?;
            let source = models.package(&job.source_model)?;
            let (active_name, active) = models.active();
            let session_owner;
            let session = if active_name == job.source_model {
                active.session()
            } else {
                session_owner = crate::infer::EmbedSession::load(&source.onnx_path(), DeviceChoice::Auto, None)?;
                &session_owner
            };
            let name = name.clone().unwrap_or_else(|| format!("recluster-{}", job.id.trim_start_matches("job-")));
            let out = models.models_dir().join(&name);
            let seed = seed.unwrap_or(0);
            let command = format!("recluster dataset={dataset} k={k} seed={seed} (job {})", job.id);
            let (pkg, report) = recluster_package(&source, session, &paths, KMeansConfig::new(*k, seed), &out, &name, &command, |done, total| {
                ctx.progress("embedding", 0.9 * done as f64 / total.max(1) as f64);
                !ctx.canceled()
            })?;
            Ok(serde_json::json!({
                "model": name,
                "k": pkg.manifest.k,
                "images_used": report.images_used,
                "skipped": report.skipped,
                "vectors": report.vectors,
            }))
        }
        JobSpec::Finetune { dataset, package_k, name, .. } => {
            ctx.progress("loading", 0.0);
            let source = models.package(&job.source_model)?;
            let config = jobs::finetune_config(&job.spec).expect("a finetune spec");
            let name = name.clone().unwrap_or_else(|| format!("finetune-{}", job.id.trim_start_matches("job-")));
            let images = datasets.images_dir(dataset)?;
            let args = crate::commands::TrainArgs {
                images,
                out: models.models_dir().join(&name),
                init: crate::commands::TrainInit::Package(source.dir.clone()),
                config,
                package_k: Some(package_k.unwrap_or(source.manifest.k)),
                checkpoint: checkpoints.join(format!("{}.checkpoint", job.id)),
                resume: true,
                name: name.clone(),
                replace: false,
                command: format!("finetune dataset={dataset} (job {})", job.id),
            };
            let outcome = crate::commands::train(&args, &mut |p| {
                ctx.progress(&format!("{} epoch {}/{}", p.phase, p.epoch + 1, p.epochs), 0.95 * p.fraction());
                !ctx.canceled()
            })?;
            let Some((pkg, _)) = outcome else { anyhow::bail!("canceled") };
            let _ = std::fs::remove_dir_all(&args.checkpoint);
            Ok(serde_json::json!({
                "model": name,
                "k": pkg.manifest.k,
                "epochs": args.config.epochs,
                "epoch_losses": pkg.manifest.provenance.details.get("epoch_losses"),
            }))
        }
    })
}

/// Records count and latency by route and status.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    state.metrics.observe_request(&method, &route, resp.status().as_u16(), start.elapsed());
    resp
}

/// With an API key configured, every request that changes state must carry it.
async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.api_key.as_deref() else { return next.run(req).await };
    if req.method() == Method::GET || req.method() == Method::HEAD || req.method() == Method::OPTIONS {
        return next.run(req).await;
    }
    let h = req.headers();
    let given = h
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| h.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

async fn fallback() -> ApiError {
    ApiError::NotFound("no such route".into())
}

pub fn router(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/models/{name}/activate", post(routes::models::activate))
        .route("/models/{name}", get(routes::models::show).delete(routes::models::delete))
        .route("/models/{name}/classes", axum::routing::put(routes::models::update_classes))
        .route("/datasets", post(routes::datasets::create).get(routes::datasets::list))
        .route("/datasets/{id}", get(routes::datasets::show).delete(routes::datasets::delete))
        .route(
            "/datasets/{id}/images",
            post(routes::datasets::upload).layer(DefaultBodyLimit::max(state.limits.max_upload_bytes)),
        )
        .route("/jobs", post(routes::jobs::submit).get(routes::jobs::list))
        .route("/jobs/{id}", get(routes::jobs::show))
        .route("/jobs/{id}/cancel", post(routes::jobs::cancel))
        .route("/jobs/{id}/events", get(routes::jobs::events))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let public = Router::new()
        .route("/segment", post(routes::segment::segment).layer(DefaultBodyLimit::max(state.limits.max_body_bytes)))
        .route("/models", get(routes::models::list))
        .route("/health/live", get(routes::ops::live))
        .route("/health/ready", get(routes::ops::ready))
        .route("/info", get(routes::ops::info))
        .route("/metrics", get(routes::ops::metrics))
        .route("/", get(routes::web::index))
        .route("/static/app.js", get(routes::web::app_js))
        .route("/static/style.css", get(routes::web::style));
    Router::new()
        .merge(public)
        .merge(guarded)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Runs the server until SIGTERM or Ctrl-C; listens only once the model is warm.
pub async fn serve(cfg: ServeConfig) -> Result<()> {
    let state = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || build_state(&cfg)
    })
    .await??;
    let addr: SocketAddr = format!("{}:{}", cfg.host, cfg.port).parse().with_context(|| format!("bad address {}:{}", cfg.host, cfg.port))?;
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
    let app = router(state);
    tracing::info!(address = %listener.local_addr()?, "picie listening");
    axum::serve(listener, app)
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
