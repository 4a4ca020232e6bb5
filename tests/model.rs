//! The embedder: weight import, ONNX export parity, bad weights.

mod common;

use burn::tensor::{Device, Tensor, TensorData};
use picie::infer::{DeviceChoice, EmbedSession};
use picie::model::embedder::Backbone;
use picie::model::{export, BackboneKind, Embedder, EmbedderConfig, NamedTensor, TensorMap};

fn device() -> Device {
    Device::flex()
}

/// A deterministic input batch in [0, 1].
fn input(n: usize, h: usize, w: usize) -> Vec<f32> {
    (0..n * 3 * h * w).map(|i| ((i * 7919) % 1000) as f32 / 999.0).collect()
}

/// burn forward vs ONNX Runtime on the same weights; returns the max abs difference.
fn parity(embedder: &Embedder, config: EmbedderConfig, sizes: &[(usize, usize, usize)]) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("e.onnx");
    export::export_onnx(embedder, config, &onnx).unwrap();
    let session = EmbedSession::load(&onnx, DeviceChoice::Cpu, None).unwrap();
    let mut worst = 0f32;
    for &(n, h, w) in sizes {
        let x = input(n, h, w);
        let burn_out: Vec<f32> = embedder
            .forward_served(Tensor::from_data(TensorData::new(x.clone(), [n, 3, h, w]), &device()), config.tap_weight)
            .into_data()
            .try_to_vec()
            .unwrap();
        let arr = ndarray::Array4::from_shape_vec((n, 3, h, w), x).unwrap();
        let (shape, ort_out) = session.run(&arr).unwrap();
        assert_eq!(shape, [n, config.output_dim(), h / 4, w / 4], "ONNX output shape at {h}x{w}");
        assert_eq!(burn_out.len(), ort_out.len());
        let diff = burn_out.iter().zip(&ort_out).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // Unit norm over channels.
        let hw = (h / 4) * (w / 4);
        for p in 0..hw {
            let norm: f32 = (0..config.output_dim()).map(|d| ort_out[d * hw + p].powi(2)).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "feature norm {norm}");
        }
        eprintln!("parity {n}x{h}x{w}: max abs diff {diff:e}");
        worst = worst.max(diff);
    }
    worst
}

#[test]
fn lite_imports_classify_the_cat() {
    for (kind, weights) in
        [(BackboneKind::EfficientnetLite0, common::lite0_safetensors()), (BackboneKind::EfficientnetLite2, common::lite2_safetensors())]
    {
        let top5 = picie::model::classify::imagenet_top5(kind, weights, &common::fixture("chelsea.png")).unwrap();
        let (top1, p) = top5[0];
        assert!((281..=285).contains(&top1), "{kind:?} top-5 {top5:?}: the cat is not a cat");
        assert!(p > 0.2, "{kind:?} top-1 probability {p}");
    }
}

#[test]
fn lite_variants_do_not_load_each_others_checkpoints() {
    // Same tensor names, other widths and depths: a mix-up is an import error, not a quiet
    // half-loaded backbone.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    for (kind, lite) in [(BackboneKind::EfficientnetLite2, "lite0"), (BackboneKind::EfficientnetLite0, "lite2")] {
        let e = format!("{:#}", picie::model::import::import_weights(kind, &common::lite_checkpoint(lite), &out).unwrap_err());
        assert!(e.contains("is not a") && e.contains("_blocks."), "{lite} as {kind:?}: {e}");
        assert!(!out.exists());
    }
}

#[test]
fn lite2_onnx_matches_burn() {
    let config = EmbedderConfig::new(BackboneKind::EfficientnetLite2);
    assert_eq!(config.backbone.tap_channels(), [24, 48, 120, 352]);
    let weights = TensorMap::load_safetensors(common::lite2_safetensors()).unwrap();
    let embedder = Embedder::from_backbone(config, &weights.sub("backbone"), 0, &device()).unwrap();
    let diff = parity(&embedder, config, &[(1, 64, 96), (2, 96, 64)]);
    assert!(diff <= 1e-4, "max abs difference {diff}");
}

#[test]
fn lite0_onnx_matches_burn_at_two_sizes() {
    let config = EmbedderConfig::new(BackboneKind::EfficientnetLite0);
    let weights = TensorMap::load_safetensors(common::lite0_safetensors()).unwrap();
    let embedder = Embedder::from_backbone(config, &weights.sub("backbone"), 0, &device()).unwrap();
    let diff = parity(&embedder, config, &[(1, 64, 96), (2, 96, 64)]);
    assert!(diff <= 1e-4, "max abs difference {diff}");
}

#[test]
fn hypercolumn_onnx_matches_burn() {
    // The FPN's features with the backbone's four taps, upsampled by 1, 2, 4 and 8.
    let config = EmbedderConfig { tap_weight: 0.5, ..EmbedderConfig::new(BackboneKind::EfficientnetLite0) };
    assert_eq!(config.output_dim(), 128 + 24 + 40 + 112 + 320);
    let weights = TensorMap::load_safetensors(common::lite0_safetensors()).unwrap();
    let embedder = Embedder::from_backbone(config, &weights.sub("backbone"), 0, &device()).unwrap();
    let diff = parity(&embedder, config, &[(1, 64, 96), (1, 96, 128)]);
    assert!(diff <= 1e-4, "max abs difference {diff}");
}

#[test]
fn resnet18_torchvision_zip_checkpoint_imports_and_exports() {
    // A torchvision-layout state dict, written as torch.save writes it (zip), with an fc head
    // the backbone must ignore.
    let mut sd = common::seeded_resnet18_state_dict(3);
    sd.insert("fc.weight", NamedTensor::new(vec![10, 512], vec![0.01; 5120]));
    sd.insert("fc.bias", NamedTensor::new(vec![10], vec![0.0; 10]));
    let tensors: Vec<(String, NamedTensor)> = sd.tensors.clone().into_iter().collect();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("resnet18.pth");
    common::write_torch_zip(&ckpt, &tensors);
    let out = dir.path().join("resnet18.safetensors");
    picie::model::import::import_weights(BackboneKind::Resnet18, &ckpt, &out).unwrap();
    let imported = TensorMap::load_safetensors(&out).unwrap();
    assert_eq!(
        imported.get("backbone.layer3.0.downsample.0.weight", &[256, 128, 1, 1]).unwrap(),
        &sd.tensors["layer3.0.downsample.0.weight"]
    );

    let config = EmbedderConfig::new(BackboneKind::Resnet18);
    let embedder = Embedder::from_backbone(config, &imported.sub("backbone"), 1, &device()).unwrap();
    let diff = parity(&embedder, config, &[(1, 64, 64), (1, 96, 128)]);
    assert!(diff <= 1e-4, "max abs difference {diff}");
}

#[test]
fn weights_roundtrip_through_safetensors() {
    let config = EmbedderConfig::new(BackboneKind::Resnet18);
    let a = Embedder::seeded(config, 5, &device()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    a.to_tensor_map("a").save_safetensors(&path).unwrap();
    let b = Embedder::load(config, &TensorMap::load_safetensors(&path).unwrap(), &device()).unwrap();
    assert_eq!(a.to_tensor_map("x").tensors, b.to_tensor_map("x").tensors);
}

#[test]
fn bad_weights_name_the_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let device = device();

    // Truncated safetensors.
    let good = TensorMap::load_safetensors(common::lite0_safetensors()).unwrap();
    let bytes = good.to_safetensors_bytes().unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = TensorMap::load_safetensors(&truncated).unwrap_err().to_string();
    assert!(e.contains("truncated.safetensors"), "{e}");

    // Missing tensor.
    let mut missing = good.sub("backbone");
    missing.tensors.remove("_blocks.3._bn1.running_var");
    let e = format!("{:#}", Backbone::load(BackboneKind::EfficientnetLite0, &missing, &device).unwrap_err());
    assert!(e.contains("_blocks.3._bn1.running_var") && e.contains("missing"), "{e}");

    // Mis-shaped tensor.
    let mut bad = good.sub("backbone");
    bad.insert("_conv_stem.weight", NamedTensor::new(vec![32, 3, 5, 5], vec![0.0; 32 * 3 * 25]));
    let e = format!("{:#}", Backbone::load(BackboneKind::EfficientnetLite0, &bad, &device).unwrap_err());
    assert!(e.contains("_conv_stem.weight") && e.contains("[32, 3, 3, 3]"), "{e}");

    // Truncated torch checkpoint.
    let raw = std::fs::read(common::lite0_checkpoint()).unwrap();
    let cut = dir.path().join("cut.pth");
    std::fs::write(&cut, &raw[..raw.len() / 3]).unwrap();
    let e = format!(
        "{:#}",
        picie::model::import::import_weights(BackboneKind::EfficientnetLite0, &cut, &dir.path().join("o.safetensors")).unwrap_err()
    );
    assert!(e.contains("cut.pth"), "{e}");
    assert!(!dir.path().join("o.safetensors").exists(), "no output on failure");

    // The wrong backbone for a checkpoint.
    let e = format!(
        "{:#}",
        picie::model::import::import_weights(BackboneKind::Resnet18, &common::lite0_checkpoint(), &dir.path().join("o.safetensors"))
            .unwrap_err()
    );
    assert!(e.contains("conv1.weight"), "{e}");
}

/// `--fpn-init pca` on the real Lite0 backbone, measured on the fixture photos it is then
/// applied to: each lateral maps its tap into its own block of channels, centred, with unit
/// mean squared norm, and leaves every other channel at exactly zero; the embedder it makes
/// exports with ONNX parity like any other.
#[test]
fn pca_laterals_project_each_tap_into_its_own_block() {
    use picie::model::embedder::imagenet_normalize;
    use picie::train::fpn_init::{block_dims, init_pca_laterals};
    let config = EmbedderConfig::new(BackboneKind::EfficientnetLite0);
    let weights = TensorMap::load_safetensors(common::lite0_safetensors()).unwrap();
    let embedder = Embedder::from_backbone(config, &weights.sub("backbone"), 0, &device()).unwrap();
    let mut map = embedder.to_tensor_map("test");
    let frames: Vec<Vec<f32>> = ["astronaut.jpg", "chelsea.png", "coffee.jpg"]
        .iter()
        .map(|f| {
            picie::train::augment::training_frame(&image::open(common::root().join("fixtures/images").join(f)).unwrap().to_rgb8(), 160, 160)
        })
        .collect();
    init_pca_laterals(&embedder, &frames, (160, 160), config.dim, &mut map).unwrap();
    let loaded = Embedder::load(config, &map, &device()).unwrap();
    let x = Tensor::<4>::from_data(TensorData::new(frames.concat(), [3, 3, 160, 160]), &device());
    let taps = loaded.backbone.forward(imagenet_normalize(x));
    let dims = block_dims(config.backbone.tap_channels(), config.dim).unwrap();
    let mut offset = 0;
    for ((tap, lateral), d) in taps.into_iter().zip(&loaded.fpn.laterals).zip(dims) {
        let out = lateral.forward(tap);
        let [n, c, h, w] = out.dims();
        let data = NamedTensor::from_burn(out).data;
        let cells = (n * h * w) as f64;
        let channel = |ch: usize| (0..n).flat_map(move |img| (0..h * w).map(move |cell| (img * c + ch) * h * w + cell));
        let mut sq = 0.0;
        for ch in 0..c {
            if (offset..offset + d).contains(&ch) {
                let mean = channel(ch).map(|i| data[i] as f64).sum::<f64>() / cells;
                assert!(mean.abs() < 1e-3, "block at {offset}, channel {ch}: mean {mean}");
                sq += channel(ch).map(|i| (data[i] as f64).powi(2)).sum::<f64>() / cells;
            } else {
                assert!(channel(ch).all(|i| data[i] == 0.0), "block at {offset}: channel {ch} is not zero");
            }
        }
        // Covariance divides by cells - 1, the mean square here by cells.
        assert!((sq - 1.0).abs() < 0.05, "block at {offset}: mean squared norm {sq}");
        offset += d;
    }
    let diff = parity(&loaded, config, &[(1, 64, 96)]);
    assert!(diff <= 1e-4, "max abs difference {diff}");
}
