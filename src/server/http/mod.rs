//! The HTTP layer: routes, extractors, errors and the OpenAPI document, over the services of
//! [`super::service`]; it alone turns their errors into statuses. Open routes (health, the web
//! page, the API documents) apart from reads and guarded routes (everything that changes state,
//! [`access`]); request metrics; one JSON error format for every answer that is not a success.

pub mod access;
pub mod body;
pub mod error;
pub mod extract;
pub mod openapi;
pub mod render;
pub mod router;
pub mod routes;
pub mod state;
