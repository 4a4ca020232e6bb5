//! Every error the API returns: a stable code, an HTTP status and a human message, as JSON
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("{0}")]
    InvalidPath(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Forbidden(String),
    /// Any other status, with the code derived from it (the catch-all for answers that did not
    /// come from a handler, e.g. a layer's plain-text rejection).
    #[error("{1}")]
    Status(StatusCode, String),
    #[error("{0}")]
    InvalidImage(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    ImageTooLarge(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("a valid API key is required")]
    Unauthorized,
    /// Too much work queued; retry after this many seconds.
    #[error("the server is busy (its queue would make this request wait too long); retry in {0} s")]
    Busy(u64),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_image`.
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    /// A failed read of a request body (raw or multipart): 413 naming `limit` when the body
    /// limit stopped it, 400 with the extractor's text otherwise.
    pub fn body_read(status: StatusCode, text: String, limit: usize) -> Self {
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("the body exceeds the limit of {limit} bytes"))
        } else {
            ApiError::BadRequest(text)
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidJson(_) | ApiError::InvalidQuery(_) | ApiError::InvalidPath(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Status(s, _) => *s,
            ApiError::InvalidImage(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge(_) | ApiError::ImageTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::InvalidPath(_) => "invalid_path",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Status(s, _) => code_for_status(*s),
            ApiError::InvalidImage(_) => "invalid_image",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::ImageTooLarge(_) => "image_too_large",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Busy(_) => "too_many_requests",
            ApiError::Timeout(_) => "timeout",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

/// axum's default body limit, which JSON bodies keep.
pub const JSON_BODY_LIMIT: usize = 2 << 20;

/// The stable code of an answer that only has a status.
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 | 504 => "timeout",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "unprocessable",
        429 => "too_many_requests",
        503 => "unavailable",
        s if s >= 500 => "internal",
        _ => "bad_request",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(m) = &self {
            tracing::error!(error = %m, "internal error");
        }
        let status = self.status();
        let body = ErrorBody { error: ErrorDetail { code: self.code(), message: self.to_string() } };
        let mut resp = (status, axum::Json(body)).into_response();
        if let ApiError::Busy(secs) = self {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

impl From<crate::infer::DecodeError> for ApiError {
    fn from(e: crate::infer::DecodeError) -> Self {
        use crate::infer::DecodeError as D;
        match e {
            D::TooLarge { .. } => ApiError::ImageTooLarge(e.to_string()),
            D::Empty => ApiError::BadRequest(e.to_string()),
            D::UnknownFormat | D::Corrupt(_) => ApiError::InvalidImage(e.to_string()),
        }
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection as J;
        match r {
            J::MissingJsonContentType(_) => ApiError::UnsupportedMediaType("send the body as application/json".into()),
            J::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge(format!("the JSON body exceeds the limit of {JSON_BODY_LIMIT} bytes"))
            }
            J::BytesRejection(b) => ApiError::BadRequest(b.body_text()),
            other => ApiError::InvalidJson(other.body_text()),
        }
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::InvalidQuery(r.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        ApiError::InvalidPath(r.body_text())
    }
}

impl From<super::worker::InferenceError> for ApiError {
    fn from(e: super::worker::InferenceError) -> Self {
        use super::worker::InferenceError as I;
        match e {
            I::Stopped => ApiError::Unavailable(e.to_string()),
            I::Panicked(_) | I::Failed(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<super::store::StoreError> for ApiError {
    fn from(e: super::store::StoreError) -> Self {
        use super::store::StoreError as S;
        match e {
            S::NotFound(_) => ApiError::NotFound(e.to_string()),
            S::Active(_) | S::Builtin(_) | S::Unloadable { .. } => ApiError::Conflict(e.to_string()),
            S::Storage(_) => ApiError::Internal(format!("{e:#}")),
            S::Shared(s) => s.into(),
        }
    }
}

impl From<super::jobs::JobError> for ApiError {
    fn from(e: super::jobs::JobError) -> Self {
        use super::jobs::JobError as J;
        match e {
            J::NotFound(_) => ApiError::NotFound(e.to_string()),
            J::Ended { .. } | J::NotResumable { .. } => ApiError::Conflict(e.to_string()),
            J::Storage(_) => ApiError::Internal(format!("{e:#}")),
            J::Shared(s) => s.into(),
        }
    }
}

impl From<crate::server::datasets::DatasetError> for ApiError {
    fn from(e: crate::server::datasets::DatasetError) -> Self {
        use crate::server::datasets::DatasetError as D;
        match e {
            D::NotFound(_) => ApiError::NotFound(e.to_string()),
            D::Invalid(m) => ApiError::BadRequest(m),
            D::Io { .. } | D::CorruptIndex { .. } | D::Internal(_) => ApiError::Internal(e.to_string()),
            D::Shared(s) => s.into(),
        }
    }
}

/// The shared database or object store is unreachable or refused: 503, the client may retry.
/// A blob that fails its checksum is the server's fault: 500.
impl From<super::shared::SharedError> for ApiError {
    fn from(e: super::shared::SharedError) -> Self {
        use super::shared::SharedError as S;
        match e {
            S::Corrupt(_) => ApiError::Internal(e.to_string()),
            S::Database(_) | S::Blobs(_) | S::Migrate(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(format!("{e:#}"))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
