//! Model versions in the data folder: one package folder per version under `models/`, and the
//! active model's name in `active_model`. Only this process writes them, so revisions are not
//! counted (always 0) and [`ModelStore::changed`] never resolves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use super::DataDir;
use crate::package::{Manifest, MANIFEST_FILE};
use crate::server::core::valid_name;
use crate::server::storage::{blocking, Error, ModelStore, Result, StoredModel};

pub struct LocalModels {
    dir: Arc<DataDir>,
    /// Publications and deletions one at a time (a name is checked and taken in one step).
    writes: tokio::sync::Mutex<()>,
}

impl LocalModels {
    pub fn new(dir: Arc<DataDir>) -> Self {
        Self { dir, writes: tokio::sync::Mutex::new(()) }
    }
}

/// The manifest of the package in `dir`, if there is one.
pub(crate) fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::Corrupt(format!("the manifest of model `{}`: {e}", name_of(dir))))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

fn name_of(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

#[async_trait]
impl ModelStore for LocalModels {
    fn shared(&self) -> bool {
        false
    }

    async fn list(&self) -> Result<Vec<StoredModel>> {
        let models = self.dir.models();
        blocking("listing models", move || {
            let mut out = vec![];
            let entries = std::fs::read_dir(&models).map_err(|e| Error::io(format!("reading {}", models.display()), e))?;
            for e in entries.flatten() {
                let Some(name) = e.file_name().to_str().filter(|n| valid_name(n)).map(str::to_string) else { continue };
                match read_manifest(&e.path()) {
                    Ok(Some(manifest)) => out.push(StoredModel { name, revision: 0, manifest }),
                    Ok(None) => {}
                    Err(err) => tracing::warn!(model = %name, error = %err, "skipping a model whose manifest does not read"),
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
        .await
    }

    async fn get(&self, name: &str) -> Result<Option<StoredModel>> {
        if !valid_name(name) {
            return Ok(None);
        }
        let (dir, name) = (self.dir.models().join(name), name.to_string());
        blocking("reading a manifest", move || Ok(read_manifest(&dir)?.map(|manifest| StoredModel { name, revision: 0, manifest }))).await
    }

    async fn local_copy(&self, name: &str) -> Result<Option<(PathBuf, i64)>> {
        Ok(self.get(name).await?.map(|_| (self.dir.models().join(name), 0)))
    }

    fn staging(&self, name: &str) -> PathBuf {
        self.dir.models().join(format!(".{name}.partial-{}-{}", std::process::id(), crate::util::unique()))
    }

    async fn publish(&self, name: &str, dir: &Path, replacing: Option<i64>, job: Option<&str>) -> Result<i64> {
        let _one = self.writes.lock().await;
        let (target, staged, name, job) = (self.dir.models().join(name), dir.to_path_buf(), name.to_string(), job.map(str::to_string));
        blocking("publishing a model", move || {
            if replacing.is_some() {
                return crate::util::replace_dir(&staged, &target).map(|_| 0).map_err(|e| Error::Internal(format!("{e:#}")));
            }
            if let Some(existing) = read_manifest(&target)? {
                let _ = std::fs::remove_dir_all(&staged);
                return if job.is_some() && existing.provenance.job == job {
                    Ok(0)
                } else {
                    Err(Error::Conflict(format!("model `{name}` already exists")))
                };
            }
            std::fs::rename(&staged, &target).map_err(|e| Error::io(format!("renaming into {}", target.display()), e))?;
            crate::util::sync_dir(target.parent().unwrap_or(Path::new("."))).map_err(|e| Error::io("syncing the models folder", e))?;
            Ok(0)
        })
        .await
    }

    /// Renamed to `.deleting-*` first (a half-deleted package is never listed, and a crash leaves
    /// a leftover that startup removes), then removed.
    async fn delete(&self, name: &str) -> Result<()> {
        let _one = self.writes.lock().await;
        if self.get(name).await?.is_none() {
            return Err(Error::NotFound(format!("model `{name}` not found")));
        }
        let models = self.dir.models();
        let (dir, trash) = (models.join(name), models.join(format!(".deleting-{name}-{}", crate::util::unique())));
        blocking("deleting a model", move || {
            std::fs::rename(&dir, &trash).map_err(|e| Error::io(format!("moving {} aside", dir.display()), e))?;
            crate::util::sync_dir(&models).map_err(|e| Error::io("syncing the models folder", e))?;
            std::fs::remove_dir_all(&trash).map_err(|e| Error::io(format!("removing {}", trash.display()), e))
        })
        .await
    }

    async fn active(&self) -> Result<Option<String>> {
        let file = self.dir.active_model_file();
        blocking("reading the active model", move || match std::fs::read_to_string(&file) {
            Ok(s) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", file.display()), e)),
        })
        .await
    }

    async fn set_active(&self, name: &str) -> Result<()> {
        let (file, bytes) = (self.dir.active_model_file(), name.as_bytes().to_vec());
        blocking("saving the active model", move || crate::util::write_atomic(&file, &bytes).map_err(|e| Error::Internal(format!("{e:#}"))))
            .await
    }

    async fn changed(&self) {
        std::future::pending::<()>().await
    }
}
