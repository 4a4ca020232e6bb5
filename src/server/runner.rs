//! What background jobs run: re-clustering and fine-tuning, on the blocking job thread.
//!
//! Jobs have a thread budget of their own (`--job-threads`), apart from the inference
//! worker's: every job body runs inside a dedicated rayon pool of that many threads (burn's
//! Flex backend, its gemm and our k-means all parallelise on the current rayon pool), and the
//! ONNX Runtime sessions a job creates use that many intra-op threads on the server's
//! `--device`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::infer::{DeviceChoice, EmbedSession};
use crate::train::cluster::recluster_package;
use crate::train::kmeans::KMeansConfig;
use crate::train::packaging::SessionSettings;

use super::config::ServeConfig;
use super::datasets::{DatasetStore, Datasets};
use super::jobs::{self, JobSpec, Runner};
use super::shared::Shared;
use super::store::ModelRegistry;

/// Where jobs run: the server's device and the jobs' thread budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobSettings {
    pub device: DeviceChoice,
    /// Threads of the jobs' rayon pool and of their ONNX Runtime sessions (at least 1).
    pub threads: usize,
}

impl JobSettings {
    pub fn from_config(cfg: &ServeConfig) -> Self {
        Self { device: cfg.device, threads: cfg.job_threads.max(1) }
    }

    fn sessions(&self) -> SessionSettings {
        SessionSettings { device: self.device, threads: Some(self.threads) }
    }
}

/// The embedded server's jobs: models, datasets and checkpoints in the data folder.
pub fn job_runner(
    models: Arc<ModelRegistry>,
    datasets: Arc<DatasetStore>,
    checkpoints: PathBuf,
    settings: JobSettings,
) -> anyhow::Result<Runner> {
    runner_for(models, Datasets::Embedded(datasets), checkpoints, settings, None)
}

/// Jobs over these stores. Scaled out (`shared`), a job fetches its dataset's images and source
/// package first, publishes the package it writes, and keeps a fine-tuning job's checkpoint in
/// the object store after every epoch, so a worker that takes over continues from it.
pub fn runner_for(
    models: Arc<ModelRegistry>,
    datasets: Datasets,
    checkpoints: PathBuf,
    settings: JobSettings,
    shared: Option<Arc<Shared>>,
) -> anyhow::Result<Runner> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(settings.threads.max(1))
        .thread_name(|i| format!("picie-job-{i}"))
        .build()
        .context("starting the job threads")?;
    tracing::info!(threads = settings.threads, device = ?settings.device, "job thread pool ready");
    Ok(Arc::new(move |job: &jobs::Job, ctx: &jobs::JobContext| {
        // The job body runs on a rayon thread; scaled out it reaches the shared stores through
        // the Tokio runtime the job was started from.
        let runtime = tokio::runtime::Handle::try_current().ok();
        pool.install(|| {
            let _runtime = runtime.as_ref().map(|h| h.enter());
            let mut result = run_job(&models, &datasets, &checkpoints, settings, shared.as_deref(), job, ctx)?;
            // What the job actually ran on: the pool it was given.
            result["job_threads"] = serde_json::json!(rayon::current_num_threads());
            Ok(result)
        })
    }))
}

fn run_job(
    models: &ModelRegistry,
    datasets: &Datasets,
    checkpoints: &std::path::Path,
    settings: JobSettings,
    shared: Option<&Shared>,
    job: &jobs::Job,
    ctx: &jobs::JobContext,
) -> anyhow::Result<serde_json::Value> {
    match &job.spec {
        JobSpec::Recluster { dataset, k, seed, name } => {
            ctx.progress("loading", 0.0);
            if let Some(done) = finished_before(models, job, name.as_deref(), "recluster") {
                return Ok(done);
            }
            let (_, paths) = datasets.local_images(dataset)?;
            let source = models.package(&job.source_model)?;
            // A session of the job's own, even for the active model: the inference worker's
            // session has its own threads, and sharing it would take them from /segment.
            let session = EmbedSession::load(&source.onnx_path(), settings.device, Some(settings.threads))?;
            let name = name.clone().unwrap_or_else(|| format!("recluster-{}", job.id.trim_start_matches("job-")));
            let out = models.models_dir().join(&name);
            let seed = seed.unwrap_or(0);
            let command = format!("recluster dataset={dataset} k={k} seed={seed} (job {})", job.id);
            let (pkg, report) =
                recluster_package(&source, &session, &paths, KMeansConfig::new(*k, seed), &out, &name, &command, |done, total| {
                    ctx.progress("embedding", 0.9 * done as f64 / total.max(1) as f64);
                    !ctx.canceled()
                })?;
            models.publish_blocking(&name)?;
            Ok(serde_json::json!({
                "model": name,
                "k": pkg.manifest.k,
                "images_used": report.images_used,
                "skipped": report.skipped,
                "vectors": report.vectors,
                "vectors_seen": report.vectors_seen,
                "provider": session.provider().as_str(),
                "session_threads": settings.threads,
            }))
        }
        JobSpec::Finetune { dataset, package_k, name, .. } => {
            ctx.progress("loading", 0.0);
            let checkpoint = checkpoints.join(format!("{}.checkpoint", job.id));
            if let Some(done) = finished_before(models, job, name.as_deref(), "finetune") {
                let _ = std::fs::remove_dir_all(&checkpoint);
                return Ok(done);
            }
            let source = models.package(&job.source_model)?;
            let config = jobs::finetune_config(&job.spec).expect("a finetune spec");
            let name = name.clone().unwrap_or_else(|| format!("finetune-{}", job.id.trim_start_matches("job-")));
            let (images, _) = datasets.local_images(dataset)?;
            let blob_checkpoint = format!("checkpoints/{}", job.id);
            if let Some(sh) = shared {
                // A worker taking over a job continues from the last epoch another one saved.
                if !checkpoint.exists() {
                    let n = super::shared::block_on(sh.blobs.get_dir(&blob_checkpoint, &checkpoint))?;
                    if n > 0 {
                        tracing::info!(job = %job.id, files = n, "continuing from the checkpoint in the shared store");
                    }
                }
            }
            let args = crate::train::pipeline::TrainArgs {
                images,
                out: models.models_dir().join(&name),
                init: crate::train::pipeline::TrainInit::Package(source.dir.clone()),
                config,
                package_k: Some(package_k.unwrap_or(source.manifest.k)),
                // Kept when the job fails or the process dies, so that a resumed job continues
                // from its last epoch; removed once the package is written or the job canceled.
                checkpoint,
                resume: true,
                name: name.clone(),
                replace: false,
                command: format!("finetune dataset={dataset} (job {})", job.id),
                self_train: jobs::finetune_self_train(&job.spec),
                snapshots: vec![],
            };
            // Progress over both stages, each weighted by its epochs.
            let picie_epochs = args.config.epochs as f64;
            let all_epochs = picie_epochs + args.self_train.as_ref().map_or(0.0, |s| s.epochs as f64);
            let mut saved_epoch = None;
            let outcome = crate::train::pipeline::train_with(&args, settings.sessions(), &mut |p| {
                if let Some(sh) = shared {
                    // A new epoch began: the last one's checkpoint is complete on disk.
                    let epoch = (p.phase.self_training(), p.epoch);
                    if saved_epoch.is_some_and(|e| e != epoch) && args.checkpoint.exists() {
                        if let Err(e) = super::shared::block_on(sh.blobs.put_dir(&blob_checkpoint, &args.checkpoint)) {
                            tracing::warn!(job = %job.id, error = %e, "cannot save the checkpoint to the shared store");
                        }
                    }
                    saved_epoch = Some(epoch);
                }
                let done = if p.phase.self_training() {
                    picie_epochs + p.fraction() * (all_epochs - picie_epochs)
                } else {
                    p.fraction() * picie_epochs
                };
                ctx.progress(&format!("{} epoch {}/{}", p.phase, p.epoch + 1, p.epochs), 0.95 * done / all_epochs.max(1.0));
                !ctx.canceled()
            })?;
            let drop_checkpoint = || {
                let _ = std::fs::remove_dir_all(&args.checkpoint);
                if let Some(sh) = shared {
                    let _ = super::shared::block_on(sh.blobs.delete_prefix(&blob_checkpoint));
                }
            };
            let Some((pkg, _)) = outcome else {
                // A canceled job cannot be resumed: its checkpoint is of no more use.
                drop_checkpoint();
                anyhow::bail!("canceled")
            };
            models.publish_blocking(&name)?;
            drop_checkpoint();
            Ok(serde_json::json!({
                "model": name,
                "k": pkg.manifest.k,
                "epochs": args.config.epochs,
                "epoch_losses": pkg.manifest.provenance.details.get("epoch_losses"),
                "session_threads": settings.threads,
            }))
        }
    }
}

/// The result of a job whose package was already written by this same job (the process died
/// between writing it and marking the job done): resuming such a job just reports it.
fn finished_before(models: &ModelRegistry, job: &jobs::Job, name: Option<&str>, kind: &str) -> Option<serde_json::Value> {
    let name = name.map(str::to_string).unwrap_or_else(|| format!("{kind}-{}", job.id.trim_start_matches("job-")));
    let pkg = models.made_by_job(&name, &job.id)?;
    tracing::info!(job = %job.id, model = %name, "the job's package was already written");
    Some(serde_json::json!({ "model": name, "k": pkg.manifest.k, "recovered": true }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::datasets::DatasetLimits;
    use crate::server::jobs::{Job, JobManager, JobState};

    fn noise_png(seed: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(96, 64, |x, y| {
            let v = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ seed.wrapping_mul(97)) as u8;
            image::Rgb([v, v.wrapping_add(seed as u8), x as u8])
        });
        let mut out = vec![];
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    /// Runs one recluster job with these settings, models served on the CPU with 2 threads.
    async fn recluster_with(settings: JobSettings) -> Job {
        let data = tempfile::tempdir().unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let models = Arc::new(ModelRegistry::open(&root.join("models"), data.path(), None, DeviceChoice::Cpu, Some(2)).unwrap());
        let datasets = Arc::new(DatasetStore::open(data.path(), DatasetLimits::default()).unwrap());
        let ds = datasets.create("noise").unwrap();
        let uploads = (0..3).map(|i| datasets.upload_from_bytes(&format!("n{i}.png"), &noise_png(i)).unwrap()).collect();
        datasets.add(&ds.id, uploads).await.unwrap();
        let runner = job_runner(models, datasets, data.path().join("checkpoints"), settings).unwrap();
        let jobs = JobManager::open(data.path(), runner).unwrap();
        let id = jobs.submit(JobSpec::Recluster { dataset: ds.id.clone(), k: 3, seed: None, name: None }, "default".into()).id;
        for _ in 0..1200 {
            let job = jobs.get(&id).unwrap();
            if job.state.is_terminal() {
                return job;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the recluster job did not finish");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_on_their_own_pool_with_the_servers_settings() {
        // The rayon pool the job ran in has the job threads, whatever the global pool has.
        for threads in [1, 3] {
            let job = recluster_with(JobSettings { device: DeviceChoice::Cpu, threads }).await;
            assert_eq!(job.state, JobState::Succeeded, "{job:?}");
            let r = job.result.unwrap();
            assert_eq!((r["job_threads"].as_u64(), r["session_threads"].as_u64()), (Some(threads as u64), Some(threads as u64)), "{r}");
            assert_eq!(r["provider"], "cpu");
            assert_eq!(r["vectors_seen"], r["vectors"], "3 small images are under the sample cap: {r}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recluster_job_uses_the_servers_device() {
        // The server's model runs on the CPU, but the job was told CUDA: its session must ask
        // for CUDA (not fall back to `auto`), which on a CPU-only ONNX Runtime fails loudly.
        let job = recluster_with(JobSettings { device: DeviceChoice::Cuda(0), threads: 1 }).await;
        match job.state {
            JobState::Failed => {
                let e = job.error.unwrap_or_default();
                assert!(e.contains("CUDA execution provider (device 0) failed to register"), "{e}");
            }
            JobState::Succeeded => assert_eq!(job.result.unwrap()["provider"], "cuda"),
            other => panic!("job ended {other:?}"),
        }
    }
}
