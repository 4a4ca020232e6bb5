//! The services the HTTP layer calls: the model catalogue, datasets, jobs and inference. They
//! hold the server's rules (what may be deleted, when a job may start, what a request may cost)
//! over the stores of [`super::storage`], whichever peers were chosen, and know nothing of HTTP.

pub mod admission;
pub mod catalog;
pub mod datasets;
pub mod error;
pub mod inference;
pub mod jobs;
pub mod metrics;
pub mod services;

pub use error::{Error, Result};
pub use services::Services;
