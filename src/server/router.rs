//! Routing: public routes (segment, health, info, metrics, docs, web page) apart from the guarded
//! ones that change state, request metrics, the API-key check and the JSON fallback.

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use subtle::ConstantTimeEq;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use super::error::ApiError;
use super::openapi::ApiDoc;
use super::routes;
use super::state::AppState;

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
        .route("/jobs/{id}/resume", post(routes::jobs::resume))
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

