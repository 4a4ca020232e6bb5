//! Training speed, side by side in one run: one PiCIE step (two views, forward + backward +
//! Adam) per image at 320x320 on burn's Flex CPU backend, and spherical k-means over
//! 1M x 128 unit vectors (K = 27, k-means++ then 20 Lloyd iterations).
//!
//!     cargo bench --bench train            (needs scripts/setup.sh --no-build first)

use std::time::Instant;

use picie::model::{BackboneKind, EmbedderConfig, TensorMap};
use picie::train::kmeans::{KMeansConfig, SphericalKMeans};
use picie::train::picie::{Frames, TrainConfig, Trainer};
use rand::{Rng, SeedableRng};

fn main() -> anyhow::Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let batch: usize = std::env::var("BENCH_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let size: usize = std::env::var("BENCH_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(320);
    let dir = tempfile::tempdir()?;
    let st = dir.path().join("lite0.safetensors");
    picie::commands::import_weights(BackboneKind::EfficientnetLite0, &root.join(".weights/efficientnet-lite0.pth"), &st)?;
    let backbone = TensorMap::load_safetensors(&st)?;
    let config = EmbedderConfig::new(BackboneKind::EfficientnetLite0);
    let init = picie::model::Embedder::from_backbone(config, &backbone.sub("backbone"), 0, &burn::tensor::Device::flex())?;

    // Two steps on `batch` copies of the shipped photos (one epoch = clustering, labelling and
    // training passes).
    let photos: Vec<_> = picie::train::cluster::list_images(&root.join("fixtures/images"))?;
    let paths: Vec<_> = photos.iter().cycle().take(batch * 2).cloned().collect();
    let frames = Frames::load(&paths, (size, size));
    let cfg = TrainConfig { k: 4, k2: 8, epochs: 1, size, batch, init_batches: 1, vectors_per_image: 500, ..TrainConfig::default() };
    let mut trainer = Trainer::new(cfg, config, &init.to_tensor_map("bench"))?;
    let mut train_times = vec![];
    let mut cluster_time = 0.0;
    let mut label_time = 0.0;
    let mut last = Instant::now();
    let t0 = Instant::now();
    trainer.run(&frames, &dir.path().join("ckpt"), &mut |p| {
        let now = Instant::now();
        match p.phase {
            "train" => train_times.push((now - last).as_secs_f64()),
            "label" => label_time += (now - last).as_secs_f64(),
            _ => cluster_time += (now - last).as_secs_f64(),
        }
        last = now;
        true
    })?;
    let total = t0.elapsed().as_secs_f64();
    let step = train_times.iter().cloned().fold(f64::INFINITY, f64::min);

    // k-means over 1M x 128.
    let n = 1_000_000;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut data: Vec<f32> = (0..n * 128).map(|_| rng.random_range(-1.0..1.0)).collect();
    data.chunks_mut(128).for_each(picie::train::kmeans::normalize);
    let t = Instant::now();
    SphericalKMeans::fit(&data, 128, KMeansConfig::new(27, 0))?;
    let km = t.elapsed().as_secs_f64();

    println!("PiCIE training on burn Flex (CPU, {} threads), {size}x{size}, batch {batch}", rayon::current_num_threads());
    println!("{:<52} {:>12}", "", "seconds");
    println!("{:<52} {:>12.2}", "train step (2 views, fwd + bwd + Adam), per batch", step);
    println!("{:<52} {:>12.2}", "train step, per image", step / batch as f64);
    println!("{:<52} {:>12.2}", "clustering pass (2 views, no grad), per image", cluster_time / (2 * batch) as f64);
    println!("{:<52} {:>12.2}", "labelling pass (2 views, no grad), per image", label_time / (2 * batch) as f64);
    println!("{:<52} {:>12.2}", "whole epoch incl. checkpoint, per image", total / (2 * batch) as f64);
    println!("{:<52} {:>12.2}", "spherical k-means 1M x 128, K=27, ++ + 20 iters", km);
    println!("reference (steering, PyTorch 2 threads, 288x384 batch 8): 0.66 s/image per step; faiss 20 iters: 7.1 s");
    Ok(())
}
