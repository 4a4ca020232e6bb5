//! Model versions: list, show, activate, delete, rename classes.

use axum::extract::State;
use axum::http::StatusCode;

use crate::server::core::models::{ClassesUpdate, ModelDetail, ModelSummary};
use crate::server::http::error::{ApiResult, ErrorBody};
use crate::server::http::extract::{Json, Path};
use crate::server::http::state::AppState;

/// All model versions: the shipped ones and those made by jobs.
#[utoipa::path(get, path = "/models", tag = "models", responses((status = 200, body = Vec<ModelSummary>), (status = 503, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>) -> ApiResult<Json<Vec<ModelSummary>>> {
    Ok(Json(state.services.catalog.list().await?))
}

/// One model version: manifest and classes.
#[utoipa::path(get, path = "/models/{name}", tag = "models", params(("name" = String, Path)),
    responses((status = 200, body = ModelDetail), (status = 404, body = ErrorBody)))]
pub async fn show(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<ModelDetail>> {
    Ok(Json(state.services.catalog.detail(&name).await?))
}

/// Make a model version the one that serves `/segment`: loaded fully, recorded, then swapped in
/// (a failed load keeps the old one).
#[utoipa::path(post, path = "/models/{name}/activate", tag = "models", params(("name" = String, Path)),
    security(("api_key" = [])),
    responses((status = 200, body = ModelSummary), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn activate(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<ModelSummary>> {
    Ok(Json(state.services.catalog.activate(&name).await?))
}

/// Delete an inactive model version made by a job (shipped models are never deleted).
#[utoipa::path(delete, path = "/models/{name}", tag = "models", params(("name" = String, Path)),
    security(("api_key" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    state.services.catalog.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Rename classes and set their colours; saved as a new revision of the model (for a shipped
/// model, as an edited copy in the data folder: the shipped package is never written).
#[utoipa::path(put, path = "/models/{name}/classes", tag = "models", params(("name" = String, Path)),
    request_body = ClassesUpdate, security(("api_key" = [])),
    responses((status = 200, body = ModelDetail), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn update_classes(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(update): Json<ClassesUpdate>,
) -> ApiResult<Json<ModelDetail>> {
    Ok(Json(state.services.catalog.edit_classes(&name, &update).await?))
}
