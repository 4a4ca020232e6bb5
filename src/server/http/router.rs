//! Routing: open routes (health, the web page, the API documents), reads (segmentation and
//! listings; the key needed only with `--protect-reads`), and guarded routes (everything that
//! changes state); request metrics; one JSON error format for every answer that is not a success.

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
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
    state.services.metrics.observe_request(&method, &route, resp.status().as_u16(), start.elapsed());
    resp
}

/// Routes that change state.
async fn guard_changes(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match state.access.check(&req, true) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Routes that read (the key needed only with `--protect-reads`).
async fn guard_reads(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match state.access.check(&req, false) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The request's body fails once it sends nothing for the given time.
async fn silent_bodies_end(State(timeout): State<std::time::Duration>, req: Request) -> Request {
    req.map(|b| axum::body::Body::new(tower_http::timeout::TimeoutBody::new(timeout, b)))
}

async fn fallback() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!("{} is not allowed on {}", req.method(), req.uri().path()))
}

/// The last line of the one error format: any error answer that did not come from our handlers
/// (a layer's or the framework's plain-text rejection) is rewritten as
/// `{"error": {"code", "message"}}` with the same status and headers.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json =
        resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10).await.map(|b| String::from_utf8_lossy(&b).trim().to_string()).unwrap_or_default();
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    let mut out = ApiError::Status(status, message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

pub fn router(state: AppState) -> Router {
    let limits = state.limits.clone();
    let guarded = Router::new()
        .route("/models/{name}/activate", post(routes::models::activate))
        .route("/models/{name}", axum::routing::delete(routes::models::delete))
        .route("/models/{name}/classes", put(routes::models::update_classes))
        .route("/datasets", post(routes::datasets::create))
        .route("/datasets/{id}", axum::routing::delete(routes::datasets::delete))
        .route(
            "/datasets/{id}/images",
            post(routes::datasets::upload)
                .layer(DefaultBodyLimit::max(limits.max_upload_bytes))
                // An upload may be long, not silent: each chunk within the body timeout.
                .layer(middleware::map_request_with_state(limits.body_timeout, silent_bodies_end)),
        )
        .route("/jobs", post(routes::jobs::submit))
        .route("/jobs/{id}/cancel", post(routes::jobs::cancel))
        .route("/jobs/{id}/resume", post(routes::jobs::resume))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard_changes));
    let reads = Router::new()
        .route("/segment", post(routes::segment::segment))
        .route("/models", get(routes::models::list))
        .route("/models/{name}", get(routes::models::show))
        .route("/datasets", get(routes::datasets::list))
        .route("/datasets/{id}", get(routes::datasets::show))
        .route("/jobs", get(routes::jobs::list))
        .route("/jobs/{id}", get(routes::jobs::show))
        .route("/jobs/{id}/events", get(routes::jobs::events))
        .route("/jobs/{id}/masks.zip", get(routes::jobs::archive))
        .route("/jobs/{id}/gallery", get(routes::jobs::gallery))
        .route("/jobs/{id}/gallery/{file}", get(routes::jobs::gallery_crop))
        .route("/info", get(routes::ops::info))
        .route("/metrics", get(routes::ops::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard_reads));
    let open = Router::new()
        .route("/health/live", get(routes::ops::live))
        .route("/health/ready", get(routes::ops::ready))
        .route("/", get(routes::web::index))
        .route("/static/app.js", get(routes::web::app_js))
        .route("/static/style.css", get(routes::web::style));
    Router::new()
        .merge(open)
        .merge(reads)
        .merge(guarded)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(fallback)
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}
