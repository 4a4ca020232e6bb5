//! From image bytes to the network's input: decode (EXIF orientation applied), resize the
//! short side to the package's policy, pad right and bottom to a multiple of 32.

use anyhow::{anyhow, Result};
use image::{imageops::FilterType, DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

pub use super::normalize::Normalize;
use crate::package::InputPolicy;

/// Images larger than this many pixels are refused before decoding (decompression bombs).
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the image is empty")]
    Empty,
    #[error("unrecognised image format")]
    UnknownFormat,
    #[error("image of {width}x{height} exceeds the limit of {limit} pixels")]
    TooLarge { width: u32, height: u32, limit: u64 },
    #[error("cannot decode the image: {0}")]
    Corrupt(String),
}

/// Reads the header, checks the pixel count, then decodes and applies the EXIF orientation.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(decode_reader(std::io::Cursor::new(bytes), max_pixels)?.0)
}

/// An image's width and height from its header alone, nothing decoded (what a request costs is
/// known before it is admitted).
pub fn image_size(bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if reader.format().is_none() {
        return Err(DecodeError::UnknownFormat);
    }
    let (w, h) = reader.into_dimensions().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(DecodeError::Empty);
    }
    Ok((w, h))
}

/// Decodes an image from any seekable reader: the format guessed from its first bytes, the
/// size checked against `max_pixels` from the header before any pixel is decoded, EXIF
/// orientation applied. Returns the image and its format.
pub fn decode_reader<R: std::io::BufRead + std::io::Seek>(source: R, max_pixels: u64) -> Result<(RgbImage, ImageFormat), DecodeError> {
    let reader = ImageReader::new(source).with_guessed_format().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let Some(format) = reader.format() else { return Err(DecodeError::UnknownFormat) };
    let mut decoder = reader.into_decoder().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(DecodeError::Empty);
    }
    if width as u64 * height as u64 > max_pixels {
        return Err(DecodeError::TooLarge { width, height, limit: max_pixels });
    }
    let orientation = decoder.orientation().ok();
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok((img.to_rgb8(), format))
}

pub fn decode_file(path: &std::path::Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    decode_image(&bytes, DEFAULT_MAX_PIXELS).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Where an image sits inside the padded network input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub original: (u32, u32),
    pub resized: (u32, u32),
    pub padded: (u32, u32),
}

pub fn round_up(v: u32, multiple: u32) -> u32 {
    v.div_ceil(multiple) * multiple
}

/// The resized size for an image under a policy (aspect ratio kept).
pub fn resized_size(width: u32, height: u32, policy: &InputPolicy) -> (u32, u32) {
    let short = width.min(height) as f64;
    let long = width.max(height) as f64;
    let mut scale = policy.short_side as f64 / short;
    if long * scale > policy.max_long_side as f64 {
        scale = policy.max_long_side as f64 / long;
    }
    let w = ((width as f64 * scale).round() as u32).max(1);
    let h = ((height as f64 * scale).round() as u32).max(1);
    (w, h)
}

pub fn geometry(width: u32, height: u32, policy: &InputPolicy) -> Geometry {
    let (rw, rh) = resized_size(width, height, policy);
    Geometry { original: (width, height), resized: (rw, rh), padded: (round_up(rw, policy.multiple), round_up(rh, policy.multiple)) }
}

/// An RGB image as a 3 x H x W plane in [0, 1].
pub fn rgb_planes(img: &RgbImage) -> Vec<f32> {
    let n = (img.width() * img.height()) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = p[c] as f32 / 255.0;
        }
    }
    out
}

/// Writes the image, resized per `geom`, into a 3 x H x W plane (RGB in [0, 1], then
/// normalised per `normalize`) of a padded canvas of `canvas` = (W, H). Padding is the ImageNet
/// mean colour, which the network sees as 0.
pub fn fill_input(img: &RgbImage, geom: &Geometry, normalize: Normalize, canvas: (u32, u32), out: &mut [f32]) {
    let (cw, ch) = (canvas.0 as usize, canvas.1 as usize);
    assert_eq!(out.len(), 3 * cw * ch);
    let resized = if (img.width(), img.height()) == geom.resized {
        img.clone()
    } else {
        image::imageops::resize(img, geom.resized.0, geom.resized.1, FilterType::Triangle)
    };
    for (c, mean) in crate::model::embedder::IMAGENET_MEAN.iter().enumerate() {
        out[c * cw * ch..(c + 1) * cw * ch].fill(*mean);
    }
    let mut planes = rgb_planes(&resized);
    normalize.apply(&mut planes);
    let (rw, n) = (resized.width() as usize, (resized.width() * resized.height()) as usize);
    for c in 0..3 {
        for (y, row) in planes[c * n..(c + 1) * n].chunks(rw).enumerate() {
            out[c * cw * ch + y * cw..][..rw].copy_from_slice(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_normalisation_removes_exposure_and_colour_cast() {
        // The same scene at noon and at dusk with a blue cast: an affine change per channel.
        let scene = RgbImage::from_fn(24, 16, |x, y| image::Rgb([(x * 9) as u8, (y * 13) as u8, ((x + y) * 5) as u8]));
        let dusk = RgbImage::from_fn(24, 16, |x, y| {
            let p = scene.get_pixel(x, y);
            image::Rgb([p[0] / 3 + 4, p[1] / 3 + 4, p[2] / 2 + 30])
        });
        let normalised = |img: &RgbImage, how: Normalize| {
            let mut v = rgb_planes(img);
            how.apply(&mut v);
            v
        };
        let (a, b) = (normalised(&scene, Normalize::Channels), normalised(&dusk, Normalize::Channels));
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 0.02, "normalised views differ by {worst}");
        let n = a.len() / 3;
        for c in 0..3 {
            let plane = &a[c * n..(c + 1) * n];
            let mean = plane.iter().sum::<f32>() / n as f32;
            let sd = (plane.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n as f32).sqrt();
            assert!((mean - crate::model::embedder::IMAGENET_MEAN[c]).abs() < 1e-4);
            assert!((sd - crate::model::embedder::IMAGENET_STD[c]).abs() < 1e-4);
        }
        // A flat image is only shifted, not blown up.
        let mut flat = vec![0.5f32; 3 * 10];
        Normalize::Channels.apply(&mut flat);
        assert!(flat.iter().all(|v| v.is_finite() && (0.4..0.5).contains(v)), "{flat:?}");
        // A darker, less contrasted copy of a grey scene: luminance normalisation makes them
        // alike and keeps grey grey; gain normalisation evens the brightness, not the contrast.
        let grey = RgbImage::from_fn(24, 16, |x, y| image::Rgb([(x * 9 + y) as u8; 3]));
        let dim = RgbImage::from_fn(24, 16, |x, y| image::Rgb([((x * 9 + y) / 2 + 10) as u8; 3]));
        let (g, d) = (normalised(&grey, Normalize::Luminance), normalised(&dim, Normalize::Luminance));
        assert!(g.iter().zip(&d).all(|(x, y)| (x - y).abs() < 0.02));
        let n = g.len() / 3;
        assert!((0..n).all(|i| g[i] == g[n + i] && g[i] == g[2 * n + i]), "grey stays grey");
        let gained = normalised(&dim, Normalize::Gain);
        let mean = gained[..n].iter().sum::<f32>() / n as f32;
        assert!((mean - crate::model::embedder::IMAGENET_MEAN[0]).abs() < 1e-4);
    }

    #[test]
    fn the_padded_canvas_keeps_the_mean_colour_around_a_normalised_image() {
        let img = RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 99]));
        let policy = InputPolicy { short_side: 30, max_long_side: 64, multiple: 32, flip: false, normalize: Normalize::Channels };
        let g = geometry(40, 30, &policy);
        assert_eq!((g.resized, g.padded), ((40, 30), (64, 32)));
        let mut out = vec![0f32; 3 * 64 * 32];
        fill_input(&img, &g, Normalize::Channels, g.padded, &mut out);
        let mut expected = rgb_planes(&img);
        Normalize::Channels.apply(&mut expected);
        assert_eq!(out[64 * 32 + 5 * 64 + 7], expected[40 * 30 + 5 * 40 + 7], "green at (7, 5)");
        assert_eq!(out[63], crate::model::embedder::IMAGENET_MEAN[0], "padding on the right");
    }
}
