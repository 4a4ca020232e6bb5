//! Model packages and the inference library.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use picie::infer::{decode_image, DecodeError, DeviceChoice, Segmenter};
use picie::model::BackboneKind;
use picie::package::{InputPolicy, Package, MANIFEST_FILE, ONNX_FILE};
use picie::train::fpn_init::FpnInit;
use picie::train::packaging::{init_package, rebuild_package, InitPackage, RebuildPackage};

const K: usize = 5;

/// One small untrained package per test binary (short side 128 keeps it quick).
fn package_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pkg");
        init_fixture_package(&out, BackboneKind::EfficientnetLite0, FpnInit::Random);
        (dir, out)
    });
    p
}

/// An untrained package of the fixture photos at short side 128, K clusters. The progress it
/// reports goes forward, names each step and ends at k-means.
fn init_fixture_package(out: &Path, backbone: BackboneKind, fpn_init: FpnInit) -> Package {
    init_fixture_package_with(out, backbone, fpn_init, 0, InputPolicy { short_side: 128, ..InputPolicy::default() })
}

/// [`init_fixture_package`] with another FPN seed or input policy.
fn init_fixture_package_with(out: &Path, backbone: BackboneKind, fpn_init: FpnInit, seed: u64, policy: InputPolicy) -> Package {
    let mut steps: Vec<(f64, String)> = vec![];
    let weights = match backbone {
        BackboneKind::EfficientnetLite0 => common::lite0_safetensors(),
        BackboneKind::EfficientnetLite2 => common::lite2_safetensors(),
        other => panic!("no fixture weights for {other:?}"),
    };
    let pkg = init_package(
        &InitPackage {
            backbone,
            backbone_weights: weights.to_path_buf(),
            images: common::root().join("fixtures/images"),
            k: K,
            seed,
            out: out.to_path_buf(),
            name: "test".into(),
            policy,
            replace: false,
            command: "test".into(),
            fpn_init,
        },
        &mut |fraction, what| steps.push((fraction, what.to_string())),
    )
    .unwrap()
    .0;
    assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0), "progress goes forward: {steps:?}");
    let images = picie::train::cluster::list_images(&common::root().join("fixtures/images")).unwrap().len();
    assert!(steps.iter().any(|(_, s)| s == &format!("embedding images 1/{images}")), "{steps:?}");
    assert_eq!(steps.last().map(|s| s.1.as_str()), Some("k-means on the pixel features"), "{steps:?}");
    pkg
}

/// A copy of the shared package that a test may damage.
fn scratch_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("pkg");
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(package_dir()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (dir, dst)
}

fn load_fixture(name: &str) -> image::RgbImage {
    decode_image(&std::fs::read(common::fixture(name)).unwrap(), 1 << 30).unwrap()
}

#[test]
fn init_writes_a_valid_untrained_package() {
    let pkg = Package::load(package_dir()).unwrap();
    assert_eq!(pkg.manifest.k, K);
    assert_eq!(pkg.centroids.k(), K);
    assert!(!pkg.manifest.provenance.trained);
    assert_eq!(pkg.manifest.embedder.backbone, BackboneKind::EfficientnetLite0);
    for c in &pkg.centroids.classes {
        let n: f32 = c.centroid.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-4);
    }
    // No scratch or partial files are left beside the package.
    let leftovers: Vec<_> = std::fs::read_dir(package_dir().parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n != "pkg")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `--fpn-init pca`: each lateral writes its own block of output channels (the rest of its
/// rows are zero), the provenance says how the FPN started, and the package segments.
#[test]
fn lite2_pca_package_writes_block_laterals_and_segments() {
    // The larger backbone end to end: import, PCA laterals over its own taps, export, serve.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pca");
    let kind = BackboneKind::EfficientnetLite2;
    let pkg = init_fixture_package(&out, kind, FpnInit::Pca);
    assert_eq!(pkg.manifest.provenance.details["fpn_init"], "pca");
    assert_eq!(pkg.manifest.embedder.backbone, kind);
    let weights = pkg.load_weights().unwrap();
    let dims = picie::train::fpn_init::block_dims(kind.tap_channels(), 128).unwrap();
    let mut offset = 0;
    for (i, d) in dims.into_iter().enumerate() {
        let c = kind.tap_channels()[i];
        let w = weights.get(&format!("fpn.lateral.{i}.weight"), &[128, c, 1, 1]).unwrap();
        for row in 0..128 {
            let nonzero = w.data[row * c..(row + 1) * c].iter().any(|&v| v != 0.0);
            assert_eq!(nonzero, (offset..offset + d).contains(&row), "lateral {i} row {row}");
        }
        offset += d;
    }
    let seg = Segmenter::load(&out, DeviceChoice::Cpu, None).unwrap();
    let mask = seg.segment(&load_fixture("chelsea.png")).unwrap();
    assert_eq!((mask.width, mask.height), (451, 300));
    assert!(mask.labels.iter().all(|&l| (l as usize) < K));
}

#[test]
fn segments_at_the_original_size() {
    let seg = Segmenter::load(package_dir(), DeviceChoice::Auto, None).unwrap();
    assert_eq!(seg.provider(), picie::infer::Provider::Cpu, "no GPU here: auto falls back to CPU");
    let cat = load_fixture("chelsea.png");
    let coffee = load_fixture("coffee.jpg");
    let masks = seg.segment_batch(&[cat.clone(), coffee.clone()]).unwrap();
    assert_eq!((masks[0].width, masks[0].height), (cat.width(), cat.height()));
    assert_eq!((masks[1].width, masks[1].height), (coffee.width(), coffee.height()));
    for m in &masks {
        assert!(m.labels.iter().all(|&l| (l as usize) < K));
        let used = m.class_fractions(K).iter().filter(|&&f| f > 0.01).count();
        assert!(used >= 2, "a real photo should use several classes");
        assert!((m.class_fractions(K).iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
    // Alone or in a batch, the cat is segmented nearly the same (padding differs).
    let alone = seg.segment(&cat).unwrap();
    let same = alone.labels.iter().zip(&masks[0].labels).filter(|(a, b)| a == b).count();
    assert!(same as f64 / alone.labels.len() as f64 > 0.9);
}

/// Flip averaging is symmetric: the mirror image's mask is the mirror of the image's mask, exactly
/// (a 256 x 128 image at short side 128 needs no padding, so the two canvases are mirrors). It
/// also changes the mask, and with `--quality` off the package's own policy is used.
#[test]
fn flip_averaging_is_mirror_symmetric() {
    use picie::infer::Quality;
    let seg = Segmenter::load(package_dir(), DeviceChoice::Cpu, None).unwrap();
    let img = image::imageops::resize(&load_fixture("coffee.jpg"), 256, 128, image::imageops::FilterType::Triangle);
    let mirror = image::imageops::flip_horizontal(&img);
    let crf = Default::default();
    let flip = |i: &image::RgbImage| seg.segment_batch_at(std::slice::from_ref(i), Quality::Flip, &crf).unwrap().remove(0);
    let (a, b) = (flip(&img), flip(&mirror));
    let mirrored_back: Vec<u8> = b.labels.chunks(256).flat_map(|row| row.iter().rev().copied()).collect();
    assert_eq!(a.labels, mirrored_back);
    // Without the flip the two masks are not mirrors of each other: the network is not symmetric.
    let fast = |i: &image::RgbImage| seg.segment_batch_at(std::slice::from_ref(i), Quality::Fast, &crf).unwrap().remove(0);
    let (c, d) = (fast(&img), fast(&mirror));
    let mirrored_back: Vec<u8> = d.labels.chunks(256).flat_map(|row| row.iter().rev().copied()).collect();
    assert_ne!(c.labels, mirrored_back);
    assert_eq!(c, seg.segment(&img).unwrap(), "a package clustered without the flip segments fast by default");
    // The CRF keeps the size and the classes.
    let best = seg.segment_batch_at(std::slice::from_ref(&img), Quality::Best, &crf).unwrap().remove(0);
    assert_eq!((best.width, best.height), (256, 128));
    assert!(best.labels.iter().all(|&l| (l as usize) < K));
}

/// An image too large for the CRF's budget is refined at a reduced size and scaled back up.
#[test]
fn the_crf_shrinks_what_does_not_fit_its_budget() {
    use picie::infer::{CrfConfig, Quality, Refinement};
    let seg = Segmenter::load(package_dir(), DeviceChoice::Cpu, None).unwrap();
    let img = load_fixture("coffee.jpg");
    let full = seg.segment_batch_at(std::slice::from_ref(&img), Quality::Crf, &Refinement::default()).unwrap().remove(0);
    let small = Refinement { crf: CrfConfig { max_pixels: 600 * 400 / 4, ..CrfConfig::default() }, ..Refinement::default() };
    let reduced = seg.segment_batch_at(std::slice::from_ref(&img), Quality::Crf, &small).unwrap().remove(0);
    assert_eq!((reduced.width, reduced.height), (600, 400));
    let same = full.labels.iter().zip(&reduced.labels).filter(|(a, b)| a == b).count() as f64 / full.labels.len() as f64;
    assert!(same > 0.8 && same < 1.0, "{same}");
}

/// `edges` through the ONNX graph (what a GPU server runs) gives the Rust filter's masks, at the
/// photo's own size and at a size over the output budget; the CPU default stays the Rust filter.
#[test]
fn edges_through_the_onnx_graph_matches_the_rust_filter() {
    use picie::infer::{GuidedConfig, Quality, Refinement};
    let seg = Segmenter::load(package_dir(), DeviceChoice::Cpu, None).unwrap();
    assert!(!seg.guided_in_graph(), "on the CPU the Rust filter is the default");
    let budget = Refinement { guided: GuidedConfig { max_output_pixels: 100_000, ..GuidedConfig::default() }, ..Refinement::default() };
    for (name, refine) in [("coffee.jpg", Refinement::default()), ("astronaut.jpg", budget)] {
        let img = load_fixture(name);
        let edges = |graph: bool| {
            seg.set_guided_in_graph(graph);
            seg.segment_batch_at(std::slice::from_ref(&img), Quality::Edges, &refine).unwrap().remove(0)
        };
        let (rust, graph) = (edges(false), edges(true));
        assert_eq!((graph.width, graph.height), (img.width(), img.height()));
        let same = rust.labels.iter().zip(&graph.labels).filter(|(a, b)| a == b).count() as f64 / rust.labels.len() as f64;
        assert!(same > 0.999, "{name}: {same}");
        assert!(seg.guided_in_graph(), "the graph did not fail");
    }
}

#[test]
fn package_problems_are_reported_by_file() {
    // Broken manifest.
    let (_d, p) = scratch_copy();
    std::fs::write(p.join(MANIFEST_FILE), b"{ not json").unwrap();
    let e = format!("{:#}", Package::load(&p).unwrap_err());
    assert!(e.contains("manifest.json") && e.contains("broken manifest"), "{e}");

    // K in the manifest disagrees with the centroids.
    let (_d, p) = scratch_copy();
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(p.join(MANIFEST_FILE)).unwrap()).unwrap();
    m["k"] = serde_json::json!(K + 1);
    std::fs::write(p.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
    let e = format!("{:#}", Package::load(&p).unwrap_err());
    assert!(e.contains("centroids.json") && e.contains(&format!("K = {}", K + 1)), "{e}");

    // A corrupted ONNX file.
    let (_d, p) = scratch_copy();
    let mut onnx = std::fs::read(p.join(ONNX_FILE)).unwrap();
    onnx.truncate(onnx.len() / 2);
    std::fs::write(p.join(ONNX_FILE), onnx).unwrap();
    let e = format!("{:#}", Package::load(&p).unwrap_err());
    assert!(e.contains("embedder.onnx") && e.contains("checksum"), "{e}");

    // Missing folder.
    let e = format!("{:#}", Package::load(Path::new("/nonexistent/pkg")).unwrap_err());
    assert!(e.contains("/nonexistent/pkg/manifest.json"), "{e}");
}

#[test]
fn class_names_and_colours_are_saved() {
    let (_d, p) = scratch_copy();
    let mut pkg = Package::load(&p).unwrap();
    let first = pkg.centroids.name(0);
    let mut c = pkg.centroids.clone();
    c.classes[1].name = Some("sky".into());
    c.classes[1].color = Some([10, 20, 30]);
    pkg.update_centroids(c).unwrap();
    let again = Package::load(&p).unwrap();
    assert_eq!(again.centroids.name(1), "sky");
    assert_eq!(again.centroids.color(1), [10, 20, 30]);
    assert_eq!(again.centroids.name(0), first, "other classes keep their names");

    // A wrong K is refused and nothing changes.
    let mut bad = again.centroids.clone();
    bad.classes.pop();
    let mut pkg = again;
    assert!(pkg.update_centroids(bad).is_err());
    assert_eq!(Package::load(&p).unwrap().centroids.k(), K);
}

#[test]
fn export_command_reproduces_the_package_onnx() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("again.onnx");
    picie::package::Package::load(package_dir()).unwrap().export_onnx(&out).unwrap();
    assert_eq!(std::fs::read(out).unwrap(), std::fs::read(package_dir().join(ONNX_FILE)).unwrap());
}

/// `picie package rebuild` of `from` on the fixture photos, K and seed as they were, blended
/// toward another package where `blend` says.
fn rebuild(from: &Path, blend: Option<(PathBuf, f32)>, out: &Path) -> anyhow::Result<Package> {
    let args = RebuildPackage {
        from: from.to_path_buf(),
        tap_weight: 0.0,
        blend,
        images: common::root().join("fixtures/images"),
        k: None,
        seed: 0,
        over_cluster: 0,
        out: out.to_path_buf(),
        name: None,
        replace: false,
        command: "test".into(),
    };
    Ok(rebuild_package(&args, &mut |_, _| {})?.0)
}

/// `package rebuild --blend-with`: every weight moves the given share of the way toward the
/// other package's, the ONNX graph is the blended embedder's, the provenance says so, and what
/// cannot be blended is refused before anything is written.
#[test]
fn rebuild_blends_the_weights_toward_another_package() {
    let dir = tempfile::tempdir().unwrap();
    let policy = InputPolicy { short_side: 128, ..InputPolicy::default() };
    let other = dir.path().join("other");
    init_fixture_package_with(&other, BackboneKind::EfficientnetLite0, FpnInit::Random, 1, policy);
    let blended = rebuild(package_dir(), Some((other.clone(), 0.25)), &dir.path().join("blended")).unwrap();

    let (from, toward) =
        (Package::load(package_dir()).unwrap().load_weights().unwrap(), Package::load(&other).unwrap().load_weights().unwrap());
    let weights = blended.load_weights().unwrap();
    assert_eq!(weights.len(), from.len());
    let mut moved = 0;
    for (name, t) in &weights.tensors {
        let (a, b) = (&from.tensors[name].data, &toward.tensors[name].data);
        moved += usize::from(a != b);
        for ((v, x), y) in t.data.iter().zip(a).zip(b) {
            assert!((v - (x + 0.25 * (y - x))).abs() <= 1e-6 * (1.0 + x.abs() + y.abs()), "{name}: {v} from {x} toward {y}");
        }
    }
    assert!(moved > 0, "the two packages' laterals differ (seeds 0 and 1)");
    let onnx = dir.path().join("again.onnx");
    blended.export_onnx(&onnx).unwrap();
    assert_eq!(std::fs::read(onnx).unwrap(), std::fs::read(blended.onnx_path()).unwrap());
    let record = &blended.manifest.provenance.details["blended_with"];
    assert_eq!(record["share"], serde_json::json!(0.25));
    assert_eq!(record["package"], serde_json::json!(Package::load(&other).unwrap().version()));

    // Blended again (a soup of three), the record keeps the earlier blend inside the new one;
    // rebuilt without a blend, the record stays (the weights are still the blend).
    let three = rebuild(&blended.dir, Some((package_dir().to_path_buf(), 1.0 / 3.0)), &dir.path().join("three")).unwrap();
    let record = &three.manifest.provenance.details["blended_with"];
    assert_eq!(record["earlier"]["share"], serde_json::json!(0.25));
    let kept = rebuild(&three.dir, None, &dir.path().join("kept")).unwrap();
    assert_eq!(&kept.manifest.provenance.details["blended_with"], record);

    // A share outside [0, 1], or embedders made for other input, is refused and writes nothing.
    let refused = dir.path().join("refused");
    let err = rebuild(package_dir(), Some((other.clone(), 1.5)), &refused).unwrap_err();
    assert!(err.to_string().contains("[0, 1]"), "{err:#}");
    let luminance = dir.path().join("luminance");
    let normalize = picie::infer::preprocess::Normalize::Luminance;
    init_fixture_package_with(&luminance, BackboneKind::EfficientnetLite0, FpnInit::Random, 1, InputPolicy { normalize, ..policy });
    let err = rebuild(package_dir(), Some((luminance, 0.5)), &refused).unwrap_err();
    assert!(err.to_string().contains("same input"), "{err:#}");
    assert!(!refused.exists());
}

/// A JPEG with an EXIF APP1 segment carrying `orientation`.
fn jpeg_with_orientation(w: u32, h: u32, orientation: u16) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, _| if x < w / 2 { image::Rgb([255, 0, 0]) } else { image::Rgb([0, 0, 255]) });
    let mut jpeg = vec![];
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    // TIFF header (little endian), one IFD entry: Orientation (0x0112), SHORT, count 1.
    let mut tiff = b"II*\0\x08\0\0\0".to_vec();
    tiff.extend(1u16.to_le_bytes());
    tiff.extend(0x0112u16.to_le_bytes());
    tiff.extend(3u16.to_le_bytes());
    tiff.extend(1u32.to_le_bytes());
    tiff.extend(orientation.to_le_bytes());
    tiff.extend([0, 0]);
    tiff.extend(0u32.to_le_bytes());
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend(tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend([0xFF, 0xE1]);
    out.extend(((app1.len() + 2) as u16).to_be_bytes());
    out.extend(app1);
    out.extend(&jpeg[2..]);
    out
}

#[test]
fn decoding_applies_exif_orientation_and_rejects_bad_bytes() {
    let rotated = decode_image(&jpeg_with_orientation(64, 32, 6), 1 << 30).unwrap();
    assert_eq!((rotated.width(), rotated.height()), (32, 64), "orientation 6 rotates by 90 degrees");
    let upright = decode_image(&jpeg_with_orientation(64, 32, 1), 1 << 30).unwrap();
    assert_eq!((upright.width(), upright.height()), (64, 32));

    assert!(matches!(decode_image(b"", 1 << 30), Err(DecodeError::Empty)));
    assert!(matches!(decode_image(b"definitely not an image", 1 << 30), Err(DecodeError::UnknownFormat)));
    let png = std::fs::read(common::fixture("chelsea.png")).unwrap();
    assert!(matches!(decode_image(&png[..png.len() / 2], 1 << 30), Err(DecodeError::Corrupt(_))));
    assert!(matches!(decode_image(&png, 1000), Err(DecodeError::TooLarge { width: 451, height: 300, .. })));
}

#[test]
fn metrics_are_recorded_in_the_manifest() {
    let (_d, p) = scratch_copy();
    let mut pkg = Package::load(&p).unwrap();
    pkg.record_metrics([("camvid_val_pixel_acc".to_string(), 53.76)]).unwrap();
    let again = Package::load(&p).unwrap();
    assert_eq!(again.manifest.metrics["camvid_val_pixel_acc"], 53.76);
}
