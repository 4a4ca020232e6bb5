//! The OpenAPI document: every documented route and the API-key security scheme.

use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::Ref;
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
        routes::jobs::resume, routes::jobs::archive, routes::jobs::gallery, routes::jobs::gallery_crop,
    ),
    modifiers(&SecurityAddon, &ErrorResponses),
    components(schemas(routes::segment::OutputFormat, crate::infer::Quality, super::body::BinaryBody)),
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

/// The error answers every route shares, added to each operation in one place so the document
/// lists every status a route can answer: 400 for a malformed query, path or body, 401/403 on
/// guarded routes, 413/415 where a body is taken, 500 everywhere. Handlers document the statuses
/// that are theirs (404, 409, 422, 429, ...).
struct ErrorResponses;

fn error_response(description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
        .build()
        .into()
}

impl Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let ops = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for op in ops.into_iter().flatten() {
                let guarded = op.security.as_ref().is_some_and(|s| !s.is_empty());
                let has_body = op.request_body.is_some();
                let has_params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
                let responses = &mut op.responses.responses;
                let mut add = |status: &str, description: &str| {
                    responses.entry(status.to_string()).or_insert_with(|| error_response(description));
                };
                if has_params || has_body {
                    add("400", "Malformed query, path or body");
                }
                if guarded {
                    add("401", "An API key is configured and the request lacks it");
                    add("403", "No API key is configured and the client is not a direct loopback client on a loopback or configured Host, or the request is cross-site");
                }
                if has_body {
                    add("413", "Body too large");
                    add("415", "Unsupported content type");
                }
                add("500", "Internal error");
            }
        }
    }
}
