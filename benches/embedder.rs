//! Embedder speed, side by side in one run: ONNX Runtime vs burn (Flex, CPU) per image on a
//! 480x352 input for the EfficientNet-Lite0 and -Lite2 embedders, the pixel-to-centroid
//! assignment at the original size, and the /segment work per quality of a package.
//!
//!     cargo bench --bench embedder            (needs scripts/setup.sh --no-build first)
//!     BENCH_MODELS=models/default,runs/other cargo bench --bench embedder

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
    let st = dir.join(format!("{}.safetensors", kind.name()));
    picie::model::import::import_weights(kind, &root.join(format!(".weights/{}.pth", kind.name())), &st)?;
    let config = EmbedderConfig::new(kind);
    let device = Device::flex();
    let weights = picie::model::TensorMap::load_safetensors(&st)?;
    let embedder = Embedder::from_backbone(config, &weights.sub("backbone"), 0, &device)?;
    let onnx = dir.join(format!("{}.onnx", kind.name()));
    export::export_onnx(&embedder, config, &onnx)?;
    let session = EmbedSession::load(&onnx, DeviceChoice::Cpu, Some(threads))?;
    let arr = ndarray::Array4::from_shape_vec((1, 3, H, W), x.to_vec())?;
    let ort = time(10, || session.run(&arr).unwrap());
    let burn = time(3, || {
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

    println!("embedder {W}x{H}, batch 1, {threads} threads (median / best of runs)");
    println!("{:<52} {:>10} {:>10}", "", "median ms", "best ms");
    let row =
        |name: &str, (m, b): (Duration, Duration)| println!("{name:<52} {:>10.1} {:>10.1}", m.as_secs_f64() * 1e3, b.as_secs_f64() * 1e3);
    let mut lite0_session = None;
    for kind in [BackboneKind::EfficientnetLite0, BackboneKind::EfficientnetLite2] {
        let ([ort, burn], session) = embedder_times(kind, &root, dir.path(), threads, &x)?;
        row(&format!("{} ONNX Runtime 1.32 (CPU EP)", kind.name()), ort);
        row(&format!("{} burn 0.22 Flex (reference fwd)", kind.name()), burn);
        println!("{:<52} {:>10.2}x", format!("{} ratio burn / ONNX Runtime", kind.name()), burn.0.as_secs_f64() / ort.0.as_secs_f64());
        lite0_session.get_or_insert(session);
    }

    // Assignment: K cosine scores at stride 4, bilinear to 480x360 (a CamVid frame), argmax.
    let session = lite0_session.expect("lite0 ran");
    let dim = EmbedderConfig::new(BackboneKind::EfficientnetLite0).dim;
    let arr = ndarray::Array4::from_shape_vec((1, 3, H, W), x.clone())?;
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

    // What each quality costs per image with a package: decode excluded, embedding, flip
    // averaging, assignment and the dense CRF included; a street-frame size and 2 MP. The
    // shipped model unless BENCH_MODELS names packages (comma-separated).
    let models = std::env::var("BENCH_MODELS").unwrap_or_else(|_| root.join("models/default").display().to_string());
    let photo = preprocess::decode_file(&root.join("fixtures/images/coffee.jpg"))?;
    let crf = picie::infer::Refinement::default();
    for model in models.split(',').filter(|m| !m.is_empty()) {
        let seg = picie::infer::Segmenter::load(std::path::Path::new(model), DeviceChoice::Cpu, Some(threads))?;
        println!("\n/segment work per image by quality, {model} (K = {}), median of runs", seg.k());
        println!("{:<10} {:>14} {:>14}", "quality", "480x360 ms", "1632x1224 ms");
        for q in picie::infer::Quality::ALL {
            let mut cells = vec![];
            for (w, h, reps) in [(480u32, 360u32, 7usize), (1632, 1224, 3)] {
                let img = image::imageops::resize(&photo, w, h, image::imageops::FilterType::Triangle);
                let (med, _) = time(reps, || seg.segment_batch_at(std::slice::from_ref(&img), q, &crf).unwrap());
                cells.push(med.as_secs_f64() * 1e3);
            }
            println!("{:<10} {:>14.1} {:>14.1}", q.as_str(), cells[0], cells[1]);
        }
    }
    Ok(())
}
