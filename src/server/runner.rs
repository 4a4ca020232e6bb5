//! What background jobs run: re-clustering and fine-tuning, on the blocking job thread.

use std::path::PathBuf;
use std::sync::Arc;

use crate::infer::DeviceChoice;
use crate::train::cluster::recluster_package;
use crate::train::kmeans::KMeansConfig;

use super::datasets::DatasetStore;
use super::jobs::{self, JobSpec, Runner};
use super::store::ModelRegistry;

pub fn job_runner(models: Arc<ModelRegistry>, datasets: Arc<DatasetStore>, checkpoints: PathBuf) -> Runner {
    Arc::new(move |job, ctx| match &job.spec {
        JobSpec::Recluster { dataset, k, seed, name } => {
            ctx.progress("loading", 0.0);
            if let Some(done) = finished_before(&models, job, name.as_deref(), "recluster") {
                return Ok(done);
            }
            let paths = datasets.image_paths(dataset)?;
            let source = models.package(&job.source_model)?;
            let (active_name, active) = models.active();
            let session_owner;
            let session = if active_name == job.source_model {
                active.session()
            } else {
                session_owner = crate::infer::EmbedSession::load(&source.onnx_path(), DeviceChoice::Auto, None)?;
                &session_owner
            };
            let name = name.clone().unwrap_or_else(|| format!("recluster-{}", job.id.trim_start_matches("job-")));
            let out = models.models_dir().join(&name);
            let seed = seed.unwrap_or(0);
            let command = format!("recluster dataset={dataset} k={k} seed={seed} (job {})", job.id);
            let (pkg, report) = recluster_package(&source, session, &paths, KMeansConfig::new(*k, seed), &out, &name, &command, |done, total| {
                ctx.progress("embedding", 0.9 * done as f64 / total.max(1) as f64);
                !ctx.canceled()
            })?;
            Ok(serde_json::json!({
                "model": name,
                "k": pkg.manifest.k,
                "images_used": report.images_used,
                "skipped": report.skipped,
                "vectors": report.vectors,
            }))
        }
        JobSpec::Finetune { dataset, package_k, name, .. } => {
            ctx.progress("loading", 0.0);
            let checkpoint = checkpoints.join(format!("{}.checkpoint", job.id));
            if let Some(done) = finished_before(&models, job, name.as_deref(), "finetune") {
                let _ = std::fs::remove_dir_all(&checkpoint);
                return Ok(done);
            }
            let source = models.package(&job.source_model)?;
            let config = jobs::finetune_config(&job.spec).expect("a finetune spec");
            let name = name.clone().unwrap_or_else(|| format!("finetune-{}", job.id.trim_start_matches("job-")));
            let images = datasets.images_dir(dataset)?;
            let args = crate::commands::TrainArgs {
                images,
                out: models.models_dir().join(&name),
                init: crate::commands::TrainInit::Package(source.dir.clone()),
                config,
                package_k: Some(package_k.unwrap_or(source.manifest.k)),
                // Kept when the job fails or the process dies, so that a resumed job continues
                // from its last epoch; removed once the package is written or the job canceled.
                checkpoint,
                resume: true,
                name: name.clone(),
                replace: false,
                command: format!("finetune dataset={dataset} (job {})", job.id),
            };
            let outcome = crate::commands::train(&args, &mut |p| {
                ctx.progress(&format!("{} epoch {}/{}", p.phase, p.epoch + 1, p.epochs), 0.95 * p.fraction());
                !ctx.canceled()
            })?;
            let Some((pkg, _)) = outcome else {
                // A canceled job cannot be resumed: its checkpoint is of no more use.
                let _ = std::fs::remove_dir_all(&args.checkpoint);
                anyhow::bail!("canceled")
            };
            let _ = std::fs::remove_dir_all(&args.checkpoint);
            Ok(serde_json::json!({
                "model": name,
                "k": pkg.manifest.k,
                "epochs": args.config.epochs,
                "epoch_losses": pkg.manifest.provenance.details.get("epoch_losses"),
            }))
        }
    })
}

/// The result of a job whose package was already written by this same job (the process died
/// between writing it and marking the job done): resuming such a job just reports it.
fn finished_before(models: &ModelRegistry, job: &jobs::Job, name: Option<&str>, kind: &str) -> Option<serde_json::Value> {
    let name = name.map(str::to_string).unwrap_or_else(|| format!("{kind}-{}", job.id.trim_start_matches("job-")));
    let pkg = models.made_by_job(&name, &job.id)?;
    tracing::info!(job = %job.id, model = %name, "the job's package was already written");
    Some(serde_json::json!({ "model": name, "k": pkg.manifest.k, "recovered": true }))
}
