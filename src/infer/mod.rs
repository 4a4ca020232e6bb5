//! Inference: ONNX Runtime session, image preprocessing, pixel-to-centroid assignment.

pub mod assign;
pub mod preprocess;
pub mod runtime;
pub mod session;

use std::path::Path;

use anyhow::Result;
use image::RgbImage;
use ndarray::Array4;

pub use assign::LabelMask;
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
    /// The feature cells that cover the image itself, not the padding, as row vectors.
    pub fn valid_vectors(&self) -> Vec<f32> {
        let vw = (self.geometry.resized.0 as usize).div_ceil(OUTPUT_STRIDE).min(self.width);
        let vh = (self.geometry.resized.1 as usize).div_ceil(OUTPUT_STRIDE).min(self.height);
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
/// are padded to one canvas, so the batch is one ONNX Runtime call.
pub fn embed_batch(session: &EmbedSession, policy: &InputPolicy, images: &[RgbImage]) -> Result<Vec<FeatureMap>> {
    if images.is_empty() {
        return Ok(vec![]);
    }
    let geoms: Vec<Geometry> = images.iter().map(|i| preprocess::geometry(i.width(), i.height(), policy)).collect();
    let cw = geoms.iter().map(|g| g.padded.0).max().unwrap_or(0);
    let ch = geoms.iter().map(|g| g.padded.1).max().unwrap_or(0);
    let plane = 3 * cw as usize * ch as usize;
    let mut input = vec![0f32; images.len() * plane];
    input.chunks_mut(plane).zip(images.iter().zip(&geoms)).for_each(|(out, (img, g))| {
        preprocess::fill_input(img, g, (cw, ch), out);
    });
    let input = Array4::from_shape_vec((images.len(), 3, ch as usize, cw as usize), input)?;
    let ([n, dim, h, w], data) = session.run(&input)?;
    let per = dim * h * w;
    Ok((0..n)
        .map(|i| FeatureMap { dim, width: w, height: h, data: data[i * per..(i + 1) * per].to_vec(), geometry: geoms[i] })
        .collect())
}

/// Assigns each pixel of the original image to its nearest of `k` centroids (row-major k x dim).
pub fn assign_to(features: &FeatureMap, centroids: &[f32], k: usize) -> LabelMask {
    let hw = features.width * features.height;
    let scores = assign::similarities(&features.data, features.dim, hw, centroids);
    assign::labels_at_original_size(&scores, k, (features.width, features.height), &features.geometry)
}

/// A loaded package ready to segment.
pub struct Segmenter {
    pub package: Package,
    session: EmbedSession,
    centroids: Vec<f32>,
}

impl Segmenter {
    pub fn load(dir: &Path, device: DeviceChoice, threads: Option<usize>) -> Result<Self> {
        let package = Package::load(dir)?;
        Self::from_package(package, device, threads)
    }

    pub fn from_package(package: Package, device: DeviceChoice, threads: Option<usize>) -> Result<Self> {
        let session = EmbedSession::load(&package.onnx_path(), device, threads)?;
        let centroids = package.centroids.matrix();
        Ok(Self { package, session, centroids })
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

    pub fn embed(&self, images: &[RgbImage]) -> Result<Vec<FeatureMap>> {
        embed_batch(&self.session, &self.package.manifest.input, images)
    }

    /// Assigns each pixel of the original image to its nearest centroid.
    pub fn assign(&self, features: &FeatureMap) -> LabelMask {
        assign_to(features, &self.centroids, self.k())
    }

    pub fn segment_batch(&self, images: &[RgbImage]) -> Result<Vec<LabelMask>> {
        Ok(self.embed(images)?.iter().map(|f| self.assign(f)).collect())
    }

    pub fn segment(&self, image: &RgbImage) -> Result<LabelMask> {
        Ok(self.segment_batch(std::slice::from_ref(image))?.remove(0))
    }
}
