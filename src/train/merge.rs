//! Over-clustering merged down to K: k-means with many clusters (the over-clustering head's K2),
//! then the clusters joined into K classes, bottom-up, by how alike their centroids are or by how
//! often their pixels touch. A class is then a set of centroids and a pixel's score for it is its
//! best similarity to any of them, so a class need not be one convex cap on the sphere as a
//! k-means cluster is: a road in sun and in shadow, or a tree against sky and against wall, can
//! be one class while a lone K-means would split or swallow them.
//!
//! No labels: the sizes and the touching counts come from the cluster images' own assignments.

use anyhow::{bail, Result};

/// What joins two groups of clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MergeBy {
    /// Average cosine similarity of the groups' centroids, each weighted by its pixels.
    Similarity,
    /// Average cosine similarity of the groups' centroids, each counted once whatever its pixels
    /// (average linkage): a cluster of many pixels weighs no more in a group than one of few.
    Average,
    /// The least cosine similarity between a centroid of one group and one of the other
    /// (complete linkage): a group joins another only if all their centroids are alike, which
    /// keeps groups compact.
    Complete,
    /// Ward's criterion: the pair whose joining adds the least to the pixels' squared distance
    /// from their group's mean centroid, which keeps groups of like size (k-means' objective,
    /// bottom-up).
    Ward,
    /// Pixels of the two groups that are 4-neighbours, over the geometric mean of the pixels on
    /// each group's border (a normalised cut between them).
    Cooccurrence,
}

/// Over-clustering: k-means with `k` clusters, merged down by `merge`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverCluster {
    pub k: usize,
    pub merge: MergeBy,
}

/// The affinities of `n` clusters, symmetric n x n, and what the merge needs beside them.
pub struct Affinity {
    n: usize,
    by: MergeBy,
    /// Similarity: cosines; co-occurrence: touching counts (the diagonal unused).
    pairs: Vec<f64>,
    /// Pixels per cluster (the similarity's weights).
    sizes: Vec<f64>,
}

impl Affinity {
    /// Cosine similarities of `n` unit centroids (row-major n x dim), weighted by `sizes`, for
    /// `by` [`MergeBy::Similarity`] or [`MergeBy::Ward`].
    pub fn centroids(by: MergeBy, centroids: &[f32], dim: usize, sizes: &[u64]) -> Result<Self> {
        if by == MergeBy::Cooccurrence {
            bail!("co-occurrence is counted on label maps, not centroids");
        }
        Ok(Self { by, ..Self::similarity(centroids, dim, sizes) })
    }

    /// Cosine similarities of `n` unit centroids (row-major n x dim), weighted by `sizes`.
    fn similarity(centroids: &[f32], dim: usize, sizes: &[u64]) -> Self {
        let n = centroids.len() / dim;
        let row = |i: usize| &centroids[i * dim..(i + 1) * dim];
        let mut pairs = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                pairs[i * n + j] = row(i).iter().zip(row(j)).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
            }
        }
        Self { n, by: MergeBy::Similarity, pairs, sizes: sizes.iter().map(|&s| s as f64).collect() }
    }

    /// Counts of 4-neighbour pixel pairs with labels i != j over label maps of `n` clusters, each
    /// map row-major with its (width, height).
    pub fn cooccurrence<'a>(n: usize, maps: impl IntoIterator<Item = (&'a [u32], (usize, usize))>) -> Result<Self> {
        let mut pairs = vec![0f64; n * n];
        let mut sizes = vec![0f64; n];
        for (labels, (w, h)) in maps {
            if labels.len() != w * h {
                bail!("a label map of {} cells is not {w} x {h}", labels.len());
            }
            let mut touch = |a: u32, b: u32| {
                if a != b {
                    pairs[a as usize * n + b as usize] += 1.0;
                    pairs[b as usize * n + a as usize] += 1.0;
                }
            };
            for y in 0..h {
                for x in 0..w {
                    let here = labels[y * w + x];
                    if x + 1 < w {
                        touch(here, labels[y * w + x + 1]);
                    }
                    if y + 1 < h {
                        touch(here, labels[(y + 1) * w + x]);
                    }
                }
            }
            for &l in labels {
                sizes[l as usize] += 1.0;
            }
        }
        Ok(Self { n, by: MergeBy::Cooccurrence, pairs, sizes })
    }

    /// How strongly two disjoint groups of clusters belong together.
    fn between(&self, g: &[usize], h: &[usize]) -> f64 {
        let n = self.n;
        let sum = |a: &[usize], b: &[usize], w: &dyn Fn(usize) -> f64| -> f64 {
            a.iter().flat_map(|&i| b.iter().map(move |&j| (i, j))).map(|(i, j)| w(i) * w(j) * self.pairs[i * n + j]).sum()
        };
        let average = || sum(g, h, &|_| 1.0) / (g.len() * h.len()) as f64;
        match self.by {
            MergeBy::Similarity => {
                let weight = |i: usize| self.sizes[i];
                let (wg, wh): (f64, f64) = (g.iter().map(|&i| weight(i)).sum(), h.iter().map(|&i| weight(i)).sum());
                if wg <= 0.0 || wh <= 0.0 {
                    // An empty cluster joins whatever its centroid is closest to: average linkage.
                    return average();
                }
                sum(g, h, &weight) / (wg * wh)
            }
            MergeBy::Average => average(),
            MergeBy::Complete => g.iter().flat_map(|&i| h.iter().map(move |&j| self.pairs[i * n + j])).fold(f64::INFINITY, f64::min),
            MergeBy::Ward => {
                // With group means m = sum(n_i c_i) / N: N_g N_h / (N_g + N_h) |m_g - m_h|^2,
                // from the centroids' dot products alone. Empty clusters weigh nothing and join
                // at no cost.
                let weight = |i: usize| self.sizes[i];
                let (wg, wh): (f64, f64) = (g.iter().map(|&i| weight(i)).sum(), h.iter().map(|&i| weight(i)).sum());
                if wg <= 0.0 || wh <= 0.0 {
                    return 0.0;
                }
                let (gg, hh, gh) = (sum(g, g, &weight) / (wg * wg), sum(h, h, &weight) / (wh * wh), sum(g, h, &weight) / (wg * wh));
                -(wg * wh / (wg + wh)) * (gg + hh - 2.0 * gh)
            }
            MergeBy::Cooccurrence => {
                let touching = sum(g, h, &|_| 1.0);
                let border = |a: &[usize]| -> f64 {
                    let inside: Vec<bool> = (0..n).map(|i| a.contains(&i)).collect();
                    a.iter().map(|&i| (0..n).filter(|&j| !inside[j]).map(|j| self.pairs[i * n + j]).sum::<f64>()).sum()
                };
                let (bg, bh) = (border(g), border(h));
                if bg <= 0.0 || bh <= 0.0 {
                    0.0
                } else {
                    touching / (bg * bh).sqrt()
                }
            }
        }
    }

    /// Agglomerative merging, the most affine pair of groups first, until `k` groups remain.
    /// Returns each cluster's group, numbered by the group's first cluster (so the result does
    /// not depend on the order of merges).
    pub fn merge(&self, k: usize) -> Result<Vec<usize>> {
        if k == 0 || k > self.n {
            bail!("cannot merge {} clusters into {k}", self.n);
        }
        let mut groups: Vec<Vec<usize>> = (0..self.n).map(|i| vec![i]).collect();
        while groups.len() > k {
            let mut best = (0, 1, f64::NEG_INFINITY);
            for a in 0..groups.len() {
                for b in a + 1..groups.len() {
                    let v = self.between(&groups[a], &groups[b]);
                    if v > best.2 {
                        best = (a, b, v);
                    }
                }
            }
            let joined = groups.remove(best.1);
            groups[best.0].extend(joined);
        }
        groups.iter_mut().for_each(|g| g.sort_unstable());
        groups.sort_unstable_by_key(|g| g[0]);
        let mut of = vec![0; self.n];
        for (gi, g) in groups.iter().enumerate() {
            for &i in g {
                of[i] = gi;
            }
        }
        Ok(of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn similarity_joins_the_closest_centroids() {
        // Two tight pairs and one far centroid, in 3-D.
        let rows = [unit(&[1.0, 0.1, 0.0]), unit(&[1.0, 0.0, 0.1]), unit(&[0.0, 1.0, 0.1]), unit(&[0.1, 1.0, 0.0]), unit(&[0.0, 0.0, 1.0])];
        let flat: Vec<f32> = rows.concat();
        let a = Affinity::similarity(&flat, 3, &[10, 10, 10, 10, 10]);
        assert_eq!(a.merge(3).unwrap(), vec![0, 0, 1, 1, 2]);
        assert_eq!(a.merge(5).unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(a.merge(1).unwrap(), vec![0; 5]);
        assert!(a.merge(0).is_err() && a.merge(6).is_err());
    }

    #[test]
    fn similarity_weighs_groups_by_their_pixels() {
        // 1 and 2 are closest and join first; whether 0 or 3 joins them next depends on which of
        // the two is the larger: 0 is nearer 1, 3 is nearer 2.
        let rows = [unit(&[1.0, 0.0]), unit(&[0.8, 0.6]), unit(&[0.6, 0.8]), unit(&[0.0, 1.0])];
        let flat = rows.concat();
        assert_eq!(Affinity::similarity(&flat, 2, &[1, 100, 1, 1]).merge(2).unwrap(), vec![0, 0, 0, 1]);
        assert_eq!(Affinity::similarity(&flat, 2, &[1, 1, 100, 1]).merge(2).unwrap(), vec![0, 1, 1, 1]);
    }

    #[test]
    fn ward_weighs_a_join_by_the_pixels_it_moves() {
        // A large cluster at 0 degrees, small ones at 20 and 45. Similarity joins the closest
        // pair, 0 and 20; Ward joins the two small ones, as moving ten pixels 25 degrees costs
        // less than moving the large cluster's mean towards the one at 20.
        let at = |deg: f32| vec![deg.to_radians().cos(), deg.to_radians().sin()];
        let flat: Vec<f32> = [at(0.0), at(20.0), at(45.0)].concat();
        let sizes = [1000, 10, 10];
        assert_eq!(Affinity::centroids(MergeBy::Ward, &flat, 2, &sizes).unwrap().merge(2).unwrap(), vec![0, 1, 1]);
        assert_eq!(Affinity::centroids(MergeBy::Similarity, &flat, 2, &sizes).unwrap().merge(2).unwrap(), vec![0, 0, 1]);
        assert!(Affinity::centroids(MergeBy::Cooccurrence, &flat, 2, &sizes).is_err());
    }

    #[test]
    fn complete_linkage_keeps_groups_compact() {
        // A chain at 0, 18, 40 and 75 degrees; 0 and 18 join first under every linkage. Average
        // linkage then adds 40 to them (mean of cos 40 and cos 22 beats cos 35); complete linkage
        // joins 40 with 75, as 40 is 40 degrees from 0.
        let at = |deg: f32| vec![deg.to_radians().cos(), deg.to_radians().sin()];
        let flat: Vec<f32> = [at(0.0), at(18.0), at(40.0), at(75.0)].concat();
        let merge = |by, sizes: &[u64]| Affinity::centroids(by, &flat, 2, sizes).unwrap().merge(2).unwrap();
        assert_eq!(merge(MergeBy::Average, &[1, 1, 1, 1]), vec![0, 0, 0, 1]);
        assert_eq!(merge(MergeBy::Complete, &[1, 1, 1, 1]), vec![0, 0, 1, 1]);
        // Sizes move the pixel-weighted similarity and neither linkage: with 0 heavy, {0, 18}
        // is 40 degrees from 40 by weight, further than 75 is.
        assert_eq!(merge(MergeBy::Average, &[1000, 1, 1, 1000]), vec![0, 0, 0, 1]);
        assert_eq!(merge(MergeBy::Complete, &[1000, 1, 1, 1000]), vec![0, 0, 1, 1]);
        assert_eq!(merge(MergeBy::Similarity, &[1000, 1, 1, 1000]), vec![0, 0, 1, 1]);
    }

    #[test]
    fn cooccurrence_joins_clusters_that_interleave() {
        // A 4 x 4 map: the left half alternates clusters 0 and 1 in a checkerboard, the right half
        // is cluster 2 on top and 3 below. 0 and 1 touch everywhere; 2 and 3 along one line.
        #[rustfmt::skip]
        let map: Vec<u32> = vec![
            0, 1, 2, 2,
            1, 0, 2, 2,
            0, 1, 3, 3,
            1, 0, 3, 3,
        ];
        let a = Affinity::cooccurrence(4, [(map.as_slice(), (4, 4))]).unwrap();
        let groups = a.merge(3).unwrap();
        assert_eq!(groups[0], groups[1]);
        assert_ne!(groups[2], groups[3]);
        assert!(Affinity::cooccurrence(4, [(map.as_slice(), (3, 4))]).is_err());
    }
}
