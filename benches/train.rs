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
//! PICIE_TRAIN_DEVICE=vulkan (a build with `--features wgpu`) runs the step on a GPU.
//! BENCH_BATCH, BENCH_SIZE, BENCH_STEPS (3: the fastest step counts) and BENCH_FREEZE ("16 0")
//! change the settings; BENCH_KMEANS=0 skips k-means.
//! BENCH_BACKBONE=dino-vits16 (any --backbone name) times that backbone's step instead of
//! Lite0's: the EfficientNets from .weights/, the others with seeded weights (a step costs the
//! same whatever the values; no ViT weights ship with the project). PyTorch's side is Lite0's only.
//! The peak resident memory of the bench process is printed at the end (Linux).
//! BENCH_BREAKDOWN=1 also times the step's operations one kind at a time (forward + backward of
//! each layer of the network on its own shapes, summed per kind) to show where the time goes,
//! beside the same layers on burn's own modules (Conv2d, BatchNorm, composed ReLU6).

use std::path::Path;
use std::time::Instant;

use picie::model::layers::Activation;
use picie::model::{BackboneKind, EmbedderConfig, TensorMap};
use picie::train::kmeans::{KMeansConfig, SphericalKMeans};
use picie::train::picie::{Frames, PassRuntime, Phase, TrainConfig, Trainer};
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

/// One epoch on BENCH_STEPS x `batch` frames (clustering, labelling and that many training
/// steps); the fastest training step counts.
fn measure(
    config: EmbedderConfig,
    init: &TensorMap,
    frames: &Frames,
    (size, batch): (usize, usize),
    freeze_stride: usize,
    passes: PassRuntime,
    dir: &Path,
) -> anyhow::Result<Timing> {
    let cfg = TrainConfig {
        k: 4,
        k2: 8,
        epochs: 1,
        size,
        batch,
        init_batches: 1,
        vectors_per_image: 500,
        freeze_stride,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(cfg, config, init)?;
    trainer.passes = passes;
    let mut train_times = vec![];
    let (mut cluster, mut label) = (0.0, 0.0);
    let mut last = Instant::now();
    let t0 = Instant::now();
    trainer.run(frames, &dir.join(format!("ckpt-{freeze_stride}")), &mut |p| {
        let now = Instant::now();
        match p.phase {
            Phase::Train => train_times.push((now - last).as_secs_f64()),
            Phase::Label => label += (now - last).as_secs_f64(),
            _ => cluster += (now - last).as_secs_f64(),
        }
        last = now;
        true
    })?;
    let step = train_times.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok(Timing { step, cluster, label, total: t0.elapsed().as_secs_f64() })
}

fn main() -> anyhow::Result<()> {
    // As `picie train` runs (src/train/memory.rs); the PyTorch side gets the same settings.
    let kept = picie::train::memory::keep_freed_memory();
    // BENCH_ROOT: the repository when the binary runs elsewhere (scripts/gpu-check.sh).
    let root = std::env::var_os("BENCH_ROOT").map(std::path::PathBuf::from).unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let device = picie::train::device::training_device()?;
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let batch = env("BENCH_BATCH", 8);
    let size = env("BENCH_SIZE", 320);
    let freezes: Vec<usize> =
        std::env::var("BENCH_FREEZE").unwrap_or_else(|_| "16 0".into()).split_whitespace().filter_map(|v| v.parse().ok()).collect();
    let dir = tempfile::tempdir()?;
    let kind = match std::env::var("BENCH_BACKBONE") {
        Ok(name) => <BackboneKind as clap::ValueEnum>::from_str(&name, false).map_err(|e| anyhow::anyhow!("BENCH_BACKBONE: {e}"))?,
        Err(_) => BackboneKind::EfficientnetLite0,
    };
    let config = EmbedderConfig::new(kind);
    let pth = root.join(".weights/efficientnet-lite0.pth");
    let init = if kind.lite_variant().is_some() {
        let st = dir.path().join("backbone.safetensors");
        picie::model::import::import_weights(kind, &root.join(format!(".weights/{}.pth", kind.name())), &st)?;
        let backbone = TensorMap::load_safetensors(&st)?;
        picie::model::Embedder::from_backbone(config, &backbone.sub("backbone"), 0, &burn::tensor::Device::flex())?.to_tensor_map("bench")
    } else {
        picie::model::Embedder::seeded(config, 0, &burn::tensor::Device::flex())?.to_tensor_map("bench")
    };

    // Two steps on `batch` copies of the shipped photos (one epoch = clustering, labelling and
    // training passes).
    let photos: Vec<_> = picie::train::cluster::list_images(&root.join("fixtures/images"))?;
    let steps = env("BENCH_STEPS", 3).max(1);
    let paths: Vec<_> = photos.iter().cycle().take(batch * steps).cloned().collect();
    let frames = Frames::load(&paths, (size, size));
    let threads = rayon::current_num_threads();
    let timings: Vec<(usize, Timing)> = freezes
        .iter()
        .map(|&f| measure(config, &init, &frames, (size, batch), f, PassRuntime::from_env()?, dir.path()).map(|t| (f, t)))
        .collect::<anyhow::Result<_>>()?;
    // The epoch once more all in burn (passes and frozen layers), the reference ONNX Runtime
    // replaces there.
    let burn_passes = match (freezes.first(), PassRuntime::from_env()?) {
        (Some(&f), PassRuntime::Onnx) if picie::model::on_flex(&device) => {
            Some(measure(config, &init, &frames, (size, batch), f, PassRuntime::Burn, dir.path())?)
        }
        _ => None,
    };
    let torch = if kind != BackboneKind::EfficientnetLite0 {
        Err("benches/torch_step.py builds Lite0 only".into())
    } else if std::env::var("BENCH_TORCH").as_deref() == Ok("1") {
        torch_steps(&root, &pth, (size, batch, steps), threads, &freezes, kept)
    } else {
        Err("BENCH_TORCH=1 not set".into())
    };

    let breakdown = if std::env::var("BENCH_BREAKDOWN").as_deref() == Ok("1") { Some(breakdown(size, batch)) } else { None };

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
    let backend =
        if picie::model::on_flex(&device) { format!("burn Flex (CPU, {threads} threads)") } else { format!("burn wgpu ({device:?})") };
    println!("PiCIE training of {} on {backend}, {size}x{size}, batch {batch}", kind.name());
    println!(
        "allocator: {}",
        if kept { "freed memory kept for reuse, on both sides (src/train/memory.rs)" } else { "the C library's defaults" }
    );
    println!("{:<58} {:>10} {:>10}", "", "burn s", "PyTorch s");
    for (f, t) in &timings {
        let theirs = match &torch {
            Ok(v) => v.iter().find(|(tf, _)| tf == f).map(|(_, s)| format!("{s:>10.3}")).unwrap_or_else(|| format!("{:>10}", "-")),
            Err(_) => format!("{:>10}", "-"),
        };
        println!("{:<58} {:>10.3} {theirs}", format!("train step, {}, per image", label(*f)), t.step / batch as f64);
        println!("{:<58} {:>10.2}", format!("train step, {}, per batch", label(*f)), t.step);
    }
    if let Some((_, t)) = timings.first() {
        let images = (steps * batch) as f64;
        let passes = if PassRuntime::from_env()? == PassRuntime::Onnx && picie::model::on_flex(&device) { "ONNX Runtime" } else { "burn" };
        println!("{:<58} {:>10.2}", format!("clustering pass (2 views, no grad, {passes}), per image"), t.cluster / images);
        println!("{:<58} {:>10.2}", format!("labelling pass (2 views, no grad, {passes}), per image"), t.label / images);
        println!("{:<58} {:>10.2}", format!("whole epoch incl. checkpoint, {}, per image", label(timings[0].0)), t.total / images);
        if let Some(b) = &burn_passes {
            println!("{:<58} {:>10.2}", format!("train step, {}, all in burn, per image", label(timings[0].0)), b.step / batch as f64);
            println!("{:<58} {:>10.2}", "clustering pass (2 views, no grad, burn), per image", b.cluster / images);
            println!("{:<58} {:>10.2}", "labelling pass (2 views, no grad, burn), per image", b.label / images);
            println!("{:<58} {:>10.2}", "whole epoch incl. checkpoint, all in burn, per image", b.total / images);
        }
    }
    if let Some(km) = km {
        println!("{:<58} {:>10.2}", "spherical k-means 1M x 128, K=27, ++ + 20 iters", km);
    }
    match &torch {
        Ok(v) => println!(
            "PyTorch {} ({threads} threads) measured in this run on the same network and step (benches/torch_step.py)",
            v.first().map(|_| torch_version(&root)).unwrap_or_default()
        ),
        Err(e) => println!("PyTorch: not measured ({e}); reference: {TORCH_REFERENCE}"),
    }
    if let Some(peak) = peak_resident_mib() {
        println!("{:<58} {:>10.0}", "peak resident memory of this process, MiB", peak);
    }
    if let Some(rows) = breakdown {
        let total: f64 = rows.iter().map(|r| r.1).sum();
        let before: f64 = rows.iter().map(|r| r.2).sum();
        println!("\nwhere a step's time goes: each layer's forward + backward (grads of input and weights) on its own, summed per kind, both views, all layers trainable, {size}x{size} batch {batch} (min of 3)");
        println!("{:<58} {:>10} {:>11} {:>14}", "", "s", "share", "burn's own s");
        for (name, secs, theirs) in rows {
            println!("{name:<58} {secs:>10.2} {:>9.0} % {theirs:>14.2}", 100.0 * secs / total);
        }
        println!("{:<58} {total:>10.2} {:>11} {before:>14.2}", "sum", "");
    }
    Ok(())
}

/// Forward + backward of every layer of the Lite0 + FPN embedder, one at a time on the shapes
/// it sees in a step, with gradients for the input and the weights, summed per kind of layer
/// and doubled for the two views. Each layer's `sum()` loss and its backward are timed apart
/// and taken off.
fn breakdown(size: usize, batch: usize) -> Vec<(String, f64, f64)> {
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::{BatchNormConfig, PaddingConfig2d};
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    use burn::tensor::{Distribution, Tensor};
    use picie::model::batchnorm::{batch_norm_relu6_train, batch_norm_train};
    let device = burn::tensor::Device::flex().autodiff();
    let input = |c: usize, h: usize| Tensor::<4>::random([batch, c, h, h], Distribution::Uniform(-1.0, 1.0), &device).require_grad();
    // min over 3 runs of forward + backward of `f` on an input of c x h x h channels.
    let time = |c: usize, h: usize, f: &dyn Fn(Tensor<4>) -> Tensor<4>| -> f64 {
        (0..4)
            .map(|_| {
                let x = input(c, h);
                let t = Instant::now();
                let g = f(x).sum().backward();
                std::hint::black_box(g);
                t.elapsed().as_secs_f64()
            })
            .skip(1)
            .fold(f64::INFINITY, f64::min)
    };
    let overhead = |c: usize, h: usize| time(c, h, &|x| x);
    // Per kind: the time with the project's kernels, and with burn's own modules (before).
    let mut kinds: Vec<(String, f64, f64)> = vec![];
    let mut add = |name: &str, ours: f64, before: f64| match kinds.iter_mut().find(|k| k.0 == name) {
        Some(k) => {
            k.1 += 2.0 * ours.max(0.0);
            k.2 += 2.0 * before.max(0.0);
        }
        None => kinds.push((name.to_string(), 2.0 * ours.max(0.0), 2.0 * before.max(0.0))),
    };
    let conv = |cin: usize, cout: usize, k: usize, s: usize, groups: usize| {
        Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([s, s])
            .with_groups(groups)
            .with_padding(PaddingConfig2d::Same)
            .with_bias(false)
            .init(&device)
    };
    let conv_bn_act = |add: &mut dyn FnMut(&str, f64, f64),
                       name: &str,
                       cin: usize,
                       cout: usize,
                       k: usize,
                       s: usize,
                       groups: usize,
                       h: usize,
                       relu6: bool| {
        let c = conv(cin, cout, k, s, groups);
        let ho = h.div_ceil(s);
        let base = overhead(cout, ho);
        add(name, time(cin, h, &|x| picie::model::conv::forward(&c, x)) - base, time(cin, h, &|x| c.forward(x)) - base);
        let bn = BatchNormConfig::new(cout).with_epsilon(1e-3).init(&device);
        if relu6 {
            add(
                "batch norm + ReLU6 (training mode, fused)",
                time(cout, ho, &|x| batch_norm_relu6_train(&bn, x)) - base,
                time(cout, ho, &|x| burn::tensor::activation::relu(bn.forward(x)).clamp_max(6.0)) - base,
            );
        } else {
            add(
                "batch norm (training mode)",
                time(cout, ho, &|x| batch_norm_train(&bn, x)) - base,
                time(cout, ho, &|x| bn.forward(x)) - base,
            );
        }
        ho
    };
    const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    ];
    let mut h = conv_bn_act(&mut add, "stem conv 3x3", 3, 32, 3, 2, 1, size, true);
    let mut taps = vec![];
    let mut block = 0;
    for (reps, k, stride, expand, c_in, c_out) in STAGES {
        for r in 0..reps {
            let (s, cin) = if r == 0 { (stride, c_in) } else { (1, c_out) };
            let hidden = cin * expand;
            if expand != 1 {
                conv_bn_act(&mut add, "1x1 conv (expand, project, FPN laterals)", cin, hidden, 1, 1, 1, h, true);
            }
            let ho = conv_bn_act(&mut add, &format!("depthwise conv {k}x{k}"), hidden, hidden, k, s, hidden, h, true);
            conv_bn_act(&mut add, "1x1 conv (expand, project, FPN laterals)", hidden, c_out, 1, 1, 1, ho, false);
            if s == 1 && cin == c_out {
                let t = time(c_out, ho, &|x| x.clone() + x) - overhead(c_out, ho);
                add("residual add", t, t);
            }
            h = ho;
            if [2, 4, 10, 15].contains(&block) {
                taps.push((c_out, h));
            }
            block += 1;
        }
    }
    for &(c, th) in &taps {
        let l = Conv2dConfig::new([c, 128], [1, 1]).init(&device);
        let base = overhead(128, th);
        add(
            "1x1 conv (expand, project, FPN laterals)",
            time(c, th, &|x| picie::model::conv::forward(&l, x)) - base,
            time(c, th, &|x| l.forward(x)) - base,
        );
    }
    for &(_, th) in taps.iter().rev().skip(1) {
        let opts = InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false).with_output_size([th, th]);
        let t =
            time(128, th / 2, &|x| interpolate(x, opts.clone()) + Tensor::<4>::zeros([batch, 128, th, th], &device)) - overhead(128, th);
        add("bilinear upsample + add (FPN)", t, t);
    }
    let h4 = taps[0].1;
    let t = time(128, h4, &|x| x.clone() / (x.clone() * x).sum_dim(1).sqrt().clamp_min(1e-12)) - overhead(128, h4);
    add("L2 norm over channels", t, t);
    // The activation three ways on the largest tensor it sees (the first expansion), side by
    // side: not part of the sum above.
    let (c, h1) = (96, size / 2);
    let relu6_ways: [(&str, &dyn Fn(Tensor<4>) -> Tensor<4>); 3] = [
        ("fused ReLU6 (src/model/relu6.rs)", &|x| Activation::Relu6.forward(x)),
        ("ReLU6 composed: relu(x).clamp_max(6) (before)", &|x| burn::tensor::activation::relu(x).clamp_max(6.0)),
        ("ReLU alone (burn's own fused op)", &|x| burn::tensor::activation::relu(x)),
    ];
    println!("\nReLU6 forward + backward on one {batch}x{c}x{h1}x{h1} tensor, loss and its backward included (min of 3):");
    for (name, f) in relu6_ways {
        println!("{name:<58} {:>10.3} s", time(c, h1, f));
    }
    println!("{:<58} {:>10.3} s", "identity (the loss and its backward alone)", overhead(c, h1));
    kinds
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
fn torch_steps(
    root: &Path,
    pth: &Path,
    (size, batch, steps): (usize, usize, usize),
    threads: usize,
    freezes: &[usize],
    kept: bool,
) -> Result<Vec<(usize, f64)>, String> {
    use std::process::Command;
    let py = torch_python(root);
    let has_torch = |py: &Path| Command::new(py).args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
    if !has_torch(&py) {
        eprintln!("bench: making target/torch-venv with `pip install torch` from PyPI (large download)");
        let venv = root.join("target/torch-venv");
        let ok = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().is_ok_and(|s| s.success())
            && Command::new(&py)
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "torch"])
                .status()
                .is_ok_and(|s| s.success());
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
    if kept {
        cmd.envs(picie::train::memory::KEEP_FREED_MEMORY_ENV);
    }
    let out = cmd
        .arg(root.join("benches/torch_step.py"))
        .arg("--weights")
        .arg(pth)
        .args([
            "--size",
            &size.to_string(),
            "--batch",
            &batch.to_string(),
            "--steps",
            &steps.to_string(),
            "--threads",
            &threads.to_string(),
            "--freeze-strides",
            &strides.join(","),
        ])
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

/// The process's peak resident set (VmHWM), where /proc has it.
fn peak_resident_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}
