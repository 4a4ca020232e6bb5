//! `picie train` and fine-tuning jobs: PiCIE on a set of images, snapshots after chosen
//! epochs, the optional self-training stage, and the package written at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::cluster::{ClassFit, ClusterReport};
use super::fpn_init::FpnInit;
use super::packaging::{package_from_embedder, starting_weights, PackageTarget, SessionSettings};
use super::picie::{Frames, TrainConfig};
use burn::module::Module;

use crate::model::{export, BackboneKind, EmbedderConfig};
use crate::package::{InputPolicy, Package, PackageContents, Provenance};

/// Where `picie train` starts from.
pub enum TrainInit {
    /// The pretrained backbone with a seeded FPN.
    Backbone { kind: BackboneKind, weights: PathBuf },
    /// An existing package's embedder (fine-tuning).
    Package(PathBuf),
}

pub struct TrainArgs {
    /// The training images (unreadable ones are skipped and named).
    pub images: Vec<PathBuf>,
    pub out: PathBuf,
    pub init: TrainInit,
    pub config: super::picie::TrainConfig,
    /// K of the written package (default: the training K).
    pub package_k: Option<usize>,
    /// Clusters the package's K classes are merged from ([`ClassFit::with_over_cluster`];
    /// 0: k-means at K).
    pub package_over_cluster: usize,
    pub checkpoint: PathBuf,
    pub resume: bool,
    pub name: String,
    pub replace: bool,
    pub command: String,
    /// Self-training after PiCIE (None: none).
    pub self_train: Option<super::selftrain::SelfTrainConfig>,
    /// The server job this run is (recorded in the package's provenance).
    pub job: Option<String>,
    /// Epochs after which a package of the embedder so far is written too, beside `out` as
    /// `OUT-eN` (the epoch an embedder generalises best at is measured, not assumed).
    pub snapshots: Vec<usize>,
}

/// Where, inside the checkpoint folder, the self-training stage keeps the PiCIE stage's package
/// (its targets and centroids) and its own progress.
pub const STAGE_PACKAGE: &str = "picie-package";
pub const SELF_TRAIN_CHECKPOINT: &str = "selftrain";

/// Where a snapshot of `out` after `epoch` epochs goes: `OUT-eN` beside it.
pub fn snapshot_path(out: &Path, epoch: usize) -> PathBuf {
    beside(out, &format!("-e{epoch}"))
}

/// Where a run writing `out` keeps its checkpoint unless told otherwise: `OUT.checkpoint` beside
/// it, so that runs named `lr0.1` and `lr0.3` do not share `lr0.checkpoint` (and resume each
/// other's state).
pub fn default_checkpoint(out: &Path) -> PathBuf {
    beside(out, ".checkpoint")
}

/// `out`'s sibling named its whole name and `suffix`: appended, never in place of an extension.
fn beside(out: &Path, suffix: &str) -> PathBuf {
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("package");
    out.with_file_name(format!("{name}{suffix}"))
}

/// `picie train`: PiCIE on the images, then a package clustered with the trained embedder.
/// Returns None when `on` stopped it (the last epoch's checkpoint is kept).
pub fn train(args: &TrainArgs, on: &mut dyn FnMut(&super::picie::Progress) -> bool) -> Result<Option<(Package, ClusterReport)>> {
    train_with(args, SessionSettings::default(), on)
}

/// [`train`], with the ONNX Runtime session that clusters the final package made per `sessions`.
/// Training and k-means run on the current rayon pool (the caller's `ThreadPool::install`).
pub fn train_with(
    args: &TrainArgs,
    sessions: SessionSettings,
    on: &mut dyn FnMut(&super::picie::Progress) -> bool,
) -> Result<Option<(Package, ClusterReport)>> {
    use super::picie::Trainer;
    let paths = &args.images;
    args.config.check()?;
    let source_package = match &args.init {
        TrainInit::Package(dir) => Some(Package::load(dir)?),
        TrainInit::Backbone { .. } => None,
    };
    // A package's embedder trains on images prepared as the package prepares them.
    let mut config = args.config.clone();
    if let Some(pkg) = &source_package {
        config.normalize = pkg.manifest.input.normalize;
    }
    let frames = Frames::load(paths, config.frame()).normalized(config.normalize);
    if !frames.skipped.is_empty() {
        tracing::warn!(skipped = frames.skipped.len(), files = ?frames.skipped, "unreadable images skipped");
    }
    config.validate(frames.len())?;
    let resuming = args.resume && args.checkpoint.join(super::picie::CHECKPOINT_STATE).exists();
    let (embedder_config, weights, source, policy) = match (&args.init, source_package) {
        (_, Some(pkg)) => (pkg.manifest.embedder, pkg.load_weights()?, pkg.version(), pkg.manifest.input),
        (TrainInit::Backbone { kind, weights }, None) => {
            let embedder = EmbedderConfig::new(*kind);
            // A resumed run loads its checkpoint's weights: no need to measure the taps again.
            let fpn = if resuming { FpnInit::Random } else { config.fpn_init };
            let backbone = crate::model::import::load_backbone_weights(*kind, weights)?;
            let init = starting_weights(embedder, &backbone.sub("backbone"), config.seed, fpn, &frames)?;
            (embedder, init, weights.display().to_string(), InputPolicy { normalize: config.normalize, ..InputPolicy::default() })
        }
        (TrainInit::Package(_), None) => unreachable!("the package was loaded above"),
    };
    if args.self_train.is_some() && embedder_config.tap_weight > 0.0 {
        // Its targets are centroids of the served (hypercolumn) features; it trains the FPN's.
        bail!(
            "self-training needs a package that serves the FPN's features alone (this one has tap_weight {})",
            embedder_config.tap_weight
        );
    }
    let mut trainer = if resuming {
        let t = Trainer::resume(config.clone(), embedder_config, &args.checkpoint)?;
        tracing::info!(epochs_done = t.epochs_done, "resuming from {}", args.checkpoint.display());
        t
    } else {
        if args.resume {
            tracing::warn!("no checkpoint at {}: starting from the beginning", args.checkpoint.display());
        }
        Trainer::new(config.clone(), embedder_config, &weights)?
    };
    // How every package this run writes fits its classes (snapshots, the final one, the PiCIE stage).
    let fit = ClassFit::with_over_cluster(args.package_k.unwrap_or(config.k), config.seed, args.package_over_cluster);
    let provenance = |trainer: &Trainer| -> Result<Provenance> {
        Ok(Provenance {
            created_at: crate::package::now_rfc3339(),
            picie_version: env!("CARGO_PKG_VERSION").into(),
            command: args.command.clone(),
            backbone_weights: source.clone(),
            trained: true,
            parent: None,
            job: args.job.clone(),
            details: BTreeMap::from([
                ("train".into(), serde_json::to_value(TrainConfig { epochs: trainer.epochs_done, ..config.clone() })?),
                ("train_images".into(), serde_json::json!(frames.len())),
                ("skipped".into(), serde_json::json!(frames.skipped)),
                ("epoch_losses".into(), serde_json::json!(trainer.losses)),
            ]),
        })
    };
    let mut snapshots: Vec<usize> = args.snapshots.iter().copied().filter(|&e| e > trainer.epochs_done && e < config.epochs).collect();
    snapshots.sort_unstable();
    snapshots.dedup();
    for epoch in snapshots {
        if !trainer.run_to(epoch, &frames, &args.checkpoint, on)? {
            return Ok(None);
        }
        let out = snapshot_path(&args.out, epoch);
        let target = PackageTarget { out: &out, name: &args.name, policy, replace: true, sessions };
        package_from_embedder(
            &trainer.model.valid(),
            embedder_config,
            frames.paths(),
            fit,
            provenance(&trainer)?,
            &target,
            &mut |_, _| true,
        )?;
        tracing::info!(epoch, package = %out.display(), "snapshot written");
    }
    if !trainer.run(&frames, &args.checkpoint, on)? {
        return Ok(None);
    }
    let model = trainer.model.valid();
    let provenance = provenance(&trainer)?;
    let Some(st) = &args.self_train else {
        let target = PackageTarget { out: &args.out, name: &args.name, policy, replace: args.replace, sessions };
        return package_from_embedder(&model, embedder_config, frames.paths(), fit, provenance, &target, &mut |_, _| true).map(Some);
    };
    // The PiCIE stage's package: the self-training targets and the final centroids.
    let stage_dir = args.checkpoint.join(STAGE_PACKAGE);
    let stage_target = PackageTarget { out: &stage_dir, name: &args.name, policy, replace: true, sessions };
    let (stage, report) = package_from_embedder(&model, embedder_config, frames.paths(), fit, provenance, &stage_target, &mut |_, _| true)?;
    let seg = crate::infer::Segmenter::from_package(stage.clone(), sessions.device, sessions.threads)?;
    let mut label_progress = |done: usize, all: usize| {
        on(&super::picie::Progress {
            epoch: 0,
            epochs: st.epochs,
            phase: super::picie::Phase::PseudoLabel,
            step: done,
            steps: all,
            loss: None,
            pixels_per_sec: 0.0,
        })
    };
    let Some(targets) = super::selftrain::pseudo_labels(&seg, &frames, st, &crate::infer::CrfConfig::default(), &mut label_progress)?
    else {
        return Ok(None);
    };
    tracing::info!(kept = targets.kept(), "self-training targets");
    let mut trainer = super::selftrain::SelfTrainer::resume_or_new(
        st.clone(),
        config.clone(),
        embedder_config,
        &stage.load_weights()?,
        &args.checkpoint.join(SELF_TRAIN_CHECKPOINT),
    )?;
    if !trainer.run(&frames, &targets, &stage.centroids, &args.checkpoint.join(SELF_TRAIN_CHECKPOINT), on)? {
        return Ok(None);
    }
    // The self-trained embedder with the PiCIE stage's centroids (names and colours kept).
    let model = trainer.model.valid();
    let onnx = export::to_onnx_bytes(&model, embedder_config)?;
    let mut manifest = stage.manifest.clone();
    manifest.provenance.created_at = crate::package::now_rfc3339();
    manifest.provenance.details.insert("self_train".into(), serde_json::to_value(st)?);
    manifest.provenance.details.insert("self_train_losses".into(), serde_json::json!(trainer.losses));
    manifest.provenance.details.insert("self_train_targets_kept".into(), serde_json::json!(targets.kept()));
    manifest.sha256.clear();
    manifest.metrics.clear();
    let tensors = model.to_tensor_map("picie");
    let pkg =
        Package::write(&args.out, PackageContents { manifest, onnx: &onnx, weights: &tensors, centroids: &stage.centroids }, args.replace)?;
    Ok(Some((pkg, report)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_and_snapshots_keep_the_whole_package_name() {
        assert_eq!(default_checkpoint(Path::new("runs/recipe")), Path::new("runs/recipe.checkpoint"));
        assert_eq!(default_checkpoint(Path::new("runs/lr0.1")), Path::new("runs/lr0.1.checkpoint"));
        assert_ne!(default_checkpoint(Path::new("runs/lr0.1")), default_checkpoint(Path::new("runs/lr0.3")));
        assert_eq!(snapshot_path(Path::new("runs/lr0.1"), 2), Path::new("runs/lr0.1-e2"));
    }
}
