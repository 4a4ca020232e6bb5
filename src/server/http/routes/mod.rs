//! HTTP handlers, one module per resource.

pub mod datasets;
pub mod jobs;
pub mod models;
pub mod ops;
pub mod segment;
pub mod web;
