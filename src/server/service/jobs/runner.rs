//! What jobs run: re-clustering, fine-tuning and segmentation, each as async fetch (the
//! dataset's images and the source model, onto this machine), blocking compute, async publish
//! (a model version, or a segmentation's results).
//!
//! Jobs have a thread budget of their own (`--job-threads`), apart from the inference
//! thread's: the compute runs inside a dedicated rayon pool of that many threads (burn's Flex
//! backend, its gemm and our k-means all parallelise on the current rayon pool), and the ONNX
//! Runtime sessions a job creates use that many intra-op threads on the server's `--device`.

use std::path::PathBuf;
use std::sync::Arc;

use crate::infer::{DeviceChoice, EmbedSession, Quality, Refinement, Segmenter};
use crate::masks::SetImage;
use crate::package::Package;
use crate::server::core::jobs::{Job, JobReport, JobSpec, JobStage, Standing};
use crate::server::core::Page;
use crate::server::storage::{DatasetStore, JobStore, Lease, ModelStore};
use crate::train::cluster::KChoice;
use crate::train::packaging::recluster_package;
use crate::train::packaging::SessionSettings;
use crate::train::pipeline::{train_with, TrainArgs, TrainInit};

use super::super::catalog::Catalog;

/// Where jobs run (the server's device and the jobs' thread budget), and how segmentations
/// refine their masks unless they ask otherwise (the server's `--quality` and its settings).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JobSettings {
    pub device: DeviceChoice,
    /// Threads of the jobs' rayon pool and of their ONNX Runtime sessions (at least 1).
    pub threads: usize,
    pub quality: Quality,
    pub refine: Refinement,
}

/// A running job's view of its lease: progress out, cancel in.
#[derive(Clone)]
pub struct JobContext {
    lease: Arc<Box<dyn Lease>>,
}

impl JobContext {
    pub fn new(lease: Arc<Box<dyn Lease>>) -> Self {
        Self { lease }
    }

    pub fn report(&self, standing: Standing) {
        self.lease.report(standing);
    }

    pub fn canceled(&self) -> bool {
        self.lease.stop_requested()
    }
}

pub struct Runner {
    pub(super) catalog: Arc<Catalog>,
    pub(super) models: Arc<dyn ModelStore>,
    pub(super) datasets: Arc<dyn DatasetStore>,
    pub(super) jobs: Arc<dyn JobStore>,
    /// Where fine-tuning jobs keep their last epoch (`<job id>.checkpoint` in it).
    pub(super) checkpoints: PathBuf,
    pub(super) settings: JobSettings,
    pool: Arc<rayon::ThreadPool>,
}

impl Runner {
    pub fn new(
        catalog: Arc<Catalog>,
        models: Arc<dyn ModelStore>,
        datasets: Arc<dyn DatasetStore>,
        jobs: Arc<dyn JobStore>,
        checkpoints: PathBuf,
        settings: JobSettings,
    ) -> std::io::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(settings.threads.max(1))
            .thread_name(|i| format!("picie-job-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        tracing::info!(threads = settings.threads, device = %settings.device, "job thread pool ready");
        Ok(Self { catalog, models, datasets, jobs, checkpoints, settings, pool: Arc::new(pool) })
    }

    /// Runs the job's body; the error is the job's error message.
    pub async fn run(&self, job: &Job, ctx: JobContext) -> Result<JobReport, String> {
        ctx.report(Standing::at(JobStage::Loading, 0.0));
        if !job.spec.writes_model() {
            return self.segment(job, ctx).await.map(|report| JobReport {
                job_threads: self.settings.threads,
                session_threads: self.settings.threads,
                ..report
            });
        }
        let name = job.model_name();
        if let Some(manifest) = self.catalog.made_by_job(&name, &job.id).await.map_err(|e| e.to_string())? {
            // The job wrote its model before it was interrupted: resuming it reports that.
            tracing::info!(job = %job.id, model = %name, "the job's package was already written");
            self.drop_checkpoint(job).await;
            return Ok(JobReport { model: name, k: manifest.k, recovered: true, ..Default::default() });
        }
        let images = self.datasets.local_images(job.spec.dataset()).await.map_err(|e| e.to_string())?;
        let source = self.catalog.package_dir(&job.source_model).await.map_err(|e| e.to_string())?;
        let staging = self.models.staging(&name);
        let mut report = match &job.spec {
            JobSpec::Recluster { .. } => self.recluster(job, &name, images, source, staging.clone(), ctx.clone()).await,
            JobSpec::Finetune { .. } => self.finetune(job, &name, images, source, staging.clone(), ctx.clone()).await,
            JobSpec::Segment { .. } => unreachable!("a segmentation writes no model"),
        }
        .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&staging);
        })?;
        ctx.report(Standing::at(JobStage::Publishing, 0.97));
        self.models.publish(&name, &staging, None, Some(&job.id)).await.map_err(|e| e.to_string())?;
        if matches!(job.spec, JobSpec::Finetune { .. }) {
            self.drop_checkpoint(job).await;
        }
        report.job_threads = self.settings.threads;
        report.session_threads = self.settings.threads;
        Ok(report)
    }

    /// Runs blocking work in the job's pool, off the runtime.
    async fn compute<T: Send + 'static>(&self, work: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> Result<T, String> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || pool.install(work))
            .await
            .map_err(|e| format!("the job's thread failed: {e}"))?
            .map_err(|e| format!("{e:#}"))
    }

    async fn recluster(
        &self,
        job: &Job,
        name: &str,
        images: Vec<PathBuf>,
        source: PathBuf,
        out: PathBuf,
        ctx: JobContext,
    ) -> Result<JobReport, String> {
        let JobSpec::Recluster { seed, dataset, .. } = job.spec.clone() else { unreachable!("a recluster spec") };
        let over_cluster = job.spec.over_cluster();
        let choice = job.spec.k_choice()?;
        let (settings, name, id) = (self.settings, name.to_string(), job.id.clone());
        self.compute(move || {
            let source = Package::load(&source)?;
            // A session of the job's own, even for the active model: the inference thread's
            // session has its own threads, and sharing it would take them from /segment.
            let session = EmbedSession::load(&source.onnx_path(), settings.device, Some(settings.threads))?;
            let seed = seed.unwrap_or(0);
            let k = match choice {
                KChoice::Fixed(k) => k.to_string(),
                KChoice::Suggest { min, max } => format!("suggested from {min}-{max}"),
            };
            let command = format!("recluster dataset={dataset} k={k} seed={seed} over_cluster={over_cluster} (job {id})");
            // With K to suggest, the fits at each K take about as long as the embedding.
            let embedding_share = if matches!(choice, KChoice::Fixed(_)) { 0.9 } else { 0.5 };
            let progress = ctx.clone();
            let made = recluster_package(
                &source,
                &session,
                &images,
                choice,
                seed,
                over_cluster,
                &out,
                &name,
                &command,
                Some(&id),
                |done, total| {
                    progress.report(Standing::at(JobStage::Embedding, embedding_share * done as f64 / total.max(1) as f64));
                    !progress.canceled()
                },
                |done, total| {
                    ctx.report(Standing::at(
                        JobStage::Suggesting,
                        embedding_share + (0.9 - embedding_share) * done as f64 / total.max(1) as f64,
                    ));
                    !ctx.canceled()
                },
            )?;
            let Some((pkg, report)) = made else { anyhow::bail!("canceled") };
            Ok(JobReport {
                model: name,
                k: pkg.manifest.k,
                images_used: Some(report.images_used),
                skipped: Some(report.skipped),
                vectors: Some(report.vectors),
                vectors_seen: Some(report.vectors_seen),
                k_scores: report.suggestion.map(|s| s.scores),
                provider: Some(session.provider().as_str().to_string()),
                ..Default::default()
            })
        })
        .await
    }

    async fn finetune(
        &self,
        job: &Job,
        name: &str,
        images: Vec<PathBuf>,
        source: PathBuf,
        out: PathBuf,
        ctx: JobContext,
    ) -> Result<JobReport, String> {
        let checkpoint = self.checkpoint(&job.id);
        if !tokio::fs::try_exists(&checkpoint).await.unwrap_or(false) {
            // A worker taking over a job continues from the last epoch another one saved.
            match self.jobs.fetch_checkpoint(&job.id, &checkpoint).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(job = %job.id, files = n, "continuing from the checkpoint in the shared store"),
                Err(e) => tracing::warn!(job = %job.id, error = %e, "cannot fetch the job's checkpoint; starting over"),
            }
        }
        let config = job.spec.finetune_config().expect("a finetune spec");
        let args = TrainArgs {
            images,
            out,
            init: TrainInit::Package(source),
            config,
            package_k: match &job.spec {
                JobSpec::Finetune { package_k, .. } => *package_k,
                _ => None,
            },
            package_over_cluster: job.spec.over_cluster(),
            // Kept when the job fails or the process dies, so that a resumed job continues from
            // its last epoch; removed once the package is published or the job canceled.
            checkpoint: checkpoint.clone(),
            resume: true,
            name: name.to_string(),
            replace: false,
            command: format!("finetune dataset={} (job {})", job.spec.dataset(), job.id),
            self_train: job.spec.self_train(),
            job: Some(job.id.clone()),
            snapshots: vec![],
        };
        // Each finished epoch's checkpoint goes to the store (scaled out) from an async task,
        // while the next epoch trains.
        let (saved_tx, mut saved_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let uploader = {
            let (jobs, id, dir) = (self.jobs.clone(), job.id.clone(), checkpoint.clone());
            tokio::spawn(async move {
                while saved_rx.recv().await.is_some() {
                    if let Err(e) = jobs.save_checkpoint(&id, &dir).await {
                        tracing::warn!(job = %id, error = %e, "cannot save the checkpoint to the shared store");
                    }
                }
            })
        };
        let (sessions, picie_epochs, all_epochs) = (
            SessionSettings { device: self.settings.device, threads: Some(self.settings.threads) },
            args.config.epochs,
            args.config.epochs + args.self_train.as_ref().map_or(0, |s| s.epochs),
        );
        let outcome = self
            .compute(move || {
                let mut last_epoch = None;
                train_with(&args, sessions, &mut |p| {
                    // A new epoch began: the last one's checkpoint is complete on disk.
                    let epoch = (p.phase.self_training(), p.epoch);
                    if last_epoch.is_some_and(|e| e != epoch) {
                        let _ = saved_tx.send(());
                    }
                    last_epoch = Some(epoch);
                    let (done, epochs) = if p.phase.self_training() {
                        (picie_epochs as f64 + p.fraction() * (all_epochs - picie_epochs) as f64, all_epochs - picie_epochs)
                    } else {
                        (p.fraction() * picie_epochs as f64, picie_epochs)
                    };
                    ctx.report(Standing {
                        stage: p.phase.into(),
                        epoch: Some(p.epoch + 1),
                        epochs: Some(epochs),
                        progress: (0.95 * done / all_epochs.max(1) as f64).clamp(0.0, 1.0),
                    });
                    !ctx.canceled()
                })
            })
            .await;
        let _ = uploader.await;
        match outcome? {
            Some((pkg, _)) => Ok(JobReport {
                model: pkg.manifest.name.clone(),
                k: pkg.manifest.k,
                epochs: Some(picie_epochs),
                epoch_losses: pkg.manifest.provenance.details.get("epoch_losses").and_then(|v| serde_json::from_value(v.clone()).ok()),
                ..Default::default()
            }),
            None => {
                // A canceled job cannot be resumed: its checkpoint is of no more use.
                self.drop_checkpoint(job).await;
                Err("canceled".into())
            }
        }
    }

    /// A segmentation: every image's mask into a work folder kept when the job fails or the
    /// process dies (`<checkpoints>/<job id>.segment/`, so a resumed job segments only the images
    /// it had not), then the fraction table and the gallery from the masks, then the folder saved
    /// as the job's results.
    async fn segment(&self, job: &Job, ctx: JobContext) -> Result<JobReport, String> {
        let JobSpec::Segment { dataset, quality, .. } = job.spec.clone() else { unreachable!("a segment spec") };
        let quality = quality.unwrap_or(self.settings.quality);
        let images = self.set_images(&dataset).await?;
        let source = self.catalog.package_dir(&job.source_model).await.map_err(|e| e.to_string())?;
        let work = self.checkpoints.join(format!("{}.segment", job.id));
        let (settings, model, out, progress) = (self.settings, job.source_model.clone(), work.clone(), ctx.clone());
        let outcome = self
            .compute(move || {
                // A session of the job's own (see `recluster`).
                let seg = Segmenter::load(&source, settings.device, Some(settings.threads))?;
                let segmented = crate::masks::segment_images(&seg, &images, quality, &settings.refine, &out, |done, total| {
                    progress.report(Standing::at(JobStage::Segmenting, 0.9 * done as f64 / total.max(1) as f64));
                    !progress.canceled()
                })?;
                let Some(segmented) = segmented else { return Ok(None) };
                let results = crate::masks::write_results(&seg, &images, &out, quality, &settings.refine, |done, total| {
                    progress.report(Standing::at(JobStage::Summarizing, 0.9 + 0.07 * done as f64 / total.max(1) as f64));
                    !progress.canceled()
                })?;
                let Some(results) = results else { return Ok(None) };
                Ok(Some(JobReport {
                    model,
                    k: seg.k(),
                    quality: Some(quality),
                    images_used: Some(segmented.segmented + segmented.kept),
                    skipped: Some(segmented.skipped),
                    masks: Some(results.masks),
                    shares: Some(results.shares),
                    provider: Some(seg.provider().as_str().to_string()),
                    ..Default::default()
                }))
            })
            .await?;
        let Some(report) = outcome else {
            // A canceled job cannot be resumed: its masks are of no more use.
            let _ = tokio::fs::remove_dir_all(&work).await;
            return Err("canceled".into());
        };
        ctx.report(Standing::at(JobStage::Publishing, 0.97));
        self.jobs.save_results(&job.id, &work).await.map_err(|e| e.to_string())?;
        Ok(report)
    }

    /// A dataset's images on this machine with the names they were uploaded under, and the keys
    /// that name their masks.
    async fn set_images(&self, dataset: &str) -> Result<Vec<SetImage>, String> {
        let files = self.datasets.local_images(dataset).await.map_err(|e| e.to_string())?;
        let mut entries = Vec::with_capacity(files.len());
        loop {
            let page = Page { offset: entries.len(), limit: Page::MAX_LIMIT };
            let more = self.datasets.images(dataset, page).await.map_err(|e| e.to_string())?;
            let last = more.len() < Page::MAX_LIMIT;
            entries.extend(more);
            if last {
                break;
            }
        }
        let names: std::collections::HashMap<&str, (&str, &str)> =
            entries.iter().map(|e| (e.file.as_str(), (e.original_name.as_str(), e.sha256.as_str()))).collect();
        let named: Vec<(PathBuf, String, String)> = files
            .into_iter()
            .map(|path| {
                let file = path.file_name().and_then(|f| f.to_str()).unwrap_or_default();
                let (name, hash) = names.get(file).map_or((file.to_string(), file.to_string()), |(n, h)| (n.to_string(), h.to_string()));
                (path, name, hash)
            })
            .collect();
        let keys = crate::masks::keys_for(&named.iter().map(|(_, n, h)| (n.clone(), h.clone())).collect::<Vec<_>>());
        Ok(named.into_iter().zip(keys).map(|((path, name, _), key)| SetImage { path, name, key }).collect())
    }

    fn checkpoint(&self, job: &str) -> PathBuf {
        self.checkpoints.join(format!("{job}.checkpoint"))
    }

    /// Removes a fine-tuning job's checkpoint, here and in the store.
    async fn drop_checkpoint(&self, job: &Job) {
        let _ = tokio::fs::remove_dir_all(self.checkpoint(&job.id)).await;
        if let Err(e) = self.jobs.drop_checkpoint(&job.id).await {
            tracing::warn!(job = %job.id, error = %e, "cannot remove the job's checkpoint from the store");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::DeviceChoice;
    use crate::server::core::jobs::JobState;
    use crate::server::storage::local::datasets::LocalDatasets;
    use crate::server::storage::local::jobs::LocalJobs;
    use crate::server::storage::local::models::LocalModels;
    use crate::server::storage::local::DataDir;

    fn noise_png(seed: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(96, 64, |x, y| {
            let v = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ seed.wrapping_mul(97)) as u8;
            image::Rgb([v, v.wrapping_add(seed as u8), x as u8])
        });
        let mut out = vec![];
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    fn settings() -> JobSettings {
        JobSettings { device: DeviceChoice::Cpu, threads: 1, quality: Quality::Fast, refine: Refinement::default() }
    }

    /// Runs one recluster job with these settings, the model served on the CPU with 2 threads.
    async fn recluster_with(settings: JobSettings) -> Job {
        use std::io::Write;
        let data = tempfile::tempdir().unwrap();
        let (dir, _lock) = DataDir::open(data.path()).unwrap();
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let models: Arc<dyn ModelStore> = Arc::new(LocalModels::new(dir.clone()));
        let catalog = Arc::new(Catalog::open(models.clone(), &shipped, None, DeviceChoice::Cpu, Some(2)).await.unwrap());
        let datasets: Arc<dyn DatasetStore> = Arc::new(Arc::new(LocalDatasets::new(dir.clone(), Default::default())));
        let jobs: Arc<dyn JobStore> = Arc::new(LocalJobs::open(&dir).await.unwrap());
        let ds = datasets.create("noise").await.unwrap();
        let mut uploads = vec![];
        for i in 0..3 {
            let (u, mut f) = datasets.new_upload(format!("n{i}.png")).await.unwrap();
            f.write_all(&noise_png(i)).unwrap();
            uploads.push(u);
        }
        datasets.add(&ds.id, uploads).await.unwrap();
        let runner = Runner::new(catalog, models, datasets, jobs.clone(), dir.checkpoints(), settings).unwrap();
        let executor = super::super::start_executor(jobs.clone(), Arc::new(runner));
        let spec =
            JobSpec::Recluster { dataset: ds.id.clone(), k: Some(3), k_min: None, k_max: None, seed: None, over_cluster: None, name: None };
        let id = jobs.submit(Job::new(spec, "default".into())).await.unwrap().id;
        let mut changes = jobs.changes();
        let job = loop {
            let job = jobs.get(&id).await.unwrap();
            if job.state.is_terminal() {
                break job;
            }
            tokio::time::timeout(std::time::Duration::from_secs(120), changes.recv()).await.expect("the job ends").unwrap();
        };
        executor.abort();
        job
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_on_their_own_pool_with_the_servers_settings() {
        // The rayon pool the job ran in has the job threads, whatever the global pool has.
        for threads in [1, 3] {
            let job = recluster_with(JobSettings { device: DeviceChoice::Cpu, threads, ..settings() }).await;
            assert_eq!(job.state, JobState::Succeeded, "{job:?}");
            let r = job.result.unwrap();
            assert_eq!((r.job_threads, r.session_threads), (threads, threads), "{r:?}");
            assert_eq!(r.provider.as_deref(), Some("cpu"));
            assert_eq!(r.vectors_seen, r.vectors.map(|v| v as u64), "3 small images are under the sample cap: {r:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recluster_job_uses_the_servers_device() {
        // The server's model runs on the CPU, but the job was told CUDA: its session must ask
        // for CUDA (not fall back to `auto`), which on a CPU-only ONNX Runtime fails loudly.
        let job = recluster_with(JobSettings { device: DeviceChoice::Cuda(0), threads: 1, ..settings() }).await;
        match job.state {
            JobState::Failed => {
                let e = job.error.unwrap_or_default();
                assert!(e.contains("CUDA execution provider (device 0) failed to register"), "{e}");
            }
            JobState::Succeeded => assert_eq!(job.result.unwrap().provider.as_deref(), Some("cuda")),
            other => panic!("job ended {other:?}"),
        }
    }
}
