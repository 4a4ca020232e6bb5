//! Inference: ONNX Runtime session, image preprocessing, pixel-to-centroid assignment.

pub mod assign;
pub mod crf;
pub mod guided;
pub mod guided_graph;
pub mod lattice;
pub mod normalize;
pub mod preprocess;
pub mod runtime;
pub mod session;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use image::RgbImage;
use ndarray::Array4;
use serde::{Deserialize, Serialize};

pub use assign::{ClassScorer, LabelMask};
pub use crf::CrfConfig;
pub use guided::GuidedConfig;
pub use guided_graph::GuidedGraph;
pub use preprocess::{decode_image, DecodeError, Geometry};
pub use session::{DeviceChoice, EmbedSession, Provider};

use crate::model::embedder::OUTPUT_STRIDE;
use crate::package::{InputPolicy, Package};

/// Per-pixel features of one image: dim x h x w at stride 4 of the padded input.
#[derive(Clone, Debug)]
pub struct FeatureMap {
    pub dim: usize,
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
    pub geometry: Geometry,
}

impl FeatureMap {
    /// The (width, height) in cells of the part that covers the image itself.
    pub fn valid_size(&self) -> (usize, usize) {
        (
            (self.geometry.resized.0 as usize).div_ceil(OUTPUT_STRIDE).min(self.width),
            (self.geometry.resized.1 as usize).div_ceil(OUTPUT_STRIDE).min(self.height),
        )
    }

    /// The feature cells that cover the image itself, not the padding, as row vectors.
    pub fn valid_vectors(&self) -> Vec<f32> {
        let (vw, vh) = self.valid_size();
        let hw = self.width * self.height;
        let mut out = Vec::with_capacity(vw * vh * self.dim);
        for y in 0..vh {
            for x in 0..vw {
                let p = y * self.width + x;
                out.extend((0..self.dim).map(|d| self.data[d * hw + p]));
            }
        }
        out
    }
}

/// Runs the embedder on a batch of images of any sizes: each is resized per the policy and all
/// are padded to one canvas, so the batch is one ONNX Runtime call. With `policy.flip` the batch
/// also holds each canvas mirrored left to right, and an image's features are the mean of its
/// own and its mirror's mirrored back (renormalised). The whole canvas is mirrored, padding
/// included, so the mirrored feature map lines up cell for cell with the original's.
pub fn embed_batch(session: &EmbedSession, policy: &InputPolicy, images: &[RgbImage]) -> Result<Vec<FeatureMap>> {
    if images.is_empty() {
        return Ok(vec![]);
    }
    let geoms: Vec<Geometry> = images.iter().map(|i| preprocess::geometry(i.width(), i.height(), policy)).collect();
    let cw = geoms.iter().map(|g| g.padded.0).max().unwrap_or(0);
    let ch = geoms.iter().map(|g| g.padded.1).max().unwrap_or(0);
    let plane = 3 * cw as usize * ch as usize;
    let count = images.len();
    let copies = if policy.flip { 2 } else { 1 };
    let mut input = vec![0f32; copies * count * plane];
    let (own, mirrored) = input.split_at_mut(count * plane);
    own.chunks_mut(plane).zip(images.iter().zip(&geoms)).for_each(|(out, (img, g))| {
        preprocess::fill_input(img, g, policy.normalize, (cw, ch), out);
    });
    if policy.flip {
        for (src, dst) in own.chunks(cw as usize).zip(mirrored.chunks_mut(cw as usize)) {
            dst.iter_mut().zip(src.iter().rev()).for_each(|(d, s)| *d = *s);
        }
    }
    let input = Array4::from_shape_vec((copies * count, 3, ch as usize, cw as usize), input)?;
    let ([_, dim, h, w], data) = session.run(&input)?;
    let per = dim * h * w;
    Ok((0..count)
        .map(|i| {
            let mut features = data[i * per..(i + 1) * per].to_vec();
            if policy.flip {
                let back = &data[(count + i) * per..(count + i + 1) * per];
                average_mirrored(&mut features, back, dim, w);
            }
            FeatureMap { dim, width: w, height: h, data: features, geometry: geoms[i] }
        })
        .collect())
}

/// `features` (dim x h x w) becomes the unit-normalised mean of itself and `mirrored`, the
/// features of the mirrored image, mirrored back.
fn average_mirrored(features: &mut [f32], mirrored: &[f32], dim: usize, w: usize) {
    for (row, mrow) in features.chunks_mut(w).zip(mirrored.chunks(w)) {
        row.iter_mut().zip(mrow.iter().rev()).for_each(|(f, m)| *f += *m);
    }
    let hw = features.len() / dim;
    let mut norms = vec![0f32; hw];
    for plane in features.chunks(hw) {
        norms.iter_mut().zip(plane).for_each(|(n, v)| *n += v * v);
    }
    norms.iter_mut().for_each(|n| *n = 1.0 / n.sqrt().max(1e-12));
    for plane in features.chunks_mut(hw) {
        plane.iter_mut().zip(&norms).for_each(|(v, n)| *v *= n);
    }
}

/// How much work goes into a label map, per request: `fast` assigns the plain features,
/// `flip` averages them over a horizontal flip first (about twice the embedder's cost), `edges`
/// guided-filters the class scores with the image so boundaries follow its edges, `crf`
/// refines the labels with the dense CRF at the image's resolution, `best` does flip and CRF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    Fast,
    Flip,
    Edges,
    Crf,
    Best,
}

impl Quality {
    pub const ALL: [Quality; 5] = [Quality::Fast, Quality::Flip, Quality::Edges, Quality::Crf, Quality::Best];

    pub fn flip(self) -> bool {
        matches!(self, Quality::Flip | Quality::Best)
    }

    pub fn crf(self) -> bool {
        matches!(self, Quality::Crf | Quality::Best)
    }

    /// The guided filter refines the scores.
    pub fn guided(self) -> bool {
        self == Quality::Edges
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Fast => "fast",
            Quality::Flip => "flip",
            Quality::Edges => "edges",
            Quality::Crf => "crf",
            Quality::Best => "best",
        }
    }
}

/// The settings of the refinements a quality may ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Refinement {
    pub crf: CrfConfig,
    pub guided: GuidedConfig,
}

impl std::fmt::Display for Quality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Quality {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Quality::ALL
            .into_iter()
            .find(|q| q.as_str() == s)
            .ok_or_else(|| format!("unknown quality `{s}` (expected fast, flip, edges, crf or best)"))
    }
}

/// The labels `quality` asks for from features made as it asks (flip averaging is the caller's)
/// and their `k` class score maps (class-major, on `features`' grid): the highest score, then
/// the CRF or the guided filter where the quality refines.
pub fn labels_at(features: &FeatureMap, scores: &[f32], k: usize, image: &RgbImage, quality: Quality, refine: &Refinement) -> LabelMask {
    let grid = (features.width, features.height);
    if quality.crf() {
        refine_scores_with_confidence(features, scores, k, image, &refine.crf).0
    } else if quality.guided() {
        guided::labels_guided(scores, k, grid, &features.geometry, image, &refine.guided)
    } else {
        assign::labels_at_original_size(scores, k, grid, &features.geometry)
    }
}

/// The dense CRF over `k` score maps on `features`' grid, on `image` (the original image the
/// features were made from): labels and their marginal probability. Images over the CRF's
/// `max_pixels` (or pixels x K over `max_values`) are refined at a reduced size and the labels
/// scaled back up (nearest).
pub fn refine_scores_with_confidence(
    features: &FeatureMap,
    scores: &[f32],
    k: usize,
    image: &RgbImage,
    crf: &CrfConfig,
) -> (LabelMask, Vec<f32>) {
    let (ow, oh) = features.geometry.original;
    debug_assert_eq!((image.width(), image.height()), (ow, oh), "the image the features were made from");
    let (tw, th) = crf::working_size(ow, oh, k, crf);
    let mut logits = assign::scores_at_size(scores, k, (features.width, features.height), &features.geometry, (tw as usize, th as usize));
    logits.iter_mut().for_each(|v| *v *= crf.temperature);
    let (labels, confidence) = if (tw, th) == (ow, oh) {
        crf::refine_with_confidence(image, &logits, k, crf)
    } else {
        let small = image::imageops::resize(image, tw, th, image::imageops::FilterType::Triangle);
        let (labels, confidence) = crf::refine_with_confidence(&small, &logits, k, crf);
        let (ow, oh, tw, th) = (ow as usize, oh as usize, tw as usize, th as usize);
        let source = |i: usize| ((i / ow) * th / oh) * tw + (i % ow) * tw / ow;
        ((0..ow * oh).map(|i| labels[source(i)]).collect(), (0..ow * oh).map(|i| confidence[source(i)]).collect())
    };
    (LabelMask { width: ow, height: oh, labels }, confidence)
}

/// A loaded package ready to segment.
pub struct Segmenter {
    pub package: Package,
    session: EmbedSession,
    classes: ClassScorer,
    /// The device the embedder runs on, resolved (`cpu` or `cuda:N`), and its threads: the
    /// guided-filter graph runs there too.
    device: DeviceChoice,
    threads: Option<usize>,
    /// Whether `edges` filters through the ONNX graph (on by default where the embedder runs on a
    /// GPU; the CPU keeps the faster Rust filter), and the graph for the settings last asked for.
    guided_in_graph: AtomicBool,
    guided_graph: Mutex<Option<Arc<GuidedGraph>>>,
}

impl Segmenter {
    pub fn load(dir: &Path, device: DeviceChoice, threads: Option<usize>) -> Result<Self> {
        let package = Package::load(dir)?;
        Self::from_package(package, device, threads)
    }

    pub fn from_package(package: Package, device: DeviceChoice, threads: Option<usize>) -> Result<Self> {
        let session = EmbedSession::load(&package.onnx_path(), device, threads)?;
        let classes = ClassScorer::new(&package.centroids);
        let device = match (session.provider(), device) {
            (Provider::Cpu, _) => DeviceChoice::Cpu,
            (Provider::Cuda, DeviceChoice::Cuda(id)) => DeviceChoice::Cuda(id),
            (Provider::Cuda, _) => DeviceChoice::Cuda(0),
        };
        let on_gpu = session.provider() == Provider::Cuda;
        Ok(Self { package, session, classes, device, threads, guided_in_graph: AtomicBool::new(on_gpu), guided_graph: Mutex::new(None) })
    }

    /// Whether `edges` runs the guided filter as an ONNX graph on the embedder's device.
    pub fn guided_in_graph(&self) -> bool {
        self.guided_in_graph.load(Ordering::Relaxed)
    }

    /// Runs `edges` through the ONNX graph (or not) from now on: on by default on a GPU; on the
    /// CPU only to compare the two (benches, tests).
    pub fn set_guided_in_graph(&self, on: bool) {
        self.guided_in_graph.store(on, Ordering::Relaxed);
    }

    /// The guided-filter graph for `config`, built on first use and again when the settings change.
    fn guided_graph(&self, config: &GuidedConfig) -> Result<Arc<GuidedGraph>> {
        let mut slot = self.guided_graph.lock().map_err(|_| anyhow::anyhow!("guided-filter graph lock poisoned"))?;
        match slot.as_ref() {
            Some(g) if g.config() == config => Ok(g.clone()),
            _ => {
                let g = Arc::new(GuidedGraph::load(*config, self.device, self.threads)?);
                *slot = Some(g.clone());
                Ok(g)
            }
        }
    }

    /// `edges` through the graph; `None` (and the graph switched off, with a warning) if it fails,
    /// so the Rust filter answers instead.
    fn assign_guided_in_graph(&self, features: &FeatureMap, scores: &[f32], image: &RgbImage, config: &GuidedConfig) -> Option<LabelMask> {
        let feat = (features.width, features.height);
        match self.guided_graph(config).and_then(|g| g.labels(scores, self.k(), feat, &features.geometry, image)) {
            Ok(mask) => Some(mask),
            Err(e) => {
                tracing::warn!(error = %e, "the guided-filter graph failed; edges filters on the CPU from now on");
                self.set_guided_in_graph(false);
                None
            }
        }
    }

    pub fn provider(&self) -> Provider {
        self.session.provider()
    }

    pub fn k(&self) -> usize {
        self.package.centroids.k()
    }

    pub fn session(&self) -> &EmbedSession {
        &self.session
    }

    /// Features under the package's own input policy (flip averaging if it was clustered so).
    pub fn embed(&self, images: &[RgbImage]) -> Result<Vec<FeatureMap>> {
        embed_batch(&self.session, &self.package.manifest.input, images)
    }

    /// Features with flip averaging on or off, whatever the package's policy says.
    pub fn embed_with(&self, images: &[RgbImage], flip: bool) -> Result<Vec<FeatureMap>> {
        embed_batch(&self.session, &InputPolicy { flip, ..self.package.manifest.input }, images)
    }

    /// The K class score maps of a feature map (each class's best similarity, [`ClassScorer`]).
    pub fn scores(&self, features: &FeatureMap) -> Vec<f32> {
        self.classes.scores(&features.data, features.dim, features.width * features.height)
    }

    /// Assigns each pixel of the original image to the class it scores highest for.
    pub fn assign(&self, features: &FeatureMap) -> LabelMask {
        assign::labels_at_original_size(&self.scores(features), self.k(), (features.width, features.height), &features.geometry)
    }

    /// The labels `quality` asks for from features made as it asks (see [`labels_at`]).
    pub fn assign_at(&self, features: &FeatureMap, image: &RgbImage, quality: Quality, refine: &Refinement) -> LabelMask {
        let scores = self.scores(features);
        if quality.guided() && self.guided_in_graph() {
            if let Some(mask) = self.assign_guided_in_graph(features, &scores, image, &refine.guided) {
                return mask;
            }
        }
        labels_at(features, &scores, self.k(), image, quality, refine)
    }

    /// Masks under the package's own policy, no CRF.
    pub fn segment_batch(&self, images: &[RgbImage]) -> Result<Vec<LabelMask>> {
        Ok(self.embed(images)?.iter().map(|f| self.assign(f)).collect())
    }

    /// Masks at a quality: flip averaging and the dense CRF switched on or off.
    pub fn segment_batch_at(&self, images: &[RgbImage], quality: Quality, refine: &Refinement) -> Result<Vec<LabelMask>> {
        let features = self.embed_with(images, quality.flip())?;
        Ok(features.iter().zip(images).map(|(f, img)| self.assign_at(f, img, quality, refine)).collect())
    }

    pub fn segment(&self, image: &RgbImage) -> Result<LabelMask> {
        Ok(self.segment_batch(std::slice::from_ref(image))?.remove(0))
    }
}
