//! A real server on loopback for HTTP tests: the shipped models, a fresh data dir.

use std::time::Duration;

use picie::server::app::{App, Parts};
use picie::server::{serve_on, ServeConfig};
use reqwest::StatusCode;
use serde_json::Value;

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
    /// The data dir, when the server owns it.
    _data: Option<tempfile::TempDir>,
}

/// The config of a server on the shipped models and the data dir `data`.
pub fn config(data: &std::path::Path) -> ServeConfig {
    ServeConfig::new(super::root().join("models"), data)
}

impl TestServer {
    /// Serves `cfg` (its data dir stays the caller's), with `parts` in place of the real ones.
    pub async fn serve(cfg: ServeConfig, parts: Parts) -> TestServer {
        let app = App::build_with(&cfg, parts).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            serve_on(listener, app, &cfg, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestServer { base, client: super::fresh_connections(), stop: Some(tx), handle: Some(handle), _data: None }
    }

    /// A server on the shipped models and a fresh data dir of its own, with `tweak` applied to
    /// the config and `parts` in place of the real ones.
    pub async fn start_with(tweak: impl FnOnce(&mut ServeConfig), parts: Parts) -> TestServer {
        let data = tempfile::tempdir().unwrap();
        let mut cfg = config(data.path());
        tweak(&mut cfg);
        let mut s = Self::serve(cfg, parts).await;
        s._data = Some(data);
        s
    }

    pub async fn start(tweak: impl FnOnce(&mut ServeConfig)) -> TestServer {
        Self::start_with(tweak, Parts::default()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.handle.take().unwrap()).await.unwrap().unwrap();
    }
}

/// The status and `error.code` of a JSON error answer; fails unless the body is
/// `{"error": {"code": ..., "message": non-empty}}` served as application/json.
pub async fn error_code(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(ct.starts_with("application/json"), "{status}: content type {ct:?}");
    let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{status}: error body is not JSON: {e}"));
    let code = body["error"]["code"].as_str().unwrap_or_else(|| panic!("no error.code in {body}")).to_string();
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    (status, code)
}

/// A PNG of `w` x `h` noise.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 13) as u8, ((x ^ y) * 3) as u8]));
    let mut out = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}
