//! The data folder of one server: the embedded default, and a scaled-out process's cache.
//!
//! ```text
//! DATA_DIR/.lock              held by the one server using the folder
//! DATA_DIR/models/<name>/     packages made by jobs and class edits
//! DATA_DIR/active_model       the name of the active model
//! DATA_DIR/datasets/<id>/     uploaded image sets
//! DATA_DIR/jobs/<id>.json     jobs and their state
//! DATA_DIR/checkpoints/<job id>.checkpoint/   the last epoch of a fine-tuning job
//! DATA_DIR/checkpoints/<job id>.segment/      a segmentation's masks while it runs
//! DATA_DIR/results/<job id>/  a segmentation's masks, class fractions and gallery
//! DATA_DIR/tmp/               scratch files of requests in flight
//! ```
//! A process killed in the middle of a write leaves only dot-named leftovers next to what it
//! was writing (see [`crate::util::is_leftover`]) and scratch files under `tmp/`;
//! [`DataDir::open`] removes them, before anything opens the folders.

pub mod datasets;
pub mod index;
pub mod ingest;
pub mod jobs;
pub mod models;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Error, Result};

/// The data folder's layout.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
}

/// The exclusive lock on the data folder, held by the one server using it (released when
/// dropped, or when the process ends, however it ends): a second server on the same folder
/// would delete the first one's uploads in flight as leftovers, and both would write the same
/// job and index files.
#[derive(Debug)]
pub struct DataLock(#[allow(dead_code)] File);

const LOCK_FILE: &str = ".lock";

impl DataDir {
    /// Creates the folder and its parts, takes its lock (refusing when another server holds
    /// it), then removes what a killed process left half-written.
    pub fn open(root: &Path) -> Result<(Arc<Self>, DataLock)> {
        std::fs::create_dir_all(root).map_err(|e| Error::io(format!("creating {}", root.display()), e))?;
        let path = root.join(LOCK_FILE);
        let mut lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        if let Err(e) = lock.try_lock() {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(match e {
                std::fs::TryLockError::WouldBlock => Error::Conflict(format!(
                    "the data folder {} is in use by another picie server ({}); give each server its own --data-dir",
                    root.display(),
                    holder.trim()
                )),
                std::fs::TryLockError::Error(e) => Error::io(format!("locking {}", path.display()), e),
            });
        }
        lock.set_len(0)
            .and_then(|_| write!(lock, "process {}", std::process::id()))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        let dir = Self { root: root.to_path_buf() };
        for d in [dir.models(), dir.datasets(), dir.jobs(), dir.checkpoints(), dir.results(), dir.tmp()] {
            std::fs::create_dir_all(&d).map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
        }
        clean_leftovers(root);
        Ok((Arc::new(dir), DataLock(lock)))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn models(&self) -> PathBuf {
        self.root.join("models")
    }

    pub fn datasets(&self) -> PathBuf {
        self.root.join("datasets")
    }

    pub fn jobs(&self) -> PathBuf {
        self.root.join("jobs")
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn results(&self) -> PathBuf {
        self.root.join("results")
    }

    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn active_model_file(&self) -> PathBuf {
        self.root.join("active_model")
    }

    /// Moves a complete result folder to `results/<job>`, replacing one there
    /// ([`crate::util::replace_dir`]: the name never holds a mix).
    pub fn keep_results(&self, job: &str, dir: &Path) -> Result<PathBuf> {
        let dest = self.results().join(job);
        crate::util::replace_dir(dir, &dest).map_err(|e| Error::Internal(format!("{e:#}")))?;
        Ok(dest)
    }

    /// `results/<job>` if it is there.
    pub fn results_of(&self, job: &str) -> Option<PathBuf> {
        Some(self.results().join(job)).filter(|d| d.is_dir())
    }
}

/// Removes what a killed process left in `data_dir`: leftovers named as
/// [`crate::util::is_leftover`] describes in the data folder, `models/`, `checkpoints/`,
/// `results/`, `jobs/`, `datasets/` and each dataset's folder and `images/`, and everything under `tmp/`.
/// Nothing else is touched (the shipped models folder neither: other processes may read it).
/// Call it only with the folder's lock held, before the stores open. Returns the removed paths,
/// each also logged.
pub fn clean_leftovers(data_dir: &Path) -> Vec<PathBuf> {
    let mut folders = vec![data_dir.to_path_buf()];
    for sub in ["models", "checkpoints", "results", "jobs", "datasets"] {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_server_cannot_take_a_held_folder() {
        let root = tempfile::tempdir().unwrap();
        let (_, first) = DataDir::open(root.path()).unwrap();
        let e = DataDir::open(root.path()).unwrap_err().to_string();
        assert!(e.contains("in use by another picie server") && e.contains(&format!("process {}", std::process::id())), "{e}");
        drop(first);
        DataDir::open(root.path()).expect("free again once the first is gone");
    }
}
