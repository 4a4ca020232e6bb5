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
    /// Busy for another reason, said in words; retry after this many seconds.
    #[error("{0}")]
    BusyWith(String, u64),
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
            ApiError::Busy(_) | ApiError::BusyWith(..) => StatusCode::TOO_MANY_REQUESTS,
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
            ApiError::Busy(_) | ApiError::BusyWith(..) => "too_many_requests",
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
        // What failed inside the server (paths, the database's words) goes to the log; the client
        // is told that it failed and where to look.
        let message = match &self {
            ApiError::Internal(m) => {
                let reference = format!("{:08x}", rand::random::<u32>());
                tracing::error!(error = %m, reference = %reference, "internal error");
                format!("the server failed on this request; its log has the details under reference {reference}")
            }
            ApiError::Unavailable(m) => {
                tracing::warn!(error = %m, "a shared store is unavailable");
                if m.contains("database") || m.contains("object store") {
                    "the shared database or object store is unavailable; retry later".to_string()
                } else {
                    m.clone()
                }
            }
            other => other.to_string(),
        };
        let status = self.status();
        let body = ErrorBody { error: ErrorDetail { code: self.code(), message } };
        let mut resp = (status, axum::Json(body)).into_response();
        if let ApiError::Busy(secs) | ApiError::BusyWith(_, secs) = self {
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

impl From<crate::server::service::inference::InferenceError> for ApiError {
    fn from(e: crate::server::service::inference::InferenceError) -> Self {
        use crate::server::service::inference::InferenceError as I;
        match e {
            I::Stopped => ApiError::Unavailable(e.to_string()),
            I::Panicked(_) | I::Failed(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<crate::server::service::error::Error> for ApiError {
    fn from(e: crate::server::service::error::Error) -> Self {
        use crate::server::service::error::Error as S;
        match e {
            S::NotFound(m) => ApiError::NotFound(m),
            S::Conflict(m) => ApiError::Conflict(m),
            S::Invalid(m) => ApiError::BadRequest(m),
            S::Busy { message, retry_after } => ApiError::BusyWith(message, retry_after),
            S::Unavailable(m) => ApiError::Unavailable(m),
            S::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(format!("{e:#}"))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
