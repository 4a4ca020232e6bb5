//! picie: unsupervised semantic segmentation (PiCIE, Cho et al., CVPR 2021).
//!
//! Dependencies point one way: `server` -> `infer`/`train` -> `model`/`package`.

pub mod eval;
pub mod infer;
pub mod masks;
pub mod model;
pub mod package;
pub mod progress;
pub mod server;
pub mod train;
pub mod util;
