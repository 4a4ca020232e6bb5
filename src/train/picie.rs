//! The PiCIE training loop.
//!
//! Every epoch: draw two photometric views P1, P2 and one geometric transform G per image;
//! cluster view 1 = f(G(P1 x)) and view 2 = G(f(P2 x)) separately with mini-batch spherical
//! k-means (K1 and the over-clustering K2); then train f with the clustering loss against those
//! frozen centroids, within and across views. Adam, batch norm in training mode, a checkpoint
//! after every epoch.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::augment::{Geometric, Photometric, PhotometricConfig};
use super::correspond::{correspondence_loss, frame_descriptors, nearest_pairs, CorrespondenceConfig};
use super::fpn_init::FpnInit;
pub use super::frames::Frames;
use super::frozen::{to_array, FrozenTaps};
use super::fused_loss::{HeadValues, StepTargets};
use super::kmeans::{assign, KMeansConfig, SphericalKMeans};
use super::loss::{head_weights, pixels, Balance};
use crate::infer::preprocess::Normalize;
use crate::infer::{DeviceChoice, EmbedSession};
use crate::model::embedder::{imagenet_normalize, l2_normalize, OUTPUT_STRIDE};
use crate::model::export::to_onnx_bytes;
use crate::model::resample::{resample, Window};
use crate::model::{Embedder, EmbedderConfig, TensorMap};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Clusters of the main head during training.
    pub k: usize,
    /// Clusters of the over-clustering head.
    pub k2: usize,
    pub epochs: usize,
    /// Height of the training frames, and their width unless `width` is set (a multiple of 32).
    pub size: usize,
    /// Width of the training frames (a multiple of 32); unset means square `size` x `size`
    /// centre crops. A frame with the images' own aspect ratio (480 x 352 for 4:3 street
    /// scenes) keeps their edges, which square crops cut off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub balance: Balance,
    /// Smallest crop side as a fraction of the frame.
    pub min_crop: f32,
    /// Batches whose features initialise k-means (k-means++ and Lloyd) each epoch.
    pub init_batches: usize,
    /// Pixel features per image and view that go into clustering.
    pub vectors_per_image: usize,
    /// Backbone layers up to this stride (4, 8, 16, 32) stay frozen; 0 trains everything.
    /// Freezing the high-resolution layers keeps the ImageNet features of a small dataset
    /// from being destroyed and skips the most expensive part of the backward pass.
    pub freeze_stride: usize,
    /// The STEGO-style correspondence term beside the PiCIE loss (off unless its weight is set).
    #[serde(default, skip_serializing_if = "CorrespondenceConfig::is_off")]
    pub correspondence: CorrespondenceConfig,
    /// How the FPN's laterals start when training from the pretrained backbone (a package's
    /// embedder keeps its own).
    #[serde(default, skip_serializing_if = "FpnInit::is_random")]
    pub fpn_init: FpnInit,
    /// How every view's colours are normalised before the network, as the written package's
    /// input policy then does for every image it segments ([`Normalize`]).
    #[serde(default, skip_serializing_if = "Normalize::is_none")]
    pub normalize: Normalize,
    /// The range of the photometric views' brightness, contrast and saturation factors,
    /// 1 +- this (unset: [`PhotometricConfig`]'s 0.3, the authors'). Wider ranges ask the
    /// embedder to ignore larger changes of exposure, as between day and dusk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f32>,
}

/// The defaults are the recipe measured best on CamVid (docs/quality.md): it made
/// the shipped model.
impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            k: 27,
            k2: 100,
            // The shipped recipe (docs/quality.md): 4 epochs with luminance normalisation scored
            // above 8, and above no normalisation, on both CamVid drives left out of training.
            epochs: 4,
            size: 320,
            width: None,
            batch: 8,
            lr: 3e-4,
            seed: 0,
            balance: Balance::Inverse,
            min_crop: 0.5,
            init_batches: 20,
            vectors_per_image: 2000,
            freeze_stride: 16,
            correspondence: CorrespondenceConfig::default(),
            fpn_init: FpnInit::Pca,
            normalize: Normalize::Luminance,
            jitter: None,
        }
    }
}

impl TrainConfig {
    /// The settings on their own, before any image is read.
    pub fn check(&self) -> Result<()> {
        if self.k < 2 {
            bail!("k must be at least 2 (got {})", self.k);
        }
        if self.k2 <= self.k {
            bail!("k2 must be larger than k (got k = {}, k2 = {})", self.k, self.k2);
        }
        if self.k2 > u16::MAX as usize {
            bail!("k2 must be at most {} (got {})", u16::MAX, self.k2);
        }
        for (name, side) in [("size", Some(self.size)), ("width", self.width)] {
            if let Some(v) = side.filter(|v| *v == 0 || !v.is_multiple_of(32)) {
                bail!("{name} must be a positive multiple of 32 (got {v})");
            }
        }
        // No epochs is allowed: a package of the starting weights (e.g. to self-train only).
        if self.batch == 0 {
            bail!("batch must be positive");
        }
        if ![0, 4, 8, 16, 32].contains(&self.freeze_stride) {
            bail!("freeze stride must be 0, 4, 8, 16 or 32 (got {})", self.freeze_stride);
        }
        if let Some(j) = self.jitter.filter(|j| !(j.is_finite() && *j >= 0.0 && *j < 1.0)) {
            bail!("jitter must be at least 0 and below 1 (got {j})");
        }
        if !(self.min_crop > 0.0 && self.min_crop <= 1.0) {
            bail!("min crop must be above 0 and at most 1 (got {})", self.min_crop);
        }
        self.correspondence.check()?;
        if self.correspondence.pairs_neighbours() && !self.batch.is_multiple_of(2) {
            bail!("nearest-neighbour correspondence pairs need an even batch (got {})", self.batch);
        }
        Ok(())
    }

    /// The settings against the number of readable training images.
    pub fn validate(&self, images: usize) -> Result<()> {
        self.check()?;
        if images < 2 {
            bail!("training needs at least 2 readable images (got {images})");
        }
        if images * self.vectors_per_image.min(self.cells_per_image()) < self.k2 {
            bail!("{images} images give too few pixel features for k2 = {} clusters", self.k2);
        }
        Ok(())
    }

    /// Training frame (width, height) in pixels.
    pub fn frame(&self) -> (usize, usize) {
        (self.width.unwrap_or(self.size), self.size)
    }

    /// Feature map (width, height) of a training frame.
    fn cells(&self) -> (usize, usize) {
        let (w, h) = self.frame();
        (w / OUTPUT_STRIDE, h / OUTPUT_STRIDE)
    }

    fn cells_per_image(&self) -> usize {
        let (w, h) = self.cells();
        w * h
    }
}

/// Which pass of training a step belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Mini-batch k-means on the epoch's views (forward only).
    Cluster,
    /// Every pixel labelled with the final centroids (forward only).
    Label,
    /// Gradient steps.
    Train,
    /// Self-training: the PiCIE package's refined labels of every frame, once.
    PseudoLabel,
    /// Self-training epochs.
    SelfTrain,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Cluster => "cluster",
            Phase::Label => "label",
            Phase::Train => "train",
            Phase::PseudoLabel => "pseudo-label",
            Phase::SelfTrain => "self-train",
        }
    }

    /// Whether the step belongs to the self-training stage.
    pub fn self_training(self) -> bool {
        matches!(self, Phase::PseudoLabel | Phase::SelfTrain)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the loop reports after each step.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    pub epoch: usize,
    pub epochs: usize,
    pub phase: Phase,
    pub step: usize,
    pub steps: usize,
    /// Mean loss of the epoch so far (train phase).
    pub loss: Option<f32>,
    pub pixels_per_sec: f64,
}

impl Progress {
    /// Fraction of the stage done: in PiCIE epochs the clustering and labelling passes
    /// (forward only) count a fifth of an epoch each, training the rest; self-training's
    /// pseudo-labelling pass comes before its first epoch, its epochs are all training.
    pub fn fraction(&self) -> f64 {
        let step = self.step as f64 / self.steps.max(1) as f64;
        let within = match self.phase {
            Phase::Cluster => step / 5.0,
            Phase::Label => 0.2 + step / 5.0,
            Phase::PseudoLabel => 0.0,
            Phase::SelfTrain => step,
            Phase::Train => 0.4 + 0.6 * step,
        };
        (self.epoch as f64 + within) / self.epochs.max(1) as f64
    }

    /// The step in words: epoch, pass, step, the epoch's loss so far and the speed.
    pub fn describe(&self) -> String {
        let loss = self.loss.map(|l| format!(" loss {l:.4}")).unwrap_or_default();
        format!(
            "epoch {}/{} {} {}/{}{loss} | {:.0} kpx/s",
            self.epoch + 1,
            self.epochs,
            self.phase,
            self.step,
            self.steps,
            self.pixels_per_sec / 1000.0
        )
    }

    /// The line to keep once an epoch's last training step is done.
    pub fn epoch_done(&self) -> Option<String> {
        let loss = self.loss.map(|l| format!(" loss {l:.4}")).unwrap_or_default();
        (matches!(self.phase, Phase::Train | Phase::SelfTrain) && self.step == self.steps).then(|| {
            format!(
                "{} epoch {}/{} done{loss}",
                if self.phase == Phase::Train { "PiCIE" } else { "self-training" },
                self.epoch + 1,
                self.epochs
            )
        })
    }
}

/// The draws of one image for one epoch.
#[derive(Clone, Copy, Debug)]
struct Draw {
    p1: Photometric,
    p2: Photometric,
    g: Geometric,
}

/// One epoch's training targets: every pixel's nearest centroid, per head and view, computed
/// in one pass with the clustering model (batch norm in inference mode) once the centroids are
/// final, as the authors' compute_labels does. Fixed labels keep the target still while the
/// embedder moves; labelling each training batch afresh from its own (training-mode) features
/// lets the target chase the model.
struct EpochLabels {
    /// [head][view]: image i's cells at i * per_image ..
    labels: [[Vec<u16>; 2]; 2],
    /// [head][view]: pixels per cluster, for the balance weights.
    counts: [[Vec<u64>; 2]; 2],
    per_image: usize,
}

impl EpochLabels {
    /// The batch's labels of one head and view, image after image.
    fn batch(&self, head: usize, view: usize, idx: &[usize]) -> Arc<[u16]> {
        let per = self.per_image;
        idx.iter().flat_map(|&i| self.labels[head][view][i * per..(i + 1) * per].iter().copied()).collect()
    }
}

/// Crops each image of the batch to its box (in cells of `scale` pixels), resizes it back to
/// the full size (bilinear, half-pixel), and flips it when drawn: G on images (scale 4) and on
/// feature maps (scale 1).
pub(crate) fn apply_geometric(x: Tensor<4>, geos: &[Geometric], scale: usize) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let windows: Vec<Window> =
        geos.iter().map(|g| Window { y0: g.y0 * scale, x0: g.x0 * scale, h: g.h * scale, w: g.w * scale, flip: g.flip }).collect();
    resample(x, &windows, [h, w])
}

/// The two network inputs of a batch: P1(x) (G applied later, on the tensor) and P2(x).
fn photometric_batch(frames: &Frames, idx: &[usize], draws: &[Draw], device: &Device) -> Result<(Tensor<4>, Tensor<4>)> {
    let (w, h) = (frames.width, frames.height);
    let mut a = Vec::with_capacity(idx.len() * 3 * w * h);
    let mut b = Vec::with_capacity(idx.len() * 3 * w * h);
    for (&i, frame) in idx.iter().zip(frames.batch(idx)?) {
        a.extend(frames.view(frame.clone(), &draws[i].p1));
        b.extend(frames.view(frame, &draws[i].p2));
    }
    let shape = [idx.len(), 3, h, w];
    Ok((Tensor::from_data(TensorData::new(a, shape), device), Tensor::from_data(TensorData::new(b, shape), device)))
}

/// The two views of a batch, and what the correspondence term compares.
struct Views {
    /// f(G(P1 x)), N x D x cells_h x cells_w.
    z1: Tensor<4>,
    /// G(f(P2 x)), the same shape.
    z2: Tensor<4>,
    /// f(P2 x) before G: the whole frame.
    z2_frame: Tensor<4>,
    /// The backbone's four taps of P2 x.
    taps: [Tensor<4>; 4],
}

/// The training step's views; the frozen taps from ONNX Runtime when given.
fn views(model: &Embedder, frozen: Option<&FrozenTaps>, p1: Tensor<4>, p2: Tensor<4>, geos: &[Geometric]) -> Result<Views> {
    let taps = |x: Tensor<4>| -> Result<[Tensor<4>; 4]> {
        Ok(match frozen {
            Some(f) => model.backbone.forward_from(f.run(x)?),
            None => model.backbone.forward(imagenet_normalize(x)),
        })
    };
    let z1 = l2_normalize(model.fpn.forward(taps(apply_geometric(p1, geos, OUTPUT_STRIDE))?));
    let taps = taps(p2)?;
    let z2_frame = l2_normalize(model.fpn.forward(taps.clone()));
    let z2 = apply_geometric(z2_frame.clone(), geos, 1);
    Ok(Views { z1, z2, z2_frame, taps })
}

/// The network an epoch's clustering and labelling passes run, without gradients. On the CPU
/// it is the epoch's weights exported to ONNX Runtime, which runs the same network several
/// times faster than burn's forward (batch norm folded, tuned convolutions): the passes were
/// most of an epoch's time. On a GPU device, or where ONNX Runtime cannot load, burn runs them.
enum PassNetwork {
    Burn(Box<Embedder>),
    Onnx(EmbedSession),
}

/// Which runtime the passes use: `onnx` (on the CPU; burn on a GPU device) or `burn`, read from
/// this variable when a trainer starts. `burn` is there to compare the two (`benches/train.rs`)
/// and as a way out should ONNX Runtime misbehave.
pub const TRAIN_PASSES_ENV: &str = "PICIE_TRAIN_PASSES";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassRuntime {
    Onnx,
    Burn,
}

impl PassRuntime {
    pub fn from_env() -> Result<Self> {
        match std::env::var(TRAIN_PASSES_ENV).ok().as_deref() {
            None | Some("") | Some("onnx") => Ok(PassRuntime::Onnx),
            Some("burn") => Ok(PassRuntime::Burn),
            Some(other) => bail!("{TRAIN_PASSES_ENV}={other}: expected onnx or burn"),
        }
    }
}

/// What an epoch's clustering and labelling passes share.
struct EpochInputs<'a> {
    net: &'a PassNetwork,
    frames: &'a Frames,
    draws: &'a [Draw],
    batches: &'a [Vec<usize>],
}

impl PassNetwork {
    fn for_epoch(model: &Embedder, config: EmbedderConfig, device: &Device, runtime: PassRuntime) -> Self {
        let valid = model.valid();
        if runtime == PassRuntime::Onnx && crate::model::on_flex(device) {
            // The passes cluster the FPN's features, never the served hypercolumn.
            let plain = EmbedderConfig { tap_weight: 0.0, ..config };
            let session = to_onnx_bytes(&valid, plain).and_then(|bytes| EmbedSession::from_bytes(&bytes, DeviceChoice::Cpu, None));
            match session {
                Ok(session) => return PassNetwork::Onnx(session),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "ONNX Runtime cannot run the training passes; burn runs them (slower)"),
            }
        }
        PassNetwork::Burn(Box::new(valid))
    }

    /// f(x) for N x 3 x H x W images in [0, 1].
    fn forward(&self, x: Tensor<4>) -> Result<Tensor<4>> {
        match self {
            PassNetwork::Burn(model) => Ok(model.forward(x)),
            PassNetwork::Onnx(session) => {
                let device = x.device();
                let (shape, features) = session.run(&to_array(x)?)?;
                Ok(Tensor::from_data(TensorData::new(features, shape), &device))
            }
        }
    }

    /// Both views of a batch, as pixel rows: [view] -> (N cells) x D, image-major. The clustering
    /// and labelling passes see the same.
    fn view_rows(&self, device: &Device, frames: &Frames, idx: &[usize], draws: &[Draw]) -> Result<[Vec<f32>; 2]> {
        let (p1, p2) = photometric_batch(frames, idx, draws, device)?;
        let geos: Vec<Geometric> = idx.iter().map(|&i| draws[i].g).collect();
        let z1 = self.forward(apply_geometric(p1, &geos, OUTPUT_STRIDE))?;
        let z2 = apply_geometric(self.forward(p2)?, &geos, 1);
        let rows = |z: Tensor<4>| pixels(z).into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"));
        Ok([rows(z1)?, rows(z2)?])
    }
}

/// Everything needed to continue a run.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CheckpointState {
    pub epochs_done: usize,
    pub config: TrainConfig,
    pub embedder: EmbedderConfig,
    pub losses: Vec<f32>,
}

pub const CHECKPOINT_WEIGHTS: &str = "weights.safetensors";
pub const CHECKPOINT_OPTIM: &str = "optimizer.bpk";
pub const CHECKPOINT_STATE: &str = "state.json";

/// The optimizer every training stage uses: Adam, no weight decay.
pub(crate) fn new_optimizer() -> ModuleOptimizer {
    AdamConfig::new().with_epsilon(1e-8).init()
}

/// The optimizer with the Adam state saved in a checkpoint folder.
pub(crate) fn load_optimizer(dir: &Path) -> Result<ModuleOptimizer> {
    let path = dir.join(CHECKPOINT_OPTIM);
    let record = burn::optim::OptimizerRecord::load(&path).map_err(|e| anyhow::anyhow!("{}: {e:?}", path.display()))?;
    Ok(new_optimizer().load_record(record))
}

/// Writes a checkpoint folder (weights, Adam state, `state` as JSON) to a temporary sibling,
/// then swaps it in: a crash leaves the previous checkpoint whole.
pub(crate) fn write_checkpoint(dir: &Path, weights: &TensorMap, optim: &ModuleOptimizer, state: &impl Serialize) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
    let tmp = parent.join(format!(".{name}.partial-{}", crate::util::unique()));
    std::fs::create_dir_all(&tmp)?;
    weights.save_safetensors(&tmp.join(CHECKPOINT_WEIGHTS))?;
    optim.to_record().save(tmp.join(CHECKPOINT_OPTIM)).map_err(|e| anyhow::anyhow!("saving the optimizer state: {e:?}"))?;
    std::fs::write(tmp.join(CHECKPOINT_STATE), serde_json::to_vec_pretty(state)?)?;
    crate::util::replace_dir(&tmp, dir)
}

pub struct Trainer {
    pub config: TrainConfig,
    pub embedder_config: EmbedderConfig,
    pub model: Embedder,
    optim: ModuleOptimizer,
    device: Device,
    pub epochs_done: usize,
    pub losses: Vec<f32>,
    /// Where the clustering and labelling passes run ([`PassRuntime`]).
    pub passes: PassRuntime,
    /// The frames in nearest-neighbour pairs, for the correspondence term's
    /// [`super::correspond::Partners::Nearest`]; worked out when a run starts.
    pairs: Option<Vec<(usize, usize)>>,
}

impl Trainer {
    /// Starts from weights (a pretrained backbone with a seeded FPN, or a package's embedder).
    pub fn new(config: TrainConfig, embedder_config: EmbedderConfig, weights: &TensorMap) -> Result<Self> {
        let device = super::device::training_device()?.autodiff();
        let mut model = Embedder::load(embedder_config, weights, &device)?;
        model.backbone = model.backbone.freeze_through(config.freeze_stride);
        let passes = PassRuntime::from_env()?;
        Ok(Self { config, embedder_config, model, optim: new_optimizer(), device, epochs_done: 0, losses: vec![], passes, pairs: None })
    }

    /// Continues from a checkpoint folder; its settings must match `config` (the epoch count may grow).
    pub fn resume(config: TrainConfig, embedder_config: EmbedderConfig, dir: &Path) -> Result<Self> {
        let state_path = dir.join(CHECKPOINT_STATE);
        let state: CheckpointState =
            serde_json::from_slice(&std::fs::read(&state_path).with_context(|| format!("reading {}", state_path.display()))?)
                .with_context(|| format!("{}: broken checkpoint state", state_path.display()))?;
        let same = TrainConfig { epochs: state.config.epochs, ..config.clone() };
        if same != state.config || state.embedder != embedder_config {
            bail!(
                "{}: the checkpoint was made with different settings ({:?}, {:?}); rerun with those or start without --resume",
                dir.display(),
                state.config,
                state.embedder
            );
        }
        let weights = TensorMap::load_safetensors(&dir.join(CHECKPOINT_WEIGHTS))?;
        let mut t = Self::new(config, embedder_config, &weights)?;
        t.optim = load_optimizer(dir)?;
        t.epochs_done = state.epochs_done;
        t.losses = state.losses;
        Ok(t)
    }

    fn draws(&self, epoch: usize, n: usize) -> Vec<Draw> {
        let default = PhotometricConfig::default();
        let c = PhotometricConfig { jitter: self.config.jitter.unwrap_or(default.jitter), ..default };
        let (cells_w, cells_h) = self.config.cells();
        (0..n)
            .map(|i| {
                let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ ((epoch as u64) << 32) ^ (i as u64).wrapping_mul(0x9E37_79B9));
                Draw {
                    p1: Photometric::sample(&mut rng, &c),
                    p2: Photometric::sample(&mut rng, &c),
                    g: Geometric::sample(&mut rng, cells_w, cells_h, self.config.min_crop),
                }
            })
            .collect()
    }

    /// The epoch's batches: the frames shuffled, or with nearest-neighbour pairs the pairs
    /// shuffled and each kept side by side (the batch is even, so a pair never straddles two).
    fn batches(&self, epoch: usize, n: usize) -> Vec<Vec<usize>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed.wrapping_add(epoch as u64 * 7919));
        let order: Vec<usize> = match &self.pairs {
            Some(pairs) => {
                let mut pairs = pairs.clone();
                pairs.shuffle(&mut rng);
                pairs.into_iter().flat_map(|(a, b)| [a, b]).collect()
            }
            None => {
                let mut order: Vec<usize> = (0..n).collect();
                order.shuffle(&mut rng);
                order
            }
        };
        order.chunks(self.config.batch).map(|c| c.to_vec()).collect()
    }

    /// The training frames in nearest-neighbour pairs ([`nearest_pairs`]) by the backbone's
    /// teacher taps of each frame as it is, before any view is drawn.
    fn frame_pairs(&self, frames: &Frames) -> Result<Vec<(usize, usize)>> {
        let model = self.model.valid();
        let device = self.device.clone().inner();
        let (w, h) = (frames.width, frames.height);
        let all: Vec<usize> = (0..frames.len()).collect();
        let mut descriptors = vec![];
        for idx in all.chunks(self.config.batch) {
            let mut x = Vec::with_capacity(idx.len() * 3 * w * h);
            for frame in frames.batch(idx)? {
                x.extend(frames.view(frame, &Photometric::IDENTITY));
            }
            let x = Tensor::from_data(TensorData::new(x, [idx.len(), 3, h, w]), &device);
            let taps = model.backbone.forward(imagenet_normalize(x));
            descriptors.extend(frame_descriptors(&taps).map_err(|e| anyhow::anyhow!("{e:?}"))?);
        }
        Ok(nearest_pairs(&descriptors, descriptors.len() / frames.len().max(1)))
    }

    /// Progress after `step` batches of a pass begun at `start` (two views per image).
    fn progress(&self, epoch: usize, phase: Phase, step: usize, steps: usize, loss: Option<f32>, start: Instant) -> Progress {
        let (w, h) = self.config.frame();
        let px = (step * self.config.batch * 2 * w * h) as f64;
        Progress { epoch, epochs: self.config.epochs, phase, step, steps, loss, pixels_per_sec: px / start.elapsed().as_secs_f64() }
    }

    /// The clustering pass: four mini-batch k-means (two views x two heads) on this epoch's views.
    fn cluster(
        &self,
        EpochInputs { net, frames, draws, batches }: &EpochInputs<'_>,
        epoch: usize,
        on: &mut dyn FnMut(&Progress) -> bool,
    ) -> Result<Option<[[SphericalKMeans; 2]; 2]>> {
        let dim = self.embedder_config.dim;
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ 0xC1u64 ^ epoch as u64);
        let mut sample = [Vec::<f32>::new(), Vec::<f32>::new()];
        let mut km: Option<[[SphericalKMeans; 2]; 2]> = None;
        let init_batches = self.config.init_batches.min(batches.len()).max(1);
        let per = self.config.cells_per_image();
        let per_image = self.config.vectors_per_image.min(per);
        let start = Instant::now();
        for (b, idx) in batches.iter().enumerate() {
            let mut rows = [vec![], vec![]];
            for (v, data) in net.view_rows(&self.device.clone().inner(), frames, idx, draws)?.into_iter().enumerate() {
                for img in 0..idx.len() {
                    for _ in 0..per_image {
                        let p = img * per + rng.random_range(0..per);
                        rows[v].extend_from_slice(&data[p * dim..(p + 1) * dim]);
                    }
                }
            }
            match &mut km {
                None => {
                    sample[0].extend_from_slice(&rows[0]);
                    sample[1].extend_from_slice(&rows[1]);
                    if b + 1 == init_batches {
                        let init = |v: usize, k: usize, salt: u64| {
                            SphericalKMeans::init(&sample[v], dim, KMeansConfig::new(k, self.config.seed ^ salt ^ epoch as u64))
                        };
                        km = Some([
                            [init(0, self.config.k, 1)?, init(1, self.config.k, 2)?],
                            [init(0, self.config.k2, 3)?, init(1, self.config.k2, 4)?],
                        ]);
                    }
                }
                Some(km) => {
                    for head in km.iter_mut() {
                        head[0].update(&rows[0]);
                        head[1].update(&rows[1]);
                    }
                }
            }
            let p = self.progress(epoch, Phase::Cluster, b + 1, batches.len(), None, start);
            if !on(&p) {
                return Ok(None);
            }
        }
        Ok(km)
    }

    /// The labelling pass: each view's pixels against the final centroids of both heads.
    fn label(
        &self,
        EpochInputs { net, frames, draws, batches }: &EpochInputs<'_>,
        km: &[[SphericalKMeans; 2]; 2],
        epoch: usize,
        on: &mut dyn FnMut(&Progress) -> bool,
    ) -> Result<Option<EpochLabels>> {
        let dim = self.embedder_config.dim;
        let per = self.config.cells_per_image();
        let n = frames.len();
        let mut labels: [[Vec<u16>; 2]; 2] = std::array::from_fn(|_| std::array::from_fn(|_| vec![0u16; n * per]));
        let mut counts: [[Vec<u64>; 2]; 2] = std::array::from_fn(|h| std::array::from_fn(|v| vec![0u64; km[h][v].k]));
        let start = Instant::now();
        for (b, idx) in batches.iter().enumerate() {
            for (v, data) in net.view_rows(&self.device.clone().inner(), frames, idx, draws)?.into_iter().enumerate() {
                for h in 0..2 {
                    let (nearest, _) = assign(&data, dim, &km[h][v].centroids);
                    for (j, &i) in idx.iter().enumerate() {
                        for (dst, &l) in labels[h][v][i * per..(i + 1) * per].iter_mut().zip(&nearest[j * per..(j + 1) * per]) {
                            *dst = l as u16;
                            counts[h][v][l as usize] += 1;
                        }
                    }
                }
            }
            let p = self.progress(epoch, Phase::Label, b + 1, batches.len(), None, start);
            if !on(&p) {
                return Ok(None);
            }
        }
        Ok(Some(EpochLabels { labels, counts, per_image: per }))
    }

    /// Runs the remaining epochs. `on` sees every step and returns false to stop; the last
    /// completed epoch's checkpoint is kept. Returns whether all epochs ran.
    pub fn run(&mut self, frames: &Frames, checkpoint_dir: &Path, on: &mut dyn FnMut(&Progress) -> bool) -> Result<bool> {
        self.run_to(self.config.epochs, frames, checkpoint_dir, on)
    }

    /// [`Trainer::run`], stopping after `epochs` of the run's epochs are done (at most all).
    pub fn run_to(&mut self, epochs: usize, frames: &Frames, checkpoint_dir: &Path, on: &mut dyn FnMut(&Progress) -> bool) -> Result<bool> {
        self.config.validate(frames.len())?;
        let (w1, w2) = head_weights(self.config.k, self.config.k2);
        let frozen = self.frozen_taps();
        if self.config.correspondence.pairs_neighbours() && self.pairs.is_none() && self.epochs_done < epochs.min(self.config.epochs) {
            let pairs = self.frame_pairs(frames)?;
            tracing::info!(pairs = pairs.len(), "frames paired with their nearest neighbours for the correspondence term");
            self.pairs = Some(pairs);
        }
        while self.epochs_done < epochs.min(self.config.epochs) {
            let epoch = self.epochs_done;
            let draws = self.draws(epoch, frames.len());
            let batches = self.batches(epoch, frames.len());
            let net = PassNetwork::for_epoch(&self.model, self.embedder_config, &self.device.clone().inner(), self.passes);
            let inputs = EpochInputs { net: &net, frames, draws: &draws, batches: &batches };
            let Some(km) = self.cluster(&inputs, epoch, on)? else { return Ok(false) };
            let Some(labels) = self.label(&inputs, &km, epoch, on)? else { return Ok(false) };
            drop(net);
            let heads = km
                .iter()
                .enumerate()
                .map(|(h, head)| HeadValues {
                    centroids: [head[0].centroids.clone(), head[1].centroids.clone()],
                    weights: [self.config.balance.weights(&labels.counts[h][0]), self.config.balance.weights(&labels.counts[h][1])],
                    k: head[0].k,
                })
                .collect();
            let targets = StepTargets::new(heads, vec![w1, w2], self.embedder_config.dim, &self.device);

            let start = Instant::now();
            let mut total = 0.0f64;
            let mut pair_rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ 0xC0DE ^ ((epoch as u64) << 16));
            for (b, idx) in batches.iter().enumerate() {
                let (p1, p2) = photometric_batch(frames, idx, &draws, &self.device)?;
                let geos: Vec<Geometric> = idx.iter().map(|&i| draws[i].g).collect();
                let Views { z1, z2, z2_frame, taps } = views(&self.model, frozen.as_ref(), p1, p2, &geos)?;
                let y = |h: usize| [labels.batch(h, 0, idx), labels.batch(h, 1, idx)];
                let mut loss = targets.loss([z1, z2], &[y(0), y(1)]);
                if self.config.correspondence.enabled() {
                    let term = correspondence_loss(z2_frame, &taps, &self.config.correspondence, &mut pair_rng);
                    tracing::debug!(
                        step = b + 1,
                        clustering = loss.clone().into_scalar::<f32>(),
                        correspondence = term.clone().into_scalar::<f32>(),
                        "loss terms"
                    );
                    loss = loss + term;
                }
                let value: f32 = loss.clone().into_scalar();
                if !value.is_finite() {
                    bail!("the loss became {value} at epoch {} step {}; lower the learning rate", epoch + 1, b + 1);
                }
                let grads = GradientsParams::from_grads(loss.backward(), &self.model);
                self.model = self.optim.step(self.config.lr, self.model.clone(), grads);
                total += value as f64;
                let p = self.progress(epoch, Phase::Train, b + 1, batches.len(), Some((total / (b + 1) as f64) as f32), start);
                if !on(&p) {
                    return Ok(false);
                }
            }
            self.losses.push((total / batches.len() as f64) as f32);
            self.epochs_done += 1;
            self.save_checkpoint(checkpoint_dir)?;
        }
        Ok(true)
    }

    /// The frozen layers in ONNX Runtime, where the passes run there too and something is frozen
    /// (their weights never change during a run, so one session serves it all).
    fn frozen_taps(&self) -> Option<FrozenTaps> {
        let n = self.model.backbone.frozen_taps(self.config.freeze_stride);
        if n == 0 || self.passes != PassRuntime::Onnx || !crate::model::on_flex(&self.device.clone().inner()) {
            return None;
        }
        match FrozenTaps::new(&self.model.valid(), n) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "ONNX Runtime cannot run the frozen layers; burn runs them (slower)");
                None
            }
        }
    }

    /// Writes weights, optimizer state and progress to a temporary folder, then swaps it in.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let state = CheckpointState {
            epochs_done: self.epochs_done,
            config: self.config.clone(),
            embedder: self.embedder_config,
            losses: self.losses.clone(),
        };
        write_checkpoint(dir, &self.weights(), &self.optim, &state)
    }

    pub fn weights(&self) -> TensorMap {
        self.model.valid().to_tensor_map("picie train")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_settings_read_and_write_as_before_width_existed() {
        // Checkpoints written before `width` existed resume as square frames, and square runs
        // still write the same settings.
        let old = serde_json::to_value(TrainConfig::default()).unwrap();
        assert!(old.get("width").is_none());
        let read: TrainConfig = serde_json::from_value(old).unwrap();
        assert_eq!(read, TrainConfig::default());
        assert_eq!(read.frame(), (320, 320));
        let wide = TrainConfig { size: 352, width: Some(480), ..TrainConfig::default() };
        assert_eq!((wide.frame(), wide.cells(), wide.cells_per_image()), ((480, 352), (120, 88), 120 * 88));
    }

    /// A trainer on a seeded embedder, for what needs no frames.
    fn test_trainer(config: TrainConfig) -> Trainer {
        let embedder_config = EmbedderConfig::new(crate::model::BackboneKind::EfficientnetLite0);
        Trainer {
            config,
            embedder_config,
            model: Embedder::seeded(embedder_config, 0, &Device::flex().autodiff()).unwrap(),
            optim: new_optimizer(),
            device: Device::flex().autodiff(),
            epochs_done: 0,
            losses: vec![],
            passes: PassRuntime::Onnx,
            pairs: None,
        }
    }

    #[test]
    fn nearest_neighbour_pairs_are_batched_side_by_side() {
        let pairs = vec![(0, 3), (1, 2), (4, 5), (6, 7)];
        let paired = Trainer { pairs: Some(pairs.clone()), ..test_trainer(TrainConfig { batch: 4, ..TrainConfig::default() }) };
        for epoch in 0..3 {
            let batches = paired.batches(epoch, 8);
            assert_eq!(batches.len(), 2);
            for b in &batches {
                assert!(b.chunks(2).all(|p| pairs.contains(&(p[0], p[1]))), "{b:?}");
            }
            let mut all: Vec<usize> = batches.concat();
            all.sort_unstable();
            assert_eq!(all, (0..8).collect::<Vec<_>>());
        }
        // An odd batch would split a pair.
        let nearest = CorrespondenceConfig { weight: 1.0, partners: crate::train::correspond::Partners::Nearest, ..Default::default() };
        assert!(TrainConfig { batch: 3, correspondence: nearest, ..TrainConfig::default() }.check().is_err());
        TrainConfig { batch: 4, correspondence: nearest, ..TrainConfig::default() }.check().unwrap();
    }

    #[test]
    fn jitter_widens_the_photometric_range_and_is_checked() {
        for bad in [1.0, -0.1, f32::NAN] {
            assert!(TrainConfig { jitter: Some(bad), ..TrainConfig::default() }.check().is_err(), "{bad}");
        }
        let wide = TrainConfig { jitter: Some(0.6), ..TrainConfig::default() };
        wide.check().unwrap();
        let factors = |t: &Trainer| -> Vec<f32> { t.draws(0, 200).iter().filter_map(|d| d.p1.brightness).collect() };
        let (narrow, wide) = (factors(&test_trainer(TrainConfig::default())), factors(&test_trainer(wide)));
        assert!(narrow.iter().all(|f| (0.7..=1.3).contains(f)));
        assert!(wide.iter().all(|f| (0.4..=1.6).contains(f)) && wide.iter().any(|f| !(0.7..=1.3).contains(f)));
        // Unset, it is not written: checkpoints and manifests read as before.
        assert!(serde_json::to_value(TrainConfig::default()).unwrap().get("jitter").is_none());
    }

    #[test]
    fn min_crop_bounds_the_crop_and_is_checked() {
        for bad in [0.0, -0.5, 1.01, f32::NAN] {
            assert!(TrainConfig { min_crop: bad, ..TrainConfig::default() }.check().is_err(), "{bad}");
        }
        let (_, cells_h) = TrainConfig::default().cells();
        let heights = |min_crop: f32| -> Vec<usize> {
            test_trainer(TrainConfig { min_crop, ..TrainConfig::default() }).draws(0, 200).iter().map(|d| d.g.h).collect()
        };
        let (half, fifth) = (heights(0.5), heights(0.2));
        let floor = |f: f32| (cells_h as f32 * f).round() as usize;
        assert!(half.iter().all(|h| (floor(0.5)..=cells_h).contains(h)));
        assert!(fifth.iter().all(|h| (floor(0.2)..=cells_h).contains(h)) && fifth.iter().any(|h| *h < floor(0.5)));
        // 1 keeps the whole frame: only the flip varies.
        assert!(heights(1.0).iter().all(|h| *h == cells_h));
    }

    /// The passes run the epoch's weights through ONNX Runtime on the CPU, and see the features
    /// burn's forward gives, hypercolumn settings or not.
    #[test]
    fn the_passes_run_the_current_weights_in_onnx_runtime() {
        use crate::model::BackboneKind;
        let device = Device::flex();
        let config = EmbedderConfig { tap_weight: 0.5, ..EmbedderConfig::new(BackboneKind::EfficientnetLite0) };
        let model = Embedder::seeded(config, 7, &device.clone().autodiff()).unwrap();
        let net = PassNetwork::for_epoch(&model, config, &device, PassRuntime::Onnx);
        assert!(matches!(net, PassNetwork::Onnx(_)), "on the CPU the passes run in ONNX Runtime");
        let n = 2 * 3 * 64 * 96;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
        let x = || Tensor::<4>::from_data(TensorData::new(x.clone(), [2, 3, 64, 96]), &device);
        let onnx = net.forward(x()).unwrap();
        let burn = model.valid().forward(x());
        assert_eq!(onnx.dims(), [2, config.dim, 16, 24]);
        let worst = (onnx - burn).abs().max().into_scalar::<f32>();
        assert!(worst < 1e-4, "ONNX Runtime and burn differ by {worst}");
    }
}
