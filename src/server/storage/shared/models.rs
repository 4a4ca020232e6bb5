//! Model versions in the shared stores: a row per version in `models` (its manifest, revision,
//! the job that wrote it and where its files are), the files under a prefix of their own per
//! publication (`models/<name>/<upload>/`) in the object store, and the active model in
//! `active_model`. A publication uploads its files first and then takes the name in one
//! statement, so two jobs writing the same name never mix files: the second is refused and its
//! upload removed. Replicas fetch a package into their data folder on first use and check
//! every file against the manifest's SHA-256 before serving it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use rand::Rng;
use sqlx::Row;
use tokio::sync::broadcast;

use super::Shared;
use crate::package::{Manifest, Package};
use crate::server::core::valid_name;
use crate::server::storage::local::DataDir;
use crate::server::storage::{blocking, Error, ModelStore, Result, StoredModel};

pub struct SharedModels {
    shared: Arc<Shared>,
    cache: Arc<DataDir>,
    /// The revision of each package this process's data folder holds.
    fetched: std::sync::Mutex<HashMap<String, i64>>,
    /// One download at a time.
    fetching: tokio::sync::Mutex<()>,
    /// Model notices since the last [`ModelStore::changed`].
    notices: tokio::sync::Mutex<broadcast::Receiver<()>>,
}

impl SharedModels {
    pub fn new(shared: Arc<Shared>, cache: Arc<DataDir>) -> Self {
        let notices = tokio::sync::Mutex::new(shared.notices.models.subscribe());
        Self { shared, cache, fetched: Default::default(), fetching: tokio::sync::Mutex::new(()), notices }
    }

    /// The row's revision and where its files are.
    async fn location(&self, name: &str) -> Result<Option<(i64, String)>> {
        let row =
            sqlx::query("SELECT revision, blob_prefix FROM models WHERE name = $1").bind(name).fetch_optional(&self.shared.db).await?;
        Ok(match row {
            Some(r) => {
                Some((r.try_get("revision")?, r.try_get::<Option<String>, _>("blob_prefix")?.unwrap_or_else(|| legacy_prefix(name))))
            }
            None => None,
        })
    }

    /// Downloads the files under `prefix` into a scratch folder, checks the package there, and
    /// swaps it into the data folder.
    async fn fetch(&self, name: &str, prefix: &str) -> Result<PathBuf> {
        let dest = self.cache.models().join(name);
        let scratch = self.staging(name);
        let result = async {
            let mut keys = self.shared.blobs.list(prefix).await?;
            if prefix == legacy_prefix(name) {
                // Files of an earlier layout sit directly under the name; later uploads are below.
                keys.retain(|k| !k.contains('/'));
            }
            if keys.is_empty() {
                return Err(Error::Corrupt(format!("model `{name}` has no files in the object store")));
            }
            for k in &keys {
                self.shared.blobs.get_file(&format!("{prefix}/{k}"), &scratch.join(k)).await?;
            }
            let (scratch, dest, name) = (scratch.clone(), dest.clone(), name.to_string());
            blocking("checking a downloaded model", move || {
                Package::load(&scratch).map_err(|e| Error::Corrupt(format!("model `{name}` from the object store: {e:#}")))?;
                crate::util::replace_dir(&scratch, &dest).map_err(|e| Error::Internal(format!("{e:#}")))
            })
            .await
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&scratch).await;
        }
        result.map(|_| dest)
    }
}

/// Where an earlier version kept a model's files.
fn legacy_prefix(name: &str) -> String {
    format!("models/{name}")
}

fn stored(r: &sqlx::postgres::PgRow) -> Result<Option<StoredModel>> {
    let name: String = r.try_get("name")?;
    let manifest: sqlx::types::Json<serde_json::Value> = r.try_get("manifest")?;
    match serde_json::from_value::<Manifest>(manifest.0) {
        Ok(manifest) => Ok(Some(StoredModel { name, revision: r.try_get("revision")?, manifest })),
        Err(e) => {
            tracing::warn!(model = %name, error = %e, "skipping a model whose stored manifest does not parse");
            Ok(None)
        }
    }
}

#[async_trait]
impl ModelStore for SharedModels {
    fn shared(&self) -> bool {
        true
    }

    async fn list(&self) -> Result<Vec<StoredModel>> {
        let rows = sqlx::query("SELECT name, revision, manifest FROM models ORDER BY name").fetch_all(&self.shared.db).await?;
        Ok(rows.iter().map(stored).collect::<Result<Vec<_>>>()?.into_iter().flatten().collect())
    }

    async fn get(&self, name: &str) -> Result<Option<StoredModel>> {
        let row =
            sqlx::query("SELECT name, revision, manifest FROM models WHERE name = $1").bind(name).fetch_optional(&self.shared.db).await?;
        Ok(match row {
            Some(r) => stored(&r)?,
            None => None,
        })
    }

    async fn local_copy(&self, name: &str) -> Result<Option<(PathBuf, i64)>> {
        if !valid_name(name) {
            return Ok(None);
        }
        let Some((revision, prefix)) = self.location(name).await? else { return Ok(None) };
        let dir = self.cache.models().join(name);
        let _one = self.fetching.lock().await;
        if self.fetched.lock().expect("fetched lock").get(name) == Some(&revision) && dir.exists() {
            return Ok(Some((dir, revision)));
        }
        let dir = self.fetch(name, &prefix).await?;
        self.fetched.lock().expect("fetched lock").insert(name.to_string(), revision);
        tracing::info!(model = name, revision, "model fetched from the shared store");
        Ok(Some((dir, revision)))
    }

    fn staging(&self, name: &str) -> PathBuf {
        self.cache.models().join(format!(".{name}.partial-{}-{}", std::process::id(), crate::util::unique()))
    }

    async fn publish(&self, name: &str, dir: &Path, replacing: Option<i64>, job: Option<&str>) -> Result<i64> {
        let manifest_path = dir.join(crate::package::MANIFEST_FILE);
        let manifest: serde_json::Value = {
            let p = manifest_path.clone();
            blocking("reading a manifest", move || {
                let bytes = std::fs::read(&p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
                serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt(format!("{}: {e}", p.display())))
            })
            .await?
        };
        let prefix = format!("models/{name}/{:016x}", rand::rng().random::<u64>());
        self.shared.blobs.put_dir(&prefix, dir).await?;
        let mut tx = self.shared.db.begin().await?;
        // (revision, files no row names any more, whether `dir` is that revision's package)
        let outcome: Result<(i64, Option<String>, bool)> = async {
            match replacing {
                Some(revision) => {
                    let old: Option<Option<String>> = sqlx::query_scalar("SELECT blob_prefix FROM models WHERE name = $1 AND revision = $2 FOR UPDATE")
                        .bind(name)
                        .bind(revision)
                        .fetch_optional(&mut *tx)
                        .await?;
                    let Some(old) = old else {
                        return Err(Error::Conflict(format!("model `{name}` changed meanwhile; try again")));
                    };
                    let new: i64 = sqlx::query_scalar(
                        "UPDATE models SET revision = revision + 1, manifest = $2, blob_prefix = $3, updated_at = now() WHERE name = $1 RETURNING revision",
                    )
                    .bind(name)
                    .bind(sqlx::types::Json(&manifest))
                    .bind(&prefix)
                    .fetch_one(&mut *tx)
                    .await?;
                    Ok((new, Some(old.unwrap_or_else(|| legacy_prefix(name))), true))
                }
                None => {
                    let taken: Option<i64> = sqlx::query_scalar(
                        "INSERT INTO models (name, revision, manifest, blob_prefix, job) VALUES ($1, 1, $2, $3, $4) \
                         ON CONFLICT (name) DO NOTHING RETURNING revision",
                    )
                    .bind(name)
                    .bind(sqlx::types::Json(&manifest))
                    .bind(&prefix)
                    .bind(job)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if let Some(revision) = taken {
                        return Ok((revision, None, true));
                    }
                    let row = sqlx::query("SELECT revision, job FROM models WHERE name = $1").bind(name).fetch_one(&mut *tx).await?;
                    let holder: Option<String> = row.try_get("job")?;
                    if job.is_some() && holder.as_deref() == job {
                        // This job published before it was interrupted: its version stands.
                        return Ok((row.try_get("revision")?, Some(prefix.clone()), false));
                    }
                    Err(Error::Conflict(format!("model `{name}` already exists")))
                }
            }
        }
        .await;
        let (revision, stale, current) = match outcome {
            Ok(v) => {
                tx.commit().await?;
                v
            }
            Err(e) => {
                let _ = tx.rollback().await;
                let _ = self.shared.blobs.delete_prefix(&prefix).await;
                let _ = tokio::fs::remove_dir_all(dir).await;
                return Err(e);
            }
        };
        if let Some(stale) = stale {
            if let Err(e) = self.shared.blobs.delete_prefix(&stale).await {
                tracing::warn!(model = name, prefix = %stale, error = %e, "cannot remove a replaced model's files");
            }
        }
        if !current {
            let _ = tokio::fs::remove_dir_all(dir).await;
            return Ok(revision);
        }
        // The written package is this process's copy of the new revision.
        let (staged, dest) = (dir.to_path_buf(), self.cache.models().join(name));
        blocking("caching a published model", move || {
            crate::util::replace_dir(&staged, &dest).map_err(|e| Error::Internal(format!("{e:#}")))
        })
        .await?;
        self.fetched.lock().expect("fetched lock").insert(name.to_string(), revision);
        tracing::info!(model = name, revision, "model published to the shared store");
        Ok(revision)
    }

    /// Deletes a version's row (refused for the active one, in one statement), then its files and
    /// this process's copy.
    async fn delete(&self, name: &str) -> Result<()> {
        let gone: Option<Option<String>> = sqlx::query_scalar(
            "DELETE FROM models WHERE name = $1 AND NOT EXISTS (SELECT 1 FROM active_model WHERE name = $1) RETURNING blob_prefix",
        )
        .bind(name)
        .fetch_optional(&self.shared.db)
        .await?;
        let Some(prefix) = gone else {
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM models WHERE name = $1)").bind(name).fetch_one(&self.shared.db).await?;
            return Err(if exists {
                Error::Conflict(format!("model `{name}` is active; activate another first"))
            } else {
                Error::NotFound(format!("model `{name}` not found"))
            });
        };
        self.shared.blobs.delete_prefix(&prefix.unwrap_or_else(|| legacy_prefix(name))).await?;
        self.fetched.lock().expect("fetched lock").remove(name);
        let models = self.cache.models();
        let (dir, trash) = (models.join(name), models.join(format!(".deleting-{name}-{}", crate::util::unique())));
        blocking("removing a cached model", move || {
            if dir.exists() {
                std::fs::rename(&dir, &trash).map_err(|e| Error::io(format!("moving {} aside", dir.display()), e))?;
                let _ = std::fs::remove_dir_all(&trash);
            }
            Ok(())
        })
        .await
    }

    async fn active(&self) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT name FROM active_model").fetch_optional(&self.shared.db).await?)
    }

    async fn set_active(&self, name: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO active_model (singleton, name, changed_at) VALUES (true, $1, now()) \
             ON CONFLICT (singleton) DO UPDATE SET name = excluded.name, changed_at = now()",
        )
        .bind(name)
        .execute(&self.shared.db)
        .await?;
        Ok(())
    }

    /// A notice from any replica, or the sync interval without one (a notice may have been lost
    /// while the listening connection was down).
    async fn changed(&self) {
        let mut notices = self.notices.lock().await;
        let _ = tokio::time::timeout(self.shared.settings.sync_interval * 5, notices.recv()).await;
    }
}
