//! PiCIE training end to end on the shipped photos (tiny sizes), resume, bad input, and eval.

mod common;

use std::path::PathBuf;

use picie::model::BackboneKind;
use picie::package::Package;
use picie::train::correspond::CorrespondenceConfig;
use picie::train::loss::Balance;
use picie::train::picie::{TrainConfig, CHECKPOINT_STATE};
use picie::train::pipeline::{train, TrainArgs, TrainInit};

fn tiny(epochs: usize) -> TrainConfig {
    TrainConfig {
        k: 3,
        k2: 5,
        epochs,
        size: 64,
        batch: 2,
        lr: 1e-4,
        seed: 7,
        balance: Balance::Frequency,
        init_batches: 1,
        vectors_per_image: 64,
        freeze_stride: 4,
        ..TrainConfig::default()
    }
}

/// The largest difference between two sets of weights, tensor by tensor.
fn max_weight_difference(a: &picie::model::TensorMap, b: &picie::model::TensorMap) -> f32 {
    a.tensors
        .iter()
        .map(|(k, t)| t.data.iter().zip(&b.tensors[k].data).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max))
        .fold(0f32, f32::max)
}

fn args(dir: &std::path::Path, config: TrainConfig, resume: bool) -> TrainArgs {
    TrainArgs {
        images: picie::train::cluster::list_images(&common::root().join("fixtures/images")).unwrap(),
        out: dir.join("pkg"),
        init: TrainInit::Backbone { kind: BackboneKind::EfficientnetLite0, weights: common::lite0_safetensors().to_path_buf() },
        config,
        package_k: Some(4),
        package_over_cluster: picie::train::cluster::DEFAULT_OVER_CLUSTER,
        checkpoint: dir.join("ckpt"),
        resume,
        name: "tiny".into(),
        replace: true,
        command: "test".into(),
        self_train: None,
        snapshots: vec![],
        job: None,
    }
}

#[test]
fn trains_checkpoints_resumes_and_writes_a_package() {
    let dir = tempfile::tempdir().unwrap();
    // Two epochs straight.
    let mut phases = vec![];
    let mut last_fraction = 0.0;
    // With a snapshot after the first epoch, which must not change the run (checked below
    // against a run resumed without one).
    let (pkg, report) = train(&TrainArgs { snapshots: vec![1, 5], ..args(dir.path(), tiny(2), false) }, &mut |p| {
        assert!(p.fraction() >= last_fraction && p.fraction() <= 1.0, "progress only moves forward");
        last_fraction = p.fraction();
        phases.push(p.phase.as_str());
        true
    })
    .unwrap()
    .unwrap();
    assert_eq!(report.images_used, 4);
    assert_eq!(pkg.manifest.k, 4);
    assert!(pkg.manifest.provenance.trained);
    let losses = pkg.manifest.provenance.details["epoch_losses"].as_array().unwrap().clone();
    assert_eq!(losses.len(), 2);
    assert!(losses.iter().all(|l| l.as_f64().unwrap().is_finite() && l.as_f64().unwrap() > 0.0));
    let epoch = ["cluster", "cluster", "label", "label", "train", "train"];
    assert_eq!(phases, [epoch, epoch].concat(), "per epoch: two clustering, two labelling and two training steps");
    Package::load(&pkg.dir).unwrap();
    let snapshot = Package::load(&dir.path().join("pkg-e1")).unwrap();
    assert_eq!(snapshot.manifest.provenance.details["epoch_losses"].as_array().unwrap().len(), 1);
    assert_eq!(snapshot.manifest.provenance.details["train"]["epochs"], 1);
    assert_ne!(snapshot.load_weights().unwrap().tensors, pkg.load_weights().unwrap().tensors);
    assert!(!dir.path().join("pkg-e5").exists(), "no snapshot past the last epoch");

    // Training changed the embedder but not the frozen stem.
    let trained = pkg.load_weights().unwrap();
    let init = picie::model::TensorMap::load_safetensors(common::lite0_safetensors()).unwrap();
    let stem = |m: &picie::model::TensorMap| m.tensors["backbone._conv_stem.weight"].clone();
    assert_eq!(stem(&trained), stem(&init));
    let late = "backbone._blocks.15._project_conv.weight";
    assert_ne!(trained.tensors[late], init.tensors[late]);

    // One epoch, then resume for the second: same weights as the straight run (seeded, same draws).
    let dir2 = tempfile::tempdir().unwrap();
    let stopped =
        train(&args(dir2.path(), tiny(2), false), &mut |p| !(p.epoch == 1 && p.phase == picie::train::picie::Phase::Cluster)).unwrap();
    assert!(stopped.is_none(), "stopping returns no package");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir2.path().join("ckpt").join(CHECKPOINT_STATE)).unwrap()).unwrap();
    assert_eq!(state["epochs_done"], 1);
    assert!(!dir2.path().join("pkg").exists(), "no half-written package");
    let (resumed, _) = train(&args(dir2.path(), tiny(2), true), &mut |_| true).unwrap().unwrap();
    let a = pkg.load_weights().unwrap();
    let b = resumed.load_weights().unwrap();
    let max_diff = max_weight_difference(&a, &b);
    assert!(max_diff < 1e-5, "resumed run differs by {max_diff}");
}

#[test]
fn trains_on_frames_with_the_images_aspect_ratio() {
    // 96 x 64 frames: 24 x 16 feature cells, crop boxes that keep 3:2.
    let dir = tempfile::tempdir().unwrap();
    let wide = TrainConfig { width: Some(96), ..tiny(1) };
    let mut pixels_per_sec = vec![];
    let (pkg, _) = train(&args(dir.path(), wide.clone(), false), &mut |p| {
        pixels_per_sec.push(p.pixels_per_sec);
        true
    })
    .unwrap()
    .unwrap();
    assert!(pixels_per_sec.iter().all(|v| v.is_finite() && *v > 0.0));
    assert_eq!(pkg.manifest.provenance.details["train"]["width"], 96);
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("ckpt").join(CHECKPOINT_STATE)).unwrap()).unwrap();
    assert_eq!((state["config"]["size"].as_u64(), state["config"]["width"].as_u64()), (Some(64), Some(96)));
    // The same run with square frames is another run: its checkpoint is not resumed.
    let e = train(&args(dir.path(), TrainConfig { epochs: 2, ..tiny(1) }, true), &mut |_| true)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(e.contains("different settings"), "{e}");
}

#[test]
fn the_correspondence_term_changes_training_and_is_recorded() {
    let plain_dir = tempfile::tempdir().unwrap();
    let (plain, _) = train(&args(plain_dir.path(), tiny(1), false), &mut |_| true).unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let with = TrainConfig { correspondence: CorrespondenceConfig { weight: 1.0, ..Default::default() }, ..tiny(1) };
    let (pkg, _) = train(&args(dir.path(), with, false), &mut |_| true).unwrap().unwrap();
    let losses = pkg.manifest.provenance.details["epoch_losses"].as_array().unwrap().clone();
    assert!(losses.iter().all(|l| l.as_f64().unwrap().is_finite()));
    // Same seed, same draws: only the term differs, and it moves the trained layers.
    let late = "backbone._blocks.15._project_conv.weight";
    let (a, b) = (plain.load_weights().unwrap(), pkg.load_weights().unwrap());
    assert!(max_weight_difference(&a, &b) > 0.0);
    assert_ne!(a.tensors[late], b.tensors[late]);
    // The package and the checkpoint say how it was trained; a run without the term writes
    // settings as before the term existed.
    assert_eq!(pkg.manifest.provenance.details["train"]["correspondence"]["weight"], 1.0);
    assert!(plain.manifest.provenance.details["train"].get("correspondence").is_none());
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("ckpt").join(CHECKPOINT_STATE)).unwrap()).unwrap();
    assert_eq!(state["config"]["correspondence"]["inter_shift"], 0.5);
}

#[test]
fn the_command_reports_progress_in_a_log() {
    // stderr is a pipe here, as in a log file or a container: indicatif would draw nothing.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_picie"))
        .args(["train", "--images"])
        .arg(common::root().join("fixtures/images"))
        .arg("--out")
        .arg(dir.path().join("pkg"))
        .arg("--backbone-weights")
        .arg(common::lite0_safetensors())
        .args(["--k", "3", "--k2", "5", "--package-k", "3", "--epochs", "2", "--size", "64", "--batch", "2", "--freeze-stride", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The first step's line, then one line per finished epoch.
    assert!(stderr.contains("% epoch 1/2 cluster 1/2"), "{stderr}");
    assert!(stderr.contains("epoch 1/2 done loss") && stderr.contains("epoch 2/2 done loss"), "{stderr}");
}

#[test]
fn bad_training_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = |c: TrainConfig| train(&args(dir.path(), c, false), &mut |_| true).err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(run(TrainConfig { k: 1, ..tiny(1) }).contains("k must be at least 2"));
    assert!(run(TrainConfig { k2: 3, ..tiny(1) }).contains("k2 must be larger than k"));
    assert!(run(TrainConfig { size: 70, ..tiny(1) }).contains("multiple of 32"));
    assert!(run(TrainConfig { width: Some(100), ..tiny(1) }).contains("width must be a positive multiple of 32"));
    let corr = |weight: f32, inter_shift: f32| TrainConfig {
        correspondence: CorrespondenceConfig { weight, inter_shift, ..Default::default() },
        ..tiny(1)
    };
    assert!(run(corr(-1.0, 0.5)).contains("correspondence weight must be 0 (off) or positive"));
    assert!(run(corr(1.0, f32::NAN)).contains("correspondence inter shift must be a finite number"));

    // Unreadable files are skipped and named; too few readable images is an error.
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    std::fs::copy(common::fixture("chelsea.png"), imgs.join("cat.png")).unwrap();
    std::fs::write(imgs.join("broken.jpg"), b"nope").unwrap();
    let mut a = args(dir.path(), tiny(1), false);
    a.images = picie::train::cluster::list_images(&imgs).unwrap();
    let e = format!("{:#}", train(&a, &mut |_| true).err().unwrap());
    assert!(e.contains("at least 2 readable images"), "{e}");

    // A checkpoint from other settings is not resumed.
    let ok = args(dir.path(), tiny(1), false);
    train(&ok, &mut |_| true).unwrap().unwrap();
    let e = format!("{:#}", train(&args(dir.path(), TrainConfig { k: 4, ..tiny(2) }, true), &mut |_| true).err().unwrap());
    assert!(e.contains("different settings"), "{e}");
    assert!(Package::load(&dir.path().join("pkg")).is_ok(), "the earlier package is untouched");
}

#[test]
fn eval_scores_a_package_against_labels() {
    // Labels made from the package's own predictions: the package scores 100 %.
    let dir = tempfile::tempdir().unwrap();
    let (imgs, labels) = (dir.path().join("i"), dir.path().join("l"));
    std::fs::create_dir_all(&imgs).unwrap();
    std::fs::create_dir_all(&labels).unwrap();
    let model = common::root().join("models/default");
    let seg = picie::infer::Segmenter::load(&model, picie::infer::DeviceChoice::Cpu, None).unwrap();
    for name in ["chelsea.png", "coffee.jpg"] {
        std::fs::copy(common::fixture(name), imgs.join(name)).unwrap();
        let img = picie::infer::preprocess::decode_file(&common::fixture(name)).unwrap();
        let mut mask = seg.segment(&img).unwrap();
        // Relabel through a permutation and mark a stripe as ignored.
        mask.labels.iter_mut().for_each(|l| *l = (*l + 3) % 11);
        mask.labels[..100].fill(255);
        let stem = PathBuf::from(name).file_stem().unwrap().to_str().unwrap().to_string();
        image::GrayImage::from_raw(mask.width, mask.height, mask.labels).unwrap().save(labels.join(format!("{stem}.png"))).unwrap();
    }
    let pairs = picie::eval::paired_files(&imgs, &labels).unwrap();
    use picie::infer::Quality;
    let crf = picie::infer::Refinement::default();
    let fast = [Quality::Fast];
    let r = picie::eval::evaluate(
        &model,
        &pairs,
        11,
        picie::eval::Clusters::Package,
        picie::infer::DeviceChoice::Cpu,
        &fast,
        &crf,
        &mut |_, _| {},
    )
    .unwrap()
    .remove(0);
    assert!((r.pixel_accuracy - 1.0).abs() < 1e-12, "{}", r.pixel_accuracy);
    assert_eq!(r.pixels, (451 * 300 + 600 * 400 - 200) as u64);
    assert_eq!(r.matching[0], Some(3));

    // Several qualities in one run come back in the order asked, each scored on its own masks:
    // the labels are the fast masks, so the refined ones score less, though not much less.
    let rs = picie::eval::evaluate(
        &model,
        &pairs,
        11,
        picie::eval::Clusters::Package,
        picie::infer::DeviceChoice::Cpu,
        &[Quality::Best, Quality::Fast],
        &crf,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(rs.iter().map(|r| r.quality).collect::<Vec<_>>(), [Quality::Best, Quality::Fast]);
    assert!((rs[1].pixel_accuracy - 1.0).abs() < 1e-12);
    assert!(rs[0].pixel_accuracy > 0.6 && rs[0].pixel_accuracy < 0.999, "{}", rs[0].pixel_accuracy);

    // Fresh k-means with several seeds shares one embedding pass and gives, seed by seed, what
    // a single-seed evaluation gives.
    use picie::eval::{evaluate, Clusters};
    let cluster_imgs = picie::train::cluster::list_images(&common::root().join("fixtures/images")).unwrap();
    let cpu = picie::infer::DeviceChoice::Cpu;
    let mut steps: Vec<(f64, String)> = vec![];
    let both = evaluate(
        &model,
        &pairs,
        11,
        Clusters::Fresh { images: &cluster_imgs, seeds: &[0, 1], k: None, over: None },
        cpu,
        &fast,
        &crf,
        &mut |f, what| steps.push((f, what.to_string())),
    )
    .unwrap();
    assert_eq!(both.len(), 2);
    // Progress goes forward through the cluster images, k-means and every scored image, to the end.
    assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0) && steps.last().unwrap().0 == 1.0, "{steps:?}");
    for step in ["embedding the cluster images 1/", "k-means, 2 seeds", &format!("scoring {}/{}", pairs.len(), pairs.len())] {
        assert!(steps.iter().any(|(_, s)| s.contains(step)), "{step} missing from {steps:?}");
    }
    for (seed, r) in [0u64, 1].into_iter().zip(&both) {
        let alone = evaluate(
            &model,
            &pairs,
            11,
            Clusters::Fresh { images: &cluster_imgs, seeds: &[seed], k: None, over: None },
            cpu,
            &fast,
            &crf,
            &mut |_, _| {},
        )
        .unwrap()
        .remove(0);
        assert_eq!((r.k, &r.confusion), (alone.k, &alone.confusion), "seed {seed}");
    }
    assert_ne!(both[0].confusion, both[1].confusion, "the seeds give different clusterings");
}

/// Self-training after PiCIE: the targets come from the PiCIE stage's package, the written
/// package keeps that stage's centroids and changes only the embedder, and a stopped stage
/// resumes to the same weights as a straight run.
#[test]
fn self_training_keeps_the_centroids_and_resumes() {
    use picie::train::selftrain::SelfTrainConfig;
    let self_train = |epochs| Some(SelfTrainConfig { epochs, min_confidence: 0.3, min_agreement: 0.5, ..SelfTrainConfig::default() });
    let dir = tempfile::tempdir().unwrap();
    let mut phases = vec![];
    // Classes merged from 8 over-clusters, so self-training scores a class by its best member.
    let straight = TrainArgs { self_train: self_train(2), package_over_cluster: 8, ..args(dir.path(), tiny(1), false) };
    let (pkg, _) = train(&straight, &mut |p| {
        phases.push(p.phase.as_str());
        true
    })
    .unwrap()
    .unwrap();
    assert_eq!(phases.iter().filter(|p| **p == "pseudo-label").count(), 4, "one pseudo-labelling step per image");
    assert_eq!(phases.iter().filter(|p| **p == "self-train").count(), 4, "two epochs of two steps");
    let stage = Package::load(&dir.path().join("ckpt").join(picie::train::pipeline::STAGE_PACKAGE)).unwrap();
    assert_eq!(stage.centroids.over_clusters(), Some(8));
    assert_eq!(pkg.centroids, stage.centroids, "classes held fixed");
    assert_ne!(
        pkg.load_weights().unwrap().tensors["backbone._blocks.15._project_conv.weight"],
        stage.load_weights().unwrap().tensors["backbone._blocks.15._project_conv.weight"]
    );
    let d = &pkg.manifest.provenance.details;
    assert_eq!(d["self_train_losses"].as_array().unwrap().len(), 2);
    let kept = d["self_train_targets_kept"].as_f64().unwrap();
    assert!(kept > 0.05 && kept <= 1.0, "{kept}");
    Package::load(&pkg.dir).unwrap();

    // Stopped in the second self-training epoch, then resumed: the same weights.
    let dir2 = tempfile::tempdir().unwrap();
    let first = TrainArgs { self_train: self_train(2), package_over_cluster: 8, ..args(dir2.path(), tiny(1), false) };
    let mut seen = 0;
    let stopped = train(&first, &mut |p| {
        if p.phase == picie::train::picie::Phase::SelfTrain {
            seen += 1;
        }
        seen < 3
    })
    .unwrap();
    assert!(stopped.is_none());
    let (resumed, _) = train(&TrainArgs { resume: true, ..first }, &mut |_| true).unwrap().unwrap();
    let (a, b) = (pkg.load_weights().unwrap(), resumed.load_weights().unwrap());
    let max_diff = max_weight_difference(&a, &b);
    assert!(max_diff < 1e-5, "resumed self-training differs by {max_diff}");
}
