//! Unsupervised learning: photometric and geometric views, clustering of pixel features, the
//! PiCIE loss and training loop, and the pipelines that write packages (`packaging`, `pipeline`).

pub mod augment;
pub mod cluster;
pub mod correspond;
pub mod device;
pub mod fpn_init;
pub mod frames;
mod frozen;
pub mod fused_loss;
pub mod kmeans;
pub mod ksuggest;
pub mod loss;
pub mod memory;
pub mod merge;
pub mod packaging;
pub mod picie;
pub mod pipeline;
pub mod selftrain;
