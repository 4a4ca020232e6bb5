//! The server's data directory and its model versions.
//!
//! ```text
//! DATA_DIR/models/<name>/     packages made by jobs
//! DATA_DIR/active_model       the name of the active model
//! DATA_DIR/datasets/<id>/     uploaded image sets
//! DATA_DIR/jobs/<id>.json     jobs and their state
//! DATA_DIR/checkpoints/<job id>.checkpoint/   the last epoch of a fine-tuning job
//! DATA_DIR/tmp/               scratch files of requests in flight
//! ```
//! A process killed in the middle of a write leaves only dot-named leftovers next to what it
//! was writing (see [`crate::util::is_leftover`]) and scratch files under `tmp/`;
//! [`clean_leftovers`] removes them at startup, before anything opens the folders.
//! Packages under the read-only models folder (`models/` in the repository) are listed too;
//! they cannot be deleted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use utoipa::ToSchema;

use crate::infer::{DeviceChoice, Segmenter};
use crate::package::{Manifest, Package};

/// Names that reach the filesystem: letters, digits, `.`, `_`, `-`, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// What the model registry can fail with; the HTTP layer maps it (`server::error`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("model `{0}` not found")]
    NotFound(String),
    #[error("model `{0}` is active; activate another first")]
    Active(String),
    #[error("model `{0}` ships with the server and cannot be deleted")]
    Builtin(String),
    /// The package is there but broken (checksum, manifest, ONNX graph).
    #[error("model `{name}` cannot be loaded: {reason}")]
    Unloadable { name: String, reason: String },
    /// A filesystem failure or a crashed blocking task.
    #[error(transparent)]
    Storage(#[from] anyhow::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Removes what a killed process left in `data_dir`: leftovers named as
/// [`crate::util::is_leftover`] describes in the data folder, `models/`, `checkpoints/`,
/// `jobs/`, `datasets/` and each dataset's folder and `images/`, and everything under `tmp/`.
/// Nothing else is touched (the shipped models folder neither: other processes may read it).
/// Call it before the stores open, while no job or request can be writing. Returns the removed
/// paths, each also logged.
pub fn clean_leftovers(data_dir: &Path) -> Vec<PathBuf> {
    let mut folders = vec![data_dir.to_path_buf()];
    for sub in ["models", "checkpoints", "jobs", "datasets"] {
        folders.push(data_dir.join(sub));
    }
    if let Ok(rd) = std::fs::read_dir(data_dir.join("datasets")) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) && !crate::util::is_leftover(&e.file_name().to_string_lossy()) {
                folders.push(e.path());
                folders.push(e.path().join("images"));
            }
        }
    }
    let mut doomed: Vec<PathBuf> = folders
        .iter()
        .filter_map(|f| std::fs::read_dir(f).ok())
        .flat_map(|rd| rd.flatten())
        .filter(|e| e.file_name().to_str().is_some_and(crate::util::is_leftover))
        .map(|e| e.path())
        .collect();
    if let Ok(rd) = std::fs::read_dir(data_dir.join("tmp")) {
        doomed.extend(rd.flatten().map(|e| e.path()));
    }
    let mut removed = vec![];
    for path in doomed {
        match crate::util::remove_leftover(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a leftover of an earlier run");
                removed.push(path);
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover of an earlier run"),
        }
    }
    removed
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
    pub fn open(builtin_dir: &Path, data_dir: &Path, requested: Option<&str>, device: DeviceChoice, threads: Option<usize>) -> StoreResult<Self> {
        let models = data_dir.join("models");
        std::fs::create_dir_all(&models).map_err(|e| anyhow::anyhow!("creating {}: {e}", models.display()))?;
        let remembered = std::fs::read_to_string(data_dir.join("active_model")).ok().map(|s| s.trim().to_string());
        let name = requested.map(str::to_string).or(remembered).unwrap_or_else(|| "default".to_string());
        let dir = resolve_in(builtin_dir, data_dir, &name).ok_or_else(|| {
            anyhow::anyhow!("model `{name}` not found in {} or {}", builtin_dir.display(), models.display())
        })?;
        let seg = Segmenter::load(&dir, device, threads).map_err(|e| StoreError::Unloadable { name: name.clone(), reason: format!("{e:#}") })?;
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

    pub fn manifest(&self, name: &str) -> StoreResult<Manifest> {
        let dir = self.resolve(name).ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        let path = dir.join(crate::package::MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| StoreError::Unloadable { name: name.to_string(), reason: format!("{}: {e}", path.display()) })
    }

    /// Loads and checks a package (reads and hashes every file: call it off the async runtime,
    /// or use [`ModelRegistry::package_blocking`]).
    pub fn package(&self, name: &str) -> StoreResult<Package> {
        let dir = self.resolve(name).ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        Package::load(&dir).map_err(|e| StoreError::Unloadable { name: name.to_string(), reason: format!("{e:#}") })
    }

    /// [`ModelRegistry::package`] on a blocking thread.
    pub async fn package_blocking(self: &Arc<Self>, name: &str) -> StoreResult<Package> {
        let (this, name) = (self.clone(), name.to_string());
        tokio::task::spawn_blocking(move || this.package(&name)).await.map_err(|e| anyhow::anyhow!("loading a package: {e}"))?
    }

    /// The package `name` if it exists and was written by job `job_id` (its provenance command
    /// names the job): a job resumed after its package was written but before it was marked
    /// done finds its work here.
    pub fn made_by_job(&self, name: &str, job_id: &str) -> Option<Package> {
        let pkg = Package::load(&self.models_dir().join(name)).ok()?;
        pkg.manifest.provenance.command.ends_with(&format!("(job {job_id})")).then_some(pkg)
    }

    /// Loads `name` fully, then swaps it in. Requests already accepted keep the old model; a
    /// failed load leaves the active model as it was.
    pub async fn activate(&self, name: &str) -> StoreResult<()> {
        let dir = self.resolve(name).ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        let (device, threads) = (self.device, self.threads);
        let seg = tokio::task::spawn_blocking(move || Segmenter::load(&dir, device, threads))
            .await
            .map_err(|e| anyhow::anyhow!("loading a model: {e}"))?
            .map_err(|e| StoreError::Unloadable { name: name.to_string(), reason: format!("{e:#}") })?;
        *self.active.write().expect("model lock") = (name.to_string(), Arc::new(seg));
        let (file, name_bytes) = (self.data_dir.join("active_model"), name.as_bytes().to_vec());
        tokio::task::spawn_blocking(move || crate::util::write_atomic(&file, &name_bytes))
            .await
            .map_err(|e| anyhow::anyhow!("saving the active model: {e}"))??;
        tracing::info!(model = name, "model activated");
        Ok(())
    }

    /// Deletes a model made by a job: renamed to `.deleting-*` first (so a half-deleted package
    /// is never listed, and a crash leaves a leftover that startup removes), then removed on a
    /// blocking thread.
    pub async fn delete(&self, name: &str) -> StoreResult<()> {
        if self.resolve(name).is_none() {
            return Err(StoreError::NotFound(name.to_string()));
        }
        if self.active().0 == name {
            return Err(StoreError::Active(name.to_string()));
        }
        if self.is_builtin(name) {
            return Err(StoreError::Builtin(name.to_string()));
        }
        let dir = self.models_dir().join(name);
        let trash = self.models_dir().join(format!(".deleting-{name}-{}", crate::util::unique()));
        let models_dir = self.models_dir();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            std::fs::rename(&dir, &trash).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            crate::util::sync_dir(&models_dir).map_err(|e| anyhow::anyhow!("{}: {e}", models_dir.display()))?;
            std::fs::remove_dir_all(&trash).map_err(|e| anyhow::anyhow!("{}: {e}", trash.display()))?;
            Ok(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("deleting a model: {e}"))??;
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
