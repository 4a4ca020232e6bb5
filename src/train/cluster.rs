//! Clustering a set of images with a package's embedder: the step that creates the centroids
//! of a new package (the default package, and re-clustering).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::kmeans::{assign, KMeansConfig, SphericalKMeans};
use super::merge::{Affinity, MergeBy, OverCluster};
use crate::infer::{embed_batch, preprocess, EmbedSession};
use crate::package::{Centroids, InputPolicy};

/// Image files in a folder (by extension), sorted so runs are repeatable.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    const EXTS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"];
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTS.contains(&e.to_ascii_lowercase().as_str())))
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
    /// Where K was suggested: the K picked and each K's score.
    pub suggestion: Option<super::ksuggest::KSuggestion>,
}

/// How a package's K classes are fit on pixel features: spherical k-means at K, or over-clustered
/// and merged down to K ([`super::merge`]). The default for packages over-clusters into
/// [`DEFAULT_OVER_CLUSTER`] by centroid similarity, measured on CamVid drives left out of
/// training (docs/quality.md): +5 to +9 points of pixel accuracy over k-means at K.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClassFit {
    pub kmeans: KMeansConfig,
    pub over: Option<OverCluster>,
}

/// Clusters a package's classes are merged from, by default. 50 rather than the training
/// head's K2 of 100: on the CamVid drives left out of training it gave the better mIoU and
/// boundary F on all five recipe packages measured, at level pixel accuracy (docs/quality.md).
pub const DEFAULT_OVER_CLUSTER: usize = 50;
/// Features per over-cluster below which a fit is plain k-means at K instead.
pub const MIN_VECTORS_PER_OVER_CLUSTER: usize = 20;

impl ClassFit {
    /// K classes fit the default way: over-clustered into [`DEFAULT_OVER_CLUSTER`] and merged
    /// by similarity, or plain k-means where K is not below it.
    pub fn new(k: usize, seed: u64) -> Self {
        Self::with_over_cluster(k, seed, DEFAULT_OVER_CLUSTER)
    }

    /// K classes merged from `over` clusters by similarity; plain k-means where `over` is not
    /// above K (0: always plain).
    pub fn with_over_cluster(k: usize, seed: u64, over: usize) -> Self {
        let over = (over > k).then_some(OverCluster { k: over, merge: MergeBy::Similarity });
        Self { kmeans: KMeansConfig::new(k, seed), over }
    }

    /// Plain spherical k-means at K.
    pub fn plain(k: usize, seed: u64) -> Self {
        Self { kmeans: KMeansConfig::new(k, seed), over: None }
    }

    pub fn k(&self) -> usize {
        self.kmeans.k
    }

    pub fn seed(&self) -> u64 {
        self.kmeans.seed
    }
}

/// The K of a re-clustering: given, or suggested from a range ([`super::ksuggest`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KChoice {
    Fixed(usize),
    Suggest { min: usize, max: usize },
}

/// Embeds every readable image (unreadable ones are skipped and named), keeping a uniform
/// sample of at most `max_vectors` pixel features as it goes (so memory does not grow with
/// the number of images), then fits the classes on that sample ([`ImageFeatures::fit`]). The
/// sample is drawn with the k-means seed.
pub fn cluster_images(
    session: &EmbedSession,
    policy: &InputPolicy,
    paths: &[PathBuf],
    config: ClassFit,
    max_vectors: usize,
    progress: impl FnMut(usize, usize) -> bool,
) -> Result<(Centroids, ClusterReport)> {
    cluster_images_with(session, policy, paths, config, max_vectors, EmbedPlan::default(), progress)
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
    /// Each image's (width, height) in cells, in order, when `vectors` holds every cell of
    /// every image as a map (row-major); empty when they were sampled.
    pub shapes: Vec<(usize, usize)>,
}

impl ImageFeatures {
    /// The classes per `config`: spherical k-means on at most `max_vectors` of the features,
    /// drawn uniformly with the k-means seed, at K or at the over-clustering's K merged down to
    /// K. The merge weighs each cluster by its share of all the features held, and co-occurrence
    /// counts neighbours on their maps (only where every cell is held: [`embed_images`]).
    /// Returns the centroids and the number of vectors k-means used.
    pub fn fit(&self, config: ClassFit, max_vectors: usize) -> Result<(Centroids, usize)> {
        let dim = self.dim;
        let vectors = sample_rows(&self.vectors, dim, max_vectors, config.seed());
        // Too few features for the over-clusters to mean anything (a handful of small images):
        // k-means at K.
        let over = config.over.filter(|o| vectors.len() / dim >= o.k * MIN_VECTORS_PER_OVER_CLUSTER);
        let Some(over) = over else {
            let km = SphericalKMeans::fit(&vectors, dim, config.kmeans)?;
            return Ok((Centroids::from_vectors(dim, km.centroid_rows()), vectors.len() / dim));
        };
        let km = SphericalKMeans::fit(&vectors, dim, KMeansConfig { k: over.k, ..config.kmeans })?;
        let (labels, _) = assign(&self.vectors, dim, &km.centroids);
        let mut sizes = vec![0u64; over.k];
        labels.iter().for_each(|&l| sizes[l as usize] += 1);
        let affinity = match over.merge {
            MergeBy::Cooccurrence => {
                if self.shapes.iter().map(|(w, h)| w * h).sum::<usize>() != labels.len() {
                    bail!("merging by co-occurrence needs every cell of the images as maps");
                }
                let mut start = 0;
                let maps = self.shapes.iter().map(|&(w, h)| {
                    start += w * h;
                    (&labels[start - w * h..start], (w, h))
                });
                Affinity::cooccurrence(over.k, maps)?
            }
            by => Affinity::centroids(by, &km.centroids, dim, &sizes)?,
        };
        let groups = affinity.merge(config.k())?;
        Ok((Centroids::merged(dim, km.centroid_rows(), &sizes, &groups)?, vectors.len() / dim))
    }
}

/// At most `max` of the rows of `data` (`dim` wide), drawn uniformly with `seed` and kept in
/// their order; all of them (borrowed) when there are no more than `max`.
pub fn sample_rows(data: &[f32], dim: usize, max: usize, seed: u64) -> std::borrow::Cow<'_, [f32]> {
    let n = data.len() / dim;
    if n <= max {
        return std::borrow::Cow::Borrowed(data);
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    idx.truncate(max);
    idx.sort_unstable();
    std::borrow::Cow::Owned(idx.iter().flat_map(|&i| data[i * dim..(i + 1) * dim].iter().copied()).collect())
}

/// Embeds every readable image and keeps all of its pixel features; unreadable ones are
/// skipped, named and logged. `progress` returning false cancels. Memory grows with the
/// images (about 5 MB per 480x360 image): `picie eval` uses it on a bounded set of images to
/// fit several seeds on the same features; clustering a dataset uses [`embed_sampled`].
pub fn embed_images(
    session: &EmbedSession,
    policy: &InputPolicy,
    paths: &[PathBuf],
    progress: impl FnMut(usize, usize) -> bool,
) -> Result<ImageFeatures> {
    let mut vectors: Vec<f32> = Vec::new();
    let mut shapes = vec![];
    let (dim, images_used, skipped) = embed_each(session, policy, paths, EmbedPlan::default(), progress, |_, shape, rows| {
        shapes.push(shape);
        vectors.extend_from_slice(rows)
    })?;
    let vectors_seen = (vectors.len() / dim) as u64;
    Ok(ImageFeatures { dim, vectors, images_used, skipped, vectors_seen, shapes })
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
    embed_sampled_with(session, policy, paths, max_vectors, seed, EmbedPlan::default(), progress)
}

fn embed_sampled_with(
    session: &EmbedSession,
    policy: &InputPolicy,
    paths: &[PathBuf],
    max_vectors: usize,
    seed: u64,
    plan: EmbedPlan,
    progress: impl FnMut(usize, usize) -> bool,
) -> Result<ImageFeatures> {
    let mut reservoir: Option<VectorReservoir> = None;
    let (dim, images_used, skipped) = embed_each(session, policy, paths, plan, progress, |dim, _, rows| {
        reservoir.get_or_insert_with(|| VectorReservoir::new(dim, max_vectors, seed)).offer(rows)
    })?;
    let reservoir = reservoir.unwrap_or_else(|| VectorReservoir::new(dim, max_vectors, seed));
    let vectors_seen = reservoir.seen();
    Ok(ImageFeatures { dim, vectors: reservoir.into_rows(), images_used, skipped, vectors_seen, shapes: vec![] })
}

/// How images reach the embedder while clustering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbedPlan {
    /// Images per ONNX Runtime call. Only images of the same padded canvas share a call (a
    /// smaller image padded to a larger canvas would see more padding near its border and get
    /// other features), so a run of mixed sizes is cut where the size changes. Even so, ONNX
    /// Runtime's batched kernels round differently: features move by up to about 1e-7 (unit
    /// vectors), so k-means can end a little elsewhere. On 2 CPU cores batches were slower
    /// (`cargo bench --bench recluster`), so the default is 1; larger batches are for a GPU.
    pub batch: usize,
    /// Decode (and resize to the network's input size) on a thread of its own, up to `batch`
    /// images ahead of the embedder, instead of between embedder calls. Same result.
    pub prefetch: bool,
}

impl EmbedPlan {
    /// One image at a time, decoded in turn: how clustering ran before.
    pub const SEQUENTIAL: Self = Self { batch: 1, prefetch: false };
}

/// One image per call, decoded ahead on a thread of its own: the same features, bit for bit,
/// as [`EmbedPlan::SEQUENTIAL`].
impl Default for EmbedPlan {
    fn default() -> Self {
        Self { batch: 1, prefetch: true }
    }
}

/// [`cluster_images`] with a chosen [`EmbedPlan`]: the speed changes, and with batches of more
/// than one image the features move by rounding (see [`EmbedPlan::batch`]).
pub fn cluster_images_with(
    session: &EmbedSession,
    policy: &InputPolicy,
    paths: &[PathBuf],
    config: ClassFit,
    max_vectors: usize,
    plan: EmbedPlan,
    progress: impl FnMut(usize, usize) -> bool,
) -> Result<(Centroids, ClusterReport)> {
    let features = embed_sampled_with(session, policy, paths, max_vectors, config.seed(), plan, progress)?;
    let (centroids, vectors) = features.fit(config, max_vectors)?;
    Ok((
        centroids,
        ClusterReport {
            images_used: features.images_used,
            skipped: features.skipped,
            vectors,
            vectors_seen: features.vectors_seen,
            suggestion: None,
        },
    ))
}

/// A decoded image, or why it could not be read, in `paths` order.
type Decoded = (usize, Result<RgbImage>);

/// Decodes an image and, when the policy would leave it at that size, resizes it to the
/// network's input size already: `fill_input` then copies it as it is, so the input is the
/// same bit for bit, and a queue of decoded images holds small ones whatever the photos' size.
fn decode_for(path: &Path, policy: &InputPolicy) -> Result<RgbImage> {
    let img = preprocess::decode_file(path)?;
    let g = preprocess::geometry(img.width(), img.height(), policy);
    let (rw, rh) = g.resized;
    if (img.width(), img.height()) != g.resized && preprocess::geometry(rw, rh, policy).resized == g.resized {
        return Ok(image::imageops::resize(&img, rw, rh, image::imageops::FilterType::Triangle));
    }
    Ok(img)
}

/// Embeds the readable images per `plan` and hands each one's valid pixel features (row
/// vectors, with the (width, height) of the cells they cover) to `sink`, in `paths` order,
/// whatever the plan. Returns (dim, images used, skipped
/// files).
fn embed_each(
    session: &EmbedSession,
    policy: &InputPolicy,
    paths: &[PathBuf],
    plan: EmbedPlan,
    progress: impl FnMut(usize, usize) -> bool,
    sink: impl FnMut(usize, (usize, usize), &[f32]),
) -> Result<(usize, usize, Vec<String>)> {
    let batch = plan.batch.max(1);
    let mut run =
        EmbedRun { session, policy, paths, batch, progress, sink, dim: 0, used: 0, skipped: vec![], pending: vec![], images: vec![] };
    if plan.prefetch {
        std::thread::scope(|scope| -> Result<()> {
            // At most `batch` decoded images wait, plus the one being decoded.
            let (tx, rx) = std::sync::mpsc::sync_channel::<Decoded>(batch);
            scope.spawn(move || {
                for (i, p) in paths.iter().enumerate() {
                    // A closed channel means the embedder stopped (canceled or failed).
                    if tx.send((i, decode_for(p, policy))).is_err() {
                        break;
                    }
                }
            });
            // Returning early drops `rx`, which stops the decoder.
            for decoded in rx {
                run.take(decoded)?;
            }
            Ok(())
        })?;
    } else {
        for (i, p) in paths.iter().enumerate() {
            run.take((i, decode_for(p, policy)))?;
        }
    }
    run.flush()?;
    if run.used == 0 {
        bail!("none of the {} images could be read", paths.len());
    }
    Ok((run.dim, run.used, run.skipped))
}

/// The embedding loop's state: the images waiting for the next call and what came out so far.
struct EmbedRun<'a, P, S> {
    session: &'a EmbedSession,
    policy: &'a InputPolicy,
    paths: &'a [PathBuf],
    batch: usize,
    progress: P,
    sink: S,
    dim: usize,
    used: usize,
    skipped: Vec<String>,
    /// Indices in `paths` of `images`.
    pending: Vec<usize>,
    images: Vec<RgbImage>,
}

impl<P: FnMut(usize, usize) -> bool, S: FnMut(usize, (usize, usize), &[f32])> EmbedRun<'_, P, S> {
    fn canvas(&self, img: &RgbImage) -> (u32, u32) {
        preprocess::geometry(img.width(), img.height(), self.policy).padded
    }

    fn report(&mut self, i: usize) -> Result<()> {
        if !(self.progress)(i + 1, self.paths.len()) {
            bail!("canceled");
        }
        Ok(())
    }

    fn take(&mut self, (i, decoded): Decoded) -> Result<()> {
        match decoded {
            Ok(img) => {
                if self.images.first().is_some_and(|first| self.canvas(first) != self.canvas(&img)) {
                    self.flush()?;
                }
                self.pending.push(i);
                self.images.push(img);
                if self.images.len() == self.batch {
                    self.flush()?;
                }
                Ok(())
            }
            Err(e) => {
                // The images before it are reported first, so progress only moves forward.
                self.flush()?;
                tracing::warn!(file = %self.paths[i].display(), error = %e, "skipping unreadable image");
                self.skipped.push(self.paths[i].display().to_string());
                self.report(i)
            }
        }
    }

    /// Embeds the waiting images in one call, hands on their features and reports them done.
    fn flush(&mut self) -> Result<()> {
        if self.images.is_empty() {
            return Ok(());
        }
        let features = embed_batch(self.session, self.policy, &self.images)?;
        self.images.clear();
        let pending = std::mem::take(&mut self.pending);
        for (i, f) in pending.into_iter().zip(features) {
            if self.dim != 0 && f.dim != self.dim {
                bail!("the embedder gave {} features per pixel for {}, {} before", f.dim, self.paths[i].display(), self.dim);
            }
            self.dim = f.dim;
            (self.sink)(self.dim, f.valid_size(), &f.valid_vectors());
            self.used += 1;
            self.report(i)?;
        }
        Ok(())
    }
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

/// At most this many pixel features go into one k-means fit.
pub const MAX_CLUSTER_VECTORS: usize = 500_000;

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` rows of `dim` components whose first component is the row's number `start + i`
    /// and second the image it came from.
    fn rows(start: usize, n: usize, dim: usize, image: usize) -> Vec<f32> {
        (start..start + n)
            .flat_map(|i| std::iter::once(i as f32).chain(std::iter::once(image as f32)).chain(std::iter::repeat_n(0.5, dim - 2)))
            .collect()
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
        let chi2_images: f64 = per_image
            .iter()
            .zip(sizes)
            .map(|(o, n)| (o - draws * n as f64 / total as f64).powi(2) / (draws * n as f64 / total as f64))
            .sum();
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

    /// The shipped embedder on one CPU thread.
    fn shipped_session() -> EmbedSession {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        EmbedSession::load(&root.join("models/default/embedder.onnx"), crate::infer::DeviceChoice::Cpu, Some(1)).unwrap()
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

    /// Noise images of these sizes, written as PNG.
    fn write_sized_images(dir: &Path, sizes: &[(u32, u32)]) -> Vec<PathBuf> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &(w, h))| {
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    let v = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ (i as u32).wrapping_mul(97)) as u8;
                    image::Rgb([v, v.wrapping_add(i as u8), (x * 4) as u8])
                });
                let p = dir.join(format!("sized{i:03}.png"));
                img.save(&p).unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn batched_and_prefetched_embedding_gives_the_sequential_features() {
        let session = shipped_session();
        let policy = InputPolicy { short_side: 64, max_long_side: 128, multiple: 32, flip: false, normalize: Default::default() };
        let dir = tempfile::tempdir().unwrap();
        // Runs of one size; 80x60 (resized to 85x64) and a large 300x200 photo (resized to
        // 96x64 on the decoding thread) share the 96x64 canvas; 100x64 needs 128x64; an
        // unreadable file in the middle.
        let mut paths = write_sized_images(
            dir.path(),
            &[(64, 64), (64, 64), (64, 64), (80, 60), (80, 60), (300, 200), (64, 64), (64, 64), (64, 64), (64, 64), (64, 64), (100, 64)],
        );
        let broken = dir.path().join("broken.png");
        std::fs::write(&broken, b"not an image").unwrap();
        paths.insert(7, broken.clone());
        let run = |plan: EmbedPlan| {
            let mut seen = vec![];
            let mut rows = vec![];
            let (dim, used, skipped) = embed_each(
                &session,
                &policy,
                &paths,
                plan,
                |i, n| {
                    seen.push((i, n));
                    true
                },
                |_, _, r| rows.push(r.to_vec()),
            )
            .unwrap();
            (dim, used, skipped, seen, rows)
        };
        // What clustering did before: decode, then embed each image alone.
        let reference: Vec<Vec<f32>> = paths
            .iter()
            .filter(|p| **p != broken)
            .map(|p| embed_batch(&session, &policy, &[preprocess::decode_file(p).unwrap()]).unwrap().remove(0).valid_vectors())
            .collect();
        let before = run(EmbedPlan::SEQUENTIAL);
        assert_eq!((before.1, before.2.clone()), (12, vec![broken.display().to_string()]));
        assert_eq!(before.3, (1..=13).map(|i| (i, 13)).collect::<Vec<_>>(), "progress: every file, in order");
        for plan in [
            EmbedPlan::SEQUENTIAL,
            EmbedPlan::default(),
            EmbedPlan { batch: 4, prefetch: false },
            EmbedPlan { batch: 4, prefetch: true },
            EmbedPlan { batch: 8, prefetch: true },
        ] {
            let after = run(plan);
            assert_eq!((after.0, after.1, &after.2, &after.3), (before.0, before.1, &before.2, &before.3), "{plan:?}");
            assert_eq!(after.4.len(), reference.len());
            // One image per call: bit for bit. Batches: ONNX Runtime's batched kernels round
            // differently, within 1e-6 of unit vectors (measured: 9e-8).
            let tolerance = if plan.batch == 1 { 0.0 } else { 1e-6 };
            for (img, (a, b)) in after.4.iter().zip(&reference).enumerate() {
                let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(
                    a.len() == b.len() && worst <= tolerance,
                    "{plan:?}: image {img}: {} vs {} values, largest difference {worst:e}",
                    a.len(),
                    b.len()
                );
            }
        }
    }

    #[test]
    fn canceling_a_prefetched_embedding_stops_it() {
        // Batches of 4 with the decoding thread ahead: cancel after the 6th image, mid-batch.
        let session = shipped_session();
        let policy = InputPolicy { short_side: 64, max_long_side: 64, multiple: 32, flip: false, normalize: Default::default() };
        let dir = tempfile::tempdir().unwrap();
        let paths = write_noise_images(dir.path(), 40);
        let mut calls = 0;
        let e = embed_each(
            &session,
            &policy,
            &paths,
            EmbedPlan { batch: 4, prefetch: true },
            |i, _| {
                calls += 1;
                i < 6
            },
            |_, _, _| (),
        )
        .unwrap_err();
        assert_eq!((e.to_string(), calls), ("canceled".to_string(), 6));
    }

    #[test]
    fn embedding_a_dataset_keeps_at_most_the_sample() {
        let session = shipped_session();
        // 64x64 inputs: 16 x 16 = 256 features per image.
        let policy = InputPolicy { short_side: 64, max_long_side: 64, multiple: 32, flip: false, normalize: Default::default() };
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
        assert_eq!(all.shapes, vec![(16, 16); 3]);
        assert!(sampled.shapes.is_empty());
        let config = ClassFit::plain(3, 5);
        let (c, _) = cluster_images(&session, &policy, &paths[..3], config, 10_000, |_, _| true).unwrap();
        assert_eq!(c.matrix(), all.fit(config, 10_000).unwrap().0.matrix());
    }

    /// Features around three directions, each spread over a few sub-directions: `per` vectors
    /// per sub-direction, and each vector's group.
    fn grouped_features(per: usize) -> (ImageFeatures, Vec<usize>) {
        let dim = 8;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (mut vectors, mut groups) = (vec![], vec![]);
        for group in 0..3 {
            for sub in 0..4 {
                for _ in 0..per {
                    let mut v = vec![0f32; dim];
                    v[group] = 1.0;
                    v[3 + sub % 4] = 0.35;
                    v.iter_mut().for_each(|x| *x += rng.random_range(-0.02..0.02));
                    super::super::kmeans::normalize(&mut v);
                    vectors.extend(v);
                    groups.push(group);
                }
            }
        }
        let n = groups.len();
        (ImageFeatures { dim, vectors, images_used: 1, skipped: vec![], vectors_seen: n as u64, shapes: vec![] }, groups)
    }

    #[test]
    fn over_clusters_merge_into_the_classes_they_came_from() {
        let (features, groups) = grouped_features(60);
        let fit = ClassFit { over: Some(OverCluster { k: 12, merge: MergeBy::Similarity }), ..ClassFit::plain(3, 0) };
        let (c, used) = features.fit(fit, 100_000).unwrap();
        assert_eq!((c.k(), c.over_clusters(), used), (3, Some(12), groups.len()));
        c.validate("test", features.dim).unwrap();
        // Every vector scores highest for the class that holds its own group.
        let scorer = crate::infer::assign::ClassScorer::new(&c);
        let n = groups.len();
        let columns: Vec<f32> =
            (0..features.dim).flat_map(|d| (0..n).map(move |i| (d, i))).map(|(d, i)| features.vectors[i * 8 + d]).collect();
        let scores = scorer.scores(&columns, features.dim, n);
        let best = |i: usize| (0..3).max_by(|&a, &b| scores[a * n + i].total_cmp(&scores[b * n + i])).unwrap();
        let class_of_group: Vec<usize> = (0..3).map(|g| best(groups.iter().position(|&x| x == g).unwrap())).collect();
        assert_eq!(
            {
                let mut c = class_of_group.clone();
                c.sort();
                c
            },
            vec![0, 1, 2]
        );
        assert!((0..n).all(|i| best(i) == class_of_group[groups[i]]));
        // Too few features for 12 over-clusters (20 each): k-means at K.
        let (few, _) = grouped_features(4);
        let (c, _) = few.fit(fit, 100_000).unwrap();
        assert_eq!((c.k(), c.over_clusters()), (3, None));
    }
}
