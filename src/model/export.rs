//! ONNX export of the embedder. The contract outside tools rely on:
//! input `image`: float32 N x 3 x H x W, RGB in [0, 1] (ImageNet normalisation is inside);
//! output `features`: N x dim x H/4 x W/4, unit L2 norm over channels. N, H and W are dynamic
//! (H and W multiples of 32). Batch norm is folded into the convolutions.

use std::path::Path;

use anyhow::{Context, Result};
use protobuf::Message;

use super::embedder::{Embedder, EmbedderConfig, IMAGENET_MEAN, IMAGENET_STD, NORM_EPS, OUTPUT_STRIDE};
use super::onnx_graph::{attr_int, attr_string, value_info_f32, Dim, GraphBuilder};

pub const INPUT_NAME: &str = "image";
pub const OUTPUT_NAME: &str = "features";

pub fn to_onnx_bytes(embedder: &Embedder, config: EmbedderConfig) -> Result<Vec<u8>> {
    let mut g = GraphBuilder::new();
    let x = imagenet_normalized_input(&mut g);

    let taps = embedder.backbone.emit(&mut g, &x);
    let raw = embedder.fpn.emit(&mut g, &taps);
    if config.tap_weight > 0.0 {
        // Hypercolumn (Embedder::forward_served): normalised FPN features, then each normalised
        // tap upsampled to stride 4 (by an exact factor: H and W stay dynamic) and weighted.
        let mut parts = vec![l2_normalize(&mut g, &raw)];
        let weight = g.constant_f32("tap_weight", &[], vec![config.tap_weight]);
        for (tap, stride) in taps.iter().zip(embedder.fpn.tap_strides) {
            let mut t = l2_normalize(&mut g, tap);
            if stride > OUTPUT_STRIDE {
                let s = (stride / OUTPUT_STRIDE) as f32;
                let scales = g.constant_f32("scales", &[4], vec![1.0, 1.0, s, s]);
                t = g.node(
                    "Resize",
                    &[&t, "", &scales],
                    vec![attr_string("mode", "linear"), attr_string("coordinate_transformation_mode", "half_pixel")],
                );
            }
            parts.push(g.node("Mul", &[&t, &weight], vec![]));
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let cat = g.node("Concat", &refs, vec![attr_int("axis", 1)]);
        l2_normalize(&mut g, &cat);
    } else {
        l2_normalize(&mut g, &raw);
    }
    g.rename_last_output(OUTPUT_NAME);

    let input = input_info();
    let output =
        value_info_f32(OUTPUT_NAME, &[Dim::Symbol("N"), Dim::Fixed(config.output_dim() as i64), Dim::Symbol("H/4"), Dim::Symbol("W/4")]);
    let doc = format!(
        "picie embedder ({:?} + FPN {}{}). Input: RGB in [0,1], N x 3 x H x W, H and W multiples of 32. \
         Output: unit-norm features N x {} x H/4 x W/4.",
        config.backbone,
        config.dim,
        if config.tap_weight > 0.0 { format!(", hypercolumn with tap weight {}", config.tap_weight) } else { String::new() },
        config.output_dim()
    );
    let model = g.finish("picie_embedder", vec![input], vec![output], &doc);
    model.write_to_bytes().context("serialising the ONNX model")
}

/// The name of the `i`-th output of [`frozen_taps_onnx_bytes`].
pub fn tap_output_name(i: usize) -> String {
    format!("tap{i}")
}

/// A graph of the backbone's first `n` taps (1 to 4) from the same `image` input as the
/// embedder's graph (ImageNet normalisation inside): training runs its frozen layers here.
/// Outputs `tap0` .. `tap{n-1}`, N x C x H/s x W/s at the taps' strides.
pub fn frozen_taps_onnx_bytes(embedder: &Embedder, n: usize) -> Result<Vec<u8>> {
    let mut g = GraphBuilder::new();
    let x = imagenet_normalized_input(&mut g);
    let taps = embedder.backbone.emit_taps(&mut g, &x, n);
    let mut outputs = vec![];
    for (i, tap) in taps.iter().enumerate() {
        let name = tap_output_name(i);
        g.node("Identity", &[tap], vec![]);
        g.rename_last_output(&name);
        outputs.push(value_info_f32(&name, &[Dim::Symbol("N"), Dim::Symbol("C"), Dim::Symbol("h"), Dim::Symbol("w")]));
    }
    let input = input_info();
    let model = g.finish("picie_frozen_taps", vec![input], outputs, &format!("picie backbone's first {n} taps (frozen layers)"));
    model.write_to_bytes().context("serialising the ONNX model")
}

/// The `image` input with ImageNet's mean and spread applied, as both graphs begin.
fn imagenet_normalized_input(g: &mut GraphBuilder) -> String {
    let mean = g.constant_f32("imagenet_mean", &[1, 3, 1, 1], IMAGENET_MEAN.to_vec());
    let std = g.constant_f32("imagenet_std", &[1, 3, 1, 1], IMAGENET_STD.to_vec());
    let centred = g.node("Sub", &[INPUT_NAME, &mean], vec![]);
    g.node("Div", &[&centred, &std], vec![])
}

/// The `image` input: float32 N x 3 x H x W.
fn input_info() -> onnx_protobuf::ValueInfoProto {
    value_info_f32(INPUT_NAME, &[Dim::Symbol("N"), Dim::Fixed(3), Dim::Symbol("H"), Dim::Symbol("W")])
}

/// L2 normalisation over channels: x / max(sqrt(sum(x^2)), eps), as in burn's forward.
fn l2_normalize(g: &mut GraphBuilder, x: &str) -> String {
    let sq = g.node("Mul", &[x, x], vec![]);
    let axes = g.constant_i64("channel_axis", vec![1]);
    let sum = g.node("ReduceSum", &[&sq, &axes], vec![attr_int("keepdims", 1)]);
    let norm = g.node("Sqrt", &[&sum], vec![]);
    let eps = g.constant_f32("norm_eps", &[], vec![NORM_EPS]);
    let safe = g.node("Max", &[&norm, &eps], vec![]);
    g.node("Div", &[x, &safe], vec![])
}

pub fn export_onnx(embedder: &Embedder, config: EmbedderConfig, path: &Path) -> Result<()> {
    let bytes = to_onnx_bytes(embedder, config)?;
    crate::util::write_atomic(path, &bytes)
}
