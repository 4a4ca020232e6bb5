//! How the FPN's laterals start before PiCIE training.
//!
//! Seeded random laterals (the authors' choice) start the embedder far from the backbone's own
//! information: k-means on the untrained FPN's features scores well below k-means on the
//! backbone's taps themselves. `Pca` starts it there instead: each lateral projects its tap onto
//! the tap's leading principal directions (measured on the training frames), into a block of
//! output channels of its own, centred and scaled so every tap's block has unit mean squared
//! norm. The FPN's top-down sum of disjoint blocks is then a concatenation, so the untrained
//! embedder computes a PCA-compressed hypercolumn of the backbone (every tap, equal weight) in
//! the FPN's width, and training moves on from there.

use anyhow::{bail, Result};
use burn::tensor::Tensor;
use nalgebra::{DMatrix, SymmetricEigen};
use serde::{Deserialize, Serialize};

use crate::model::embedder::imagenet_normalize;
use crate::model::{Embedder, NamedTensor, TensorMap};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FpnInit {
    /// Seeded random laterals.
    #[default]
    Random,
    /// Laterals from the principal components of the backbone's taps on the training frames.
    Pca,
}

impl FpnInit {
    pub fn is_random(&self) -> bool {
        *self == FpnInit::Random
    }
}

/// Frames (spread evenly over the training set) whose taps the principal components are
/// measured on: enough cells for a stable 320 x 320 covariance at stride 32 (100 cells each).
pub const PCA_FRAMES: usize = 96;
/// Frames per backbone forward pass while measuring.
const PCA_BATCH: usize = 8;

/// How many output channels each tap's block gets: an equal share of `dim`, but no more than
/// the tap has channels; what a narrow tap leaves goes to the wider ones.
pub fn block_dims(tap_channels: [usize; 4], dim: usize) -> Result<[usize; 4]> {
    let mut dims = [0; 4];
    let mut left = dim;
    for (i, &c) in tap_channels.iter().enumerate() {
        dims[i] = c.min(left / (4 - i));
        left -= dims[i];
    }
    if left > 0 {
        bail!("the taps' {} channels in all cannot fill {dim} output channels", tap_channels.iter().sum::<usize>());
    }
    Ok(dims)
}

/// Running mean and covariance of one tap's cells, in f64.
#[derive(Clone, Debug)]
pub struct TapMoments {
    pub channels: usize,
    count: u64,
    /// Cells are accumulated less this (the first batch's mean): deep taps can have means far
    /// above their spread, and raw sums of x x^T would lose the spread to cancellation.
    shift: Option<Vec<f64>>,
    /// The sum of (x - shift).
    sum: Vec<f64>,
    /// channels x channels, row-major: the sum of (x - shift)(x - shift)^T.
    outer: Vec<f64>,
}

impl TapMoments {
    pub fn new(channels: usize) -> Self {
        Self { channels, count: 0, shift: None, sum: vec![0.0; channels], outer: vec![0.0; channels * channels] }
    }

    /// Adds the cells of an N x C x H x W map given as flat NCHW data.
    pub fn add_nchw(&mut self, data: &[f32], n: usize, hw: usize) {
        let c = self.channels;
        assert_eq!(data.len(), n * c * hw, "tap data is N x C x H x W");
        // Cells as rows (cells x C), then one f64 matrix product for the outer products.
        let mut rows = ndarray::Array2::<f64>::zeros((n * hw, c));
        for img in 0..n {
            for ch in 0..c {
                let plane = &data[(img * c + ch) * hw..(img * c + ch + 1) * hw];
                for (cell, &v) in plane.iter().enumerate() {
                    rows[[img * hw + cell, ch]] = v as f64;
                }
            }
        }
        let shift = self.shift.get_or_insert_with(|| rows.mean_axis(ndarray::Axis(0)).expect("at least one cell").to_vec());
        for mut row in rows.rows_mut() {
            row.iter_mut().zip(shift.iter()).for_each(|(v, s)| *v -= s);
        }
        let outer = rows.t().dot(&rows);
        self.outer.iter_mut().zip(outer.iter()).for_each(|(a, b)| *a += b);
        for row in rows.rows() {
            self.sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        }
        self.count += (n * hw) as u64;
    }

    pub fn mean(&self) -> Vec<f64> {
        let shift = self.shift.clone().unwrap_or_else(|| vec![0.0; self.channels]);
        self.sum.iter().zip(shift).map(|(s, m)| s / self.count.max(1) as f64 + m).collect()
    }

    /// The covariance's eigenvectors (columns) and eigenvalues, largest first.
    pub fn principal_components(&self) -> (DMatrix<f64>, Vec<f64>) {
        let c = self.channels;
        let n = self.count.max(2) as f64;
        // Mean of the shifted cells: small, so subtracting its outer product loses little.
        let d: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let cov = DMatrix::from_fn(c, c, |i, j| (self.outer[i * c + j] - n * d[i] * d[j]) / (n - 1.0));
        let eig = SymmetricEigen::new(cov);
        let mut order: Vec<usize> = (0..c).collect();
        order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
        let vectors = DMatrix::from_fn(c, c, |i, j| eig.eigenvectors[(i, order[j])]);
        let values = order.iter().map(|&j| eig.eigenvalues[j].max(0.0)).collect();
        (vectors, values)
    }
}

/// Lateral weights (`dim` x C, row-major) and biases (`dim`) for each tap: rows
/// `offset..offset + d` of tap i's lateral are its d leading principal directions divided by the
/// square root of their summed variance, the bias centres them, every other row is zero.
pub fn pca_laterals(moments: &[TapMoments; 4], dims: [usize; 4], dim: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
    let mut offset = 0;
    moments
        .iter()
        .zip(dims)
        .map(|(m, d)| {
            let c = m.channels;
            let (vectors, values) = m.principal_components();
            let scale = 1.0 / values[..d].iter().sum::<f64>().max(1e-12).sqrt();
            let mean = m.mean();
            let mut weight = vec![0f32; dim * c];
            let mut bias = vec![0f32; dim];
            for j in 0..d {
                let row = offset + j;
                let mut centre = 0.0;
                for ch in 0..c {
                    let w = vectors[(ch, j)] * scale;
                    weight[row * c + ch] = w as f32;
                    centre += w * mean[ch];
                }
                bias[row] = -centre as f32;
            }
            offset += d;
            (weight, bias)
        })
        .collect()
}

/// Measures the backbone's taps on `frames` (3 x H x W planes in [0, 1], all one size) and
/// writes PCA laterals into `weights` (a full embedder map, `fpn.lateral.{i}.*`).
pub fn init_pca_laterals(
    embedder: &Embedder,
    frames: &[Vec<f32>],
    (width, height): (usize, usize),
    dim: usize,
    weights: &mut TensorMap,
) -> Result<()> {
    if frames.is_empty() {
        bail!("the PCA initialisation needs at least one frame");
    }
    let device = embedder.fpn.laterals[0].weight.val().device();
    let mut moments: Option<[TapMoments; 4]> = None;
    for batch in frames.chunks(PCA_BATCH) {
        let data: Vec<f32> = batch.concat();
        let x = Tensor::<4>::from_data(burn::tensor::TensorData::new(data, vec![batch.len(), 3, height, width]), &device);
        let taps = embedder.backbone.forward(imagenet_normalize(x));
        let m = moments.get_or_insert_with(|| taps.each_ref().map(|t| TapMoments::new(t.dims()[1])));
        for (tap, stats) in taps.into_iter().zip(m.iter_mut()) {
            let [n, _, h, w] = tap.dims();
            let data = NamedTensor::from_burn(tap).data;
            stats.add_nchw(&data, n, h * w);
        }
    }
    let moments = moments.expect("at least one batch");
    let dims = block_dims(moments.each_ref().map(|m| m.channels), dim)?;
    for (i, (weight, bias)) in pca_laterals(&moments, dims, dim).into_iter().enumerate() {
        let c = moments[i].channels;
        weights.insert(format!("fpn.lateral.{i}.weight"), NamedTensor::new(vec![dim, c, 1, 1], weight));
        weights.insert(format!("fpn.lateral.{i}.bias"), NamedTensor::new(vec![dim], bias));
    }
    tracing::info!(frames = frames.len(), ?dims, "FPN laterals initialised from the taps' principal components");
    Ok(())
}

/// `count` frame indices spread evenly over `n` frames (all of them when fewer).
pub fn spread(n: usize, count: usize) -> Vec<usize> {
    if n <= count {
        return (0..n).collect();
    }
    (0..count).map(|i| i * n / count).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn blocks_share_the_width_and_respect_narrow_taps() {
        assert_eq!(block_dims([24, 40, 112, 320], 128).unwrap(), [24, 34, 35, 35]);
        assert_eq!(block_dims([64, 128, 256, 512], 128).unwrap(), [32, 32, 32, 32]);
        assert!(block_dims([2, 2, 2, 2], 128).is_err());
    }

    /// Cells drawn with a known covariance: the leading direction found is the planted one, the
    /// blocks are disjoint, and the projected cells are centred with unit mean squared norm.
    #[test]
    fn laterals_project_onto_the_leading_directions() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let channels = [3usize, 4, 5, 6];
        let (n, hw) = (4usize, 500usize);
        // Tap i: channel 0 has spread 3, the rest 0.5, all around a mean of 2.
        let taps: Vec<Vec<f32>> = channels
            .iter()
            .map(|&c| {
                let mut data = vec![0f32; n * c * hw];
                for img in 0..n {
                    for cell in 0..hw {
                        for ch in 0..c {
                            let spread = if ch == 0 { 3.0 } else { 0.5 };
                            data[(img * c + ch) * hw + cell] = 2.0 + spread * (rng.random::<f32>() * 2.0 - 1.0) * 3f32.sqrt();
                        }
                    }
                }
                data
            })
            .collect();
        let mut moments = channels.map(TapMoments::new);
        for (m, t) in moments.iter_mut().zip(&taps) {
            m.add_nchw(&t[..n * m.channels * hw / 2], n / 2, hw);
            m.add_nchw(&t[n * m.channels * hw / 2..], n / 2, hw);
        }
        let dim = 8;
        let dims = block_dims(channels, dim).unwrap();
        assert_eq!(dims, [2, 2, 2, 2]);
        let laterals = pca_laterals(&moments, dims, dim);
        let mut offset = 0;
        for ((i, (w, b)), &c) in laterals.iter().enumerate().zip(&channels) {
            // Rows outside the tap's block are zero.
            for row in (0..dim).filter(|r| !(offset..offset + dims[i]).contains(r)) {
                assert!(w[row * c..(row + 1) * c].iter().all(|&v| v == 0.0) && b[row] == 0.0, "tap {i} row {row}");
            }
            // The first row of the block points along channel 0.
            let first = &w[offset * c..(offset + 1) * c];
            let norm = first.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((first[0].abs() / norm) > 0.99, "tap {i}: {first:?}");
            // Projected cells: mean 0, mean squared norm 1.
            let (mut mean, mut sq) = (vec![0f64; dim], 0f64);
            for img in 0..n {
                for cell in 0..hw {
                    for row in 0..dim {
                        let y = b[row] as f64
                            + (0..c).map(|ch| w[row * c + ch] as f64 * taps[i][(img * c + ch) * hw + cell] as f64).sum::<f64>();
                        mean[row] += y;
                        sq += y * y;
                    }
                }
            }
            let cells = (n * hw) as f64;
            assert!(mean.iter().all(|m| (m / cells).abs() < 1e-3), "tap {i}: {mean:?}");
            assert!((sq / cells - 1.0).abs() < 1e-2, "tap {i}: {}", sq / cells);
            offset += dims[i];
        }
    }
}
