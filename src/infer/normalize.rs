//! Per-image colour normalisation before the network: part of a package's input policy, so it
//! depends on nothing but the ImageNet constants the graph applies after it.

/// How an image's colours are normalised before the network, beyond ImageNet's fixed mean and
/// spread (which the graph applies): per image, so that exposure and colour cast (a street at
/// dusk against the same street at noon) matter less. Each maps a 3 x n plane in [0, 1] so that
/// after the graph's ImageNet normalisation:
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// Nothing: the colours as they are.
    #[default]
    None,
    /// Every channel has mean 0 and spread 1 (exposure, contrast and colour cast removed).
    Channels,
    /// Brightness has ImageNet's mean and spread, the same shift and scale on all three
    /// channels (exposure and contrast removed, colours kept relative to each other).
    Luminance,
    /// Every channel's mean is ImageNet's, by a gain alone (grey world: exposure and colour
    /// cast removed, contrast kept).
    Gain,
}

impl Normalize {
    pub fn is_none(&self) -> bool {
        *self == Normalize::None
    }

    /// Normalises a 3 x n plane in place. A flat image (spread under 1/255) is only shifted.
    pub fn apply(self, planes: &mut [f32]) {
        use crate::model::embedder::{IMAGENET_MEAN, IMAGENET_STD};
        let n = planes.len() / 3;
        if n == 0 || self.is_none() {
            return;
        }
        let stats = |plane: &[f32]| {
            let mean = plane.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = plane.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            (mean, var.sqrt())
        };
        let flat = 1.0 / 255.0;
        match self {
            Normalize::None => {}
            Normalize::Channels => {
                for (c, plane) in planes.chunks_mut(n).enumerate() {
                    let (mean, sd) = stats(plane);
                    let scale = if sd < flat { 1.0 } else { IMAGENET_STD[c] as f64 / sd };
                    plane.iter_mut().for_each(|v| *v = ((*v as f64 - mean) * scale + IMAGENET_MEAN[c] as f64) as f32);
                }
            }
            Normalize::Luminance => {
                let w = [0.299f64, 0.587, 0.114];
                let luma: Vec<f32> = (0..n).map(|i| (0..3).map(|c| w[c] * planes[c * n + i] as f64).sum::<f64>() as f32).collect();
                let (mean, sd) = stats(&luma);
                let target_mean: f64 = (0..3).map(|c| w[c] * IMAGENET_MEAN[c] as f64).sum();
                let target_sd: f64 = (0..3).map(|c| w[c] * IMAGENET_STD[c] as f64).sum();
                let scale = if sd < flat { 1.0 } else { target_sd / sd };
                planes.iter_mut().for_each(|v| *v = ((*v as f64 - mean) * scale + target_mean) as f32);
            }
            Normalize::Gain => {
                for (c, plane) in planes.chunks_mut(n).enumerate() {
                    let (mean, _) = stats(plane);
                    let gain = if mean < flat { 1.0 } else { IMAGENET_MEAN[c] as f64 / mean };
                    plane.iter_mut().for_each(|v| *v = (*v as f64 * gain) as f32);
                }
            }
        }
    }
}

impl std::fmt::Display for Normalize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        f.write_str(self.to_possible_value().expect("a name").get_name())
    }
}
