//! The frozen layers of a training step in ONNX Runtime. With the backbone frozen through a
//! stride (the recipe freezes it through 16), the first taps need no gradient: they are the
//! same function of the input for the whole run. ONNX Runtime runs that forward (batch norm
//! folded, its tuned convolutions) faster than burn's, and burn runs the rest of the step (the
//! trainable layers after the frozen taps and the FPN) with gradients as before.

use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use burn::tensor::{Tensor, TensorData};
use ort::session::Session;
use ort::value::TensorRef;

use crate::infer::session::{open_session, GraphSource};
use crate::infer::DeviceChoice;
use crate::model::export::{frozen_taps_onnx_bytes, tap_output_name, INPUT_NAME};
use crate::model::Embedder;

pub(crate) struct FrozenTaps {
    session: Mutex<Session>,
    taps: usize,
}

impl FrozenTaps {
    /// The first `taps` of `model`'s backbone in an ONNX Runtime session on the CPU.
    pub fn new(model: &Embedder, taps: usize) -> Result<Self> {
        let bytes = frozen_taps_onnx_bytes(model, taps)?;
        let (session, _) = open_session(GraphSource::Bytes(&bytes), DeviceChoice::Cpu, None, "frozen layers")?;
        Ok(Self { session: Mutex::new(session), taps })
    }

    /// The frozen taps of N x 3 x H x W images in [0, 1], as tensors on `x`'s device (constants:
    /// no gradient flows into them).
    pub fn run(&self, x: Tensor<4>) -> Result<Vec<Tensor<4>>> {
        let device = x.device();
        let input = to_array(x)?;
        let tensor = TensorRef::from_array_view(&input).map_err(|e| anyhow!("frozen layers' input: {e}"))?;
        let mut session = self.session.lock().map_err(|_| anyhow!("frozen-layer session poisoned"))?;
        let outputs = session.run(ort::inputs![INPUT_NAME => tensor]).map_err(|e| anyhow!("ONNX Runtime run of the frozen layers: {e}"))?;
        (0..self.taps)
            .map(|i| {
                let view = outputs[tap_output_name(i).as_str()].try_extract_array::<f32>().context("reading a frozen tap")?;
                let shape: [usize; 4] = view.shape().try_into().map_err(|_| anyhow!("a frozen tap is not 4-D"))?;
                let data: Vec<f32> = view.iter().copied().collect();
                Ok(Tensor::from_data(TensorData::new(data, shape), &device))
            })
            .collect()
    }
}

/// A burn tensor's values as an ndarray of the same shape, as ONNX Runtime takes them.
pub(crate) fn to_array(x: Tensor<4>) -> Result<ndarray::Array4<f32>> {
    let [n, c, h, w] = x.dims();
    let data = x.into_data().try_into_vec::<f32>().map_err(|e| anyhow!("{e:?}"))?;
    Ok(ndarray::Array4::from_shape_vec((n, c, h, w), data)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::embedder::imagenet_normalize;
    use crate::model::{BackboneKind, EmbedderConfig};
    use burn::tensor::Device;

    /// The taps from ONNX Runtime's frozen layers, continued by burn, are the backbone's own
    /// taps, however many layers are frozen, for both convolutional backbones.
    #[test]
    fn frozen_taps_continue_into_the_backbones_own_taps() {
        let device = Device::flex();
        let n = 2 * 3 * 64 * 96;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
        let x = || Tensor::<4>::from_data(TensorData::new(x.clone(), [2, 3, 64, 96]), &device);
        for kind in [BackboneKind::EfficientnetLite0, BackboneKind::Resnet18] {
            let model = Embedder::seeded(EmbedderConfig::new(kind), 3, &device).unwrap();
            let want = model.backbone.forward(imagenet_normalize(x()));
            for taps in 1..=4 {
                let frozen = FrozenTaps::new(&model, taps).unwrap();
                let got = model.backbone.forward_from(frozen.run(x()).unwrap());
                for (i, (a, b)) in got.into_iter().zip(want.iter().cloned()).enumerate() {
                    assert_eq!(a.dims(), b.dims(), "{kind:?}, {taps} frozen, tap {i}");
                    let scale = b.clone().abs().max().into_scalar::<f32>().max(1.0);
                    let worst = (a - b).abs().max().into_scalar::<f32>() / scale;
                    assert!(worst < 1e-4, "{kind:?}, {taps} frozen, tap {i}: relative difference {worst}");
                }
            }
        }
    }
}
