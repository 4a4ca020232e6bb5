//! A segmentation's results as the API serves them: the archive of its masks (written while it
//! is sent, by a blocking task feeding the response through a bounded channel), its gallery and
//! the gallery's crops. The classes are named as the model names them now, so names given after
//! the job ran are in what is downloaded.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;

use super::Jobs;
use crate::masks::archive::{write_archive, ArchiveClass, ChunkSender};
use crate::masks::gallery::{self, Gallery};
use crate::server::core::jobs::{Job, JobState};
use crate::server::service::error::{Error, Result};

/// Archives written at once: each holds a blocking thread for as long as its client reads.
pub const MAX_ARCHIVES: usize = 4;
/// The archive's pieces on their way to the client: chunks of this size, this many queued.
const CHUNK: usize = 256 << 10;
const QUEUED_CHUNKS: usize = 4;
/// A client that reads nothing for this long loses its download (and its archive slot).
pub const STALL: Duration = Duration::from_secs(60);

/// The slots of the archives being written.
pub type ArchiveSlots = Arc<tokio::sync::Semaphore>;

impl Jobs {
    /// The results folder of a succeeded segmentation; NotFound for a job of another kind,
    /// Conflict while it has not succeeded.
    async fn results(&self, id: &str) -> Result<(Job, PathBuf)> {
        let job = self.store.get(id).await?;
        if job.spec.writes_model() {
            return Err(Error::NotFound(format!("job `{id}` is not a segmentation: it has no masks")));
        }
        if job.state != JobState::Succeeded {
            return Err(Error::Conflict(format!("job `{id}` is {}: its masks are ready once it has succeeded", job.state.as_str())));
        }
        let dir = self.store.local_results(id).await?;
        Ok((job, dir))
    }

    /// The classes of the model that segmented the set, as named now; as named when the set was
    /// segmented if that model is gone.
    async fn classes_now(&self, job: &Job, gallery: &Gallery) -> Vec<ArchiveClass> {
        match self.catalog.detail(&job.source_model).await {
            Ok(detail) if detail.classes.len() == gallery.classes.len() => {
                detail.classes.into_iter().map(|c| ArchiveClass { index: c.index, name: c.name, color: c.color }).collect()
            }
            _ => gallery.classes.iter().map(|c| ArchiveClass { index: c.class, name: c.name.clone(), color: c.color }).collect(),
        }
    }

    async fn stored_gallery(dir: &std::path::Path) -> Result<Gallery> {
        let path = dir.join(gallery::INDEX_FILE);
        let bytes = tokio::fs::read(&path).await.map_err(|e| Error::Internal(format!("reading {}: {e}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Internal(format!("{}: {e}", path.display())))
    }

    /// The gallery of a segmented set, its classes named as they are now.
    pub async fn gallery(&self, id: &str) -> Result<Gallery> {
        let (job, dir) = self.results(id).await?;
        let mut gallery = Self::stored_gallery(&dir).await?;
        let now = self.classes_now(&job, &gallery).await;
        for (class, now) in gallery.classes.iter_mut().zip(now) {
            (class.name, class.color) = (now.name, now.color);
        }
        Ok(gallery)
    }

    /// One crop of a segmented set's gallery (JPEG).
    pub async fn gallery_crop(&self, id: &str, file: &str) -> Result<Vec<u8>> {
        if !gallery::is_crop_name(file) {
            return Err(Error::NotFound(format!("`{file}` is not a crop of a gallery (class-<class>-<rank>.jpg)")));
        }
        let (_, dir) = self.results(id).await?;
        let path = dir.join(gallery::CROPS_DIR).join(file);
        tokio::fs::read(&path).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(format!("the gallery of job `{id}` has no `{file}`")),
            _ => Error::Internal(format!("reading {}: {e}", path.display())),
        })
    }

    /// The archive of a segmented set's masks, as a stream of chunks written while it is read.
    /// Busy when [`MAX_ARCHIVES`] are being written.
    pub async fn archive(&self, id: &str) -> Result<impl Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static> {
        let permit = self.archives.clone().try_acquire_owned().map_err(|_| Error::Busy {
            message: format!("{MAX_ARCHIVES} archives are being downloaded; try again shortly"),
            retry_after: 5,
        })?;
        let (job, dir) = self.results(id).await?;
        let classes = self.classes_now(&job, &Self::stored_gallery(&dir).await?).await;
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUED_CHUNKS);
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let _slot = permit;
            let mut out = ChunkSender::new(tx, CHUNK, STALL);
            match write_archive(&dir, &classes, &mut out) {
                Ok(()) => drop(out),
                Err(e) => {
                    tracing::warn!(job = %id, error = %format!("{e:#}"), "an archive download ended early");
                    out.fail(&e);
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}
