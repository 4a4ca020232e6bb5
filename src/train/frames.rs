//! The training set as the training loop sees it: fixed-size frames, decoded when a batch
//! needs them.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::augment::{training_frame, Photometric};
use crate::infer::preprocess::Normalize;

/// Training frames: `width` x `height` centre crops in [0, 1] of the readable images. Only
/// the paths are held; each frame is decoded and cropped again when a batch needs it, so
/// memory holds a batch of frames, not the dataset (a 320x320 frame is 1.2 MB as f32).
pub struct Frames {
    pub width: usize,
    pub height: usize,
    paths: Vec<PathBuf>,
    pub skipped: Vec<String>,
    /// How each view is normalised before the network ([`Frames::view`]).
    pub normalize: Normalize,
}

impl Frames {
    /// Finds the readable images: each is decoded once here and dropped, so a file that
    /// cannot be decoded is skipped (and named) before training starts.
    pub fn load(paths: &[PathBuf], (width, height): (usize, usize)) -> Self {
        let mut readable = vec![];
        let mut skipped = vec![];
        for p in paths {
            match crate::infer::preprocess::decode_file(p) {
                Ok(_) => readable.push(p.clone()),
                Err(e) => {
                    tracing::warn!(file = %p.display(), error = %e, "skipping unreadable image");
                    skipped.push(p.display().to_string());
                }
            }
        }
        Self { width, height, paths: readable, skipped, normalize: Normalize::None }
    }

    /// The same frames, their views normalised as the package's input policy says.
    pub fn normalized(self, normalize: Normalize) -> Self {
        Self { normalize, ..self }
    }

    /// What the network sees of a frame: the photometric view `p` of it, then normalised as
    /// the frames are.
    pub fn view(&self, mut frame: Vec<f32>, p: &Photometric) -> Vec<f32> {
        p.apply(&mut frame, self.width, self.height);
        self.normalize.apply(&mut frame);
        frame
    }

    /// Readable images.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The readable images, in order: frame `i` comes from `paths()[i]`.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Frame `i`, decoded now: 3 x height x width planes in [0, 1].
    pub fn frame(&self, i: usize) -> Result<Vec<f32>> {
        let p = &self.paths[i];
        let img = crate::infer::preprocess::decode_file(p)
            .with_context(|| format!("{}: the training image cannot be read any more", p.display()))?;
        Ok(training_frame(&img, self.width as u32, self.height as u32))
    }

    /// The frames of a batch, decoded in parallel.
    pub(crate) fn batch(&self, idx: &[usize]) -> Result<Vec<Vec<f32>>> {
        use rayon::prelude::*;
        idx.par_iter().map(|&i| self.frame(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn frames_are_read_from_disk_when_a_batch_needs_them() {
        let dir = tempfile::tempdir().unwrap();
        let photo = |seed: u8| image::RgbImage::from_fn(120, 90, |x, y| image::Rgb([x as u8 ^ seed, y as u8, seed]));
        let paths: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("{i}.png"))).collect();
        photo(1).save(&paths[0]).unwrap();
        std::fs::write(&paths[1], b"not an image").unwrap();
        photo(2).save(&paths[2]).unwrap();
        let frames = Frames::load(&paths, (64, 32));
        // The unreadable file is found up front; the rest are only named.
        assert_eq!(frames.skipped, vec![paths[1].display().to_string()]);
        assert_eq!(frames.paths(), [paths[0].clone(), paths[2].clone()]);
        // Each frame is the same crop the images were held as before, bit for bit.
        let eager = |p: &Path| training_frame(&crate::infer::preprocess::decode_file(p).unwrap(), 64, 32);
        assert_eq!(frames.frame(0).unwrap(), eager(&paths[0]));
        assert_eq!(frames.batch(&[1, 0]).unwrap(), vec![eager(&paths[2]), eager(&paths[0])]);
        // Nothing decoded is held: a file changed on disk is what the next batch sees, and a
        // file gone since is an error naming it, not a stale frame.
        photo(3).save(&paths[0]).unwrap();
        assert_eq!(frames.frame(0).unwrap(), eager(&paths[0]));
        assert_ne!(frames.frame(0).unwrap(), training_frame(&photo(1), 64, 32));
        std::fs::remove_file(&paths[2]).unwrap();
        let e = format!("{:#}", frames.frame(1).unwrap_err());
        assert!(e.contains("2.png"), "{e}");
    }
}
