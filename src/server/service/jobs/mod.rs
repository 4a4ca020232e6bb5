//! Background jobs: submission under the rules (the spec within the limits, its dataset there and
//! not being deleted, its model name free), the store's listing and control, watching
//! ([`watch`]), and the executor that claims and runs them one at a time ([`runner`]).
//!
//! An interrupted or failed job is run again only when asked (`POST /jobs/{id}/resume`), never by
//! itself at startup: a job that brings the process down (out of memory, a native crash) would
//! otherwise bring it down again on every restart. A resumed fine-tuning job continues from its
//! last epoch checkpoint; a re-clustering job starts over.

pub mod results;
pub mod runner;
pub mod watch;

use std::sync::Arc;

use futures_util::Stream;

use super::catalog::Catalog;
use super::error::{Error, Result};
use crate::server::core::jobs::{Job, JobSpec, JobState};
use crate::server::core::Page;
use crate::server::storage::{DatasetStore, JobStore};

pub use runner::{JobContext, JobSettings, Runner};

pub struct Jobs {
    store: Arc<dyn JobStore>,
    datasets: Arc<dyn DatasetStore>,
    catalog: Arc<Catalog>,
    /// Shared with dataset deletion: a job's dataset is not deleted while it is submitted.
    gate: Arc<tokio::sync::Mutex<()>>,
    hub: watch::WatchHub,
    archives: results::ArchiveSlots,
}

impl Jobs {
    pub fn new(
        store: Arc<dyn JobStore>,
        datasets: Arc<dyn DatasetStore>,
        catalog: Arc<Catalog>,
        gate: Arc<tokio::sync::Mutex<()>>,
        watchers: (usize, usize),
    ) -> Self {
        let hub = watch::WatchHub::start(store.clone(), watchers.0, watchers.1);
        let archives = Arc::new(tokio::sync::Semaphore::new(results::MAX_ARCHIVES));
        Self { store, datasets, catalog, gate, hub, archives }
    }

    pub async fn submit(&self, spec: JobSpec) -> Result<Job> {
        let _gate = self.gate.lock().await;
        let dataset = self.datasets.get(spec.dataset()).await?;
        spec.validate(dataset.num_images).map_err(Error::Invalid)?;
        if let Some(name) = spec.requested_name() {
            if self.catalog.exists(name).await? {
                return Err(Error::Conflict(format!("model `{name}` already exists")));
            }
            if self.store.writes_model(name, None).await? {
                return Err(Error::Conflict(format!("another queued or running job writes model `{name}`")));
            }
        }
        let source = match spec.requested_model() {
            Some(model) if !self.catalog.exists(model).await? => return Err(Error::NotFound(format!("model `{model}` not found"))),
            Some(model) => model.to_string(),
            None => self.catalog.active().0,
        };
        Ok(self.store.submit(Job::new(spec, source)).await?)
    }

    pub async fn list(&self, page: Page) -> Result<Vec<Job>> {
        Ok(self.store.list(page.clamped()).await?)
    }

    pub async fn get(&self, id: &str) -> Result<Job> {
        Ok(self.store.get(id).await?)
    }

    pub async fn cancel(&self, id: &str) -> Result<Job> {
        Ok(self.store.cancel(id).await?)
    }

    pub async fn resume(&self, id: &str) -> Result<Job> {
        Ok(self.store.resume(id).await?)
    }

    pub async fn counts(&self) -> Result<Vec<(JobState, usize)>> {
        Ok(self.store.counts().await?)
    }

    /// The job now and after every change, until it ends or the stream is dropped.
    pub async fn watch(&self, id: &str) -> Result<impl Stream<Item = Job> + Send + 'static> {
        self.hub.watch(id).await
    }

    /// Job watchers open now.
    pub fn watchers(&self) -> usize {
        self.hub.watchers()
    }
}

/// Runs this process's jobs, one at a time, for as long as the process runs: claims the next,
/// runs it (a panic becomes the job's error, not the process's end), records its end.
pub fn start_executor(store: Arc<dyn JobStore>, runner: Arc<Runner>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let claimed = match store.claim().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot claim jobs any more");
                    return;
                }
            };
            let job = claimed.job;
            let lease = Arc::new(claimed.lease);
            let ctx = JobContext::new(lease.clone());
            let outcome = {
                let (runner, job) = (runner.clone(), job.clone());
                tokio::spawn(async move { runner.run(&job, ctx).await }).await.unwrap_or_else(|e| Err(format!("the job panicked: {e}")))
            };
            match &outcome {
                Ok(r) => tracing::info!(job = %job.id, model = %r.model, "job succeeded"),
                Err(e) => tracing::warn!(job = %job.id, error = %e, "job ended without a model"),
            }
            let canceled = lease.stop_requested();
            let Ok(lease) = Arc::try_unwrap(lease) else {
                tracing::error!(job = %job.id, "the job's lease is still held; its end is not recorded");
                continue;
            };
            if let Err(e) = lease.finish(outcome, canceled).await {
                tracing::error!(job = %job.id, error = %e, "cannot record the job's end");
            }
        }
    })
}
