//! Background jobs: submit, list, show, cancel, resume, follow (SSE).

use std::convert::Infallible;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};

use tokio_stream::{Stream, StreamExt};

use crate::package::MAX_CLASSES;
use crate::server::error::{ApiError, ApiResult, ErrorBody};
use crate::server::extract::{Json, Path};
use crate::server::jobs::{finetune_config, Job, JobSpec};

/// The most epochs a fine-tuning job may ask for.
const MAX_EPOCHS: usize = 100;
/// The longest side of a fine-tuning job's training frames.
const MAX_SIDE: usize = 2048;
/// The most images per fine-tuning step.
const MAX_BATCH: usize = 64;
/// The most clusters of the over-clustering head.
const MAX_K2: usize = 1000;
use crate::server::state::AppState;
use crate::server::store::valid_name;

/// Submit a job: `{"type": "recluster", "dataset": "ds-...", "k": 11}` or
/// `{"type": "finetune", "dataset": "ds-...", "epochs": 1}`.
#[utoipa::path(post, path = "/jobs", tag = "jobs", request_body = JobSpec, security(("api_key" = [])),
    responses((status = 202, body = Job), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn submit(State(state): State<AppState>, Json(spec): Json<JobSpec>) -> ApiResult<(StatusCode, Json<Job>)> {
    let ds = state.datasets.get(spec.dataset()).await?;
    match &spec {
        JobSpec::Recluster { k, .. } => {
            if *k < 2 || *k > MAX_CLASSES {
                return Err(ApiError::BadRequest(format!("k must be between 2 and {MAX_CLASSES} (got {k})")));
            }
            if ds.num_images == 0 {
                return Err(ApiError::BadRequest(format!("dataset `{}` has no images", ds.id)));
            }
        }
        JobSpec::Finetune { package_k, epochs, lr, self_train_epochs, .. } => {
            let config = finetune_config(&spec).expect("a finetune spec");
            // Bounds that keep one job's memory and time within reason (the schema states them).
            let (width, height) = config.frame();
            if width > MAX_SIDE || height > MAX_SIDE {
                return Err(ApiError::BadRequest(format!("size and width are at most {MAX_SIDE}")));
            }
            if config.batch > MAX_BATCH || config.k > MAX_CLASSES || config.k2 > MAX_K2 {
                return Err(ApiError::BadRequest(format!("batch is at most {MAX_BATCH}, k at most {MAX_CLASSES} and k2 at most {MAX_K2}")));
            }
            config.validate(ds.num_images).map_err(|e| ApiError::BadRequest(format!("{e:#}")))?;
            if package_k.is_some_and(|k| !(2..=MAX_CLASSES).contains(&k)) {
                return Err(ApiError::BadRequest(format!("package_k must be between 2 and {MAX_CLASSES}")));
            }
            if epochs.is_some_and(|e| e == 0 || e > MAX_EPOCHS) || self_train_epochs.is_some_and(|e| e > MAX_EPOCHS) {
                return Err(ApiError::BadRequest(format!(
                    "epochs must be between 1 and {MAX_EPOCHS}, self_train_epochs at most {MAX_EPOCHS}"
                )));
            }
            if lr.is_some_and(|lr| !(lr > 0.0 && lr < 1.0)) {
                return Err(ApiError::BadRequest("lr must be in (0, 1)".into()));
            }
        }
    }
    if let Some(n) = spec.model_name() {
        if !valid_name(n) {
            return Err(ApiError::BadRequest(format!("`{n}` is not a valid model name (letters, digits, . _ -)")));
        }
        if state.models.resolve(n).is_some() {
            return Err(ApiError::Conflict(format!("model `{n}` already exists")));
        }
    }
    let (source, _) = state.models.active();
    Ok((StatusCode::ACCEPTED, Json(state.jobs.submit(spec, source).await?)))
}

/// All jobs, newest first.
#[utoipa::path(get, path = "/jobs", tag = "jobs", responses((status = 200, body = Vec<Job>), (status = 503, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>) -> ApiResult<Json<Vec<Job>>> {
    Ok(Json(state.jobs.list().await?))
}

/// One job: state, stage, progress, result.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
pub async fn show(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    Ok(Json(state.jobs.get(&id).await?))
}

/// Cancel a queued or running job (a running one stops at its next step).
#[utoipa::path(post, path = "/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)), security(("api_key" = [])),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    Ok(Json(state.jobs.cancel(&id).await?))
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
    Ok((StatusCode::ACCEPTED, Json(state.jobs.resume(&id).await?)))
}

/// Server-sent events: the job's snapshot now and after every change, until it ends.
#[utoipa::path(get, path = "/jobs/{id}/events", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream", body = String), (status = 404, body = ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let rx = state.jobs.watch(&id).await?;
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|j| Ok(Event::default().event(if j.state.is_terminal() { "end" } else { "progress" }).json_data(&j).unwrap_or_default()));
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
