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

use std::borrow::Cow;

use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::assign::{scores_at_size, LabelMask};
use super::preprocess::Geometry;

/// Settings of the guided filter.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuidedConfig {
    /// Window radius, in pixels of the network's input (the image at the package's short side):
    /// the distance over which a score may follow the colours.
    pub radius: f32,
    /// Regularisation (colour variance units, colours in [0, 1]): windows whose colour varies less
    /// than about sqrt(eps) keep their scores' mean instead of following the colours.
    pub eps: f32,
    /// The filter works at this fraction of the network's input size (its features are at a
    /// quarter of it): its cost does not grow with the image.
    pub scale: f32,
    /// Labels are made for at most this many pixels; a larger image's labels are scaled up
    /// (nearest).
    pub max_output_pixels: usize,
    /// What is filtered: the cosine similarities as they are (0), or the class probabilities,
    /// softmax of the similarities times this.
    pub temperature: f32,
}

impl Default for GuidedConfig {
    fn default() -> Self {
        Self { radius: 32.0, eps: 1e-4, scale: 0.5, max_output_pixels: 1 << 20, temperature: 10.0 }
    }
}

impl std::str::FromStr for GuidedConfig {
    type Err = String;
    /// `key=value` pairs, comma-separated, over the defaults: `radius`, `eps`, `scale`,
    /// `max_output_pixels`, `temperature`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut c = GuidedConfig::default();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| format!("`{pair}` is not key=value"))?;
            let positive = || {
                value
                    .parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .ok_or_else(|| format!("{key}: `{value}` is not a positive number"))
            };
            match key {
                "radius" => c.radius = positive()?,
                "eps" => c.eps = positive()?,
                "scale" => c.scale = positive()?.min(1.0),
                "max_output_pixels" => {
                    c.max_output_pixels = value
                        .parse::<usize>()
                        .ok()
                        .filter(|v| *v > 0)
                        .ok_or_else(|| format!("{key}: `{value}` is not a positive whole number"))?
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

/// `(w, h)` scaled down, aspect ratio kept, to at most `max_pixels` (unchanged when it fits).
pub fn fit(w: usize, h: usize, max_pixels: usize) -> (usize, usize) {
    let n = w as f64 * h as f64;
    if n <= max_pixels as f64 {
        return (w, h);
    }
    let s = (max_pixels as f64 / n).sqrt();
    (((w as f64 * s).floor() as usize).max(1), ((h as f64 * s).floor() as usize).max(1))
}

/// What the filter starts from, wherever it runs: the working size and the window radius there,
/// the guide (the image at the working size), the class scores at the working size (pixel-major,
/// K per pixel; probabilities when the temperature is above 0), and the output size with the
/// image at it.
pub(crate) struct Prepared<'a> {
    pub work: (usize, usize),
    pub radius: usize,
    pub guide: Cow<'a, RgbImage>,
    pub scores: Vec<f32>,
    pub target: Cow<'a, RgbImage>,
}

impl GuidedConfig {
    /// The window radius at the working size.
    pub fn working_radius(&self) -> usize {
        ((self.radius * self.scale.clamp(0.05, 1.0)).round() as usize).max(1)
    }
}

pub(crate) fn prepare<'a>(
    scores: &[f32],
    k: usize,
    feat: (usize, usize),
    geom: &Geometry,
    image: &'a RgbImage,
    config: &GuidedConfig,
) -> Prepared<'a> {
    let (ow, oh) = (geom.original.0 as usize, geom.original.1 as usize);
    debug_assert_eq!((image.width() as usize, image.height() as usize), (ow, oh));
    let resize = |w: usize, h: usize| {
        if (w, h) == (ow, oh) {
            Cow::Borrowed(image)
        } else {
            Cow::Owned(image::imageops::resize(image, w as u32, h as u32, image::imageops::FilterType::Triangle))
        }
    };
    let scale = config.scale.clamp(0.05, 1.0);
    let (ww, wh) =
        (((geom.resized.0 as f32 * scale).round() as usize).clamp(1, ow), ((geom.resized.1 as f32 * scale).round() as usize).clamp(1, oh));
    let mut interleaved = scores_at_size(scores, k, feat, geom, (ww, wh));
    if config.temperature > 0.0 {
        interleaved.par_chunks_mut(k).for_each(|px| softmax(px, config.temperature));
    }
    let (tw, th) = fit(ow, oh, config.max_output_pixels);
    Prepared { work: (ww, wh), radius: config.working_radius(), guide: resize(ww, wh), scores: interleaved, target: resize(tw, th) }
}

/// Labels made at the output size `(tw, th)` scaled up to the original size (nearest) when the
/// output size is smaller.
pub(crate) fn to_original(labels: Vec<u8>, (tw, th): (usize, usize), (ow, oh): (usize, usize)) -> LabelMask {
    let labels = if (tw, th) != (ow, oh) {
        let source = |i: usize| ((i / ow) * th / oh) * tw + (i % ow) * tw / ow;
        (0..ow * oh).into_par_iter().map(|i| labels[source(i)]).collect()
    } else {
        labels
    };
    LabelMask { width: ow as u32, height: oh as u32, labels }
}

/// Labels at the original image size: K score maps of size `feat` on the stride-4 feature grid,
/// each guided-filtered with `image` (the original the features were made from) at the working
/// size, the filter's coefficients scaled up to the output size and applied to its colours,
/// then the argmax per pixel. (`guided_graph` does the same as an ONNX graph, for the GPU.)
pub fn labels_guided(
    scores: &[f32],
    k: usize,
    feat: (usize, usize),
    geom: &Geometry,
    image: &RgbImage,
    config: &GuidedConfig,
) -> LabelMask {
    let Prepared { work: (ww, wh), radius, guide, scores: interleaved, target } = prepare(scores, k, feat, geom, image, config);
    let guide = Guide::new(&guide, radius, config.eps);
    let p = planes(&interleaved, k, ww * wh);
    // The coefficients of every class (classes in parallel), then interleaved working pixel after
    // working pixel: [a0 a1 a2 b] per class.
    let maps: Vec<[Vec<f32>; 4]> = p.par_chunks(ww * wh).map(|plane| guide.coefficients(plane)).collect();
    let mut coef = vec![0f32; ww * wh * k * 4];
    coef.par_chunks_mut(k * 4).enumerate().for_each(|(px, c)| {
        for (cls, m) in maps.iter().enumerate() {
            for j in 0..4 {
                c[cls * 4 + j] = m[j][px];
            }
        }
    });
    let (tw, th) = (target.width() as usize, target.height() as usize);
    let colours = rgb(&target);
    let (sx, sy) = (ww as f32 / tw as f32, wh as f32 / th as f32);
    let xs: Vec<(usize, usize, f32)> = (0..tw).map(|x| sample(x, sx, ww)).collect();
    let mut labels = vec![0u8; tw * th];
    labels.par_chunks_mut(tw).enumerate().for_each(|(y, row)| {
        let (y0, y1, fy) = sample(y, sy, wh);
        let mut acc = vec![0f32; k * 4];
        for (x, out) in row.iter_mut().enumerate() {
            let (x0, x1, fx) = xs[x];
            acc.fill(0.0);
            for (px, w) in [
                (y0 * ww + x0, (1.0 - fx) * (1.0 - fy)),
                (y0 * ww + x1, fx * (1.0 - fy)),
                (y1 * ww + x0, (1.0 - fx) * fy),
                (y1 * ww + x1, fx * fy),
            ] {
                acc.iter_mut().zip(&coef[px * k * 4..(px + 1) * k * 4]).for_each(|(a, c)| *a += w * c);
            }
            let i = y * tw + x;
            let (r, g, b) = (colours[0][i], colours[1][i], colours[2][i]);
            let mut best = (f32::NEG_INFINITY, 0u8);
            for (cls, c) in acc.chunks_exact(4).enumerate() {
                let q = c[0] * r + c[1] * g + c[2] * b + c[3];
                if q > best.0 {
                    best = (q, cls as u8);
                }
            }
            *out = best.1;
        }
    });
    to_original(labels, (tw, th), (geom.original.0 as usize, geom.original.1 as usize))
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
pub(crate) fn planes(interleaved: &[f32], k: usize, n: usize) -> Vec<f32> {
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
/// (divided by the pixels it holds there): a running sum along each row, then running sums down
/// the columns, a whole row at a time; the cost does not grow with r.
pub fn box_mean(src: &[f32], w: usize, h: usize, r: usize) -> Vec<f32> {
    let mut rows = vec![0f32; w * h];
    for (row, out) in src.chunks_exact(w).zip(rows.chunks_exact_mut(w)) {
        let mut acc: f32 = row[..(r + 1).min(w)].iter().sum();
        for x in 0..w {
            out[x] = acc / ((x + r + 1).min(w) - x.saturating_sub(r)) as f32;
            if x + r + 1 < w {
                acc += row[x + r + 1];
            }
            if x >= r {
                acc -= row[x - r];
            }
        }
    }
    let mut out = vec![0f32; w * h];
    let mut acc = vec![0f32; w];
    for y in 0..(r + 1).min(h) {
        acc.iter_mut().zip(&rows[y * w..(y + 1) * w]).for_each(|(a, v)| *a += v);
    }
    for y in 0..h {
        let inv = 1.0 / ((y + r + 1).min(h) - y.saturating_sub(r)) as f32;
        out[y * w..(y + 1) * w].iter_mut().zip(&acc).for_each(|(o, a)| *o = a * inv);
        if y + r + 1 < h {
            acc.iter_mut().zip(&rows[(y + r + 1) * w..(y + r + 2) * w]).for_each(|(a, v)| *a += v);
        }
        if y >= r {
            acc.iter_mut().zip(&rows[(y - r) * w..(y - r + 1) * w]).for_each(|(a, v)| *a -= v);
        }
    }
    out
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
            &GuidedConfig { radius: 24.0, eps: 1e-4, scale: 1.0, max_output_pixels: 1 << 20, temperature: 0.0 },
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
        let config = GuidedConfig { radius: 24.0, eps: 1e-4, scale: 0.5, max_output_pixels: 1 << 20, temperature: 0.0 };
        let refined = labels_guided(&scores, 2, (16, 8), &geom, &image, &config);
        let row: Vec<u8> = refined.labels[16 * 64..17 * 64].to_vec();
        let first_right = row.iter().position(|&l| l == 1).unwrap();
        assert!((38..=41).contains(&first_right), "boundary at column {first_right}: {row:?}");
        assert!(row[first_right..].iter().all(|&l| l == 1) && row[..first_right].iter().all(|&l| l == 0), "one clean edge: {row:?}");
    }

    #[test]
    fn settings_parse_over_the_defaults() {
        let c: GuidedConfig = "radius=4, eps=0.01, temperature=0, scale=2".parse().unwrap();
        assert_eq!((c.radius, c.eps, c.scale, c.temperature), (4.0, 0.01, 1.0, 0.0));
        assert_eq!(c.max_output_pixels, GuidedConfig::default().max_output_pixels);
        assert!("radius=0".parse::<GuidedConfig>().is_err());
        assert!("colour=1".parse::<GuidedConfig>().is_err());
    }
}
