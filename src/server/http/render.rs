//! Label masks to response bodies: grayscale PNG, palette PNG, colour overlay, JSON.

use anyhow::Result;
use image::RgbImage;

use crate::infer::LabelMask;
use crate::package::Centroids;

/// Opacity of the class colours over the photo in the overlay.
const OVERLAY_ALPHA: f32 = 0.5;

/// Single-channel 8-bit PNG, pixel value = class index.
pub fn mask_png(mask: &LabelMask) -> Result<Vec<u8>> {
    mask.to_png()
}

/// Indexed PNG: pixel value = class index, palette = the package's class colours.
pub fn palette_png(mask: &LabelMask, classes: &Centroids) -> Result<Vec<u8>> {
    let palette: Vec<u8> = (0..classes.k()).flat_map(|c| classes.color(c)).collect();
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, mask.width, mask.height);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(palette);
    let mut w = enc.write_header()?;
    w.write_image_data(&mask.labels)?;
    w.finish()?;
    Ok(out)
}

/// The photo with each pixel's class colour blended over it.
pub fn overlay_png(photo: &RgbImage, mask: &LabelMask, classes: &Centroids) -> Result<Vec<u8>> {
    let colours: Vec<[u8; 3]> = (0..classes.k()).map(|c| classes.color(c)).collect();
    let mut img = photo.clone();
    for (p, &l) in img.pixels_mut().zip(&mask.labels) {
        let c = colours[l as usize];
        for i in 0..3 {
            p[i] = (p[i] as f32 * (1.0 - OVERLAY_ALPHA) + c[i] as f32 * OVERLAY_ALPHA).round() as u8;
        }
    }
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)?;
    Ok(out)
}
