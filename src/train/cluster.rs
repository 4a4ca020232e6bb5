//! Clustering a set of images with a package's embedder: the step that creates the centroids
//! of a new package (the default package, and re-clustering).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::kmeans::{KMeansConfig, SphericalKMeans};
use crate::infer::{embed_batch, preprocess, EmbedSession};
use crate::package::{Centroids, InputPolicy};

/// Image files in a folder (by extension), sorted so runs are repeatable.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    const EXTS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"];
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// What clustering saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterReport {
    pub images_used: usize,
    pub skipped: Vec<String>,
    pub vectors: usize,
}

/// Embeds every readable image (unreadable ones are skipped and named), then fits spherical
/// k-means on at most `max_vectors` pixel features drawn uniformly.
pub fn cluster_images(
    session: &EmbedSession,
    policy: &InputPolicy,
    paths: &[PathBuf],
    config: KMeansConfig,
    max_vectors: usize,
    progress: impl FnMut(usize, usize) -> bool,
) -> Result<(Centroids, ClusterReport)> {
    let features = embed_images(session, policy, paths, progress)?;
    let (centroids, vectors) = features.fit(config, max_vectors)?;
    Ok((centroids, ClusterReport { images_used: features.images_used, skipped: features.skipped, vectors }))
}

/// The pixel features of a set of images, embedded once so several k-means fits (seeds) can
/// share them.
pub struct ImageFeatures {
    pub dim: usize,
    /// Row vectors, image after image, only the cells that cover the image (not the padding).
    pub vectors: Vec<f32>,
    pub images_used: usize,
    pub skipped: Vec<String>,
}

impl ImageFeatures {
    /// Spherical k-means on at most `max_vectors` of the features, drawn uniformly with the
    /// k-means seed. Returns the centroids and the number of vectors used.
    pub fn fit(&self, config: KMeansConfig, max_vectors: usize) -> Result<(Centroids, usize)> {
        let dim = self.dim;
        let n = self.vectors.len() / dim;
        let sampled;
        let vectors = if n > max_vectors {
            let mut idx: Vec<usize> = (0..n).collect();
            idx.shuffle(&mut ChaCha8Rng::seed_from_u64(config.seed));
            idx.truncate(max_vectors);
            idx.sort_unstable();
            sampled = idx.iter().flat_map(|&i| self.vectors[i * dim..(i + 1) * dim].to_vec()).collect::<Vec<f32>>();
            &sampled
        } else {
            &self.vectors
        };
        let km = SphericalKMeans::fit(vectors, dim, config)?;
        Ok((Centroids::from_vectors(dim, km.centroid_rows()), vectors.len() / dim))
    }
}

/// Embeds every readable image; unreadable ones are skipped, named and logged. `progress`
/// returning false cancels.
pub fn embed_images(session: &EmbedSession, policy: &InputPolicy, paths: &[PathBuf], mut progress: impl FnMut(usize, usize) -> bool) -> Result<ImageFeatures> {
    let mut vectors: Vec<f32> = Vec::new();
    let mut dim = 0;
    let mut skipped = vec![];
    let mut used = 0;
    for (i, p) in paths.iter().enumerate() {
        match preprocess::decode_file(p) {
            Ok(img) => {
                let f = embed_batch(session, policy, std::slice::from_ref(&img))?.remove(0);
                dim = f.dim;
                vectors.extend(f.valid_vectors());
                used += 1;
            }
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "skipping unreadable image");
                skipped.push(p.display().to_string());
            }
        }
        if !progress(i + 1, paths.len()) {
            bail!("canceled");
        }
    }
    if used == 0 {
        bail!("none of the {} images could be read", paths.len());
    }
    Ok(ImageFeatures { dim, vectors, images_used: used, skipped })
}

/// A new package with the same embedder as `source` and centroids clustered on `paths`.
#[allow(clippy::too_many_arguments)]
pub fn recluster_package(
    source: &crate::package::Package,
    session: &EmbedSession,
    paths: &[PathBuf],
    config: KMeansConfig,
    out: &Path,
    name: &str,
    command: &str,
    progress: impl FnMut(usize, usize) -> bool,
) -> Result<(crate::package::Package, ClusterReport)> {
    use crate::package::{Manifest, Package, PackageContents};
    let (centroids, report) = cluster_images(session, &source.manifest.input, paths, config, MAX_CLUSTER_VECTORS, progress)?;
    let onnx = std::fs::read(source.onnx_path()).with_context(|| format!("reading {}", source.onnx_path().display()))?;
    let weights = source.load_weights()?;
    let mut provenance = source.manifest.provenance.clone();
    provenance.created_at = crate::package::now_rfc3339();
    provenance.command = command.to_string();
    provenance.parent = Some(source.version());
    provenance.details.insert("kmeans_seed".into(), serde_json::json!(config.seed));
    provenance.details.insert("cluster_images".into(), serde_json::json!(report.images_used));
    provenance.details.insert("cluster_vectors".into(), serde_json::json!(report.vectors));
    let manifest = Manifest {
        name: name.to_string(),
        k: centroids.k(),
        provenance,
        metrics: Default::default(),
        sha256: Default::default(),
        ..source.manifest.clone()
    };
    let pkg = Package::write(out, PackageContents { manifest, onnx: &onnx, weights: &weights, centroids: &centroids }, false)?;
    Ok((pkg, report))
}

/// At most this many pixel features go into one k-means fit.
pub const MAX_CLUSTER_VECTORS: usize = 500_000;
