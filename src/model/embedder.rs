//! The embedder f: RGB in [0, 1] -> ImageNet normalisation -> backbone -> FPN -> unit vectors.

use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::efficientnet::{EfficientNetLite, LiteVariant};
use super::fpn::Fpn;
use super::layers::{SeededInit, WeightSource};
use super::onnx_graph::GraphBuilder;
use super::resnet::{self, ResNet18};
use super::vit::{self, Vit, VitSpec};
use super::weights::TensorMap;

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Guard against division by zero in the L2 normalisation (PyTorch's F.normalize default).
pub const NORM_EPS: f32 = 1e-12;
pub use super::fpn::OUTPUT_STRIDE;
/// Inputs must be multiples of this (the deepest CNN tap is at stride 32; a ViT's patch grid,
/// at stride 8 or 16, divides it too).
pub const INPUT_MULTIPLE: usize = 32;
/// Where the CNN backbones' four taps are: strides 4, 8, 16, 32.
const CNN_TAP_STRIDES: [usize; 4] = [4, 8, 16, 32];
pub const DEFAULT_DIM: usize = 128;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackboneKind {
    EfficientnetLite0,
    EfficientnetLite2,
    Resnet18,
    /// DINO ViT-S/8 (`dino_deitsmall8_pretrain.pth`, github.com/facebookresearch/dino).
    DinoVits8,
    /// DINO ViT-S/16 (`dino_deitsmall16_pretrain.pth`).
    DinoVits16,
    /// DINOv2 ViT-S/14 (`dinov2_vits14_pretrain.pth`, github.com/facebookresearch/dinov2).
    Dinov2Vits14,
    /// DINOv2 ViT-S/14 with 4 registers (`dinov2_vits14_reg4_pretrain.pth`).
    Dinov2Vits14Reg,
}

impl BackboneKind {
    pub fn tap_channels(self) -> [usize; 4] {
        if let Some(spec) = self.vit_spec() {
            return [spec.dim; vit::TAPS];
        }
        match self.lite_variant() {
            Some(v) => v.tap_channels(),
            None => resnet::TAP_CHANNELS,
        }
    }

    /// The stride of each tap in the input: 4, 8, 16, 32 for the CNNs; a ViT's four taps all
    /// carry its patch grid ([`VitSpec::stride`]).
    pub fn tap_strides(self) -> [usize; 4] {
        match self.vit_spec() {
            Some(spec) => [spec.stride(); vit::TAPS],
            None => CNN_TAP_STRIDES,
        }
    }

    /// The architecture, for the ViT backbones.
    pub fn vit_spec(self) -> Option<VitSpec> {
        match self {
            BackboneKind::DinoVits8 => Some(vit::DINO_VITS8),
            BackboneKind::DinoVits16 => Some(vit::DINO_VITS16),
            BackboneKind::Dinov2Vits14 => Some(vit::DINOV2_VITS14),
            BackboneKind::Dinov2Vits14Reg => Some(vit::DINOV2_VITS14_REG),
            _ => None,
        }
    }

    /// The name on the command line (clap's, which serde's kebab-case matches: tested).
    pub fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value().expect("every backbone has a name").get_name().to_string()
    }

    /// Where `scripts/setup.sh` puts the backbone's imported weights (relative to the repository).
    pub fn default_weights(self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!(".weights/{}.safetensors", self.name()))
    }

    /// The EfficientNet-Lite variant, for the backbones that are one.
    pub fn lite_variant(self) -> Option<LiteVariant> {
        match self {
            BackboneKind::EfficientnetLite0 => Some(LiteVariant::Lite0),
            BackboneKind::EfficientnetLite2 => Some(LiteVariant::Lite2),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct EmbedderConfig {
    pub backbone: BackboneKind,
    /// Width of the FPN's per-pixel features.
    pub dim: usize,
    /// Hypercolumn output: the backbone's four taps, each L2-normalised, upsampled to stride 4
    /// and scaled by this weight, concatenated to the L2-normalised FPN features before the
    /// final normalisation. 0 (the default): the FPN's features alone. Training always trains
    /// the FPN's features; this only shapes what the package serves and clusters.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tap_weight: f32,
}

fn is_zero(w: &f32) -> bool {
    *w == 0.0
}

#[cfg(test)]
mod tests {
    use super::BackboneKind;
    use clap::ValueEnum;

    #[test]
    fn names_match_the_cli_and_serde() {
        for &kind in BackboneKind::value_variants() {
            assert_eq!(kind.to_possible_value().unwrap().get_name(), kind.name());
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{}\"", kind.name()));
        }
    }
}

impl EmbedderConfig {
    pub fn new(backbone: BackboneKind) -> Self {
        Self { backbone, dim: DEFAULT_DIM, tap_weight: 0.0 }
    }

    /// Width of the served (exported) features.
    pub fn output_dim(&self) -> usize {
        self.dim + if self.tap_weight > 0.0 { self.backbone.tap_channels().iter().sum() } else { 0 }
    }
}

#[derive(Module, Debug)]
pub enum Backbone {
    EfficientNet(EfficientNetLite),
    ResNet18(ResNet18),
    Vit(Vit),
}

impl Backbone {
    pub fn load(kind: BackboneKind, src: &dyn WeightSource, device: &Device) -> Result<Self> {
        if let Some(spec) = kind.vit_spec() {
            return Ok(Backbone::Vit(Vit::load(spec, src, device)?));
        }
        Ok(match kind.lite_variant() {
            Some(variant) => Backbone::EfficientNet(EfficientNetLite::load(variant, src, device)?),
            None => Backbone::ResNet18(ResNet18::load(src, device)?),
        })
    }

    /// The four taps of an ImageNet-normalised input (H and W multiples of 32), at the
    /// strides of [`BackboneKind::tap_strides`].
    pub fn forward(&self, x: Tensor<4>) -> [Tensor<4>; 4] {
        match self {
            Backbone::EfficientNet(m) => m.forward(x),
            Backbone::ResNet18(m) => m.forward(x),
            Backbone::Vit(m) => m.forward_image(x),
        }
    }

    pub fn export(&self, out: &mut TensorMap) {
        match self {
            Backbone::EfficientNet(m) => m.export(out),
            Backbone::ResNet18(m) => m.export(out),
            Backbone::Vit(m) => m.export(out),
        }
    }

    /// Freezes (no gradient, batch norm on running statistics) every layer up to and including
    /// the one that produces the tap at `stride` (4, 8, 16 or 32); 0 freezes nothing. A ViT
    /// has no layers below its patch stride, every block works at it: any stride but 0
    /// freezes all of it (0 trains it all).
    pub fn freeze_through(self, stride: usize) -> Self {
        let taps = self.frozen_taps(stride);
        if taps == 0 {
            return self;
        }
        match self {
            Backbone::EfficientNet(mut m) => {
                m.stem = m.stem.freeze();
                let last = m.tap_blocks[taps - 1];
                m.blocks = m.blocks.into_iter().enumerate().map(|(i, b)| if i <= last { b.freeze() } else { b }).collect();
                Backbone::EfficientNet(m)
            }
            Backbone::ResNet18(mut m) => {
                m.stem = m.stem.freeze();
                let last = 2 * taps - 1;
                m.blocks = m.blocks.into_iter().enumerate().map(|(i, b)| if i <= last { b.freeze() } else { b }).collect();
                Backbone::ResNet18(m)
            }
            Backbone::Vit(m) => Backbone::Vit(m.freeze()),
        }
    }

    pub fn emit(&self, g: &mut GraphBuilder, x: &str) -> [String; 4] {
        match self {
            Backbone::EfficientNet(m) => m.emit(g, x),
            Backbone::ResNet18(m) => m.emit(g, x),
            Backbone::Vit(m) => m.emit(g, x),
        }
    }

    /// How many of the four taps [`Backbone::freeze_through`] at `stride` leaves with nothing
    /// trainable before them (a ViT's blocks all work at its patch stride: all four or none).
    pub fn frozen_taps(&self, stride: usize) -> usize {
        match (self, stride) {
            (_, 0) => 0,
            (Backbone::Vit(_), _) => 4,
            (_, 4) => 1,
            (_, 8) => 2,
            (_, 16) => 3,
            _ => 4,
        }
    }

    /// The graph of the first `n` taps (1 to 4) of an ImageNet-normalised input.
    pub fn emit_taps(&self, g: &mut GraphBuilder, x: &str, n: usize) -> Vec<String> {
        match self {
            Backbone::EfficientNet(m) => m.emit_taps(g, x, n),
            Backbone::ResNet18(m) => m.emit_taps(g, x, n),
            Backbone::Vit(m) => {
                assert_eq!(n, 4, "a ViT's taps come all together");
                m.emit(g, x).to_vec()
            }
        }
    }

    /// The four taps given the first ones (1 to 4 of them, computed elsewhere): the layers
    /// after them run here.
    pub fn forward_from(&self, taps: Vec<Tensor<4>>) -> [Tensor<4>; 4] {
        match self {
            Backbone::EfficientNet(m) => m.forward_from(taps),
            Backbone::ResNet18(m) => m.forward_from(taps),
            Backbone::Vit(_) => taps.try_into().expect("a ViT's four taps"),
        }
    }
}

#[derive(Module, Debug)]
pub struct Embedder {
    pub backbone: Backbone,
    pub fpn: Fpn,
}

impl Embedder {
    /// Loads a full embedder from one tensor map (`backbone.*`, `fpn.*`).
    pub fn load(config: EmbedderConfig, weights: &TensorMap, device: &Device) -> Result<Self> {
        let backbone = Backbone::load(config.backbone, &weights.sub("backbone"), device)?;
        let fpn = Fpn::load(&weights.sub("fpn"), config.backbone.tap_channels(), config.backbone.tap_strides(), config.dim, device)?;
        Ok(Self { backbone, fpn })
    }

    /// A pretrained backbone with a freshly initialised decoder (fixed seed: same weights everywhere).
    pub fn from_backbone(config: EmbedderConfig, backbone: &TensorMap, fpn_seed: u64, device: &Device) -> Result<Self> {
        let backbone =
            Backbone::load(config.backbone, backbone, device).with_context(|| format!("loading the {:?} backbone", config.backbone))?;
        let fpn =
            Fpn::load(&SeededInit { seed: fpn_seed }, config.backbone.tap_channels(), config.backbone.tap_strides(), config.dim, device)?;
        Ok(Self { backbone, fpn })
    }

    /// Every weight from a seeded random source (tests, benchmarks).
    pub fn seeded(config: EmbedderConfig, seed: u64, device: &Device) -> Result<Self> {
        let src = SeededInit { seed };
        Ok(Self {
            backbone: Backbone::load(config.backbone, &src, device)?,
            fpn: Fpn::load(&src, config.backbone.tap_channels(), config.backbone.tap_strides(), config.dim, device)?,
        })
    }

    pub fn to_tensor_map(&self, source: &str) -> TensorMap {
        let mut out = TensorMap::new(source);
        let mut b = TensorMap::new(source);
        self.backbone.export(&mut b);
        out.extend_prefixed("backbone", b);
        let mut f = TensorMap::new(source);
        self.fpn.export(&mut f);
        out.extend_prefixed("fpn", f);
        out
    }

    /// `x`: N x 3 x H x W, RGB in [0, 1], H and W multiples of 32. Returns N x dim x H/4 x W/4 unit vectors.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let feats = self.forward_raw(x);
        l2_normalize(feats)
    }

    /// [`Embedder::forward`] and the backbone's four taps of the same pass (training's
    /// correspondence term compares the two).
    pub fn forward_with_taps(&self, x: Tensor<4>) -> (Tensor<4>, [Tensor<4>; 4]) {
        let taps = self.backbone.forward(imagenet_normalize(x));
        (l2_normalize(self.fpn.forward(taps.clone())), taps)
    }

    /// The FPN output before L2 normalisation.
    pub fn forward_raw(&self, x: Tensor<4>) -> Tensor<4> {
        let x = imagenet_normalize(x);
        self.fpn.forward(self.backbone.forward(x))
    }

    /// What the exported graph computes: [`Embedder::forward`], or with `tap_weight` > 0 the
    /// hypercolumn of [`EmbedderConfig::tap_weight`].
    pub fn forward_served(&self, x: Tensor<4>, tap_weight: f32) -> Tensor<4> {
        if tap_weight <= 0.0 {
            return self.forward(x);
        }
        let taps = self.backbone.forward(imagenet_normalize(x));
        let fpn = l2_normalize(self.fpn.forward(taps.clone()));
        let [_, _, h, w] = fpn.dims();
        let mut parts = vec![fpn];
        for tap in taps {
            let tap = l2_normalize(tap);
            let tap = if tap.dims()[2..] == [h, w] {
                tap
            } else {
                interpolate(tap, InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false).with_output_size([h, w]))
            };
            parts.push(tap.mul_scalar(tap_weight));
        }
        l2_normalize(Tensor::cat(parts, 1))
    }
}

pub fn imagenet_normalize(x: Tensor<4>) -> Tensor<4> {
    let device = x.device();
    let mean = Tensor::<1>::from_floats(IMAGENET_MEAN, &device).reshape([1, 3, 1, 1]);
    let std = Tensor::<1>::from_floats(IMAGENET_STD, &device).reshape([1, 3, 1, 1]);
    (x - mean) / std
}

/// Unit L2 norm over the channel axis.
pub fn l2_normalize(x: Tensor<4>) -> Tensor<4> {
    let norm = x.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(NORM_EPS);
    x / norm
}
