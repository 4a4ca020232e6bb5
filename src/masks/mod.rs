//! Masks for a whole image set: every image segmented to a mask file, then the result a user
//! downloads (an archive of the masks named after the images, the classes and each image's
//! class fractions) and a gallery that shows what each class is.
//!
//! The work is in two passes so that memory never grows with the set: [`segment_images`]
//! writes one mask file per image (a file already there is kept, so an interrupted run
//! continues where it stopped), then [`write_results`] reads the masks back one at a time
//! into the fraction table and the gallery's candidates. The archive itself is put together
//! when it is downloaded, from the masks, that table and the classes as they are named then.

pub mod archive;
pub mod gallery;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::infer::{LabelMask, Quality, Refinement, Segmenter};

/// Images segmented per embedder call: enough to keep both cores busy with decoding and
/// refinement while the network runs, few enough that a batch of 12 MP photos stays small.
pub const BATCH: usize = 4;

/// One image of the set: its file, the name it was uploaded under, and a key unique in the set
/// that names its mask file.
#[derive(Clone, Debug)]
pub struct SetImage {
    pub path: PathBuf,
    pub name: String,
    pub key: String,
}

/// The mask file of `key` in `dir`.
pub fn mask_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.png"))
}

/// What [`segment_images`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SegmentReport {
    /// Masks made by this run.
    pub segmented: usize,
    /// Masks found from an earlier, interrupted run and kept.
    pub kept: usize,
    /// Images that could not be read, by name; they get no mask.
    pub skipped: Vec<String>,
}

/// Segments each image at `quality` into `dir/masks/<key>.png` (8-bit, pixel = class index),
/// keeping the masks already there. Each mask is written to a temporary file and renamed, so a mask
/// file is whole or absent. `progress(done, total)` hears of every batch; false stops the run
/// (Ok(None)).
pub fn segment_images(
    seg: &Segmenter,
    images: &[SetImage],
    quality: Quality,
    refine: &Refinement,
    dir: &Path,
    mut progress: impl FnMut(usize, usize) -> bool,
) -> Result<Option<SegmentReport>> {
    let dir = &dir.join(MASKS_DIR);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut report = SegmentReport::default();
    let todo: Vec<&SetImage> = images.iter().filter(|i| !mask_path(dir, &i.key).is_file()).collect();
    report.kept = images.len() - todo.len();
    let total = images.len();
    if !progress(report.kept, total) {
        return Ok(None);
    }
    for batch in todo.chunks(BATCH) {
        let decoded: Vec<(&SetImage, Result<image::RgbImage>)> =
            batch.par_iter().map(|i| (*i, crate::infer::preprocess::decode_file(&i.path))).collect();
        let (mut readable, mut pixels) = (vec![], vec![]);
        for (img, d) in decoded {
            match d {
                Ok(p) => {
                    readable.push(img);
                    pixels.push(p);
                }
                Err(e) => {
                    tracing::warn!(image = %img.name, error = %format!("{e:#}"), "skipping an unreadable image");
                    report.skipped.push(img.name.clone());
                }
            }
        }
        let masks = segment_batch(seg, &pixels, quality, refine)?;
        readable.par_iter().zip(masks).try_for_each(|(img, mask)| write_mask(&mask_path(dir, &img.key), &mask))?;
        report.segmented += readable.len();
        if !progress(report.kept + report.segmented + report.skipped.len(), total) {
            return Ok(None);
        }
    }
    Ok(Some(report))
}

/// The masks of a batch: one embedder call, the refinements in parallel.
fn segment_batch(seg: &Segmenter, images: &[image::RgbImage], quality: Quality, refine: &Refinement) -> Result<Vec<LabelMask>> {
    if images.is_empty() {
        return Ok(vec![]);
    }
    let features = seg.embed_with(images, quality.flip())?;
    Ok(features.par_iter().zip(images).map(|(f, img)| seg.assign_at(f, img, quality, refine)).collect())
}

/// Writes a mask as a grayscale PNG through a temporary file renamed into place. Not fsynced:
/// a mask lost to a power cut is found unreadable by [`write_results`] and made again.
fn write_mask(path: &Path, mask: &LabelMask) -> Result<()> {
    crate::util::write_replacing(path, &mask.to_png()?)
}

/// Reads a mask file back.
pub fn read_mask(path: &Path) -> Result<LabelMask> {
    let img = image::open(path).with_context(|| format!("reading {}", path.display()))?;
    let gray = img.as_luma8().with_context(|| format!("{} is not an 8-bit grayscale mask", path.display()))?;
    Ok(LabelMask { width: gray.width(), height: gray.height(), labels: gray.as_raw().clone() })
}

/// Keys for the images of a set, from the names they were uploaded under: the name's stem made
/// safe for a file name in any archive tool (letters, digits, `.`, `_`, `-`), and where two
/// images share a stem, the later ones followed by the start of their content hash.
pub fn keys_for(names_and_hashes: &[(String, String)]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    names_and_hashes
        .iter()
        .map(|(name, hash)| {
            let base = Path::new(name).file_stem().and_then(|s| s.to_str()).unwrap_or("image");
            let mut stem: String =
                base.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).take(100).collect();
            if stem.is_empty() || stem.starts_with('.') {
                stem.insert_str(0, "image");
            }
            // The stem, then the stem with more and more of the hash, then with a counter.
            let hash: String = hash.chars().filter(char::is_ascii_alphanumeric).collect();
            let hashed = (8..=hash.len().max(8))
                .step_by(4)
                .filter(|_| !hash.is_empty())
                .map(|n| format!("{stem}-{}", hash.chars().take(n).collect::<String>()));
            let counted = (1..).map(|i| format!("{stem}-{i}"));
            std::iter::once(stem.clone()).chain(hashed).chain(counted).find(|k| seen.insert(k.clone())).expect("an endless supply of keys")
        })
        .collect()
}

/// The table of each image's class fractions, one row per mask: `mask,image,` then one column
/// per class. Its header row names the classes by index (`class_0`, ...): the names change
/// when a user renames them, so the archive puts the names of the day in that row when it is
/// downloaded ([`csv_header`]).
pub const FRACTIONS_FILE: &str = "fractions.csv";
/// Where the masks are in a result folder and in the archive.
pub const MASKS_DIR: &str = "masks";

/// The header row of the fraction table, with the classes named.
pub fn csv_header(names: &[String]) -> String {
    let mut row = String::from("mask,image");
    for n in names {
        row.push(',');
        row.push_str(&csv_field(n));
    }
    row
}

/// A CSV field, quoted where it must be (RFC 4180).
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The mask's name in the archive and in the first column of the fraction table.
pub fn archive_name(key: &str) -> String {
    format!("{MASKS_DIR}/{key}.png")
}

/// The first field of a fraction table row: the mask's archive name (keys never need quoting),
/// None unless it names a mask file in the masks folder.
pub fn row_mask(row: &str) -> Option<&str> {
    let field = row.split(',').next()?;
    let key = field.strip_prefix(MASKS_DIR)?.strip_prefix('/')?.strip_suffix(".png")?;
    let safe = !key.is_empty() && !key.starts_with('.') && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    safe.then_some(field)
}

/// Writes the rest of a segmented set's results next to its masks in `dir` (`dir/masks/`):
/// the fraction table and the gallery. A mask found unreadable is made again first. Reads one
/// mask at a time; holds only the gallery's candidates.
pub fn write_results(
    seg: &Segmenter,
    images: &[SetImage],
    dir: &Path,
    quality: Quality,
    refine: &Refinement,
    mut progress: impl FnMut(usize, usize) -> bool,
) -> Result<Option<ResultsReport>> {
    use std::io::Write;
    let masks = dir.join(MASKS_DIR);
    let classes = &seg.package.centroids;
    let k = classes.k();
    let table_path = dir.join(FRACTIONS_FILE);
    let mut table =
        std::io::BufWriter::new(std::fs::File::create(&table_path).with_context(|| format!("creating {}", table_path.display()))?);
    writeln!(table, "{}", csv_header(&(0..k).map(|c| format!("class_{c}")).collect::<Vec<_>>()))?;
    let mut candidates = gallery::Candidates::new(k, gallery::CROPS_PER_CLASS);
    let mut pixels = vec![0u64; k];
    let mut images_with = vec![0usize; k];
    let mut written = 0;
    for (i, img) in images.iter().enumerate() {
        let path = mask_path(&masks, &img.key);
        if !path.is_file() {
            continue; // unreadable when it was segmented, and reported then
        }
        let mask = match read_mask(&path) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(image = %img.name, error = %format!("{e:#}"), "a mask file is damaged; segmenting the image again");
                let decoded = crate::infer::preprocess::decode_file(&img.path)?;
                let mask = segment_batch(seg, std::slice::from_ref(&decoded), quality, refine)?.remove(0);
                write_mask(&path, &mask)?;
                mask
            }
        };
        let counts = mask.class_counts(k);
        let all = mask.labels.len().max(1) as f64;
        let fractions: Vec<f64> = counts.iter().map(|&n| n as f64 / all).collect();
        for c in 0..k {
            pixels[c] += counts[c];
            images_with[c] += usize::from(counts[c] > 0);
        }
        candidates.offer(i, &fractions);
        write!(table, "{},{}", archive_name(&img.key), csv_field(&img.name))?;
        for f in &fractions {
            write!(table, ",{f:.6}")?;
        }
        writeln!(table)?;
        written += 1;
        if !progress(i + 1, images.len()) {
            return Ok(None);
        }
    }
    table.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let total: u64 = pixels.iter().sum();
    let shares: Vec<f64> = pixels.iter().map(|&p| if total == 0 { 0.0 } else { p as f64 / total as f64 }).collect();
    let crops = gallery::write(&candidates, images, &masks, classes, &shares, &images_with, dir)?;
    Ok(Some(ResultsReport { masks: written, shares, gallery_crops: crops }))
}

/// What [`write_results`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultsReport {
    /// Masks in the results.
    pub masks: usize,
    /// Each class's share of all the set's pixels.
    pub shares: Vec<f64>,
    /// Crops in the gallery.
    pub gallery_crops: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise_set(dir: &Path, n: u32) -> Vec<SetImage> {
        (0..n)
            .map(|i| {
                let img = image::RgbImage::from_fn(96 + 8 * i, 64, |x, y| {
                    image::Rgb([(x * 7 + i * 40) as u8, (y * 5) as u8, ((x ^ y) * 3) as u8])
                });
                let path = dir.join(format!("n{i}.png"));
                img.save(&path).unwrap();
                SetImage { path, name: format!("n {i}.png"), key: format!("n_{i}") }
            })
            .collect()
    }

    #[test]
    fn an_interrupted_run_keeps_its_masks_and_a_damaged_one_is_made_again() {
        let seg = Segmenter::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default"), crate::infer::DeviceChoice::Cpu, Some(1))
            .unwrap();
        let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut images = noise_set(src.path(), 6);
        std::fs::write(src.path().join("broken.png"), b"not a png").unwrap();
        images.push(SetImage { path: src.path().join("broken.png"), name: "broken.png".into(), key: "broken".into() });
        let refine = Refinement::default();
        // Stopped after the first batch, as a cancel or a crash would.
        let mut calls = 0;
        let stopped = segment_images(&seg, &images, Quality::Fast, &refine, out.path(), |_, _| {
            calls += 1;
            calls < 2
        })
        .unwrap();
        assert!(stopped.is_none());
        let masks = out.path().join(MASKS_DIR);
        assert_eq!(std::fs::read_dir(&masks).unwrap().count(), BATCH, "one whole batch, no temporary files");
        let first = std::fs::read(mask_path(&masks, "n_0")).unwrap();
        let report = segment_images(&seg, &images, Quality::Fast, &refine, out.path(), |_, _| true).unwrap().unwrap();
        assert_eq!(report, SegmentReport { segmented: 2, kept: BATCH, skipped: vec!["broken.png".into()] });
        assert_eq!(std::fs::read(mask_path(&masks, "n_0")).unwrap(), first, "kept, not made again");

        std::fs::write(mask_path(&masks, "n_1"), b"half a png").unwrap();
        let results = write_results(&seg, &images, out.path(), Quality::Fast, &refine, |_, _| true).unwrap().unwrap();
        assert_eq!(results.masks, 6);
        let remade = read_mask(&mask_path(&masks, "n_1")).unwrap();
        assert_eq!((remade.width, remade.height), (104, 64));
        let table = std::fs::read_to_string(out.path().join(FRACTIONS_FILE)).unwrap();
        assert_eq!(table.lines().count(), 7, "a header and one row per mask: {table}");
        assert!(table.lines().nth(2).unwrap().starts_with("masks/n_1.png,n 1.png,"), "{table}");
        assert!((results.shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let gallery: gallery::Gallery = serde_json::from_slice(&std::fs::read(out.path().join(gallery::INDEX_FILE)).unwrap()).unwrap();
        let crops: usize = gallery.classes.iter().map(|c| c.crops.len()).sum();
        assert_eq!(crops, results.gallery_crops);
        for c in gallery.classes.iter().flat_map(|c| &c.crops) {
            assert!(out.path().join(gallery::CROPS_DIR).join(&c.file).is_file(), "{}", c.file);
        }
    }

    #[test]
    fn only_mask_files_are_masks() {
        assert_eq!(row_mask("masks/frame_01.png,frame 01.jpg,0.5"), Some("masks/frame_01.png"));
        for bad in ["masks/../x.png,a", "masks/.x.png,a", "x/a.png,a", "masks/a/b.png,a", "masks/.png,a", "masks/a.jpg,a"] {
            assert_eq!(row_mask(bad), None, "{bad}");
        }
    }

    #[test]
    fn keys_are_safe_and_unique() {
        let h = |c: char| std::iter::repeat_n(c, 64).collect::<String>();
        let keys = keys_for(&[
            ("frame 01.jpg".into(), h('a')),
            ("frame 01.png".into(), h('b')),
            ("../../etc/passwd".into(), h('c')),
            (".hidden.jpg".into(), h('d')),
            ("frame_01.jpg".into(), h('e')),
            ("ünï.jpg".into(), h('f')),
        ]);
        assert_eq!(keys, ["frame_01", "frame_01-bbbbbbbb", "passwd", "image.hidden", "frame_01-eeeeeeee", "_n_"]);
        // Names that collide whatever their hashes say still get keys of their own.
        let same: Vec<(String, String)> = (0..4).map(|_| ("a.jpg".to_string(), "ü".to_string())).collect();
        assert_eq!(keys_for(&same), ["a", "a-1", "a-2", "a-3"]);
    }
}
