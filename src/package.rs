//! The model package: one folder with everything needed to segment and to keep training.
//!
//! ```text
//! manifest.json        format version, embedder config, K, input policy, provenance, metrics, checksums
//! embedder.onnx        the embedder for ONNX Runtime (batch norm folded)
//! weights.safetensors  the same embedder's burn weights, to train on
//! centroids.json       K classes: a unit vector each (dim wide) and, where they were merged from
//!                      an over-clustering, the over-clusters; optional names and colours
//! ```
//!
//! Packages are written to a temporary sibling folder and renamed into place, and every load
//! checks the manifest, the checksums and the centroids, so a reader never sees half a package.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::infer::normalize::Normalize;
use crate::model::{EmbedderConfig, TensorMap};
use crate::util::write_synced;

pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const ONNX_FILE: &str = "embedder.onnx";
pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const CENTROIDS_FILE: &str = "centroids.json";
/// Class indices are written into 8-bit masks.
pub const MAX_CLASSES: usize = 255;
/// How far from unit length a stored centroid may be.
const UNIT_TOLERANCE: f32 = 1e-3;
/// Over-clusters a package's classes may hold in all: each is scored at every pixel.
pub const MAX_MEMBERS: usize = 1024;
/// How long `Package::load` keeps reading a package that is being replaced under it.
const REPLACED_RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

/// How an image is brought to the network: the short side resized to `short_side` (the long side
/// capped at `max_long_side`), then padded to a multiple of `multiple`; with `flip`, the
/// features are the mean of the image's and its mirror image's (test-time flip averaging).
/// A package's centroids were clustered on features made with its own policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputPolicy {
    pub short_side: u32,
    pub max_long_side: u32,
    pub multiple: u32,
    /// Average the features over a horizontal flip (absent in older manifests: false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flip: bool,
    /// How each image's colours are normalised before the network, so that a dusk frame and a
    /// noon frame of the same street reach it alike ([`crate::infer::normalize::Normalize`];
    /// absent: none).
    #[serde(default, skip_serializing_if = "Normalize::is_none")]
    pub normalize: Normalize,
}

impl Default for InputPolicy {
    fn default() -> Self {
        // CamVid frames are 480x360: a short side of 352 keeps them near native resolution.
        Self { short_side: 352, max_long_side: 1024, multiple: 32, flip: false, normalize: Normalize::None }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Provenance {
    pub created_at: String,
    pub picie_version: String,
    /// The command line that made this package.
    pub command: String,
    /// Where the backbone weights came from.
    pub backbone_weights: String,
    /// Whether the embedder was trained with PiCIE (false: pretrained backbone, seeded FPN).
    pub trained: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The server job that wrote the package (a job resumed after writing it finds its work by
    /// this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    pub embedder: EmbedderConfig,
    pub k: usize,
    pub input: InputPolicy,
    pub provenance: Provenance,
    /// Quality numbers measured on this package (e.g. `camvid_val_pixel_acc`).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// SHA-256 of each file in the package.
    pub sha256: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ClassInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<[u8; 3]>,
    /// The class's direction: its members' mean, weighted by their pixels, as a unit vector
    /// (what reads one vector per class takes, e.g. an older binary).
    pub centroid: Vec<f32>,
    /// The over-clusters merged into this class ([`crate::train::merge`]): a pixel's score for
    /// the class is its best similarity to any of them. Empty: the class is its centroid alone.
    /// Packages written before this field read as that.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Vec<f32>>,
}

impl ClassInfo {
    /// The vectors a pixel's score for the class is its best similarity to: the members, or
    /// the centroid alone.
    pub fn vectors(&self) -> &[Vec<f32>] {
        if self.members.is_empty() {
            std::slice::from_ref(&self.centroid)
        } else {
            &self.members
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Centroids {
    pub dim: usize,
    pub classes: Vec<ClassInfo>,
}

impl Centroids {
    pub fn from_vectors(dim: usize, vectors: Vec<Vec<f32>>) -> Self {
        Self { dim, classes: vectors.into_iter().map(|c| ClassInfo { name: None, color: None, centroid: c, members: vec![] }).collect() }
    }

    /// Classes of merged over-clusters: `vectors` (unit) with `sizes` pixels each, cluster `i`
    /// in class `groups[i]` (every class from 0 to the largest holding at least one).
    pub fn merged(dim: usize, vectors: Vec<Vec<f32>>, sizes: &[u64], groups: &[usize]) -> Result<Self> {
        let k = groups.iter().max().map_or(0, |g| g + 1);
        if vectors.len() != groups.len() || sizes.len() != groups.len() {
            bail!("{} over-clusters, {} sizes and {} groups", vectors.len(), sizes.len(), groups.len());
        }
        let mut classes: Vec<ClassInfo> =
            (0..k).map(|_| ClassInfo { name: None, color: None, centroid: vec![0.0; dim], members: vec![] }).collect();
        for ((v, &n), &g) in vectors.into_iter().zip(sizes).zip(groups) {
            // An empty over-cluster still counts a little, so a class of empty ones has a direction.
            let w = n.max(1) as f32;
            classes[g].centroid.iter_mut().zip(&v).for_each(|(c, x)| *c += w * x);
            classes[g].members.push(v);
        }
        for (g, c) in classes.iter_mut().enumerate() {
            if c.members.is_empty() {
                bail!("class {g} has no over-clusters");
            }
            crate::train::kmeans::normalize(&mut c.centroid);
            // A class of one is its centroid: nothing to take the best of.
            if c.members.len() == 1 {
                c.members.clear();
            }
        }
        Ok(Self { dim, classes })
    }

    pub fn k(&self) -> usize {
        self.classes.len()
    }

    /// The over-clusters the classes were merged from, where they were (a class of one
    /// over-cluster holds it as its centroid).
    pub fn over_clusters(&self) -> Option<usize> {
        self.classes.iter().any(|c| !c.members.is_empty()).then(|| self.classes.iter().map(|c| c.members.len().max(1)).sum())
    }

    /// Row-major K x dim matrix.
    pub fn matrix(&self) -> Vec<f32> {
        self.classes.iter().flat_map(|c| c.centroid.iter().copied()).collect()
    }

    /// The class's colour, or a fixed distinct colour from the default palette.
    pub fn color(&self, class: usize) -> [u8; 3] {
        self.classes.get(class).and_then(|c| c.color).unwrap_or_else(|| default_color(class))
    }

    pub fn name(&self, class: usize) -> String {
        self.classes.get(class).and_then(|c| c.name.clone()).unwrap_or_else(|| format!("class {class}"))
    }

    pub fn validate(&self, source: &str, expected_dim: usize) -> Result<()> {
        if self.dim != expected_dim {
            bail!("{source}: centroids have dim {}, the embedder outputs {expected_dim}", self.dim);
        }
        if self.classes.len() < 2 || self.classes.len() > MAX_CLASSES {
            bail!("{source}: {} centroids; a package needs between 2 and {MAX_CLASSES}", self.classes.len());
        }
        for (i, c) in self.classes.iter().enumerate() {
            if c.centroid.len() != self.dim {
                bail!("{source}: centroid {i} has {} values, expected {}", c.centroid.len(), self.dim);
            }
            if c.centroid.iter().any(|v| !v.is_finite()) {
                bail!("{source}: centroid {i} holds a non-finite value");
            }
            for v in std::iter::once(&c.centroid).chain(&c.members) {
                if v.len() != self.dim {
                    bail!("{source}: class {i} has a vector of {} values, expected {}", v.len(), self.dim);
                }
                if v.iter().any(|x| !x.is_finite()) {
                    bail!("{source}: class {i} holds a non-finite value");
                }
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                if (norm - 1.0).abs() > UNIT_TOLERANCE {
                    bail!("{source}: class {i} has a vector of norm {norm:.4}; centroids must be unit vectors");
                }
            }
        }
        let members: usize = self.classes.iter().map(|c| c.members.len()).sum();
        if members > MAX_MEMBERS {
            bail!("{source}: {members} over-clusters; a package holds at most {MAX_MEMBERS}");
        }
        Ok(())
    }
}

/// A palette of distinct colours (CamVid-like for the first classes, then golden-angle hues).
pub fn default_color(class: usize) -> [u8; 3] {
    const BASE: [[u8; 3]; 12] = [
        [128, 128, 128],
        [128, 0, 0],
        [192, 192, 128],
        [128, 64, 128],
        [60, 40, 222],
        [128, 128, 0],
        [192, 128, 128],
        [64, 64, 128],
        [64, 0, 128],
        [64, 64, 0],
        [0, 128, 192],
        [255, 160, 0],
    ];
    if class < BASE.len() {
        return BASE[class];
    }
    let h = (class as f32 * 137.508) % 360.0;
    hsv_to_rgb(h, 0.65, 0.9)
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [u8; 3] {
    let c = v * s;
    let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
    let m = v - c;
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    [((r + m) * 255.0) as u8, ((g + m) * 255.0) as u8, ((b + m) * 255.0) as u8]
}

/// A package as loaded and checked. The ONNX file is read by the inference session; the burn
/// weights only when training.
#[derive(Clone, Debug)]
pub struct Package {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub centroids: Centroids,
}

/// What a new package is made of.
pub struct PackageContents<'a> {
    pub manifest: Manifest,
    pub onnx: &'a [u8],
    pub weights: &'a TensorMap,
    pub centroids: &'a Centroids,
}

/// Reads the files of one package folder. On Linux through a handle on the folder itself: once
/// opened, every read comes from that folder even if another one is swapped in at its path.
struct FolderReader {
    dir: PathBuf,
    #[cfg(target_os = "linux")]
    handle: Option<std::fs::File>,
}

impl FolderReader {
    fn open(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            #[cfg(target_os = "linux")]
            handle: std::fs::File::open(dir).ok(),
        }
    }

    fn read(&self, name: &str) -> std::io::Result<Vec<u8>> {
        #[cfg(target_os = "linux")]
        if let Some(handle) = &self.handle {
            use rustix::fs::{openat, Mode, OFlags};
            use std::io::Read;
            let fd = openat(handle, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
            let mut bytes = vec![];
            std::fs::File::from(fd).read_to_end(&mut bytes)?;
            return Ok(bytes);
        }
        std::fs::read(self.dir.join(name))
    }

    /// Whether the path now names another folder than the one read (it was replaced).
    fn replaced(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::MetadataExt;
            let (Some(handle), Ok(now)) = (&self.handle, std::fs::metadata(&self.dir)) else { return false };
            handle.metadata().is_ok_and(|m| (m.dev(), m.ino()) != (now.dev(), now.ino()))
        }
        #[cfg(not(target_os = "linux"))]
        false
    }
}

/// Lower-case hex SHA-256: package checksums and dataset content hashes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Package {
    pub fn onnx_path(&self) -> PathBuf {
        self.dir.join(ONNX_FILE)
    }

    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }

    /// A short identifier of this exact package: the manifest name and the first bytes of the
    /// ONNX checksum.
    pub fn version(&self) -> String {
        let sum = self.manifest.sha256.get(CENTROIDS_FILE).map(|s| &s[..8.min(s.len())]).unwrap_or("");
        format!("{}@{}", self.manifest.name, sum)
    }

    /// Loads and validates a package; every failure names the file at fault. The files are read
    /// through one handle on the folder (Linux), so a package replaced meanwhile (a class edit,
    /// a new version under the same name) is read whole, old or new, never mixed; should the
    /// old folder be removed in the middle of the read, the new one is read.
    pub fn load(dir: &Path) -> Result<Self> {
        // A package swapped in while we read it is read again. The bound is time, not a
        // count: a writer replacing the folder back to back can outrun any fixed number of
        // retries, but never a reader that keeps trying for a while.
        let deadline = std::time::Instant::now() + REPLACED_RETRY_WINDOW;
        loop {
            let folder = FolderReader::open(dir);
            match Self::load_from(dir, &folder) {
                Err(e) if folder.replaced() && std::time::Instant::now() < deadline => {
                    tracing::debug!(dir = %dir.display(), error = %format!("{e:#}"), "package replaced while read; reading again");
                }
                r => return r,
            }
        }
    }

    fn load_from(dir: &Path, folder: &FolderReader) -> Result<Self> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = folder.read(MANIFEST_FILE).with_context(|| format!("{}: cannot read the package manifest", manifest_path.display()))?;
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| anyhow!("{}: broken manifest: {e}", manifest_path.display()))?;
        if manifest.format_version != FORMAT_VERSION {
            bail!(
                "{}: format version {} is not supported (this picie reads version {FORMAT_VERSION})",
                manifest_path.display(),
                manifest.format_version
            );
        }
        let mut centroid_bytes = vec![];
        for file in [ONNX_FILE, WEIGHTS_FILE, CENTROIDS_FILE] {
            let path = dir.join(file);
            let bytes = folder.read(file).with_context(|| format!("{}: missing from the package", path.display()))?;
            let expected = manifest.sha256.get(file).ok_or_else(|| anyhow!("{}: no checksum for {file}", manifest_path.display()))?;
            if &sha256_hex(&bytes) != expected {
                bail!("{}: checksum mismatch (the file is corrupt or was changed by hand)", path.display());
            }
            if file == CENTROIDS_FILE {
                centroid_bytes = bytes;
            }
        }
        let centroids_path = dir.join(CENTROIDS_FILE);
        let centroids: Centroids =
            serde_json::from_slice(&centroid_bytes).map_err(|e| anyhow!("{}: broken centroids file: {e}", centroids_path.display()))?;
        let source = centroids_path.display().to_string();
        centroids.validate(&source, manifest.embedder.output_dim())?;
        if centroids.k() != manifest.k {
            bail!("{source}: {} centroids but the manifest says K = {}", centroids.k(), manifest.k);
        }
        Ok(Self { dir: dir.to_path_buf(), manifest, centroids })
    }

    pub fn load_weights(&self) -> Result<TensorMap> {
        TensorMap::load_safetensors(&self.weights_path())
    }

    /// `picie export`: the ONNX graph of the package's burn weights, written to `out`.
    pub fn export_onnx(&self, out: &Path) -> Result<()> {
        let weights = self.load_weights()?;
        let embedder = crate::model::Embedder::load(self.manifest.embedder, &weights, &burn::tensor::Device::flex())
            .with_context(|| format!("loading {}", self.weights_path().display()))?;
        crate::model::export::export_onnx(&embedder, self.manifest.embedder, out)
    }

    /// Writes a package into `dir` atomically. With `replace`, an existing package there is
    /// swapped out only once the new one is complete.
    pub fn write(dir: &Path, contents: PackageContents<'_>, replace: bool) -> Result<Package> {
        let PackageContents { mut manifest, onnx, weights, centroids } = contents;
        centroids.validate("new package", manifest.embedder.output_dim())?;
        manifest.k = centroids.k();
        manifest.format_version = FORMAT_VERSION;
        if dir.exists() && !replace {
            bail!("{} already exists", dir.display());
        }
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let name = dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| anyhow!("bad package path {}", dir.display()))?;
        let tmp = parent.join(format!(".{name}.partial-{}-{}", std::process::id(), crate::util::unique()));
        let result = (|| -> Result<()> {
            std::fs::create_dir_all(&tmp)?;
            let weights_bytes = weights.to_safetensors_bytes()?;
            let centroid_bytes = serde_json::to_vec_pretty(centroids)?;
            manifest.sha256 = BTreeMap::from([
                (ONNX_FILE.to_string(), sha256_hex(onnx)),
                (WEIGHTS_FILE.to_string(), sha256_hex(&weights_bytes)),
                (CENTROIDS_FILE.to_string(), sha256_hex(&centroid_bytes)),
            ]);
            // Every file and the folder reach the disk before the folder is swapped in.
            write_synced(&tmp.join(ONNX_FILE), onnx)?;
            write_synced(&tmp.join(WEIGHTS_FILE), &weights_bytes)?;
            write_synced(&tmp.join(CENTROIDS_FILE), &centroid_bytes)?;
            write_synced(&tmp.join(MANIFEST_FILE), &serde_json::to_vec_pretty(&manifest)?)?;
            crate::util::sync_dir(&tmp)?;
            crate::util::replace_dir(&tmp, dir)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("writing package {}", dir.display())));
        }
        Package::load(dir)
    }

    /// Records quality numbers in the manifest (atomically).
    pub fn record_metrics(&mut self, metrics: impl IntoIterator<Item = (String, f64)>) -> Result<()> {
        let mut manifest = self.manifest.clone();
        manifest.metrics.extend(metrics);
        crate::util::write_atomic(&self.dir.join(MANIFEST_FILE), &serde_json::to_vec_pretty(&manifest)?)?;
        self.manifest = manifest;
        Ok(())
    }

    /// Replaces the centroids file (names, colours) and the manifest's checksum of it as one
    /// step: a new package folder (the unchanged files hard-linked, or copied where links are not
    /// possible) is swapped in with [`crate::util::replace_dir`], so a crash at any point leaves
    /// the old package or the new one, both whole.
    pub fn update_centroids(&mut self, centroids: Centroids) -> Result<()> {
        let parent = self.dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = self.dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| anyhow!("bad package path {}", self.dir.display()))?;
        let staged = parent.join(format!(".{name}.partial-{}-{}", std::process::id(), crate::util::unique()));
        let manifest = self.write_with_centroids(&staged, &centroids)?;
        if let Err(e) = crate::util::replace_dir(&staged, &self.dir) {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(e.context(format!("updating the centroids of {}", self.dir.display())));
        }
        self.manifest = manifest;
        self.centroids = centroids;
        Ok(())
    }

    /// Writes the package with new centroids into the new folder `dest` (fsynced) and returns the
    /// new manifest; the package itself is not touched.
    pub fn write_with_centroids(&self, dest: &Path, centroids: &Centroids) -> Result<Manifest> {
        centroids.validate("updated centroids", self.manifest.embedder.output_dim())?;
        if centroids.k() != self.manifest.k {
            bail!("updated centroids have K = {}, the package has {}", centroids.k(), self.manifest.k);
        }
        let bytes = serde_json::to_vec_pretty(centroids)?;
        let mut manifest = self.manifest.clone();
        manifest.sha256.insert(CENTROIDS_FILE.into(), sha256_hex(&bytes));
        let result = (|| -> Result<()> {
            std::fs::create_dir_all(dest.parent().unwrap_or(Path::new(".")))?;
            std::fs::create_dir(dest)?;
            for e in std::fs::read_dir(&self.dir)? {
                let e = e?;
                let file = e.file_name();
                if file == CENTROIDS_FILE || file == MANIFEST_FILE || !e.file_type()?.is_file() {
                    continue;
                }
                // Files in a package are never changed in place (only renamed over), so a link
                // shares nothing that could change under the old package.
                if std::fs::hard_link(e.path(), dest.join(&file)).is_err() {
                    std::fs::copy(e.path(), dest.join(&file)).with_context(|| format!("copying {}", e.path().display()))?;
                }
            }
            write_synced(&dest.join(CENTROIDS_FILE), &bytes)?;
            write_synced(&dest.join(MANIFEST_FILE), &serde_json::to_vec_pretty(&manifest)?)?;
            crate::util::sync_dir(dest)?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(dest);
            return Err(e.context(format!("staging new centroids for {}", self.dir.display())));
        }
        Ok(manifest)
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackboneKind, NamedTensor};

    /// A small but complete package (the ONNX bytes are not a real graph: `load` only hashes them).
    fn small_package(dir: &Path, k: usize) -> Package {
        let config = EmbedderConfig { dim: 4, ..EmbedderConfig::new(BackboneKind::EfficientnetLite0) };
        let mut weights = TensorMap::new("test");
        weights.insert("w", NamedTensor::new(vec![2, 3], vec![0.5; 6]));
        let vectors = (0..k).map(|i| (0..4).map(|d| if d == i % 4 { 1.0 } else { 0.0 }).collect()).collect();
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            name: "small".into(),
            embedder: config,
            k,
            input: InputPolicy::default(),
            provenance: Provenance::default(),
            metrics: BTreeMap::new(),
            sha256: BTreeMap::new(),
        };
        let contents =
            PackageContents { manifest, onnx: b"not really onnx", weights: &weights, centroids: &Centroids::from_vectors(4, vectors) };
        Package::write(dir, contents, true).unwrap()
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    fn renamed(pkg: &Package, n: usize) -> Centroids {
        let mut c = pkg.centroids.clone();
        c.classes[0].name = Some(format!("name {n}"));
        c
    }

    #[test]
    fn merged_classes_keep_their_over_clusters_through_a_write() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("m");
        let mut pkg = small_package(&dir, 2);
        let unit = |v: [f32; 4]| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        let vectors = vec![unit([1.0, 0.1, 0.0, 0.0]), unit([0.0, 0.0, 1.0, 0.0]), unit([1.0, 0.0, 0.1, 0.0])];
        // Clusters 0 and 2 form class 0, the larger one weighing more in its direction.
        let merged = Centroids::merged(4, vectors.clone(), &[30, 5, 10], &[0, 1, 0]).unwrap();
        assert_eq!((merged.k(), merged.over_clusters()), (2, Some(3)));
        assert_eq!(merged.classes[0].members, vec![vectors[0].clone(), vectors[2].clone()]);
        assert!(merged.classes[1].members.is_empty(), "a class of one is its centroid");
        assert_eq!(merged.classes[1].centroid, vectors[1]);
        let c0 = &merged.classes[0].centroid;
        assert!((c0.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-6 && c0[1] > c0[2]);
        pkg.update_centroids(merged.clone()).unwrap();
        assert_eq!(Package::load(&dir).unwrap().centroids, merged);
        // Packages without over-clusters read and write as before.
        let plain = serde_json::to_value(Centroids::from_vectors(4, vec![vectors[1].clone()])).unwrap();
        assert!(plain["classes"][0].get("members").is_none());
        // Bad over-clusters are refused like bad centroids.
        let mut bad = merged.clone();
        bad.classes[0].members[1] = vec![2.0, 0.0, 0.0, 0.0];
        assert!(bad.validate("t", 4).unwrap_err().to_string().contains("norm"));
        bad.classes[0].members[1] = vec![1.0, 0.0, 0.0];
        assert!(bad.validate("t", 4).is_err());
        assert!(Centroids::merged(4, vectors.clone(), &[1, 1, 1], &[0, 2, 0]).is_err(), "class 1 has no over-clusters");
        assert!(Centroids::merged(4, vectors, &[1, 1], &[0, 1, 0]).is_err());
    }

    #[test]
    fn write_and_update_leave_only_the_package() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("m");
        small_package(&dir, 3);
        let mut pkg = small_package(&dir, 2);
        assert_eq!(pkg.manifest.k, 2);
        pkg.update_centroids(renamed(&pkg, 1)).unwrap();
        assert_eq!(entries(root.path()), ["m"], "no partial or replaced folder is left");
        let loaded = Package::load(&dir).unwrap();
        assert_eq!(loaded.centroids.classes[0].name.as_deref(), Some("name 1"));
        assert_eq!(loaded.manifest, pkg.manifest);
        assert_eq!(entries(&dir), [CENTROIDS_FILE, ONNX_FILE, MANIFEST_FILE, WEIGHTS_FILE]);
        // Wrong K: refused, nothing changed, nothing left behind.
        let mut three = pkg.centroids.clone();
        three.classes.push(three.classes[0].clone());
        assert!(pkg.update_centroids(three).is_err());
        assert_eq!(entries(root.path()), ["m"]);
        assert_eq!(Package::load(&dir).unwrap().centroids.classes[0].name.as_deref(), Some("name 1"));
    }

    #[test]
    fn an_update_interrupted_before_the_swap_leaves_the_old_package() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("m");
        let pkg = small_package(&dir, 2);
        // Everything up to the swap, then the process "dies": the new folder stays staged.
        let staged = root.path().join(format!(".m.partial-{}-0", std::process::id()));
        pkg.write_with_centroids(&staged, &renamed(&pkg, 1)).unwrap();
        let old = Package::load(&dir).unwrap();
        assert_eq!(old.centroids, pkg.centroids, "the package is the old one, whole");
        // The staged folder is a complete package, and a leftover that startup cleanup removes.
        assert_eq!(Package::load(&staged).unwrap().centroids.classes[0].name.as_deref(), Some("name 1"));
        assert!(crate::util::is_leftover(staged.file_name().unwrap().to_str().unwrap()));
    }

    /// Runs `read` on the package folder over and over in another thread while `updates`
    /// centroid updates swap the package; returns every read's result.
    fn reads_during_updates<T: Send + 'static>(pkg: &mut Package, updates: usize, read: fn(&Path) -> T) -> Vec<T> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (stop, dir) = (stop.clone(), pkg.dir.clone());
            std::thread::spawn(move || {
                let mut seen = vec![];
                while !stop.load(Ordering::Relaxed) {
                    seen.push(read(&dir));
                }
                seen
            })
        };
        for n in 0..updates {
            pkg.update_centroids(renamed(pkg, n)).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap()
    }

    #[test]
    fn load_never_fails_while_the_package_is_updated() {
        // A load that read the manifest of one folder and the centroids of the next would report
        // a checksum mismatch for a package that is fine.
        let root = tempfile::tempdir().unwrap();
        let mut pkg = small_package(&root.path().join("m"), 2);
        let seen = reads_during_updates(&mut pkg, 150, |dir| Package::load(dir).map(|_| ()).map_err(|e| format!("{e:#}")));
        let errors: Vec<&String> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
        let loads = seen.len() - errors.len();
        assert!(loads > 0);
        assert!(errors.is_empty(), "{} of {} loads failed, e.g. {}", errors.len(), seen.len(), errors[0]);
    }

    /// Reads manifest and centroids through one handle on the package folder (what a reader
    /// holding the folder sees), and checks the checksum. None when the folder was retired
    /// while being read (its files removed after a swap): read again.
    #[cfg(target_os = "linux")]
    fn consistent_read(dir: &Path) -> Option<bool> {
        use rustix::fs::{openat, Mode, OFlags};
        use std::io::Read;
        let folder = std::fs::File::open(dir).ok()?;
        let read = |name: &str| -> Option<Vec<u8>> {
            let fd = openat(&folder, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()?;
            let mut bytes = vec![];
            std::fs::File::from(fd).read_to_end(&mut bytes).ok()?;
            Some(bytes)
        };
        let manifest: Manifest = serde_json::from_slice(&read(MANIFEST_FILE)?).ok()?;
        let centroids = read(CENTROIDS_FILE)?;
        Some(manifest.sha256[CENTROIDS_FILE] == sha256_hex(&centroids))
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_package_is_consistent_at_every_moment_of_centroid_updates() {
        // The old update (centroids file, then manifest, each renamed into the same folder) shows
        // a reader new centroids with the old checksum between its two writes; the package as a
        // whole swapped never does.
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("m");
        let mut pkg = small_package(&dir, 2);
        // None: the folder was retired while being read; such reads count neither way.
        let seen = reads_during_updates(&mut pkg, 150, consistent_read);
        let good = seen.iter().filter(|r| **r == Some(true)).count();
        let bad = seen.iter().filter(|r| **r == Some(false)).count();
        assert!(good > 0);
        assert_eq!(bad, 0, "a reader saw centroids that do not match the manifest ({good} good reads)");
        assert_eq!(Package::load(&dir).unwrap().centroids.classes[0].name.as_deref(), Some("name 149"));
    }
}
