//! Re-clustering throughput: images per second of clustering 1,000 images (320x240 JPEGs cut
//! from the shipped photos) with the shipped model's embedder and input policy, K = 11, the
//! way a recluster job does it (a seeded sample of at most 500,000 pixel features drawn while
//! embedding, then spherical k-means at `DEFAULT_OVER_CLUSTER` merged to 11), once per embedding
//! plan, side by side in one run: one image per ONNX Runtime call decoded in turn (before),
//! batches, a decoding thread, both. Then the clustering alone on one sample: merged that way
//! against plain k-means at 11.
//!
//!     cargo bench --bench recluster        (needs scripts/setup.sh --no-build first)
//!
//! BENCH_IMAGES (1000), BENCH_THREADS (ONNX Runtime threads; default the server's
//! --job-threads default, half the cores) and BENCH_PLANS ("1 4 1p 4p 8p": batch size, `p` =
//! decoding thread) change the run.

use std::time::Instant;

use picie::infer::{DeviceChoice, EmbedSession};
use picie::package::Package;
use picie::train::cluster::{cluster_images_with, ClassFit, EmbedPlan, MAX_CLUSTER_VECTORS};
use rand::{Rng, SeedableRng};

fn main() -> anyhow::Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let n: usize = std::env::var("BENCH_IMAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let threads: usize =
        std::env::var("BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or_else(picie::server::config::default_job_threads);
    let plans: Vec<EmbedPlan> = std::env::var("BENCH_PLANS")
        .unwrap_or_else(|_| "1 4 1p 4p 8p".into())
        .split_whitespace()
        .filter_map(|p| Some(EmbedPlan { batch: p.trim_end_matches('p').parse().ok()?, prefetch: p.ends_with('p') }))
        .collect();

    // 320x240 crops of the shipped photos at random places and scales, as JPEGs.
    let photos: Vec<image::RgbImage> = picie::train::cluster::list_images(&root.join("fixtures/images"))?
        .iter()
        .map(|p| picie::infer::preprocess::decode_file(p))
        .collect::<anyhow::Result<_>>()?;
    let dir = tempfile::tempdir()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let t = Instant::now();
    let paths: Vec<std::path::PathBuf> = (0..n)
        .map(|i| {
            let photo = &photos[i % photos.len()];
            let (pw, ph) = photo.dimensions();
            let scale = rng.random_range(0.4..1.0f64).min(pw as f64 / 320.0).min(ph as f64 / 240.0);
            let (cw, ch) = (((320.0 * scale) as u32).max(32), ((240.0 * scale) as u32).max(24));
            let (x, y) = (rng.random_range(0..=pw - cw), rng.random_range(0..=ph - ch));
            let crop = image::imageops::crop_imm(photo, x, y, cw, ch).to_image();
            let img = image::imageops::resize(&crop, 320, 240, image::imageops::FilterType::Triangle);
            let p = dir.path().join(format!("{i:05}.jpg"));
            img.save(&p).map(|_| p)
        })
        .collect::<Result<_, _>>()?;
    let made = t.elapsed().as_secs_f64();

    let package = Package::load(&root.join("models/default"))?;
    let session = EmbedSession::load(&package.onnx_path(), DeviceChoice::Cpu, Some(threads))?;
    let policy = package.manifest.input;
    let config = ClassFit::new(11, 0);
    println!("re-clustering {n} JPEGs of 320x240 (made in {made:.1} s), models/default (input short side {}{}), K=11, ONNX Runtime {threads} thread(s), {} cores", policy.short_side, if policy.flip { ", flip averaging" } else { "" }, std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    // What a decoding thread can take off the embedder's path: decode + resize per image.
    let t = Instant::now();
    for p in &paths {
        let img = picie::infer::preprocess::decode_file(p)?;
        let (w, h) = picie::infer::preprocess::geometry(img.width(), img.height(), &policy).resized;
        std::hint::black_box(image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle));
    }
    println!("decode + resize alone: {:.1} ms per image", t.elapsed().as_secs_f64() * 1e3 / n as f64);
    println!("{:<34} {:>10} {:>10} {:>10} {:>10} {:>13}", "plan", "seconds", "embed s", "images/s", "speed-up", "centroids");
    let mut first: Option<(f64, Vec<f32>)> = None;
    for plan in plans {
        let t = Instant::now();
        let mut embedded = 0.0;
        let (centroids, report) = cluster_images_with(&session, &policy, &paths, config, MAX_CLUSTER_VECTORS, plan, |i, n| {
            if i == n {
                embedded = t.elapsed().as_secs_f64();
            }
            true
        })?;
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(report.images_used == n, "{} of {n} images used", report.images_used);
        let m = centroids.matrix();
        let (speedup, same) = match &first {
            None => (1.0, "-".to_string()),
            Some((s0, m0)) => {
                let worst = m.iter().zip(m0).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                (s0 / secs, if worst == 0.0 { "identical".to_string() } else { format!("max diff {worst:.1e}") })
            }
        };
        let name = format!("batch {}{}", plan.batch, if plan.prefetch { ", decoding thread" } else { ", decode in turn" });
        println!("{name:<34} {secs:>10.1} {embedded:>10.1} {:>10.2} {speedup:>9.2}x {same:>13}", n as f64 / secs);
        if first.is_none() {
            first = Some((secs, m));
        }
    }

    // The clustering alone, on one sample of the features: the classes as packages make them
    // (over-clustered and merged to K) against plain k-means at K, in the same run.
    let features = picie::train::cluster::embed_sampled(&session, &policy, &paths, MAX_CLUSTER_VECTORS, 0, |_, _| true)?;
    println!("\nclustering alone, {} features of {} dimensions", features.vectors.len() / features.dim, features.dim);
    println!("{:<44} {:>10}", "fit", "seconds");
    let merged = format!("k-means at {}, merged to 11 (the default)", picie::train::cluster::DEFAULT_OVER_CLUSTER);
    for (name, fit) in [("k-means at 11", ClassFit::plain(11, 0)), (merged.as_str(), config)] {
        let t = Instant::now();
        let (centroids, _) = features.fit(fit, MAX_CLUSTER_VECTORS)?;
        anyhow::ensure!(centroids.k() == 11, "{name}: {} classes", centroids.k());
        println!("{name:<44} {:>10.2}", t.elapsed().as_secs_f64());
    }
    Ok(())
}
