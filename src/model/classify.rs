//! The ImageNet check of an imported EfficientNet-Lite: its own classifier head on a photo.

use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::{Device, Tensor, TensorData};

use super::efficientnet::{EfficientNetLite, LiteClassifier};
use super::embedder::{imagenet_normalize, BackboneKind};
use super::TensorMap;

/// ImageNet top-5 (class index, probability) of the EfficientNet-Lite classifier shipped with
/// the checkpoint: the check that an import is right. The image is resized to 256 on the short
/// side and centre-cropped to 224, the usual ImageNet evaluation.
pub fn imagenet_top5(kind: BackboneKind, weights: &Path, image: &Path) -> Result<Vec<(usize, f32)>> {
    let variant = kind.lite_variant().with_context(|| format!("{kind:?} has no ImageNet classifier in picie"))?;
    let map = TensorMap::load_safetensors(weights)?.sub("backbone");
    let device = Device::flex();
    let backbone = EfficientNetLite::load(variant, &map, &device)?;
    let classifier = LiteClassifier::load(variant, &map, &device)?;
    let img = image::open(image).with_context(|| format!("reading {}", image.display()))?.to_rgb8();
    let scale = 256.0 / img.width().min(img.height()) as f32;
    let (w, h) = ((img.width() as f32 * scale).round() as u32, (img.height() as f32 * scale).round() as u32);
    let resized = image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle);
    let crop = image::imageops::crop_imm(&resized, (w - 224) / 2, (h - 224) / 2, 224, 224).to_image();
    let x = imagenet_normalize(image_tensor(&crop, &device));
    let [_, _, _, c5] = backbone.forward(x);
    let probs = burn::tensor::activation::softmax(classifier.forward(c5), 1);
    let p: Vec<f32> = probs.into_data().try_to_vec().expect("f32");
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    Ok(idx.into_iter().take(5).map(|i| (i, p[i])).collect())
}

/// An RGB image as a 1 x 3 x H x W tensor in [0, 1].
fn image_tensor(img: &image::RgbImage, device: &Device) -> Tensor<4> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let n = w * h;
    let mut data = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * n + i] = p[c] as f32 / 255.0;
        }
    }
    Tensor::from_data(TensorData::new(data, [1, 3, h, w]), device)
}
