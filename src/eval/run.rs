//! `picie eval` as a library function: the scoring of [`super::evaluate`] over models,
//! qualities and k-means seeds, printed as tables, with the seeds' means.

use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;

use super::{evaluate, paired_files, table, Clusters, EvalReport, OverCluster, IGNORE_LABEL};
use crate::infer::{CrfConfig, DeviceChoice, GuidedConfig, Quality, Refinement};
use crate::package::Package;
use crate::train::merge::MergeBy;

/// `picie eval`'s settings.
#[derive(clap::Args, Clone, Debug)]
pub struct EvalArgs {
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    /// Also score this package (e.g. the untrained default) in the same run.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    #[arg(long)]
    pub images: PathBuf,
    #[arg(long)]
    pub labels: PathBuf,
    /// Images whose features the fresh k-means runs on (default: the package's own centroids).
    #[arg(long)]
    pub cluster_images: Option<PathBuf>,
    /// Clusters of the fresh k-means (default: the number of label classes, the PiCIE protocol);
    /// the Hungarian matching leaves the surplus clusters or classes unmatched.
    #[arg(long)]
    pub cluster_k: Option<usize>,
    /// Over-cluster: the fresh k-means runs with this many clusters, which are then merged down
    /// to the K above (with --cluster-images). Default: as each package's own classes were
    /// made (merged from as many over-clusters, or plain k-means); 0: plain k-means.
    #[arg(long, requires = "cluster_images")]
    pub over_cluster: Option<usize>,
    /// How an --over-cluster is merged: by the centroids' similarity (as packages are made), by
    /// Ward's criterion, or by how often the clusters' pixels touch in the cluster images.
    #[arg(long, value_enum, default_value = "similarity", requires = "over_cluster")]
    pub merge: MergeBy,
    /// Number of label classes (default: the largest label + 1, 255 ignored).
    #[arg(long)]
    pub classes: Option<usize>,
    /// Names of the label classes, comma-separated, for the per-class table.
    #[arg(long)]
    pub class_names: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Repeat the fresh k-means with this many seeds (seed, seed+1, ...) and report the mean:
    /// a single k-means run moves the scores by a few points.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Write the reports as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Name the model's own clusters after the label classes they match (Hungarian), with
    /// --class-names, and save the names in the package. Needs no --cluster-images.
    #[arg(long)]
    pub write_names: bool,
    /// Record the model's scores in its manifest as `<PREFIX>_pixel_acc` and `<PREFIX>_miou`
    /// (those of the last quality listed).
    #[arg(long)]
    pub record_metrics: Option<String>,
    /// Qualities to score, comma-separated (fast, flip, edges, crf, best: as `/segment?quality=`);
    /// each is a row. Default: edges, the server's default.
    #[arg(long, value_delimiter = ',', default_value = "edges")]
    pub quality: Vec<Quality>,
    /// Dense CRF settings, key=value pairs over the defaults (e.g. "iterations=5,appearance_srgb=13").
    #[arg(long, default_value = "")]
    pub crf: CrfConfig,
    /// Guided-filter settings (quality `edges`), key=value pairs over the defaults (e.g. "radius=4,eps=0.01").
    #[arg(long, default_value = "")]
    pub guided: GuidedConfig,
}

/// A result row's name: the model, the quality and, for fresh clusters merged from an
/// over-clustering, how they were merged. The merge is named only where every seed's fit made
/// one (`merged_from`): a fit with too few features per over-cluster falls back to k-means at K.
fn row_label(name: &str, quality: Quality, over: Option<OverCluster>, merged_from: &[Option<usize>]) -> String {
    match over {
        Some(o) if merged_from.iter().all(|&m| m == Some(o.k)) => {
            format!("{name} [{quality}, {} by {}]", o.k, o.merge.to_possible_value().expect("a named value").get_name())
        }
        Some(_) => format!("{name} [{quality}, k-means at K: too few features to merge]"),
        None => format!("{name} [{quality}]"),
    }
}

/// `picie eval`: scores the model (and the baseline) and prints the tables; writes JSON, metrics
/// and class names where asked.
pub fn run(e: &EvalArgs) -> Result<()> {
    let pairs = paired_files(&e.images, &e.labels)?;
    let classes = match e.classes {
        Some(c) => c,
        None => {
            let mut max = 0u8;
            for (_, l) in &pairs {
                for p in image::open(l)?.to_luma8().pixels() {
                    if p[0] != IGNORE_LABEL {
                        max = max.max(p[0]);
                    }
                }
            }
            max as usize + 1
        }
    };
    let cluster_paths = match &e.cluster_images {
        Some(d) => Some(crate::train::cluster::list_images(d)?),
        None => None,
    };
    let seeds = if cluster_paths.is_some() { e.seeds.max(1) } else { 1 };
    let mut reports = vec![];
    let mut means = vec![];
    let seed_list: Vec<u64> = (0..seeds).map(|s| e.seed + s).collect();
    let refine = Refinement { crf: e.crf, guided: e.guided };
    let models: Vec<&PathBuf> = e.baseline.iter().chain(std::iter::once(&e.model)).collect();
    let mut progress = crate::progress::Reporter::new("eval");
    for (m, model) in models.iter().copied().enumerate() {
        let name = model.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_string();
        let over = match e.over_cluster {
            Some(0) => None,
            Some(k) => Some(OverCluster { k, merge: e.merge }),
            None => Package::load(model)?.centroids.over_clusters().map(|k| OverCluster { k, merge: MergeBy::Similarity }),
        };
        let clusters = match &cluster_paths {
            Some(p) => Clusters::Fresh { images: p, seeds: &seed_list, k: e.cluster_k, over },
            None => Clusters::Package,
        };
        let started = std::time::Instant::now();
        let share = |f: f64| (m as f64 + f) / models.len() as f64;
        let runs = evaluate(model, &pairs, classes, clusters, DeviceChoice::Auto, &e.quality, &refine, &mut |f, what| {
            progress.update(share(f), what)
        })?;
        progress.milestone(&format!("scored {name} in {:.0} s", started.elapsed().as_secs_f64()));
        for quality in &e.quality {
            let mut these: Vec<_> = runs.iter().filter(|r| r.quality == *quality).cloned().collect();
            let merged_from: Vec<Option<usize>> = these.iter().map(|r| r.merged_from).collect();
            let label = row_label(&name, *quality, over.filter(|_| cluster_paths.is_some()), &merged_from);
            these.iter_mut().for_each(|r| r.model = label.clone());
            let n = these.len() as f64;
            let mean = |f: fn(&EvalReport) -> f64| these.iter().map(f).sum::<f64>() / n;
            means.push((label, mean(|r| r.pixel_accuracy), mean(|r| r.miou), mean(|r| r.boundary_f)));
            reports.extend(these);
        }
    }
    progress.finish();
    let names: Vec<String> = match &e.class_names {
        Some(n) => n.split(',').map(|s| s.trim().to_string()).collect(),
        None => (0..classes).map(|c| format!("class {c}")).collect(),
    };
    println!(
        "{} images, {} classes, {}",
        pairs.len(),
        classes,
        if e.cluster_images.is_some() { "fresh k-means per model" } else { "package centroids" }
    );
    print!("{}", table(&reports, &names));
    if seeds > 1 {
        println!("\nmean over {seeds} k-means seeds");
        println!("{:<28} {:>10} {:>8} {:>10}", "model", "pixel acc", "mIoU", "boundary F");
        for (model, acc, miou, boundary) in &means {
            println!("{model:<28} {:>10.2} {:>8.2} {:>10.2}", 100.0 * acc, 100.0 * miou, 100.0 * boundary);
        }
    }
    if let Some(j) = &e.json {
        std::fs::write(j, serde_json::to_vec_pretty(&reports)?)?;
    }
    if let Some(prefix) = &e.record_metrics {
        let report = reports.last().expect("the model's report");
        let mut pkg = crate::package::Package::load(&e.model)?;
        pkg.record_metrics([
            (format!("{prefix}_pixel_acc"), (10_000.0 * report.pixel_accuracy).round() / 100.0),
            (format!("{prefix}_miou"), (10_000.0 * report.miou).round() / 100.0),
        ])?;
        println!("recorded the scores in {}", pkg.dir.join(crate::package::MANIFEST_FILE).display());
    }
    if e.write_names {
        anyhow::ensure!(
            e.cluster_images.is_none() && e.class_names.is_some(),
            "--write-names needs --class-names and the package's own centroids"
        );
        let report = reports.last().expect("the model's report");
        let mut pkg = crate::package::Package::load(&e.model)?;
        let mut centroids = pkg.centroids.clone();
        for (cluster, class) in report.matching.iter().enumerate() {
            if let Some(c) = class {
                centroids.classes[cluster].name = Some(names[*c].clone());
                centroids.classes[cluster].color = Some(crate::package::default_color(*c));
            }
        }
        pkg.update_centroids(centroids)?;
        println!("named the classes of {}", pkg.dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_names_the_merge_only_where_every_seed_merged() {
        let over = Some(OverCluster { k: 100, merge: MergeBy::Similarity });
        assert_eq!(row_label("m", Quality::Edges, over, &[Some(100), Some(100)]), "m [edges, 100 by similarity]");
        assert_eq!(row_label("m", Quality::Fast, over, &[Some(100), None]), "m [fast, k-means at K: too few features to merge]");
        assert_eq!(row_label("m", Quality::Fast, None, &[None]), "m [fast]");
    }
}
