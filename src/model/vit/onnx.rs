//! The ViT in the exported ONNX graph, node for node beside [`Vit::forward`]. N, H and W stay
//! dynamic: every shape the graph needs (the batch, the patch grid) is read from the patch
//! embedding's output with `Shape` at run time, and the positional embedding is resampled by a
//! `Resize` whose scales are computed from that grid ([`Vit::emit_pos_embed`]).

use onnx_protobuf::tensor_proto::DataType;

use super::pos_embed::{CUBIC_A, INTERPOLATE_OFFSET};
use super::{Vit, VitBlock, LN_EPS, TAPS};
use crate::model::layers::emit_conv_bias;
use crate::model::onnx_graph::{attr_float, attr_int, attr_ints, attr_string, GraphBuilder};
use crate::model::weights::NamedTensor;

/// `Slice` to the end of an axis.
const TO_END: i64 = i64::MAX;

fn tensor_constant(g: &mut GraphBuilder, hint: &str, t: &NamedTensor) -> String {
    g.constant_f32(hint, &t.shape, t.data.clone())
}

/// `x[start..end]` along `axis`.
fn slice(g: &mut GraphBuilder, x: &str, axis: i64, start: i64, end: i64) -> String {
    let starts = g.constant_i64("starts", vec![start]);
    let ends = g.constant_i64("ends", vec![end]);
    let axes = g.constant_i64("axes", vec![axis]);
    g.node("Slice", &[x, &starts, &ends, &axes], vec![])
}

fn transpose(g: &mut GraphBuilder, x: &str, perm: &[i64]) -> String {
    g.node("Transpose", &[x], vec![attr_ints("perm", perm)])
}

fn reshape(g: &mut GraphBuilder, x: &str, shape: Vec<i64>) -> String {
    let s = g.constant_i64("shape", shape);
    g.node("Reshape", &[x, &s], vec![])
}

fn layer_norm(g: &mut GraphBuilder, norm: &burn::nn::LayerNorm, x: &str) -> String {
    let gamma = tensor_constant(g, "ln_gamma", &NamedTensor::from_burn(norm.gamma.val()));
    let beta = tensor_constant(g, "ln_beta", &NamedTensor::from_burn(norm.beta.as_ref().expect("ViT norms have a bias").val()));
    g.node("LayerNormalization", &[x, &gamma, &beta], vec![attr_int("axis", -1), attr_float("epsilon", LN_EPS as f32)])
}

/// x W + b with burn's [in, out] weight.
fn linear(g: &mut GraphBuilder, l: &burn::nn::Linear, x: &str) -> String {
    let w = tensor_constant(g, "linear_w", &NamedTensor::from_burn(l.weight.val()));
    let y = g.node("MatMul", &[x, &w], vec![]);
    match &l.bias {
        Some(b) => {
            let b = tensor_constant(g, "linear_b", &NamedTensor::from_burn(b.val()));
            g.node("Add", &[&y, &b], vec![])
        }
        None => y,
    }
}

/// GELU with the exact erf (opset 17 has no Gelu node): 0.5 x (1 + erf(x / sqrt 2)).
fn gelu(g: &mut GraphBuilder, x: &str) -> String {
    let sqrt2 = g.constant_f32("sqrt2", &[], vec![std::f32::consts::SQRT_2]);
    let one = g.constant_f32("one", &[], vec![1.0]);
    let half = g.constant_f32("half", &[], vec![0.5]);
    let scaled = g.node("Div", &[x, &sqrt2], vec![]);
    let erf = g.node("Erf", &[&scaled], vec![]);
    let cdf = g.node("Add", &[&erf, &one], vec![]);
    let y = g.node("Mul", &[x, &cdf], vec![]);
    g.node("Mul", &[&y, &half], vec![])
}

fn layer_scale(g: &mut GraphBuilder, gamma: &Option<burn::module::Param<burn::tensor::Tensor<1>>>, x: String) -> String {
    match gamma {
        Some(gm) => {
            let c = tensor_constant(g, "ls_gamma", &NamedTensor::from_burn(gm.val()));
            g.node("Mul", &[&x, &c], vec![])
        }
        None => x,
    }
}

impl VitBlock {
    fn emit(&self, g: &mut GraphBuilder, x: &str) -> String {
        let d = self.qkv.weight.val().dims()[0];
        let (heads, hd) = (self.heads as i64, (d / self.heads) as i64);
        let h = layer_norm(g, &self.norm1, x);
        let qkv = linear(g, &self.qkv, &h);
        // N x L x 3 x heads x hd -> 3 x N x heads x L x hd.
        let qkv = reshape(g, &qkv, vec![0, 0, 3, heads, hd]);
        let qkv = transpose(g, &qkv, &[2, 0, 3, 1, 4]);
        let mut part = |i: i64| {
            let idx = g.constant_i64_shaped("qkv_index", &[], vec![i]);
            g.node("Gather", &[&qkv, &idx], vec![attr_int("axis", 0)])
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let scale = g.constant_f32("attn_scale", &[], vec![1.0 / (hd as f32).sqrt()]);
        let q = g.node("Mul", &[&q, &scale], vec![]);
        let kt = transpose(g, &k, &[0, 1, 3, 2]);
        let scores = g.node("MatMul", &[&q, &kt], vec![]);
        let weights = g.node("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        let a = g.node("MatMul", &[&weights, &v], vec![]);
        let a = transpose(g, &a, &[0, 2, 1, 3]);
        let a = reshape(g, &a, vec![0, 0, d as i64]);
        let a = linear(g, &self.proj, &a);
        let a = layer_scale(g, &self.ls1, a);
        let x = g.node("Add", &[x, &a], vec![]);
        let h = layer_norm(g, &self.norm2, &x);
        let h = linear(g, &self.fc1, &h);
        let h = gelu(g, &h);
        let h = linear(g, &self.fc2, &h);
        let h = layer_scale(g, &self.ls2, h);
        g.node("Add", &[&x, &h], vec![])
    }
}

impl Vit {
    /// [`Vit::forward_image`] in ONNX: `x` N x 3 x H x W, H and W multiples of 32.
    pub fn emit(&self, g: &mut GraphBuilder, x: &str) -> [String; TAPS] {
        let (p, s) = (self.spec.patch, self.spec.stride());
        if p == s {
            return self.emit_tokens(g, x);
        }
        // Scales rather than sizes keep H and W dynamic; p / s of a multiple of 32 is exact.
        let r = p as f32 / s as f32;
        let scales = g.constant_f32("scales", &[4], vec![1.0, 1.0, r, r]);
        let resized = g.node(
            "Resize",
            &[x, "", &scales],
            vec![attr_string("mode", "linear"), attr_string("coordinate_transformation_mode", "half_pixel")],
        );
        self.emit_tokens(g, &resized)
    }

    /// [`Vit::forward`] in ONNX: `x` with H and W multiples of the patch size.
    pub fn emit_tokens(&self, g: &mut GraphBuilder, x: &str) -> [String; TAPS] {
        let (d, r) = (self.spec.dim as i64, self.spec.registers as i64);
        let grid = emit_conv_bias(&self.patch_embed, g, x);
        // [N, D, gh, gw]: the batch and the grid, at run time.
        let grid_shape = g.node("Shape", &[&grid], vec![]);
        let batch = slice(g, &grid_shape, 0, 0, 1);
        let flat = reshape(g, &grid, vec![0, d, -1]);
        let patches = transpose(g, &flat, &[0, 2, 1]);
        let per_image = |g: &mut GraphBuilder, hint: &str, t: &NamedTensor| {
            let c = tensor_constant(g, hint, t);
            let rest = g.constant_i64("token_shape", vec![t.shape[1] as i64, d]);
            let shape = g.node("Concat", &[&batch, &rest], vec![attr_int("axis", 0)]);
            g.node("Expand", &[&c, &shape], vec![])
        };
        let cls = per_image(g, "cls_token", &NamedTensor::from_burn(self.cls_token.val()));
        let tokens = g.node("Concat", &[&cls, &patches], vec![attr_int("axis", 1)]);
        let pos = self.emit_pos_embed(g, &grid_shape);
        let mut t = g.node("Add", &[&tokens, &pos], vec![]);
        if let Some(reg) = &self.register_tokens {
            let regs = per_image(g, "register_tokens", &NamedTensor::from_burn(reg.val()));
            let head = slice(g, &t, 1, 0, 1);
            let rest = slice(g, &t, 1, 1, TO_END);
            t = g.node("Concat", &[&head, &regs, &rest], vec![attr_int("axis", 1)]);
        }
        let tapped = self.spec.tap_blocks();
        let mut taps = Vec::with_capacity(TAPS);
        for (i, block) in self.blocks.iter().enumerate() {
            t = block.emit(g, &t);
            if tapped.contains(&i) {
                let normed = layer_norm(g, &self.norm, &t);
                let cells = slice(g, &normed, 1, 1 + r, TO_END);
                let channels_first = transpose(g, &cells, &[0, 2, 1]);
                taps.push(g.node("Reshape", &[&channels_first, &grid_shape], vec![]));
            }
        }
        taps.try_into().expect("four taps")
    }

    /// The positional embedding for the grid of `grid_shape` ([N, D, gh, gw]), 1 x (1 + gh gw) x D.
    /// Resize's cubic mode is PyTorch's bicubic (a = -0.75, half-pixel, edge taps clamped) and,
    /// given scales, maps coordinates with those scales as PyTorch does with a scale factor; the
    /// scales are (g + 0.1) / M, or 1 (the identity) where the authors skip the interpolation.
    fn emit_pos_embed(&self, g: &mut GraphBuilder, grid_shape: &str) -> String {
        let (m, d) = (self.spec.pos_grid, self.spec.dim);
        let pos = NamedTensor::from_burn(self.pos_embed.val());
        let cls = g.constant_f32("cls_pos", &[1, 1, d], pos.data[..d].to_vec());
        // The grid's M x M x D cells as a 1 x D x M x M image.
        let cells = &pos.data[d..];
        let image: Vec<f32> = (0..d).flat_map(|c| (0..m * m).map(move |cell| cells[cell * d + c])).collect();
        let image = g.constant_f32("pos_grid", &[1, d, m, m], image);

        let grid = slice(g, grid_shape, 0, 2, 4);
        let stored = g.constant_i64("stored_grid", vec![m as i64, m as i64]);
        let diff = g.node("Sub", &[&grid, &stored], vec![]);
        let diff = g.node("Abs", &[&diff], vec![]);
        let off = g.node("ReduceSum", &[&diff], vec![attr_int("keepdims", 0)]);
        let zero = g.constant_i64_shaped("zero", &[], vec![0]);
        let same = g.node("Equal", &[&off, &zero], vec![]);
        let gridf = g.node("Cast", &[&grid], vec![attr_int("to", DataType::FLOAT as i64)]);
        let offset = g.constant_f32("interpolate_offset", &[], vec![INTERPOLATE_OFFSET as f32]);
        let m_f = g.constant_f32("stored_grid_f", &[], vec![m as f32]);
        let shifted = g.node("Add", &[&gridf, &offset], vec![]);
        let factors = g.node("Div", &[&shifted, &m_f], vec![]);
        let ones = g.constant_f32("identity_scales", &[2], vec![1.0, 1.0]);
        let factors = g.node("Where", &[&same, &ones, &factors], vec![]);
        let scales = g.node("Concat", &[&ones, &factors], vec![attr_int("axis", 0)]);
        let resized = g.node(
            "Resize",
            &[&image, "", &scales],
            vec![
                attr_string("mode", "cubic"),
                attr_float("cubic_coeff_a", CUBIC_A as f32),
                attr_string("coordinate_transformation_mode", "half_pixel"),
            ],
        );
        let flat = reshape(g, &resized, vec![1, d as i64, -1]);
        let tokens = transpose(g, &flat, &[0, 2, 1]);
        g.node("Concat", &[&cls, &tokens], vec![attr_int("axis", 1)])
    }
}
