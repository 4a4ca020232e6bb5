//! What every handler shares: the services, the access rules, the HTTP layer's own limits and
//! its budget of body bytes.

use std::sync::Arc;
use std::time::Duration;

use super::access::Access;
use super::body::BodyBudget;
use crate::server::service::services::Services;

/// What the HTTP layer itself limits, beyond the services' rules.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Largest `/segment` body.
    pub max_body_bytes: usize,
    /// Largest dataset upload (many files or an archive).
    pub max_upload_bytes: usize,
    /// A `/segment` body must arrive within this.
    pub body_timeout: Duration,
    /// A `/segment` request is answered (504) within this, reading excluded.
    pub request_timeout: Duration,
    /// Bytes of request bodies held in memory at once, across all requests.
    pub max_body_bytes_in_flight: usize,
    /// Parts of one multipart body, and bytes of one part's headers.
    pub max_parts: usize,
    pub max_part_header_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 20 << 20,
            max_upload_bytes: 512 << 20,
            body_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_body_bytes_in_flight: 256 << 20,
            max_parts: 10_000,
            max_part_header_bytes: 16 << 10,
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub services: Arc<Services>,
    pub access: Arc<Access>,
    pub limits: Arc<HttpLimits>,
    pub bodies: BodyBudget,
}

impl AppState {
    pub fn new(services: Arc<Services>, access: Access, limits: HttpLimits) -> Self {
        let bodies = BodyBudget::new(limits.max_body_bytes_in_flight);
        Self { services, access: Arc::new(access), limits: Arc::new(limits), bodies }
    }
}
