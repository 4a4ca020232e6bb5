//! Shared test helpers: fixture paths, imported weights, a minimal torch zip-checkpoint writer.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use picie::model::{NamedTensor, TensorMap};

pub mod process;
pub mod server;

/// Asks `ready` every 20 ms until it answers Some, for at most `within`: the one way the tests
/// wait for something to happen (never a fixed sleep). None when the time ran out.
pub async fn poll<T>(within: std::time::Duration, mut ready: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = ready().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// [`poll`], failing the test with `what` when the time runs out.
pub async fn until<T>(what: &str, within: std::time::Duration, ready: impl AsyncFnMut() -> Option<T>) -> T {
    poll(within, ready).await.unwrap_or_else(|| panic!("timed out after {within:?} waiting for {what}"))
}

/// Distinct noise images, so a dataset has several entries after deduplication.
pub fn noise_png(seed: u32, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ seed.wrapping_mul(97)) as u8;
        image::Rgb([v, v.wrapping_add(seed as u8), x as u8])
    });
    let mut out = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("fixtures/images").join(name)
}

/// An EfficientNet-Lite checkpoint that `scripts/setup.sh` fetched (`lite0`, `lite2`).
pub fn lite_checkpoint(lite: &str) -> PathBuf {
    let p = root().join(format!(".weights/efficientnet-{lite}.pth"));
    assert!(p.exists(), "{} is missing: run scripts/setup.sh --no-build first", p.display());
    p
}

/// The EfficientNet-Lite0 checkpoint that `scripts/setup.sh` fetched.
pub fn lite0_checkpoint() -> PathBuf {
    lite_checkpoint("lite0")
}

/// `checkpoint` imported once per test binary into a temporary safetensors file.
fn imported(cell: &'static OnceLock<(tempfile::TempDir, PathBuf)>, kind: picie::model::BackboneKind, checkpoint: PathBuf) -> &'static Path {
    let (_, p) = cell.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("backbone.safetensors");
        picie::model::import::import_weights(kind, &checkpoint, &out).unwrap();
        (dir, out)
    });
    p
}

/// The Lite0 checkpoint imported once per test binary into a temporary safetensors file.
pub fn lite0_safetensors() -> &'static Path {
    static PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    imported(&PATH, picie::model::BackboneKind::EfficientnetLite0, lite0_checkpoint())
}

/// The Lite2 checkpoint imported once per test binary into a temporary safetensors file.
pub fn lite2_safetensors() -> &'static Path {
    static PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    imported(&PATH, picie::model::BackboneKind::EfficientnetLite2, lite_checkpoint("lite2"))
}

// ---- a torch.save(state_dict) writer (zip format, pickle protocol 2), for checkpoints we cannot download

fn pickle_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
}

fn pickle_int(out: &mut Vec<u8>, v: usize) {
    out.push(b'J');
    out.extend((v as i32).to_le_bytes());
}

fn pickle_global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(b'c');
    out.extend(module.as_bytes());
    out.push(b'\n');
    out.extend(name.as_bytes());
    out.push(b'\n');
}

fn pickle_int_tuple(out: &mut Vec<u8>, values: &[usize]) {
    out.push(b'(');
    for &v in values {
        pickle_int(out, v);
    }
    out.push(b't');
}

/// Writes `tensors` as torch's zip checkpoint: `archive/data.pkl` plus one storage per tensor.
pub fn write_torch_zip(path: &Path, tensors: &[(String, NamedTensor)]) {
    let mut pkl = vec![0x80, 2];
    pickle_global(&mut pkl, "collections", "OrderedDict");
    pkl.push(b')');
    pkl.push(b'R');
    pkl.push(b'(');
    for (i, (name, t)) in tensors.iter().enumerate() {
        pickle_str(&mut pkl, name);
        pickle_global(&mut pkl, "torch._utils", "_rebuild_tensor_v2");
        pkl.push(b'(');
        // persistent id: ('storage', torch.FloatStorage, key, 'cpu', numel)
        pkl.push(b'(');
        pickle_str(&mut pkl, "storage");
        pickle_global(&mut pkl, "torch", "FloatStorage");
        pickle_str(&mut pkl, &i.to_string());
        pickle_str(&mut pkl, "cpu");
        pickle_int(&mut pkl, t.data.len());
        pkl.push(b't');
        pkl.push(b'Q');
        pickle_int(&mut pkl, 0);
        pickle_int_tuple(&mut pkl, &t.shape);
        let mut strides = vec![1usize; t.shape.len()];
        for d in (0..t.shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * t.shape[d + 1];
        }
        pickle_int_tuple(&mut pkl, &strides);
        pkl.push(0x89); // False: requires_grad
        pickle_global(&mut pkl, "collections", "OrderedDict");
        pkl.push(b')');
        pkl.push(b'R');
        pkl.push(b't');
        pkl.push(b'R');
    }
    pkl.push(b'u');
    pkl.push(b'.');

    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&pkl).unwrap();
    zip.start_file("archive/byteorder", opts).unwrap();
    zip.write_all(b"little").unwrap();
    for (i, (_, t)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts).unwrap();
        let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        zip.write_all(&bytes).unwrap();
    }
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

/// A torchvision-layout ResNet-18 state dict with seeded values (what `torch.save(resnet18().state_dict())` holds, minus the fc head).
pub fn seeded_resnet18_state_dict(seed: u64) -> TensorMap {
    let device = burn::tensor::Device::flex();
    let backbone =
        picie::model::embedder::Backbone::load(picie::model::BackboneKind::Resnet18, &picie::model::layers::SeededInit { seed }, &device)
            .unwrap();
    let mut map = TensorMap::new("seeded");
    backbone.export(&mut map);
    map
}

/// A client that opens a connection per request. A server may close a kept-alive connection
/// after answering an error before reading the request's body; a pooled client can race that
/// close and fail the next request with "IncompleteMessage", which is not what a test checks.
pub fn fresh_connections() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("HTTP client")
}
