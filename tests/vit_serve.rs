//! A ViT backbone end to end: a DINO ViT-S/16 checkpoint file in the authors' layout (random
//! values, the real architecture) trains with the backbone frozen, becomes a package, and the
//! server segments with it; a DINOv2 file makes a package through `package init`.

mod common;

use std::path::{Path, PathBuf};

use picie::infer::{DeviceChoice, Segmenter};
use picie::model::embedder::Backbone;
use picie::model::layers::SeededInit;
use picie::model::{BackboneKind, NamedTensor, TensorMap};
use picie::package::InputPolicy;
use picie::server::ServeConfig;
use picie::train::fpn_init::FpnInit;
use picie::train::loss::Balance;
use picie::train::packaging::{init_package, InitPackage};
use picie::train::picie::TrainConfig;
use picie::train::pipeline::{train, TrainArgs, TrainInit};
use serde_json::Value;

const KIND: BackboneKind = BackboneKind::DinoVits16;
/// Clusters in the written package.
const PACKAGE_K: usize = 4;

/// `dino_deitsmall16_pretrain.pth` as the authors' `torch.save(state_dict)` lays it out, with
/// seeded values in place of the trained ones.
fn dino_checkpoint(dir: &Path) -> (PathBuf, TensorMap) {
    let backbone = Backbone::load(KIND, &SeededInit { seed: 11 }, &burn::tensor::Device::flex()).unwrap();
    let mut map = TensorMap::new("seeded");
    backbone.export(&mut map);
    let tensors: Vec<(String, NamedTensor)> = map.tensors.clone().into_iter().collect();
    let path = dir.join("dino_deitsmall16_pretrain.pth");
    common::write_torch_zip(&path, &tensors);
    (path, map)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dino_checkpoint_trains_frozen_and_its_package_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (checkpoint, original) = dino_checkpoint(dir.path());
    let models = dir.path().join("models");
    let args = TrainArgs {
        images: picie::train::cluster::list_images(&common::root().join("fixtures/images")).unwrap(),
        out: models.join("default"),
        // The released file as it is: no `picie weights import` step.
        init: TrainInit::Backbone { kind: KIND, weights: checkpoint },
        config: TrainConfig {
            k: 3,
            k2: 5,
            epochs: 1,
            size: 64,
            batch: 2,
            lr: 1e-3,
            seed: 7,
            balance: Balance::Frequency,
            init_batches: 1,
            vectors_per_image: 64,
            // The ViT's blocks all work at its patch stride: any stride freezes all of it.
            freeze_stride: 16,
            ..TrainConfig::default()
        },
        package_k: Some(PACKAGE_K),
        package_over_cluster: picie::train::cluster::DEFAULT_OVER_CLUSTER,
        checkpoint: dir.path().join("ckpt"),
        resume: false,
        name: "vit".into(),
        replace: true,
        command: "test".into(),
        self_train: None,
        snapshots: vec![],
        job: None,
    };
    let (pkg, _) = tokio::task::spawn_blocking(move || train(&args, &mut |_| true)).await.unwrap().unwrap().unwrap();
    assert_eq!(pkg.manifest.embedder.backbone, KIND);
    let losses = pkg.manifest.provenance.details["epoch_losses"].as_array().unwrap().clone();
    assert!(losses.iter().all(|l| l.as_f64().unwrap().is_finite()), "{losses:?}");

    // Frozen: the package holds the checkpoint's tensors unchanged, under `backbone.`.
    let weights = pkg.load_weights().unwrap();
    for (name, t) in &original.tensors {
        assert_eq!(&weights.tensors[&format!("backbone.{name}")], t, "{name} changed in training");
    }

    let data = tempfile::tempdir().unwrap();
    let server = common::server::TestServer::serve(ServeConfig::new(&models, data.path()), Default::default()).await;
    let cat = std::fs::read(common::fixture("chelsea.png")).unwrap();
    let r = server.client.post(server.url("/segment?format=json")).header("content-type", "image/png").body(cat).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let j: Value = r.json().await.unwrap();
    assert_eq!((j["width"].as_u64(), j["height"].as_u64(), j["num_classes"].as_u64()), (Some(451), Some(300), Some(PACKAGE_K as u64)));
    server.stop().await;
}

#[test]
fn package_init_reads_the_released_file_and_measures_pca_laterals_on_the_vit() {
    // `picie package init --backbone dinov2-vits14 --backbone-weights dinov2_vits14_pretrain.pth`:
    // DINOv2's layout (layer scale, a mask token that is ignored), PCA laterals over the four
    // taps at the patch grid, k-means, export; then the package segments.
    let dir = tempfile::tempdir().unwrap();
    let kind = BackboneKind::Dinov2Vits14;
    let backbone = Backbone::load(kind, &SeededInit { seed: 12 }, &burn::tensor::Device::flex()).unwrap();
    let mut map = TensorMap::new("seeded");
    backbone.export(&mut map);
    let dim = kind.tap_channels()[0];
    map.insert("mask_token", NamedTensor::new(vec![1, dim], vec![0.0; dim]));
    let checkpoint = dir.path().join("dinov2_vits14_pretrain.pth");
    common::write_torch_zip(&checkpoint, &map.tensors.clone().into_iter().collect::<Vec<_>>());
    let out = dir.path().join("pkg");
    let (pkg, _) = init_package(
        &InitPackage {
            backbone: kind,
            backbone_weights: checkpoint,
            images: common::root().join("fixtures/images"),
            k: PACKAGE_K,
            seed: 0,
            out: out.clone(),
            name: "vit".into(),
            policy: InputPolicy { short_side: 128, ..InputPolicy::default() },
            replace: false,
            command: "test".into(),
            fpn_init: FpnInit::Pca,
        },
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(pkg.manifest.provenance.details["fpn_init"], "pca");
    let weights = pkg.load_weights().unwrap();
    assert!(!weights.tensors.contains_key("backbone.mask_token"), "the mask token is not part of the backbone");
    assert_eq!(weights.tensors["backbone.blocks.11.ls2.gamma"], map.tensors["blocks.11.ls2.gamma"]);
    let seg = Segmenter::load(&out, DeviceChoice::Cpu, None).unwrap();
    let img = image::open(common::fixture("chelsea.png")).unwrap().to_rgb8();
    let mask = seg.segment(&img).unwrap();
    assert_eq!((mask.width, mask.height), (451, 300));
    assert!(mask.labels.iter().all(|&l| (l as usize) < PACKAGE_K));
}
