//! The embedder: backbones, FPN decoder, weights in and out, ONNX export.

pub mod batchnorm;
pub mod conv;
pub mod efficientnet;
pub mod embedder;
pub mod export;
pub mod fpn;
pub mod import;
pub mod lanes;
pub mod layers;
pub mod onnx_graph;
pub mod relu6;
pub mod resnet;
pub mod weights;

pub use embedder::{BackboneKind, Embedder, EmbedderConfig};
pub use weights::{NamedTensor, TensorMap};
