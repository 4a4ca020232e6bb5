//! The PiCIE decoder: four 1x1 laterals with bias to a common width, a top-down pass that
//! upsamples bilinearly (half-pixel, align_corners = false) and adds, output stride 4.
//! No 3x3 smoothing, no normalisation or activation, as in the authors' code.

use anyhow::Result;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor};

use super::conv;
use super::layers::{emit_conv_bias, export_conv_bias, load_conv_bias, ConvSpec, WeightSource};
use super::onnx_graph::{attr_string, GraphBuilder};
use super::weights::TensorMap;

#[derive(Module, Debug)]
pub struct Fpn {
    /// `laterals[i]` maps the tap at stride 4 * 2^i to the output width.
    pub laterals: Vec<Conv2d>,
}

fn lateral_key(i: usize) -> String {
    format!("lateral.{i}")
}

impl Fpn {
    pub fn load(src: &dyn WeightSource, tap_channels: [usize; 4], dim: usize, device: &Device) -> Result<Self> {
        let laterals = tap_channels
            .iter()
            .enumerate()
            .map(|(i, &c)| load_conv_bias(src, &lateral_key(i), ConvSpec::pointwise(c, dim), device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { laterals })
    }

    pub fn forward(&self, taps: [Tensor<4>; 4]) -> Tensor<4> {
        let [c2, c3, c4, c5] = taps;
        let mut out = conv::forward(&self.laterals[3], c5);
        for (i, tap) in [(2, c4), (1, c3), (0, c2)] {
            let lateral = conv::forward(&self.laterals[i], tap);
            let [_, _, h, w] = lateral.dims();
            let up =
                interpolate(out, InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false).with_output_size([h, w]));
            out = up + lateral;
        }
        out
    }

    pub fn export(&self, out: &mut TensorMap) {
        for (i, l) in self.laterals.iter().enumerate() {
            export_conv_bias(l, out, &lateral_key(i));
        }
    }

    /// ONNX: Resize by exactly 2 (inputs are multiples of 32, so every level is twice the next),
    /// which keeps H and W dynamic where a size-based Resize would freeze them.
    pub fn emit(&self, g: &mut GraphBuilder, taps: &[String; 4]) -> String {
        let mut out = emit_conv_bias(&self.laterals[3], g, &taps[3]);
        for i in [2usize, 1, 0] {
            let lateral = emit_conv_bias(&self.laterals[i], g, &taps[i]);
            let scales = g.constant_f32("scales", &[4], vec![1.0, 1.0, 2.0, 2.0]);
            let up = g.node(
                "Resize",
                &[&out, "", &scales],
                vec![attr_string("mode", "linear"), attr_string("coordinate_transformation_mode", "half_pixel")],
            );
            out = g.node("Add", &[&up, &lateral], vec![]);
        }
        out
    }
}
