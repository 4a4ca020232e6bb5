//! Docker cannot build here, so the Dockerfile's structure is checked instead: the stages, a
//! non-root user, the health check, the data volume, and that every path it copies exists.

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Stage {
    base: String,
    name: String,
    lines: Vec<String>,
}

/// Stages of the Dockerfile with their instructions (continuation lines joined).
fn stages() -> Vec<Stage> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let mut joined: Vec<String> = vec![];
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if let Some(stripped) = t.strip_suffix('\\') {
            cur.push_str(stripped);
            cur.push(' ');
        } else {
            cur.push_str(t);
            joined.push(std::mem::take(&mut cur));
        }
    }
    let mut out: Vec<Stage> = vec![];
    for l in joined {
        if let Some(rest) = l.strip_prefix("FROM ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            assert_eq!(parts.len(), 3, "every stage is named: {l}");
            out.push(Stage { base: parts[0].into(), name: parts[2].into(), lines: vec![] });
        } else {
            out.last_mut().expect("FROM first").lines.push(l);
        }
    }
    out
}

#[test]
fn stages_build_fetch_and_run() {
    let s = stages();
    let names: Vec<&str> = s.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["build", "ort", "cpu", "gpu"]);
    assert!(s[0].lines.iter().any(|l| l.contains("cargo build --release --locked")));
    let gpu = s.last().unwrap();
    assert!(gpu.base.starts_with("nvidia/cuda:13."), "ONNX Runtime 1.27+ GPU builds need CUDA 13: {}", gpu.base);
    assert!(s[1].lines.iter().any(|l| l.contains("onnxruntime-gpu==")), "the GPU build of ONNX Runtime");
}

#[test]
fn runtime_stages_are_safe_and_healthy() {
    for stage in stages().iter().filter(|s| s.name == "cpu" || s.name == "gpu") {
        let has = |p: &str| stage.lines.iter().any(|l| l.starts_with(p));
        let user = stage.lines.iter().find(|l| l.starts_with("USER ")).unwrap_or_else(|| panic!("{}: no USER", stage.name));
        assert!(!user.contains("root") && !user.ends_with(" 0"), "{}: runs as root", stage.name);
        let hc = stage.lines.iter().find(|l| l.starts_with("HEALTHCHECK")).unwrap_or_else(|| panic!("{}: no HEALTHCHECK", stage.name));
        assert!(hc.contains("healthcheck"), "{hc}");
        assert!(has("VOLUME /data") && has("EXPOSE 8080") && has("ENTRYPOINT [\"picie\", \"serve\"]"), "{}", stage.name);
        assert!(stage.lines.iter().any(|l| l.contains("ORT_DYLIB_PATH=")), "{}: tells picie where ONNX Runtime is", stage.name);
        assert!(stage.lines.iter().any(|l| l.starts_with("COPY models ")), "{}: ships the default model", stage.name);
        assert!(stage.lines.iter().any(|l| l.starts_with("ENV PICIE_API_KEY")), "{}: documents PICIE_API_KEY", stage.name);
    }
}

#[test]
fn every_copied_path_exists_and_is_not_ignored() {
    let ignored: Vec<String> =
        std::fs::read_to_string(root().join(".dockerignore")).unwrap().lines().map(|l| l.trim().to_string()).collect();
    for stage in stages() {
        for l in stage.lines.iter().filter(|l| l.starts_with("COPY ") && !l.contains("--from=")) {
            let parts: Vec<&str> = l.split_whitespace().skip(1).collect();
            for src in &parts[..parts.len() - 1] {
                assert!(root().join(src).exists(), "{}: COPY source `{src}` does not exist", stage.name);
                assert!(!ignored.iter().any(|i| i == src.trim_end_matches('/')), "`{src}` is in .dockerignore");
            }
        }
    }
}
