//! How many classes a pile of images holds, suggested rather than guessed: k-means at each K of
//! a range on one sample of the pixel features, and the K at the knee of the distortion curve
//! picked: the point where adding classes stops paying (Satopää et al. 2011, "Kneedle": on the
//! curve scaled to the unit square, the K farthest below the chord from the first K to the
//! last). Distortion is the features' mean cosine distance to their nearest centroid.
//!
//! Each K's silhouette is reported beside it, but not used to pick: on pixel features, which
//! vary continuously rather than in separate blobs, it falls almost steadily with K (on CamVid
//! street frames it picked the smallest K of any range, 4 of 4 to 24), so its maximum says
//! little about the number of classes.
//!
//! The silhouette (Rousseeuw 1987) asks of every feature whether it sits nearer the rest of its
//! own cluster than the nearest other cluster: `(b - a) / max(a, b)`, `a` its mean distance to
//! its own cluster, `b` the smallest mean distance to another. It needs no labels, is comparable
//! across K (unlike the k-means objective, which only falls as K grows) and is measured in the
//! distance the classes are assigned by. With cosine distance and unit features, the mean
//! distance from `x` to a cluster `C` is `1 - x . sum(C) / |C|` (its own cluster: without `x`
//! itself), so the exact silhouette of N features costs N x K dot products, not N^2.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::kmeans::{assign, KMeansConfig, SphericalKMeans};

/// Features the suggestion fits and scores each K on: enough for a stable silhouette, few
/// enough that a range of 20 K takes about a minute on two cores.
pub const SUGGEST_VECTORS: usize = 60_000;
/// The widest range one suggestion may try.
pub const MAX_KS: usize = 40;

/// One K of the range and its score.
#[derive(Serialize, Deserialize, utoipa::ToSchema, Clone, Copy, Debug, PartialEq)]
pub struct KScore {
    pub k: usize,
    /// Mean cosine distance of the sample's features to their nearest centroid (0 to 2): the
    /// k-means objective, which the knee is found on.
    pub distortion: f64,
    /// Mean silhouette of the sample's features under the K-cluster fit (cosine distance), -1 to 1.
    pub silhouette: f64,
}

/// A suggestion: the K picked and the curve it was picked from.
#[derive(Serialize, Deserialize, utoipa::ToSchema, Clone, Debug, PartialEq)]
pub struct KSuggestion {
    pub k: usize,
    pub scores: Vec<KScore>,
}

/// Checks a range of K: `2 <= min < max <= max_classes`, at most [`MAX_KS`] values.
pub fn check_range(min: usize, max: usize, max_classes: usize) -> Result<(), String> {
    if min < 2 || max > max_classes || min >= max {
        return Err(format!("the range of K must satisfy 2 <= k_min < k_max <= {max_classes} (got {min} to {max})"));
    }
    if max - min + 1 > MAX_KS {
        return Err(format!("a range of K holds at most {MAX_KS} values (got {})", max - min + 1));
    }
    Ok(())
}

/// The mean silhouette of `data` (unit rows of `dim`) under these labels, cosine distance.
/// Features alone in their cluster score 0, as Rousseeuw defines.
pub fn silhouette(data: &[f32], dim: usize, labels: &[u32], k: usize) -> f64 {
    use rayon::prelude::*;
    let mut sums = vec![0f64; k * dim];
    let mut counts = vec![0usize; k];
    for (x, &l) in data.chunks(dim).zip(labels) {
        counts[l as usize] += 1;
        sums[l as usize * dim..(l as usize + 1) * dim].iter_mut().zip(x).for_each(|(s, &v)| *s += v as f64);
    }
    let n = labels.len().max(1);
    let total: f64 = data
        .par_chunks(dim)
        .zip(labels.par_iter())
        .map(|(x, &own)| {
            let own = own as usize;
            if counts[own] < 2 {
                return 0.0;
            }
            let dot = |c: usize| sums[c * dim..(c + 1) * dim].iter().zip(x).map(|(s, &v)| s * v as f64).sum::<f64>();
            let self_dot: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let a = ((counts[own] - 1) as f64 - (dot(own) - self_dot)) / (counts[own] - 1) as f64;
            let b = (0..k).filter(|&c| c != own && counts[c] > 0).map(|c| 1.0 - dot(c) / counts[c] as f64).fold(f64::INFINITY, f64::min);
            if !b.is_finite() {
                return 0.0;
            }
            let m = a.max(b);
            if m <= 0.0 {
                0.0
            } else {
                (b - a) / m
            }
        })
        .sum();
    total / n as f64
}

/// The knee of a falling curve: on the curve scaled to the unit square, the point farthest below
/// the chord from its first point to its last (the first K on a tie; the first K when the curve
/// does not bend).
pub fn knee(scores: &[KScore]) -> usize {
    let (first, last) = (scores[0], scores[scores.len() - 1]);
    let (dk, dd) = ((last.k - first.k).max(1) as f64, first.distortion - last.distortion);
    if dd <= 0.0 {
        return first.k;
    }
    let mut best = (0.0, first.k);
    for s in scores {
        let x = (s.k - first.k) as f64 / dk;
        let y = (first.distortion - s.distortion) / dd;
        if y - x > best.0 {
            best = (y - x, s.k);
        }
    }
    best.1
}

/// Fits each K in `min..=max` on at most [`SUGGEST_VECTORS`] of `data` (drawn with `seed`)
/// and picks the K at the knee of the distortion ([`knee`]). `progress(done, total)` hears of
/// every K; false stops (Ok(None)).
pub fn suggest_k(
    data: &[f32],
    dim: usize,
    min: usize,
    max: usize,
    seed: u64,
    mut progress: impl FnMut(usize, usize) -> bool,
) -> Result<Option<KSuggestion>> {
    let n = data.len() / dim;
    if n <= max {
        bail!("{n} features cannot be clustered into up to {max} classes");
    }
    let sample = &*super::cluster::sample_rows(data, dim, SUGGEST_VECTORS, seed ^ 0x6b5f_7375_6767);
    let ks: Vec<usize> = (min..=max).collect();
    let mut scores = Vec::with_capacity(ks.len());
    for (i, &k) in ks.iter().enumerate() {
        let km = SphericalKMeans::fit(sample, dim, KMeansConfig::new(k, seed))?;
        let (labels, sims) = assign(sample, dim, &km.centroids);
        let distortion = sims.iter().map(|&s| 1.0 - s as f64).sum::<f64>() / sims.len().max(1) as f64;
        scores.push(KScore { k, distortion, silhouette: silhouette(sample, dim, &labels, k) });
        if !progress(i + 1, ks.len()) {
            return Ok(None);
        }
    }
    Ok(Some(KSuggestion { k: knee(&scores), scores }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `k` tight groups of unit vectors around random directions in `dim` dimensions.
    fn groups(k: usize, per: usize, dim: usize, spread: f32, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let centers: Vec<Vec<f32>> = (0..k).map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
        let mut out = vec![];
        for c in &centers {
            for _ in 0..per {
                let mut v: Vec<f32> = c.iter().map(|&x| x + spread * rng.random_range(-1.0..1.0)).collect();
                super::super::kmeans::normalize(&mut v);
                out.extend(v);
            }
        }
        out
    }

    #[test]
    fn the_silhouette_is_the_pairwise_definition() {
        let data = groups(3, 20, 8, 0.4, 1);
        let labels: Vec<u32> = (0..60).map(|i| (i / 20) as u32).collect();
        // Straight from the definition, every pair.
        let rows: Vec<&[f32]> = data.chunks(8).collect();
        let d = |i: usize, j: usize| 1.0 - rows[i].iter().zip(rows[j]).map(|(a, b)| (a * b) as f64).sum::<f64>();
        let mut total = 0.0;
        for i in 0..60 {
            let mean = |c: u32| {
                let m: Vec<usize> = (0..60).filter(|&j| j != i && labels[j] == c).collect();
                m.iter().map(|&j| d(i, j)).sum::<f64>() / m.len() as f64
            };
            let a = mean(labels[i]);
            let b = (0..3).filter(|&c| c != labels[i]).map(mean).fold(f64::INFINITY, f64::min);
            total += (b - a) / a.max(b);
        }
        assert!((silhouette(&data, 8, &labels, 3) - total / 60.0).abs() < 1e-6);
    }

    #[test]
    fn the_suggestion_finds_the_groups() {
        let data = groups(6, 200, 16, 0.25, 7);
        let mut calls = 0;
        let s = suggest_k(&data, 16, 3, 10, 0, |_, _| {
            calls += 1;
            true
        })
        .unwrap()
        .unwrap();
        assert_eq!(s.k, 6, "{:?}", s.scores);
        assert_eq!((s.scores.len(), calls), (8, 8));
        assert!(suggest_k(&data, 16, 3, 10, 0, |_, _| false).unwrap().is_none(), "stopped after the first K");
    }

    #[test]
    fn the_knee_is_where_the_curve_stops_falling() {
        let curve = |d: &[f64]| d.iter().enumerate().map(|(i, &d)| KScore { k: 2 + i, distortion: d, silhouette: 0.0 }).collect::<Vec<_>>();
        assert_eq!(knee(&curve(&[1.0, 0.5, 0.3, 0.25, 0.22, 0.2])), 4);
        assert_eq!(knee(&curve(&[1.0, 0.9, 0.8, 0.7])), 2, "a straight line has no knee");
        assert_eq!(knee(&curve(&[0.5, 0.6, 0.7])), 2, "a rising curve neither");
    }

    #[test]
    fn ranges_are_checked() {
        assert!(check_range(2, 30, 255).is_ok());
        for (min, max) in [(1, 5), (5, 5), (6, 5), (2, 256), (2, 60)] {
            assert!(check_range(min, max, 255).is_err(), "{min}..{max}");
        }
    }
}
