//! Datasets in the shared stores: each dataset's index is a row of `datasets`, its images are
//! blobs under `datasets/<id>/images/`. Uploads still go through the data folder's peer
//! (streamed, capped, decoded, hashed), which here is a cache: the index is read from the
//! database, locked there for the upload (so two replicas adding to one dataset take turns), and
//! written back once the new image files are in the object store. A worker fetches a dataset's
//! images before a job, checking each against its SHA-256.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Row;

use super::Shared;
use crate::server::core::datasets::{Dataset, ImageEntry, Upload, UploadReport};
use crate::server::core::Page;
use crate::server::storage::local::datasets::{Index, LocalDatasets};
use crate::server::storage::{blocking, DatasetStore, Error, Result};

pub struct SharedDatasets {
    shared: Arc<Shared>,
    local: Arc<LocalDatasets>,
}

impl SharedDatasets {
    pub fn new(shared: Arc<Shared>, local: Arc<LocalDatasets>) -> Self {
        Self { shared, local }
    }

    async fn index(&self, id: &str) -> Result<Index> {
        let doc: Option<sqlx::types::Json<serde_json::Value>> =
            sqlx::query_scalar("SELECT doc FROM datasets WHERE id = $1").bind(id).fetch_optional(&self.shared.db).await?;
        Index::from_doc(id, doc.ok_or_else(|| not_found(id))?.0)
    }
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("dataset `{id}` not found"))
}

fn image_key(id: &str, file: &str) -> String {
    format!("datasets/{id}/images/{file}")
}

/// The summary columns of a dataset row: its counts computed by the database, so a listing
/// never sends the image lists.
macro_rules! summary_columns {
    () => {
        "id, doc->>'name' AS name, created_at, jsonb_array_length(doc->'images') AS num_images, \
         (SELECT coalesce(sum((e->>'bytes')::bigint), 0) FROM jsonb_array_elements(doc->'images') e)::bigint AS bytes"
    };
}

fn summary(r: &sqlx::postgres::PgRow) -> Result<Dataset> {
    Ok(Dataset {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
        num_images: r.try_get::<i32, _>("num_images")? as usize,
        bytes: r.try_get::<i64, _>("bytes")? as u64,
        images: None,
    })
}

async fn discard(uploads: Vec<Upload>) {
    let _ = tokio::task::spawn_blocking(move || drop(uploads)).await;
}

#[async_trait]
impl DatasetStore for SharedDatasets {
    async fn create(&self, name: &str) -> Result<Dataset> {
        let (local, name) = (self.local.clone(), name.to_string());
        let index = blocking("creating a dataset", move || local.create_blocking(&name)).await?;
        sqlx::query("INSERT INTO datasets (id, created_at, doc) VALUES ($1, $2, $3)")
            .bind(&index.id)
            .bind(&index.created_at)
            .bind(sqlx::types::Json(&index))
            .execute(&self.shared.db)
            .await?;
        Ok(index.view(None))
    }

    async fn list(&self, page: Page) -> Result<(Vec<Dataset>, usize)> {
        let page = page.clamped();
        let rows = sqlx::query(concat!("SELECT ", summary_columns!(), " FROM datasets ORDER BY created_at, id LIMIT $1 OFFSET $2"))
            .bind(page.limit as i64)
            .bind(page.offset as i64)
            .fetch_all(&self.shared.db)
            .await?;
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM datasets").fetch_one(&self.shared.db).await?;
        Ok((rows.iter().map(summary).collect::<Result<_>>()?, total as usize))
    }

    async fn get(&self, id: &str) -> Result<Dataset> {
        let row = sqlx::query(concat!("SELECT ", summary_columns!(), " FROM datasets WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.shared.db)
            .await?;
        summary(&row.ok_or_else(|| not_found(id))?)
    }

    async fn images(&self, id: &str, page: Page) -> Result<Vec<ImageEntry>> {
        Ok(self.index(id).await?.view(Some(page)).images.unwrap_or_default())
    }

    /// Removes the row first (the dataset is gone for every replica at once), then the blobs,
    /// then this replica's copy. Refused while a queued or running job uses it: the row is
    /// locked first, and a job's submission locks it too (shared), so the two take turns.
    async fn delete(&self, id: &str) -> Result<()> {
        let mut tx = self.shared.db.begin().await?;
        let found: Option<String> =
            sqlx::query_scalar("SELECT id FROM datasets WHERE id = $1 FOR UPDATE").bind(id).fetch_optional(&mut *tx).await?;
        if found.is_none() {
            tx.rollback().await?;
            return Err(not_found(id));
        }
        let used: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE state IN ('queued', 'running') AND doc->'spec'->>'dataset' = $1)")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        if used {
            tx.rollback().await?;
            return Err(Error::Conflict(format!("dataset `{id}` is used by a queued or running job; cancel it or wait for it to end")));
        }
        sqlx::query("DELETE FROM datasets WHERE id = $1").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        self.shared.blobs.delete_prefix(&format!("datasets/{id}")).await?;
        match self.local.delete_local(id).await {
            Ok(()) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn new_upload(&self, name: String) -> Result<(Upload, std::fs::File)> {
        let local = self.local.clone();
        blocking("creating an upload file", move || local.temp_upload(name)).await
    }

    /// Adds uploaded files: the dataset's row stays locked from reading its index to writing
    /// the new one. New image files reach the object store before the index names them; on any
    /// failure the row is left as it was (the transaction rolls back).
    async fn add(&self, id: &str, uploads: Vec<Upload>) -> Result<UploadReport> {
        let mut tx = match self.shared.db.begin().await {
            Ok(tx) => tx,
            Err(e) => {
                discard(uploads).await;
                return Err(e.into());
            }
        };
        let doc: Option<sqlx::types::Json<serde_json::Value>> =
            match sqlx::query_scalar("SELECT doc FROM datasets WHERE id = $1 FOR UPDATE").bind(id).fetch_optional(&mut *tx).await {
                Ok(d) => d,
                Err(e) => {
                    discard(uploads).await;
                    return Err(e.into());
                }
            };
        let Some(doc) = doc else {
            discard(uploads).await;
            return Err(not_found(id));
        };
        let index = match Index::from_doc(id, doc.0) {
            Ok(i) => i,
            Err(e) => {
                discard(uploads).await;
                return Err(e);
            }
        };
        let before: HashSet<String> = index.images.iter().map(|e| e.file.clone()).collect();
        let local = self.local.clone();
        if let Err(e) = blocking("caching a dataset index", move || local.materialize(&index)).await {
            discard(uploads).await;
            return Err(e);
        }
        let report = self.local.add_locked(id, uploads).await?;
        let local = self.local.clone();
        let after = {
            let id = id.to_string();
            blocking("reading a dataset", move || local.read_index(&id)).await?
        };
        let images = self.local.images_folder(id);
        for e in after.images.iter().filter(|e| !before.contains(&e.file)) {
            self.shared.blobs.put_file(&image_key(id, &e.file), &images.join(&e.file)).await?;
        }
        sqlx::query("UPDATE datasets SET doc = $2 WHERE id = $1").bind(id).bind(sqlx::types::Json(&after)).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(report)
    }

    /// Brings the dataset's images into this process's data folder (a worker before a job):
    /// each one missing is fetched and checked against its SHA-256.
    async fn local_images(&self, id: &str) -> Result<Vec<PathBuf>> {
        let index = self.index(id).await?;
        let local = self.local.clone();
        let cached = index.clone();
        blocking("caching a dataset index", move || local.materialize(&cached)).await?;
        let images = self.local.images_folder(id);
        let mut fetched = 0usize;
        for e in &index.images {
            let path = images.join(&e.file);
            if tokio::fs::metadata(&path).await.is_ok_and(|m| m.len() == e.bytes) {
                continue;
            }
            self.shared.blobs.get_file(&image_key(id, &e.file), &path).await?;
            let check = path.clone();
            let got = blocking("checking a downloaded image", move || {
                let f = std::fs::File::open(&check).map_err(|err| Error::io(format!("reading {}", check.display()), err))?;
                crate::server::storage::local::ingest::hash_file(&f).map_err(|err| Error::io(format!("reading {}", check.display()), err))
            })
            .await?;
            if got != e.sha256 {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(Error::Corrupt(format!(
                    "dataset `{id}`: an image from the object store does not match its SHA-256 ({})",
                    e.file
                )));
            }
            fetched += 1;
        }
        if fetched > 0 {
            tracing::info!(dataset = id, fetched, images = index.images.len(), "dataset images fetched from the shared store");
        }
        Ok(index.images.iter().map(|e| images.join(&e.file)).collect())
    }
}
