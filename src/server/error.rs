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
    #[error("the server is at its concurrency limit, retry shortly")]
    Busy,
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
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidImage(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge(_) | ApiError::ImageTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Busy => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidImage(_) => "invalid_image",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::ImageTooLarge(_) => "image_too_large",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Busy => "too_many_requests",
            ApiError::Timeout(_) => "timeout",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
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
        if matches!(self, ApiError::Busy) {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
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

impl From<crate::server::datasets::DatasetError> for ApiError {
    fn from(e: crate::server::datasets::DatasetError) -> Self {
        use crate::server::datasets::DatasetError as D;
        match e {
            D::NotFound(_) => ApiError::NotFound(e.to_string()),
            D::Invalid(m) => ApiError::BadRequest(m),
            D::Io { .. } | D::CorruptIndex { .. } | D::Internal(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(format!("{e:#}"))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
