//! `picie serve` as a child process on a free loopback port, the shipped models; SIGKILLed when
//! dropped. For tests that kill the real binary (crash recovery, scale-out).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

pub struct ServeProcess {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
    pub log: PathBuf,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl ServeProcess {
    /// Starts `picie serve` on `data` with `extra` flags, its log appended to `log`; not yet
    /// listening: wait with [`ServeProcess::ready`].
    pub fn spawn(data: &Path, extra: &[&str], log: PathBuf) -> ServeProcess {
        let port = free_port();
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_picie"))
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--models-dir"])
            .arg(super::root().join("models"))
            .arg("--data-dir")
            .arg(data)
            .args(extra)
            .env("RUST_LOG", "info,ort=warn,sqlx=warn")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap();
        ServeProcess { child, base: format!("http://127.0.0.1:{port}"), client: super::fresh_connections(), log }
    }

    /// Waits until `/health/ready` answers 200 (the model is loaded and warm).
    pub async fn ready(&self, timeout: Duration) {
        let up = super::poll(timeout, async || {
            self.client.get(self.url("/health/ready")).send().await.ok().filter(|r| r.status() == 200).map(|_| ())
        })
        .await;
        assert!(up.is_some(), "the server did not start:\n{}", self.log_text());
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.client.post(self.url(path)).json(&body).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
}
