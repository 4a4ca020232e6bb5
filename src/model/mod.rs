//! The embedder: backbones, FPN decoder, weights in and out, ONNX export.

pub mod batchnorm;
pub mod classify;
pub mod conv;
pub mod efficientnet;
pub mod embedder;
pub mod export;
pub(crate) mod flex_data;
pub mod fpn;
pub mod import;
pub mod lanes;
pub mod layers;
pub mod onnx_graph;
pub mod relu6;
pub mod resample;
pub mod resnet;
pub mod vit;
pub mod weights;

pub use embedder::{BackboneKind, Embedder, EmbedderConfig};

/// Whether tensors on `device` run on burn's Flex CPU backend, the one the project's own
/// training kernels (`relu6`, `batchnorm`, `conv`, `resample`) are written for; on any other backend (a GPU
/// through the `wgpu` feature) layers use burn's own operations.
pub fn on_flex(device: &burn::tensor::Device) -> bool {
    device.clone().inner() == burn::tensor::Device::flex()
}
pub use weights::{NamedTensor, TensorMap};
