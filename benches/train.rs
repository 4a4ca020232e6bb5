//! Training speed, side by side in one run: one PiCIE step (two views, forward + backward +
//! Adam) per image at 320x320, batch 8, on burn's Flex CPU backend, with the backbone frozen
//! through stride 16 (the default recipe) and with every layer trainable; PyTorch's step on
//! the same network (`benches/torch_step.py`) when BENCH_TORCH=1; and spherical k-means over
//! 1M x 128 unit vectors (K = 27, k-means++ then 20 Lloyd iterations).
//!
//!     cargo bench --bench train                   (needs scripts/setup.sh --no-build first)
//!     BENCH_TORCH=1 cargo bench --bench train     (also PyTorch, from target/torch-venv: made
//!                                                  with `pip install torch` from PyPI when missing)
//!
//! BENCH_BATCH, BENCH_SIZE and BENCH_FREEZE ("16 0") change the settings; BENCH_KMEANS=0 skips k-means.

use std::path::Path;
use std::time::Instant;

use picie::model::{BackboneKind, EmbedderConfig, TensorMap};
use picie::train::kmeans::{KMeansConfig, SphericalKMeans};
use picie::train::picie::{Frames, TrainConfig, Trainer};
use rand::{Rng, SeedableRng};

/// PyTorch 2.15, 2 threads, on this project's 2-core machine type, 288x384 batch 8, all layers
/// trainable (../shared/docs/picie-recipe.md, "Speed anchors").
const TORCH_REFERENCE: &str = "0.42 s/image (PyTorch 2.15, 2 threads, 288x384 batch 8, all layers; ../shared/docs/picie-recipe.md)";

struct Timing {
    step: f64,
    cluster: f64,
    label: f64,
    total: f64,
}

/// One epoch on 2 x `batch` frames (clustering, labelling and two training steps); the
/// fastest training step counts.
fn measure(config: EmbedderConfig, init: &TensorMap, frames: &Frames, size: usize, batch: usize, freeze_stride: usize, dir: &Path) -> anyhow::Result<Timing> {
    let cfg = TrainConfig { k: 4, k2: 8, epochs: 1, size, batch, init_batches: 1, vectors_per_image: 500, freeze_stride, ..TrainConfig::default() };
    let mut trainer = Trainer::new(cfg, config, init)?;
    let mut train_times = vec![];
    let (mut cluster, mut label) = (0.0, 0.0);
    let mut last = Instant::now();
    let t0 = Instant::now();
    trainer.run(frames, &dir.join(format!("ckpt-{freeze_stride}")), &mut |p| {
        let now = Instant::now();
        match p.phase {
            "train" => train_times.push((now - last).as_secs_f64()),
            "label" => label += (now - last).as_secs_f64(),
            _ => cluster += (now - last).as_secs_f64(),
        }
        last = now;
        true
    })?;
    let step = train_times.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok(Timing { step, cluster, label, total: t0.elapsed().as_secs_f64() })
}

fn main() -> anyhow::Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let batch = env("BENCH_BATCH", 8);
    let size = env("BENCH_SIZE", 320);
    let freezes: Vec<usize> = std::env::var("BENCH_FREEZE").unwrap_or_else(|_| "16 0".into()).split_whitespace().filter_map(|v| v.parse().ok()).collect();
    let dir = tempfile::tempdir()?;
    let pth = root.join(".weights/efficientnet-lite0.pth");
    let st = dir.path().join("lite0.safetensors");
    picie::commands::import_weights(BackboneKind::EfficientnetLite0, &pth, &st)?;
    let backbone = TensorMap::load_safetensors(&st)?;
    let config = EmbedderConfig::new(BackboneKind::EfficientnetLite0);
    let init = picie::model::Embedder::from_backbone(config, &backbone.sub("backbone"), 0, &burn::tensor::Device::flex())?.to_tensor_map("bench");

    // Two steps on `batch` copies of the shipped photos (one epoch = clustering, labelling and
    // training passes).
    let photos: Vec<_> = picie::train::cluster::list_images(&root.join("fixtures/images"))?;
    let paths: Vec<_> = photos.iter().cycle().take(batch * 2).cloned().collect();
    let frames = Frames::load(&paths, (size, size));
    let threads = rayon::current_num_threads();
    let timings: Vec<(usize, Timing)> = freezes.iter().map(|&f| measure(config, &init, &frames, size, batch, f, dir.path()).map(|t| (f, t))).collect::<anyhow::Result<_>>()?;
    let torch = if std::env::var("BENCH_TORCH").as_deref() == Ok("1") { torch_steps(&root, &pth, size, batch, threads, &freezes) } else { Err("BENCH_TORCH=1 not set".into()) };

    let km = if std::env::var("BENCH_KMEANS").as_deref() != Ok("0") {
        let n = 1_000_000;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut data: Vec<f32> = (0..n * 128).map(|_| rng.random_range(-1.0..1.0)).collect();
        data.chunks_mut(128).for_each(picie::train::kmeans::normalize);
        let t = Instant::now();
        SphericalKMeans::fit(&data, 128, KMeansConfig::new(27, 0))?;
        Some(t.elapsed().as_secs_f64())
    } else {
        None
    };

    let label = |f: usize| if f == 0 { "all layers trainable".to_string() } else { format!("frozen to stride {f}") };
    println!("PiCIE training on burn Flex (CPU, {threads} threads), {size}x{size}, batch {batch}");
    println!("{:<58} {:>10} {:>10}", "", "burn s", "PyTorch s");
    for (f, t) in &timings {
        let theirs = match &torch {
            Ok(v) => v.iter().find(|(tf, _)| tf == f).map(|(_, s)| format!("{s:>10.2}")).unwrap_or_else(|| format!("{:>10}", "-")),
            Err(_) => format!("{:>10}", "-"),
        };
        println!("{:<58} {:>10.2} {theirs}", format!("train step, {}, per image", label(*f)), t.step / batch as f64);
        println!("{:<58} {:>10.2}", format!("train step, {}, per batch", label(*f)), t.step);
    }
    if let Some((_, t)) = timings.first() {
        println!("{:<58} {:>10.2}", "clustering pass (2 views, no grad), per image", t.cluster / (2 * batch) as f64);
        println!("{:<58} {:>10.2}", "labelling pass (2 views, no grad), per image", t.label / (2 * batch) as f64);
        println!("{:<58} {:>10.2}", format!("whole epoch incl. checkpoint, {}, per image", label(timings[0].0)), t.total / (2 * batch) as f64);
    }
    if let Some(km) = km {
        println!("{:<58} {:>10.2}", "spherical k-means 1M x 128, K=27, ++ + 20 iters", km);
    }
    match &torch {
        Ok(v) => println!("PyTorch {} ({threads} threads) measured in this run on the same network and step (benches/torch_step.py)", v.first().map(|_| torch_version(&root)).unwrap_or_default()),
        Err(e) => println!("PyTorch: not measured ({e}); reference: {TORCH_REFERENCE}"),
    }
    println!("reference (steering): faiss 20 iters: 7.1 s");
    Ok(())
}

fn torch_python(root: &Path) -> std::path::PathBuf {
    root.join("target/torch-venv/bin/python")
}

fn torch_version(root: &Path) -> String {
    std::process::Command::new(torch_python(root))
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// PyTorch's step per image for each freeze stride: target/torch-venv is made (python3 -m venv,
/// `pip install torch` from PyPI) when it cannot import torch; any failure is returned as text.
fn torch_steps(root: &Path, pth: &Path, size: usize, batch: usize, threads: usize, freezes: &[usize]) -> Result<Vec<(usize, f64)>, String> {
    use std::process::Command;
    let py = torch_python(root);
    let has_torch = |py: &Path| Command::new(py).args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
    if !has_torch(&py) {
        eprintln!("bench: making target/torch-venv with `pip install torch` from PyPI (large download)");
        let venv = root.join("target/torch-venv");
        let ok = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().is_ok_and(|s| s.success())
            && Command::new(&py).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "torch"]).status().is_ok_and(|s| s.success());
        if !ok || !has_torch(&py) {
            return Err("could not install torch into target/torch-venv".into());
        }
    }
    let strides: Vec<String> = freezes.iter().map(|f| f.to_string()).collect();
    let mut cmd = Command::new(&py);
    // OpenMP threads that spin while they wait slow PyTorch down by 10x or more whenever
    // another process shares the cores (seen here: 11 s steps among 0.7 s ones); burn's rayon
    // threads park. Waiting passively makes the two comparable on a shared machine.
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        cmd.env("OMP_WAIT_POLICY", "PASSIVE");
    }
    let out = cmd
        .arg(root.join("benches/torch_step.py"))
        .arg("--weights")
        .arg(pth)
        .args(["--size", &size.to_string(), "--batch", &batch.to_string(), "--threads", &threads.to_string(), "--freeze-strides", &strides.join(",")])
        .output()
        .map_err(|e| format!("running benches/torch_step.py: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("benches/torch_step.py failed: {}", err.lines().last().unwrap_or("")));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).map_err(|e| format!("{e}: {l}"))?;
            Ok((v["freeze_stride"].as_u64().unwrap_or(99) as usize, v["s_per_image"].as_f64().unwrap_or(f64::NAN)))
        })
        .collect()
}
