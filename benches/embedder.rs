//! Embedder speed, side by side in one run: ONNX Runtime vs burn (Flex, CPU) per image on a
//! 480x352 input, and the pixel-to-centroid assignment at the original size.
//!
//!     cargo bench --bench embedder            (needs scripts/setup.sh --no-build first)

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

fn main() -> anyhow::Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir()?;
    let st = dir.path().join("lite0.safetensors");
    picie::commands::import_weights(BackboneKind::EfficientnetLite0, &root.join(".weights/efficientnet-lite0.pth"), &st)?;
    let config = EmbedderConfig::new(BackboneKind::EfficientnetLite0);
    let device = Device::flex();
    let weights = picie::model::TensorMap::load_safetensors(&st)?;
    let embedder = Embedder::from_backbone(config, &weights.sub("backbone"), 0, &device)?;
    let onnx = dir.path().join("e.onnx");
    export::export_onnx(&embedder, config, &onnx)?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let session = EmbedSession::load(&onnx, DeviceChoice::Cpu, Some(threads))?;

    let x: Vec<f32> = (0..3 * H * W).map(|i| ((i * 7919) % 1000) as f32 / 999.0).collect();
    let arr = ndarray::Array4::from_shape_vec((1, 3, H, W), x.clone())?;
    let reps = 10;
    let (ort_med, ort_min) = time(reps, || session.run(&arr).unwrap());
    let (burn_med, burn_min) = time(3, || {
        let t = Tensor::<4>::from_data(TensorData::new(x.clone(), [1, 3, H, W]), &device);
        embedder.forward(t).into_data()
    });

    // Assignment: K cosine scores at stride 4, bilinear to 480x360 (a CamVid frame), argmax.
    let (_, feats) = session.run(&arr)?;
    let mut centroids: Vec<f32> = (0..K * config.dim).map(|i| ((i * 31) % 17) as f32 - 8.0).collect();
    centroids.chunks_mut(config.dim).for_each(picie::train::kmeans::normalize);
    let geom = preprocess::geometry(480, 360, &picie::package::InputPolicy::default());
    let hw = (H / 4) * (W / 4);
    let (asg_med, asg_min) = time(reps, || {
        let s = assign::similarities(&feats, config.dim, hw, &centroids);
        assign::labels_at_original_size(&s, K, (W / 4, H / 4), &geom)
    });

    println!("embedder {W}x{H}, batch 1, {threads} threads (median / best of runs)");
    println!("{:<34} {:>10} {:>10}", "", "median ms", "best ms");
    let row = |name: &str, m: Duration, b: Duration| println!("{name:<34} {:>10.1} {:>10.1}", m.as_secs_f64() * 1e3, b.as_secs_f64() * 1e3);
    row("ONNX Runtime 1.32 (CPU EP)", ort_med, ort_min);
    row("burn 0.22 Flex (reference fwd)", burn_med, burn_min);
    row(&format!("assignment K={K} to 480x360"), asg_med, asg_min);
    println!("ratio burn / ONNX Runtime: {:.2}x", burn_med.as_secs_f64() / ort_med.as_secs_f64());

    // What each quality costs per image with the shipped model: decode excluded, embedding,
    // flip averaging, assignment and the dense CRF included; a street-frame size and 2 MP.
    let seg = picie::infer::Segmenter::load(&root.join("models/default"), DeviceChoice::Cpu, Some(threads))?;
    let photo = preprocess::decode_file(&root.join("fixtures/images/coffee.jpg"))?;
    let crf = picie::infer::CrfConfig::default();
    println!("\n/segment work per image by quality, models/default (K = {}), median of runs", seg.k());
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
    Ok(())
}
