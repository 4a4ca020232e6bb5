//! Background jobs: submit, list, show, cancel, resume, follow (SSE), and a segmentation's
//! results (the masks' archive, the gallery and its crops).

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio_stream::{Stream, StreamExt};

use crate::masks::gallery::Gallery;
use crate::server::core::jobs::{Job, JobSpec};
use crate::server::core::Page;
use crate::server::http::body::BinaryBody;
use crate::server::http::error::{ApiError, ApiResult, ErrorBody};
use crate::server::http::extract::{Json, Path, Query};
use crate::server::http::state::AppState;

/// Submit a job: `{"type": "recluster", "dataset": "ds-...", "k": 11}`,
/// `{"type": "finetune", "dataset": "ds-...", "epochs": 1}` or
/// `{"type": "segment", "dataset": "ds-...", "quality": "edges"}`. 409 when the model name asked
/// for exists or another queued or running job will write it; 404 for an unknown dataset or
/// model.
#[utoipa::path(post, path = "/jobs", tag = "jobs", request_body = JobSpec, security(("api_key" = [])),
    responses((status = 202, body = Job), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn submit(State(state): State<AppState>, Json(spec): Json<JobSpec>) -> ApiResult<(StatusCode, Json<Job>)> {
    Ok((StatusCode::ACCEPTED, Json(state.services.jobs.submit(spec).await?)))
}

/// A page of the jobs, newest first.
#[utoipa::path(get, path = "/jobs", tag = "jobs", params(Page), responses((status = 200, body = Vec<Job>), (status = 503, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, Query(page): Query<Page>) -> ApiResult<Json<Vec<Job>>> {
    Ok(Json(state.services.jobs.list(page.checked().map_err(ApiError::InvalidQuery)?).await?))
}

/// One job: state, stage, progress, result.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
pub async fn show(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    Ok(Json(state.services.jobs.get(&id).await?))
}

/// Cancel a queued or running job (a running one stops at its next step).
#[utoipa::path(post, path = "/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)), security(("api_key" = [])),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    Ok(Json(state.services.jobs.cancel(&id).await?))
}

/// Run an interrupted or failed job again: it goes back to `queued` (same id, spec and source
/// model; `resumed` counts the resumptions) and runs when the jobs before it are done.
///
/// A job that was running when the server stopped (killed, crashed, restarted) comes back
/// `interrupted`; the server never reruns it by itself, since a job that brings the process down
/// would then do so on every start. A fine-tuning job continues from the checkpoint of its last
/// completed epoch (kept until the job succeeds) and ends with the same weights as a run that
/// was never interrupted; a re-clustering job starts over. A job whose model was already written
/// before the interruption succeeds at once with that model.
///
/// 409 for a job that is queued, running, succeeded or canceled; 404 for an unknown id.
#[utoipa::path(post, path = "/jobs/{id}/resume", tag = "jobs", params(("id" = String, Path)), security(("api_key" = [])),
    responses((status = 202, body = Job), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn resume(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<Job>)> {
    Ok((StatusCode::ACCEPTED, Json(state.services.jobs.resume(&id).await?)))
}

/// Server-sent events: the job's snapshot now and after every change, until it ends. The stream
/// ends when the job does; 429 when the job or the server has as many watchers as it keeps.
#[utoipa::path(get, path = "/jobs/{id}/events", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream", body = String), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let stream = state
        .services
        .jobs
        .watch(&id)
        .await?
        .map(|j| Ok(Event::default().event(if j.state.is_terminal() { "end" } else { "progress" }).json_data(&j).unwrap_or_default()));
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The masks of a succeeded segmentation job as one zip archive, written while it is sent:
/// `classes.json` (each class's index, name and colour, as named now), `fractions.csv` (one row
/// per image: its mask, the name it was uploaded under and each class's share of its pixels) and
/// `masks/<image name>.png` (8-bit, pixel = class index). 404 for a job that is not a
/// segmentation, 409 until it has succeeded, 429 while as many archives are being sent as the
/// server writes at once.
#[utoipa::path(get, path = "/jobs/{id}/masks.zip", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, description = "The archive", content((BinaryBody = "application/zip"))),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn archive(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let chunks = state.services.jobs.archive(&id).await?;
    let disposition = format!("attachment; filename=\"{id}-masks.zip\"");
    Ok(([(header::CONTENT_TYPE, "application/zip".to_string()), (header::CONTENT_DISPOSITION, disposition)], Body::from_stream(chunks))
        .into_response())
}

/// What each class of a segmented set is: per class, its share of the set's pixels, the images it
/// appears in, and crops of the images it covers most (the class outlined, the rest dimmed),
/// each at `GET /jobs/{id}/gallery/{file}`. Names and colours are the model's now.
#[utoipa::path(get, path = "/jobs/{id}/gallery", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = Gallery), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn gallery(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Gallery>> {
    Ok(Json(state.services.jobs.gallery(&id).await?))
}

/// One crop of a segmented set's gallery (JPEG, 160 x 160).
#[utoipa::path(get, path = "/jobs/{id}/gallery/{file}", tag = "jobs", params(("id" = String, Path), ("file" = String, Path, pattern = "^class-[0-9]{1,4}-[0-9]{1,4}\\.jpg$")),
    responses((status = 200, description = "The crop", content((BinaryBody = "image/jpeg"))), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn gallery_crop(State(state): State<AppState>, Path((id, file)): Path<(String, String)>) -> ApiResult<Response> {
    let jpeg = state.services.jobs.gallery_crop(&id, &file).await?;
    Ok(([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "private, max-age=3600")], jpeg).into_response())
}
