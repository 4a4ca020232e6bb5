//! Routing: public routes (segment, health, info, metrics, docs, web page) apart from the guarded
//! ones that change state, request metrics, the API-key check and the JSON fallback.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use axum::extract::connect_info::MockConnectInfo;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method};
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

/// Requests that change state: with an API key configured they must carry it; without one
/// they are accepted only from loopback peers (safe by default: a server reachable from the
/// network cannot be changed by anyone who can reach its port).
async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() == Method::GET || req.method() == Method::HEAD || req.method() == Method::OPTIONS {
        return next.run(req).await;
    }
    let Some(expected) = state.api_key.as_deref() else {
        // The peer as the connection reported it (tests supply it with MockConnectInfo).
        let ext = req.extensions();
        let peer =
            ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()).or_else(|| ext.get::<MockConnectInfo<SocketAddr>>().map(|c| c.0.ip()));
        return match peer {
            Some(ip) if is_loopback(ip) => next.run(req).await,
            _ => ApiError::Forbidden(
                "this server runs without an API key, so it accepts changes only from its own machine (loopback); \
                 start it with --api-key (PICIE_API_KEY) to allow remote clients"
                    .into(),
            )
            .into_response(),
        };
    };
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

/// Loopback, also as an IPv4-mapped IPv6 address (a dual-stack listener's view of 127.0.0.1).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
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
    let guarded = Router::new()
        .route("/models/{name}/activate", post(routes::models::activate))
        .route("/models/{name}", get(routes::models::show).delete(routes::models::delete))
        .route("/models/{name}/classes", axum::routing::put(routes::models::update_classes))
        .route("/datasets", post(routes::datasets::create).get(routes::datasets::list))
        .route("/datasets/{id}", get(routes::datasets::show).delete(routes::datasets::delete))
        .route("/datasets/{id}/images", post(routes::datasets::upload).layer(DefaultBodyLimit::max(state.limits.max_upload_bytes)))
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
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(fallback)
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}
