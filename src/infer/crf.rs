//! Edge-aware refinement of a label map: a fully connected CRF (Krähenbühl and Koltun, "Efficient
//! Inference in Fully Connected CRFs with Gaussian Edge Potentials", 2011) at the image's own
//! resolution, solved by mean-field iterations. The unary term is the class probabilities from
//! the features (softmax of the scaled cosine similarities, bilinear to every pixel); the pairwise
//! term is a Potts model under two Gaussian kernels: a smoothness kernel over position and an
//! appearance kernel over position and colour, which pulls pixels of similar colour nearby into
//! the same class, so boundaries move onto the image's edges. The defaults are the ones STEGO
//! runs (and the settings measured on CamVid before this was written).
//!
//! The appearance kernel is filtered with the permutohedral lattice ([`super::lattice`]); the
//! smoothness kernel, with a standard deviation of one pixel, is an exact separable blur.

use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::lattice::Lattice;

/// Settings of the dense CRF.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CrfConfig {
    /// Mean-field iterations.
    pub iterations: usize,
    /// Cosine similarities are multiplied by this before the softmax that gives the unary term.
    pub temperature: f32,
    /// Smoothness kernel: standard deviation in pixels, and weight.
    pub smooth_sxy: f32,
    pub smooth_weight: f32,
    /// Appearance kernel: standard deviations in pixels and in colour levels (0-255), and weight.
    pub appearance_sxy: f32,
    pub appearance_srgb: f32,
    pub appearance_weight: f32,
    /// Upper bound on pixels x classes the CRF holds at once (each buffer is this many floats)...
    pub max_values: usize,
    /// ...and on the pixels it refines: larger images are refined at a reduced size (aspect
    /// ratio kept) and the labels scaled back up. The features are at stride 4 of a 352-pixel
    /// short side, so past about a megapixel the CRF's time grows with no new information.
    pub max_pixels: usize,
}

impl Default for CrfConfig {
    fn default() -> Self {
        Self {
            iterations: 10,
            temperature: 2.0,
            smooth_sxy: 1.0,
            smooth_weight: 3.0,
            appearance_sxy: 67.0,
            appearance_srgb: 3.0,
            appearance_weight: 4.0,
            max_values: 32 << 20,
            max_pixels: 1 << 20,
        }
    }
}

impl std::str::FromStr for CrfConfig {
    type Err = String;
    /// `key=value` pairs, comma-separated, over the defaults: `iterations`, `temperature`,
    /// `smooth_sxy`, `smooth_weight`, `appearance_sxy`, `appearance_srgb`, `appearance_weight`,
    /// `max_pixels`; an empty string is the defaults.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut c = CrfConfig::default();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| format!("`{pair}` is not key=value"))?;
            let float = || {
                value
                    .parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .ok_or_else(|| format!("{key}: `{value}` is not a positive number"))
            };
            let count = || value.parse::<usize>().map_err(|_| format!("{key}: `{value}` is not a whole number"));
            match key {
                "iterations" => c.iterations = count()?,
                "temperature" => c.temperature = float()?,
                "smooth_sxy" => c.smooth_sxy = float()?,
                "smooth_weight" => c.smooth_weight = float()?,
                "appearance_sxy" => c.appearance_sxy = float()?,
                "appearance_srgb" => c.appearance_srgb = float()?,
                "appearance_weight" => c.appearance_weight = float()?,
                "max_pixels" => c.max_pixels = count()?.max(1),
                _ => return Err(format!("unknown CRF setting `{key}`")),
            }
        }
        Ok(c)
    }
}

/// Probabilities below this are clipped before the log (as pydensecrf's `unary_from_softmax`).
const MIN_PROBABILITY: f32 = 1e-5;

/// Exact Gaussian smoothing of `planes` (c planes of w x h, one after another), separable,
/// truncated at three standard deviations; a missing neighbour beyond the border counts as 0.
fn gaussian_blur_planes(planes: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    let radius = (3.0 * sigma).ceil().max(1.0) as usize;
    let taps: Vec<f32> = (0..=2 * radius)
        .map(|t| {
            let d = t as f32 - radius as f32;
            (-(d * d) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let n = w * h;
    let mut rows = vec![0f32; planes.len()];
    rows.par_chunks_mut(w).zip(planes.par_chunks(w)).for_each(|(out, src)| {
        for (t, &g) in taps.iter().enumerate() {
            // out[x] += g * src[x + t - radius] where that index exists.
            let (lo, hi) = (radius.saturating_sub(t), (w + radius).saturating_sub(t).min(w));
            if lo >= hi {
                continue;
            }
            let off = lo + t - radius;
            for (o, &v) in out[lo..hi].iter_mut().zip(&src[off..off + (hi - lo)]) {
                *o += g * v;
            }
        }
    });
    let mut out = vec![0f32; planes.len()];
    out.par_chunks_mut(n).zip(rows.par_chunks(n)).for_each(|(dst, src)| {
        dst.par_chunks_mut(w).enumerate().for_each(|(y, o)| {
            for (t, &g) in taps.iter().enumerate() {
                let yy = y as isize + t as isize - radius as isize;
                if yy < 0 || yy >= h as isize {
                    continue;
                }
                for (a, &v) in o.iter_mut().zip(&src[yy as usize * w..(yy as usize + 1) * w]) {
                    *a += g * v;
                }
            }
        });
    });
    out
}

/// Softmax over each pixel's `k` values, in place.
fn softmax_rows(values: &mut [f32], k: usize) {
    values.par_chunks_mut(k).for_each(|row| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in row.iter_mut() {
            *v /= sum;
        }
    });
}

/// `1 / sqrt(F(1))` per pixel: the symmetric normalisation of Krähenbühl's code, under which a
/// kernel's message in a uniform region is a weighted mean of Q (`n * F(n * Q)`).
fn normaliser(filtered_ones: Vec<f32>) -> Vec<f32> {
    filtered_ones.into_iter().map(|s| 1.0 / (s + 1e-20).sqrt()).collect()
}

/// Refines per-pixel class scores into labels. `logits` holds, for each of the image's pixels
/// (row-major), `k` scores whose softmax is the class probability; the image gives the colours.
/// Returns one label per pixel.
pub fn refine(image: &RgbImage, logits: &[f32], k: usize, config: &CrfConfig) -> Vec<u8> {
    refine_with_confidence(image, logits, k, config).0
}

/// Where a CRF run's time went, phase by phase (the iterations' phases summed over them).
#[derive(Clone, Copy, Debug, Default)]
pub struct CrfProfile {
    /// Softmax of the logits and the unary term.
    pub unary: std::time::Duration,
    /// The appearance kernel's features and the lattice over them.
    pub lattice: std::time::Duration,
    /// Both kernels' normalisers (a filter of ones each).
    pub normalisers: std::time::Duration,
    /// Q scaled by the normalisers into both kernels' layouts.
    pub layouts: std::time::Duration,
    /// The smoothness kernel's exact blur.
    pub smooth: std::time::Duration,
    pub splat: std::time::Duration,
    pub blur: std::time::Duration,
    pub slice: std::time::Duration,
    /// The Potts update, the softmax and the final argmax.
    pub update: std::time::Duration,
}

impl CrfProfile {
    pub fn total(&self) -> std::time::Duration {
        self.unary + self.lattice + self.normalisers + self.layouts + self.smooth + self.splat + self.blur + self.slice + self.update
    }
}

/// [`refine`], timing each phase into `profile`.
pub fn refine_profiled(image: &RgbImage, logits: &[f32], k: usize, config: &CrfConfig, profile: &mut CrfProfile) -> Vec<u8> {
    refine_impl(image, logits, k, config, Some(profile)).0
}

/// [`refine`], with each pixel's final marginal probability of its label (how sure the CRF is:
/// self-training keeps only confident pixels).
pub fn refine_with_confidence(image: &RgbImage, logits: &[f32], k: usize, config: &CrfConfig) -> (Vec<u8>, Vec<f32>) {
    refine_impl(image, logits, k, config, None)
}

fn refine_impl(
    image: &RgbImage,
    logits: &[f32],
    k: usize,
    config: &CrfConfig,
    mut profile: Option<&mut CrfProfile>,
) -> (Vec<u8>, Vec<f32>) {
    let mut clock = std::time::Instant::now();
    // Adds the time since the last lap to a phase of the profile, when there is one.
    let mut lap = |phase: fn(&mut CrfProfile) -> &mut std::time::Duration| {
        if let Some(p) = profile.as_deref_mut() {
            *phase(p) += clock.elapsed();
            clock = std::time::Instant::now();
        }
    };
    let (w, h) = (image.width() as usize, image.height() as usize);
    let n = w * h;
    assert_eq!(logits.len(), n * k, "logits must be pixels x classes");
    if n == 0 || k == 0 {
        return (vec![0; n], vec![1.0; n]);
    }
    // Unary: -log p, p clipped. The mean field starts from softmax(-U), as densecrf does.
    let mut q = logits.to_vec();
    softmax_rows(&mut q, k);
    let unary: Vec<f32> = q.par_iter().map(|p| -p.max(MIN_PROBABILITY).ln()).collect();
    q.par_iter_mut().zip(&unary).for_each(|(v, u)| *v = -u);
    softmax_rows(&mut q, k);
    lap(|p| &mut p.unary);

    // Smoothness kernel (planar, exact) and appearance kernel (pixel-major, lattice).
    let smooth_norm = normaliser(gaussian_blur_planes(&vec![1.0; n], w, h, config.smooth_sxy));
    lap(|p| &mut p.normalisers);
    let features: Vec<f32> = image
        .pixels()
        .enumerate()
        .flat_map(|(i, p)| {
            let (x, y) = ((i % w) as f32, (i / w) as f32);
            [
                x / config.appearance_sxy,
                y / config.appearance_sxy,
                p[0] as f32 / config.appearance_srgb,
                p[1] as f32 / config.appearance_srgb,
                p[2] as f32 / config.appearance_srgb,
            ]
        })
        .collect();
    let lattice = Lattice::new(&features, 5);
    drop(features);
    lap(|p| &mut p.lattice);
    let appearance_norm = normaliser(lattice.filter(&vec![1.0; n], 1));
    lap(|p| &mut p.normalisers);

    let mut planes = vec![0f32; n * k];
    let mut scaled = vec![0f32; n * k];
    for _ in 0..config.iterations {
        // n * Q, once per layout.
        planes.par_chunks_mut(n).enumerate().for_each(|(c, plane)| {
            for (i, v) in plane.iter_mut().enumerate() {
                *v = q[i * k + c] * smooth_norm[i];
            }
        });
        scaled.par_chunks_mut(k).zip(q.par_chunks(k)).zip(&appearance_norm).for_each(|((o, row), &a)| {
            o.iter_mut().zip(row).for_each(|(o, v)| *o = v * a);
        });
        lap(|p| &mut p.layouts);
        let smooth = gaussian_blur_planes(&planes, w, h, config.smooth_sxy);
        lap(|p| &mut p.smooth);
        let grid = lattice.splat(&scaled, k);
        lap(|p| &mut p.splat);
        let grid = lattice.blur(grid, k);
        lap(|p| &mut p.blur);
        let appearance = lattice.slice(grid, k);
        lap(|p| &mut p.slice);
        // Potts compatibility: a class gains what the kernels say its neighbours hold of it.
        q.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
            let (sn, an) = (config.smooth_weight * smooth_norm[i], config.appearance_weight * appearance_norm[i]);
            for (c, v) in row.iter_mut().enumerate() {
                *v = -unary[i * k + c] + sn * smooth[c * n + i] + an * appearance[i * k + c];
            }
        });
        softmax_rows(&mut q, k);
        lap(|p| &mut p.update);
    }
    let out = q
        .par_chunks(k)
        .map(|row| {
            let mut best = 0;
            for c in 1..k {
                if row[c] > row[best] {
                    best = c;
                }
            }
            (best as u8, row[best])
        })
        .unzip();
    lap(|p| &mut p.update);
    out
}

/// The size, at most the image's own, at which an image of `w` x `h` with `k` classes fits
/// within the config's `max_values` and `max_pixels`.
pub fn working_size(w: u32, h: u32, k: usize, config: &CrfConfig) -> (u32, u32) {
    let pixels = w as f64 * h as f64;
    let budget = (config.max_values as f64 / k.max(1) as f64).min(config.max_pixels as f64);
    if pixels <= budget {
        return (w, h);
    }
    let s = (budget / pixels).sqrt();
    (((w as f64 * s).floor() as u32).max(1), ((h as f64 * s).floor() as u32).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Left half red, right half blue; the unary puts the boundary 12 pixels too far right and
    /// is unsure everywhere. The CRF moves the boundary onto the colour edge.
    #[test]
    fn boundary_snaps_to_the_colour_edge() {
        let (w, h) = (64u32, 32u32);
        let edge = 32;
        let img = RgbImage::from_fn(w, h, |x, _| if x < edge { image::Rgb([200, 30, 30]) } else { image::Rgb([30, 30, 200]) });
        let k = 2;
        let mut logits = vec![0f32; (w * h) as usize * k];
        for y in 0..h {
            for x in 0..w {
                let i = (y * w + x) as usize;
                // Class 0 wins left of x = 44, by a margin that shrinks near the wrong boundary.
                let margin = ((44.0 - x as f32) / 20.0).clamp(-1.0, 1.0);
                logits[i * k] = margin;
                logits[i * k + 1] = -margin;
            }
        }
        let plain: Vec<u8> = logits.chunks(k).map(|r| if r[0] >= r[1] { 0 } else { 1 }).collect();
        let wrong_before = (0..h).map(|y| (edge..44).filter(|&x| plain[(y * w + x) as usize] == 0).count()).sum::<usize>();
        assert_eq!(wrong_before, 12 * h as usize);
        let refined = refine(&img, &logits, k, &CrfConfig::default());
        for y in 0..h {
            for x in 0..w {
                let want = if x < edge { 0 } else { 1 };
                assert_eq!(refined[(y * w + x) as usize], want, "pixel ({x}, {y})");
            }
        }
    }

    /// Speckle inside a uniform region is removed; a region with its own colour is kept.
    #[test]
    fn speckle_goes_and_a_coloured_region_stays() {
        let (w, h) = (48u32, 48u32);
        // A grey image with a green square in the middle.
        let inside = |x: u32, y: u32| (16..32).contains(&x) && (16..32).contains(&y);
        let img = RgbImage::from_fn(w, h, |x, y| if inside(x, y) { image::Rgb([40, 180, 40]) } else { image::Rgb([120, 120, 120]) });
        let k = 3;
        let mut logits = vec![0f32; (w * h) as usize * k];
        for y in 0..h {
            for x in 0..w {
                let i = (y * w + x) as usize;
                let mut c = if inside(x, y) { 1 } else { 0 };
                // Isolated pixels of a third class, one in every 7.
                if (x * 7 + y * 3) % 7 == 0 && !inside(x, y) {
                    c = 2;
                }
                logits[i * k + c] = 0.6;
            }
        }
        let refined = refine(&img, &logits, k, &CrfConfig::default());
        for y in 0..h {
            for x in 0..w {
                let want = if inside(x, y) { 1 } else { 0 };
                assert_eq!(refined[(y * w + x) as usize], want, "pixel ({x}, {y})");
            }
        }
    }

    #[test]
    fn settings_parse_over_the_defaults() {
        let c: CrfConfig = "iterations=5, appearance_srgb=13".parse().unwrap();
        assert_eq!(c, CrfConfig { iterations: 5, appearance_srgb: 13.0, ..CrfConfig::default() });
        assert_eq!("".parse::<CrfConfig>().unwrap(), CrfConfig::default());
        assert!("iterations=x".parse::<CrfConfig>().is_err());
        assert!("smooth_sxy=-1".parse::<CrfConfig>().is_err());
        assert!("colour=1".parse::<CrfConfig>().is_err());
    }

    #[test]
    fn working_size_keeps_small_images_and_shrinks_large_ones() {
        let c = CrfConfig::default();
        assert_eq!(working_size(480, 360, 11, &c), (480, 360));
        let (w, h) = working_size(8000, 6000, 27, &c);
        assert!((w as usize * h as usize) <= c.max_pixels);
        assert!((w as f64 / h as f64 - 8000.0 / 6000.0).abs() < 0.01);
        let many = CrfConfig { max_pixels: usize::MAX, ..c };
        let (w, h) = working_size(8000, 6000, 255, &many);
        assert!((w as usize * h as usize * 255) <= many.max_values);
    }
}
