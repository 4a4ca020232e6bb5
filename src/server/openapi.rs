//! The OpenAPI document: every documented route and the API-key security scheme.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "picie", description = "Unsupervised semantic segmentation (PiCIE): segment images into classes discovered without labels, upload image sets and re-cluster them in the background."),
    paths(
        routes::segment::segment,
        routes::ops::live, routes::ops::ready, routes::ops::info, routes::ops::metrics,
        routes::models::list, routes::models::show, routes::models::activate, routes::models::delete, routes::models::update_classes,
        routes::datasets::create, routes::datasets::list, routes::datasets::show, routes::datasets::delete, routes::datasets::upload,
        routes::jobs::submit, routes::jobs::list, routes::jobs::show, routes::jobs::cancel, routes::jobs::events,
        routes::jobs::resume,
    ),
    modifiers(&SecurityAddon),
    tags((name = "segment"), (name = "models"), (name = "datasets"), (name = "jobs"), (name = "operations"))
)]
pub struct ApiDoc;

struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "x-api-key",
                "Required on routes that change state when the server runs with --api-key (also accepted as `Authorization: Bearer`).",
            ))),
        );
    }
}

/// The OpenAPI document as served at `/openapi.json`.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().expect("OpenAPI serialises")
}

