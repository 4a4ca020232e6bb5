//! Where the server keeps what outlives a request: model versions, datasets and jobs. Each concern
//! is one trait with two peers behind it: the data folder of a single server ([`local`]), and
//! PostgreSQL with an object store, shared by API replicas and job workers ([`shared`]). The
//! services above choose neither; `app` picks the peers once, from the flags.
//!
//! Every method that touches the filesystem or the network is async and keeps blocking work off
//! the runtime (the local peers run it on the blocking pool).

pub mod local;
pub mod shared;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::core::datasets::{Dataset, ImageEntry, Upload, UploadReport};
use super::core::jobs::{Job, JobReport, JobState, Standing};
use super::core::Page;
use crate::package::Manifest;

/// What storage can fail with; only the HTTP layer turns it into a status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with what is stored: a name taken, a job in a state that refuses it.
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The shared database or object store cannot be reached, or refused.
    #[error("{0}")]
    Unavailable(String),
    /// Something stored is broken: a checksum, an index that does not parse.
    #[error("{0}")]
    Corrupt(String),
    /// The machine failed: the filesystem, a crashed blocking task.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(what: impl std::fmt::Display, e: std::io::Error) -> Self {
        Error::Internal(format!("{what}: {e}"))
    }

    /// A blocking task that did not come back (it panicked).
    pub fn task(what: &str, e: tokio::task::JoinError) -> Self {
        Error::Internal(format!("{what}: {e}"))
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Unavailable(format!("database: {e}"))
    }
}

/// Runs blocking storage work on the blocking pool.
pub async fn blocking<T: Send + 'static>(what: &'static str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::task(what, e))?
}

/// A model version written by a job or a class edit, as the store has it.
#[derive(Clone, Debug)]
pub struct StoredModel {
    pub name: String,
    /// Counts the package's publications under this name (class edits add one).
    pub revision: i64,
    pub manifest: Manifest,
}

#[async_trait]
pub trait ModelStore: Send + Sync {
    /// Whether other processes share the store (replicas serve what it says is active).
    fn shared(&self) -> bool;
    /// The versions stored, by name.
    async fn list(&self) -> Result<Vec<StoredModel>>;
    /// The stored version `name`, if there is one.
    async fn get(&self, name: &str) -> Result<Option<StoredModel>>;
    /// A folder on this machine holding `name`'s package at its current revision, fetched and
    /// checked first where the package lives elsewhere; None when no version is stored.
    async fn local_copy(&self, name: &str) -> Result<Option<(PathBuf, i64)>>;
    /// A fresh folder on this machine in which a new package for `name` is written before it is
    /// published (named so that a crash leaves only a leftover that startup removes).
    fn staging(&self, name: &str) -> PathBuf;
    /// Publishes the complete package in `dir` as version `name` and returns its revision.
    /// `replacing`: the revision a class edit replaces (a newer one there is a conflict). None: a
    /// new version, refused when the name is taken, unless the version stored there was written
    /// by the same job `job` (a job resumed after it had published).
    async fn publish(&self, name: &str, dir: &Path, replacing: Option<i64>, job: Option<&str>) -> Result<i64>;
    async fn delete(&self, name: &str) -> Result<()>;
    /// The model the server serves, as last activated (None before any activation).
    async fn active(&self) -> Result<Option<String>>;
    /// Records the activation (before the server swaps the model in).
    async fn set_active(&self, name: &str) -> Result<()>;
    /// Resolves when another process may have changed the active model or a version; a store no
    /// other process writes never resolves.
    async fn changed(&self);
}

#[async_trait]
pub trait DatasetStore: Send + Sync {
    async fn create(&self, name: &str) -> Result<Dataset>;
    /// A page of the datasets, oldest first, without their image lists; and how many there are.
    async fn list(&self, page: Page) -> Result<(Vec<Dataset>, usize)>;
    async fn get(&self, id: &str) -> Result<Dataset>;
    /// A page of the dataset's images, in upload order.
    async fn images(&self, id: &str, page: Page) -> Result<Vec<ImageEntry>>;
    async fn delete(&self, id: &str) -> Result<()>;
    /// A new temporary file for an upload, and a handle to write it through.
    async fn new_upload(&self, name: String) -> Result<(Upload, std::fs::File)>;
    /// Checks and stores uploaded files; rejected files are reported by name, the rest kept.
    /// Nothing is half-added: the index names an image only once its file is in place.
    async fn add(&self, id: &str, uploads: Vec<Upload>) -> Result<UploadReport>;
    /// The dataset's image files on this machine (fetched and checked first where they live
    /// elsewhere), for a job.
    async fn local_images(&self, id: &str) -> Result<Vec<PathBuf>>;
}

/// A job claimed by this process to run, and its hold on it.
pub struct Claimed {
    pub job: Job,
    pub lease: Box<dyn Lease>,
}

/// A running job's link to its store.
#[async_trait]
pub trait Lease: Send + Sync {
    /// Where the job stands; the store writes it at its own pace (cheap to call every step).
    fn report(&self, standing: Standing);
    /// Whether a cancel was asked for, or the job was lost to another worker.
    fn stop_requested(&self) -> bool;
    /// Records the job's end (nothing when it was lost to another worker meanwhile).
    async fn finish(self: Box<Self>, outcome: std::result::Result<JobReport, String>, canceled: bool) -> Result<()>;
}

#[async_trait]
pub trait JobStore: Send + Sync {
    /// Stores a new queued job.
    async fn submit(&self, job: Job) -> Result<Job>;
    /// A page of the jobs, newest first.
    async fn list(&self, page: Page) -> Result<Vec<Job>>;
    async fn get(&self, id: &str) -> Result<Job>;
    /// Cancels a queued job at once; a running one stops at its next step.
    async fn cancel(&self, id: &str) -> Result<Job>;
    /// Queues an interrupted or failed job again.
    async fn resume(&self, id: &str) -> Result<Job>;
    async fn counts(&self) -> Result<Vec<(JobState, usize)>>;
    /// Whether a queued or running job uses the dataset.
    async fn uses_dataset(&self, dataset: &str) -> Result<bool>;
    /// Whether a queued or running job other than `except` will write model version `name`.
    async fn writes_model(&self, name: &str, except: Option<&str>) -> Result<bool>;
    /// The ids of jobs as they change, from any process.
    fn changes(&self) -> broadcast::Receiver<String>;
    /// The next job for this process to run, claimed for it; waits until there is one.
    async fn claim(&self) -> Result<Claimed>;
    /// A fine-tuning job's checkpoint: saved where another worker finds it, fetched into `dir`
    /// (returns how many files), removed once of no more use. The data folder's peer keeps it
    /// where it is written.
    async fn save_checkpoint(&self, job: &str, dir: &Path) -> Result<()>;
    async fn fetch_checkpoint(&self, job: &str, dir: &Path) -> Result<usize>;
    async fn drop_checkpoint(&self, job: &str) -> Result<()>;
    /// A segmentation's results (masks, fraction table, gallery), complete in `dir`, kept where
    /// [`JobStore::local_results`] finds them from any process. `dir` is taken (moved or
    /// removed); saving again replaces what was saved.
    async fn save_results(&self, job: &str, dir: &Path) -> Result<()>;
    /// The folder on this machine holding job `job`'s saved results, fetched first where they
    /// live elsewhere; NotFound when none were saved.
    async fn local_results(&self, job: &str) -> Result<PathBuf>;
}
