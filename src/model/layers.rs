//! Shared layer families: convolution + batch norm (+ activation), plain convolution with bias,
//! and the weight sources they load from.

use anyhow::Result;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::onnx_graph::{attr_int, attr_ints, attr_string, GraphBuilder};
use super::weights::{NamedTensor, TensorMap};

/// Where a module's tensors come from: a checkpoint, or a seeded random initialisation.
pub trait WeightSource {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<NamedTensor>;
}

impl WeightSource for TensorMap {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<NamedTensor> {
        self.get(name, shape).cloned()
    }
}

/// Seeded initialisation, the same on every machine: PyTorch's default for convolutions
/// (uniform in +-1/sqrt(fan_in) for weights and biases), identity batch norms.
pub struct SeededInit {
    pub seed: u64,
}

impl WeightSource for SeededInit {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<NamedTensor> {
        let n: usize = shape.iter().product();
        let data = if name.ends_with("running_var") || (shape.len() == 1 && name.ends_with("weight")) {
            vec![1.0; n]
        } else if name.ends_with("running_mean") || (shape.len() == 1 && name.ends_with("bias") && is_bn(name)) {
            vec![0.0; n]
        } else {
            // Each tensor gets its own stream so adding a layer never shifts the others.
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ fnv1a(name));
            let fan_in = if shape.len() > 1 { shape[1..].iter().product::<usize>() } else { shape[0] };
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        };
        Ok(NamedTensor::new(shape.to_vec(), data))
    }
}

fn is_bn(name: &str) -> bool {
    name.contains("bn") || name.contains("downsample.1")
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// A trainable parameter whose id derives from its tensor name, so an optimizer state saved
/// with a checkpoint finds its parameters again after the weights are reloaded.
pub fn named_param<const D: usize>(name: &str, value: Tensor<D>) -> burn::module::Param<Tensor<D>> {
    let mut p = burn::module::Param::from_tensor(value);
    p.id = burn::module::ParamId::from(fnv1a(name));
    p
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    /// min(max(x, 0), 6), EfficientNet-Lite's activation.
    Relu6,
}

impl Activation {
    pub fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Identity => x,
            Activation::Relu => burn::tensor::activation::relu(x),
            // One fused operation with its own backward (see `relu6`): composed from burn's
            // ops it was masked fills forward and backward, a fifth of a training step.
            Activation::Relu6 => super::relu6::relu6(x),
        }
    }

    pub fn emit(self, g: &mut GraphBuilder, x: String) -> String {
        match self {
            Activation::Identity => x,
            Activation::Relu => g.node("Relu", &[&x], vec![]),
            Activation::Relu6 => {
                let lo = g.constant_f32("relu6_min", &[], vec![0.0]);
                let hi = g.constant_f32("relu6_max", &[], vec![6.0]);
                g.node("Clip", &[&x, &lo, &hi], vec![])
            }
        }
    }
}

/// How a convolution pads its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// TensorFlow "same": output = ceil(input / stride), the extra pixel at the bottom/right.
    TfSame,
    /// The same number of pixels on every side (torchvision convention).
    Symmetric(usize),
}

impl Padding {
    fn burn(self) -> PaddingConfig2d {
        match self {
            Padding::TfSame => PaddingConfig2d::Same,
            Padding::Symmetric(p) => PaddingConfig2d::Explicit(p, p, p, p),
        }
    }
}

/// Shape and behaviour of one convolution.
#[derive(Clone, Copy, Debug)]
pub struct ConvSpec {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
    pub padding: Padding,
}

impl ConvSpec {
    pub fn pointwise(c_in: usize, c_out: usize) -> Self {
        Self { c_in, c_out, kernel: 1, stride: 1, groups: 1, padding: Padding::Symmetric(0) }
    }

    fn weight_shape(&self) -> [usize; 4] {
        [self.c_out, self.c_in / self.groups, self.kernel, self.kernel]
    }

    fn empty_conv(&self, bias: bool, device: &Device) -> Conv2d {
        Conv2dConfig::new([self.c_in, self.c_out], [self.kernel, self.kernel])
            .with_stride([self.stride, self.stride])
            .with_groups(self.groups)
            .with_padding(self.padding.burn())
            .with_bias(bias)
            .init(device)
    }
}

fn conv_attributes(conv: &Conv2d, padding: Padding) -> Vec<onnx_protobuf::AttributeProto> {
    let k = conv.kernel_size;
    let mut attrs = vec![
        attr_ints("kernel_shape", &[k[0] as i64, k[1] as i64]),
        attr_ints("strides", &[conv.stride[0] as i64, conv.stride[1] as i64]),
        attr_int("group", conv.groups as i64),
    ];
    match padding {
        // SAME_UPPER is exactly TF "same" and stays right for any input size.
        Padding::TfSame => attrs.push(attr_string("auto_pad", "SAME_UPPER")),
        Padding::Symmetric(p) => attrs.push(attr_ints("pads", &[p as i64; 4])),
    }
    attrs
}

fn padding_of(conv: &Conv2d) -> Padding {
    match conv.padding {
        PaddingConfig2d::Same => Padding::TfSame,
        PaddingConfig2d::Explicit(p, _, _, _) => Padding::Symmetric(p),
        PaddingConfig2d::Valid => Padding::Symmetric(0),
    }
}

/// Convolution without bias, batch norm, activation: the unit of both backbones.
#[derive(Module, Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm,
    #[module(skip)]
    pub activation: Activation,
}

impl ConvBn {
    pub fn load(
        src: &dyn WeightSource,
        conv_key: &str,
        bn_key: &str,
        spec: ConvSpec,
        bn_eps: f64,
        activation: Activation,
        device: &Device,
    ) -> Result<Self> {
        let mut conv = spec.empty_conv(false, device);
        let wname = format!("{conv_key}.weight");
        conv.weight = named_param(&wname, src.tensor(&wname, &spec.weight_shape())?.to_burn(device));
        let c = spec.c_out;
        let mut bn = BatchNormConfig::new(c).with_epsilon(bn_eps).init(device);
        let t = |s: &str| src.tensor(&format!("{bn_key}.{s}"), &[c]);
        bn.gamma = named_param(&format!("{bn_key}.weight"), t("weight")?.to_burn(device));
        bn.beta = named_param(&format!("{bn_key}.bias"), t("bias")?.to_burn(device));
        bn.running_mean = burn::module::RunningState::new(t("running_mean")?.to_burn(device));
        bn.running_var = burn::module::RunningState::new(t("running_var")?.to_burn(device));
        Ok(Self { conv, bn, activation })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        // Depthwise and pointwise convolutions on the project's kernels (see `conv`).
        let y = super::conv::forward(&self.conv, x);
        // In training, the fused batch-norm kernels (see `batchnorm`) in place of burn's
        // composed ones; the same condition as `BatchNorm::forward`'s.
        if y.device().is_autodiff() && self.bn.training.is_enabled() && super::on_flex(&y.device()) {
            return match self.activation {
                // ReLU6 fused into batch norm's passes.
                Activation::Relu6 => super::batchnorm::batch_norm_relu6_train(&self.bn, y),
                other => other.forward(super::batchnorm::batch_norm_train(&self.bn, y)),
            };
        }
        self.activation.forward(self.bn.forward(y))
    }

    pub fn export(&self, out: &mut TensorMap, conv_key: &str, bn_key: &str) {
        out.insert(format!("{conv_key}.weight"), NamedTensor::from_burn(self.conv.weight.val()));
        out.insert(format!("{bn_key}.weight"), NamedTensor::from_burn(self.bn.gamma.val()));
        out.insert(format!("{bn_key}.bias"), NamedTensor::from_burn(self.bn.beta.val()));
        out.insert(format!("{bn_key}.running_mean"), NamedTensor::from_burn(self.bn.running_mean.value()));
        out.insert(format!("{bn_key}.running_var"), NamedTensor::from_burn(self.bn.running_var.value()));
    }

    /// The convolution with batch norm folded in: w' = w * g / sqrt(v + eps), b' = beta - m * g / sqrt(v + eps).
    pub fn folded(&self) -> (NamedTensor, Vec<f32>) {
        let w = NamedTensor::from_burn(self.conv.weight.val());
        let g = NamedTensor::from_burn(self.bn.gamma.val()).data;
        let b = NamedTensor::from_burn(self.bn.beta.val()).data;
        let m = NamedTensor::from_burn(self.bn.running_mean.value()).data;
        let v = NamedTensor::from_burn(self.bn.running_var.value()).data;
        let eps = self.bn.epsilon as f32;
        let per_out = w.data.len() / g.len();
        let scale: Vec<f32> = g.iter().zip(&v).map(|(g, v)| g / (v + eps).sqrt()).collect();
        let data = w.data.iter().enumerate().map(|(i, x)| x * scale[i / per_out]).collect();
        let bias = (0..g.len()).map(|o| b[o] - m[o] * scale[o]).collect();
        (NamedTensor::new(w.shape, data), bias)
    }

    pub fn emit(&self, g: &mut GraphBuilder, x: &str) -> String {
        let (w, b) = self.folded();
        let wn = g.constant_f32("w", &w.shape, w.data);
        let bn = g.constant_f32("b", &[b.len()], b);
        let y = g.node("Conv", &[x, &wn, &bn], conv_attributes(&self.conv, padding_of(&self.conv)));
        self.activation.emit(g, y)
    }
}

/// Convolution with bias and no normalisation (the FPN laterals).
pub fn load_conv_bias(src: &dyn WeightSource, key: &str, spec: ConvSpec, device: &Device) -> Result<Conv2d> {
    let mut conv = spec.empty_conv(true, device);
    let (wname, bname) = (format!("{key}.weight"), format!("{key}.bias"));
    conv.weight = named_param(&wname, src.tensor(&wname, &spec.weight_shape())?.to_burn(device));
    conv.bias = Some(named_param(&bname, src.tensor(&bname, &[spec.c_out])?.to_burn(device)));
    Ok(conv)
}

pub fn export_conv_bias(conv: &Conv2d, out: &mut TensorMap, key: &str) {
    out.insert(format!("{key}.weight"), NamedTensor::from_burn(conv.weight.val()));
    if let Some(b) = &conv.bias {
        out.insert(format!("{key}.bias"), NamedTensor::from_burn(b.val()));
    }
}

pub fn emit_conv_bias(conv: &Conv2d, g: &mut GraphBuilder, x: &str) -> String {
    let w = NamedTensor::from_burn(conv.weight.val());
    let wn = g.constant_f32("w", &w.shape, w.data);
    let mut inputs = vec![x.to_string(), wn];
    if let Some(b) = &conv.bias {
        let b = NamedTensor::from_burn(b.val());
        inputs.push(g.constant_f32("b", &b.shape, b.data));
    }
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    g.node("Conv", &refs, conv_attributes(conv, padding_of(conv)))
}
