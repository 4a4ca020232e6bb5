//! The scaled-out peers: metadata (model versions, the active model, datasets' indexes, jobs with
//! their leases) in PostgreSQL; blobs (packages, dataset images, checkpoints) in object storage
//! ([`blobs`]). Each process keeps its data folder as a cache of the blobs it needs, checked
//! against their SHA-256 before use.
//!
//! Changes are announced with PostgreSQL's LISTEN/NOTIFY (triggers in `migrations/`): one
//! listening connection per process turns them into local broadcasts, which replicas follow
//! (activation, new revisions), workers wait on (queued jobs) and job watchers read (progress),
//! instead of each of them polling.

pub mod blobs;
pub mod datasets;
pub mod jobs;
pub mod models;

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::broadcast;

pub use blobs::Blobs;

use super::{Error, Result};

/// How a process takes part in a scaled-out deployment.
#[derive(Clone, Debug)]
pub struct SharedSettings {
    /// This process's name in leases (`--instance-id`, default the host name and process id).
    pub instance: String,
    /// How long a job stays claimed without a heartbeat.
    pub lease: Duration,
    /// How often replicas look again without a notification (a missed one, a reconnection) and
    /// workers look for jobs whose lease ran out.
    pub sync_interval: Duration,
    /// Lease expiries after which a job is no longer claimed again but marked interrupted (a job
    /// that kills its worker would otherwise kill every worker in turn).
    pub max_attempts: i32,
}

/// What the notification channels carry to this process.
#[derive(Clone)]
pub struct Notices {
    /// Job ids as their rows change; [`EVERYTHING`] after a reconnection.
    pub jobs: broadcast::Sender<String>,
    /// A model version or the active model changed.
    pub models: broadcast::Sender<()>,
}

/// The job id a notice carries when any job may have changed unseen (notifications were lost).
pub const EVERYTHING: &str = "*";

const JOBS_CHANNEL: &str = "picie_jobs";
const MODELS_CHANNEL: &str = "picie_models";

/// The shared database and object store, and this process's settings.
pub struct Shared {
    pub db: PgPool,
    pub blobs: Blobs,
    pub settings: SharedSettings,
    pub notices: Notices,
}

impl Shared {
    /// Connects, runs the migrations (under PostgreSQL's migration lock, so replicas starting
    /// together apply them once), opens the object store and starts listening for changes.
    pub async fn connect(database_url: &str, store_url: &str, settings: SharedSettings) -> Result<Self> {
        let blobs = Blobs::from_url(store_url)?;
        let db = PgPoolOptions::new().max_connections(8).acquire_timeout(Duration::from_secs(10)).connect(database_url).await?;
        sqlx::migrate!("./migrations").run(&db).await.map_err(|e| Error::Unavailable(format!("database migration: {e}")))?;
        let mut listener = PgListener::connect_with(&db).await?;
        listener.listen_all([JOBS_CHANNEL, MODELS_CHANNEL]).await?;
        let notices = Notices { jobs: broadcast::channel(4096).0, models: broadcast::channel(64).0 };
        tokio::spawn(listen(listener, notices.clone()));
        tracing::info!(store = blobs.url(), instance = %settings.instance, "connected to the shared database and object store");
        Ok(Self { db, blobs, settings, notices })
    }
}

/// Passes the database's notifications on; after a lost connection (which [`PgListener`]
/// re-establishes) it announces that anything may have changed meanwhile.
async fn listen(mut listener: PgListener, notices: Notices) {
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) if n.channel() == JOBS_CHANNEL => {
                let _ = notices.jobs.send(n.payload().to_string());
            }
            Ok(Some(_)) => {
                let _ = notices.models.send(());
            }
            Ok(None) => {
                tracing::warn!("the database's notification connection was lost; reconnecting");
                let _ = notices.jobs.send(EVERYTHING.to_string());
                let _ = notices.models.send(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot receive the database's notifications; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The default `--instance-id`: the host name (a pod's name on Kubernetes) and the process id.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "picie".into());
    format!("{host}-{}", std::process::id())
}
