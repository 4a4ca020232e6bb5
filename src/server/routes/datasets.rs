//! Uploaded image sets.

use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use serde::Deserialize;
use utoipa::ToSchema;

use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

use crate::server::datasets::{Dataset, DatasetError, Upload, UploadReport};
use crate::server::error::{ApiError, ApiResult, ErrorBody};
use crate::server::extract::{Json, Path};
use crate::server::openapi::BinaryBody;
use crate::server::state::AppState;

#[derive(Deserialize, ToSchema)]
pub struct NewDataset {
    /// 1 to 100 characters, not only spaces.
    #[schema(min_length = 1, max_length = 100, pattern = "\\S")]
    pub name: String,
}

/// The multipart field that carries uploaded files.
const UPLOAD_FIELD: &str = "files";

/// The multipart form of an upload: one or more file parts, each in a field named `files`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct UploadForm {
    /// Image files (repeat the field for more). A file that is not an image, empty ones too,
    /// is reported under `rejected` and the rest kept.
    #[schema(min_items = 1)]
    pub files: Vec<UploadFile>,
}

/// One uploaded file: any bytes.
#[derive(Deserialize, ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct UploadFile(Vec<u8>);

/// Create an empty dataset.
#[utoipa::path(post, path = "/datasets", tag = "datasets", request_body = NewDataset, security(("api_key" = [])),
    responses((status = 201, body = Dataset), (status = 400, body = ErrorBody)))]
pub async fn create(State(state): State<AppState>, Json(body): Json<NewDataset>) -> ApiResult<(StatusCode, Json<Dataset>)> {
    Ok((StatusCode::CREATED, Json(state.datasets.create(&body.name).await?)))
}

/// All datasets.
#[utoipa::path(get, path = "/datasets", tag = "datasets", responses((status = 200, body = Vec<Dataset>), (status = 503, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>) -> ApiResult<Json<Vec<Dataset>>> {
    Ok(Json(state.datasets.list().await?))
}

/// One dataset and its images.
#[utoipa::path(get, path = "/datasets/{id}", tag = "datasets", params(("id" = String, Path)),
    responses((status = 200, body = Dataset), (status = 404, body = ErrorBody)))]
pub async fn show(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Dataset>> {
    Ok(Json(state.datasets.get(&id).await?))
}

/// Delete a dataset and its images.
#[utoipa::path(delete, path = "/datasets/{id}", tag = "datasets", params(("id" = String, Path)), security(("api_key" = [])),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    state.datasets.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Add images: multipart with one or many files (fields named `files`), or one zip or tar archive as
/// the raw body. Each image is decoded to check it and deduplicated by content; rejected files
/// are reported by name and the rest is kept.
#[utoipa::path(post, path = "/datasets/{id}/images", tag = "datasets", params(("id" = String, Path)), security(("api_key" = [])),
    request_body(description = "Image files as multipart/form-data, or one zip or tar archive as the raw body.",
        content((UploadForm = "multipart/form-data"), (BinaryBody = "application/zip"), (BinaryBody = "application/x-tar"), (BinaryBody = "application/octet-stream"))),
    responses((status = 200, body = UploadReport), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody)))]
pub async fn upload(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult<Json<UploadReport>> {
    state.datasets.exists(&id).await?;
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let multipart = ct.starts_with("multipart/form-data");
    let raw = ["application/zip", "application/x-tar", "application/octet-stream"].iter().any(|t| ct.starts_with(t));
    if !multipart && !raw {
        return Err(ApiError::UnsupportedMediaType(format!(
            "content type `{ct}`: send multipart/form-data, application/zip or application/x-tar"
        )));
    }
    let mut uploads = vec![];
    let received =
        if multipart { receive_multipart(&state, request, &mut uploads).await } else { receive_raw(&state, request, &mut uploads).await };
    if let Err(e) = received {
        // Removing the temporary files is file I/O: off the runtime, before answering.
        discard(uploads).await;
        return Err(e);
    }
    if uploads.is_empty() {
        return Err(ApiError::BadRequest(format!("the upload holds no files (send them in multipart fields named `{UPLOAD_FIELD}`)")));
    }
    Ok(Json(state.datasets.add(&id, uploads).await?))
}

async fn discard(uploads: Vec<Upload>) {
    let _ = tokio::task::spawn_blocking(move || drop(uploads)).await;
}

/// A new temporary file under `DATA_DIR/tmp` for `name`, pushed onto `uploads` at once (so an
/// error on the way removes it), and an async handle on it.
async fn new_upload(state: &AppState, name: String, uploads: &mut Vec<Upload>) -> ApiResult<tokio::fs::File> {
    let store = state.datasets.local().clone();
    let (file, handle) = tokio::task::spawn_blocking(move || -> Result<_, DatasetError> {
        let file = store.temp_file()?;
        let handle = file.as_file().try_clone().map_err(|source| DatasetError::Io { what: "opening an upload file".into(), source })?;
        Ok((file, handle))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    uploads.push(Upload { name, file });
    Ok(tokio::fs::File::from_std(handle))
}

fn write_failed(e: std::io::Error) -> ApiError {
    ApiError::Internal(format!("writing an upload to disk: {e}"))
}

fn too_large(limit: usize) -> ApiError {
    ApiError::body_read(StatusCode::PAYLOAD_TOO_LARGE, String::new(), limit)
}

/// Streams every multipart field into its own temporary file, chunk by chunk.
async fn receive_multipart(state: &AppState, request: Request, uploads: &mut Vec<Upload>) -> ApiResult<()> {
    let limit = state.limits.max_upload_bytes;
    let mut mp = Multipart::from_request(request, state).await.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let mut total = 0usize;
    loop {
        let mut field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => return Err(ApiError::body_read(e.status(), e.body_text(), limit)),
        };
        // Files come as file parts (with a file name) of fields named `files`, the documented
        // form; anything else is a malformed upload, refused whole.
        if field.name() != Some(UPLOAD_FIELD) {
            let got = field.name().unwrap_or("").chars().take(64).collect::<String>();
            return Err(ApiError::BadRequest(format!("unexpected multipart field `{got}`: send files in fields named `{UPLOAD_FIELD}`")));
        }
        let Some(name) = field.file_name().map(str::to_string) else {
            return Err(ApiError::BadRequest(format!("a `{UPLOAD_FIELD}` part has no file name: send files as file parts")));
        };
        let mut out = new_upload(state, name, uploads).await?;
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => {
                    total += chunk.len();
                    if total > limit {
                        return Err(too_large(limit));
                    }
                    out.write_all(&chunk).await.map_err(write_failed)?;
                }
                Ok(None) => break,
                Err(e) => return Err(ApiError::body_read(e.status(), e.body_text(), limit)),
            }
        }
        out.flush().await.map_err(write_failed)?;
    }
}

/// Streams a raw body (one archive) into a temporary file, chunk by chunk.
async fn receive_raw(state: &AppState, request: Request, uploads: &mut Vec<Upload>) -> ApiResult<()> {
    let limit = state.limits.max_upload_bytes;
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let mut out = new_upload(state, "archive".into(), uploads).await?;
    let mut body = request.into_body().into_data_stream();
    let mut total = 0usize;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        total += chunk.len();
        if total > limit {
            return Err(too_large(limit));
        }
        out.write_all(&chunk).await.map_err(write_failed)?;
    }
    out.flush().await.map_err(write_failed)?;
    Ok(())
}
