//! Public operational routes: health, info, metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::server::http::state::AppState;

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/health/live", tag = "operations", responses((status = 200, body = Health)))]
pub async fn live() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The model is loaded and warmed up, the inference thread is alive and not stuck in a batch,
/// and the server is not shutting down.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    if !state.services.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "not ready" }))
    } else if !state.services.inference.is_live() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "inference worker not live" }))
    } else {
        (StatusCode::OK, Json(Health { status: "ready" }))
    }
}

#[derive(Serialize, ToSchema)]
pub struct Info {
    pub version: &'static str,
    pub model: String,
    pub model_version: String,
    pub num_classes: usize,
    pub backbone: String,
    pub trained: bool,
    /// Execution provider in use: `cpu` or `cuda`.
    pub execution_provider: &'static str,
    /// `--device` as given: `auto`, `cpu` or `cuda:N`.
    pub requested_device: String,
    /// `/segment`'s quality when a request names none.
    pub default_quality: crate::infer::Quality,
    /// Whether the model's centroids were clustered on flip-averaged features.
    pub clustered_with_flip: bool,
    /// `api`, `worker` or `all` (`--role`).
    pub role: &'static str,
    /// `embedded` (the data folder) or `shared` (PostgreSQL and object storage).
    pub storage: &'static str,
}

/// Server version, active model and the execution provider in use.
#[utoipa::path(get, path = "/info", tag = "operations", responses((status = 200, body = Info)))]
pub async fn info(State(state): State<AppState>) -> Json<Info> {
    let s = &state.services;
    let (name, model) = s.catalog.active();
    let m = &model.package.manifest;
    Json(Info {
        version: env!("CARGO_PKG_VERSION"),
        model: name,
        model_version: model.package.version(),
        num_classes: model.k(),
        backbone: m.embedder.backbone.name(),
        trained: m.provenance.trained,
        execution_provider: model.provider().as_str(),
        requested_device: s.info.requested_device.clone(),
        default_quality: s.quality,
        clustered_with_flip: m.input.flip,
        role: s.info.role,
        storage: s.info.storage,
    })
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let s = &state.services;
    let (name, model) = s.catalog.active();
    let jobs = s.jobs.counts().await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot count jobs for /metrics");
        vec![]
    });
    let snapshot = crate::server::service::metrics::Snapshot {
        queue_depth: s.inference.queue_depth(),
        expected_wait: s.inference.estimated_wait(),
        worker_live: s.inference.is_live(),
        jobs_by_state: jobs.iter().map(|(st, n)| (st.as_str(), *n)).collect(),
        watchers: s.jobs.watchers(),
        pixels_in_flight: s.admission.pixels_in_flight(),
        abandoned: s.inference.abandoned(),
        provider: model.provider().as_str(),
        model: &name,
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render(&snapshot))
}
