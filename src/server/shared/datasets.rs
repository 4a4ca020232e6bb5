//! Datasets in the shared stores: each dataset's index is a row of `datasets`, its images are
//! blobs under `datasets/<id>/images/`. Uploads still go through the local
//! [`DatasetStore`](crate::server::datasets::DatasetStore) (streamed, capped, decoded, hashed),
//! which here is a cache: the index is read from the database, locked there for the upload
//! (so two replicas adding to one dataset take turns), and written back once the new image
//! files are in the object store. A worker fetches a dataset's images before a job, checking
//! each against its SHA-256.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use sqlx::Row;

use super::{Shared, SharedError};
use crate::server::datasets::{Dataset, DatasetError, DatasetResult, DatasetStore, Upload, UploadReport};

pub struct SharedDatasets {
    pub local: Arc<DatasetStore>,
    pub shared: Arc<Shared>,
}

fn db(e: sqlx::Error) -> DatasetError {
    DatasetError::Shared(SharedError::Database(e))
}

fn image_key(id: &str, file: &str) -> String {
    format!("datasets/{id}/images/{file}")
}

impl SharedDatasets {
    pub async fn create(&self, name: &str) -> DatasetResult<Dataset> {
        let ds = self.local.create(name)?;
        let doc = self.local.index_doc(&ds.id)?;
        sqlx::query("INSERT INTO datasets (id, created_at, doc) VALUES ($1, $2, $3)")
            .bind(&ds.id)
            .bind(&ds.created_at)
            .bind(sqlx::types::Json(doc))
            .execute(&self.shared.db)
            .await
            .map_err(db)?;
        Ok(ds)
    }

    pub async fn list(&self) -> DatasetResult<Vec<Dataset>> {
        let rows = sqlx::query("SELECT doc FROM datasets ORDER BY created_at, id").fetch_all(&self.shared.db).await.map_err(db)?;
        rows.into_iter()
            .map(|r| {
                let doc: sqlx::types::Json<serde_json::Value> = r.try_get("doc").map_err(db)?;
                self.local.view_doc(doc.0)
            })
            .collect()
    }

    async fn doc(&self, id: &str) -> DatasetResult<serde_json::Value> {
        let doc: Option<sqlx::types::Json<serde_json::Value>> =
            sqlx::query_scalar("SELECT doc FROM datasets WHERE id = $1").bind(id).fetch_optional(&self.shared.db).await.map_err(db)?;
        doc.map(|d| d.0).ok_or_else(|| DatasetError::NotFound(id.to_string()))
    }

    /// Fails with NotFound unless the dataset exists (without reading its index).
    pub async fn exists(&self, id: &str) -> DatasetResult<()> {
        let found: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM datasets WHERE id = $1)")
            .bind(id)
            .fetch_one(&self.shared.db)
            .await
            .map_err(db)?;
        if found {
            Ok(())
        } else {
            Err(DatasetError::NotFound(id.to_string()))
        }
    }

    pub async fn get(&self, id: &str) -> DatasetResult<Dataset> {
        self.local.view_doc(self.doc(id).await?)
    }

    /// Removes the row first (the dataset is gone for every replica at once), then the blobs,
    /// then this replica's copy.
    pub async fn delete(&self, id: &str) -> DatasetResult<()> {
        let gone = sqlx::query("DELETE FROM datasets WHERE id = $1").bind(id).execute(&self.shared.db).await.map_err(db)?.rows_affected();
        if gone == 0 {
            return Err(DatasetError::NotFound(id.to_string()));
        }
        self.shared.blobs.delete_prefix(&format!("datasets/{id}")).await.map_err(SharedError::from)?;
        match self.local.delete(id).await {
            Ok(()) | Err(DatasetError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Adds uploaded files: the dataset's row stays locked from reading its index to writing
    /// the new one. New image files reach the object store before the index names them; on any
    /// failure the row is left as it was (the transaction rolls back).
    pub async fn add(&self, id: &str, uploads: Vec<Upload>) -> DatasetResult<UploadReport> {
        let mut tx = match self.shared.db.begin().await {
            Ok(tx) => tx,
            Err(e) => {
                drop_uploads(uploads).await;
                return Err(db(e));
            }
        };
        let doc: Option<sqlx::types::Json<serde_json::Value>> =
            match sqlx::query_scalar("SELECT doc FROM datasets WHERE id = $1 FOR UPDATE").bind(id).fetch_optional(&mut *tx).await {
                Ok(d) => d,
                Err(e) => {
                    drop_uploads(uploads).await;
                    return Err(db(e));
                }
            };
        let Some(doc) = doc else {
            drop_uploads(uploads).await;
            return Err(DatasetError::NotFound(id.to_string()));
        };
        let before: HashSet<String> = match self.local.materialize(id, &doc.0) {
            Ok(files) => files.into_iter().map(|f| f.0).collect(),
            Err(e) => {
                drop_uploads(uploads).await;
                return Err(e);
            }
        };
        let report = self.local.add(id, uploads).await?;
        let after = self.local.index_doc(id)?;
        let files = DatasetStore::files_of(id, &after)?;
        let images = self.local.images_folder(id);
        for (file, _, _) in files.iter().filter(|f| !before.contains(&f.0)) {
            self.shared.blobs.put_file(&image_key(id, file), &images.join(file)).await.map_err(SharedError::from)?;
        }
        sqlx::query("UPDATE datasets SET doc = $2 WHERE id = $1")
            .bind(id)
            .bind(sqlx::types::Json(after))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(report)
    }

    /// Brings the dataset's images into this process's data folder (a worker before a job):
    /// each one missing is fetched and checked against its SHA-256. Returns the images folder
    /// and the images' paths.
    pub async fn fetch(&self, id: &str) -> DatasetResult<(PathBuf, Vec<PathBuf>)> {
        let doc = self.doc(id).await?;
        let files = self.local.materialize(id, &doc)?;
        let images = self.local.images_folder(id);
        let mut fetched = 0usize;
        for (file, sha256, bytes) in &files {
            let path = images.join(file);
            if std::fs::metadata(&path).is_ok_and(|m| m.len() == *bytes) {
                continue;
            }
            self.shared.blobs.get_file(&image_key(id, file), &path).await.map_err(SharedError::from)?;
            let check = path.clone();
            let got = tokio::task::spawn_blocking(move || std::fs::File::open(&check).and_then(|f| crate::server::datasets::hash_file(&f)))
                .await
                .map_err(|e| DatasetError::Internal(e.to_string()))?
                .map_err(|source| DatasetError::Io { what: format!("reading {}", path.display()), source })?;
            if &got != sha256 {
                let _ = std::fs::remove_file(&path);
                return Err(SharedError::Corrupt(format!(
                    "dataset `{id}`: image {file} from the object store has SHA-256 {got}, its index says {sha256}"
                ))
                .into());
            }
            fetched += 1;
        }
        if fetched > 0 {
            tracing::info!(dataset = id, fetched, images = files.len(), "dataset images fetched from the shared store");
        }
        Ok((images.clone(), files.iter().map(|f| images.join(&f.0)).collect()))
    }
}

async fn drop_uploads(uploads: Vec<Upload>) {
    let _ = tokio::task::spawn_blocking(move || drop(uploads)).await;
}
