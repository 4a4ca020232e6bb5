//! Edge-aware refinement by the guided filter (He, Sun and Tang, "Guided Image Filtering",
//! TPAMI 2013): each class's score map, bilinear from the stride-4 feature grid, is filtered
//! with the colour image as the guide, so that inside every window the filtered scores are an
//! affine function of the pixel colours. Where the colour changes, the scores change with it:
//! class boundaries move onto the image's edges, as the dense CRF moves them, at the cost of a
//! few box filters per class instead of mean-field iterations over a lattice.
//!
//! Large images are filtered at a reduced working size and the filter's coefficients (not the
//! labels) scaled back up and applied to the full-resolution colours (the "fast guided filter",
//! He and Sun 2015), so the edges stay sharp at any size.

use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::assign::{scores_at_size, LabelMask};
use super::preprocess::Geometry;

/// Settings of the guided filter.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuidedConfig {
    /// Window radius in pixels of the working size: the distance over which a score may follow
    /// the colours (the features' own resolution is 4 pixels of the network's input).
    pub radius: usize,
    /// Regularisation (colour variance units, colours in [0, 1]): windows whose colour varies less
    /// than about sqrt(eps) keep their scores' mean instead of following the colours.
    pub eps: f32,
    /// Images with more pixels are filtered at a reduced size, their coefficients scaled up.
    pub max_pixels: usize,
    /// What is filtered: the cosine similarities as they are (0), or the class probabilities,
    /// softmax of the similarities times this.
    pub temperature: f32,
}

impl Default for GuidedConfig {
    fn default() -> Self {
        Self { radius: 32, eps: 1e-4, max_pixels: 1 << 19, temperature: 10.0 }
    }
}

impl std::str::FromStr for GuidedConfig {
    type Err = String;
    /// `key=value` pairs, comma-separated, over the defaults: `radius`, `eps`, `max_pixels`,
    /// `temperature`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut c = GuidedConfig::default();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| format!("`{pair}` is not key=value"))?;
            let count =
                || value.parse::<usize>().ok().filter(|v| *v > 0).ok_or_else(|| format!("{key}: `{value}` is not a positive whole number"));
            match key {
                "radius" => c.radius = count()?,
                "max_pixels" => c.max_pixels = count()?,
                "eps" => {
                    c.eps = value
                        .parse::<f32>()
                        .ok()
                        .filter(|v| v.is_finite() && *v > 0.0)
                        .ok_or_else(|| format!("eps: `{value}` is not a positive number"))?
                }
                "temperature" => {
                    c.temperature = value
                        .parse::<f32>()
                        .ok()
                        .filter(|v| v.is_finite() && *v >= 0.0)
                        .ok_or_else(|| format!("temperature: `{value}` is not a number of 0 or more"))?
                }
                _ => return Err(format!("unknown guided-filter setting `{key}`")),
            }
        }
        Ok(c)
    }
}

/// The size the filter works at for an image of `w` x `h`: the image's own, or scaled down
/// (aspect ratio kept) to at most `max_pixels`.
pub fn working_size(w: u32, h: u32, max_pixels: usize) -> (usize, usize) {
    let n = w as f64 * h as f64;
    if n <= max_pixels as f64 {
        return (w as usize, h as usize);
    }
    let s = (max_pixels as f64 / n).sqrt();
    (((w as f64 * s).floor() as usize).max(1), ((h as f64 * s).floor() as usize).max(1))
}

/// Labels at the original image size: K score maps of size `feat` on the stride-4 feature grid,
/// each guided-filtered with `image` (the original the features were made from), then the
/// argmax per pixel.
pub fn labels_guided(
    scores: &[f32],
    k: usize,
    feat: (usize, usize),
    geom: &Geometry,
    image: &RgbImage,
    config: &GuidedConfig,
) -> LabelMask {
    let (ow, oh) = (geom.original.0 as usize, geom.original.1 as usize);
    debug_assert_eq!((image.width() as usize, image.height() as usize), (ow, oh));
    let (ww, wh) = working_size(ow as u32, oh as u32, config.max_pixels);
    let small;
    let guide_image = if (ww, wh) == (ow, oh) {
        image
    } else {
        small = image::imageops::resize(image, ww as u32, wh as u32, image::imageops::FilterType::Triangle);
        &small
    };
    let guide = Guide::new(guide_image, config.radius, config.eps);
    let mut interleaved = scores_at_size(scores, k, feat, geom, (ww, wh));
    if config.temperature > 0.0 {
        interleaved.par_chunks_mut(k).for_each(|px| softmax(px, config.temperature));
    }
    let p = planes(&interleaved, k, ww * wh);
    let full = (ww, wh) != (ow, oh);
    let colours = full.then(|| rgb(image));
    let mut best = vec![f32::NEG_INFINITY; ow * oh];
    let mut labels = vec![0u8; ow * oh];
    for (cls, plane) in p.chunks(ww * wh).enumerate() {
        let [a0, a1, a2, b] = guide.coefficients(plane);
        let update = |q: f32, best: &mut f32, label: &mut u8| {
            if q > *best {
                *best = q;
                *label = cls as u8;
            }
        };
        if !full {
            let i = &guide.colours;
            best.par_iter_mut().zip(labels.par_iter_mut()).enumerate().for_each(|(px, (bst, lab))| {
                let q = a0[px] * i[0][px] + a1[px] * i[1][px] + a2[px] * i[2][px] + b[px];
                update(q, bst, lab);
            });
        } else {
            let i = colours.as_ref().expect("full-size colours");
            let (sx, sy) = (ww as f32 / ow as f32, wh as f32 / oh as f32);
            let xs: Vec<(usize, usize, f32)> = (0..ow).map(|x| sample(x, sx, ww)).collect();
            best.par_chunks_mut(ow).zip(labels.par_chunks_mut(ow)).enumerate().for_each(|(y, (brow, lrow))| {
                let (y0, y1, fy) = sample(y, sy, wh);
                for (x, (bst, lab)) in brow.iter_mut().zip(lrow.iter_mut()).enumerate() {
                    let (x0, x1, fx) = xs[x];
                    let at = |m: &[f32]| {
                        let top = m[y0 * ww + x0] * (1.0 - fx) + m[y0 * ww + x1] * fx;
                        let bottom = m[y1 * ww + x0] * (1.0 - fx) + m[y1 * ww + x1] * fx;
                        top * (1.0 - fy) + bottom * fy
                    };
                    let px = y * ow + x;
                    let q = at(&a0) * i[0][px] + at(&a1) * i[1][px] + at(&a2) * i[2][px] + at(&b);
                    update(q, bst, lab);
                }
            });
        }
    }
    LabelMask { width: ow as u32, height: oh as u32, labels }
}

/// A pixel of an output axis of `n_out` on a working axis of `n` (`scale` = n / n_out), with
/// half-pixel centres: the two working pixels around it and the second's weight.
fn sample(o: usize, scale: f32, n: usize) -> (usize, usize, f32) {
    let f = ((o as f32 + 0.5) * scale - 0.5).clamp(0.0, (n - 1) as f32);
    let i0 = f.floor() as usize;
    (i0, (i0 + 1).min(n - 1), f - i0 as f32)
}

/// The softmax of `t` times the values, in place.
fn softmax(values: &mut [f32], t: f32) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    values.iter_mut().for_each(|v| {
        *v = ((*v - max) * t).exp();
        sum += *v;
    });
    values.iter_mut().for_each(|v| *v /= sum);
}

/// Pixel-major K-interleaved values to K planes.
fn planes(interleaved: &[f32], k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; k * n];
    out.par_chunks_mut(n).enumerate().for_each(|(c, plane)| {
        for (i, v) in plane.iter_mut().enumerate() {
            *v = interleaved[i * k + c];
        }
    });
    out
}

/// The image's three colour planes in [0, 1].
fn rgb(image: &RgbImage) -> [Vec<f32>; 3] {
    let n = (image.width() * image.height()) as usize;
    let mut out = [vec![0f32; n], vec![0f32; n], vec![0f32; n]];
    for (i, p) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c][i] = p[c] as f32 / 255.0;
        }
    }
    out
}

/// What every class's filtering shares: the guide's colours, their window means, and the
/// inverse of each window's regularised colour covariance.
struct Guide {
    w: usize,
    h: usize,
    radius: usize,
    colours: [Vec<f32>; 3],
    mean: [Vec<f32>; 3],
    /// The symmetric inverse (xx, xy, xz, yy, yz, zz) per pixel.
    inverse: [Vec<f32>; 6],
}

/// The (row, column) pairs of the six covariance entries.
const PAIRS: [(usize, usize); 6] = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)];

impl Guide {
    fn new(image: &RgbImage, radius: usize, eps: f32) -> Self {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let colours = rgb(image);
        let mean = [0, 1, 2].map(|c| box_mean(&colours[c], w, h, radius));
        let cov: Vec<Vec<f32>> = PAIRS
            .iter()
            .map(|&(a, b)| {
                let product: Vec<f32> = colours[a].iter().zip(&colours[b]).map(|(x, y)| x * y).collect();
                let mut m = box_mean(&product, w, h, radius);
                m.iter_mut().enumerate().for_each(|(i, v)| *v -= mean[a][i] * mean[b][i]);
                m
            })
            .collect();
        let n = w * h;
        let mut inverse: [Vec<f32>; 6] = std::array::from_fn(|_| vec![0f32; n]);
        for i in 0..n {
            let (xx, xy, xz, yy, yz, zz) = (cov[0][i] + eps, cov[1][i], cov[2][i], cov[3][i] + eps, cov[4][i], cov[5][i] + eps);
            // The adjugate over the determinant; eps keeps the determinant positive.
            let (i_xx, i_xy, i_xz) = (yy * zz - yz * yz, xz * yz - xy * zz, xy * yz - xz * yy);
            let (i_yy, i_yz, i_zz) = (xx * zz - xz * xz, xy * xz - xx * yz, xx * yy - xy * xy);
            let det = xx * i_xx + xy * i_xy + xz * i_xz;
            let inv_det = 1.0 / det;
            for (slot, v) in inverse.iter_mut().zip([i_xx, i_xy, i_xz, i_yy, i_yz, i_zz]) {
                slot[i] = v * inv_det;
            }
        }
        Self { w, h, radius, colours, mean, inverse }
    }

    /// The window means of the filter's coefficients for the input `p`: the filtered map is
    /// a0 R + a1 G + a2 B + b.
    fn coefficients(&self, p: &[f32]) -> [Vec<f32>; 4] {
        let (w, h, r) = (self.w, self.h, self.radius);
        let mean_p = box_mean(p, w, h, r);
        let cov_ip: Vec<Vec<f32>> = (0..3)
            .map(|c| {
                let product: Vec<f32> = self.colours[c].iter().zip(p).map(|(x, y)| x * y).collect();
                let mut m = box_mean(&product, w, h, r);
                m.iter_mut().enumerate().for_each(|(i, v)| *v -= self.mean[c][i] * mean_p[i]);
                m
            })
            .collect();
        let n = w * h;
        let mut a: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0f32; n]);
        let mut b = vec![0f32; n];
        let inv = &self.inverse;
        for i in 0..n {
            let (cr, cg, cb) = (cov_ip[0][i], cov_ip[1][i], cov_ip[2][i]);
            let ar = inv[0][i] * cr + inv[1][i] * cg + inv[2][i] * cb;
            let ag = inv[1][i] * cr + inv[3][i] * cg + inv[4][i] * cb;
            let ab = inv[2][i] * cr + inv[4][i] * cg + inv[5][i] * cb;
            a[0][i] = ar;
            a[1][i] = ag;
            a[2][i] = ab;
            b[i] = mean_p[i] - ar * self.mean[0][i] - ag * self.mean[1][i] - ab * self.mean[2][i];
        }
        let [a0, a1, a2] = a;
        [box_mean(&a0, w, h, r), box_mean(&a1, w, h, r), box_mean(&a2, w, h, r), box_mean(&b, w, h, r)]
    }
}

/// The mean over the (2r + 1)^2 window around every pixel, the window clipped at the borders
/// (divided by the pixels it holds there): running sums along rows, then along columns, so the
/// cost does not grow with r.
pub fn box_mean(src: &[f32], w: usize, h: usize, r: usize) -> Vec<f32> {
    let mut rows = vec![0f32; w * h];
    rows.par_chunks_mut(w).zip(src.par_chunks(w)).for_each(|(out, row)| running_mean(row, out, r));
    // Columns: running sums down the rows, a strip of columns per task.
    const STRIP: usize = 64;
    let mut out = vec![0f32; w * h];
    let strips: Vec<usize> = (0..w).step_by(STRIP).collect();
    let columns: Vec<Vec<f32>> = strips
        .par_iter()
        .map(|&x0| {
            let sw = STRIP.min(w - x0);
            let mut acc = vec![0f32; sw];
            let mut result = vec![0f32; sw * h];
            // acc holds the sum of rows [lo, hi) for the current output row.
            let (mut lo, mut hi) = (0usize, 0usize);
            for y in 0..h {
                let (want_lo, want_hi) = (y.saturating_sub(r), (y + r + 1).min(h));
                while hi < want_hi {
                    acc.iter_mut().zip(&rows[hi * w + x0..hi * w + x0 + sw]).for_each(|(a, v)| *a += v);
                    hi += 1;
                }
                while lo < want_lo {
                    acc.iter_mut().zip(&rows[lo * w + x0..lo * w + x0 + sw]).for_each(|(a, v)| *a -= v);
                    lo += 1;
                }
                let inv = 1.0 / (hi - lo) as f32;
                result[y * sw..(y + 1) * sw].iter_mut().zip(&acc).for_each(|(o, a)| *o = a * inv);
            }
            result
        })
        .collect();
    for (&x0, strip) in strips.iter().zip(&columns) {
        let sw = STRIP.min(w - x0);
        for y in 0..h {
            out[y * w + x0..y * w + x0 + sw].copy_from_slice(&strip[y * sw..(y + 1) * sw]);
        }
    }
    out
}

/// The clipped running mean of one row (or column) with radius r.
fn running_mean(src: &[f32], out: &mut [f32], r: usize) {
    let n = src.len();
    let mut acc = 0f64;
    let (mut lo, mut hi) = (0usize, 0usize);
    for (i, o) in out.iter_mut().enumerate() {
        let (want_lo, want_hi) = (i.saturating_sub(r), (i + r + 1).min(n));
        while hi < want_hi {
            acc += src[hi] as f64;
            hi += 1;
        }
        while lo < want_lo {
            acc -= src[lo] as f64;
            lo += 1;
        }
        *o = (acc / (hi - lo) as f64) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_mean_matches_a_direct_sum() {
        let (w, h, r) = (37, 23, 4);
        let src: Vec<f32> = (0..w * h).map(|i| ((i * 7919) % 101) as f32 / 10.0).collect();
        let fast = box_mean(&src, w, h, r);
        for y in 0..h {
            for x in 0..w {
                let (mut s, mut n) = (0f32, 0);
                for yy in y.saturating_sub(r)..(y + r + 1).min(h) {
                    for xx in x.saturating_sub(r)..(x + r + 1).min(w) {
                        s += src[yy * w + xx];
                        n += 1;
                    }
                }
                assert!((fast[y * w + x] - s / n as f32).abs() < 1e-4, "({x}, {y})");
            }
        }
    }

    /// A 64 x 32 image, dark left of column 40 and bright from it; the features put the class
    /// boundary at column 32 (their coarse estimate).
    fn split_scene() -> (RgbImage, Vec<f32>, Geometry) {
        let (w, h) = (64u32, 32u32);
        let image = RgbImage::from_fn(w, h, |x, _| if x < 40 { image::Rgb([40, 60, 50]) } else { image::Rgb([220, 200, 190]) });
        // Feature grid 16 x 8; class 0 scores high on the left half, class 1 on the right.
        let (fw, fh) = (16, 8);
        let mut scores = vec![0f32; 2 * fw * fh];
        for y in 0..fh {
            for x in 0..fw {
                let left = if x < 8 { 1.0 } else { 0.0 };
                scores[y * fw + x] = left;
                scores[fw * fh + y * fw + x] = 1.0 - left;
            }
        }
        let geom = Geometry { original: (w, h), resized: (w, h), padded: (w, h) };
        (image, scores, geom)
    }

    #[test]
    fn the_boundary_moves_onto_the_colour_edge() {
        let (image, scores, geom) = split_scene();
        let plain = crate::infer::assign::labels_at_original_size(&scores, 2, (16, 8), &geom);
        let refined = labels_guided(
            &scores,
            2,
            (16, 8),
            &geom,
            &image,
            &GuidedConfig { radius: 24, eps: 1e-4, max_pixels: 1 << 20, temperature: 0.0 },
        );
        let first_right = |m: &LabelMask| (0..64).position(|x| m.labels[16 * 64 + x] == 1).unwrap();
        assert_eq!(first_right(&plain), 32, "the features alone cut at their own boundary");
        assert_eq!(first_right(&refined), 40, "the filter moves it to the colour edge");
        // Away from the edge nothing changes.
        assert_eq!(refined.labels[16 * 64 + 5], 0);
        assert_eq!(refined.labels[16 * 64 + 60], 1);
    }

    #[test]
    fn a_large_image_is_filtered_small_and_keeps_a_sharp_edge() {
        let (image, scores, geom) = split_scene();
        let config = GuidedConfig { radius: 12, eps: 1e-4, max_pixels: 512, temperature: 0.0 };
        assert_eq!(working_size(64, 32, 512), (32, 16));
        let refined = labels_guided(&scores, 2, (16, 8), &geom, &image, &config);
        let row: Vec<u8> = refined.labels[16 * 64..17 * 64].to_vec();
        let first_right = row.iter().position(|&l| l == 1).unwrap();
        assert!((38..=41).contains(&first_right), "boundary at column {first_right}: {row:?}");
        assert!(row[first_right..].iter().all(|&l| l == 1) && row[..first_right].iter().all(|&l| l == 0), "one clean edge: {row:?}");
    }

    #[test]
    fn settings_parse_over_the_defaults() {
        let c: GuidedConfig = "radius=4, eps=0.01, temperature=10".parse().unwrap();
        assert_eq!((c.radius, c.eps, c.max_pixels, c.temperature), (4, 0.01, GuidedConfig::default().max_pixels, 10.0));
        assert!("radius=0".parse::<GuidedConfig>().is_err());
        assert!("colour=1".parse::<GuidedConfig>().is_err());
    }
}
