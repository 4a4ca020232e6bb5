//! Spherical k-means on unit vectors (cosine similarity), as PiCIE clusters pixel features:
//! k-means++ initialisation, Lloyd refinement on a first sample, then mini-batch updates where
//! each centroid is the running mean of every vector assigned to it so far. Empty clusters are
//! re-seeded on the vector worst served by its centroid.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KMeansConfig {
    pub k: usize,
    pub seed: u64,
    /// Lloyd iterations on the initial sample (the authors use 20).
    pub init_iters: usize,
}

impl KMeansConfig {
    pub fn new(k: usize, seed: u64) -> Self {
        Self { k, seed, init_iters: 20 }
    }
}

#[derive(Clone, Debug)]
pub struct SphericalKMeans {
    pub k: usize,
    pub dim: usize,
    /// K x dim, unit rows.
    pub centroids: Vec<f32>,
    /// Vectors assigned to each centroid so far (the mini-batch learning rate is 1 / count).
    pub counts: Vec<u64>,
    rng: ChaCha8Rng,
}

pub fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 1e-12 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// Rows scored per matrix product when assigning.
const ASSIGN_CHUNK: usize = 4096;

/// Nearest centroid (highest dot product) and that similarity, for each row of `data`: one
/// matrix product per chunk of rows (SIMD sgemm), chunks in parallel.
pub fn assign(data: &[f32], dim: usize, centroids: &[f32]) -> (Vec<u32>, Vec<f32>) {
    let k = centroids.len() / dim;
    let mu_t = ndarray::ArrayView2::from_shape((k, dim), centroids).expect("K x dim centroids").t().to_owned();
    let per_chunk: Vec<(Vec<u32>, Vec<f32>)> = data
        .par_chunks(ASSIGN_CHUNK * dim)
        .map(|chunk| {
            let rows = chunk.len() / dim;
            let x = ndarray::ArrayView2::from_shape((rows, dim), chunk).expect("rows x dim");
            let sims = x.dot(&mu_t);
            let mut labels = Vec::with_capacity(rows);
            let mut best = Vec::with_capacity(rows);
            for row in sims.rows() {
                let (mut bi, mut bs) = (0u32, f32::NEG_INFINITY);
                for (c, &s) in row.iter().enumerate() {
                    if s > bs {
                        bs = s;
                        bi = c as u32;
                    }
                }
                labels.push(bi);
                best.push(bs);
            }
            (labels, best)
        })
        .collect();
    let mut labels = Vec::with_capacity(data.len() / dim);
    let mut sims = Vec::with_capacity(data.len() / dim);
    for (l, s) in per_chunk {
        labels.extend(l);
        sims.extend(s);
    }
    (labels, sims)
}

impl SphericalKMeans {
    /// Initialises on `sample` (k-means++ then Lloyd), ready for [`update`](Self::update).
    pub fn init(sample: &[f32], dim: usize, config: KMeansConfig) -> Result<Self> {
        let n = sample.len() / dim;
        if config.k < 2 {
            bail!("k must be at least 2 (got {})", config.k);
        }
        if n < config.k {
            bail!("{n} vectors cannot form {} clusters", config.k);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let centroids = kmeans_pp(sample, dim, config.k, &mut rng);
        let mut km = Self { k: config.k, dim, centroids, counts: vec![0; config.k], rng };
        for _ in 0..config.init_iters {
            km.lloyd_step(sample);
        }
        // The initial sample seeds the running means.
        let (labels, _) = assign(sample, dim, &km.centroids);
        km.counts = vec![0; km.k];
        labels.iter().for_each(|&l| km.counts[l as usize] += 1);
        Ok(km)
    }

    /// Fits on all of `data` at once.
    pub fn fit(data: &[f32], dim: usize, config: KMeansConfig) -> Result<Self> {
        Self::init(data, dim, config)
    }

    /// Per-cluster sums of the rows and their counts.
    fn cluster_sums(&self, data: &[f32], labels: &[u32]) -> (Vec<f32>, Vec<u64>) {
        let mut sums = vec![0f32; self.k * self.dim];
        let mut counts = vec![0u64; self.k];
        for (x, &l) in data.chunks(self.dim).zip(labels) {
            let l = l as usize;
            counts[l] += 1;
            sums[l * self.dim..(l + 1) * self.dim].iter_mut().zip(x).for_each(|(s, v)| *s += v);
        }
        (sums, counts)
    }

    fn lloyd_step(&mut self, data: &[f32]) {
        let (labels, sims) = assign(data, self.dim, &self.centroids);
        let (mut sums, counts) = self.cluster_sums(data, &labels);
        let mut taken = vec![false; labels.len()];
        for c in 0..self.k {
            let row = &mut sums[c * self.dim..(c + 1) * self.dim];
            if counts[c] == 0 {
                // Re-seed on the worst-served vector not already used for another empty cluster.
                let worst = (0..labels.len()).filter(|&i| !taken[i]).min_by(|&a, &b| sims[a].total_cmp(&sims[b])).unwrap_or(0);
                taken[worst] = true;
                row.copy_from_slice(&data[worst * self.dim..(worst + 1) * self.dim]);
            }
            normalize(row);
        }
        self.centroids = sums;
    }

    /// One mini-batch: assign, move each centroid toward its batch mean with rate n_batch / n_total.
    pub fn update(&mut self, batch: &[f32]) {
        let (labels, sims) = assign(batch, self.dim, &self.centroids);
        let (sums, counts) = self.cluster_sums(batch, &labels);
        for c in 0..self.k {
            if counts[c] == 0 {
                continue;
            }
            self.counts[c] += counts[c];
            let lr = counts[c] as f32 / self.counts[c] as f32;
            let row = &mut self.centroids[c * self.dim..(c + 1) * self.dim];
            let s = &sums[c * self.dim..(c + 1) * self.dim];
            for (m, v) in row.iter_mut().zip(s) {
                *m += lr * (v / counts[c] as f32 - *m);
            }
            normalize(row);
        }
        // A centroid that has attracted nothing at all yet is re-seeded from this batch.
        let n = labels.len();
        for c in 0..self.k {
            if self.counts[c] == 0 && n > 0 {
                let worst = (0..n).min_by(|&a, &b| sims[a].total_cmp(&sims[b])).unwrap_or(0);
                let i = if sims[worst].is_finite() { worst } else { self.rng.random_range(0..n) };
                self.centroids[c * self.dim..(c + 1) * self.dim].copy_from_slice(&batch[i * self.dim..(i + 1) * self.dim]);
                normalize(&mut self.centroids[c * self.dim..(c + 1) * self.dim]);
            }
        }
    }

    pub fn centroid_rows(&self) -> Vec<Vec<f32>> {
        self.centroids.chunks(self.dim).map(|c| c.to_vec()).collect()
    }
}

/// k-means++ with the cosine distance 1 - <x, mu>: each new centroid is drawn with probability
/// proportional to the squared distance to the nearest centroid so far.
fn kmeans_pp(data: &[f32], dim: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = data.len() / dim;
    let mut centroids = Vec::with_capacity(k * dim);
    let first = rng.random_range(0..n);
    centroids.extend_from_slice(&data[first * dim..(first + 1) * dim]);
    let dist = |x: &[f32], c: &[f32]| (1.0 - x.iter().zip(c).map(|(a, b)| a * b).sum::<f32>()).max(0.0);
    let mut d2: Vec<f32> = data.par_chunks(dim).map(|x| dist(x, &centroids[..dim]).powi(2)).collect();
    for _ in 1..k {
        let total: f64 = d2.iter().map(|&v| v as f64).sum();
        let pick = if total <= 0.0 {
            rng.random_range(0..n)
        } else {
            let mut r = rng.random::<f64>() * total;
            let mut idx = n - 1;
            for (i, &v) in d2.iter().enumerate() {
                r -= v as f64;
                if r <= 0.0 {
                    idx = i;
                    break;
                }
            }
            idx
        };
        let c = data[pick * dim..(pick + 1) * dim].to_vec();
        d2.par_iter_mut().zip(data.par_chunks(dim)).for_each(|(d, x)| *d = d.min(dist(x, &c).powi(2)));
        centroids.extend_from_slice(&c);
    }
    for row in centroids.chunks_mut(dim) {
        normalize(row);
    }
    centroids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let mut v = v.to_vec();
        normalize(&mut v);
        v
    }

    #[test]
    fn separates_three_directions() {
        // Three tight bundles around the axes of R^3.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let axes = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let mut data = vec![];
        let mut truth = vec![];
        for i in 0..300 {
            let a = axes[i % 3];
            let noisy: Vec<f32> = a.iter().map(|v| v + rng.random_range(-0.1..0.1)).collect();
            data.extend(unit(&noisy));
            truth.push(i % 3);
        }
        let km = SphericalKMeans::fit(&data, 3, KMeansConfig::new(3, 7)).unwrap();
        let (labels, _) = assign(&data, 3, &km.centroids);
        // Each true bundle maps to exactly one cluster.
        for t in 0..3 {
            let ls: std::collections::BTreeSet<u32> = labels.iter().zip(&truth).filter(|(_, &tt)| tt == t).map(|(l, _)| *l).collect();
            assert_eq!(ls.len(), 1, "bundle {t} split over {ls:?}");
        }
        for row in km.centroids.chunks(3) {
            let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn running_mean_update_by_hand() {
        // Two centroids on the axes; a batch of two vectors at 45 degrees toward y from x.
        let mut km =
            SphericalKMeans { k: 2, dim: 2, centroids: vec![1.0, 0.0, 0.0, 1.0], counts: vec![2, 2], rng: ChaCha8Rng::seed_from_u64(0) };
        let s = std::f32::consts::FRAC_1_SQRT_2;
        // Slightly closer to x than y, so both go to centroid 0.
        let v = unit(&[s + 0.01, s]);
        km.update(&[v.clone(), v.clone()].concat());
        // counts: 2 + 2 = 4, lr = 2/4: mu = normalize(0.5 * (1,0) + 0.5 * v).
        let expected = unit(&[0.5 + 0.5 * v[0], 0.5 * v[1]]);
        assert!((km.centroids[0] - expected[0]).abs() < 1e-6 && (km.centroids[1] - expected[1]).abs() < 1e-6);
        assert_eq!(km.counts, vec![4, 2]);
        assert_eq!(&km.centroids[2..], &[0.0, 1.0]);
    }

    #[test]
    fn refuses_too_few_vectors_and_small_k() {
        let data = unit(&[1.0, 0.0]);
        assert!(SphericalKMeans::fit(&data, 2, KMeansConfig::new(2, 0)).is_err());
        assert!(SphericalKMeans::fit(&[data.clone(), data].concat(), 2, KMeansConfig::new(1, 0)).is_err());
    }

    #[test]
    fn empty_cluster_is_reseeded() {
        // Four identical vectors and one outlier, k = 2: both clusters must end non-empty.
        let a = unit(&[1.0, 0.0, 0.0]);
        let b = unit(&[0.0, 0.0, 1.0]);
        let data = [a.clone(), a.clone(), a.clone(), a, b].concat();
        let km = SphericalKMeans::fit(&data, 3, KMeansConfig::new(2, 3)).unwrap();
        let (labels, _) = assign(&data, 3, &km.centroids);
        assert_ne!(labels[0], labels[4]);
    }
}
