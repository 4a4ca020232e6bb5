//! Embedder speed, side by side in one run: ONNX Runtime vs burn (Flex, CPU) per image on a
//! 480x352 input for the EfficientNet-Lite0 and -Lite2 embedders, the pixel-to-centroid
//! assignment at the original size, the /segment work per quality of a package (a 480x360
//! street frame and a 12 MP phone photo, each quality's cost against `fast`'s in the same run),
//! refinement variants, and where the dense CRF's time goes.
//!
//!     cargo bench --bench embedder            (needs scripts/setup.sh --no-build first)
//!     BENCH_MODELS=models/default,runs/other cargo bench --bench embedder
//!     BENCH_ONLY=qualities,crf cargo bench --bench embedder     (parts: embedder, qualities, crf)
//!     BENCH_ONLY=crf BENCH_CRF_DUMP=DIR [BENCH_CRF_IMAGES=DIR] cargo bench --bench embedder
//!                                                  (also writes each frame, the logits the CRF gets
//!                                                   and its labels and time, for the reference
//!                                                   dense CRF: scripts/crf-reference.sh)
//!     BENCH_VIT=1 cargo bench --bench embedder     (also the ViT backbones at 480x352 beside Lite0:
//!                                                   seeded weights in the released architectures,
//!                                                   whose cost does not depend on the values)

use std::time::{Duration, Instant};

use burn::tensor::{Device, Tensor, TensorData};
use picie::infer::{assign, preprocess, DeviceChoice, EmbedSession};
use picie::model::{export, BackboneKind, Embedder, EmbedderConfig};

const W: usize = 480;
const H: usize = 352;
const K: usize = 27;

fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> (Duration, Duration) {
    f(); // warm-up
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .collect();
    times.sort();
    (times[times.len() / 2], times[0])
}

/// ONNX Runtime and burn medians and bests for one backbone's untrained embedder, and its
/// exported session for the assignment timing.
fn embedder_times(
    kind: BackboneKind,
    root: &std::path::Path,
    dir: &std::path::Path,
    threads: usize,
    x: &[f32],
) -> anyhow::Result<([(Duration, Duration); 2], EmbedSession)> {
    let config = EmbedderConfig::new(kind);
    let device = Device::flex();
    let embedder = if kind.vit_spec().is_some() {
        // No ViT weights ship with the project; a forward costs the same whatever the values.
        Embedder::seeded(config, 0, &device)?
    } else {
        let st = dir.join(format!("{}.safetensors", kind.name()));
        picie::model::import::import_weights(kind, &root.join(format!(".weights/{}.pth", kind.name())), &st)?;
        let weights = picie::model::TensorMap::load_safetensors(&st)?;
        Embedder::from_backbone(config, &weights.sub("backbone"), 0, &device)?
    };
    let onnx = dir.join(format!("{}.onnx", kind.name()));
    export::export_onnx(&embedder, config, &onnx)?;
    let session = EmbedSession::load(&onnx, DeviceChoice::Cpu, Some(threads))?;
    let arr = ndarray::Array4::from_shape_vec((1, 3, H, W), x.to_vec())?;
    // A ViT-S/8 frame takes seconds on two cores: fewer runs.
    let (ort_reps, burn_reps) = if kind.vit_spec().is_some() { (3, 1) } else { (10, 3) };
    let ort = time(ort_reps, || session.run(&arr).unwrap());
    let burn = time(burn_reps, || {
        let t = Tensor::<4>::from_data(TensorData::new(x.to_vec(), [1, 3, H, W]), &device);
        embedder.forward(t).into_data()
    });
    Ok(([ort, burn], session))
}

fn main() -> anyhow::Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir()?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let x: Vec<f32> = (0..3 * H * W).map(|i| ((i * 7919) % 1000) as f32 / 999.0).collect();
    let reps = 10;
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only.split(',').any(|p| p == name);
    if part("embedder") {
        embedders(&root, dir.path(), threads, &x, reps)?;
    }
    let models = std::env::var("BENCH_MODELS").unwrap_or_else(|_| root.join("models/default").display().to_string());
    let photo = preprocess::decode_file(&root.join("fixtures/images/coffee.jpg"))?;
    for model in models.split(',').filter(|m| !m.is_empty()) {
        let seg = picie::infer::Segmenter::load(std::path::Path::new(model), DeviceChoice::Cpu, Some(threads))?;
        if part("qualities") {
            qualities(&seg, model, &photo)?;
        }
        if part("crf") {
            crf_profile(&seg, &photo)?;
            if let Ok(dump) = std::env::var("BENCH_CRF_DUMP") {
                crf_dump(&seg, &photo, std::path::Path::new(&dump))?;
            }
        }
    }
    Ok(())
}

fn row(name: &str, (m, b): (Duration, Duration)) {
    println!("{name:<52} {:>10.1} {:>10.1}", m.as_secs_f64() * 1e3, b.as_secs_f64() * 1e3)
}

fn embedders(root: &std::path::Path, dir: &std::path::Path, threads: usize, x: &[f32], reps: usize) -> anyhow::Result<()> {
    println!("embedder {W}x{H}, batch 1, {threads} threads (median / best of runs)");
    println!("{:<52} {:>10} {:>10}", "", "median ms", "best ms");
    let mut lite0_session = None;
    let mut kinds = vec![BackboneKind::EfficientnetLite0, BackboneKind::EfficientnetLite2];
    if std::env::var("BENCH_VIT").as_deref() == Ok("1") {
        kinds.extend([BackboneKind::DinoVits16, BackboneKind::Dinov2Vits14, BackboneKind::DinoVits8]);
    }
    for kind in kinds {
        let ([ort, burn], session) = embedder_times(kind, root, dir, threads, x)?;
        row(&format!("{} ONNX Runtime 1.32 (CPU EP)", kind.name()), ort);
        row(&format!("{} burn 0.22 Flex (reference fwd)", kind.name()), burn);
        println!("{:<52} {:>10.2}x", format!("{} ratio burn / ONNX Runtime", kind.name()), burn.0.as_secs_f64() / ort.0.as_secs_f64());
        if let Some(peak) = peak_resident_mib() {
            // Monotone over the run: the rows go from the lightest backbone to the heaviest.
            println!("{:<52} {:>10.0}", format!("{} process peak resident MiB so far", kind.name()), peak);
        }
        lite0_session.get_or_insert(session);
    }

    // Assignment: K cosine scores at stride 4, bilinear to 480x360 (a CamVid frame), argmax.
    let session = lite0_session.expect("lite0 ran");
    let dim = EmbedderConfig::new(BackboneKind::EfficientnetLite0).dim;
    let arr = ndarray::Array4::from_shape_vec((1, 3, H, W), x.to_vec())?;
    let (_, feats) = session.run(&arr)?;
    let mut centroids: Vec<f32> = (0..K * dim).map(|i| ((i * 31) % 17) as f32 - 8.0).collect();
    centroids.chunks_mut(dim).for_each(picie::train::kmeans::normalize);
    let geom = preprocess::geometry(480, 360, &picie::package::InputPolicy::default());
    let hw = (H / 4) * (W / 4);
    row(
        &format!("assignment K={K} to 480x360"),
        time(reps, || {
            let s = assign::similarities(&feats, dim, hw, &centroids);
            assign::labels_at_original_size(&s, K, (W / 4, H / 4), &geom)
        }),
    );

    Ok(())
}

/// What each quality costs per image with a package, decode excluded (embedding, flip
/// averaging, assignment and the refinement included): a street frame and a 12 MP photo, and
/// each against `fast` in the same run; then refinement variants on the street frame.
fn qualities(seg: &picie::infer::Segmenter, model: &str, photo: &image::RgbImage) -> anyhow::Result<()> {
    use picie::infer::{CrfConfig, GuidedConfig, Quality, Refinement};
    let sized = |w: u32, h: u32| image::imageops::resize(photo, w, h, image::imageops::FilterType::Triangle);
    let (frame, phone) = (sized(480, 360), sized(4000, 3000));
    let cost = |img: &image::RgbImage, q: Quality, r: &Refinement, reps: usize| {
        time(reps, || seg.segment_batch_at(std::slice::from_ref(img), q, r).unwrap()).0.as_secs_f64() * 1e3
    };
    let default = Refinement::default();
    println!("\n/segment work per image by quality, {model} (K = {}), median of runs", seg.k());
    println!("{:<10} {:>12} {:>10} {:>14} {:>10}", "quality", "480x360 ms", "x fast", "4000x3000 ms", "ms / MP");
    let fast = cost(&frame, Quality::Fast, &default, 9);
    for q in Quality::ALL {
        let small = if q == Quality::Fast { fast } else { cost(&frame, q, &default, 7) };
        let large = cost(&phone, q, &default, 3);
        println!("{:<10} {:>12.1} {:>10.2} {:>14.1} {:>10.1}", q.as_str(), small, small / fast, large, large / 12.0);
    }
    // The class scores alone (each class's best similarity over the vectors it holds): what
    // classes merged from over-clusters add to every quality over one centroid per class.
    let features = seg.embed(std::slice::from_ref(&frame))?.remove(0);
    let scoring = time(21, || seg.scores(&features)).0.as_secs_f64() * 1e3;
    let vectors = seg.package.centroids.over_clusters().unwrap_or(seg.k());
    println!("class scores alone at 480x360, {} classes from {vectors} vectors: {scoring:.2} ms", seg.k());
    println!("\nrefinement variants at 480x360 (the embedding and assignment included), median of runs");
    println!("{:<40} {:>10} {:>10}", "variant", "ms", "x fast");
    let crf = |c: &str| Refinement { crf: c.parse::<CrfConfig>().unwrap(), ..default };
    let guided = |g: &str| Refinement { guided: g.parse::<GuidedConfig>().unwrap(), ..default };
    for (name, q, r) in [
        ("fast", Quality::Fast, default),
        ("crf, 10 iterations (the crf quality)", Quality::Crf, default),
        ("crf, 5 iterations", Quality::Crf, crf("iterations=5")),
        ("crf, 3 iterations", Quality::Crf, crf("iterations=3")),
        ("crf at half resolution", Quality::Crf, crf("max_pixels=43200")),
        ("edges at the network's resolution", Quality::Edges, guided("scale=1")),
        ("edges at half of it (the edges quality)", Quality::Edges, default),
        ("edges at a quarter of it", Quality::Edges, guided("scale=0.25")),
    ] {
        let ms = cost(&frame, q, &r, 7);
        println!("{name:<40} {ms:>10.1} {:>10.2}", ms / fast);
    }
    // What a GPU server runs for edges (the filter as an ONNX graph), here on the CPU provider.
    seg.set_guided_in_graph(true);
    let ms = cost(&frame, Quality::Edges, &default, 7);
    seg.set_guided_in_graph(false);
    println!("{:<40} {ms:>10.1} {:>10.2}", "edges as the ONNX graph (CPU provider)", ms / fast);
    Ok(())
}

/// Where the dense CRF's time goes on a street frame, phase by phase over its iterations.
fn crf_profile(seg: &picie::infer::Segmenter, photo: &image::RgbImage) -> anyhow::Result<()> {
    use picie::infer::crf::{refine_profiled, CrfConfig, CrfProfile};
    let config = CrfConfig::default();
    let k = seg.k();
    let (frame, logits) = crf_input(seg, photo, &config)?;
    let runs = 5;
    let mut profile = CrfProfile::default();
    for _ in 0..runs {
        refine_profiled(&frame, &logits, k, &config, &mut profile);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3 / runs as f64;
    let total = ms(profile.total());
    println!("\ndense CRF on 480x360, K = {k}, {} iterations: mean of {runs} runs", config.iterations);
    println!("{:<44} {:>10} {:>8}", "phase", "ms", "share");
    for (name, d) in [
        ("unary (softmax, -log p)", profile.unary),
        ("appearance features and lattice build", profile.lattice),
        ("normalisers (filters of ones)", profile.normalisers),
        ("Q into both kernels' layouts", profile.layouts),
        ("smoothness kernel (exact blur)", profile.smooth),
        ("lattice splat", profile.splat),
        ("lattice blur", profile.blur),
        ("lattice slice", profile.slice),
        ("Potts update, softmax, argmax", profile.update),
    ] {
        println!("{name:<44} {:>10.1} {:>7.0}%", ms(d), 100.0 * ms(d) / total);
    }
    println!("{:<44} {:>10.1}", "total", total);
    Ok(())
}

/// A photo at 480x360 and the logits the dense CRF gets for it (pixel-major, K per pixel): the
/// scaled cosine similarities to the centroids at every pixel, as the `crf` quality makes them.
fn crf_input(
    seg: &picie::infer::Segmenter,
    photo: &image::RgbImage,
    config: &picie::infer::crf::CrfConfig,
) -> anyhow::Result<(image::RgbImage, Vec<f32>)> {
    let frame = image::imageops::resize(photo, 480, 360, image::imageops::FilterType::Triangle);
    let f = seg.embed(std::slice::from_ref(&frame))?.remove(0);
    let scores = assign::similarities(&f.data, f.dim, f.width * f.height, &seg.package.centroids.matrix());
    let mut logits = assign::scores_at_size(&scores, seg.k(), (f.width, f.height), &f.geometry, (480, 360));
    logits.iter_mut().for_each(|v| *v *= config.temperature);
    Ok((frame, logits))
}

/// Frames to compare with the reference dense CRF (`scripts/crf-reference.sh`): the first 10
/// images of `BENCH_CRF_IMAGES` (else the bench photo) at 480x360, each with the logits the CRF
/// is given (pixel-major f32, little-endian), the labels it returns and its time (best of 3).
fn crf_dump(seg: &picie::infer::Segmenter, photo: &image::RgbImage, dir: &std::path::Path) -> anyhow::Result<()> {
    use picie::infer::crf::{refine, CrfConfig};
    std::fs::create_dir_all(dir)?;
    let frames: Vec<image::RgbImage> = match std::env::var("BENCH_CRF_IMAGES") {
        Ok(images) => picie::train::cluster::list_images(std::path::Path::new(&images))?
            .iter()
            .take(10)
            .map(|p| preprocess::decode_file(p))
            .collect::<anyhow::Result<_>>()?,
        Err(_) => vec![photo.clone()],
    };
    let config = CrfConfig::default();
    let k = seg.k();
    println!("\ndense CRF frames for the reference, K = {k}, {} iterations, into {}", config.iterations, dir.display());
    for (i, frame) in frames.iter().enumerate() {
        let (frame, logits) = crf_input(seg, frame, &config)?;
        let mut labels = vec![];
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            labels = refine(&frame, &logits, k, &config);
            best = best.min(t.elapsed());
        }
        frame.save(dir.join(format!("frame-{i}.png")))?;
        std::fs::write(dir.join(format!("logits-{i}.f32")), logits.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
        image::GrayImage::from_raw(480, 360, labels).expect("480x360 labels").save(dir.join(format!("rust-{i}.png")))?;
        let meta = serde_json::json!({"width": 480, "height": 360, "k": k, "rust_ms": best.as_secs_f64() * 1e3, "config": config});
        std::fs::write(dir.join(format!("meta-{i}.json")), serde_json::to_vec_pretty(&meta)?)?;
        println!("frame {i}: picie's CRF {:.1} ms", best.as_secs_f64() * 1e3);
    }
    Ok(())
}

/// The process's peak resident set (VmHWM), where /proc has it.
fn peak_resident_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}
