//! The server's data directory and its model versions.
//!
//! ```text
//! DATA_DIR/models/<name>/     packages made by jobs
//! DATA_DIR/active_model       the name of the active model
//! DATA_DIR/datasets/<id>/     uploaded image sets
//! DATA_DIR/jobs/<id>.json     jobs and their state
//! ```
//! Packages under the read-only models folder (`models/` in the repository) are listed too;
//! they cannot be deleted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use crate::infer::{DeviceChoice, Segmenter};
use crate::package::{Manifest, Package};

/// Names that reach the filesystem: letters, digits, `.`, `_`, `-`, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[derive(Serialize, ToSchema, Clone)]
pub struct ModelSummary {
    pub name: String,
    pub active: bool,
    /// Shipped with the server (read-only folder) rather than made by a job.
    pub builtin: bool,
    pub k: usize,
    pub backbone: String,
    pub trained: bool,
    pub created_at: String,
}

pub struct ModelRegistry {
    builtin_dir: PathBuf,
    data_dir: PathBuf,
    device: DeviceChoice,
    threads: Option<usize>,
    active: RwLock<(String, Arc<Segmenter>)>,
    /// Serialises activations, deletions and class edits.
    pub edit: tokio::sync::Mutex<()>,
}

impl ModelRegistry {
    pub fn open(builtin_dir: &Path, data_dir: &Path, requested: Option<&str>, device: DeviceChoice, threads: Option<usize>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir.join("models"))?;
        let remembered = std::fs::read_to_string(data_dir.join("active_model")).ok().map(|s| s.trim().to_string());
        let name = requested.map(str::to_string).or(remembered).unwrap_or_else(|| "default".to_string());
        let dir = resolve_in(builtin_dir, data_dir, &name).ok_or_else(|| {
            anyhow::anyhow!("model `{name}` not found in {} or {}", builtin_dir.display(), data_dir.join("models").display())
        })?;
        let seg = Segmenter::load(&dir, device, threads)?;
        Ok(Self {
            builtin_dir: builtin_dir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            device,
            threads,
            active: RwLock::new((name, Arc::new(seg))),
            edit: tokio::sync::Mutex::new(()),
        })
    }

    pub fn active(&self) -> (String, Arc<Segmenter>) {
        let g = self.active.read().expect("model lock");
        (g.0.clone(), g.1.clone())
    }

    /// The folder of model `name`, jobs' models first.
    pub fn resolve(&self, name: &str) -> Option<PathBuf> {
        resolve_in(&self.builtin_dir, &self.data_dir, name)
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        !self.data_dir.join("models").join(name).exists() && self.builtin_dir.join(name).exists()
    }

    pub fn models_dir(&self) -> PathBuf {
        self.data_dir.join("models")
    }

    pub fn list(&self) -> Vec<ModelSummary> {
        let active = self.active().0;
        let mut names: Vec<String> = [self.builtin_dir.clone(), self.models_dir()]
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| valid_name(n))
            .collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter_map(|n| {
                let m = self.manifest(&n).ok()?;
                Some(ModelSummary {
                    active: n == active,
                    builtin: self.is_builtin(&n),
                    k: m.k,
                    backbone: format!("{:?}", m.embedder.backbone),
                    trained: m.provenance.trained,
                    created_at: m.provenance.created_at.clone(),
                    name: n,
                })
            })
            .collect()
    }

    pub fn manifest(&self, name: &str) -> ApiResult<Manifest> {
        let dir = self.resolve(name).ok_or_else(|| ApiError::NotFound(format!("model `{name}` not found")))?;
        let text = std::fs::read_to_string(dir.join(crate::package::MANIFEST_FILE)).map_err(anyhow::Error::from)?;
        serde_json::from_str(&text).map_err(|e| ApiError::Internal(format!("{}: {e}", dir.display())))
    }

    pub fn package(&self, name: &str) -> ApiResult<Package> {
        let dir = self.resolve(name).ok_or_else(|| ApiError::NotFound(format!("model `{name}` not found")))?;
        Package::load(&dir).map_err(|e| ApiError::Conflict(format!("model `{name}` cannot be loaded: {e:#}")))
    }

    /// Loads `name` fully, then swaps it in. Requests already accepted keep the old model; a
    /// failed load leaves the active model as it was.
    pub async fn activate(&self, name: &str) -> ApiResult<()> {
        let dir = self.resolve(name).ok_or_else(|| ApiError::NotFound(format!("model `{name}` not found")))?;
        let (device, threads) = (self.device, self.threads);
        let seg = tokio::task::spawn_blocking(move || Segmenter::load(&dir, device, threads))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Conflict(format!("model `{name}` cannot be loaded: {e:#}")))?;
        *self.active.write().expect("model lock") = (name.to_string(), Arc::new(seg));
        crate::util::write_atomic(&self.data_dir.join("active_model"), name.as_bytes())?;
        tracing::info!(model = name, "model activated");
        Ok(())
    }

    pub fn delete(&self, name: &str) -> ApiResult<()> {
        if self.resolve(name).is_none() {
            return Err(ApiError::NotFound(format!("model `{name}` not found")));
        }
        if self.active().0 == name {
            return Err(ApiError::Conflict(format!("model `{name}` is active; activate another first")));
        }
        if self.is_builtin(name) {
            return Err(ApiError::Conflict(format!("model `{name}` ships with the server and cannot be deleted")));
        }
        let dir = self.models_dir().join(name);
        // Rename first so a half-deleted package is never listed.
        let trash = self.models_dir().join(format!(".deleting-{name}-{}", crate::util::unique()));
        std::fs::rename(&dir, &trash).map_err(anyhow::Error::from)?;
        std::fs::remove_dir_all(&trash).map_err(anyhow::Error::from)?;
        Ok(())
    }
}

/// The folder of model `name`, jobs' models before shipped ones.
fn resolve_in(builtin_dir: &Path, data_dir: &Path, name: &str) -> Option<PathBuf> {
    if !valid_name(name) {
        return None;
    }
    [data_dir.join("models").join(name), builtin_dir.join(name)]
        .into_iter()
        .find(|p| p.join(crate::package::MANIFEST_FILE).exists())
}
