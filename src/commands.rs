//! What the CLI subcommands do, as library functions so tests drive them directly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;

use crate::infer::{DeviceChoice, EmbedSession};
use crate::model::efficientnet::{EfficientNetLite, LiteClassifier};
use crate::model::embedder::BackboneKind;
use crate::model::{export, import, Embedder, EmbedderConfig, TensorMap};
use crate::package::{InputPolicy, Manifest, Package, PackageContents, Provenance, FORMAT_VERSION};
use crate::train::augment::Photometric;
use crate::train::cluster::{cluster_images, list_images, ClusterReport, MAX_CLUSTER_VECTORS};
use crate::train::fpn_init::{self, FpnInit};
use crate::train::kmeans::KMeansConfig;
use crate::train::picie::{Frames, TrainConfig};

/// The seed of the default package's FPN initialisation.
pub const DEFAULT_FPN_SEED: u64 = 0;

pub fn cpu_device() -> Device {
    Device::flex()
}

/// `picie weights import`: torch checkpoint -> safetensors with `backbone.` names. Returns the tensor count.
pub fn import_weights(kind: BackboneKind, checkpoint: &Path, out: &Path) -> Result<usize> {
    let map = import::import_backbone(kind, checkpoint)?;
    map.save_safetensors(out)?;
    Ok(map.len())
}

/// An RGB image as a 1 x 3 x H x W tensor in [0, 1].
pub fn image_tensor(img: &RgbImage, device: &Device) -> Tensor<4> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data = crate::infer::preprocess::rgb_planes(img);
    Tensor::from_data(TensorData::new(data, [1, 3, h, w]), device)
}

/// ImageNet top-5 (class index, probability) of the EfficientNet-Lite classifier shipped with
/// the checkpoint: the check that an import is right. The image is resized to 256 on the short
/// side and centre-cropped to 224, the usual ImageNet evaluation.
pub fn imagenet_top5(kind: BackboneKind, weights: &Path, image: &Path) -> Result<Vec<(usize, f32)>> {
    let variant = kind.lite_variant().with_context(|| format!("{kind:?} has no ImageNet classifier in picie"))?;
    let map = TensorMap::load_safetensors(weights)?.sub("backbone");
    let device = cpu_device();
    let backbone = EfficientNetLite::load(variant, &map, &device)?;
    let classifier = LiteClassifier::load(variant, &map, &device)?;
    let img = crate::infer::preprocess::decode_file(image)?;
    let scale = 256.0 / img.width().min(img.height()) as f32;
    let (w, h) = ((img.width() as f32 * scale).round() as u32, (img.height() as f32 * scale).round() as u32);
    let resized = image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle);
    let crop = image::imageops::crop_imm(&resized, (w - 224) / 2, (h - 224) / 2, 224, 224).to_image();
    let x = crate::model::embedder::imagenet_normalize(image_tensor(&crop, &device));
    let [_, _, _, c5] = backbone.forward(x);
    let probs = burn::tensor::activation::softmax(classifier.forward(c5), 1);
    let p: Vec<f32> = probs.into_data().try_to_vec().expect("f32");
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    Ok(idx.into_iter().take(5).map(|i| (i, p[i])).collect())
}

pub struct InitPackage {
    pub backbone: BackboneKind,
    pub backbone_weights: PathBuf,
    pub images: PathBuf,
    pub k: usize,
    pub seed: u64,
    pub out: PathBuf,
    pub name: String,
    pub policy: InputPolicy,
    pub replace: bool,
    pub command: String,
    /// How the FPN's laterals start (seeded random, or from the taps' principal components on `images`).
    pub fpn_init: FpnInit,
}

/// `picie package init`: pretrained backbone + FPN (laterals per `fpn_init`), exported to ONNX, centroids from
/// k-means on `images`. The manifest says the embedder is untrained.
pub fn init_package(args: &InitPackage) -> Result<(Package, ClusterReport)> {
    let device = cpu_device();
    let weights = TensorMap::load_safetensors(&args.backbone_weights)?;
    let config = EmbedderConfig::new(args.backbone);
    let paths = list_images(&args.images)?;
    // The taps are measured on frames as training would see them; only the sampled images are
    // read here (the clustering pass reads them all), and none for seeded laterals.
    let sampled: Vec<PathBuf> = match args.fpn_init {
        FpnInit::Pca => fpn_init::spread(paths.len(), fpn_init::PCA_FRAMES).into_iter().map(|i| paths[i].clone()).collect(),
        FpnInit::Random => vec![],
    };
    let frames = Frames::load(&sampled, TrainConfig::default().frame()).standardized(args.policy.standardize);
    let start = starting_weights(config, &weights.sub("backbone"), args.seed, args.fpn_init, &frames)?;
    let embedder = Embedder::load(config, &start, &device)?;
    let provenance = Provenance {
        created_at: crate::package::now_rfc3339(),
        picie_version: env!("CARGO_PKG_VERSION").into(),
        command: args.command.clone(),
        backbone_weights: args.backbone_weights.display().to_string(),
        trained: false,
        parent: None,
        details: BTreeMap::from([("fpn_seed".into(), serde_json::json!(args.seed)), ("fpn_init".into(), serde_json::json!(args.fpn_init))]),
    };
    let target = PackageTarget {
        out: &args.out,
        name: &args.name,
        policy: args.policy,
        replace: args.replace,
        sessions: SessionSettings::default(),
    };
    package_from_embedder(&embedder, config, &paths, KMeansConfig::new(args.k, args.seed), provenance, &target)
}

/// Where and how a new package is written.
pub struct PackageTarget<'a> {
    pub out: &'a Path,
    pub name: &'a str,
    pub policy: InputPolicy,
    pub replace: bool,
    /// Where the ONNX Runtime session that clusters the images runs.
    pub sessions: SessionSettings,
}

/// Where the ONNX Runtime sessions a command creates run: the CLI lets ONNX Runtime choose,
/// the server's jobs use its `--device` and `--job-threads`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionSettings {
    pub device: DeviceChoice,
    /// Intra-op threads (None: ONNX Runtime's choice).
    pub threads: Option<usize>,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self { device: DeviceChoice::Auto, threads: None }
    }
}

/// Exports `embedder` to ONNX, clusters `paths` with it, and writes the package.
pub fn package_from_embedder(
    embedder: &Embedder,
    config: EmbedderConfig,
    paths: &[PathBuf],
    kmeans: KMeansConfig,
    mut provenance: Provenance,
    target: &PackageTarget<'_>,
) -> Result<(Package, ClusterReport)> {
    if paths.is_empty() {
        bail!("no images to cluster");
    }
    let onnx = export::to_onnx_bytes(embedder, config)?;
    // The session needs a file; it lives next to the package until the package is written,
    // dot-named (never listed as a model) and known to the startup cleanup
    // (`util::is_leftover`) should the process die before it is removed.
    let parent = target.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let stem = target.out.file_name().and_then(|n| n.to_str()).unwrap_or("package");
    let scratch = parent.join(format!(".{stem}.onnx-scratch-{}-{}", std::process::id(), crate::util::unique()));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    if let Err(e) = std::fs::write(&scratch, &onnx) {
        let _ = std::fs::remove_file(&scratch);
        return Err(e).with_context(|| format!("writing {}", scratch.display()));
    }
    let clustered = (|| {
        let session = EmbedSession::load(&scratch, target.sessions.device, target.sessions.threads)?;
        cluster_images(&session, &target.policy, paths, kmeans, MAX_CLUSTER_VECTORS, |_, _| true)
    })();
    let _ = std::fs::remove_file(&scratch);
    let (centroids, report) = clustered?;
    provenance.details.insert("kmeans_seed".into(), serde_json::json!(kmeans.seed));
    provenance.details.insert("cluster_images".into(), serde_json::json!(report.images_used));
    provenance.details.insert("cluster_vectors".into(), serde_json::json!(report.vectors));
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        name: target.name.to_string(),
        embedder: config,
        k: centroids.k(),
        input: target.policy,
        provenance,
        metrics: BTreeMap::new(),
        sha256: BTreeMap::new(),
    };
    let tensors = embedder.to_tensor_map("picie");
    let pkg =
        Package::write(target.out, PackageContents { manifest, onnx: &onnx, weights: &tensors, centroids: &centroids }, target.replace)?;
    Ok((pkg, report))
}

/// `picie package rebuild`: a package's embedder with `tap_weight` (hypercolumn output, see
/// [`EmbedderConfig::tap_weight`]), exported again and its centroids clustered on `images`.
#[allow(clippy::too_many_arguments)]
pub fn rebuild_package(
    from: &Path,
    tap_weight: f32,
    images: &Path,
    k: Option<usize>,
    seed: u64,
    out: &Path,
    name: Option<&str>,
    replace: bool,
    command: String,
) -> Result<(Package, ClusterReport)> {
    if !(tap_weight >= 0.0 && tap_weight.is_finite()) {
        bail!("--tap-weight must be 0 or more (got {tap_weight})");
    }
    let source = Package::load(from)?;
    let config = EmbedderConfig { tap_weight, ..source.manifest.embedder };
    let embedder = Embedder::load(config, &source.load_weights()?, &cpu_device())?;
    let paths = list_images(images)?;
    let p = &source.manifest.provenance;
    let mut details = p.details.clone();
    details.insert("rebuilt_from".into(), serde_json::json!(source.version()));
    let provenance = Provenance {
        created_at: crate::package::now_rfc3339(),
        picie_version: env!("CARGO_PKG_VERSION").into(),
        command,
        backbone_weights: p.backbone_weights.clone(),
        trained: p.trained,
        parent: Some(source.version()),
        details,
    };
    let name = name.unwrap_or(&source.manifest.name).to_string();
    let target = PackageTarget { out, name: &name, policy: source.manifest.input, replace, sessions: SessionSettings::default() };
    package_from_embedder(&embedder, config, &paths, KMeansConfig::new(k.unwrap_or(source.manifest.k), seed), provenance, &target)
}

/// `picie export`: the ONNX graph of a package's burn weights.
pub fn export_package(model: &Path, out: &Path) -> Result<()> {
    let pkg = Package::load(model)?;
    let weights = pkg.load_weights()?;
    let embedder = Embedder::load(pkg.manifest.embedder, &weights, &cpu_device())
        .with_context(|| format!("loading {}", pkg.weights_path().display()))?;
    export::export_onnx(&embedder, pkg.manifest.embedder, out)
}

/// An untrained embedder's weights: the pretrained backbone and the FPN's laterals, seeded or
/// (`FpnInit::Pca`) from the principal components of the backbone's taps on `frames`.
pub fn starting_weights(
    config: EmbedderConfig,
    backbone: &TensorMap,
    fpn_seed: u64,
    fpn_init: FpnInit,
    frames: &Frames,
) -> Result<TensorMap> {
    let embedder = Embedder::from_backbone(config, backbone, fpn_seed, &cpu_device())?;
    let mut weights = embedder.to_tensor_map("init");
    if fpn_init == FpnInit::Pca {
        let sample = fpn_init::spread(frames.len(), fpn_init::PCA_FRAMES)
            .into_iter()
            .map(|i| Ok(frames.view(frames.frame(i)?, &Photometric::IDENTITY)))
            .collect::<Result<Vec<_>>>()?;
        fpn_init::init_pca_laterals(&embedder, &sample, (frames.width, frames.height), config.dim, &mut weights)?;
    }
    Ok(weights)
}

/// Where `picie train` starts from.
pub enum TrainInit {
    /// The pretrained backbone with a seeded FPN.
    Backbone { kind: BackboneKind, weights: PathBuf },
    /// An existing package's embedder (fine-tuning).
    Package(PathBuf),
}

pub struct TrainArgs {
    pub images: PathBuf,
    pub out: PathBuf,
    pub init: TrainInit,
    pub config: crate::train::picie::TrainConfig,
    /// K of the written package (default: the training K).
    pub package_k: Option<usize>,
    pub checkpoint: PathBuf,
    pub resume: bool,
    pub name: String,
    pub replace: bool,
    pub command: String,
    /// Self-training after PiCIE (None: none).
    pub self_train: Option<crate::train::selftrain::SelfTrainConfig>,
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
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("package");
    out.with_file_name(format!("{name}-e{epoch}"))
}

/// `picie train`: PiCIE on the images, then a package clustered with the trained embedder.
/// Returns None when `on` stopped it (the last epoch's checkpoint is kept).
pub fn train(args: &TrainArgs, on: &mut dyn FnMut(&crate::train::picie::Progress) -> bool) -> Result<Option<(Package, ClusterReport)>> {
    train_with(args, SessionSettings::default(), on)
}

/// [`train`], with the ONNX Runtime session that clusters the final package made per `sessions`.
/// Training and k-means run on the current rayon pool (the caller's `ThreadPool::install`).
pub fn train_with(
    args: &TrainArgs,
    sessions: SessionSettings,
    on: &mut dyn FnMut(&crate::train::picie::Progress) -> bool,
) -> Result<Option<(Package, ClusterReport)>> {
    use crate::train::picie::Trainer;
    let paths = list_images(&args.images)?;
    args.config.check()?;
    let source_package = match &args.init {
        TrainInit::Package(dir) => Some(Package::load(dir)?),
        TrainInit::Backbone { .. } => None,
    };
    // A package's embedder trains on images prepared as the package prepares them.
    let mut config = args.config.clone();
    if let Some(pkg) = &source_package {
        config.standardize = pkg.manifest.input.standardize;
    }
    let frames = Frames::load(&paths, config.frame()).standardized(config.standardize);
    if !frames.skipped.is_empty() {
        tracing::warn!(skipped = frames.skipped.len(), files = ?frames.skipped, "unreadable images skipped");
    }
    config.validate(frames.len())?;
    let resuming = args.resume && args.checkpoint.join(crate::train::picie::CHECKPOINT_STATE).exists();
    let (embedder_config, weights, source, policy) = match (&args.init, source_package) {
        (_, Some(pkg)) => (pkg.manifest.embedder, pkg.load_weights()?, pkg.version(), pkg.manifest.input),
        (TrainInit::Backbone { kind, weights }, None) => {
            let embedder = EmbedderConfig::new(*kind);
            // A resumed run loads its checkpoint's weights: no need to measure the taps again.
            let fpn = if resuming { FpnInit::Random } else { config.fpn_init };
            let backbone = TensorMap::load_safetensors(weights)?;
            let init = starting_weights(embedder, &backbone.sub("backbone"), config.seed, fpn, &frames)?;
            (embedder, init, weights.display().to_string(), InputPolicy { standardize: config.standardize, ..InputPolicy::default() })
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
    let k = args.package_k.unwrap_or(config.k);
    let provenance = |trainer: &Trainer| -> Result<Provenance> {
        Ok(Provenance {
            created_at: crate::package::now_rfc3339(),
            picie_version: env!("CARGO_PKG_VERSION").into(),
            command: args.command.clone(),
            backbone_weights: source.clone(),
            trained: true,
            parent: None,
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
            KMeansConfig::new(k, config.seed),
            provenance(&trainer)?,
            &target,
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
        return package_from_embedder(&model, embedder_config, frames.paths(), KMeansConfig::new(k, config.seed), provenance, &target)
            .map(Some);
    };
    // The PiCIE stage's package: the self-training targets and the final centroids.
    let stage_dir = args.checkpoint.join(STAGE_PACKAGE);
    let stage_target = PackageTarget { out: &stage_dir, name: &args.name, policy, replace: true, sessions };
    let (stage, report) =
        package_from_embedder(&model, embedder_config, frames.paths(), KMeansConfig::new(k, config.seed), provenance, &stage_target)?;
    let seg = crate::infer::Segmenter::from_package(stage.clone(), sessions.device, sessions.threads)?;
    let mut label_progress = |done: usize, all: usize| {
        on(&crate::train::picie::Progress {
            epoch: 0,
            epochs: st.epochs,
            phase: "pseudo-label",
            step: done,
            steps: all,
            loss: None,
            pixels_per_sec: 0.0,
        })
    };
    let Some(targets) =
        crate::train::selftrain::pseudo_labels(&seg, &frames, st, &crate::infer::CrfConfig::default(), &mut label_progress)?
    else {
        return Ok(None);
    };
    tracing::info!(kept = targets.kept(), "self-training targets");
    let mut trainer = crate::train::selftrain::SelfTrainer::resume_or_new(
        st.clone(),
        config.clone(),
        embedder_config,
        &stage.load_weights()?,
        &args.checkpoint.join(SELF_TRAIN_CHECKPOINT),
    )?;
    if !trainer.run(&frames, &targets, &stage.centroids.matrix(), &args.checkpoint.join(SELF_TRAIN_CHECKPOINT), on)? {
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
