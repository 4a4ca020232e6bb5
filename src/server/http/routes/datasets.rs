//! Uploaded image sets.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use utoipa::{IntoParams, ToSchema};

use crate::server::core::datasets::{Dataset, Upload, UploadReport};
use crate::server::core::Page;
use crate::server::http::body::{self, BinaryBody};
use crate::server::http::error::{ApiError, ApiResult, ErrorBody};
use crate::server::http::extract::{Json, Path, Query};
use crate::server::http::state::AppState;

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

#[derive(Deserialize, IntoParams)]
pub struct ShowQuery {
    /// Include a page of the dataset's images (default false).
    #[serde(default)]
    pub images: bool,
    /// Images to skip (default 0).
    pub offset: Option<usize>,
    /// Images to return (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

impl ShowQuery {
    fn page(&self) -> Result<Page, ApiError> {
        let d = Page::default();
        Page { offset: self.offset.unwrap_or(d.offset), limit: self.limit.unwrap_or(d.limit) }.checked().map_err(ApiError::InvalidQuery)
    }
}

/// Create an empty dataset.
#[utoipa::path(post, path = "/datasets", tag = "datasets", request_body = NewDataset, security(("api_key" = [])),
    responses((status = 201, body = Dataset), (status = 400, body = ErrorBody)))]
pub async fn create(State(state): State<AppState>, Json(body): Json<NewDataset>) -> ApiResult<(StatusCode, Json<Dataset>)> {
    Ok((StatusCode::CREATED, Json(state.services.datasets.create(&body.name).await?)))
}

/// A page of the datasets, oldest first, without their image lists; `X-Total-Count` says how
/// many there are.
#[utoipa::path(get, path = "/datasets", tag = "datasets", params(Page),
    responses((status = 200, body = Vec<Dataset>, headers(("X-Total-Count" = u64, description = "datasets in all"))), (status = 503, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, Query(page): Query<Page>) -> ApiResult<impl IntoResponse> {
    let (datasets, total) = state.services.datasets.list(page.checked().map_err(ApiError::InvalidQuery)?).await?;
    let mut resp = Json(datasets).into_response();
    resp.headers_mut().insert("x-total-count", HeaderValue::from(total as u64));
    Ok(resp)
}

/// One dataset; with `images=true`, a page of its images (`offset`, `limit`).
#[utoipa::path(get, path = "/datasets/{id}", tag = "datasets", params(("id" = String, Path), ShowQuery),
    responses((status = 200, body = Dataset), (status = 404, body = ErrorBody)))]
pub async fn show(State(state): State<AppState>, Path(id): Path<String>, Query(q): Query<ShowQuery>) -> ApiResult<Json<Dataset>> {
    let page = q.page()?;
    Ok(Json(state.services.datasets.get(&id, q.images.then_some(page)).await?))
}

/// Delete a dataset and its images; refused (409) while a queued or running job uses it.
#[utoipa::path(delete, path = "/datasets/{id}", tag = "datasets", params(("id" = String, Path)), security(("api_key" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    state.services.datasets.delete(&id).await?;
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
    state.services.datasets.get(&id, None).await?;
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let multipart = ct.starts_with("multipart/form-data");
    let raw = ["application/zip", "application/x-tar", "application/octet-stream"].iter().any(|t| ct.starts_with(t));
    if !multipart && !raw {
        return Err(ApiError::UnsupportedMediaType(format!(
            "content type `{ct}`: send multipart/form-data, application/zip or application/x-tar"
        )));
    }
    let mut uploads = vec![];
    // The boundary as sent: it is case-sensitive.
    let raw_ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let received = if multipart {
        receive_multipart(&state, raw_ct, request, &mut uploads).await
    } else {
        receive_raw(&state, request, &mut uploads).await
    };
    if let Err(e) = received {
        // Removing the temporary files is file I/O: off the runtime, before answering.
        discard(uploads).await;
        return Err(e);
    }
    if uploads.is_empty() {
        return Err(ApiError::BadRequest(format!("the upload holds no files (send them in multipart fields named `{UPLOAD_FIELD}`)")));
    }
    Ok(Json(state.services.datasets.add(&id, uploads).await?))
}

async fn discard(uploads: Vec<Upload>) {
    let _ = tokio::task::spawn_blocking(move || drop(uploads)).await;
}

/// A new temporary file for `name`, pushed onto `uploads` at once (so an error on the way
/// removes it), and an async handle on it.
async fn new_upload(state: &AppState, name: String, uploads: &mut Vec<Upload>) -> ApiResult<tokio::fs::File> {
    let (upload, handle) = state.services.datasets.new_upload(name).await?;
    uploads.push(upload);
    Ok(tokio::fs::File::from_std(handle))
}

fn write_failed(e: std::io::Error) -> ApiError {
    ApiError::Internal(format!("writing an upload to disk: {e}"))
}

/// Streams every multipart field into its own temporary file, chunk by chunk, behind the guard
/// on parts and part headers.
async fn receive_multipart(state: &AppState, ct: &str, request: Request, uploads: &mut Vec<Upload>) -> ApiResult<()> {
    let limits = &state.limits;
    let boundary = multer::parse_boundary(ct).map_err(|e| ApiError::BadRequest(format!("malformed multipart content type: {e}")))?;
    let stream = request.into_body().into_data_stream();
    let mut mp = body::multipart(stream, &boundary, limits.max_parts, limits.max_part_header_bytes, limits.max_upload_bytes);
    let failed = |e| body::multipart_error(e, limits.max_upload_bytes);
    while let Some(mut field) = mp.next_field().await.map_err(failed)? {
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
        while let Some(chunk) = field.chunk().await.map_err(failed)? {
            out.write_all(&chunk).await.map_err(write_failed)?;
        }
        out.flush().await.map_err(write_failed)?;
    }
    Ok(())
}

/// Streams a raw body (one archive) into a temporary file, chunk by chunk.
async fn receive_raw(state: &AppState, request: Request, uploads: &mut Vec<Upload>) -> ApiResult<()> {
    let limit = state.limits.max_upload_bytes;
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(body::too_large(limit));
    }
    let mut out = new_upload(state, "archive".into(), uploads).await?;
    let mut stream = request.into_body().into_data_stream();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| read_error(&e, limit))?;
        total += chunk.len();
        if total > limit {
            return Err(body::too_large(limit));
        }
        out.write_all(&chunk).await.map_err(write_failed)?;
    }
    out.flush().await.map_err(write_failed)?;
    Ok(())
}

/// A body that stopped: 413 past the limit, 408 when it went silent, 400 otherwise.
fn read_error(e: &axum::Error, limit: usize) -> ApiError {
    let text = e.to_string();
    if text.contains("length limit exceeded") {
        body::too_large(limit)
    } else if std::error::Error::source(e).is_some_and(|s| s.is::<tower_http::timeout::TimeoutError>()) {
        ApiError::Status(StatusCode::REQUEST_TIMEOUT, "the request body stopped arriving".into())
    } else {
        ApiError::BadRequest(format!("reading the body: {text}"))
    }
}
