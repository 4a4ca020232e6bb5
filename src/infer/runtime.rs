//! Finding and loading the ONNX Runtime shared library (`load-dynamic`): `ORT_DYLIB_PATH` when
//! set, else where `scripts/setup.sh` puts it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Result};

pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";
/// Where setup installs the library, relative to the repository root.
pub const SETUP_DIR: &str = ".ort/lib";
const DYLIB_NAME: &str = "libonnxruntime.so";

/// Candidate library paths, in the order they are tried.
pub fn candidate_paths() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(DYLIB_ENV) {
        out.push(PathBuf::from(p));
        return out;
    }
    let mut roots = vec![];
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/picie and target/debug/deps/test-binary -> the repository root.
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for r in roots {
        out.push(r.join(SETUP_DIR).join(DYLIB_NAME));
    }
    out.push(PathBuf::from("/usr/local/lib").join(DYLIB_NAME));
    out.push(PathBuf::from("/usr/lib").join(DYLIB_NAME));
    out
}

pub fn find_dylib() -> Result<PathBuf> {
    let candidates = candidate_paths();
    candidates.iter().find(|p| p.exists()).cloned().ok_or_else(|| {
        anyhow!(
            "ONNX Runtime library not found (looked at {}). Run scripts/setup.sh, or set {DYLIB_ENV}.",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

static ENVIRONMENT: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loaded once.
pub fn environment() -> Result<&'static ort::environment::Environment> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = find_dylib().map_err(|e| e.to_string())?;
            tracing::info!(path = %path.display(), "loading ONNX Runtime");
            ort::init_from(&path)
                .map_err(|e| format!("loading {}: {e}", path.display()))?
                .with_name("picie")
                .build()
                .map_err(|e| format!("starting ONNX Runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}
