//! Model versions: list, show, activate, delete, rename classes.

use axum::extract::State;
use axum::http::StatusCode;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::server::error::{ApiError, ApiResult, ErrorBody};
use crate::server::extract::{Json, Path};
use crate::server::state::AppState;
use crate::server::store::ModelSummary;

#[derive(Serialize, ToSchema)]
pub struct ClassView {
    pub index: usize,
    pub name: String,
    pub color: [u8; 3],
    /// Whether the name was set by a person (otherwise `class N`).
    pub named: bool,
}

#[derive(Serialize, ToSchema)]
pub struct ModelDetail {
    pub name: String,
    pub active: bool,
    /// The package manifest as stored.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
    pub classes: Vec<ClassView>,
}

/// All model versions.
#[utoipa::path(get, path = "/models", tag = "models", responses((status = 200, body = Vec<ModelSummary>)))]
pub async fn list(State(state): State<AppState>) -> Json<Vec<ModelSummary>> {
    Json(state.models.list())
}

/// One model version: manifest and classes.
#[utoipa::path(get, path = "/models/{name}", tag = "models", params(("name" = String, Path)),
    responses((status = 200, body = ModelDetail), (status = 404, body = ErrorBody)))]
pub async fn show(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<ModelDetail>> {
    // Loading hashes every file of the package (tens of MB): not on the async runtime.
    let pkg = state.models.package_blocking(&name).await?;
    let c = &pkg.centroids;
    Ok(Json(ModelDetail {
        active: state.models.active().0 == name,
        manifest: serde_json::to_value(&pkg.manifest).map_err(anyhow::Error::from)?,
        classes: (0..c.k())
            .map(|i| ClassView { index: i, name: c.name(i), color: c.color(i), named: c.classes[i].name.is_some() })
            .collect(),
        name,
    }))
}

/// Make a model version the one that serves `/segment` (atomic: a failed load keeps the old one).
#[utoipa::path(post, path = "/models/{name}/activate", tag = "models", params(("name" = String, Path)),
    security(("api_key" = [])),
    responses((status = 200, body = ModelSummary), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn activate(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<ModelSummary>> {
    let _guard = state.models.edit.lock().await;
    state.models.activate(&name).await?;
    summary(&state, &name)
}

fn summary(state: &AppState, name: &str) -> ApiResult<Json<ModelSummary>> {
    state
        .models
        .list()
        .into_iter()
        .find(|m| m.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("model `{name}` not found")))
}

/// Delete an inactive model version made by a job.
#[utoipa::path(delete, path = "/models/{name}", tag = "models", params(("name" = String, Path)),
    security(("api_key" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    let _guard = state.models.edit.lock().await;
    state.models.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
pub struct ClassUpdate {
    /// The class, 0 to K - 1.
    #[schema(maximum = 254)]
    pub index: usize,
    /// New name (at most 64 characters); an empty string clears it.
    #[schema(max_length = 64)]
    pub name: Option<String>,
    /// New RGB colour.
    #[schema(min_items = 3, max_items = 3)]
    pub color: Option<[u8; 3]>,
}

#[derive(Deserialize, ToSchema)]
pub struct ClassesUpdate {
    pub classes: Vec<ClassUpdate>,
}

const MAX_CLASS_NAME: usize = 64;

/// Rename classes and set their colours; saved in the model package.
#[utoipa::path(put, path = "/models/{name}/classes", tag = "models", params(("name" = String, Path)),
    request_body = ClassesUpdate, security(("api_key" = [])),
    responses((status = 200, body = ModelDetail), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update_classes(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(update): Json<ClassesUpdate>,
) -> ApiResult<Json<ModelDetail>> {
    let _guard = state.models.edit.lock().await;
    let mut pkg = state.models.package_blocking(&name).await?;
    let mut centroids = pkg.centroids.clone();
    for u in &update.classes {
        let class = centroids
            .classes
            .get_mut(u.index)
            .ok_or_else(|| ApiError::BadRequest(format!("class {} does not exist (K = {})", u.index, pkg.manifest.k)))?;
        if let Some(n) = &u.name {
            let n = n.trim();
            if n.chars().count() > MAX_CLASS_NAME {
                return Err(ApiError::BadRequest(format!("class names are at most {MAX_CLASS_NAME} characters")));
            }
            class.name = (!n.is_empty()).then(|| n.to_string());
        }
        if let Some(c) = u.color {
            class.color = Some(c);
        }
    }
    tokio::task::spawn_blocking(move || pkg.update_centroids(centroids).map(|_| pkg))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    // Scaled out: every replica fetches the new revision (and reloads it if it is active).
    state.models.publish(&name).await?;
    if state.models.active().0 == name {
        // Serve the new names and colours at once.
        state.models.activate(&name).await?;
    }
    drop(_guard);
    show(State(state), Path(name)).await
}
