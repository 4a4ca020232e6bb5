//! Datasets: the store's, with the rule that joins them to jobs: a dataset that a queued or
//! running job uses cannot be deleted (the job would fail, unresumably). Submitting a job and
//! deleting a dataset take the same gate in this process; scaled out, the database's row locks
//! order them across processes too.

use std::sync::Arc;

use super::error::{Error, Result};
use crate::server::core::datasets::{Dataset, ImageEntry, Upload, UploadReport};
use crate::server::core::Page;
use crate::server::storage::{DatasetStore, JobStore};

pub struct Datasets {
    pub(super) store: Arc<dyn DatasetStore>,
    jobs: Arc<dyn JobStore>,
    pub(super) gate: Arc<tokio::sync::Mutex<()>>,
}

impl Datasets {
    pub fn new(store: Arc<dyn DatasetStore>, jobs: Arc<dyn JobStore>, gate: Arc<tokio::sync::Mutex<()>>) -> Self {
        Self { store, jobs, gate }
    }

    pub async fn create(&self, name: &str) -> Result<Dataset> {
        Ok(self.store.create(name).await?)
    }

    pub async fn list(&self, page: Page) -> Result<(Vec<Dataset>, usize)> {
        Ok(self.store.list(page.clamped()).await?)
    }

    /// The dataset, with a page of its images where asked.
    pub async fn get(&self, id: &str, images: Option<Page>) -> Result<Dataset> {
        let mut d = self.store.get(id).await?;
        if let Some(page) = images {
            d.images = Some(self.store.images(id, page.clamped()).await?);
        }
        Ok(d)
    }

    pub async fn images(&self, id: &str, page: Page) -> Result<Vec<ImageEntry>> {
        Ok(self.store.images(id, page.clamped()).await?)
    }

    pub async fn delete(&self, id: &str) -> Result<()> {
        let _gate = self.gate.lock().await;
        if self.jobs.uses_dataset(id).await? {
            return Err(Error::Conflict(format!("dataset `{id}` is used by a queued or running job; cancel it or wait for it to end")));
        }
        Ok(self.store.delete(id).await?)
    }

    pub async fn new_upload(&self, name: String) -> Result<(Upload, std::fs::File)> {
        Ok(self.store.new_upload(name).await?)
    }

    pub async fn add(&self, id: &str, uploads: Vec<Upload>) -> Result<UploadReport> {
        Ok(self.store.add(id, uploads).await?)
    }
}
