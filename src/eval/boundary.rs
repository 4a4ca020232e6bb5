//! The boundary F-score: how well a mask's edges follow the label edges, which pixel accuracy
//! and mIoU barely see (a refinement that moves every boundary by two pixels changes them by a
//! fraction of a point). As in the BSDS and DAVIS boundary measures, a predicted boundary pixel
//! is right when a label boundary lies within `tolerance` pixels of it (precision), and a label
//! boundary pixel is found when a predicted one lies within `tolerance` of it (recall).
//!
//! It is class-agnostic, so it needs no matching of clusters to classes: a boundary is where
//! the label changes between 4-neighbours. Void (ignored) pixels have no boundaries of their
//! own, and predicted boundaries within `tolerance` of a void pixel are left out of precision,
//! since the labels say nothing about where the edge lies there.

/// Boundary pixels matched and counted, summed over images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BoundaryCounts {
    /// Predicted boundary pixels within the tolerance of a label boundary.
    pub predicted_matched: u64,
    /// Predicted boundary pixels that count (not near void).
    pub predicted: u64,
    /// Label boundary pixels within the tolerance of a predicted boundary.
    pub labelled_matched: u64,
    pub labelled: u64,
}

impl BoundaryCounts {
    pub fn add(&mut self, other: BoundaryCounts) {
        self.predicted_matched += other.predicted_matched;
        self.predicted += other.predicted;
        self.labelled_matched += other.labelled_matched;
        self.labelled += other.labelled;
    }

    pub fn precision(&self) -> f64 {
        ratio(self.predicted_matched, self.predicted)
    }

    pub fn recall(&self) -> f64 {
        ratio(self.labelled_matched, self.labelled)
    }

    /// The harmonic mean of precision and recall (0 when both are 0).
    pub fn f_score(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The default tolerance at CamVid's 480 x 360: 3 pixels, about 0.5 % of the image diagonal
/// (DAVIS uses 0.8 %; a tighter one keeps the CRF's few-pixel gains visible).
pub const DEFAULT_TOLERANCE: usize = 3;

/// Compares the boundaries of `predicted` with those of `labels` (row-major, `w` x `h`);
/// pixels labelled `ignore` are void.
pub fn boundary_counts(predicted: &[u8], labels: &[u8], w: usize, h: usize, ignore: u8, tolerance: usize) -> BoundaryCounts {
    assert_eq!(predicted.len(), w * h);
    assert_eq!(labels.len(), w * h);
    let pred_edges = edges(predicted, w, h, None);
    let label_edges = edges(labels, w, h, Some(ignore));
    let void: Vec<bool> = labels.iter().map(|&l| l == ignore).collect();
    let near_label = dilate(&label_edges, w, h, tolerance);
    let near_pred = dilate(&pred_edges, w, h, tolerance);
    let near_void = dilate(&void, w, h, tolerance);
    let mut c = BoundaryCounts::default();
    for i in 0..w * h {
        if pred_edges[i] && !near_void[i] {
            c.predicted += 1;
            c.predicted_matched += near_label[i] as u64;
        }
        if label_edges[i] {
            c.labelled += 1;
            c.labelled_matched += near_pred[i] as u64;
        }
    }
    c
}

/// Pixels whose label differs from their right or lower neighbour's (both marked), skipping
/// pairs where either side is `ignore`.
fn edges(labels: &[u8], w: usize, h: usize, ignore: Option<u8>) -> Vec<bool> {
    let mut out = vec![false; w * h];
    let counts = |l: u8| Some(l) != ignore;
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let a = labels[i];
            if !counts(a) {
                continue;
            }
            for j in [(x + 1 < w).then_some(i + 1), (y + 1 < h).then_some(i + w)].into_iter().flatten() {
                let b = labels[j];
                if counts(b) && a != b {
                    out[i] = true;
                    out[j] = true;
                }
            }
        }
    }
    out
}

/// Marks every pixel within `r` (Chebyshev distance) of a marked one: a separable running
/// maximum, rows then columns, linear in the image whatever `r` is.
fn dilate(mask: &[bool], w: usize, h: usize, r: usize) -> Vec<bool> {
    let rows = running_any(mask, w, h, 1, w, r);
    running_any(&rows, h, w, w, 1, r)
}

/// For each of `lines` lines of `len` pixels (`step` apart along a line, `stride` between
/// lines), whether any pixel within `r` along the line is set.
fn running_any(src: &[bool], len: usize, lines: usize, step: usize, stride: usize, r: usize) -> Vec<bool> {
    let mut out = vec![false; src.len()];
    for line in 0..lines {
        let at = |i: usize| line * stride + i * step;
        // Distance to the last set pixel seen, from each direction.
        let mut since = usize::MAX;
        for i in 0..len {
            since = if src[at(i)] { 0 } else { since.saturating_add(1) };
            out[at(i)] = since <= r;
        }
        since = usize::MAX;
        for i in (0..len).rev() {
            since = if src[at(i)] { 0 } else { since.saturating_add(1) };
            out[at(i)] |= since <= r;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A w x h map split into class 0 left of column `split` and class 1 from it on.
    fn halves(w: usize, h: usize, split: usize) -> Vec<u8> {
        (0..w * h).map(|i| (i % w >= split) as u8).collect()
    }

    #[test]
    fn a_boundary_within_the_tolerance_counts_and_one_beyond_does_not() {
        let (w, h) = (20, 10);
        let labels = halves(w, h, 10);
        let exact = boundary_counts(&labels, &labels, w, h, 255, 2);
        assert_eq!(exact.f_score(), 1.0);
        assert_eq!(exact.labelled, 2 * h as u64, "both sides of the edge are boundary pixels");
        let near = boundary_counts(&halves(w, h, 12), &labels, w, h, 255, 2);
        assert_eq!(near.f_score(), 1.0, "two columns off is within a tolerance of 2 ({near:?})");
        let far = boundary_counts(&halves(w, h, 14), &labels, w, h, 255, 2);
        assert_eq!((far.predicted_matched, far.labelled_matched), (0, 0), "{far:?}");
        assert_eq!(far.f_score(), 0.0);
        // One column beyond the tolerance on one side of the edge, within it on the other.
        let edge = boundary_counts(&halves(w, h, 13), &labels, w, h, 255, 2);
        assert_eq!((edge.precision(), edge.recall()), (0.5, 0.5), "{edge:?}");
    }

    #[test]
    fn a_flat_prediction_finds_nothing_and_extra_edges_cost_precision() {
        let (w, h) = (16, 8);
        let labels = halves(w, h, 8);
        let flat = boundary_counts(&vec![3; w * h], &labels, w, h, 255, 1);
        assert_eq!((flat.predicted, flat.recall(), flat.f_score()), (0, 0.0, 0.0));
        // The right edge plus a spurious one far from any label edge.
        let extra: Vec<u8> = (0..w * h)
            .map(|i| {
                if i % w >= 8 {
                    1
                } else if i % w >= 2 {
                    0
                } else {
                    2
                }
            })
            .collect();
        let c = boundary_counts(&extra, &labels, w, h, 255, 1);
        assert_eq!(c.recall(), 1.0);
        assert_eq!(c.precision(), 0.5, "{c:?}");
    }

    #[test]
    fn void_pixels_have_no_boundaries_and_hide_predicted_ones_near_them() {
        let (w, h) = (20, 6);
        // Class 0, then a void band in columns 8..12, then class 1: no label boundary at all.
        let labels: Vec<u8> = (0..w * h)
            .map(|i| match i % w {
                x if x < 8 => 0,
                x if x < 12 => 255,
                _ => 1,
            })
            .collect();
        let pred = halves(w, h, 10);
        let c = boundary_counts(&pred, &labels, w, h, 255, 1);
        assert_eq!((c.labelled, c.predicted), (0, 0), "{c:?}");
    }
}
