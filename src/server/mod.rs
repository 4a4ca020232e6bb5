//! The HTTP server. One direction of dependency, each layer a folder:
//!
//! - [`http`]: routes, extractors, errors, the OpenAPI document; it alone speaks HTTP;
//! - [`service`]: the model catalogue, datasets, jobs and inference, with the server's rules;
//! - [`storage`]: model versions, datasets and jobs kept in the data folder ([`storage::local`])
//!   or in PostgreSQL and an object store ([`storage::shared`]), peers behind one trait each;
//! - [`core`]: the types every layer shares.
//!
//! [`app`] builds a server from its flags ([`config`]); [`listener`] holds its connections.

pub mod app;
pub mod config;
pub mod core;
pub mod http;
pub mod listener;
pub mod probe;
pub mod service;
pub mod storage;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

pub use app::App;
pub use config::ServeConfig;

/// How long shutdown waits for connections to finish their requests.
const GRACE: Duration = Duration::from_secs(10);

/// Runs the server until SIGTERM or Ctrl-C; listens only once the model is warm.
pub async fn serve(cfg: ServeConfig) -> Result<()> {
    let app = App::build(&cfg).await?;
    let addr: SocketAddr =
        format!("{}:{}", cfg.host, cfg.port).parse().with_context(|| format!("bad address {}:{}", cfg.host, cfg.port))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    serve_on(listener, app, &cfg, shutdown_signal()).await
}

/// Serves a built server on a bound listener until `shutdown` completes, then lets requests in
/// flight finish.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    app: App,
    cfg: &ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let services = app.state.services.clone();
    if app.state.access.has_key() {
        tracing::info!(reads = app.state.access.protects_reads(), "routes that change state require the API key");
    } else {
        tracing::warn!(
            "no --api-key (PICIE_API_KEY) set: routes that change state accept only clients on this machine, not pages of other sites \
             and not requests forwarded by a proxy; segmentation and reads are open to all"
        );
    }
    let limits = listener::ConnectionLimits {
        header_timeout: Duration::from_secs(cfg.header_timeout_secs.max(1)),
        max_connections: cfg.max_connections,
        grace: GRACE,
    };
    tracing::info!(address = %listener.local_addr()?, "picie listening");
    let router = app.router();
    listener::serve(listener, router, limits, async move {
        shutdown.await;
        services.shutting_down();
        tracing::info!("shutting down: finishing in-flight requests");
    })
    .await?;
    drop(app);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
