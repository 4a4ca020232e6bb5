//! Vision Transformers in the layout of the DINO and DINOv2 checkpoints (Caron et al. 2021,
//! Oquab et al. 2023), as a backbone of the embedder: bring your own self-supervised weights.
//!
//! Tensor names are the authors' (`cls_token`, `pos_embed`, `patch_embed.proj`,
//! `blocks.N.{norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2}`, `norm`), so their
//! released files load as they are; DINOv2's `mask_token` (masked-image training only) is
//! ignored, its `register_tokens` are used by the `_reg` variants.
//!
//! The forward pass is DINOv2's `get_intermediate_layers(x, n=[2, 5, 8, 11], norm=True)`: patch
//! embedding (a p x p convolution of stride p), the class token, the positional embedding
//! resampled to the input's grid ([`pos_embed`]), the registers after the class token,
//! pre-norm blocks (multi-head attention and a GELU MLP, each added back through DINOv2's
//! LayerScale where the checkpoint has one), and four evenly spaced blocks tapped through the
//! final norm. The four taps are the FPN's inputs, all at the patch stride: every block works on
//! the same grid.
//!
//! Inputs are multiples of [`crate::model::embedder::INPUT_MULTIPLE`] (32) as for every backbone.
//! A patch size that is a power of two (8, 16) divides that; patch 14 does not, so the embedder
//! first resizes the image by 14/16 (bilinear): the grid is then H/16 x W/16, as for a /16
//! model, and the FPN's output is still exactly H/4 x W/4 ([`VitSpec::stride`]).

mod onnx;
pub mod pos_embed;

use std::cell::RefCell;
use std::collections::BTreeSet;

use anyhow::{bail, Result};
use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::module::{attention, interpolate};
use burn::tensor::ops::{AttentionModuleOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::layers::{export_conv_bias, load_conv_bias, named_param, ConvSpec, Padding, WeightSource};
use super::weights::{NamedTensor, TensorMap};

/// The authors' layer norms (`partial(nn.LayerNorm, eps=1e-6)` in DINO and DINOv2).
pub const LN_EPS: f64 = 1e-6;
/// The four tapped blocks are evenly spaced: blocks (k + 1) * depth / 4 - 1, k = 0..4
/// (2, 5, 8, 11 of twelve, the blocks DINOv2's DPT depth head reads for ViT-S): a shallow
/// block's finer, more local features beside the last block's semantic ones, as the CNN taps
/// span strides.
pub const TAPS: usize = 4;

/// Which authors' code a checkpoint comes from: it decides which extra tensors it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VitFamily {
    /// facebookresearch/dino: no layer scale, no mask token.
    Dino,
    /// facebookresearch/dinov2: layer scale, a `mask_token` (ignored), registers in `_reg` models.
    Dinov2,
}

/// A ViT's architecture: what the checkpoint's shapes must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VitSpec {
    pub family: VitFamily,
    pub patch: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_hidden: usize,
    /// The checkpoint's positional embedding covers pos_grid x pos_grid patches (224 / patch
    /// for DINO, 518 / 14 = 37 for DINOv2) plus the class token.
    pub pos_grid: usize,
    /// DINOv2's LayerScale (`ls1.gamma`, `ls2.gamma`).
    pub layer_scale: bool,
    /// DINOv2's register tokens (`register_tokens`, 4 in the `_reg4` models).
    pub registers: usize,
}

/// ViT-S: 384 wide, 12 blocks of 6 heads, MLP 4x.
const VIT_S: VitSpec = VitSpec {
    family: VitFamily::Dino,
    patch: 16,
    dim: 384,
    depth: 12,
    heads: 6,
    mlp_hidden: 1536,
    pos_grid: 14,
    layer_scale: false,
    registers: 0,
};
/// DINO's training resolution.
const DINO_IMAGE: usize = 224;
/// DINOv2's positional embedding is for 518 x 518 inputs.
const DINOV2_IMAGE: usize = 518;
const DINOV2_PATCH: usize = 14;
const DINOV2_REGISTERS: usize = 4;

/// `dino_deitsmall8_pretrain.pth`.
pub const DINO_VITS8: VitSpec = VitSpec { patch: 8, pos_grid: DINO_IMAGE / 8, ..VIT_S };
/// `dino_deitsmall16_pretrain.pth`.
pub const DINO_VITS16: VitSpec = VitSpec { patch: 16, pos_grid: DINO_IMAGE / 16, ..VIT_S };
/// `dinov2_vits14_pretrain.pth`.
pub const DINOV2_VITS14: VitSpec =
    VitSpec { family: VitFamily::Dinov2, patch: DINOV2_PATCH, pos_grid: DINOV2_IMAGE / DINOV2_PATCH, layer_scale: true, ..VIT_S };
/// `dinov2_vits14_reg4_pretrain.pth`.
pub const DINOV2_VITS14_REG: VitSpec = VitSpec { registers: DINOV2_REGISTERS, ..DINOV2_VITS14 };

impl VitSpec {
    /// The stride of the taps in the embedder's input: the patch size, or for a patch size
    /// that is not a power of two the next one (14 -> 16), the input being resized by
    /// patch / stride first so that the grid divides H/4 and W/4 for every input the embedder
    /// takes (multiples of 32).
    pub const fn stride(&self) -> usize {
        self.patch.next_power_of_two()
    }

    pub const fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    pub const fn tap_blocks(&self) -> [usize; TAPS] {
        let d = self.depth;
        [d / 4 - 1, 2 * d / 4 - 1, 3 * d / 4 - 1, d - 1]
    }

    /// Tensors a checkpoint of this family may hold that the backbone does not use.
    fn ignored(&self) -> &'static [&'static str] {
        match self.family {
            VitFamily::Dino => &[],
            VitFamily::Dinov2 => &["mask_token"],
        }
    }
}

/// A tensor name under a block.
fn key(prefix: &str, name: &str) -> String {
    format!("{prefix}.{name}")
}

fn param<const D: usize>(src: &dyn WeightSource, name: &str, shape: [usize; D], device: &Device) -> Result<Param<Tensor<D>>> {
    Ok(named_param(name, src.tensor(name, &shape)?.to_burn(device)))
}

/// Host transpose of a row-major matrix (torch's Linear is [out, in], burn's [in, out]).
fn transposed(t: &NamedTensor) -> NamedTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let data = (0..rows * cols).map(|i| t.data[(i % rows) * cols + i / rows]).collect();
    NamedTensor::new(vec![cols, rows], data)
}

fn load_linear(src: &dyn WeightSource, prefix: &str, d_in: usize, d_out: usize, device: &Device) -> Result<Linear> {
    let mut linear = LinearConfig::new(d_in, d_out).init(device);
    let (wname, bname) = (key(prefix, "weight"), key(prefix, "bias"));
    linear.weight = named_param(&wname, transposed(&src.tensor(&wname, &[d_out, d_in])?).to_burn(device));
    linear.bias = Some(param(src, &bname, [d_out], device)?);
    Ok(linear)
}

fn export_linear(linear: &Linear, out: &mut TensorMap, prefix: &str) {
    out.insert(key(prefix, "weight"), transposed(&NamedTensor::from_burn(linear.weight.val())));
    if let Some(b) = &linear.bias {
        out.insert(key(prefix, "bias"), NamedTensor::from_burn(b.val()));
    }
}

fn load_norm(src: &dyn WeightSource, prefix: &str, dim: usize, device: &Device) -> Result<LayerNorm> {
    let mut norm = LayerNormConfig::new(dim).with_epsilon(LN_EPS).init(device);
    norm.gamma = param(src, &key(prefix, "weight"), [dim], device)?;
    norm.beta = Some(param(src, &key(prefix, "bias"), [dim], device)?);
    Ok(norm)
}

fn export_norm(norm: &LayerNorm, out: &mut TensorMap, prefix: &str) {
    out.insert(key(prefix, "weight"), NamedTensor::from_burn(norm.gamma.val()));
    if let Some(b) = &norm.beta {
        out.insert(key(prefix, "bias"), NamedTensor::from_burn(b.val()));
    }
}

/// One pre-norm transformer block: x + ls1 * attn(norm1(x)), then + ls2 * mlp(norm2(x)).
#[derive(Module, Debug)]
pub struct VitBlock {
    pub norm1: LayerNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub ls1: Option<Param<Tensor<1>>>,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub ls2: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub heads: usize,
}

impl VitBlock {
    fn load(src: &dyn WeightSource, prefix: &str, spec: &VitSpec, device: &Device) -> Result<Self> {
        let (d, h) = (spec.dim, spec.mlp_hidden);
        let scale = |name: &str| -> Result<Option<Param<Tensor<1>>>> {
            spec.layer_scale.then(|| param(src, &key(prefix, name), [d], device)).transpose()
        };
        Ok(Self {
            norm1: load_norm(src, &key(prefix, "norm1"), d, device)?,
            qkv: load_linear(src, &key(prefix, "attn.qkv"), d, 3 * d, device)?,
            proj: load_linear(src, &key(prefix, "attn.proj"), d, d, device)?,
            ls1: scale("ls1.gamma")?,
            norm2: load_norm(src, &key(prefix, "norm2"), d, device)?,
            fc1: load_linear(src, &key(prefix, "mlp.fc1"), d, h, device)?,
            fc2: load_linear(src, &key(prefix, "mlp.fc2"), h, d, device)?,
            ls2: scale("ls2.gamma")?,
            heads: spec.heads,
        })
    }

    /// `x`: N x L x D tokens.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [n, l, d] = x.dims();
        let hd = d / self.heads;
        let qkv = self.qkv.forward(self.norm1.forward(x.clone())).reshape([n, l, 3, self.heads, hd]);
        // q, k, v: N x heads x L x head_dim; attention scales by 1 / sqrt(head_dim) as the authors do.
        let part = |i: usize| qkv.clone().narrow(2, i, 1).reshape([n, l, self.heads, hd]).swap_dims(1, 2);
        let a = attention(part(0), part(1), part(2), None, None, AttentionModuleOptions::default());
        let a = self.proj.forward(a.swap_dims(1, 2).reshape([n, l, d]));
        let x = x + layer_scale(&self.ls1, a);
        let m = self.fc2.forward(burn::tensor::activation::gelu(self.fc1.forward(self.norm2.forward(x.clone()))));
        x + layer_scale(&self.ls2, m)
    }

    fn export(&self, out: &mut TensorMap, prefix: &str) {
        export_norm(&self.norm1, out, &key(prefix, "norm1"));
        export_linear(&self.qkv, out, &key(prefix, "attn.qkv"));
        export_linear(&self.proj, out, &key(prefix, "attn.proj"));
        export_norm(&self.norm2, out, &key(prefix, "norm2"));
        export_linear(&self.fc1, out, &key(prefix, "mlp.fc1"));
        export_linear(&self.fc2, out, &key(prefix, "mlp.fc2"));
        for (name, gamma) in [("ls1.gamma", &self.ls1), ("ls2.gamma", &self.ls2)] {
            if let Some(g) = gamma {
                out.insert(key(prefix, name), NamedTensor::from_burn(g.val()));
            }
        }
    }
}

fn layer_scale(gamma: &Option<Param<Tensor<1>>>, x: Tensor<3>) -> Tensor<3> {
    match gamma {
        Some(g) => x * g.val().reshape([1, 1, -1]),
        None => x,
    }
}

#[derive(Module, Debug)]
pub struct Vit {
    pub patch_embed: Conv2d,
    /// 1 x 1 x D.
    pub cls_token: Param<Tensor<3>>,
    /// 1 x (1 + M * M) x D: the class token's, then the M x M grid's, row by row.
    pub pos_embed: Param<Tensor<3>>,
    /// 1 x R x D.
    pub register_tokens: Option<Param<Tensor<3>>>,
    pub blocks: Vec<VitBlock>,
    pub norm: LayerNorm,
    #[module(skip)]
    pub spec: VitSpec,
}

/// A weight source that remembers which tensors were asked for, so an import can name the
/// ones a checkpoint holds that the architecture does not (a ViT-B, a full training state).
struct Recording<'a> {
    inner: &'a dyn WeightSource,
    asked: RefCell<BTreeSet<String>>,
}

impl WeightSource for Recording<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<NamedTensor> {
        self.asked.borrow_mut().insert(name.to_string());
        self.inner.tensor(name, shape)
    }
}

impl Vit {
    pub fn load(spec: VitSpec, src: &dyn WeightSource, device: &Device) -> Result<Self> {
        let (d, p, m) = (spec.dim, spec.patch, spec.pos_grid);
        if spec.heads == 0 || !d.is_multiple_of(spec.heads) || spec.depth < TAPS {
            bail!("a ViT needs a width divisible by its heads and at least {TAPS} blocks ({spec:?})");
        }
        let patch_embed = load_conv_bias(
            src,
            "patch_embed.proj",
            ConvSpec { c_in: 3, c_out: d, kernel: p, stride: p, groups: 1, padding: Padding::Symmetric(0) },
            device,
        )?;
        let cls_token = param(src, "cls_token", [1, 1, d], device)?;
        let pos_embed = param(src, "pos_embed", [1, 1 + m * m, d], device)?;
        let register_tokens = (spec.registers > 0).then(|| param(src, "register_tokens", [1, spec.registers, d], device)).transpose()?;
        let blocks = (0..spec.depth).map(|i| VitBlock::load(src, &format!("blocks.{i}"), &spec, device)).collect::<Result<Vec<_>>>()?;
        let norm = load_norm(src, "norm", d, device)?;
        Ok(Self { patch_embed, cls_token, pos_embed, register_tokens, blocks, norm, spec })
    }

    /// Loads from a checkpoint and fails on any tensor the architecture does not use (beyond
    /// the family's known extras such as DINOv2's `mask_token`), naming it: a checkpoint of
    /// another ViT, or one with registers loaded as one without, is an error, not a quiet
    /// partial load.
    pub fn load_strict(spec: VitSpec, map: &TensorMap, device: &Device) -> Result<Self> {
        let recording = Recording { inner: map, asked: RefCell::new(BTreeSet::new()) };
        let vit = Self::load(spec, &recording, device)?;
        let asked = recording.asked.into_inner();
        let unexpected: Vec<&String> =
            map.tensors.keys().filter(|k| !asked.contains(*k) && !spec.ignored().contains(&k.as_str())).collect();
        if let Some(first) = unexpected.first() {
            bail!(
                "{}: unexpected tensor `{first}` with shape {:?}{} (not part of this architecture: {} blocks of width {}{})",
                map.source,
                map.tensors[*first].shape,
                if unexpected.len() > 1 { format!(" and {} more", unexpected.len() - 1) } else { String::new() },
                spec.depth,
                spec.dim,
                if spec.registers > 0 { format!(", {} registers", spec.registers) } else { ", no registers".into() }
            );
        }
        Ok(vit)
    }

    /// The tensors of [`Vit::load`] (the checkpoint's names), for a package's weights.
    pub fn export(&self, out: &mut TensorMap) {
        export_conv_bias(&self.patch_embed, out, "patch_embed.proj");
        out.insert("cls_token", NamedTensor::from_burn(self.cls_token.val()));
        out.insert("pos_embed", NamedTensor::from_burn(self.pos_embed.val()));
        if let Some(r) = &self.register_tokens {
            out.insert("register_tokens", NamedTensor::from_burn(r.val()));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            b.export(out, &format!("blocks.{i}"));
        }
        export_norm(&self.norm, out, "norm");
    }

    /// The embedder's input (N x 3 x H x W, ImageNet-normalised, H and W multiples of 32) to
    /// the four taps at stride [`VitSpec::stride`]: resized first when the patch size is not a
    /// power of two.
    pub fn forward_image(&self, x: Tensor<4>) -> [Tensor<4>; TAPS] {
        let (p, s) = (self.spec.patch, self.spec.stride());
        if p == s {
            return self.forward(x);
        }
        let [_, _, h, w] = x.dims();
        let size = [h / s * p, w / s * p];
        self.forward(interpolate(x, InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false).with_output_size(size)))
    }

    /// The authors' forward: `x` N x 3 x H x W with H and W multiples of the patch size; the
    /// four tapped blocks' patch tokens after the final norm, N x D x H/p x W/p each.
    pub fn forward(&self, x: Tensor<4>) -> [Tensor<4>; TAPS] {
        let [n, _, h, w] = x.dims();
        let (d, p, r) = (self.spec.dim, self.spec.patch, self.spec.registers);
        assert!(h.is_multiple_of(p) && w.is_multiple_of(p), "ViT input {h}x{w} is not a multiple of the patch size {p}");
        let (gh, gw) = (h / p, w / p);
        let cells = gh * gw;
        let patches = super::conv::forward(&self.patch_embed, x).reshape([n, d, cells]).swap_dims(1, 2);
        let cls = self.cls_token.val().expand([n, 1, d]);
        let mut t = Tensor::cat(vec![cls, patches], 1) + self.pos_embed_for(gh, gw);
        if let Some(reg) = &self.register_tokens {
            let (head, rest) = (t.clone().narrow(1, 0, 1), t.narrow(1, 1, cells));
            t = Tensor::cat(vec![head, reg.val().expand([n, r, d]), rest], 1);
        }
        let tapped = self.spec.tap_blocks();
        let mut taps = Vec::with_capacity(TAPS);
        for (i, block) in self.blocks.iter().enumerate() {
            t = block.forward(t);
            if tapped.contains(&i) {
                let normed = self.norm.forward(t.clone()).narrow(1, 1 + r, cells);
                taps.push(normed.swap_dims(1, 2).reshape([n, d, gh, gw]));
            }
        }
        taps.try_into().expect("four taps")
    }

    /// The positional embedding for a gh x gw grid, 1 x (1 + gh * gw) x D ([`pos_embed`]).
    fn pos_embed_for(&self, gh: usize, gw: usize) -> Tensor<3> {
        let (m, d) = (self.spec.pos_grid, self.spec.dim);
        let pos = self.pos_embed.val();
        if pos_embed::keeps_grid(m, gh, gw) {
            return pos;
        }
        let device = pos.device();
        let matrix = |out: usize| {
            let w = pos_embed::bicubic_weights(m, out, pos_embed::scale_factor(m, out));
            Tensor::<2>::from_data(TensorData::new(w, [out, m]), &device)
        };
        let cls = pos.clone().narrow(1, 0, 1);
        // Rows: [gh, M] x [M, M * D]; then columns: [gh, gw, M] x [gh, M, D].
        let grid = pos.narrow(1, 1, m * m).reshape([m, m * d]);
        let rows = matrix(gh).matmul(grid).reshape([gh, m, d]);
        let cols = matrix(gw).unsqueeze_dim::<3>(0).expand([gh, gw, m]).matmul(rows);
        Tensor::cat(vec![cls, cols.reshape([1, gh * gw, d])], 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_released_architectures() {
        assert_eq!(DINO_VITS8.tap_blocks(), [2, 5, 8, 11]);
        assert_eq!((DINO_VITS8.pos_grid, DINO_VITS16.pos_grid, DINOV2_VITS14.pos_grid), (28, 14, 37));
        assert_eq!((DINO_VITS8.stride(), DINO_VITS16.stride(), DINOV2_VITS14.stride()), (8, 16, 16));
        assert_eq!(DINOV2_VITS14.head_dim(), 64);
        assert_eq!((DINOV2_VITS14_REG.layer_scale, DINOV2_VITS14_REG.registers, DINO_VITS16.layer_scale), (true, 4, false));
        let tiny = VitSpec { depth: 4, ..DINO_VITS8 };
        assert_eq!(tiny.tap_blocks(), [0, 1, 2, 3]);
    }

    #[test]
    fn transposes_round_trip() {
        let t = NamedTensor::new(vec![2, 3], vec![0., 1., 2., 3., 4., 5.]);
        assert_eq!(transposed(&t).data, vec![0., 3., 1., 4., 2., 5.]);
        assert_eq!(transposed(&transposed(&t)), t);
    }
}
