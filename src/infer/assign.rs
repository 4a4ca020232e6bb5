//! Pixels to classes: cosine similarity of each feature to each centroid at stride 4, then
//! bilinear interpolation of the similarities to every pixel of the original image and an
//! argmax. Interpolating the K scores rather than the labels gives smooth boundaries; doing it
//! per output pixel avoids upsampling a 128-channel map.

use rayon::prelude::*;

use super::preprocess::Geometry;
use crate::model::embedder::OUTPUT_STRIDE;
use crate::package::Centroids;

/// A label per pixel, row-major, at the original image size.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelMask {
    pub width: u32,
    pub height: u32,
    pub labels: Vec<u8>,
}

impl LabelMask {
    /// The pixels in each of `k` classes.
    pub fn class_counts(&self, k: usize) -> Vec<u64> {
        let mut counts = vec![0u64; k];
        for &l in &self.labels {
            if (l as usize) < k {
                counts[l as usize] += 1;
            }
        }
        counts
    }

    /// The fraction of pixels in each class.
    pub fn class_fractions(&self, k: usize) -> Vec<f64> {
        let total = self.labels.len().max(1) as f64;
        self.class_counts(k).into_iter().map(|c| c as f64 / total).collect()
    }

    /// Single-channel 8-bit PNG, pixel value = class index.
    pub fn to_png(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.width, self.height);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(&self.labels)?;
        w.finish()?;
        Ok(out)
    }
}

/// The classes as scoring sees them: every vector a class holds (its centroid, or the
/// over-clusters merged into it), row-major, and which class each belongs to. A pixel's score
/// for a class is its best cosine similarity to the class's vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassScorer {
    k: usize,
    vectors: Vec<f32>,
    /// The class of each vector; None: vector i is class i.
    class_of: Option<Vec<usize>>,
}

impl ClassScorer {
    pub fn new(centroids: &Centroids) -> Self {
        if centroids.over_clusters().is_none() {
            return Self { k: centroids.k(), vectors: centroids.matrix(), class_of: None };
        }
        let mut vectors = vec![];
        let mut class_of = vec![];
        for (class, c) in centroids.classes.iter().enumerate() {
            for v in c.vectors() {
                vectors.extend_from_slice(v);
                class_of.push(class);
            }
        }
        Self { k: centroids.k(), vectors, class_of: Some(class_of) }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// K x (h x w) class scores of a dim x h x w feature map (unit vectors).
    pub fn scores(&self, features: &[f32], dim: usize, hw: usize) -> Vec<f32> {
        let sims = similarities(features, dim, hw, &self.vectors);
        match &self.class_of {
            None => sims,
            Some(class_of) => {
                let mut out = vec![f32::NEG_INFINITY; self.k * hw];
                for (v, &class) in class_of.iter().enumerate() {
                    for (o, &s) in out[class * hw..(class + 1) * hw].iter_mut().zip(&sims[v * hw..(v + 1) * hw]) {
                        *o = o.max(s);
                    }
                }
                out
            }
        }
    }
}

/// Cosine similarities, K x (h x w), of a dim x h x w feature map (unit vectors) to K unit centroids.
///
/// One blocked matrix product (K x dim times dim x hw): with the 100 vectors of merged classes,
/// streaming the whole feature map once per vector made the scores a quarter of a `fast` request.
pub fn similarities(features: &[f32], dim: usize, hw: usize, centroids: &[f32]) -> Vec<f32> {
    let k = centroids.len() / dim;
    assert!(features.len() >= dim * hw && centroids.len() == k * dim, "similarities: shapes do not match");
    let mut out = vec![0f32; k * hw];
    if k == 0 || hw == 0 {
        return out;
    }
    // SAFETY: the three row-major buffers hold k x dim, dim x hw and k x hw floats (checked
    // above), and the strides below walk exactly those shapes.
    unsafe {
        matrixmultiply::sgemm(
            k,
            dim,
            hw,
            1.0,
            centroids.as_ptr(),
            dim as isize,
            1,
            features.as_ptr(),
            hw as isize,
            1,
            0.0,
            out.as_mut_ptr(),
            hw as isize,
            1,
        );
    }
    out
}

/// Nearest centroid per feature pixel (no interpolation): the labels that clustering sees.
pub fn nearest(features: &[f32], dim: usize, hw: usize, centroids: &[f32]) -> Vec<u8> {
    let k = centroids.len() / dim;
    let sims = similarities(features, dim, hw, centroids);
    (0..hw)
        .map(|p| {
            let mut best = 0;
            for c in 1..k {
                if sims[c * hw + p] > sims[best * hw + p] {
                    best = c;
                }
            }
            best as u8
        })
        .collect()
}

/// Per-pixel scores at a `target` = (w, h) size covering the original image (its own size, or a
/// reduced one): the K score maps of size `feat` at stride 4, bilinear, pixel after pixel with
/// the K scores of a pixel together (the layout the CRF works on).
pub fn scores_at_size(scores: &[f32], k: usize, feat: (usize, usize), geom: &Geometry, target: (usize, usize)) -> Vec<f32> {
    let (fw, fh) = feat;
    let (tw, th) = target;
    let sx = geom.resized.0 as f32 / tw as f32;
    let sy = geom.resized.1 as f32 / th as f32;
    let xs: Vec<_> = (0..tw).map(|x| feature_coord(x, sx, fw)).collect();
    let mut out = vec![0f32; tw * th * k];
    out.par_chunks_mut(tw * k).enumerate().for_each(|(y, row)| {
        let (y0, y1, wy) = feature_coord(y, sy, fh);
        for (x, px) in row.chunks_mut(k).enumerate() {
            let (x0, x1, wx) = xs[x];
            let (a, b, c, d) = (y0 * fw + x0, y0 * fw + x1, y1 * fw + x0, y1 * fw + x1);
            let (w00, w01, w10, w11) = ((1.0 - wx) * (1.0 - wy), wx * (1.0 - wy), (1.0 - wx) * wy, wx * wy);
            for (cls, o) in px.iter_mut().enumerate() {
                let s = &scores[cls * fw * fh..(cls + 1) * fw * fh];
                *o = w00 * s[a] + w01 * s[b] + w10 * s[c] + w11 * s[d];
            }
        }
    });
    out
}

/// An output pixel's position on the feature grid, with half-pixel centres: output pixel ->
/// resized pixel (`scale` resized pixels per output pixel) -> feature cell. Returns the two
/// cells to interpolate between and the weight of the second.
fn feature_coord(o: usize, scale: f32, n: usize) -> (usize, usize, f32) {
    let stride = OUTPUT_STRIDE as f32;
    let r = (o as f32 + 0.5) * scale - 0.5;
    let f = ((r + 0.5) / stride - 0.5).clamp(0.0, (n - 1) as f32);
    let i0 = f.floor() as usize;
    let i1 = (i0 + 1).min(n - 1);
    (i0, i1, f - i0 as f32)
}

/// Labels at the original size from K score maps of size `feat` = (w, h) at stride 4 of the padded input.
pub fn labels_at_original_size(scores: &[f32], k: usize, feat: (usize, usize), geom: &Geometry) -> LabelMask {
    let (fw, fh) = feat;
    let (ow, oh) = (geom.original.0 as usize, geom.original.1 as usize);
    let sx = geom.resized.0 as f32 / ow as f32;
    let sy = geom.resized.1 as f32 / oh as f32;
    let coord = feature_coord;
    let xs: Vec<_> = (0..ow).map(|x| coord(x, sx, fw)).collect();
    let mut labels = vec![0u8; ow * oh];
    labels.par_chunks_mut(ow).enumerate().for_each(|(y, row)| {
        let (y0, y1, wy) = coord(y, sy, fh);
        for (x, out) in row.iter_mut().enumerate() {
            let (x0, x1, wx) = xs[x];
            let (a, b, c, d) = (y0 * fw + x0, y0 * fw + x1, y1 * fw + x0, y1 * fw + x1);
            let w00 = (1.0 - wx) * (1.0 - wy);
            let w01 = wx * (1.0 - wy);
            let w10 = (1.0 - wx) * wy;
            let w11 = wx * wy;
            let mut best = 0usize;
            let mut best_score = f32::NEG_INFINITY;
            for cls in 0..k {
                let s = &scores[cls * fw * fh..(cls + 1) * fw * fh];
                let v = w00 * s[a] + w01 * s[b] + w10 * s[c] + w11 * s[d];
                if v > best_score {
                    best_score = v;
                    best = cls;
                }
            }
            *out = best as u8;
        }
    });
    LabelMask { width: ow as u32, height: oh as u32, labels }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merged_class_scores_its_best_over_cluster() {
        // Three 2-D over-clusters, 0 and 2 merged into class 0; four pixels, dim-major.
        let at = |deg: f32| vec![deg.to_radians().cos(), deg.to_radians().sin()];
        let (a, b, c) = (at(0.0), at(90.0), at(45.0));
        let merged = Centroids::merged(2, vec![a.clone(), b.clone(), c.clone()], &[1, 1, 1], &[0, 1, 0]).unwrap();
        let scorer = ClassScorer::new(&merged);
        let pixels = [at(10.0), at(50.0), at(80.0), at(100.0)];
        let features: Vec<f32> = (0..2).flat_map(|d| pixels.iter().map(move |p| p[d])).collect();
        let scores = scorer.scores(&features, 2, 4);
        let cos = |u: &[f32], v: &[f32]| u[0] * v[0] + u[1] * v[1];
        for (i, p) in pixels.iter().enumerate() {
            assert!((scores[i] - cos(p, &a).max(cos(p, &c))).abs() < 1e-6, "pixel {i}");
            assert!((scores[4 + i] - cos(p, &b)).abs() < 1e-6, "pixel {i}");
        }
        // Without over-clusters the scores are the similarities to the centroids.
        let plain = Centroids::from_vectors(2, vec![a.clone(), b.clone()]);
        assert_eq!(ClassScorer::new(&plain).scores(&features, 2, 4), similarities(&features, 2, 4, &[a, b].concat()));
    }

    #[test]
    fn similarities_are_the_dot_products() {
        // Sizes off every block boundary, values from a fixed sequence.
        let (k, dim, hw) = (37, 19, 301);
        let value = |i: usize| ((i * 7919 + 13) % 1000) as f32 / 500.0 - 1.0;
        let features: Vec<f32> = (0..dim * hw).map(value).collect();
        let centroids: Vec<f32> = (0..k * dim).map(|i| value(i + 5)).collect();
        let sims = similarities(&features, dim, hw, &centroids);
        for c in 0..k {
            for p in 0..hw {
                let dot: f32 = (0..dim).map(|d| centroids[c * dim + d] * features[d * hw + p]).sum();
                assert!((sims[c * hw + p] - dot).abs() < 1e-4, "class {c} pixel {p}: {} against {dot}", sims[c * hw + p]);
            }
        }
        assert!(similarities(&features, dim, 0, &centroids).is_empty());
    }
}
