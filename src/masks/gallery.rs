//! What each class is, shown before it is named: for every class, a few crops of the images it
//! covers most, the class outlined and the rest dimmed, with its share of the set.
//!
//! The crops are chosen while the masks are read back (a fixed number of candidates per class,
//! so memory does not grow with the set) and drawn after, each image decoded once for all the
//! crops it gives.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{mask_path, read_mask, SetImage};
use crate::infer::LabelMask;
use crate::package::Centroids;

/// Crops shown per class.
pub const CROPS_PER_CLASS: usize = 6;
/// An image is a candidate for a class only where the class covers at least this much of it.
const MIN_FRACTION: f64 = 0.01;
/// The crop's window is this share of the image's short side: large enough to show context.
const WINDOW_SHARE: f64 = 0.6;
/// Positions tried per window side when looking for the window the class fills most.
const WINDOW_STEPS: u32 = 8;
/// The side of a drawn crop, in pixels.
pub const CROP_SIDE: u32 = 160;
/// How much of the photo shows through outside the class.
const DIM: f32 = 0.35;
const OUTLINE: Rgb<u8> = Rgb([255, 255, 255]);
const JPEG_QUALITY: u8 = 85;

/// The gallery's index, `gallery.json` in a result folder.
pub const INDEX_FILE: &str = "gallery.json";
/// Where the crops are in a result folder.
pub const CROPS_DIR: &str = "gallery";

/// The best images for each class so far: (fraction, image index), largest first.
pub struct Candidates {
    per_class: Vec<Vec<(f64, usize)>>,
    keep: usize,
}

impl Candidates {
    pub fn new(k: usize, keep: usize) -> Self {
        Self { per_class: vec![vec![]; k], keep }
    }

    /// Image `image` with these class fractions.
    pub fn offer(&mut self, image: usize, fractions: &[f64]) {
        for (best, &f) in self.per_class.iter_mut().zip(fractions) {
            if f < MIN_FRACTION || (best.len() == self.keep && best.last().is_some_and(|l| l.0 >= f)) {
                continue;
            }
            let at = best.partition_point(|b| b.0 >= f);
            best.insert(at, (f, image));
            best.truncate(self.keep);
        }
    }

    pub fn of(&self, class: usize) -> &[(f64, usize)] {
        &self.per_class[class]
    }
}

#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct GalleryCrop {
    /// The crop's file name (`GET /jobs/{id}/gallery/{file}`).
    pub file: String,
    /// The image it is cut from, by the name it was uploaded under.
    pub image: String,
    /// How much of that image the class covers.
    pub fraction: f64,
}

#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct GalleryClass {
    pub class: usize,
    /// The class's name and colour when the set was segmented (they may have changed since).
    pub name: String,
    pub color: [u8; 3],
    /// Its share of all the set's pixels.
    pub share: f64,
    /// Images it appears in.
    pub images: usize,
    /// The images it covers most, largest share first.
    pub crops: Vec<GalleryCrop>,
}

#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct Gallery {
    pub classes: Vec<GalleryClass>,
}

/// Whether `file` names a crop of a gallery (`class-<class>-<rank>.jpg`): the only names
/// served from a result's gallery folder.
pub fn is_crop_name(file: &str) -> bool {
    let Some(rest) = file.strip_prefix("class-").and_then(|r| r.strip_suffix(".jpg")) else { return false };
    let mut parts = rest.split('-');
    let number = |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()));
    number(parts.next()) && number(parts.next()) && parts.next().is_none()
}

/// Draws the candidates' crops into `dir/gallery/` and writes `dir/gallery.json`. Returns the
/// number of crops.
pub fn write(
    candidates: &Candidates,
    images: &[SetImage],
    masks: &Path,
    classes: &Centroids,
    shares: &[f64],
    images_with: &[usize],
    dir: &Path,
) -> Result<usize> {
    let crops_dir = dir.join(CROPS_DIR);
    std::fs::create_dir_all(&crops_dir).with_context(|| format!("creating {}", crops_dir.display()))?;
    // image -> the (class, rank) crops it gives
    let mut by_image: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
    for class in 0..classes.k() {
        for (rank, &(_, image)) in candidates.of(class).iter().enumerate() {
            by_image.entry(image).or_default().push((class, rank));
        }
    }
    let file = |class: usize, rank: usize| format!("class-{class}-{rank}.jpg");
    by_image.par_iter().try_for_each(|(&image, wanted)| -> Result<()> {
        let img = &images[image];
        let photo = crate::infer::preprocess::decode_file(&img.path)?;
        let mask = read_mask(&mask_path(masks, &img.key))?;
        for &(class, rank) in wanted {
            let crop = draw_crop(&photo, &mask, class as u8);
            let path = crops_dir.join(file(class, rank));
            let mut out = std::io::BufWriter::new(std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?);
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY).encode_image(&crop)?;
        }
        Ok(())
    })?;
    let gallery = Gallery {
        classes: (0..classes.k())
            .map(|class| GalleryClass {
                class,
                name: classes.name(class),
                color: classes.color(class),
                share: shares[class],
                images: images_with[class],
                crops: candidates
                    .of(class)
                    .iter()
                    .enumerate()
                    .map(|(rank, &(fraction, image))| GalleryCrop { file: file(class, rank), image: images[image].name.clone(), fraction })
                    .collect(),
            })
            .collect(),
    };
    std::fs::write(dir.join(INDEX_FILE), serde_json::to_vec_pretty(&gallery)?)?;
    Ok(by_image.values().map(Vec::len).sum())
}

/// The square window of the image that `class` fills most, as (x, y, side).
fn best_window(mask: &LabelMask, class: u8) -> (u32, u32, u32) {
    let (w, h) = (mask.width, mask.height);
    let side = ((w.min(h) as f64 * WINDOW_SHARE).round() as u32).clamp(1, w.min(h));
    // Summed-area table of the class's pixels.
    let stride = w as usize + 1;
    let mut sat = vec![0u32; stride * (h as usize + 1)];
    for y in 0..h as usize {
        let mut row = 0;
        for x in 0..w as usize {
            row += u32::from(mask.labels[y * w as usize + x] == class);
            sat[(y + 1) * stride + x + 1] = sat[y * stride + x + 1] + row;
        }
    }
    let inside = |x: u32, y: u32| {
        let (x0, y0, x1, y1) = (x as usize, y as usize, (x + side) as usize, (y + side) as usize);
        sat[y1 * stride + x1] + sat[y0 * stride + x0] - sat[y0 * stride + x1] - sat[y1 * stride + x0]
    };
    let step = (side / WINDOW_STEPS).max(1);
    let positions = |len: u32| (0..=(len - side)).step_by(step as usize).chain(std::iter::once(len - side));
    let mut best = (0, 0, 0);
    for y in positions(h) {
        for x in positions(w) {
            let n = inside(x, y);
            if n > best.2 {
                best = (x, y, n);
            }
        }
    }
    (best.0, best.1, side)
}

/// The crop of `photo` around `class`: scaled to [`CROP_SIDE`], the rest dimmed, the class
/// outlined.
fn draw_crop(photo: &RgbImage, mask: &LabelMask, class: u8) -> RgbImage {
    let (x0, y0, side) = best_window(mask, class);
    let region = image::imageops::crop_imm(photo, x0, y0, side, side).to_image();
    let mut out = image::imageops::resize(&region, CROP_SIDE, CROP_SIDE, image::imageops::FilterType::Triangle);
    // The mask at the crop's size, nearest neighbour.
    let n = CROP_SIDE as usize;
    let inside: Vec<bool> = (0..n * n)
        .map(|i| {
            let (cx, cy) = ((i % n) as u64, (i / n) as u64);
            let x = x0 as u64 + cx * side as u64 / n as u64;
            let y = y0 as u64 + cy * side as u64 / n as u64;
            mask.labels[(y * mask.width as u64 + x) as usize] == class
        })
        .collect();
    for (i, p) in out.pixels_mut().enumerate() {
        let (x, y) = (i % n, i / n);
        if !inside[i] {
            p.0 = p.0.map(|v| (v as f32 * DIM) as u8);
            continue;
        }
        let edge = (x > 0 && !inside[i - 1]) || (x + 1 < n && !inside[i + 1]) || (y > 0 && !inside[i - n]) || (y + 1 < n && !inside[i + n]);
        if edge {
            *p = OUTLINE;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_keep_the_images_a_class_covers_most() {
        let mut c = Candidates::new(2, 2);
        c.offer(0, &[0.5, 0.005]);
        c.offer(1, &[0.9, 0.1]);
        c.offer(2, &[0.7, 0.2]);
        c.offer(3, &[0.6, 0.0]);
        assert_eq!(c.of(0), [(0.9, 1), (0.7, 2)]);
        assert_eq!(c.of(1), [(0.2, 2), (0.1, 1)], "under 1 % is no candidate");
    }

    #[test]
    fn only_crop_names_are_crops() {
        assert!(is_crop_name("class-3-0.jpg") && is_crop_name("class-254-5.jpg"));
        for bad in ["../gallery.json", "class-3.jpg", "class--0.jpg", "class-3-0.jpg/x", "class-a-0.jpg", "class-1-2-3.jpg"] {
            assert!(!is_crop_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_window_is_where_the_class_is() {
        // 100 x 50, class 1 in a 20 x 20 square at (70, 25).
        let labels = (0..100 * 50).map(|i| u8::from((70..90).contains(&(i % 100)) && (25..45).contains(&(i / 100)))).collect();
        let mask = LabelMask { width: 100, height: 50, labels };
        let (x, y, side) = best_window(&mask, 1);
        assert_eq!(side, 30);
        assert!(x <= 70 && x + side >= 90 && y <= 25 && y + side >= 45, "({x}, {y}) side {side}");
        let photo = RgbImage::from_pixel(100, 50, Rgb([200, 100, 50]));
        let crop = draw_crop(&photo, &mask, 1);
        assert_eq!(crop.dimensions(), (CROP_SIDE, CROP_SIDE));
        let pixels: Vec<_> = crop.pixels().collect();
        assert!(pixels.contains(&&OUTLINE), "the class is outlined");
        assert!(pixels.iter().any(|p| p.0[0] < 100), "the rest is dimmed");
    }
}
