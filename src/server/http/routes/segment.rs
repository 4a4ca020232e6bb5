//! `POST /segment`: image in, label mask out.

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::infer::Quality;
use crate::server::http::body::{self, BinaryBody, Held};
use crate::server::http::error::{ApiError, ApiResult, ErrorBody};
use crate::server::http::extract::Query;
use crate::server::http::render;
use crate::server::http::state::AppState;
use crate::server::service::admission::Refused;

#[derive(Deserialize, Serialize, ToSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Single-channel 8-bit PNG, pixel = class index.
    #[default]
    Mask,
    /// Indexed PNG with the model's class colours.
    Palette,
    /// The photo with class colours blended over it (RGB PNG).
    Overlay,
    /// Sizes, per-class pixel fractions and the mask as base64 PNG.
    Json,
}

#[derive(Deserialize, IntoParams)]
pub struct SegmentQuery {
    /// Response format (default `mask`).
    pub format: Option<OutputFormat>,
    /// Quality (default: the server's `--quality`, `crf` unless set; `GET /info` tells).
    pub quality: Option<Quality>,
}

#[derive(Serialize, ToSchema)]
pub struct ClassShare {
    pub index: usize,
    pub name: String,
    /// RGB colour.
    pub color: [u8; 3],
    /// Fraction of the image's pixels in this class.
    pub fraction: f64,
}

#[derive(Serialize, ToSchema)]
pub struct SegmentJson {
    pub width: u32,
    pub height: u32,
    pub model: String,
    pub num_classes: usize,
    pub classes: Vec<ClassShare>,
    /// The single-channel label mask PNG, base64.
    pub mask_png_base64: String,
}

/// The multipart form of `/segment`: one field, `image`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct SegmentForm {
    /// The image file.
    pub image: BinaryBody,
}

/// The most parts a `/segment` multipart body may have (it needs one).
const MAX_SEGMENT_PARTS: usize = 4;

/// Reads the image bytes, before any inference slot is taken: the raw body (`image/*` or
/// `application/octet-stream`) or the multipart field `image`, under the body limit, the body
/// deadline and the server's budget of body bytes in flight.
async fn image_bytes(headers: &HeaderMap, request: Request, state: &AppState) -> ApiResult<(Bytes, Held)> {
    let limits = &state.limits;
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let multipart = ct.starts_with("multipart/form-data");
    if !(multipart || ct.is_empty() || ct.starts_with("image/") || ct.starts_with("application/octet-stream")) {
        return Err(ApiError::UnsupportedMediaType(format!(
            "content type `{ct}` is not an image; send image/* , application/octet-stream or multipart/form-data"
        )));
    }
    let boundary = if multipart {
        // As sent: the boundary is case-sensitive.
        let raw = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        Some(multer::parse_boundary(raw).map_err(|e| ApiError::BadRequest(format!("malformed multipart content type: {e}")))?)
    } else {
        None
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let (bytes, held) = body::read_whole(request.into_body(), declared, limits.max_body_bytes, &state.bodies, limits.body_timeout).await?;
    let bytes = match boundary {
        None => bytes,
        Some(boundary) => {
            let stream = futures_util::stream::iter([Ok::<Bytes, std::io::Error>(bytes)]);
            let mut mp = body::multipart(stream, &boundary, MAX_SEGMENT_PARTS, limits.max_part_header_bytes, limits.max_body_bytes);
            let mut found = None;
            while let Some(field) = mp.next_field().await.map_err(|e| body::multipart_error(e, limits.max_body_bytes))? {
                if field.name() != Some("image") {
                    let got = field.name().unwrap_or("").chars().take(64).collect::<String>();
                    return Err(ApiError::BadRequest(format!("unexpected multipart field `{got}`: send the image in the field `image`")));
                }
                if found.is_some() {
                    return Err(ApiError::BadRequest("send one image per request (the field `image` came twice)".into()));
                }
                found = Some(field.bytes().await.map_err(|e| body::multipart_error(e, limits.max_body_bytes))?);
            }
            found.ok_or_else(|| ApiError::BadRequest("multipart body has no `image` field".into()))?
        }
    };
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("the request carries no image".into()));
    }
    Ok((bytes, held))
}

/// Segment an image: every pixel gets the class it is most similar to (by cosine similarity to
/// the class's centroid, or to the nearest of the over-clusters merged into it).
#[utoipa::path(
    post,
    path = "/segment",
    tag = "segment",
    params(SegmentQuery),
    request_body(description = "An image (JPEG, PNG, WebP, BMP, TIFF, GIF) as the raw body, or as the multipart field `image`.",
        content((BinaryBody = "image/*"), (BinaryBody = "application/octet-stream"), (SegmentForm = "multipart/form-data"))),
    responses(
        (status = 200, description = "Label mask PNG (formats mask, palette, overlay) or JSON (format json)",
         content((BinaryBody = "image/png"), (SegmentJson = "application/json")),
         headers(("X-Model-Version" = String, description = "model name and checksum"), ("X-Num-Classes" = u32, description = "K"),
                 ("X-Quality" = String, description = "the quality the mask was made at"))),
        (status = 400, description = "Empty body or malformed multipart", body = ErrorBody),
        (status = 413, description = "Body or image too large", body = ErrorBody),
        (status = 415, description = "Not an image content type", body = ErrorBody),
        (status = 422, description = "The bytes are not a decodable image", body = ErrorBody),
        (status = 429, description = "Busy: too many requests in flight, or the queue's expected wait is over --max-queue-ms; retry after the Retry-After header's seconds", body = ErrorBody,
         headers(("Retry-After" = u64, description = "seconds"))),
        (status = 500, description = "Inference failed for this request's batch", body = ErrorBody),
        (status = 503, description = "The inference thread has stopped", body = ErrorBody),
        (status = 504, description = "Timed out", body = ErrorBody),
    )
)]
pub async fn segment(
    State(state): State<AppState>,
    Query(query): Query<SegmentQuery>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult<Response> {
    let services = state.services.clone();
    // The body first: a client that is slow to send it holds no place in the queue.
    let (bytes, held) = image_bytes(&headers, request, &state).await?;
    // Admission by the image's size, read from its header: a slot, its pixels, and a bound on
    // the queue's wait, so latency and memory stay bounded and clients know when to come back.
    let (width, height) = crate::infer::preprocess::image_size(&bytes)?;
    let pixels = width as u64 * height as u64;
    if pixels > services.limits.max_image_pixels {
        return Err(crate::infer::DecodeError::TooLarge { width, height, limit: services.limits.max_image_pixels }.into());
    }
    let admitted = match services.admission.admit(&services.inference, pixels) {
        Ok(a) => a,
        Err(Refused::TooLarge { pixels, budget }) => {
            return Err(ApiError::ImageTooLarge(format!(
                "the image has {pixels} pixels, more than this server works on at once ({budget}, --max-inflight-pixels)"
            )))
        }
        Err(Refused::Busy(wait)) => {
            services.metrics.observe_rejection();
            return Err(ApiError::Busy(wait.as_secs_f64().ceil() as u64));
        }
    };
    let max_pixels = services.limits.max_image_pixels;
    let image = tokio::task::spawn_blocking(move || crate::infer::decode_image(&bytes, max_pixels))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    drop(held);
    let (_, model) = services.catalog.active();
    let quality = query.quality.unwrap_or(services.quality);
    // Dropped when the timeout fires (or the client goes): the inference thread then skips the
    // request instead of computing it for nobody.
    let timeout = state.limits.request_timeout;
    let (mask, elapsed) = tokio::time::timeout(timeout, services.inference.segment(admitted.ticket, model.clone(), image.clone(), quality))
        .await
        .map_err(|_| ApiError::Timeout(format!("segmentation took longer than {}s", timeout.as_secs())))??;
    services.metrics.observe_inference(elapsed);

    let format = query.format.unwrap_or_default();
    let version = model.package.version();
    let k = model.k();
    let body = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<u8>, &'static str)> {
        let classes = &model.package.centroids;
        Ok(match format {
            OutputFormat::Mask => (render::mask_png(&mask)?, "image/png"),
            OutputFormat::Palette => (render::palette_png(&mask, classes)?, "image/png"),
            OutputFormat::Overlay => (render::overlay_png(&image, &mask, classes)?, "image/png"),
            OutputFormat::Json => {
                let fractions = mask.class_fractions(k);
                let json = SegmentJson {
                    width: mask.width,
                    height: mask.height,
                    model: model.package.version(),
                    num_classes: k,
                    classes: fractions
                        .iter()
                        .enumerate()
                        .map(|(i, &f)| ClassShare { index: i, name: classes.name(i), color: classes.color(i), fraction: f })
                        .collect(),
                    mask_png_base64: base64::engine::general_purpose::STANDARD.encode(render::mask_png(&mask)?),
                };
                (serde_json::to_vec(&json)?, "application/json")
            }
        })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;

    let mut resp = (body.0).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(body.1));
    h.insert("x-model-version", HeaderValue::from_str(&version).unwrap_or(HeaderValue::from_static("unknown")));
    h.insert("x-num-classes", HeaderValue::from(k));
    h.insert("x-inference-ms", HeaderValue::from(elapsed.as_millis() as u64));
    h.insert("x-quality", HeaderValue::from_static(quality.as_str()));
    Ok(resp)
}
