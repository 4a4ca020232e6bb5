//! The two kinds of transforms PiCIE learns from.
//!
//! Photometric P (invariance): brightness, contrast, saturation +-0.3 (p = 0.8 each), hue +-0.1
//! (p = 0.8), grayscale (p = 0.2), Gaussian blur sigma 0.1-2.0 (p = 0.5). Two independent draws
//! per image, fixed for an epoch so the clustering pass and the training pass see the same views.
//!
//! Geometric G (equivariance): random resized crop with side fraction 0.5-1.0 and horizontal
//! flip (p = 0.5). The crop box is drawn in feature cells (4 pixels each), so cropping the image
//! before the network and cropping the feature map after it select exactly the same region.

use rand::Rng;

/// Photometric parameters of one view.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Photometric {
    pub brightness: Option<f32>,
    pub contrast: Option<f32>,
    pub saturation: Option<f32>,
    pub hue: Option<f32>,
    pub grayscale: bool,
    pub blur_sigma: Option<f32>,
}

/// The ranges and probabilities of the photometric draw.
#[derive(Clone, Copy, Debug)]
pub struct PhotometricConfig {
    pub jitter: f32,
    pub jitter_p: f64,
    pub hue: f32,
    pub hue_p: f64,
    pub grayscale_p: f64,
    pub blur_p: f64,
    pub blur_sigma: (f32, f32),
}

impl Default for PhotometricConfig {
    fn default() -> Self {
        Self { jitter: 0.3, jitter_p: 0.8, hue: 0.1, hue_p: 0.8, grayscale_p: 0.2, blur_p: 0.5, blur_sigma: (0.1, 2.0) }
    }
}

impl Photometric {
    pub const IDENTITY: Photometric =
        Photometric { brightness: None, contrast: None, saturation: None, hue: None, grayscale: false, blur_sigma: None };

    pub fn sample(rng: &mut impl Rng, c: &PhotometricConfig) -> Self {
        let mut factor = |p: f64, r: f32| rng.random_bool(p).then(|| rng.random_range(1.0 - r..=1.0 + r));
        let brightness = factor(c.jitter_p, c.jitter);
        let contrast = factor(c.jitter_p, c.jitter);
        let saturation = factor(c.jitter_p, c.jitter);
        let hue = rng.random_bool(c.hue_p).then(|| rng.random_range(-c.hue..=c.hue));
        let grayscale = rng.random_bool(c.grayscale_p);
        let blur_sigma = rng.random_bool(c.blur_p).then(|| rng.random_range(c.blur_sigma.0..=c.blur_sigma.1));
        Self { brightness, contrast, saturation, hue, grayscale, blur_sigma }
    }

    /// Applies the view to a 3 x H x W RGB plane in [0, 1], in place (torchvision's order:
    /// brightness, contrast, saturation, hue, then grayscale, then blur).
    pub fn apply(&self, img: &mut [f32], w: usize, h: usize) {
        let n = w * h;
        assert_eq!(img.len(), 3 * n);
        if let Some(b) = self.brightness {
            img.iter_mut().for_each(|v| *v = (*v * b).clamp(0.0, 1.0));
        }
        if let Some(c) = self.contrast {
            // Blend with the mean gray level of the image.
            let mean = (0..n).map(|i| gray(img, n, i)).sum::<f32>() / n as f32;
            img.iter_mut().for_each(|v| *v = (mean + c * (*v - mean)).clamp(0.0, 1.0));
        }
        if let Some(s) = self.saturation {
            for i in 0..n {
                let g = gray(img, n, i);
                for ch in 0..3 {
                    img[ch * n + i] = (g + s * (img[ch * n + i] - g)).clamp(0.0, 1.0);
                }
            }
        }
        if let Some(dh) = self.hue {
            for i in 0..n {
                let (hh, ss, vv) = rgb_to_hsv(img[i], img[n + i], img[2 * n + i]);
                let (r, g, b) = hsv_to_rgb((hh + dh).rem_euclid(1.0), ss, vv);
                img[i] = r;
                img[n + i] = g;
                img[2 * n + i] = b;
            }
        }
        if self.grayscale {
            for i in 0..n {
                let g = gray(img, n, i);
                for ch in 0..3 {
                    img[ch * n + i] = g;
                }
            }
        }
        if let Some(sigma) = self.blur_sigma {
            for ch in 0..3 {
                gaussian_blur(&mut img[ch * n..(ch + 1) * n], w, h, sigma);
            }
        }
    }
}

fn gray(img: &[f32], n: usize, i: usize) -> f32 {
    0.299 * img[i] + 0.587 * img[n + i] + 0.114 * img[2 * n + i]
}

pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let h = if d == 0.0 {
        0.0
    } else if max == r {
        ((g - b) / d).rem_euclid(6.0) / 6.0
    } else if max == g {
        ((b - r) / d + 2.0) / 6.0
    } else {
        ((r - g) / d + 4.0) / 6.0
    };
    let s = if max == 0.0 { 0.0 } else { d / max };
    (h, s, max)
}

pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    match (i as i32).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// Separable Gaussian blur with a kernel radius of 3 sigma, edges replicated.
pub fn gaussian_blur(plane: &mut [f32], w: usize, h: usize, sigma: f32) {
    let radius = (3.0 * sigma).ceil().max(1.0) as isize;
    let kernel: Vec<f32> = (-radius..=radius).map(|x| (-(x * x) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let sum: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / sum).collect();
    let mut tmp = vec![0f32; plane.len()];
    // Rows then columns: the same 1-D pass with the roles of x and y swapped.
    convolve_1d(plane, &mut tmp, w, h, 1, w, &kernel, radius);
    convolve_1d(&tmp, plane, h, w, w, 1, &kernel, radius);
}

/// Convolves `lines` lines of `len` samples each (sample step `step`, line step `line_step`)
/// with `kernel`, replicating the edges.
#[allow(clippy::too_many_arguments)]
fn convolve_1d(src: &[f32], dst: &mut [f32], len: usize, lines: usize, step: usize, line_step: usize, kernel: &[f32], radius: isize) {
    for line in 0..lines {
        for i in 0..len {
            let mut acc = 0.0;
            for (k, kv) in kernel.iter().enumerate() {
                let j = (i as isize + k as isize - radius).clamp(0, len as isize - 1) as usize;
                acc += kv * src[line * line_step + j * step];
            }
            dst[line * line_step + i * step] = acc;
        }
    }
}

/// A crop box in feature cells of a `cells_w` x `cells_h` map (the frame's aspect ratio kept),
/// and a flip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometric {
    pub x0: usize,
    pub y0: usize,
    pub w: usize,
    pub h: usize,
    pub flip: bool,
}

impl Geometric {
    /// Side fraction uniform in [min_fraction, 1] (drawn on the height, the width follows the
    /// frame's aspect ratio), position uniform, flip with p = 0.5.
    pub fn sample(rng: &mut impl Rng, cells_w: usize, cells_h: usize, min_fraction: f32) -> Self {
        let min_side = ((cells_h as f32 * min_fraction).round() as usize).clamp(1, cells_h);
        let h = rng.random_range(min_side..=cells_h);
        let w = ((h * cells_w) as f32 / cells_h as f32).round().clamp(1.0, cells_w as f32) as usize;
        let x0 = rng.random_range(0..=cells_w - w);
        let y0 = rng.random_range(0..=cells_h - h);
        Self { x0, y0, w, h, flip: rng.random_bool(0.5) }
    }
}

/// Resizes the image to cover `width` x `height` (bilinear, aspect ratio kept) and centre-crops
/// it to that: the training frame. Returns a 3 x height x width plane in [0, 1].
pub fn training_frame(img: &image::RgbImage, width: u32, height: u32) -> Vec<f32> {
    let scale = (width as f32 / img.width() as f32).max(height as f32 / img.height() as f32);
    let w = ((img.width() as f32 * scale).round() as u32).max(width);
    let h = ((img.height() as f32 * scale).round() as u32).max(height);
    let resized = image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle);
    let crop = image::imageops::crop_imm(&resized, (w - width) / 2, (h - height) / 2, width, height).to_image();
    crate::infer::preprocess::rgb_planes(&crop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn plane(pixels: &[[f32; 3]]) -> Vec<f32> {
        let n = pixels.len();
        let mut v = vec![0.0; 3 * n];
        for (i, p) in pixels.iter().enumerate() {
            for c in 0..3 {
                v[c * n + i] = p[c];
            }
        }
        v
    }

    #[test]
    fn brightness_contrast_saturation_by_hand() {
        let mut img = plane(&[[0.2, 0.4, 0.6], [0.5, 0.5, 0.5]]);
        Photometric { brightness: Some(1.5), ..Photometric::IDENTITY }.apply(&mut img, 2, 1);
        assert_eq!(img, plane(&[[0.3, 0.6, 0.90000004], [0.75, 0.75, 0.75]]));

        // Contrast 0 makes every pixel the mean gray level.
        let mut img = plane(&[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]);
        Photometric { contrast: Some(0.0), ..Photometric::IDENTITY }.apply(&mut img, 2, 1);
        assert!(img.iter().all(|v| (v - 0.5).abs() < 1e-6));

        // Saturation 0 is grayscale; a gray pixel does not change.
        let mut img = plane(&[[1.0, 0.0, 0.0], [0.3, 0.3, 0.3]]);
        Photometric { saturation: Some(0.0), ..Photometric::IDENTITY }.apply(&mut img, 2, 1);
        assert!((img[0] - 0.299).abs() < 1e-6 && (img[2] - 0.299).abs() < 1e-6 && (img[4] - 0.299).abs() < 1e-6);
        assert!((img[1] - 0.3).abs() < 1e-6);
    }

    #[test]
    fn hue_shift_rotates_primaries() {
        // Shifting hue by 1/3 turns red into green.
        let mut img = plane(&[[1.0, 0.0, 0.0]]);
        Photometric { hue: Some(1.0 / 3.0), ..Photometric::IDENTITY }.apply(&mut img, 1, 1);
        assert!((img[0]).abs() < 1e-5 && (img[1] - 1.0).abs() < 1e-5 && img[2].abs() < 1e-5, "{img:?}");
        let (h, s, v) = rgb_to_hsv(0.2, 0.4, 0.6);
        let (r, g, b) = hsv_to_rgb(h, s, v);
        assert!((r - 0.2).abs() < 1e-6 && (g - 0.4).abs() < 1e-6 && (b - 0.6).abs() < 1e-6);
    }

    #[test]
    fn blur_keeps_constant_planes_and_spreads_impulses() {
        let mut flat = vec![0.7f32; 25];
        gaussian_blur(&mut flat, 5, 5, 1.0);
        assert!(flat.iter().all(|v| (v - 0.7).abs() < 1e-6));
        let mut imp = vec![0f32; 49];
        imp[24] = 1.0;
        gaussian_blur(&mut imp, 7, 7, 0.8);
        assert!((imp.iter().sum::<f32>() - 1.0).abs() < 1e-5, "mass is kept away from the edges");
        assert!(imp[24] < 1.0 && imp[23] > 0.0 && (imp[23] - imp[25]).abs() < 1e-7 && (imp[17] - imp[23]).abs() < 1e-7);
    }

    #[test]
    fn draws_follow_their_ranges_and_probabilities() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let c = PhotometricConfig::default();
        let draws: Vec<Photometric> = (0..4000).map(|_| Photometric::sample(&mut rng, &c)).collect();
        let rate = |f: &dyn Fn(&Photometric) -> bool| draws.iter().filter(|d| f(d)).count() as f64 / draws.len() as f64;
        assert!((rate(&|d| d.brightness.is_some()) - 0.8).abs() < 0.03);
        assert!((rate(&|d| d.hue.is_some()) - 0.8).abs() < 0.03);
        assert!((rate(&|d| d.grayscale) - 0.2).abs() < 0.03);
        assert!((rate(&|d| d.blur_sigma.is_some()) - 0.5).abs() < 0.03);
        assert!(draws.iter().filter_map(|d| d.saturation).all(|s| (0.7..=1.3).contains(&s)));
        assert!(draws.iter().filter_map(|d| d.hue).all(|h| (-0.1..=0.1).contains(&h)));
        assert!(draws.iter().filter_map(|d| d.blur_sigma).all(|s| (0.1..=2.0).contains(&s)));

        let g: Vec<Geometric> = (0..2000).map(|_| Geometric::sample(&mut rng, 80, 80, 0.5)).collect();
        assert!(g.iter().all(|g| g.h >= 40 && g.h <= 80 && g.w == g.h && g.x0 + g.w <= 80 && g.y0 + g.h <= 80));
        let flips = g.iter().filter(|g| g.flip).count() as f64 / g.len() as f64;
        assert!((flips - 0.5).abs() < 0.05);
        // Wide frames: the box keeps the 4:3 aspect ratio (to a cell) and stays inside.
        let g: Vec<Geometric> = (0..2000).map(|_| Geometric::sample(&mut rng, 120, 88, 0.5)).collect();
        assert!(g.iter().all(|g| g.h >= 44 && g.h <= 88 && g.x0 + g.w <= 120 && g.y0 + g.h <= 88));
        assert!(
            g.iter().all(|g| (g.w as f32 - g.h as f32 * 120.0 / 88.0).abs() <= 0.5),
            "{:?}",
            g.iter().find(|g| (g.w as f32 - g.h as f32 * 120.0 / 88.0).abs() > 0.5)
        );
        assert!(g.iter().any(|g| g.h == 88 && g.w == 120));
    }

    #[test]
    fn training_frame_centre_crops() {
        let img = image::RgbImage::from_fn(8, 4, |x, _| image::Rgb([if !(2..6).contains(&x) { 255 } else { 0 }, 0, 0]));
        let f = training_frame(&img, 4, 4);
        assert_eq!(f.len(), 3 * 16);
        // The white side bands are cropped away.
        assert!(f[..16].iter().all(|&v| v < 0.01), "{:?}", &f[..16]);
        // A frame with the image's own aspect ratio keeps everything: the bands survive.
        let f = training_frame(&img, 8, 4);
        assert_eq!(f.len(), 3 * 32);
        assert!(f[0] > 0.99 && f[7] > 0.99 && f[3] < 0.01, "{:?}", &f[..8]);
        // A portrait frame from a landscape image covers the height and crops the width.
        let f = training_frame(&img, 2, 4);
        assert_eq!(f.len(), 3 * 8);
        assert!(f[..8].iter().all(|&v| v < 0.01));
    }
}
