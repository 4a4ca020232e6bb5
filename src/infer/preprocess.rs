//! From image bytes to the network's input: decode (EXIF orientation applied), resize the
//! short side to the package's policy, pad right and bottom to a multiple of 32.

use anyhow::{anyhow, Result};
use image::{imageops::FilterType, DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

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
    Geometry {
        original: (width, height),
        resized: (rw, rh),
        padded: (round_up(rw, policy.multiple), round_up(rh, policy.multiple)),
    }
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

/// Writes the image, resized per `geom`, into a 3 x H x W plane (RGB in [0, 1]) of a padded
/// canvas of `canvas` = (W, H). Padding is the ImageNet mean colour, which the network sees as 0.
pub fn fill_input(img: &RgbImage, geom: &Geometry, canvas: (u32, u32), out: &mut [f32]) {
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
    for (x, y, p) in resized.enumerate_pixels() {
        let i = y as usize * cw + x as usize;
        for c in 0..3 {
            out[c * cw * ch + i] = p[c] as f32 / 255.0;
        }
    }
}
