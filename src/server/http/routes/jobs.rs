//! Background jobs: submit, list, show, cancel, resume, follow (SSE).

use std::convert::Infallible;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use tokio_stream::{Stream, StreamExt};

use crate::server::core::jobs::{Job, JobSpec};
use crate::server::core::Page;
use crate::server::http::error::{ApiError, ApiResult, ErrorBody};
use crate::server::http::extract::{Json, Path, Query};
use crate::server::http::state::AppState;

/// Submit a job: `{"type": "recluster", "dataset": "ds-...", "k": 11}` or
/// `{"type": "finetune", "dataset": "ds-...", "epochs": 1}`. 409 when the model name asked for
/// exists or another queued or running job will write it.
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
