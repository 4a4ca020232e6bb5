//! A feature-correspondence term in the spirit of STEGO (Hamilton et al., ICLR 2022): the
//! embedder's pixel-feature similarities are trained to follow those of the backbone's deep
//! taps. PiCIE's loss only says "stay near your cluster"; this term says which pixels, within
//! a frame and across two frames, the ImageNet features consider alike, at the embedder's own
//! stride-4 resolution.
//!
//! For sampled cells i, j: teacher similarity F_ij = cos(t_i, t_j) of the backbone's stride-16
//! and stride-32 taps (each L2-normalised, concatenated, detached), student similarity
//! S_ij = cos(z_i, z_j) of the embedder's output. The loss is -mean(max(S_ij, 0) * (F'_ij - b))
//! where F' is F centred per row (STEGO's "pointwise" centring: a cell that is similar to
//! everything is not more similar to anything) and scaled to unit spread over the batch, and
//! b a shift in those units: pairs the teacher rates above it are pulled together, the rest
//! pushed apart until orthogonal. Pairs come from the same frame and from another frame of the
//! batch; the shift for the second kind is higher, as in STEGO, since most cells of two frames
//! belong to different things. The other frame is the next one in the shuffled batch, a random
//! frame, or ([`Partners::Nearest`]) the frame whose pooled teacher features are closest, as
//! STEGO draws its cross-image positives from nearest neighbours: two views of much the same
//! scene, where the teacher's cross-frame similarities mean what they say.

use burn::tensor::{Int, Tensor, TensorData};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::loss::pixels;
use crate::model::embedder::l2_normalize;

/// Cells sampled per frame (STEGO samples an 11 x 11 grid).
pub const POINTS_PER_IMAGE: usize = 121;
/// The teacher taps, by index into the backbone's four (strides 4, 8, 16, 32 for a CNN; a
/// ViT's two deepest tapped blocks).
const TEACHER_TAPS: [usize; 2] = [2, 3];
/// Keeps the spread's division finite on a constant teacher.
const SPREAD_EPS: f32 = 1e-6;

/// Where each frame's cross-frame partner comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Partners {
    /// The next frame of the shuffled batch: a random frame.
    #[default]
    Batch,
    /// The training frames matched in pairs, each with one of its nearest neighbours by the
    /// teacher's pooled features ([`nearest_pairs`]); the pairs are shuffled and batched whole.
    Nearest,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CorrespondenceConfig {
    /// Weight of the term next to the PiCIE loss (0: off).
    pub weight: f32,
    /// Shift b for pairs within a frame, in units of the teacher's spread.
    pub intra_shift: f32,
    /// Shift b for pairs across two frames.
    pub inter_shift: f32,
    /// Which frame a frame is compared with.
    #[serde(default)]
    pub partners: Partners,
}

impl Default for CorrespondenceConfig {
    fn default() -> Self {
        Self { weight: 0.0, intra_shift: 0.0, inter_shift: 0.5, partners: Partners::Batch }
    }
}

impl CorrespondenceConfig {
    pub fn enabled(&self) -> bool {
        self.weight > 0.0
    }

    /// On, with nearest-neighbour partners: the frames must be paired before training.
    pub fn pairs_neighbours(&self) -> bool {
        self.enabled() && self.partners == Partners::Nearest
    }

    /// Off: settings written before the term existed read back as this.
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }

    pub fn check(&self) -> anyhow::Result<()> {
        for (name, v) in [("weight", self.weight), ("intra shift", self.intra_shift), ("inter shift", self.inter_shift)] {
            if !v.is_finite() {
                anyhow::bail!("correspondence {name} must be a finite number (got {v})");
            }
        }
        if self.weight < 0.0 {
            anyhow::bail!("correspondence weight must be 0 (off) or positive (got {})", self.weight);
        }
        Ok(())
    }
}

/// Row indices of `points` random cells per image in an N x h x w map flattened image-major,
/// and the same cells' rows in the coarser taps.
struct Samples {
    student: Vec<i64>,
    taps: Vec<Vec<i64>>,
}

fn sample(rng: &mut impl Rng, n: usize, (h, w): (usize, usize), tap_sizes: &[(usize, usize)], points: usize) -> Samples {
    let mut student = Vec::with_capacity(n * points);
    let mut taps = vec![Vec::with_capacity(n * points); tap_sizes.len()];
    for img in 0..n {
        for _ in 0..points {
            let (y, x) = (rng.random_range(0..h), rng.random_range(0..w));
            student.push((img * h * w + y * w + x) as i64);
            for (t, &(th, tw)) in tap_sizes.iter().enumerate() {
                // The tap cell that covers this stride-4 cell (its centre, scaled).
                let ty = ((y * th) / h).min(th - 1);
                let tx = ((x * tw) / w).min(tw - 1);
                taps[t].push((img * th * tw + ty * tw + tx) as i64);
            }
        }
    }
    Samples { student, taps }
}

fn rows_at(map: Tensor<4>, idx: &[i64]) -> Tensor<2> {
    let device = map.device();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(idx.to_vec(), [idx.len()]), &device);
    pixels(map).select(0, idx)
}

/// Teacher similarities centred per row and scaled to unit spread, minus `shift`.
fn teacher_targets(f: Tensor<3>, shift: f32) -> Tensor<3> {
    let centred = f.clone() - f.mean_dim(2);
    let spread = centred.clone().powf_scalar(2.0).mean().sqrt().clamp_min(SPREAD_EPS);
    let [a, b, c] = centred.dims();
    (centred / spread.reshape([1, 1, 1]).expand([a, b, c])) - shift
}

/// -mean(max(S, 0) * target).
fn pair_loss(s: Tensor<3>, target: Tensor<3>) -> Tensor<1> {
    (s.clamp_min(0.0) * target).mean().neg()
}

/// The correspondence loss of one batch. `z`: the embedder's unit features, N x D x h x w;
/// `taps`: the backbone's four taps of the same forward pass. Needs N >= 2 for the cross-frame
/// pairs; with one frame only the within-frame term counts.
pub fn correspondence_loss(z: Tensor<4>, taps: &[Tensor<4>; 4], config: &CorrespondenceConfig, rng: &mut impl Rng) -> Tensor<1> {
    let [n, _, h, w] = z.dims();
    let tap_sizes: Vec<(usize, usize)> = TEACHER_TAPS
        .iter()
        .map(|&t| {
            let [_, _, th, tw] = taps[t].dims();
            (th, tw)
        })
        .collect();
    let p = POINTS_PER_IMAGE;
    let s = sample(rng, n, (h, w), &tap_sizes, p);
    let student = rows_at(z, &s.student).reshape([n as i32, p as i32, -1]);
    let teacher_parts: Vec<Tensor<2>> =
        TEACHER_TAPS.iter().zip(&s.taps).map(|(&t, idx)| rows_at(l2_normalize(taps[t].clone().detach()), idx)).collect();
    // Each part is a unit vector; their concatenation has norm sqrt(parts).
    let teacher = (Tensor::cat(teacher_parts, 1) / (TEACHER_TAPS.len() as f32).sqrt()).reshape([n as i32, p as i32, -1]);

    let sim = |a: &Tensor<3>, b: &Tensor<3>| a.clone().matmul(b.clone().swap_dims(1, 2));
    let intra = pair_loss(sim(&student, &student), teacher_targets(sim(&teacher, &teacher), config.intra_shift));
    if n < 2 {
        return intra * config.weight;
    }
    // Each frame against its partner in the batch.
    let device = student.device();
    let next: Vec<i64> = (0..n).map(|i| partner(config.partners, i, n) as i64).collect();
    let next = Tensor::<1, Int>::from_data(TensorData::new(next, [n]), &device);
    let (student_b, teacher_b) = (student.clone().select(0, next.clone()), teacher.clone().select(0, next));
    let inter = pair_loss(sim(&student, &student_b), teacher_targets(sim(&teacher, &teacher_b), config.inter_shift));
    (intra + inter) * (config.weight / 2.0)
}

/// The index in a batch of `n` of frame `i`'s partner: the next frame, or for nearest-neighbour
/// pairs, which are batched side by side, the other of its pair (the next frame for an odd
/// one out at the end).
fn partner(partners: Partners, i: usize, n: usize) -> usize {
    match partners {
        Partners::Nearest if (i ^ 1) < n => i ^ 1,
        _ => (i + 1) % n,
    }
}

/// The frames matched in pairs by their descriptors (unit vectors, row-major, `dim` wide):
/// greedily, the most similar two unmatched frames first, so each frame is in one pair and most
/// are with their nearest neighbour. An odd frame out is paired with its nearest neighbour,
/// which then trains twice an epoch.
pub fn nearest_pairs(descriptors: &[f32], dim: usize) -> Vec<(usize, usize)> {
    let n = descriptors.len() / dim;
    let row = |i: usize| &descriptors[i * dim..(i + 1) * dim];
    let sim = |i: usize, j: usize| row(i).iter().zip(row(j)).map(|(a, b)| a * b).sum::<f32>();
    let mut candidates: Vec<(f32, usize, usize)> =
        (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).map(|(i, j)| (sim(i, j), i, j)).collect();
    // Most similar first; ties in index order, so the pairs do not depend on the sort.
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    let mut matched = vec![false; n];
    let mut pairs = vec![];
    for (_, i, j) in candidates {
        if !matched[i] && !matched[j] {
            matched[i] = true;
            matched[j] = true;
            pairs.push((i, j));
        }
    }
    if let Some(odd) = matched.iter().position(|m| !m) {
        if let Some(nearest) = (0..n).filter(|&j| j != odd).max_by(|&a, &b| sim(odd, a).total_cmp(&sim(odd, b))) {
            pairs.push((odd, nearest));
        }
    }
    pairs
}

/// A frame's descriptor for [`nearest_pairs`]: its teacher taps' cells (each L2-normalised)
/// averaged over the frame, concatenated and normalised. `taps` are the backbone's four taps of
/// N frames; returns N x (the teacher taps' channels), row-major.
pub fn frame_descriptors(taps: &[Tensor<4>; 4]) -> Result<Vec<f32>, burn::tensor::DataError> {
    let parts: Vec<Tensor<2>> = TEACHER_TAPS
        .iter()
        .map(|&t| {
            let [n, c, _, _] = taps[t].dims();
            l2_normalize(taps[t].clone()).mean_dim(3).mean_dim(2).reshape([n, c])
        })
        .collect();
    let joined = Tensor::cat(parts, 1);
    let norm = joined.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(SPREAD_EPS);
    let [n, d] = joined.dims();
    (joined / norm.expand([n, d])).into_data().try_to_vec::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::embedder::OUTPUT_STRIDE;
    use burn::tensor::Device;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Maps whose cells are one of two "things": the left half of every frame is thing A, the
    /// right half thing B, in the teacher's features.
    fn two_things_taps(n: usize, h: usize, w: usize) -> [Tensor<4>; 4] {
        let tap = |stride: usize, c: usize| {
            let (th, tw) = (h * OUTPUT_STRIDE / stride, w * OUTPUT_STRIDE / stride);
            let mut v = vec![0.0f32; n * c * th * tw];
            for img in 0..n {
                for y in 0..th {
                    for x in 0..tw {
                        let ch = if x < tw / 2 { 0 } else { 1 };
                        v[((img * c + ch) * th + y) * tw + x] = 1.0;
                    }
                }
            }
            Tensor::<4>::from_data(TensorData::new(v, [n, c, th, tw]), &Device::flex())
        };
        [tap(4, 2), tap(8, 2), tap(16, 3), tap(32, 4)]
    }

    #[test]
    fn nearest_pairs_match_each_frame_once_most_similar_first() {
        // Frames 0 and 2 alike, 1 and 3 alike, 4 nearest to 2 but left over.
        let d: Vec<f32> = [[1.0, 0.0], [0.0, 1.0], [0.99, 0.141], [0.141, 0.99], [0.9, 0.436]].concat();
        let pairs = nearest_pairs(&d, 2);
        assert_eq!(&pairs[..2], &[(0, 2), (1, 3)]);
        assert_eq!(pairs[2], (4, 2));
        assert_eq!(nearest_pairs(&[1.0, 0.0], 2), vec![]);
    }

    #[test]
    fn nearest_partners_are_the_other_of_each_pair() {
        let of = |n: usize| (0..n).map(|i| partner(Partners::Nearest, i, n)).collect::<Vec<_>>();
        assert_eq!(of(4), vec![1, 0, 3, 2]);
        assert_eq!(of(5), vec![1, 0, 3, 2, 0]);
        assert_eq!((0..3).map(|i| partner(Partners::Batch, i, 3)).collect::<Vec<_>>(), vec![1, 2, 0]);
    }

    #[test]
    fn samples_land_in_the_tap_cell_that_covers_them() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let s = sample(&mut rng, 2, (8, 16), &[(2, 4), (1, 2)], 50);
        for (k, &row) in s.student.iter().enumerate() {
            let (img, y, x) = (row as usize / 128, (row as usize % 128) / 16, row as usize % 16);
            assert_eq!(s.taps[0][k] as usize, img * 8 + (y / 4) * 4 + x / 4);
            assert_eq!(s.taps[1][k] as usize, img * 2 + x / 8);
        }
    }

    #[test]
    fn teacher_targets_are_centred_per_row_with_unit_spread() {
        let f = Tensor::<3>::from_data(TensorData::new(vec![0.9f32, 0.5, 0.1, 0.2, 0.4, 0.6], [1, 2, 3]), &Device::flex());
        let t: Vec<f32> = teacher_targets(f, 0.5).into_data().try_to_vec::<f32>().unwrap();
        let centred = [0.4f32, 0.0, -0.4, -0.2, 0.0, 0.2];
        let spread = (centred.iter().map(|v| v * v).sum::<f32>() / 6.0).sqrt();
        for (got, c) in t.iter().zip(centred) {
            assert!((got - (c / spread - 0.5)).abs() < 1e-5, "{t:?}");
        }
    }

    #[test]
    fn descending_the_loss_groups_the_teachers_things() {
        // A student that starts from random features: a few gradient steps against the loss
        // must make cells of the same thing (in either frame) more alike than cells of
        // different things, as the teacher says.
        let (n, h, w, d) = (2, 8, 16, 4);
        let device = Device::flex().autodiff();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Random directions in the positive orthant, so every pair starts with S > 0 (the loss
        // leaves pairs already orthogonal or opposed alone).
        let mut values: Vec<f32> = (0..n * d * h * w).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let taps = two_things_taps(n, h, w).map(|t| t.to_device(&device));
        let config = CorrespondenceConfig { weight: 1.0, ..Default::default() };
        let cell = |v: &[f32], img: usize, y: usize, x: usize| -> Vec<f32> {
            let c: Vec<f32> = (0..d).map(|c| v[((img * d + c) * h + y) * w + x]).collect();
            let norm = c.iter().map(|a| a * a).sum::<f32>().sqrt();
            c.iter().map(|a| a / norm).collect()
        };
        let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f32>();
        // Mean similarity of same-thing and different-thing pairs over every cell pair.
        let margin = |v: &[f32]| {
            let (mut same, mut diff, mut ns, mut nd) = (0.0f32, 0.0f32, 0usize, 0usize);
            let cells: Vec<(usize, usize, usize)> = (0..n).flat_map(|i| (0..h).flat_map(move |y| (0..w).map(move |x| (i, y, x)))).collect();
            for &(i, y, x) in &cells {
                for &(j, v2, u) in &cells {
                    let c = cos(&cell(v, i, y, x), &cell(v, j, v2, u));
                    if (x < w / 2) == (u < w / 2) {
                        (same, ns) = (same + c, ns + 1);
                    } else {
                        (diff, nd) = (diff + c, nd + 1);
                    }
                }
            }
            same / ns as f32 - diff / nd as f32
        };
        const STEPS: usize = 40;
        const LR: f32 = 200.0;
        let before = margin(&values);
        for _ in 0..STEPS {
            let raw = Tensor::<4>::from_data(TensorData::new(values.clone(), [n, d, h, w]), &device).require_grad();
            let loss = correspondence_loss(l2_normalize(raw.clone()), &taps, &config, &mut rng);
            let g = raw.grad(&loss.backward()).unwrap();
            values = (raw.inner() - g * LR).into_data().try_to_vec::<f32>().unwrap();
        }
        let after = margin(&values);
        assert!(after > before + 0.3 && after > 0.5, "same-thing minus different-thing similarity: {before} before, {after} after");
    }

    #[test]
    fn off_by_default_and_one_frame_is_enough() {
        assert!(!CorrespondenceConfig::default().enabled());
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let z = l2_normalize(Tensor::<4>::ones([1, 4, 8, 16], &Device::flex()));
        let config = CorrespondenceConfig { weight: 2.0, ..Default::default() };
        let loss: f32 = correspondence_loss(z, &two_things_taps(1, 8, 16), &config, &mut rng).into_scalar();
        // Every student pair has similarity 1 and the targets are centred per row: the mean is 0.
        assert!(loss.abs() < 1e-5, "{loss}");
    }
}
