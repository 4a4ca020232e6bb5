//! Reading torch checkpoints (legacy pickle stream or zip) into a [`TensorMap`].

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use pytorch_reader::{DType, PytorchReader};

use super::embedder::BackboneKind;
use super::layers::WeightSource;
use super::weights::{NamedTensor, TensorMap};

/// Reads every floating-point tensor of a torch checkpoint. Integer buffers such as
/// `num_batches_tracked` are skipped. Checkpoints that wrap their weights under `state_dict`
/// or `model` are unwrapped.
pub fn read_torch_checkpoint(path: &Path) -> Result<TensorMap> {
    let source = path.display().to_string();
    if !path.exists() {
        bail!("{source}: no such file");
    }
    let reader = PytorchReader::new(path)
        .or_else(|first| ["state_dict", "model"].iter().find_map(|k| PytorchReader::with_top_level_key(path, k).ok()).ok_or(first))
        .map_err(|e| anyhow!("{source}: not a readable torch checkpoint: {e}"))?;
    let mut map = TensorMap::new(&source);
    for (name, t) in reader.tensors() {
        let bytes = t.read().with_context(|| format!("{source}: reading tensor `{name}`"))?;
        let data: Vec<f32> = match t.dtype() {
            DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8")) as f32).collect(),
            DType::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => continue,
        };
        let shape = t.shape().to_vec();
        if data.len() != shape.iter().product::<usize>() {
            bail!("{source}: tensor `{name}` is truncated ({} values for shape {shape:?})", data.len());
        }
        // torchvision checkpoints saved from DataParallel prefix every key with `module.`.
        let name = name.strip_prefix("module.").unwrap_or(name);
        map.insert(name, NamedTensor::new(shape, data));
    }
    if map.is_empty() {
        bail!("{source}: the checkpoint holds no floating-point tensors");
    }
    Ok(map)
}

/// Imports a backbone checkpoint: checks that every tensor the backbone needs is there with the
/// right shape (building the backbone is that check), then returns the map under `backbone.`.
/// Tensors the backbone does not use (a classifier head) are kept under `head.`.
pub fn import_backbone(kind: BackboneKind, path: &Path) -> Result<TensorMap> {
    let map = read_torch_checkpoint(path)?;
    let device = burn::tensor::Device::flex();
    let checked = match kind.vit_spec() {
        // The ViTs' files hold nothing but the backbone: anything else is another model's.
        Some(spec) => super::vit::Vit::load_strict(spec, &map, &device).map(|_| ()),
        None => super::embedder::Backbone::load(kind, &map as &dyn WeightSource, &device).map(|_| ()),
    };
    checked.with_context(|| format!("{} is not a {kind:?} checkpoint", path.display()))?;
    let mut out = TensorMap::new(map.source.clone());
    out.extend_prefixed("backbone", map);
    Ok(out)
}

/// The file of `--backbone-weights`, under `backbone.`: a safetensors file that `picie weights
/// import` wrote as it is, or any other file read as a torch checkpoint and imported on the way
/// ([`import_backbone`]), so that the authors' released files (DINO's, DINOv2's) load as they are.
pub fn load_backbone_weights(kind: BackboneKind, path: &Path) -> Result<TensorMap> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        TensorMap::load_safetensors(path)
    } else {
        import_backbone(kind, path)
    }
}

/// `picie weights import`: a torch checkpoint to safetensors with `backbone.` names. Returns the
/// tensor count.
pub fn import_weights(kind: BackboneKind, checkpoint: &Path, out: &Path) -> Result<usize> {
    let map = import_backbone(kind, checkpoint)?;
    map.save_safetensors(out)?;
    Ok(map.len())
}
