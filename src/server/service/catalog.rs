//! The model catalogue: the versions a server can serve (the shipped packages of its read-only
//! models folder, and the versions stored by jobs and class edits), and the one it serves.
//!
//! A stored version shadows a shipped one of the same name: renaming the classes of a shipped
//! model writes an edited copy into the store and leaves the shipped folder as it is. Shipped
//! names are never deleted. Activation loads the new model fully, records it, then swaps it in:
//! a failed load leaves the served model as it was, and a restart serves what was recorded.
//! Requests already accepted keep the model they arrived under.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::error::{Error, Result};
use crate::infer::{DeviceChoice, Segmenter};
use crate::package::{Centroids, Manifest, Package, CENTROIDS_FILE, MANIFEST_FILE};
use crate::server::core::models::{ClassView, ClassesUpdate, ModelDetail, ModelSummary};
use crate::server::core::valid_name;
use crate::server::storage::{self, ModelStore};

pub struct Catalog {
    store: Arc<dyn ModelStore>,
    shipped: PathBuf,
    /// The shipped packages' names and manifests, read once: the folder is read-only.
    shipped_manifests: Vec<(String, Manifest)>,
    device: DeviceChoice,
    threads: Option<usize>,
    active: RwLock<Active>,
    /// Activations, deletions and class edits one at a time.
    edits: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Active {
    name: String,
    /// The stored revision it was loaded from (0 for a shipped package).
    revision: i64,
    segmenter: Arc<Segmenter>,
}

/// Where a version's package is on this machine.
struct Located {
    dir: PathBuf,
    revision: i64,
    stored: bool,
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("model `{name}` not found"))
}

async fn load(dir: PathBuf, name: &str, device: DeviceChoice, threads: Option<usize>) -> Result<Segmenter> {
    tokio::task::spawn_blocking(move || Segmenter::load(&dir, device, threads))
        .await
        .map_err(Error::internal)?
        .map_err(|e| Error::Conflict(format!("model `{name}` cannot be loaded: {e:#}")))
}

impl Catalog {
    /// Serves `requested` (`--model`), else the model last activated, else `default`. Scaled
    /// out, the model activated for every replica comes first: a replica serves what the others do.
    pub async fn open(
        store: Arc<dyn ModelStore>,
        shipped: &Path,
        requested: Option<&str>,
        device: DeviceChoice,
        threads: Option<usize>,
    ) -> Result<Self> {
        let recorded = store.active().await?;
        let name = if store.shared() { recorded.or(requested.map(str::to_string)) } else { requested.map(str::to_string).or(recorded) };
        let name = name.unwrap_or_else(|| "default".to_string());
        let shipped_manifests = {
            let dir = shipped.to_path_buf();
            tokio::task::spawn_blocking(move || shipped_manifests(&dir)).await.map_err(Error::internal)?
        };
        let located = Self::locate_in(&*store, shipped, &name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("model `{name}` not found in {} or among the stored versions", shipped.display())))?;
        let segmenter = load(located.dir, &name, device, threads).await?;
        Ok(Self {
            store,
            shipped: shipped.to_path_buf(),
            shipped_manifests,
            device,
            threads,
            active: RwLock::new(Active { name, revision: located.revision, segmenter: Arc::new(segmenter) }),
            edits: tokio::sync::Mutex::new(()),
        })
    }

    async fn locate_in(store: &dyn ModelStore, shipped: &Path, name: &str) -> Result<Option<Located>> {
        if !valid_name(name) {
            return Ok(None);
        }
        if let Some((dir, revision)) = store.local_copy(name).await? {
            return Ok(Some(Located { dir, revision, stored: true }));
        }
        let dir = shipped.join(name);
        Ok(tokio::fs::try_exists(dir.join(MANIFEST_FILE)).await.unwrap_or(false).then_some(Located { dir, revision: 0, stored: false }))
    }

    async fn locate(&self, name: &str) -> Result<Located> {
        Self::locate_in(&*self.store, &self.shipped, name).await?.ok_or_else(|| not_found(name))
    }

    /// The model serving now, and its name.
    pub fn active(&self) -> (String, Arc<Segmenter>) {
        let a = self.active.read().expect("model lock");
        (a.name.clone(), a.segmenter.clone())
    }

    fn is_shipped(&self, name: &str) -> bool {
        self.shipped_manifests.iter().any(|(n, _)| n == name)
    }

    /// Whether a version of that name exists (stored or shipped).
    pub async fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.is_shipped(name) || self.store.get(name).await?.is_some())
    }

    /// Every version: the stored ones and the shipped ones they do not shadow.
    pub async fn list(&self) -> Result<Vec<ModelSummary>> {
        let active = self.active().0;
        let mut out: Vec<ModelSummary> = self
            .store
            .list()
            .await?
            .iter()
            .map(|m| ModelSummary::of(&m.name, &m.manifest, m.name == active, self.is_shipped(&m.name)))
            .collect();
        for (name, manifest) in &self.shipped_manifests {
            if !out.iter().any(|m| &m.name == name) {
                out.push(ModelSummary::of(name, manifest, *name == active, true));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub async fn summary(&self, name: &str) -> Result<ModelSummary> {
        self.list().await?.into_iter().find(|m| m.name == name).ok_or_else(|| not_found(name))
    }

    /// A version's manifest and classes. Reads the manifest and the small centroids file (its
    /// checksum checked), not the network's weights: their checksums were checked when the
    /// package was loaded or fetched.
    pub async fn detail(&self, name: &str) -> Result<ModelDetail> {
        let located = self.locate(name).await?;
        let (manifest, centroids) = tokio::task::spawn_blocking(move || read_classes(&located.dir)).await.map_err(Error::internal)??;
        Ok(ModelDetail {
            name: name.to_string(),
            active: self.active().0 == name,
            builtin: self.is_shipped(name),
            manifest: serde_json::to_value(&manifest).map_err(Error::internal)?,
            classes: ClassView::all(&centroids),
        })
    }

    /// Loads `name` fully, records it as the active model, then swaps it in.
    pub async fn activate(&self, name: &str) -> Result<ModelSummary> {
        let _one = self.edits.lock().await;
        let located = self.locate(name).await?;
        let segmenter = load(located.dir, name, self.device, self.threads).await?;
        self.store.set_active(name).await?;
        *self.active.write().expect("model lock") =
            Active { name: name.to_string(), revision: located.revision, segmenter: Arc::new(segmenter) };
        tracing::info!(model = name, "model activated");
        drop(_one);
        self.summary(name).await
    }

    /// Deletes a stored version; never a shipped name or the active model.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let _one = self.edits.lock().await;
        if self.is_shipped(name) {
            return Err(Error::Conflict(format!("model `{name}` ships with the server and cannot be deleted")));
        }
        if self.active().0 == name {
            return Err(Error::Conflict(format!("model `{name}` is active; activate another first")));
        }
        Ok(self.store.delete(name).await?)
    }

    /// Renames classes and sets their colours: the package is written again with the new
    /// centroids file and published as a new revision (for a shipped model, as a stored copy).
    /// The active model serves the new names at once.
    pub async fn edit_classes(&self, name: &str, update: &ClassesUpdate) -> Result<ModelDetail> {
        let _one = self.edits.lock().await;
        let located = self.locate(name).await?;
        let staging = self.store.staging(name);
        let (update, from, to) = (update.clone(), located.dir.clone(), staging.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let pkg = Package::load(&from).map_err(|e| Error::Internal(format!("{e:#}")))?;
            let centroids = update.apply(&pkg.centroids).map_err(Error::Invalid)?;
            pkg.write_with_centroids(&to, &centroids).map(|_| ()).map_err(|e| Error::Internal(format!("{e:#}")))
        })
        .await
        .map_err(Error::internal)??;
        let replacing = located.stored.then_some(located.revision);
        self.store.publish(name, &staging, replacing, None).await?;
        if self.active().0 == name {
            let located = self.locate(name).await?;
            let segmenter = load(located.dir, name, self.device, self.threads).await?;
            *self.active.write().expect("model lock") =
                Active { name: name.to_string(), revision: located.revision, segmenter: Arc::new(segmenter) };
        }
        drop(_one);
        self.detail(name).await
    }

    /// The folder of `name`'s package on this machine (fetched first where needed), for a job.
    pub async fn package_dir(&self, name: &str) -> Result<PathBuf> {
        Ok(self.locate(name).await?.dir)
    }

    /// The package `name` if it is stored and was written by job `job` (a job resumed after it
    /// wrote its package, before it was marked done, finds its work here).
    pub async fn made_by_job(&self, name: &str, job: &str) -> Result<Option<Manifest>> {
        Ok(self.store.get(name).await?.map(|m| m.manifest).filter(|m| m.provenance.job.as_deref() == Some(job)))
    }

    /// Scaled out: follows the store. Loads and swaps in the model activated there (by any
    /// replica), or the active model's new revision (class edits), when it differs from this
    /// replica's.
    pub async fn sync(&self) -> Result<()> {
        let Some(name) = self.store.active().await? else { return Ok(()) };
        let current = self.active.read().expect("model lock").clone();
        let revision = self.store.get(&name).await?.map_or(0, |m| m.revision);
        if (current.name.as_str(), current.revision) == (name.as_str(), revision) {
            return Ok(());
        }
        let _one = self.edits.lock().await;
        let located = self.locate(&name).await?;
        let segmenter = load(located.dir, &name, self.device, self.threads).await?;
        *self.active.write().expect("model lock") =
            Active { name: name.clone(), revision: located.revision, segmenter: Arc::new(segmenter) };
        tracing::info!(model = %name, revision = located.revision, "following the model activated on another replica");
        Ok(())
    }

    /// Scaled out: a task that follows the store's changes for as long as the process runs.
    pub fn follow(self: &Arc<Self>) {
        if !self.store.shared() {
            return;
        }
        let this = Arc::downgrade(self);
        let store = self.store.clone();
        tokio::spawn(async move {
            loop {
                store.changed().await;
                let Some(catalog) = this.upgrade() else { return };
                if let Err(e) = catalog.sync().await {
                    tracing::warn!(error = %e, "cannot follow the shared model registry");
                }
            }
        });
    }
}

/// The manifests of the shipped packages (blocking).
fn shipped_manifests(dir: &Path) -> Vec<(String, Manifest)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok().filter(|n| valid_name(n))?;
            let manifest = storage::local::models::read_manifest(&e.path()).ok().flatten()?;
            Some((name, manifest))
        })
        .collect()
}

/// A package's manifest and centroids, the centroids checked against the manifest's checksum
/// (blocking).
fn read_classes(dir: &Path) -> Result<(Manifest, Centroids)> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let manifest = storage::local::models::read_manifest(dir)?.ok_or_else(|| not_found(&name))?;
    let path = dir.join(CENTROIDS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::Internal(format!("reading {}: {e}", path.display())))?;
    if manifest.sha256.get(CENTROIDS_FILE).is_some_and(|want| *want != crate::package::sha256_hex(&bytes)) {
        return Err(Error::Internal(format!("model `{name}`: {CENTROIDS_FILE} does not match its checksum")));
    }
    let centroids: Centroids =
        serde_json::from_slice(&bytes).map_err(|e| Error::Internal(format!("model `{name}`: {CENTROIDS_FILE}: {e}")))?;
    Ok((manifest, centroids))
}
