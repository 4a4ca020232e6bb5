//! Scale-out storage: what replicas and workers share. Metadata (model versions, the active
//! model, datasets' indexes, jobs with their leases) in PostgreSQL; blobs (packages, dataset
//! images, checkpoints) in object storage ([`blobs`]). Each process keeps its data folder as a
//! local cache of the blobs it needs, checked against their SHA-256 before use.
//!
//! Without `--database-url` none of this is used: the embedded default keeps everything in the
//! data folder, as it always did.

pub mod blobs;
pub mod datasets;
pub mod jobs;
pub mod models;

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

pub use blobs::{BlobError, Blobs};

/// What the shared stores can fail with; the HTTP layer answers 503 (the database or the object
/// store is unreachable or refused) unless a more precise error applies.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Blobs(#[from] BlobError),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A blob downloaded from the store does not match its recorded checksum.
    #[error("{0}")]
    Corrupt(String),
}

pub type SharedResult<T> = Result<T, SharedError>;

/// Which parts of the server a process runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Role {
    /// HTTP only: serves `/segment` and the API, runs no jobs.
    Api,
    /// Claims and runs jobs (it serves the HTTP routes too, for probes and metrics).
    Worker,
    /// Both: the embedded default.
    #[default]
    All,
}

impl Role {
    pub fn runs_jobs(self) -> bool {
        matches!(self, Role::Worker | Role::All)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Worker => "worker",
            Role::All => "all",
        }
    }
}

/// How a process takes part in a scaled-out deployment.
#[derive(Clone, Debug)]
pub struct SharedSettings {
    /// This process's name in leases (`--instance-id`, default the host name and process id).
    pub instance: String,
    /// How long a job stays claimed without a heartbeat.
    pub lease: Duration,
    /// How often replicas look for a newly activated model and workers for queued jobs.
    pub sync_interval: Duration,
    /// Lease expiries after which a job is no longer claimed again but marked interrupted (a job
    /// that kills its worker would otherwise kill every worker in turn).
    pub max_attempts: i32,
}

/// The shared database and object store, and this process's settings.
pub struct Shared {
    pub db: PgPool,
    pub blobs: Blobs,
    pub settings: SharedSettings,
}

impl Shared {
    /// Connects, runs the migrations (under PostgreSQL's migration lock, so replicas starting
    /// together apply them once) and opens the object store.
    pub async fn connect(database_url: &str, store_url: &str, settings: SharedSettings) -> SharedResult<Self> {
        let blobs = Blobs::from_url(store_url)?;
        let db = PgPoolOptions::new().max_connections(8).acquire_timeout(Duration::from_secs(10)).connect(database_url).await?;
        sqlx::migrate!("./migrations").run(&db).await?;
        tracing::info!(store = blobs.url(), instance = %settings.instance, "connected to the shared database and object store");
        Ok(Self { db, blobs, settings })
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

/// Runs a future to completion from a blocking thread of the Tokio runtime (a job, a package
/// load on the blocking pool): the shared stores are async, the jobs and package code is not.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(f)
}
