//! Self-training: after PiCIE, the embedder learns from its own refined cluster labels. Each
//! training frame is segmented once by the PiCIE package at a quality with the dense CRF (so
//! the labels follow the image's edges), the confident pixels become per-cell targets, and the
//! embedder is trained with the clustering loss (cross-entropy over -cosine-distance logits)
//! towards the package's classes, which stay fixed (a class merged from over-clusters by its
//! nearest member): the result is still features + those classes, and they keep their names.
//! Each step sees a photometric view and a random crop and flip of the frame, the targets
//! cropped and flipped with it. This is the step U2Seg and CUPS use to turn cluster labels into
//! a sharper segmenter.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::augment::{Geometric, Photometric, PhotometricConfig};
use super::loss::{pixels, scaled_class_loss, Balance, ClassVectors};
use super::picie::{
    apply_geometric, load_optimizer, new_optimizer, write_checkpoint, Frames, Progress, CHECKPOINT_STATE, CHECKPOINT_WEIGHTS,
};
use crate::infer::{assign, refine_scores_with_confidence, CrfConfig, Quality, Segmenter};
use crate::model::embedder::OUTPUT_STRIDE;
use crate::model::{Embedder, EmbedderConfig, TensorMap};
use crate::package::Centroids;

/// A cell whose target is unknown (its pixels disagree or the CRF is unsure).
const IGNORE: u16 = u16::MAX;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelfTrainConfig {
    pub epochs: usize,
    pub lr: f64,
    /// How the targets are made: a quality with the CRF (`crf` or `best`) for edge-aligned ones.
    pub quality: Quality,
    /// A cell is a target only if the CRF's mean marginal over its majority pixels is at least this...
    pub min_confidence: f32,
    /// ...and at least this fraction of its pixels share the majority label.
    pub min_agreement: f32,
    pub balance: Balance,
    /// The logits are -cosine distance divided by this (1: PiCIE's own loss).
    #[serde(default = "unit_temperature")]
    pub temperature: f32,
}

fn unit_temperature() -> f32 {
    1.0
}

impl Default for SelfTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 2,
            lr: 1e-4,
            quality: Quality::Best,
            min_confidence: 0.8,
            min_agreement: 0.75,
            balance: Balance::Inverse,
            temperature: 1.0,
        }
    }
}

/// Per training frame, one target per feature cell (`IGNORE` where unknown).
pub struct PseudoLabels {
    pub cells: (usize, usize),
    pub labels: Vec<u16>,
    /// Target cells per class, for the balance weights.
    pub counts: Vec<u64>,
}

impl PseudoLabels {
    /// The share of cells that are targets.
    pub fn kept(&self) -> f64 {
        self.labels.iter().filter(|&&l| l != IGNORE).count() as f64 / self.labels.len().max(1) as f64
    }
}

/// A 3 x h x w plane in [0, 1] as an 8-bit image (the training frame as the server would see it).
fn frame_image(planes: &[f32], w: usize, h: usize) -> RgbImage {
    let n = w * h;
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        image::Rgb(std::array::from_fn(|c| (planes[c * n + i] * 255.0).round().clamp(0.0, 255.0) as u8))
    })
}

/// Cell targets of one frame's pixel labels: the majority label of each stride x stride block,
/// kept when enough of the block agrees and the CRF is sure enough of those pixels.
fn cell_targets(labels: &[u8], confidence: &[f32], w: usize, h: usize, config: &SelfTrainConfig, k: usize) -> Vec<u16> {
    let s = OUTPUT_STRIDE;
    let (cw, ch) = (w / s, h / s);
    let mut out = vec![IGNORE; cw * ch];
    let mut votes = vec![0usize; k];
    let mut sure = vec![0f32; k];
    for cy in 0..ch {
        for cx in 0..cw {
            votes.iter_mut().for_each(|v| *v = 0);
            sure.iter_mut().for_each(|v| *v = 0.0);
            for y in cy * s..(cy + 1) * s {
                for x in cx * s..(cx + 1) * s {
                    let l = labels[y * w + x] as usize;
                    votes[l] += 1;
                    sure[l] += confidence[y * w + x];
                }
            }
            let best = (0..k).max_by_key(|&c| votes[c]).unwrap_or(0);
            let n = votes[best];
            if n as f32 >= config.min_agreement * (s * s) as f32 && sure[best] / n as f32 >= config.min_confidence {
                out[cy * cw + cx] = best as u16;
            }
        }
    }
    out
}

/// Segments every training frame with `seg` at the configured quality and keeps the confident
/// cells. `on` sees (frames done, frames) and returns false to stop (then None).
pub fn pseudo_labels(
    seg: &Segmenter,
    frames: &Frames,
    config: &SelfTrainConfig,
    crf: &CrfConfig,
    on: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Option<PseudoLabels>> {
    let (w, h) = (frames.width, frames.height);
    let k = seg.k();
    let mut labels = Vec::with_capacity(frames.len() * (w / OUTPUT_STRIDE) * (h / OUTPUT_STRIDE));
    for i in 0..frames.len() {
        let img = frame_image(&frames.frame(i)?, w, h);
        let features = seg.embed_with(std::slice::from_ref(&img), config.quality.flip())?.remove(0);
        // The classes as the package scores them (merged over-clusters included).
        let scores = seg.scores(&features);
        let (mask, confidence) = if config.quality.crf() {
            refine_scores_with_confidence(&features, &scores, k, &img, crf)
        } else {
            let mask = assign::labels_at_original_size(&scores, k, (features.width, features.height), &features.geometry);
            let n = mask.labels.len();
            (mask, vec![1.0; n])
        };
        labels.extend(cell_targets(&mask.labels, &confidence, w, h, config, k));
        if !on(i + 1, frames.len()) {
            return Ok(None);
        }
    }
    let mut counts = vec![0u64; k];
    for &l in labels.iter().filter(|&&l| l != IGNORE) {
        counts[l as usize] += 1;
    }
    Ok(Some(PseudoLabels { cells: (w / OUTPUT_STRIDE, h / OUTPUT_STRIDE), labels, counts }))
}

/// The targets of frame `i` as the network sees the frame after `g`: crop box (in cells),
/// nearest resize back to the full grid, then the flip, as `apply_geometric` does to images.
fn transformed_targets(labels: &PseudoLabels, i: usize, g: &Geometric) -> Vec<u16> {
    let (cw, ch) = labels.cells;
    let src = &labels.labels[i * cw * ch..(i + 1) * cw * ch];
    let mut out = vec![IGNORE; cw * ch];
    for v in 0..ch {
        let sy = g.y0 + ((v as f32 + 0.5) * g.h as f32 / ch as f32) as usize;
        for u in 0..cw {
            let su = if g.flip { cw - 1 - u } else { u };
            let sx = g.x0 + ((su as f32 + 0.5) * g.w as f32 / cw as f32) as usize;
            out[v * cw + u] = src[sy.min(ch - 1) * cw + sx.min(cw - 1)];
        }
    }
    out
}

/// Progress of the self-training stage, in its own epochs.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SelfTrainState {
    pub epochs_done: usize,
    pub config: SelfTrainConfig,
    pub losses: Vec<f32>,
}

pub struct SelfTrainer {
    pub config: SelfTrainConfig,
    /// Frame size, batch, seed, crop range and frozen layers, as in the PiCIE stage.
    pub train: super::picie::TrainConfig,
    pub model: Embedder,
    optim: ModuleOptimizer,
    device: Device,
    pub epochs_done: usize,
    pub losses: Vec<f32>,
}

impl SelfTrainer {
    pub fn new(config: SelfTrainConfig, train: super::picie::TrainConfig, embedder: EmbedderConfig, weights: &TensorMap) -> Result<Self> {
        let device = super::device::training_device()?.autodiff();
        let mut model = Embedder::load(embedder, weights, &device)?;
        model.backbone = model.backbone.freeze_through(train.freeze_stride);
        Ok(Self { config, train, model, optim: new_optimizer(), device, epochs_done: 0, losses: vec![] })
    }

    /// Continues from `dir` when it holds a checkpoint of the same settings; otherwise starts anew.
    pub fn resume_or_new(
        config: SelfTrainConfig,
        train: super::picie::TrainConfig,
        embedder: EmbedderConfig,
        weights: &TensorMap,
        dir: &Path,
    ) -> Result<Self> {
        let state_path = dir.join(CHECKPOINT_STATE);
        if let Ok(bytes) = std::fs::read(&state_path) {
            let state: SelfTrainState =
                serde_json::from_slice(&bytes).with_context(|| format!("{}: broken checkpoint state", state_path.display()))?;
            if (SelfTrainConfig { epochs: config.epochs, ..state.config.clone() }) == config {
                let weights = TensorMap::load_safetensors(&dir.join(CHECKPOINT_WEIGHTS))?;
                let mut t = Self::new(config, train, embedder, &weights)?;
                t.optim = load_optimizer(dir)?;
                t.epochs_done = state.epochs_done;
                t.losses = state.losses;
                tracing::info!(epochs_done = t.epochs_done, "resuming self-training from {}", dir.display());
                return Ok(t);
            }
            tracing::warn!("{}: a self-training checkpoint of other settings; starting over", dir.display());
        }
        Self::new(config, train, embedder, weights)
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let state = SelfTrainState { epochs_done: self.epochs_done, config: self.config.clone(), losses: self.losses.clone() };
        write_checkpoint(dir, &self.weights(), &self.optim, &state)
    }

    pub fn weights(&self) -> TensorMap {
        self.model.valid().to_tensor_map("picie self-train")
    }

    /// Trains the remaining epochs towards the package's classes (fixed; a merged class scored
    /// by its best member, as inference scores it) on the targets. `on` returns false to stop
    /// (the last epoch's checkpoint is kept). Returns whether all ran.
    pub fn run(
        &mut self,
        frames: &Frames,
        targets: &PseudoLabels,
        centroids: &Centroids,
        checkpoint: &Path,
        on: &mut dyn FnMut(&Progress) -> bool,
    ) -> Result<bool> {
        let k = targets.counts.len();
        if centroids.k() != k {
            bail!("self-training targets {k} classes, the package has {}", centroids.k());
        }
        if targets.counts.iter().all(|&c| c == 0) {
            bail!("self-training found no confident pixels to learn from");
        }
        let classes = ClassVectors::from_centroids(centroids, &self.device);
        let ws = self.config.balance.weights(&targets.counts);
        let weights = Tensor::<1>::from_data(TensorData::new(ws.clone(), [k]), &self.device);
        let (cw, ch) = targets.cells;
        let photometric = PhotometricConfig::default();
        while self.epochs_done < self.config.epochs {
            let epoch = self.epochs_done;
            let mut rng = ChaCha8Rng::seed_from_u64(self.train.seed ^ 0x5E1F ^ ((epoch as u64) << 32));
            let mut order: Vec<usize> = (0..frames.len()).collect();
            order.shuffle(&mut rng);
            let batches: Vec<Vec<usize>> = order.chunks(self.train.batch).map(|c| c.to_vec()).collect();
            let start = Instant::now();
            let mut total = 0.0f64;
            let mut steps = 0usize;
            for (b, idx) in batches.iter().enumerate() {
                let draws: Vec<(Photometric, Geometric)> = idx
                    .iter()
                    .map(|_| (Photometric::sample(&mut rng, &photometric), Geometric::sample(&mut rng, cw, ch, self.train.min_crop)))
                    .collect();
                let mut input = Vec::with_capacity(idx.len() * 3 * frames.width * frames.height);
                for (frame, (p, _)) in frames.batch(idx)?.into_iter().zip(&draws) {
                    input.extend(frames.view(frame, p));
                }
                let x = Tensor::<4>::from_data(TensorData::new(input, [idx.len(), 3, frames.height, frames.width]), &self.device);
                let geos: Vec<Geometric> = draws.iter().map(|d| d.1).collect();
                let y: Vec<u16> = idx.iter().zip(&geos).flat_map(|(&i, g)| transformed_targets(targets, i, g)).collect();
                let keep: Vec<i64> = y.iter().enumerate().filter(|(_, &l)| l != IGNORE).map(|(r, _)| r as i64).collect();
                if keep.is_empty() {
                    continue;
                }
                let labels: Vec<i64> = y.iter().filter(|&&l| l != IGNORE).map(|&l| l as i64).collect();
                let z = pixels(self.model.forward(apply_geometric(x, &geos, OUTPUT_STRIDE)));
                let n = keep.len();
                let rows = Tensor::<1, Int>::from_data(TensorData::new(keep, [n]), &self.device);
                let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [n]), &self.device);
                let loss = scaled_class_loss(z.select(0, rows), labels, &classes, weights.clone(), self.config.temperature);
                let value: f32 = loss.clone().into_scalar();
                if !value.is_finite() {
                    bail!("the self-training loss became {value} at epoch {} step {}; lower the learning rate", epoch + 1, b + 1);
                }
                let grads = GradientsParams::from_grads(loss.backward(), &self.model);
                self.model = self.optim.step(self.config.lr, self.model.clone(), grads);
                total += value as f64;
                steps += 1;
                let px = ((b + 1) * self.train.batch * frames.width * frames.height) as f64;
                let p = Progress {
                    epoch,
                    epochs: self.config.epochs,
                    phase: super::picie::Phase::SelfTrain,
                    step: b + 1,
                    steps: batches.len(),
                    loss: Some((total / steps as f64) as f32),
                    pixels_per_sec: px / start.elapsed().as_secs_f64(),
                };
                if !on(&p) {
                    return Ok(false);
                }
            }
            self.losses.push((total / steps.max(1) as f64) as f32);
            self.epochs_done += 1;
            self.save_checkpoint(checkpoint)?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_keep_only_agreeing_confident_blocks() {
        // An 8 x 4 frame: two cells. The left block is all class 1 and sure; the right block
        // is split 10 / 6, below the 75 % agreement.
        let (w, h) = (8, 4);
        let mut labels = vec![1u8; w * h];
        for y in 0..4 {
            for x in 4..8 {
                labels[y * w + x] = if y * 4 + (x - 4) < 10 { 2 } else { 0 };
            }
        }
        let conf = vec![0.9; w * h];
        let c = SelfTrainConfig::default();
        assert_eq!(cell_targets(&labels, &conf, w, h, &c, 3), vec![1, IGNORE]);
        // Unsure pixels drop the cell as well.
        let unsure = vec![0.5; w * h];
        assert_eq!(cell_targets(&labels, &unsure, w, h, &c, 3), vec![IGNORE, IGNORE]);
    }

    #[test]
    fn targets_follow_the_crop_and_the_flip() {
        // A 4 x 2 grid numbered 0..8; crop the right half (2 x 1 cells at x0 = 2, y0 = 1).
        let t = PseudoLabels { cells: (4, 2), labels: (0..8).collect(), counts: vec![1; 8] };
        let g = Geometric { x0: 2, y0: 1, w: 2, h: 1, flip: false };
        assert_eq!(transformed_targets(&t, 0, &g), vec![6, 6, 7, 7, 6, 6, 7, 7]);
        let flipped = Geometric { flip: true, ..g };
        assert_eq!(transformed_targets(&t, 0, &flipped), vec![7, 7, 6, 6, 7, 7, 6, 6]);
        let whole = Geometric { x0: 0, y0: 0, w: 4, h: 2, flip: false };
        assert_eq!(transformed_targets(&t, 0, &whole), (0..8).collect::<Vec<u16>>());
    }

    #[test]
    fn frames_round_trip_to_images() {
        let planes: Vec<f32> = (0..3 * 6).map(|i| (i as f32 * 13.0 % 256.0) / 255.0).collect();
        let img = frame_image(&planes, 3, 2);
        assert_eq!(crate::infer::preprocess::rgb_planes(&img), planes.iter().map(|v| (v * 255.0).round() / 255.0).collect::<Vec<_>>());
    }
}
