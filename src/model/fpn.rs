//! The PiCIE decoder: four 1x1 laterals with bias to a common width, a top-down pass that
//! upsamples bilinearly (half-pixel, align_corners = false) and adds, output stride 4.
//! No 3x3 smoothing, no normalisation or activation, as in the authors' code.
//!
//! A ViT's four taps share one stride (its patch grid): the top-down pass is then a plain sum,
//! and the sum is upsampled bilinearly to stride 4 at the end (by 2 for patch 8, by 4 for a
//! grid at stride 16). The features carry the patch grid's detail, no finer.

use anyhow::Result;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};

use super::layers::{emit_conv_bias, export_conv_bias, load_conv_bias, ConvSpec, WeightSource};
use super::onnx_graph::{attr_string, GraphBuilder};
use super::weights::TensorMap;
use super::{conv, resample};

/// The stride of the FPN's output, whatever the backbone's taps: 4, as in PiCIE (feature maps
/// are 1/4 of the input in height and width).
pub const OUTPUT_STRIDE: usize = 4;

#[derive(Module, Debug)]
pub struct Fpn {
    /// `laterals[i]` maps tap i (at stride `tap_strides[i]`) to the output width.
    pub laterals: Vec<Conv2d>,
    #[module(skip)]
    pub tap_strides: [usize; 4],
}

fn upsample(x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    resample::resize(x, size)
}

/// ONNX: Resize by an exact factor (the inputs are multiples of 32, so every level is an exact
/// multiple of the next), which keeps H and W dynamic where a size-based Resize would freeze them.
fn emit_upsample(g: &mut GraphBuilder, x: &str, factor: usize) -> String {
    let f = factor as f32;
    let scales = g.constant_f32("scales", &[4], vec![1.0, 1.0, f, f]);
    g.node("Resize", &[x, "", &scales], vec![attr_string("mode", "linear"), attr_string("coordinate_transformation_mode", "half_pixel")])
}

fn lateral_key(i: usize) -> String {
    format!("lateral.{i}")
}

impl Fpn {
    /// `tap_channels` and `tap_strides`: the backbone's (`BackboneKind::tap_channels` and
    /// `tap_strides` in the embedder), deepest last.
    pub fn load(src: &dyn WeightSource, tap_channels: [usize; 4], tap_strides: [usize; 4], dim: usize, device: &Device) -> Result<Self> {
        let laterals = tap_channels
            .iter()
            .enumerate()
            .map(|(i, &c)| load_conv_bias(src, &lateral_key(i), ConvSpec::pointwise(c, dim), device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { laterals, tap_strides })
    }

    /// The taps to N x dim x H/4 x W/4.
    pub fn forward(&self, taps: [Tensor<4>; 4]) -> Tensor<4> {
        let [c2, c3, c4, c5] = taps;
        let mut out = conv::forward(&self.laterals[3], c5);
        for (i, tap) in [(2, c4), (1, c3), (0, c2)] {
            let lateral = conv::forward(&self.laterals[i], tap);
            let [_, _, h, w] = lateral.dims();
            if out.dims()[2..] != [h, w] {
                out = upsample(out, [h, w]);
            }
            out = out + lateral;
        }
        let factor = self.tap_strides[0] / OUTPUT_STRIDE;
        if factor > 1 {
            let [_, _, h, w] = out.dims();
            out = upsample(out, [h * factor, w * factor]);
        }
        out
    }

    pub fn export(&self, out: &mut TensorMap) {
        for (i, l) in self.laterals.iter().enumerate() {
            export_conv_bias(l, out, &lateral_key(i));
        }
    }

    pub fn emit(&self, g: &mut GraphBuilder, taps: &[String; 4]) -> String {
        let mut out = emit_conv_bias(&self.laterals[3], g, &taps[3]);
        for i in [2usize, 1, 0] {
            let lateral = emit_conv_bias(&self.laterals[i], g, &taps[i]);
            let factor = self.tap_strides[i + 1] / self.tap_strides[i];
            if factor > 1 {
                out = emit_upsample(g, &out, factor);
            }
            out = g.node("Add", &[&out, &lateral], vec![]);
        }
        let factor = self.tap_strides[0] / OUTPUT_STRIDE;
        if factor > 1 {
            out = emit_upsample(g, &out, factor);
        }
        out
    }
}
