//! Who may do what. With an API key (`--api-key`) every state change needs it, and with
//! `--protect-reads` every read too (health probes, the web page and the API documents stay
//! open). Without a key a state change is accepted only when all of this holds, since the key is
//! what would otherwise prove the caller:
//!
//! - the peer is loopback, and the request was not forwarded by a proxy on this machine
//!   (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`): behind a proxy every client is loopback;
//! - the `Host` is loopback or the name the server was bound to (a page on another site whose
//!   name resolves to 127.0.0.1, DNS rebinding, carries its own name);
//! - a browser's request is not cross-site (`Sec-Fetch-Site`, else `Origin` against `Host`): a
//!   page on another site may send requests to localhost, not read them, but a state change
//!   needs no reading.
//!
//! Keys are compared as SHA-256 digests in constant time, so neither their contents nor their
//! length show in the timing.

use std::net::{IpAddr, SocketAddr};

use axum::extract::connect_info::MockConnectInfo;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, Method, Request};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;

#[derive(Clone, Debug, Default)]
pub struct Access {
    key: Option<[u8; 32]>,
    /// Reads need the key too.
    protect_reads: bool,
    /// The host name the server was bound to, when it is a name or address of its own (not a
    /// wildcard), accepted as `Host` beside loopback names.
    bound_host: Option<String>,
}

/// Headers a proxy adds to what it forwards.
const FORWARDED: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];

impl Access {
    pub fn new(key: Option<&str>, protect_reads: bool, bound_host: &str) -> Self {
        let wildcard = matches!(bound_host, "0.0.0.0" | "::" | "[::]" | "");
        Self {
            key: key.filter(|k| !k.is_empty()).map(digest),
            protect_reads,
            bound_host: (!wildcard).then(|| bound_host.trim_matches(['[', ']']).to_ascii_lowercase()),
        }
    }

    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    pub fn protects_reads(&self) -> bool {
        self.protect_reads && self.key.is_some()
    }

    /// Checks a request to a route that changes state (`change`) or reads.
    pub fn check<B>(&self, req: &Request<B>, change: bool) -> Result<(), ApiError> {
        let change = change && !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        if let Some(key) = &self.key {
            if !change && !self.protect_reads {
                return Ok(());
            }
            let given = presented_key(req.headers()).map(digest).unwrap_or_default();
            return if bool::from(given.ct_eq(key)) { Ok(()) } else { Err(ApiError::Unauthorized) };
        }
        if !change {
            return Ok(());
        }
        self.local_and_same_site(req).map_err(|why| {
            ApiError::Forbidden(format!(
                "this server runs without an API key, so it accepts changes only from a client on its own machine that is not a \
                 page of another site, and this request {why}; start it with --api-key (PICIE_API_KEY) to allow other clients"
            ))
        })
    }

    /// Why a request without a key may not change state, if it may not.
    fn local_and_same_site<B>(&self, req: &Request<B>) -> Result<(), &'static str> {
        let h = req.headers();
        match peer(req) {
            Some(ip) if is_loopback(ip) => {}
            _ => return Err("comes from another machine"),
        }
        if FORWARDED.iter().any(|f| h.contains_key(*f)) {
            return Err("was forwarded by a proxy");
        }
        let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).map(host_name);
        if let Some(host) = &host {
            if !self.local_host(host) {
                return Err("names another host");
            }
        }
        match h.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
            Some("same-origin" | "none") => {}
            Some(_) => return Err("comes from a page of another site"),
            None => {
                if let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
                    let origin_host = origin.split_once("://").map(|(_, rest)| host_name(rest));
                    if origin_host.is_none() || origin_host != host {
                        return Err("comes from a page of another site");
                    }
                }
            }
        }
        Ok(())
    }

    fn local_host(&self, host: &str) -> bool {
        host == "localhost" || host.parse::<IpAddr>().is_ok_and(is_loopback) || self.bound_host.as_deref() == Some(host)
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn presented_key(h: &HeaderMap) -> Option<&str> {
    h.get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")))
}

/// `Host` or an origin's authority without its port, lower case, brackets of IPv6 removed.
fn host_name(authority: &str) -> String {
    let authority = authority.trim().trim_end_matches('/');
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => {
            authority.rsplit_once(':').map_or(authority, |(h, port)| if port.chars().all(|c| c.is_ascii_digit()) { h } else { authority })
        }
    };
    host.to_ascii_lowercase()
}

/// The peer as the connection reported it (tests supply it with MockConnectInfo).
fn peer<B>(req: &Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()).or_else(|| ext.get::<MockConnectInfo<SocketAddr>>().map(|c| c.0.ip()))
}

/// Loopback, also as an IPv4-mapped IPv6 address (a dual-stack listener's view of 127.0.0.1).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(peer: [u8; 4], headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::post("/datasets");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let mut r = r.body(()).unwrap();
        r.extensions_mut().insert(ConnectInfo(SocketAddr::from((peer, 5000))));
        r
    }

    #[test]
    fn without_a_key_only_a_local_same_site_client_changes_state() {
        let a = Access::new(None, false, "0.0.0.0");
        let ok = |h: &[(&str, &str)]| a.check(&request([127, 0, 0, 1], h), true).is_ok();
        assert!(ok(&[("host", "localhost:8080")]));
        assert!(ok(&[("host", "127.0.0.1:8080"), ("sec-fetch-site", "same-origin")]));
        assert!(ok(&[("host", "[::1]:8080"), ("origin", "http://[::1]:8080")]));
        assert!(!ok(&[("host", "evil.example:8080")]), "DNS rebinding");
        assert!(!ok(&[("host", "localhost:8080"), ("sec-fetch-site", "cross-site")]));
        assert!(!ok(&[("host", "localhost:8080"), ("origin", "http://evil.example")]));
        assert!(!ok(&[("host", "localhost:8080"), ("x-forwarded-for", "203.0.113.7")]), "a proxy on this machine");
        assert!(a.check(&request([203, 0, 113, 7], &[("host", "localhost")]), true).is_err());
        assert!(a.check(&request([203, 0, 113, 7], &[]), false).is_ok(), "reads stay open");
        let bound = Access::new(None, false, "picie.internal");
        assert!(bound.check(&request([127, 0, 0, 1], &[("host", "picie.internal:8080")]), true).is_ok());
    }

    #[test]
    fn a_key_is_needed_for_changes_and_with_protect_reads_for_reads() {
        let a = Access::new(Some("sesame"), true, "0.0.0.0");
        let r = |h: &[(&str, &str)], change| a.check(&request([203, 0, 113, 7], h), change).is_ok();
        assert!(r(&[("x-api-key", "sesame")], true));
        assert!(r(&[("authorization", "Bearer sesame")], false));
        for wrong in ["", "sesam", "sesame!", "a much longer key than the real one"] {
            assert!(!r(&[("x-api-key", wrong)], true), "{wrong}");
        }
        assert!(!r(&[], false), "reads need the key");
        let open_reads = Access::new(Some("sesame"), false, "0.0.0.0");
        assert!(open_reads.check(&request([203, 0, 113, 7], &[]), false).is_ok());
    }
}
