//! Model versions in the shared stores: a row per version in `models` (its manifest and a
//! revision), its files under `models/<name>/` in the object store, and the active model in
//! `active_model`. Replicas fetch a package into their data folder on first use and check every
//! file against the manifest's SHA-256 ([`crate::package::Package::load`]) before serving it.

use std::collections::BTreeMap;
use std::path::Path;

use sqlx::Row;

use super::{Shared, SharedError, SharedResult};
use crate::package::{Manifest, Package};

/// A model version as the database records it.
#[derive(Clone, Debug)]
pub struct SharedModel {
    pub revision: i64,
    pub manifest: Manifest,
}

fn blob_prefix(name: &str) -> String {
    format!("models/{name}")
}

/// Every model version, by name.
pub async fn list(shared: &Shared) -> SharedResult<BTreeMap<String, SharedModel>> {
    let rows = sqlx::query("SELECT name, revision, manifest FROM models").fetch_all(&shared.db).await?;
    let mut out = BTreeMap::new();
    for r in rows {
        let name: String = r.try_get("name")?;
        let manifest: sqlx::types::Json<serde_json::Value> = r.try_get("manifest")?;
        match serde_json::from_value::<Manifest>(manifest.0) {
            Ok(manifest) => {
                out.insert(name, SharedModel { revision: r.try_get("revision")?, manifest });
            }
            Err(e) => tracing::warn!(model = %name, error = %e, "skipping a model whose stored manifest does not parse"),
        }
    }
    Ok(out)
}

/// The active model's name and revision, if one was ever activated.
pub async fn active(shared: &Shared) -> SharedResult<Option<(String, i64)>> {
    let row = sqlx::query("SELECT a.name, coalesce(m.revision, 0) AS revision FROM active_model a LEFT JOIN models m ON m.name = a.name")
        .fetch_optional(&shared.db)
        .await?;
    Ok(match row {
        Some(r) => Some((r.try_get("name")?, r.try_get("revision")?)),
        None => None,
    })
}

pub async fn set_active(shared: &Shared, name: &str) -> SharedResult<()> {
    sqlx::query(
        "INSERT INTO active_model (singleton, name, changed_at) VALUES (true, $1, now()) \
         ON CONFLICT (singleton) DO UPDATE SET name = excluded.name, changed_at = now()",
    )
    .bind(name)
    .execute(&shared.db)
    .await?;
    Ok(())
}

/// Uploads a package's files, then records it (files first: a row never names a package that
/// is not all there). Returns its new revision.
pub async fn publish(shared: &Shared, name: &str, dir: &Path) -> SharedResult<i64> {
    let manifest =
        std::fs::read(dir.join(crate::package::MANIFEST_FILE)).map_err(|e| SharedError::Corrupt(format!("{}: {e}", dir.display())))?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest).map_err(|e| SharedError::Corrupt(format!("{}: {e}", dir.display())))?;
    shared.blobs.put_dir(&blob_prefix(name), dir).await?;
    let revision: i64 = sqlx::query_scalar(
        "INSERT INTO models (name, revision, manifest) VALUES ($1, 1, $2) \
         ON CONFLICT (name) DO UPDATE SET revision = models.revision + 1, manifest = excluded.manifest, updated_at = now() \
         RETURNING revision",
    )
    .bind(name)
    .bind(sqlx::types::Json(manifest))
    .fetch_one(&shared.db)
    .await?;
    tracing::info!(model = name, revision, "model published to the shared store");
    Ok(revision)
}

/// Downloads a package into `dest` (replacing what is there) and checks it: into a scratch
/// folder beside it, loaded with its checksums verified, then swapped in.
pub async fn fetch(shared: &Shared, name: &str, dest: &Path) -> SharedResult<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    // Named as leftovers are (`crate::util::is_leftover`): a crash here leaves nothing startup keeps.
    let scratch = parent.join(format!(".{name}.partial-{}-{}", std::process::id(), crate::util::unique()));
    let result = async {
        let n = shared.blobs.get_dir(&blob_prefix(name), &scratch).await?;
        if n == 0 {
            return Err(SharedError::Corrupt(format!("model `{name}` has no files in the object store")));
        }
        let check = scratch.clone();
        tokio::task::spawn_blocking(move || Package::load(&check).map(|_| ()))
            .await
            .map_err(|e| SharedError::Corrupt(e.to_string()))?
            .map_err(|e| SharedError::Corrupt(format!("model `{name}` from the object store: {e:#}")))?;
        let (scratch, dest) = (scratch.clone(), dest.to_path_buf());
        let old = dest.with_file_name(format!(".{name}.old-{}-{}", std::process::id(), crate::util::unique()));
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if dest.exists() {
                std::fs::rename(&dest, &old)?;
                std::fs::rename(&scratch, &dest)?;
                let _ = std::fs::remove_dir_all(&old);
            } else {
                std::fs::rename(&scratch, &dest)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| SharedError::Corrupt(e.to_string()))?
        .map_err(|e| SharedError::Corrupt(format!("moving model `{name}` into place: {e}")))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_dir_all(&scratch).await;
    }
    result
}

/// Why a shared model cannot be deleted.
pub enum DeleteOutcome {
    Deleted,
    NotFound,
    Active,
}

/// Deletes a model's row (refused for the active one, in one statement), then its files.
pub async fn delete(shared: &Shared, name: &str) -> SharedResult<DeleteOutcome> {
    let deleted = sqlx::query("DELETE FROM models WHERE name = $1 AND NOT EXISTS (SELECT 1 FROM active_model WHERE name = $1)")
        .bind(name)
        .execute(&shared.db)
        .await?
        .rows_affected();
    if deleted == 0 {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM models WHERE name = $1)").bind(name).fetch_one(&shared.db).await?;
        return Ok(if exists { DeleteOutcome::Active } else { DeleteOutcome::NotFound });
    }
    shared.blobs.delete_prefix(&blob_prefix(name)).await?;
    Ok(DeleteOutcome::Deleted)
}
