//! What a service can fail with.

use crate::server::storage;

/// What a service can fail with; only the HTTP layer turns it into a status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The request is wrong.
    #[error("{0}")]
    Invalid(String),
    /// Too much at once: retry after the given seconds.
    #[error("{message}")]
    Busy { message: String, retry_after: u64 },
    /// The shared database or object store cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The server failed; the message is for the log, not for the client.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<storage::Error> for Error {
    fn from(e: storage::Error) -> Self {
        use storage::Error as S;
        match e {
            S::NotFound(m) => Error::NotFound(m),
            S::Conflict(m) => Error::Conflict(m),
            S::Invalid(m) => Error::Invalid(m),
            S::Unavailable(m) => Error::Unavailable(m),
            S::Corrupt(m) | S::Internal(m) => Error::Internal(m),
        }
    }
}

impl Error {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }
}
