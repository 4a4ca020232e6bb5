//! Named f32 tensors: the exchange format between torch checkpoints, safetensors files and
//! the burn modules. Names follow the torch convention (`layer1.0.conv1.weight`) so that a
//! user's torchvision checkpoint maps onto our modules without a renaming table.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{Device, Tensor, TensorData};

/// One tensor: its shape and row-major f32 values.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    pub fn from_burn<const D: usize>(tensor: Tensor<D>) -> Self {
        let shape = tensor.dims().to_vec();
        let data = tensor.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 tensor data");
        Self { shape, data }
    }

    pub fn to_burn<const D: usize>(&self, device: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(self.data.clone(), self.shape.clone()), device)
    }
}

/// A set of named tensors plus the file they came from, so every error can name both.
#[derive(Clone, Debug, Default)]
pub struct TensorMap {
    pub source: String,
    pub tensors: BTreeMap<String, NamedTensor>,
}

impl TensorMap {
    pub fn new(source: impl Into<String>) -> Self {
        Self { source: source.into(), tensors: BTreeMap::new() }
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: NamedTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensor `name`, checked against the shape the module expects.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<&NamedTensor> {
        let t = self.tensors.get(name).ok_or_else(|| anyhow!("{}: missing tensor `{name}` (expected shape {expected:?})", self.source))?;
        if t.shape != expected {
            bail!("{}: tensor `{name}` has shape {:?}, expected {expected:?}", self.source, t.shape);
        }
        if let Some(bad) = t.data.iter().position(|v| !v.is_finite()) {
            bail!("{}: tensor `{name}` holds a non-finite value at index {bad}", self.source);
        }
        Ok(t)
    }

    /// Only the tensors under `prefix.`, with the prefix removed.
    pub fn sub(&self, prefix: &str) -> TensorMap {
        let p = format!("{prefix}.");
        TensorMap {
            source: self.source.clone(),
            tensors: self.tensors.iter().filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v.clone()))).collect(),
        }
    }

    /// Adds every tensor of `other` under `prefix.`.
    pub fn extend_prefixed(&mut self, prefix: &str, other: TensorMap) {
        for (k, v) in other.tensors {
            self.tensors.insert(format!("{prefix}.{k}"), v);
        }
    }

    /// The weights a share `t` of the way from `self` to `other`, tensor by tensor:
    /// `self + t * (other - self)`. Both must hold the same names with the same shapes (one
    /// architecture), as two embedders trained from one start do.
    pub fn interpolate(&self, other: &TensorMap, t: f32) -> Result<TensorMap> {
        if !(0.0..=1.0).contains(&t) {
            bail!("interpolation share must be in [0, 1] (got {t})");
        }
        if let Some(name) = other.tensors.keys().find(|k| !self.tensors.contains_key(*k)) {
            bail!("{} has tensor `{name}` that {} lacks: not the same architecture", other.source, self.source);
        }
        let mut out = TensorMap::new(format!("{} + {t} * ({} - {})", self.source, other.source, self.source));
        for (name, a) in &self.tensors {
            let b = other
                .tensors
                .get(name)
                .ok_or_else(|| anyhow!("{} has tensor `{name}` that {} lacks: not the same architecture", self.source, other.source))?;
            if a.shape != b.shape {
                bail!("tensor `{name}` has shape {:?} in {} and {:?} in {}", a.shape, self.source, b.shape, other.source);
            }
            let data = a.data.iter().zip(&b.data).map(|(x, y)| x + t * (y - x)).collect();
            out.insert(name.clone(), NamedTensor::new(a.shape.clone(), data));
        }
        Ok(out)
    }

    pub fn load_safetensors(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_safetensors_bytes(&bytes, &path.display().to_string())
    }

    pub fn from_safetensors_bytes(bytes: &[u8], source: &str) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| anyhow!("{source}: not a valid safetensors file: {e}"))?;
        let mut map = TensorMap::new(source);
        for (name, view) in st.tensors() {
            let data = bytes_to_f32(view.dtype(), view.data()).with_context(|| format!("{source}: tensor `{name}`"))?;
            map.insert(name, NamedTensor::new(view.shape().to_vec(), data));
        }
        Ok(map)
    }

    /// Writes the map as safetensors through a temporary file and a rename, so a crash never
    /// leaves a half-written weights file behind.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let bytes = self.to_safetensors_bytes()?;
        crate::util::write_atomic(path, &bytes)
    }

    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let raw: Vec<(String, Vec<u8>, Vec<usize>)> =
            self.tensors.iter().map(|(k, t)| (k.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect(), t.shape.clone())).collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
            .iter()
            .map(|(k, b, s)| {
                let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .map_err(|e| anyhow!("tensor `{k}`: {e}"))?;
                Ok((k.clone(), view))
            })
            .collect::<Result<_>>()?;
        safetensors::tensor::serialize(views, None).map_err(|e| anyhow!("serialising safetensors: {e}"))
    }
}

fn bytes_to_f32(dtype: safetensors::Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    use safetensors::Dtype;
    Ok(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => bail!("unsupported dtype {other:?} (expected a floating-point tensor)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(source: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> TensorMap {
        let mut m = TensorMap::new(source);
        for (name, shape, data) in tensors {
            m.insert(*name, NamedTensor::new(shape.clone(), data.clone()));
        }
        m
    }

    #[test]
    fn interpolate_moves_every_tensor_the_same_share() {
        let a = map("a", &[("w", vec![2], vec![0.0, 4.0]), ("b", vec![1], vec![1.0])]);
        let b = map("b", &[("w", vec![2], vec![2.0, 0.0]), ("b", vec![1], vec![3.0])]);
        let mid = a.interpolate(&b, 0.25).unwrap();
        assert_eq!(mid.tensors["w"].data, vec![0.5, 3.0]);
        assert_eq!(mid.tensors["b"].data, vec![1.5]);
        assert_eq!(a.interpolate(&b, 0.0).unwrap().tensors, a.tensors);
        assert_eq!(a.interpolate(&b, 1.0).unwrap().tensors, b.tensors);
    }

    #[test]
    fn interpolate_refuses_other_architectures_and_shares() {
        let a = map("a", &[("w", vec![2], vec![0.0, 4.0])]);
        let reshaped = map("r", &[("w", vec![1, 2], vec![0.0, 4.0])]);
        let renamed = map("n", &[("v", vec![2], vec![0.0, 4.0])]);
        let extra = map("e", &[("w", vec![2], vec![0.0, 4.0]), ("x", vec![1], vec![0.0])]);
        assert!(a.interpolate(&reshaped, 0.5).unwrap_err().to_string().contains("shape"));
        assert!(a.interpolate(&renamed, 0.5).unwrap_err().to_string().contains("lacks"));
        assert!(a.interpolate(&extra, 0.5).unwrap_err().to_string().contains("`x`"));
        assert!(extra.interpolate(&a, 0.5).unwrap_err().to_string().contains("`x`"));
        for t in [-0.1, 1.5, f32::NAN] {
            assert!(a.interpolate(&a, t).is_err(), "{t}");
        }
    }
}
