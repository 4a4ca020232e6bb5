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

use std::collections::{BTreeMap, HashMap};

use super::shared::models::{self as shared_models, DeleteOutcome, SharedModel};
use super::shared::{Shared, SharedError};
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
    /// The shared database or object store failed.
    #[error(transparent)]
    Shared(#[from] SharedError),
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
    /// Scaled out: the shared stores and what this replica knows of them.
    shared: Option<SharedModels>,
}

/// A replica's view of the shared model versions: the database's rows as last read, and which
/// revision of each package its data folder holds.
struct SharedModels {
    shared: Arc<Shared>,
    catalog: RwLock<BTreeMap<String, SharedModel>>,
    fetched: std::sync::Mutex<HashMap<String, i64>>,
    /// The revision of the package the active model was loaded from.
    active_revision: std::sync::Mutex<i64>,
    /// One download at a time.
    fetching: tokio::sync::Mutex<()>,
}

impl ModelRegistry {
    pub fn open(
        builtin_dir: &Path,
        data_dir: &Path,
        requested: Option<&str>,
        device: DeviceChoice,
        threads: Option<usize>,
    ) -> StoreResult<Self> {
        let models = data_dir.join("models");
        std::fs::create_dir_all(&models).map_err(|e| anyhow::anyhow!("creating {}: {e}", models.display()))?;
        let remembered = std::fs::read_to_string(data_dir.join("active_model")).ok().map(|s| s.trim().to_string());
        let name = requested.map(str::to_string).or(remembered).unwrap_or_else(|| "default".to_string());
        let dir = resolve_in(builtin_dir, data_dir, &name)
            .ok_or_else(|| anyhow::anyhow!("model `{name}` not found in {} or {}", builtin_dir.display(), models.display()))?;
        Self::serving(builtin_dir, data_dir, device, threads, name, &dir, None)
    }

    /// The registry serving `name`, loaded from `dir`.
    fn serving(
        builtin_dir: &Path,
        data_dir: &Path,
        device: DeviceChoice,
        threads: Option<usize>,
        name: String,
        dir: &Path,
        shared: Option<SharedModels>,
    ) -> StoreResult<Self> {
        let seg =
            Segmenter::load(dir, device, threads).map_err(|e| StoreError::Unloadable { name: name.clone(), reason: format!("{e:#}") })?;
        Ok(Self {
            builtin_dir: builtin_dir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            device,
            threads,
            active: RwLock::new((name, Arc::new(seg))),
            edit: tokio::sync::Mutex::new(()),
            shared,
        })
    }

    /// A replica of a scaled-out deployment: model versions come from the shared stores and are
    /// fetched into `data_dir/models` on first use. Serves the model activated in the database,
    /// else `requested`, else `default`. Call it from a blocking thread of the runtime.
    pub fn open_shared(
        builtin_dir: &Path,
        data_dir: &Path,
        requested: Option<&str>,
        device: DeviceChoice,
        threads: Option<usize>,
        shared: Arc<Shared>,
    ) -> StoreResult<Self> {
        let models = data_dir.join("models");
        std::fs::create_dir_all(&models).map_err(|e| anyhow::anyhow!("creating {}: {e}", models.display()))?;
        let catalog = super::shared::block_on(shared_models::list(&shared))?;
        let active = super::shared::block_on(shared_models::active(&shared))?;
        let sh = SharedModels {
            shared,
            catalog: RwLock::new(catalog),
            fetched: Default::default(),
            active_revision: std::sync::Mutex::new(0),
            fetching: tokio::sync::Mutex::new(()),
        };
        let name = active.map(|a| a.0).or(requested.map(str::to_string)).unwrap_or_else(|| "default".to_string());
        let (dir, revision) = super::shared::block_on(sh.ensure_local(builtin_dir, &models, &name))?;
        *sh.active_revision.lock().expect("revision lock") = revision;
        Self::serving(builtin_dir, data_dir, device, threads, name, &dir, Some(sh))
    }

    /// Scaled out: the folder holding `name`'s package on this replica, fetched from the object
    /// store when this replica has no copy or an older revision; and that revision (0 for a
    /// shipped package). Embedded: the package's folder.
    pub async fn ensure_local(&self, name: &str) -> StoreResult<(PathBuf, i64)> {
        match &self.shared {
            Some(sh) => sh.ensure_local(&self.builtin_dir, &self.models_dir(), name).await,
            None => self.resolve(name).map(|d| (d, 0)).ok_or_else(|| StoreError::NotFound(name.to_string())),
        }
    }

    /// Scaled out: reads the model versions from the database again.
    async fn refresh_catalog(&self) -> StoreResult<()> {
        match &self.shared {
            Some(sh) => sh.refresh_catalog().await,
            None => Ok(()),
        }
    }

    /// Scaled out: records a package this process wrote (a job's model, edited classes) in the
    /// shared stores, so every replica can fetch it. Embedded: nothing to do.
    pub async fn publish(&self, name: &str) -> StoreResult<()> {
        let Some(sh) = &self.shared else { return Ok(()) };
        let local = self.models_dir().join(name);
        let dir = if local.exists() { local } else { self.builtin_dir.join(name) };
        let revision = shared_models::publish(&sh.shared, name, &dir).await?;
        sh.fetched.lock().expect("fetched lock").insert(name.to_string(), revision);
        self.refresh_catalog().await?;
        if self.active().0 == name {
            // This replica already serves what it wrote; the others reload it.
            *sh.active_revision.lock().expect("revision lock") = revision;
        }
        Ok(())
    }

    /// [`ModelRegistry::publish`] from a blocking thread of the runtime (a job).
    pub fn publish_blocking(&self, name: &str) -> StoreResult<()> {
        if self.shared.is_none() {
            return Ok(());
        }
        super::shared::block_on(self.publish(name))
    }

    /// Scaled out: follows the database. Loads and swaps in the model activated there (by any
    /// replica) or rewritten there (new class names) since this replica last looked.
    pub async fn sync(&self) -> StoreResult<()> {
        let Some(sh) = &self.shared else { return Ok(()) };
        self.refresh_catalog().await?;
        let Some((name, revision)) = shared_models::active(&sh.shared).await? else { return Ok(()) };
        let current = (self.active().0, *sh.active_revision.lock().expect("revision lock"));
        if current == (name.clone(), revision) {
            return Ok(());
        }
        self.load_and_swap(&name).await?;
        tracing::info!(model = %name, revision, "following the model activated on another replica");
        Ok(())
    }

    /// Fetches (scaled out), loads fully, then swaps in; a failed load keeps the active model.
    async fn load_and_swap(&self, name: &str) -> StoreResult<()> {
        let (dir, revision) = self.ensure_local(name).await?;
        let (device, threads) = (self.device, self.threads);
        let seg = tokio::task::spawn_blocking(move || Segmenter::load(&dir, device, threads))
            .await
            .map_err(|e| anyhow::anyhow!("loading a model: {e}"))?
            .map_err(|e| StoreError::Unloadable { name: name.to_string(), reason: format!("{e:#}") })?;
        *self.active.write().expect("model lock") = (name.to_string(), Arc::new(seg));
        if let Some(sh) = &self.shared {
            *sh.active_revision.lock().expect("revision lock") = revision;
        }
        Ok(())
    }

    pub fn active(&self) -> (String, Arc<Segmenter>) {
        let g = self.active.read().expect("model lock");
        (g.0.clone(), g.1.clone())
    }

    /// The folder of model `name`, jobs' models first. Scaled out, a model known to the database
    /// may not have been fetched yet: [`ModelRegistry::ensure_local`] fetches it.
    pub fn resolve(&self, name: &str) -> Option<PathBuf> {
        if let Some(sh) = &self.shared {
            if valid_name(name) && sh.catalog.read().expect("catalog lock").contains_key(name) {
                return Some(self.models_dir().join(name));
            }
            let builtin = self.builtin_dir.join(name);
            return (valid_name(name) && builtin.join(crate::package::MANIFEST_FILE).exists()).then_some(builtin);
        }
        resolve_in(&self.builtin_dir, &self.data_dir, name)
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        if let Some(sh) = &self.shared {
            return !sh.catalog.read().expect("catalog lock").contains_key(name) && self.builtin_dir.join(name).exists();
        }
        !self.data_dir.join("models").join(name).exists() && self.builtin_dir.join(name).exists()
    }

    pub fn models_dir(&self) -> PathBuf {
        self.data_dir.join("models")
    }

    pub fn list(&self) -> Vec<ModelSummary> {
        let active = self.active().0;
        let dirs = if self.shared.is_some() { vec![self.builtin_dir.clone()] } else { vec![self.builtin_dir.clone(), self.models_dir()] };
        let mut names: Vec<String> = dirs
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| valid_name(n))
            .collect();
        if let Some(sh) = &self.shared {
            names.extend(sh.catalog.read().expect("catalog lock").keys().cloned());
        }
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
        if let Some(m) = self.shared.as_ref().and_then(|sh| sh.catalog.read().expect("catalog lock").get(name).map(|m| m.manifest.clone()))
        {
            return Ok(m);
        }
        let dir = self.resolve(name).ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        let path = dir.join(crate::package::MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| StoreError::Unloadable { name: name.to_string(), reason: format!("{}: {e}", path.display()) })
    }

    /// Loads and checks a package (reads and hashes every file: call it off the async runtime,
    /// or use [`ModelRegistry::package_blocking`]).
    pub fn package(&self, name: &str) -> StoreResult<Package> {
        let dir = match self.shared {
            Some(_) => super::shared::block_on(self.ensure_local(name))?.0,
            None => self.resolve(name).ok_or_else(|| StoreError::NotFound(name.to_string()))?,
        };
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
        if self.shared.is_some() {
            // Written by this job on a worker that died before the job was marked done
            // (`ensure_local` reads the database again for a name this replica does not know).
            let dir = super::shared::block_on(self.ensure_local(name)).ok()?.0;
            let pkg = Package::load(&dir).ok()?;
            return pkg.manifest.provenance.command.ends_with(&format!("(job {job_id})")).then_some(pkg);
        }
        let pkg = Package::load(&self.models_dir().join(name)).ok()?;
        pkg.manifest.provenance.command.ends_with(&format!("(job {job_id})")).then_some(pkg)
    }

    /// Loads `name` fully, then swaps it in. Requests already accepted keep the old model; a
    /// failed load leaves the active model as it was.
    pub async fn activate(&self, name: &str) -> StoreResult<()> {
        if let Some(sh) = &self.shared {
            // Every replica follows within its sync interval ([`ModelRegistry::sync`]).
            self.load_and_swap(name).await?;
            shared_models::set_active(&sh.shared, name).await?;
            tracing::info!(model = name, "model activated for every replica");
            return Ok(());
        }
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
        if let Some(sh) = &self.shared {
            match shared_models::delete(&sh.shared, name).await? {
                DeleteOutcome::Deleted => {}
                DeleteOutcome::NotFound => return Err(StoreError::NotFound(name.to_string())),
                DeleteOutcome::Active => return Err(StoreError::Active(name.to_string())),
            }
            sh.catalog.write().expect("catalog lock").remove(name);
            sh.fetched.lock().expect("fetched lock").remove(name);
            if !self.models_dir().join(name).exists() {
                return Ok(());
            }
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

impl SharedModels {
    async fn refresh_catalog(&self) -> StoreResult<()> {
        let catalog = shared_models::list(&self.shared).await?;
        *self.catalog.write().expect("catalog lock") = catalog;
        Ok(())
    }

    async fn ensure_local(&self, builtin_dir: &Path, models_dir: &Path, name: &str) -> StoreResult<(PathBuf, i64)> {
        if !valid_name(name) {
            return Err(StoreError::NotFound(name.to_string()));
        }
        let known = |this: &Self| this.catalog.read().expect("catalog lock").get(name).map(|m| m.revision);
        let mut revision = known(self);
        if revision.is_none() {
            // Maybe made a moment ago on another replica.
            self.refresh_catalog().await?;
            revision = known(self);
        }
        let Some(revision) = revision else {
            let builtin = builtin_dir.join(name);
            return if builtin.join(crate::package::MANIFEST_FILE).exists() {
                Ok((builtin, 0))
            } else {
                Err(StoreError::NotFound(name.to_string()))
            };
        };
        let dir = models_dir.join(name);
        let _one = self.fetching.lock().await;
        if self.fetched.lock().expect("fetched lock").get(name) == Some(&revision) && dir.exists() {
            return Ok((dir, revision));
        }
        shared_models::fetch(&self.shared, name, &dir).await?;
        self.fetched.lock().expect("fetched lock").insert(name.to_string(), revision);
        tracing::info!(model = name, revision, "model fetched from the shared store");
        Ok((dir, revision))
    }
}

/// The folder of model `name`, jobs' models before shipped ones.
fn resolve_in(builtin_dir: &Path, data_dir: &Path, name: &str) -> Option<PathBuf> {
    if !valid_name(name) {
        return None;
    }
    [data_dir.join("models").join(name), builtin_dir.join(name)].into_iter().find(|p| p.join(crate::package::MANIFEST_FILE).exists())
}
