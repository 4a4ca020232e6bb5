//! The PiCIE evaluation protocol (needs labels; only for measuring): fresh spherical k-means with
//! K = number of label classes on the cluster images' features (or the package's own
//! centroids), every labelled pixel assigned, a K x C confusion matrix with the ignore label
//! left out, Hungarian matching of clusters to classes (maximising matched pixels), then pixel
//! accuracy, per-class IoU and mIoU under that matching.

pub mod boundary;
pub mod run;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pathfinding::prelude::{kuhn_munkres, Matrix};
use serde::Serialize;

use crate::infer::assign::ClassScorer;
use crate::infer::{labels_at, preprocess, DeviceChoice, Quality, Refinement, Segmenter};
use crate::package::{InputPolicy, Package};
use crate::train::cluster::{embed_images, list_images, ClassFit, MAX_CLUSTER_VECTORS};
pub use crate::train::merge::OverCluster;
use boundary::BoundaryCounts;

pub const IGNORE_LABEL: u8 = 255;

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    /// Flip averaging and CRF, as `/segment?quality=` runs them.
    pub quality: Quality,
    pub k: usize,
    /// Clusters of the k-means whose clusters were merged into these K, where they were.
    pub merged_from: Option<usize>,
    pub classes: usize,
    pub pixels: u64,
    pub pixel_accuracy: f64,
    pub miou: f64,
    /// IoU per label class (NaN where a class never occurs and is never predicted).
    pub class_iou: Vec<f64>,
    /// `matching[cluster] = class` (None for clusters left unmatched when K > C).
    pub matching: Vec<Option<usize>>,
    /// K x C counts: confusion[cluster][class].
    pub confusion: Vec<Vec<u64>>,
    /// Class-agnostic boundary F-score within [`boundary::DEFAULT_TOLERANCE`] pixels ([`boundary`]).
    pub boundary_f: f64,
    pub boundary: BoundaryCounts,
}

/// Pairs of (image, label mask) by file stem.
pub fn paired_files(images: &Path, labels: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let imgs = list_images(images)?;
    let mut out = vec![];
    for i in imgs {
        let stem = i.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        let label = labels.join(format!("{stem}.png"));
        if !label.exists() {
            bail!("{}: no label mask {}", i.display(), label.display());
        }
        out.push((i, label));
    }
    if out.is_empty() {
        bail!("{}: no images", images.display());
    }
    Ok(out)
}

/// The Hungarian matching that maximises matched pixels: `matching[cluster] = class`.
pub fn hungarian(confusion: &[Vec<u64>]) -> Vec<Option<usize>> {
    let k = confusion.len();
    let c = confusion.first().map_or(0, |r| r.len());
    let n = k.max(c);
    // Square it with zero rows/columns; kuhn_munkres maximises.
    let mut weights = Matrix::new(n, n, 0i64);
    for (i, row) in confusion.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            weights[(i, j)] = v as i64;
        }
    }
    let (_, assignment) = kuhn_munkres(&weights);
    (0..k).map(|i| (assignment[i] < c).then_some(assignment[i])).collect()
}

/// Scores a confusion matrix under its Hungarian matching.
pub fn score(confusion: Vec<Vec<u64>>, model: String) -> EvalReport {
    score_at(confusion, BoundaryCounts::default(), model, Quality::Fast)
}

fn score_at(confusion: Vec<Vec<u64>>, boundary: BoundaryCounts, model: String, quality: Quality) -> EvalReport {
    let k = confusion.len();
    let c = confusion.first().map_or(0, |r| r.len());
    let matching = hungarian(&confusion);
    let total: u64 = confusion.iter().flatten().sum();
    let matched: u64 = matching.iter().enumerate().filter_map(|(i, m)| m.map(|j| confusion[i][j])).sum();
    let class_iou: Vec<f64> = (0..c)
        .map(|j| {
            let gt: u64 = (0..k).map(|i| confusion[i][j]).sum();
            let clusters: Vec<usize> = (0..k).filter(|&i| matching[i] == Some(j)).collect();
            let tp: u64 = clusters.iter().map(|&i| confusion[i][j]).sum();
            let pred: u64 = clusters.iter().map(|&i| confusion[i].iter().sum::<u64>()).sum();
            let union = gt + pred - tp;
            if union == 0 {
                f64::NAN
            } else {
                tp as f64 / union as f64
            }
        })
        .collect();
    let valid: Vec<f64> = class_iou.iter().copied().filter(|v| !v.is_nan()).collect();
    EvalReport {
        model,
        quality,
        k,
        merged_from: None,
        classes: c,
        pixels: total,
        pixel_accuracy: if total == 0 { 0.0 } else { matched as f64 / total as f64 },
        miou: if valid.is_empty() { 0.0 } else { valid.iter().sum::<f64>() / valid.len() as f64 },
        class_iou,
        matching,
        confusion,
        boundary_f: boundary.f_score(),
        boundary,
    }
}

/// How clusters are chosen for evaluation.
#[derive(Clone, Copy)]
pub enum Clusters<'a> {
    /// Fresh k-means on these images' features, once per seed, with K clusters (None: K = the
    /// number of label classes, the PiCIE protocol); with `over`, k-means at its larger K
    /// merged down to K.
    Fresh { images: &'a [PathBuf], seeds: &'a [u64], k: Option<usize>, over: Option<OverCluster> },
    /// The package's own centroids.
    Package,
}

/// The work of one scored image at each quality, in units of one embedder pass (a 480x360 frame
/// on 2 cores: the embedder about 35 ms, assignment a few, the guided filter about 20, the
/// dense CRF about 430): progress weighs the steps by it, so the time left holds when the CRF
/// rows start.
fn refinement_cost(quality: Quality) -> f64 {
    match quality {
        Quality::Fast | Quality::Flip => 0.1,
        Quality::Edges => 0.7,
        Quality::Crf | Quality::Best => 12.0,
    }
}

/// Scores a package: for each quality, one report per k-means seed (one for the package's own
/// centroids). Fresh k-means runs on features made the way that quality makes them (with or
/// without flip averaging), as the package's centroids were made. The cluster images and the
/// scored images are embedded once per flip setting and shared by all seeds and qualities.
/// `progress` hears the fraction done and what is being done.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model_dir: &Path,
    pairs: &[(PathBuf, PathBuf)],
    classes: usize,
    clusters: Clusters<'_>,
    device: DeviceChoice,
    qualities: &[Quality],
    refine: &Refinement,
    progress: &mut dyn FnMut(f64, &str),
) -> Result<Vec<EvalReport>> {
    let pkg = Package::load(model_dir)?;
    let name = pkg.manifest.name.clone();
    let seg = Segmenter::from_package(pkg.clone(), device, None)?;
    let mut reports: Vec<(usize, EvalReport)> = vec![];
    // Progress in embedder passes (see `refinement_cost`): the cluster images once per flip
    // setting, and every scored image with its refinements for each seed.
    let (seeds, cluster_images) = match clusters {
        Clusters::Fresh { images, seeds, .. } => (seeds.len(), images.len()),
        Clusters::Package => (1, 0),
    };
    let per_image =
        |flip: bool| 1.0 + qualities.iter().filter(|q| q.flip() == flip).map(|&q| seeds as f64 * refinement_cost(q)).sum::<f64>();
    let total: f64 = [false, true]
        .into_iter()
        .filter(|&flip| qualities.iter().any(|q| q.flip() == flip))
        .map(|flip| cluster_images as f64 + pairs.len() as f64 * per_image(flip))
        .sum();
    let mut done = 0.0;
    for flip in [false, true] {
        let wanted: Vec<(usize, Quality)> = qualities.iter().copied().enumerate().filter(|(_, q)| q.flip() == flip).collect();
        if wanted.is_empty() {
            continue;
        }
        let policy = InputPolicy { flip, ..pkg.manifest.input };
        // Each seed's classes, and the over-clusters they were merged from.
        let class_sets: Vec<(ClassScorer, Option<usize>)> = match clusters {
            Clusters::Package => vec![(ClassScorer::new(&pkg.centroids), pkg.centroids.over_clusters())],
            Clusters::Fresh { images, seeds, k, over } => {
                let features = embed_images(seg.session(), &policy, images, |i, n| {
                    progress((done + i as f64) / total, &format!("{name}: embedding the cluster images {i}/{n}"));
                    true
                })?;
                done += images.len() as f64;
                progress(done / total, &format!("{name}: k-means, {} seeds", seeds.len()));
                let k = k.unwrap_or(classes);
                seeds
                    .iter()
                    .map(|&seed| {
                        let fit = ClassFit { over, ..ClassFit::plain(k, seed) };
                        let (centroids, _) = features.fit(fit, MAX_CLUSTER_VECTORS)?;
                        Ok((ClassScorer::new(&centroids), centroids.over_clusters()))
                    })
                    .collect::<Result<_>>()?
            }
        };
        // confusions[quality][seed], with the boundary counts beside each
        let mut confusions: Vec<Vec<(Vec<Vec<u64>>, BoundaryCounts)>> = wanted
            .iter()
            .map(|_| class_sets.iter().map(|(set, _)| (vec![vec![0u64; classes]; set.k()], BoundaryCounts::default())).collect())
            .collect();
        for (i, (img_path, label_path)) in pairs.iter().enumerate() {
            progress(done / total, &format!("{name}: scoring {}/{}", i + 1, pairs.len()));
            done += per_image(flip);
            let img = preprocess::decode_file(img_path)?;
            let labels = image::open(label_path).with_context(|| format!("reading {}", label_path.display()))?.to_luma8();
            if (labels.width(), labels.height()) != (img.width(), img.height()) {
                bail!(
                    "{}: label size {}x{} differs from the image's {}x{}",
                    label_path.display(),
                    labels.width(),
                    labels.height(),
                    img.width(),
                    img.height()
                );
            }
            let features = seg.embed_with(std::slice::from_ref(&img), flip)?.remove(0);
            // Each seed's class scores once, shared by the qualities.
            for (seed, (set, _)) in class_sets.iter().enumerate() {
                let scores = set.scores(&features.data, features.dim, features.width * features.height);
                for ((_, quality), per_seed) in wanted.iter().zip(&mut confusions) {
                    let (confusion, edges) = &mut per_seed[seed];
                    let mask = labels_at(&features, &scores, set.k(), &img, *quality, refine);
                    let (w, h) = (labels.width() as usize, labels.height() as usize);
                    edges.add(boundary::boundary_counts(&mask.labels, labels.as_raw(), w, h, IGNORE_LABEL, boundary::DEFAULT_TOLERANCE));
                    for (&p, l) in mask.labels.iter().zip(labels.pixels()) {
                        let l = l[0];
                        if l == IGNORE_LABEL {
                            continue;
                        }
                        if l as usize >= classes {
                            bail!("{}: label {l} is not below the class count {classes}", label_path.display());
                        }
                        confusion[p as usize][l as usize] += 1;
                    }
                }
            }
        }
        for ((order, quality), per_seed) in wanted.into_iter().zip(confusions) {
            reports.extend(per_seed.into_iter().zip(&class_sets).map(|((c, b), (_, merged_from))| {
                (order, EvalReport { merged_from: *merged_from, ..score_at(c, b, name.clone(), quality) })
            }));
        }
    }
    progress(1.0, &format!("{name}: scored"));
    // In the order the qualities were asked for, seeds in order within each.
    reports.sort_by_key(|(order, _)| *order);
    Ok(reports.into_iter().map(|(_, r)| r).collect())
}

/// A table of reports side by side, then per-class IoU.
pub fn table(reports: &[EvalReport], class_names: &[String]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{:<28} {:>4} {:>10} {:>8} {:>10}", "model", "K", "pixel acc", "mIoU", "boundary F");
    for r in reports {
        let _ = writeln!(
            out,
            "{:<28} {:>4} {:>10.2} {:>8.2} {:>10.2}",
            r.model,
            r.k,
            100.0 * r.pixel_accuracy,
            100.0 * r.miou,
            100.0 * r.boundary_f
        );
    }
    let _ = writeln!(out, "\nIoU per class (%)");
    let _ = write!(out, "{:<14}", "class");
    for r in reports {
        let _ = write!(out, " {:>14}", r.model.chars().take(14).collect::<String>());
    }
    out.push('\n');
    for (j, name) in class_names.iter().enumerate() {
        let _ = write!(out, "{name:<14}");
        for r in reports {
            let _ = write!(out, " {:>14.1}", 100.0 * r.class_iou.get(j).copied().unwrap_or(f64::NAN));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hungarian_finds_the_best_matching() {
        // Cluster 0 is mostly class 1, cluster 1 mostly class 0, cluster 2 small.
        let conf = vec![vec![1, 10, 0], vec![8, 2, 0], vec![0, 1, 3]];
        assert_eq!(hungarian(&conf), vec![Some(1), Some(0), Some(2)]);
        let r = score(conf, "t".into());
        assert_eq!(r.pixels, 25);
        assert!((r.pixel_accuracy - 21.0 / 25.0).abs() < 1e-12);
        // Class 0: tp 8, gt 9, predicted 10 -> 8 / 11.
        assert!((r.class_iou[0] - 8.0 / 11.0).abs() < 1e-12);
        assert!((r.class_iou[2] - 3.0 / 4.0).abs() < 1e-12);
    }

    #[test]
    fn more_clusters_than_classes_leaves_some_unmatched() {
        let conf = vec![vec![5, 0], vec![0, 5], vec![3, 1]];
        let m = hungarian(&conf);
        assert_eq!(m.iter().filter(|x| x.is_none()).count(), 1);
        assert_eq!((m[0], m[1]), (Some(0), Some(1)));
        let r = score(conf, "t".into());
        assert!((r.pixel_accuracy - 10.0 / 14.0).abs() < 1e-12);
    }

    #[test]
    fn absent_classes_are_left_out_of_the_mean() {
        let conf = vec![vec![4, 0], vec![0, 0]];
        let r = score(conf, "t".into());
        assert!(r.class_iou[1].is_nan());
        assert!((r.miou - 1.0).abs() < 1e-12);
    }
}
