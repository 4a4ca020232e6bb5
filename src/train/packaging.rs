//! Writing model packages: an embedder exported to ONNX, the images clustered with it, the
//! package written (`picie package init`, `package rebuild`, and the end of every training run).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::Device;

use super::augment::Photometric;
use super::cluster::{cluster_images, embed_sampled, list_images, ClassFit, ClusterReport, KChoice, MAX_CLUSTER_VECTORS};
use super::fpn_init::{self, FpnInit};
use super::picie::{Frames, TrainConfig};
use crate::infer::{DeviceChoice, EmbedSession};
use crate::model::embedder::BackboneKind;
use crate::model::{export, Embedder, EmbedderConfig, TensorMap};
use crate::package::{InputPolicy, Manifest, Package, PackageContents, Provenance, FORMAT_VERSION};

/// The seed of the default package's FPN initialisation.
pub const DEFAULT_FPN_SEED: u64 = 0;

fn cpu_device() -> Device {
    Device::flex()
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

/// Where the making of a package stands: the fraction of the whole done, and what is being done.
pub type PackagingProgress<'a> = &'a mut dyn FnMut(f64, &str);

/// The share of a package's making that embedding the images takes; PCA before it, k-means and
/// writing after.
const EMBEDDING_SHARE: (f64, f64) = (0.1, 0.9);

/// Reports the embedding pass of `package_from_embedder` as a share of the whole.
fn embedding_progress(progress: PackagingProgress<'_>) -> impl FnMut(usize, usize) -> bool + '_ {
    move |done, total| {
        let (from, to) = EMBEDDING_SHARE;
        let fraction = if done == total { to } else { from + (to - from) * done as f64 / total.max(1) as f64 };
        if done == total {
            progress(fraction, "k-means on the pixel features");
        } else {
            progress(fraction, &format!("embedding images {done}/{total}"));
        }
        true
    }
}

/// `picie package init`: pretrained backbone + FPN (laterals per `fpn_init`), exported to ONNX, centroids from
/// k-means on `images`. The manifest says the embedder is untrained.
pub fn init_package(args: &InitPackage, progress: PackagingProgress<'_>) -> Result<(Package, ClusterReport)> {
    let device = cpu_device();
    let weights = crate::model::import::load_backbone_weights(args.backbone, &args.backbone_weights)?;
    let config = EmbedderConfig::new(args.backbone);
    let paths = list_images(&args.images)?;
    // The taps are measured on frames as training would see them; only the sampled images are
    // read here (the clustering pass reads them all), and none for seeded laterals.
    let sampled: Vec<PathBuf> = match args.fpn_init {
        FpnInit::Pca => fpn_init::spread(paths.len(), fpn_init::PCA_FRAMES).into_iter().map(|i| paths[i].clone()).collect(),
        FpnInit::Random => vec![],
    };
    progress(0.0, if sampled.is_empty() { "seeded laterals" } else { "principal components of the backbone's taps" });
    let frames = Frames::load(&sampled, TrainConfig::default().frame()).normalized(args.policy.normalize);
    let start = starting_weights(config, &weights.sub("backbone"), args.seed, args.fpn_init, &frames)?;
    let embedder = Embedder::load(config, &start, &device)?;
    let provenance = Provenance {
        created_at: crate::package::now_rfc3339(),
        picie_version: env!("CARGO_PKG_VERSION").into(),
        command: args.command.clone(),
        backbone_weights: args.backbone_weights.display().to_string(),
        trained: false,
        parent: None,
        job: None,
        details: BTreeMap::from([("fpn_seed".into(), serde_json::json!(args.seed)), ("fpn_init".into(), serde_json::json!(args.fpn_init))]),
    };
    let target = PackageTarget {
        out: &args.out,
        name: &args.name,
        policy: args.policy,
        replace: args.replace,
        sessions: SessionSettings::default(),
    };
    progress(EMBEDDING_SHARE.0, "exporting the embedder");
    package_from_embedder(
        &embedder,
        config,
        &paths,
        ClassFit::new(args.k, args.seed),
        provenance,
        &target,
        &mut embedding_progress(progress),
    )
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

/// Exports `embedder` to ONNX, clusters `paths` with it, and writes the package. `on_embed`
/// hears of each embedded image (done, total); false stops the work.
pub fn package_from_embedder(
    embedder: &Embedder,
    config: EmbedderConfig,
    paths: &[PathBuf],
    fit: ClassFit,
    mut provenance: Provenance,
    target: &PackageTarget<'_>,
    on_embed: &mut dyn FnMut(usize, usize) -> bool,
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
        cluster_images(&session, &target.policy, paths, fit, MAX_CLUSTER_VECTORS, on_embed)
    })();
    let _ = std::fs::remove_file(&scratch);
    let (centroids, report) = clustered?;
    record_fit(&mut provenance, fit, &centroids, &report);
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

/// What a package's provenance says of how its classes were fit: the k-means seed, the images
/// and vectors, and the over-clusters its classes were merged from (none: k-means at K).
fn record_fit(provenance: &mut Provenance, fit: ClassFit, centroids: &crate::package::Centroids, report: &ClusterReport) {
    let details = &mut provenance.details;
    details.insert("kmeans_seed".into(), serde_json::json!(fit.seed()));
    details.insert("cluster_images".into(), serde_json::json!(report.images_used));
    details.insert("cluster_vectors".into(), serde_json::json!(report.vectors));
    match centroids.over_clusters() {
        Some(k2) => details.insert("merged_from".into(), serde_json::json!(k2)),
        None => details.remove("merged_from"),
    };
}

/// `picie package rebuild`: what to make of a package's embedder.
pub struct RebuildPackage {
    pub from: PathBuf,
    /// Hypercolumn output, see [`EmbedderConfig::tap_weight`] (0: the FPN's features alone).
    pub tap_weight: f32,
    /// Another package of the same architecture and input and the share of the way the weights
    /// move toward it: `(1 - share) * from + share * other`, tensor by tensor. With another
    /// training run from the same start at 0.5, the two runs' average (a model soup); with the
    /// untrained start, WiSE-FT's blend of a fine-tuned model with its start.
    pub blend: Option<(PathBuf, f32)>,
    pub images: PathBuf,
    /// K of the new centroids (None: the source package's).
    pub k: Option<usize>,
    pub seed: u64,
    pub over_cluster: usize,
    pub out: PathBuf,
    /// Name of the new package (None: the source's).
    pub name: Option<String>,
    pub replace: bool,
    pub command: String,
}

/// `picie package rebuild`: a package's embedder, with another output (`tap_weight`) or its
/// weights blended toward another package's, exported again and its centroids clustered on
/// `images`.
pub fn rebuild_package(args: &RebuildPackage, progress: PackagingProgress<'_>) -> Result<(Package, ClusterReport)> {
    let tap_weight = args.tap_weight;
    if !(tap_weight >= 0.0 && tap_weight.is_finite()) {
        bail!("--tap-weight must be 0 or more (got {tap_weight})");
    }
    let source = Package::load(&args.from)?;
    let config = EmbedderConfig { tap_weight, ..source.manifest.embedder };
    let mut weights = source.load_weights()?;
    let p = &source.manifest.provenance;
    let mut details = p.details.clone();
    details.insert("rebuilt_from".into(), serde_json::json!(source.version()));
    if let Some((other_dir, share)) = &args.blend {
        let other = Package::load(other_dir)?;
        let (a, b) = (&source.manifest, &other.manifest);
        if (a.embedder.backbone, a.embedder.dim) != (b.embedder.backbone, b.embedder.dim) {
            bail!(
                "{} ({:?}, {} dims) and {} ({:?}, {} dims) are not the same architecture",
                args.from.display(),
                a.embedder.backbone,
                a.embedder.dim,
                other_dir.display(),
                b.embedder.backbone,
                b.embedder.dim
            );
        }
        if a.input.normalize != b.input.normalize {
            // The two embedders were made for differently prepared images; a blend serves neither.
            bail!(
                "{} normalises its input as {:?} and {} as {:?}: blend embedders made for the same input",
                args.from.display(),
                a.input.normalize,
                other_dir.display(),
                b.input.normalize
            );
        }
        weights = weights.interpolate(&other.load_weights()?, *share)?;
        // A blend of a blend (a soup of three) keeps the record of the earlier one inside.
        let mut record = serde_json::json!({ "package": other.version(), "share": share });
        if let Some(earlier) = details.remove("blended_with") {
            record["earlier"] = earlier;
        }
        details.insert("blended_with".into(), record);
    }
    let embedder = Embedder::load(config, &weights, &cpu_device())?;
    let paths = list_images(&args.images)?;
    let provenance = Provenance {
        created_at: crate::package::now_rfc3339(),
        picie_version: env!("CARGO_PKG_VERSION").into(),
        command: args.command.clone(),
        backbone_weights: p.backbone_weights.clone(),
        trained: p.trained,
        parent: Some(source.version()),
        job: None,
        details,
    };
    let name = args.name.clone().unwrap_or_else(|| source.manifest.name.clone());
    let target = PackageTarget {
        out: &args.out,
        name: &name,
        policy: source.manifest.input,
        replace: args.replace,
        sessions: SessionSettings::default(),
    };
    progress(EMBEDDING_SHARE.0, "exporting the embedder");
    let fit = ClassFit::with_over_cluster(args.k.unwrap_or(source.manifest.k), args.seed, args.over_cluster);
    package_from_embedder(&embedder, config, &paths, fit, provenance, &target, &mut embedding_progress(progress))
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

/// A new package with the same embedder as `source` and centroids clustered on `paths`, at the K
/// given or the one suggested from a range on the same feature sample, merged from
/// `over_cluster` clusters ([`ClassFit::with_over_cluster`]). `progress` hears of the
/// embedding, `on_k` of the suggestion's fits; None when either stops the work.
#[allow(clippy::too_many_arguments)]
pub fn recluster_package(
    source: &Package,
    session: &EmbedSession,
    paths: &[PathBuf],
    choice: KChoice,
    seed: u64,
    over_cluster: usize,
    out: &Path,
    name: &str,
    command: &str,
    job: Option<&str>,
    progress: impl FnMut(usize, usize) -> bool,
    on_k: impl FnMut(usize, usize) -> bool,
) -> Result<Option<(Package, ClusterReport)>> {
    let features = embed_sampled(session, &source.manifest.input, paths, MAX_CLUSTER_VECTORS, seed, progress)?;
    let suggestion = match choice {
        KChoice::Fixed(_) => None,
        KChoice::Suggest { min, max } => match super::ksuggest::suggest_k(&features.vectors, features.dim, min, max, seed, on_k)? {
            Some(s) => Some(s),
            None => return Ok(None),
        },
    };
    let k = match (&choice, &suggestion) {
        (KChoice::Fixed(k), _) => *k,
        (_, Some(s)) => s.k,
        _ => unreachable!("a suggestion or a fixed K"),
    };
    let config = ClassFit::with_over_cluster(k, seed, over_cluster);
    let (centroids, vectors) = features.fit(config, MAX_CLUSTER_VECTORS)?;
    let report = ClusterReport {
        images_used: features.images_used,
        skipped: features.skipped.clone(),
        vectors,
        vectors_seen: features.vectors_seen,
        suggestion,
    };
    let onnx = std::fs::read(source.onnx_path()).with_context(|| format!("reading {}", source.onnx_path().display()))?;
    let weights = source.load_weights()?;
    let mut provenance = source.manifest.provenance.clone();
    provenance.created_at = crate::package::now_rfc3339();
    provenance.command = command.to_string();
    provenance.parent = Some(source.version());
    provenance.job = job.map(str::to_string);
    record_fit(&mut provenance, config, &centroids, &report);
    if let Some(suggestion) = &report.suggestion {
        provenance.details.insert("k_suggestion".into(), serde_json::json!(suggestion));
    }
    let manifest = Manifest {
        name: name.to_string(),
        k: centroids.k(),
        provenance,
        metrics: Default::default(),
        sha256: Default::default(),
        ..source.manifest.clone()
    };
    let pkg = Package::write(out, PackageContents { manifest, onnx: &onnx, weights: &weights, centroids: &centroids }, false)?;
    Ok(Some((pkg, report)))
}
