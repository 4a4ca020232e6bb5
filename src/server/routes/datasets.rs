//! Uploaded image sets.

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::server::datasets::{Dataset, Upload, UploadReport};
use crate::server::error::{ApiError, ApiResult, ErrorBody};
use crate::server::extract::{Json, Path};
use crate::server::state::AppState;

#[derive(Deserialize, ToSchema)]
pub struct NewDataset {
    pub name: String,
}

/// Create an empty dataset.
#[utoipa::path(post, path = "/datasets", tag = "datasets", request_body = NewDataset, security(("api_key" = [])),
    responses((status = 201, body = Dataset), (status = 400, body = ErrorBody)))]
pub async fn create(State(state): State<AppState>, Json(body): Json<NewDataset>) -> ApiResult<(StatusCode, Json<Dataset>)> {
    Ok((StatusCode::CREATED, Json(state.datasets.create(&body.name)?)))
}

/// All datasets.
#[utoipa::path(get, path = "/datasets", tag = "datasets", responses((status = 200, body = Vec<Dataset>)))]
pub async fn list(State(state): State<AppState>) -> Json<Vec<Dataset>> {
    Json(state.datasets.list())
}

/// One dataset and its images.
#[utoipa::path(get, path = "/datasets/{id}", tag = "datasets", params(("id" = String, Path)),
    responses((status = 200, body = Dataset), (status = 404, body = ErrorBody)))]
pub async fn show(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Dataset>> {
    Ok(Json(state.datasets.get(&id)?))
}

/// Delete a dataset and its images.
#[utoipa::path(delete, path = "/datasets/{id}", tag = "datasets", params(("id" = String, Path)), security(("api_key" = [])),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    state.datasets.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Add images: multipart with one or many files (any field name), or one zip or tar archive as
/// the raw body. Each image is decoded to check it and deduplicated by content; rejected files
/// are reported by name and the rest is kept.
#[utoipa::path(post, path = "/datasets/{id}/images", tag = "datasets", params(("id" = String, Path)), security(("api_key" = [])),
    request_body(content = Vec<u8>, content_type = "multipart/form-data", description = "files, or a zip/tar archive as application/zip or application/x-tar"),
    responses((status = 200, body = UploadReport), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody)))]
pub async fn upload(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult<Json<UploadReport>> {
    state.datasets.get(&id)?;
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let limit = state.limits.max_upload_bytes;
    let mut uploads = vec![];
    if ct.starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(request, &state).await.map_err(|e| ApiError::BadRequest(e.body_text()))?;
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(ApiError::body_read(e.status(), e.body_text(), limit)),
            };
            let name = field.file_name().or(field.name()).unwrap_or("upload").to_string();
            let bytes = field.bytes().await.map_err(|e| ApiError::body_read(e.status(), e.body_text(), limit))?;
            uploads.push(Upload { name, bytes: bytes.to_vec() });
        }
    } else if ct.starts_with("application/zip") || ct.starts_with("application/x-tar") || ct.starts_with("application/octet-stream") {
        let bytes = Bytes::from_request(request, &state)
            .await
            .map_err(|e| ApiError::body_read(e.status(), e.body_text(), limit))?;
        uploads.push(Upload { name: "archive".into(), bytes: bytes.to_vec() });
    } else {
        return Err(ApiError::UnsupportedMediaType(format!(
            "content type `{ct}`: send multipart/form-data, application/zip or application/x-tar"
        )));
    }
    if uploads.is_empty() {
        return Err(ApiError::BadRequest("the upload holds no files".into()));
    }
    Ok(Json(state.datasets.add(&id, uploads).await?))
}
