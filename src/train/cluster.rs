//! Clustering a set of images with a package's embedder: the step that creates the centroids
//! of a new package (the default package, and re-clustering).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
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
    /// Pixel features that went into k-means.
    pub vectors: usize,
    /// Pixel features of all the images, before sampling.
    pub vectors_seen: u64,
}

/// Embeds every readable image (unreadable ones are skipped and named), keeping a uniform
/// sample of at most `max_vectors` pixel features as it goes (so memory does not grow with
/// the number of images), then fits spherical k-means on that sample. The sample is drawn
/// with the k-means seed.
pub fn cluster_images(
    session: &EmbedSession,
    policy: &InputPolicy,
    paths: &[PathBuf],
    config: KMeansConfig,
    max_vectors: usize,
    progress: impl FnMut(usize, usize) -> bool,
) -> Result<(Centroids, ClusterReport)> {
    let features = embed_sampled(session, policy, paths, max_vectors, config.seed, progress)?;
    let (centroids, vectors) = features.fit(config, max_vectors)?;
    Ok((centroids, ClusterReport { images_used: features.images_used, skipped: features.skipped, vectors, vectors_seen: features.vectors_seen }))
}

/// The pixel features of a set of images, embedded once so several k-means fits (seeds) can
/// share them.
pub struct ImageFeatures {
    pub dim: usize,
    /// Row vectors, image after image, only the cells that cover the image (not the padding).
    pub vectors: Vec<f32>,
    pub images_used: usize,
    pub skipped: Vec<String>,
    /// Vectors of all the images; more than `vectors` holds when they were sampled.
    pub vectors_seen: u64,
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

/// Embeds every readable image and keeps all of its pixel features; unreadable ones are
/// skipped, named and logged. `progress` returning false cancels. Memory grows with the
/// images (about 5 MB per 480x360 image): `picie eval` uses it on a bounded set of images to
/// fit several seeds on the same features; clustering a dataset uses [`embed_sampled`].
pub fn embed_images(session: &EmbedSession, policy: &InputPolicy, paths: &[PathBuf], progress: impl FnMut(usize, usize) -> bool) -> Result<ImageFeatures> {
    let mut vectors: Vec<f32> = Vec::new();
    let (dim, images_used, skipped) = embed_each(session, policy, paths, progress, |_, rows| vectors.extend_from_slice(rows))?;
    let vectors_seen = (vectors.len() / dim) as u64;
    Ok(ImageFeatures { dim, vectors, images_used, skipped, vectors_seen })
}

/// Like [`embed_images`], but keeps a uniform sample of at most `max_vectors` of all the
/// images' pixel features, drawn as they are embedded ([`VectorReservoir`], seeded with
/// `seed`): memory is at most `max_vectors` x dim floats plus one image's features, however
/// many images there are. When the images have no more than `max_vectors` features in all,
/// every one is kept, in order, as [`embed_images`] keeps them.
pub fn embed_sampled(
    session: &EmbedSession,
    policy: &InputPolicy,
    paths: &[PathBuf],
    max_vectors: usize,
    seed: u64,
    progress: impl FnMut(usize, usize) -> bool,
) -> Result<ImageFeatures> {
    let mut reservoir: Option<VectorReservoir> = None;
    let (dim, images_used, skipped) = embed_each(session, policy, paths, progress, |dim, rows| {
        reservoir.get_or_insert_with(|| VectorReservoir::new(dim, max_vectors, seed)).offer(rows)
    })?;
    let reservoir = reservoir.unwrap_or_else(|| VectorReservoir::new(dim, max_vectors, seed));
    let vectors_seen = reservoir.seen();
    Ok(ImageFeatures { dim, vectors: reservoir.into_rows(), images_used, skipped, vectors_seen })
}

/// Embeds the readable images one at a time and hands each one's valid pixel features (row
/// vectors) to `sink`. Returns (dim, images used, skipped files).
fn embed_each(
    session: &EmbedSession,
    policy: &InputPolicy,
    paths: &[PathBuf],
    mut progress: impl FnMut(usize, usize) -> bool,
    mut sink: impl FnMut(usize, &[f32]),
) -> Result<(usize, usize, Vec<String>)> {
    let mut dim = 0;
    let mut skipped = vec![];
    let mut used = 0;
    for (i, p) in paths.iter().enumerate() {
        match preprocess::decode_file(p) {
            Ok(img) => {
                let f = embed_batch(session, policy, std::slice::from_ref(&img))?.remove(0);
                if dim != 0 && f.dim != dim {
                    bail!("the embedder gave {} features per pixel for {}, {dim} before", f.dim, p.display());
                }
                dim = f.dim;
                sink(dim, &f.valid_vectors());
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
    Ok((dim, used, skipped))
}

/// A uniform random sample of at most `max` row vectors from a stream of any length
/// (reservoir sampling, Algorithm R): after `seen` vectors have been offered, each of them is
/// in the sample with the same probability `max / seen`. The sample never holds more than
/// `max` x `dim` floats, and the same seed and stream give the same sample.
pub struct VectorReservoir {
    dim: usize,
    max: usize,
    seen: u64,
    rows: Vec<f32>,
    rng: ChaCha8Rng,
}

impl VectorReservoir {
    pub fn new(dim: usize, max: usize, seed: u64) -> Self {
        assert!(dim > 0, "vectors need at least one component");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // A stream of its own, apart from the k-means draws made with the same seed.
        rng.set_stream(1);
        Self { dim, max, seen: 0, rows: Vec::new(), rng }
    }

    /// Offers every row of `rows` (a whole number of `dim`-vectors) to the sample.
    pub fn offer(&mut self, rows: &[f32]) {
        assert_eq!(rows.len() % self.dim, 0, "rows of {} components", self.dim);
        let dim = self.dim;
        for row in rows.chunks_exact(dim) {
            if self.seen < self.max as u64 {
                self.push(row);
            } else {
                // Row number `seen` (0-based) replaces a random slot with probability max / (seen + 1).
                let j = self.rng.random_range(0..=self.seen);
                if j < self.max as u64 {
                    let j = j as usize;
                    self.rows[j * dim..(j + 1) * dim].copy_from_slice(row);
                }
            }
            self.seen += 1;
        }
    }

    /// Appends while filling, growing the buffer geometrically but never past `max` rows.
    fn push(&mut self, row: &[f32]) {
        if self.rows.len() + self.dim > self.rows.capacity() {
            let cap = (self.rows.capacity() * 2).max(self.dim * 4096).min(self.max * self.dim);
            self.rows.reserve_exact(cap - self.rows.len());
        }
        self.rows.extend_from_slice(row);
    }

    /// Vectors offered so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Vectors in the sample: min(seen, max).
    pub fn len(&self) -> usize {
        self.rows.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Floats the sample's buffer has room for (at most `max` x `dim`).
    pub fn capacity(&self) -> usize {
        self.rows.capacity()
    }

    /// The sampled rows, one after another.
    pub fn into_rows(self) -> Vec<f32> {
        self.rows
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` rows of `dim` components whose first component is the row's number `start + i`
    /// and second the image it came from.
    fn rows(start: usize, n: usize, dim: usize, image: usize) -> Vec<f32> {
        (start..start + n).flat_map(|i| std::iter::once(i as f32).chain(std::iter::once(image as f32)).chain(std::iter::repeat_n(0.5, dim - 2))).collect()
    }

    /// Offers images of these sizes in turn; returns the sample.
    fn sample(sizes: &[usize], dim: usize, max: usize, seed: u64) -> VectorReservoir {
        let mut r = VectorReservoir::new(dim, max, seed);
        let mut start = 0;
        for (img, &n) in sizes.iter().enumerate() {
            r.offer(&rows(start, n, dim, img));
            start += n;
        }
        r
    }

    #[test]
    fn reservoir_keeps_exactly_max_vectors_or_all_in_order() {
        let r = sample(&[100, 250, 30, 400], 4, 300, 0);
        assert_eq!((r.len(), r.seen()), (300, 780));
        assert_eq!(r.into_rows().len(), 300 * 4);
        // Fewer vectors than the cap: every one, in stream order (what fitting on all of them used).
        let r = sample(&[100, 250], 4, 300, 0);
        assert_eq!((r.len(), r.seen()), (300, 350));
        let r = sample(&[100, 150], 4, 300, 0);
        assert_eq!(r.into_rows(), [rows(0, 100, 4, 0), rows(100, 150, 4, 1)].concat());
        // No duplicates: each sampled row is a distinct stream row.
        let rows = sample(&[500, 500, 500], 3, 200, 9).into_rows();
        let ids: std::collections::BTreeSet<u32> = rows.chunks(3).map(|r| r[0] as u32).collect();
        assert_eq!(ids.len(), 200);
    }

    #[test]
    fn reservoir_is_deterministic_per_seed() {
        let a = sample(&[300, 700, 50], 4, 200, 42).into_rows();
        assert_eq!(a, sample(&[300, 700, 50], 4, 200, 42).into_rows());
        assert_ne!(a, sample(&[300, 700, 50], 4, 200, 43).into_rows());
    }

    #[test]
    fn reservoir_draws_uniformly_over_images_and_stream_positions() {
        // Images of very different sizes: each should hold a share of the sample in
        // proportion to its pixels, whether it came early or late in the stream.
        let sizes = [2000, 100, 600, 300, 1000];
        let total: usize = sizes.iter().sum();
        let (max, seeds) = (400, 200u64);
        let mut per_image = [0f64; 5];
        let mut per_decile = [0f64; 10];
        for seed in 0..seeds {
            for r in sample(&sizes, 3, max, seed).into_rows().chunks(3) {
                per_image[r[1] as usize] += 1.0;
                per_decile[r[0] as usize * 10 / total] += 1.0;
            }
        }
        let draws = (max as u64 * seeds) as f64;
        let chi2_images: f64 = per_image.iter().zip(sizes).map(|(o, n)| (o - draws * n as f64 / total as f64).powi(2) / (draws * n as f64 / total as f64)).sum();
        let chi2_deciles: f64 = per_decile.iter().map(|o| (o - draws / 10.0).powi(2) / (draws / 10.0)).sum();
        // Critical values at p = 0.001: 18.47 (4 degrees of freedom), 27.88 (9).
        assert!(chi2_images < 18.47, "share per image {per_image:?} (chi2 {chi2_images:.1})");
        assert!(chi2_deciles < 27.88, "share per stream decile {per_decile:?} (chi2 {chi2_deciles:.1})");
    }

    #[test]
    fn reservoir_memory_does_not_grow_with_the_images() {
        let (dim, max) = (8, 5000);
        let image = rows(0, 1000, dim, 0);
        let mut r = VectorReservoir::new(dim, max, 1);
        for i in 0..10_000 {
            r.offer(&image);
            assert!(r.capacity() <= max * dim, "after {} images the buffer holds {} floats", i + 1, r.capacity());
        }
        assert_eq!((r.len(), r.seen()), (max, 10_000_000));
    }

    fn write_noise_images(dir: &Path, n: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let img = image::RgbImage::from_fn(64, 64, |x, y| {
                    let v = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ (i as u32).wrapping_mul(97)) as u8;
                    image::Rgb([v, v.wrapping_add(i as u8), (x * 4) as u8])
                });
                let p = dir.join(format!("img{i:03}.png"));
                img.save(&p).unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn embedding_a_dataset_keeps_at_most_the_sample() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let session = EmbedSession::load(&root.join("models/default/embedder.onnx"), crate::infer::DeviceChoice::Cpu, Some(1)).unwrap();
        // 64x64 inputs: 16 x 16 = 256 features per image.
        let policy = InputPolicy { short_side: 64, max_long_side: 64, multiple: 32, flip: false };
        let dir = tempfile::tempdir().unwrap();
        let paths = write_noise_images(dir.path(), 12);
        let (dim, max) = (128, 300);
        for n in [3, 12] {
            let f = embed_sampled(&session, &policy, &paths[..n], max, 5, |_, _| true).unwrap();
            assert_eq!((f.images_used, f.vectors_seen, f.vectors.len()), (n, 256 * n as u64, max * dim), "{n} images");
            assert!(f.vectors.capacity() <= max * dim, "{n} images: {} floats held", f.vectors.capacity());
        }
        // Under the cap, the sample is every feature in order: clustering gives what it gave
        // before sampling while embedding.
        let all = embed_images(&session, &policy, &paths[..3], |_, _| true).unwrap();
        let sampled = embed_sampled(&session, &policy, &paths[..3], 10_000, 5, |_, _| true).unwrap();
        assert_eq!(all.vectors, sampled.vectors);
        let config = KMeansConfig::new(3, 5);
        let (c, _) = cluster_images(&session, &policy, &paths[..3], config, 10_000, |_, _| true).unwrap();
        assert_eq!(c.matrix(), all.fit(config, 10_000).unwrap().0.matrix());
    }
}
