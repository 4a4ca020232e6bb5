//! Unsupervised learning: clustering of pixel features (and, later, PiCIE training).

pub mod cluster;
pub mod kmeans;
