//! A ViT backbone end to end: a DINO ViT-S/16 checkpoint file in the authors' layout (random
//! values, the real architecture) trains with the backbone frozen, becomes a package, and the
//! server segments with it.

mod common;

use std::path::{Path, PathBuf};

use picie::model::embedder::Backbone;
use picie::model::layers::SeededInit;
use picie::model::{BackboneKind, NamedTensor, TensorMap};
use picie::server::ServeConfig;
use picie::train::loss::Balance;
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
