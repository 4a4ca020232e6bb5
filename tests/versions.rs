//! One ONNX Runtime version per build, named alike wherever it is fetched: the Dockerfile's
//! `ort` stage, `scripts/setup.sh` (CPU, and `--gpu`) and `scripts/gpu-check.sh` (GPU). A
//! change in one place and not the others fails here, naming the file that disagrees.

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where a version is named: a file and the text right before the version.
struct Site {
    file: &'static str,
    key: &'static str,
}

/// The version that follows `key` in `file` (digits and dots).
fn version_at(site: &Site) -> String {
    let text = std::fs::read_to_string(root().join(site.file)).unwrap_or_else(|e| panic!("{}: {e}", site.file));
    let mut found = text
        .match_indices(site.key)
        .map(|(i, _)| text[i + site.key.len()..].chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect::<String>());
    let v = found.next().unwrap_or_else(|| panic!("{} names no version: `{}` not found", site.file, site.key));
    assert!(found.next().is_none(), "{}: `{}` appears more than once", site.file, site.key);
    assert!(
        v.split('.').count() == 3 && v.split('.').all(|p| !p.is_empty()),
        "{}: `{}` is followed by `{v}`, not a version like 1.31.1",
        site.file,
        site.key
    );
    v
}

/// Fails unless every site names the same version; the message lists each and marks those
/// that differ from the first.
fn agree(what: &str, sites: &[Site]) {
    let found: Vec<(&Site, String)> = sites.iter().map(|s| (s, version_at(s))).collect();
    let (first_file, first) = (found[0].0.file, &found[0].1);
    if found.iter().any(|(_, v)| v != first) {
        let lines: Vec<String> = found
            .iter()
            .map(|(s, v)| {
                format!(
                    "  {:<22} {:<40} {v}{}",
                    s.file,
                    s.key,
                    if v != first { format!("   <- differs from {first_file}") } else { String::new() }
                )
            })
            .collect();
        panic!("{what}: the files name different versions; make them equal:\n{}", lines.join("\n"));
    }
}

#[test]
fn onnxruntime_gpu_version_is_one() {
    agree(
        "onnxruntime-gpu",
        &[
            Site { file: "Dockerfile", key: "ARG ORT_GPU_VERSION=" },
            Site { file: "scripts/setup.sh", key: "ORT_GPU_VERSION=\"${ORT_GPU_VERSION:-" },
            Site { file: "scripts/gpu-check.sh", key: "ORT_GPU_VERSION=\"${ORT_GPU_VERSION:-" },
        ],
    );
}

#[test]
fn onnxruntime_cpu_version_is_one() {
    agree(
        "onnxruntime (CPU)",
        &[Site { file: "Dockerfile", key: "ARG ORT_VERSION=" }, Site { file: "scripts/setup.sh", key: "ORT_VERSION=\"${ORT_VERSION:-" }],
    );
}
