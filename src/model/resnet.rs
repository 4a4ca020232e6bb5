//! ResNet-18 in the torchvision layout (`conv1`, `bn1`, `layer1.0.conv1`, ...), the backbone of
//! the PiCIE paper. Weights come from a user's torchvision checkpoint; none ship with picie.

use anyhow::Result;
use burn::module::Module;
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::MaxPoolOptions;
use burn::tensor::{Device, Tensor};

use super::layers::{Activation, ConvBn, ConvSpec, Padding, WeightSource};
use super::onnx_graph::{attr_ints, GraphBuilder};
use super::weights::TensorMap;

pub const BN_EPS: f64 = 1e-5;
const STEM_CHANNELS: usize = 64;
pub const TAP_CHANNELS: [usize; 4] = [64, 128, 256, 512];
const BLOCKS_PER_STAGE: usize = 2;

/// Two 3x3 convolutions with a skip; a 1x1 strided projection when the shape changes.
#[derive(Module, Debug)]
pub struct BasicBlock {
    pub conv1: ConvBn,
    pub conv2: ConvBn,
    pub downsample: Option<ConvBn>,
}

impl BasicBlock {
    fn load(src: &dyn WeightSource, key: &str, c_in: usize, c_out: usize, stride: usize, device: &Device) -> Result<Self> {
        let conv3 = |c_in, stride| ConvSpec { c_in, c_out, kernel: 3, stride, groups: 1, padding: Padding::Symmetric(1) };
        let conv1 =
            ConvBn::load(src, &format!("{key}.conv1"), &format!("{key}.bn1"), conv3(c_in, stride), BN_EPS, Activation::Relu, device)?;
        let conv2 =
            ConvBn::load(src, &format!("{key}.conv2"), &format!("{key}.bn2"), conv3(c_out, 1), BN_EPS, Activation::Identity, device)?;
        let downsample = if stride != 1 || c_in != c_out {
            Some(ConvBn::load(
                src,
                &format!("{key}.downsample.0"),
                &format!("{key}.downsample.1"),
                ConvSpec { c_in, c_out, kernel: 1, stride, groups: 1, padding: Padding::Symmetric(0) },
                BN_EPS,
                Activation::Identity,
                device,
            )?)
        } else {
            None
        };
        Ok(Self { conv1, conv2, downsample })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let skip = match &self.downsample {
            Some(d) => d.forward(x.clone()),
            None => x.clone(),
        };
        burn::tensor::activation::relu(self.conv2.forward(self.conv1.forward(x)) + skip)
    }

    fn export(&self, out: &mut TensorMap, key: &str) {
        self.conv1.export(out, &format!("{key}.conv1"), &format!("{key}.bn1"));
        self.conv2.export(out, &format!("{key}.conv2"), &format!("{key}.bn2"));
        if let Some(d) = &self.downsample {
            d.export(out, &format!("{key}.downsample.0"), &format!("{key}.downsample.1"));
        }
    }

    fn emit(&self, g: &mut GraphBuilder, x: &str) -> String {
        let skip = match &self.downsample {
            Some(d) => d.emit(g, x),
            None => x.to_string(),
        };
        let h = self.conv1.emit(g, x);
        let y = self.conv2.emit(g, &h);
        let sum = g.node("Add", &[&y, &skip], vec![]);
        g.node("Relu", &[&sum], vec![])
    }
}

#[derive(Module, Debug)]
pub struct ResNet18 {
    pub stem: ConvBn,
    /// Four stages of two blocks each, flattened: `blocks[2 * stage + i]` is `layer{stage+1}.{i}`.
    pub blocks: Vec<BasicBlock>,
}

fn block_key(index: usize) -> String {
    format!("layer{}.{}", index / BLOCKS_PER_STAGE + 1, index % BLOCKS_PER_STAGE)
}

impl ResNet18 {
    pub fn load(src: &dyn WeightSource, device: &Device) -> Result<Self> {
        let stem = ConvBn::load(
            src,
            "conv1",
            "bn1",
            ConvSpec { c_in: 3, c_out: STEM_CHANNELS, kernel: 7, stride: 2, groups: 1, padding: Padding::Symmetric(3) },
            BN_EPS,
            Activation::Relu,
            device,
        )?;
        let mut blocks = Vec::new();
        let mut c_in = STEM_CHANNELS;
        for (stage, &c_out) in TAP_CHANNELS.iter().enumerate() {
            for i in 0..BLOCKS_PER_STAGE {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::load(src, &block_key(blocks.len()), c_in, c_out, stride, device)?);
                c_in = c_out;
            }
        }
        Ok(Self { stem, blocks })
    }

    pub fn forward(&self, x: Tensor<4>) -> [Tensor<4>; 4] {
        let x = self.stem.forward(x);
        let mut x = max_pool2d(x, MaxPoolOptions::new([3, 3]).with_stride([2, 2]).with_padding([1, 1]));
        let mut taps = Vec::with_capacity(4);
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(x);
            if i % BLOCKS_PER_STAGE == BLOCKS_PER_STAGE - 1 {
                taps.push(x.clone());
            }
        }
        taps.try_into().expect("four taps")
    }

    pub fn export(&self, out: &mut TensorMap) {
        self.stem.export(out, "conv1", "bn1");
        for (i, b) in self.blocks.iter().enumerate() {
            b.export(out, &block_key(i));
        }
    }

    pub fn emit(&self, g: &mut GraphBuilder, x: &str) -> [String; 4] {
        self.emit_taps(g, x, 4).try_into().expect("four taps")
    }

    /// The graph up to the `n`-th tap (1 to 4): the first `n` taps.
    pub fn emit_taps(&self, g: &mut GraphBuilder, x: &str, n: usize) -> Vec<String> {
        let s = self.stem.emit(g, x);
        let mut x = g.node(
            "MaxPool",
            &[&s],
            vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("strides", &[2, 2]), attr_ints("pads", &[1, 1, 1, 1])],
        );
        let mut taps = Vec::with_capacity(n);
        for (i, b) in self.blocks.iter().enumerate().take(n * BLOCKS_PER_STAGE) {
            x = b.emit(g, &x);
            if i % BLOCKS_PER_STAGE == BLOCKS_PER_STAGE - 1 {
                taps.push(x.clone());
            }
        }
        taps
    }

    /// [`ResNet18::forward`] given its first taps (computed elsewhere): the later stages run here.
    pub fn forward_from(&self, mut taps: Vec<Tensor<4>>) -> [Tensor<4>; 4] {
        let n = taps.len();
        let mut x = taps.last().expect("at least one tap").clone();
        for (i, b) in self.blocks.iter().enumerate().skip(n * BLOCKS_PER_STAGE) {
            x = b.forward(x);
            if i % BLOCKS_PER_STAGE == BLOCKS_PER_STAGE - 1 {
                taps.push(x.clone());
            }
        }
        taps.try_into().expect("four taps")
    }
}
