//! Fuzzing on stable Rust: seeded, deterministic mutation loops (bit flips, interesting values,
//! truncation, splices, inserted and repeated runs) over valid inputs, for
//! (a) image decoding (`picie::infer::decode_image`) in six formats,
//! (b) archive expansion (zip, tar) through `DatasetStore::add`, the function uploads use,
//! (c) multipart bodies through the real router, to `/segment` and `/datasets/{id}/images`.
//! Every input must be answered without a panic; over HTTP with a 2xx, or a 4xx carrying
//! `{"error": {"code", "message"}}`, never a 5xx.
//!
//! `PICIE_FUZZ_ITERS=N` sets the inputs per target: N for decoding, N/4 for archives and N/8 for
//! each multipart route (default N = 8000: the whole file runs in well under a minute in a debug
//! build). `PICIE_FUZZ_SEED` changes the seed. An input that fails is written to
//! `target/fuzz-failures/` and the test fails naming it.

mod common;

use axum::extract::connect_info::MockConnectInfo;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use picie::server::app::App;
use picie::server::core::datasets::{DatasetLimits, Upload};
use picie::server::storage::local::datasets::LocalDatasets;
use picie::server::storage::local::DataDir;
use picie::server::storage::DatasetStore;
use picie::server::ServeConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tower::ServiceExt;

fn iters() -> usize {
    std::env::var("PICIE_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(8000)
}

fn seed(target: u64) -> u64 {
    std::env::var("PICIE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed) ^ (target << 32)
}

/// Structure-blind mutations of valid inputs.
struct Mutator {
    rng: ChaCha8Rng,
}

const INTERESTING_U8: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'\r', b'\n', b'-'];
const INTERESTING_U32: [u32; 8] = [0, 1, 0x7fff, 0xffff, 0x10000, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];

impl Mutator {
    fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    fn pos(&mut self, len: usize) -> usize {
        if len == 0 {
            0
        } else {
            self.rng.random_range(0..len)
        }
    }

    /// One to four mutations of `input`, splicing from `corpus` now and then.
    fn mutate(&mut self, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
        let mut b = input.to_vec();
        for _ in 0..self.rng.random_range(1..=4) {
            match self.rng.random_range(0..9) {
                0 => {
                    let p = self.pos(b.len());
                    if let Some(x) = b.get_mut(p) {
                        *x ^= 1 << self.rng.random_range(0..8);
                    }
                }
                1 => {
                    let p = self.pos(b.len());
                    let v = INTERESTING_U8[self.rng.random_range(0..INTERESTING_U8.len())];
                    if let Some(x) = b.get_mut(p) {
                        *x = v;
                    }
                }
                2 => {
                    let p = self.pos(b.len().saturating_sub(3));
                    let v = INTERESTING_U32[self.rng.random_range(0..INTERESTING_U32.len())];
                    let bytes = if self.rng.random_bool(0.5) { v.to_le_bytes() } else { v.to_be_bytes() };
                    let n = if self.rng.random_bool(0.5) { 2 } else { 4 };
                    for (i, byte) in bytes.iter().take(n).enumerate() {
                        if let Some(x) = b.get_mut(p + i) {
                            *x = *byte;
                        }
                    }
                }
                3 => {
                    let p = self.pos(b.len());
                    b.truncate(p);
                }
                4 => {
                    // Splice: a run of another input replaces a run of this one.
                    let other = &corpus[self.rng.random_range(0..corpus.len())];
                    if !other.is_empty() {
                        let from = self.pos(other.len());
                        let len = self.rng.random_range(1..=(other.len() - from).min(512));
                        let at = self.pos(b.len());
                        let end = (at + self.rng.random_range(0..=len)).min(b.len());
                        b.splice(at..end, other[from..from + len].iter().copied());
                    }
                }
                5 => {
                    let at = self.pos(b.len() + 1);
                    let len = if self.rng.random_bool(0.9) { self.rng.random_range(1..64) } else { self.rng.random_range(64..8192) };
                    let junk: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                    b.splice(at..at, junk);
                }
                6 => {
                    let at = self.pos(b.len());
                    let len = self.rng.random_range(0..=(b.len() - at).min(256));
                    b.drain(at..at + len);
                }
                7 => {
                    // Repeat a run.
                    let at = self.pos(b.len());
                    let len = self.rng.random_range(0..=(b.len() - at).min(256));
                    let run = b[at..at + len].to_vec();
                    for _ in 0..self.rng.random_range(1..8) {
                        b.splice(at..at, run.iter().copied());
                    }
                }
                _ => {
                    // Random bytes of a random length.
                    let len = self.rng.random_range(0..2048);
                    b = (0..len).map(|_| self.rng.random()).collect();
                }
            }
        }
        b
    }
}

/// Where failing inputs go.
fn failures_dir() -> PathBuf {
    let d = common::root().join("target/fuzz-failures");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn keep_failure(target: &str, i: usize, input: &[u8], why: &str, failures: &mut Vec<String>) {
    let p = failures_dir().join(format!("{target}-{:x}-{i}.bin", seed(0)));
    std::fs::write(&p, input).unwrap();
    failures.push(format!("{}: {why}", p.display()));
}

fn report(target: &str, n: usize, start: Instant, failures: &[String], outcomes: &str) {
    eprintln!("fuzz {target}: {n} inputs ({outcomes}), {} failures, {:.1} s", failures.len(), start.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "fuzz {target}: {} failing inputs:\n{}", failures.len(), failures.join("\n"));
}

fn textured(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7 + y * 3) as u8, ((x ^ y) * 9) as u8, ((x * y) % 251) as u8]))
}

fn encode(img: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut out), format).unwrap();
    out
}

/// Valid images in every format the server reads.
fn image_seeds() -> Vec<Vec<u8>> {
    use image::{DynamicImage, ImageFormat as F};
    let rgb = DynamicImage::ImageRgb8(textured(24, 16));
    let rgba = DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(textured(13, 9)).to_rgba8());
    let gray = DynamicImage::ImageLuma8(rgb.to_luma8());
    vec![
        encode(&rgb, F::Png),
        encode(&rgba, F::Png),
        encode(&gray, F::Png),
        encode(&rgb, F::Jpeg),
        encode(&gray, F::Jpeg),
        encode(&rgba, F::Gif),
        encode(&rgb, F::Bmp),
        encode(&rgba, F::Bmp),
        encode(&rgb, F::Tiff),
        encode(&gray, F::Tiff),
        encode(&rgb, F::WebP),
        encode(&rgba, F::WebP),
    ]
}

#[test]
fn fuzz_image_decoding() {
    let seeds = image_seeds();
    for s in &seeds {
        picie::infer::decode_image(s, 1 << 20).expect("every seed is a valid image");
    }
    let mut m = Mutator::new(seed(1));
    let n = iters();
    let start = Instant::now();
    let mut failures = vec![];
    let mut decoded = 0;
    for i in 0..n {
        let input = m.mutate(&seeds[i % seeds.len()], &seeds);
        match std::panic::catch_unwind(|| picie::infer::decode_image(&input, 1 << 20).map(|img| img.width())) {
            Ok(Ok(_)) => decoded += 1,
            Ok(Err(_)) => {}
            Err(_) => keep_failure("decode", i, &input, "decode_image panicked", &mut failures),
        }
    }
    report("decode_image", n, start, &failures, &format!("{decoded} still decoded"));
}

fn zip_of(entries: &[(&str, &[u8])], method: zip::CompressionMethod) -> Vec<u8> {
    let mut out = vec![];
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(&mut out));
    let o = zip::write::SimpleFileOptions::default().compression_method(method);
    z.add_directory("set/", o).unwrap();
    for (name, bytes) in entries {
        z.start_file(*name, o).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
    out
}

fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(vec![]);
    for (name, bytes) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *bytes).unwrap();
    }
    b.into_inner().unwrap()
}

fn archive_seeds() -> Vec<Vec<u8>> {
    let imgs = image_seeds();
    let entries: Vec<(&str, &[u8])> =
        vec![("set/a.png", &imgs[0]), ("set/b.jpg", &imgs[3]), ("c.gif", &imgs[5]), (".hidden.png", &imgs[1])];
    vec![
        zip_of(&entries, zip::CompressionMethod::Deflated),
        zip_of(&entries, zip::CompressionMethod::Stored),
        zip_of(&entries[..1], zip::CompressionMethod::Deflated),
        tar_of(&entries),
        tar_of(&entries[2..3]),
    ]
}

#[test]
fn fuzz_archive_expansion() {
    let data = tempfile::tempdir().unwrap();
    let limits = DatasetLimits {
        max_entry_bytes: 1 << 20,
        max_unpacked_bytes: 4 << 20,
        max_archive_entries: 64,
        max_image_pixels: 1 << 20,
        ..DatasetLimits::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (dir, _lock) = DataDir::open(data.path()).unwrap();
    let store = std::sync::Arc::new(LocalDatasets::new(dir, limits));
    let id = rt.block_on(store.create("fuzz")).unwrap().id;
    let upload = |name: &str, bytes: &[u8]| -> Upload {
        let (u, mut f) = rt.block_on(store.new_upload(name.to_string())).unwrap();
        f.write_all(bytes).unwrap();
        u
    };
    let seeds = archive_seeds();
    for s in &seeds {
        let u = upload("seed", s);
        let r = rt.block_on(store.add(&id, vec![u])).unwrap();
        assert!(r.rejected.is_empty(), "every seed is a valid archive: {r:?}");
    }
    let mut m = Mutator::new(seed(2));
    let n = iters() / 4;
    let start = Instant::now();
    let mut failures = vec![];
    let (mut added, mut duplicates, mut rejected) = (0, 0, 0);
    for i in 0..n {
        let input = m.mutate(&seeds[i % seeds.len()], &seeds);
        let u = upload("archive", &input);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(store.add(&id, vec![u]))));
        match r {
            Ok(Ok(report)) => {
                assert_eq!(report.num_images, rt.block_on(store.get(&id)).unwrap().num_images);
                added += report.added.len();
                duplicates += report.duplicates.len();
                rejected += report.rejected.len();
            }
            Ok(Err(e)) => keep_failure("archive", i, &input, &format!("error: {e}"), &mut failures),
            Err(_) => keep_failure("archive", i, &input, "panicked", &mut failures),
        }
    }
    assert_eq!(std::fs::read_dir(data.path().join("tmp")).unwrap().count(), 0, "scratch files are removed");
    // Every image the index names is there, and nothing else is.
    let ds = rt.block_on(store.get(&id)).unwrap();
    let on_disk = std::fs::read_dir(data.path().join("datasets").join(&id).join("images")).unwrap().count();
    assert_eq!(on_disk, ds.num_images);
    report("archive expansion", n, start, &failures, &format!("files added {added}, duplicates {duplicates}, rejected {rejected}"));
}

fn multipart(boundary: &str, parts: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let mut body = vec![];
    for (field, file, bytes) in parts {
        write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{file}\"\r\nContent-Type: application/octet-stream\r\n\r\n").unwrap();
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    body
}

/// Checks one answer: 2xx, or 4xx with the JSON error body.
fn check_answer(status: u16, body: &[u8]) -> Result<(), String> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    if !(400..500).contains(&status) {
        return Err(format!("status {status}: {}", String::from_utf8_lossy(body)));
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("status {status}, body not JSON ({e}): {}", String::from_utf8_lossy(body)))?;
    let ok = v["error"]["code"].as_str().is_some_and(|c| !c.is_empty()) && v["error"]["message"].as_str().is_some_and(|m| !m.is_empty());
    if ok {
        Ok(())
    } else {
        Err(format!("status {status}: no error.code/message in {v}"))
    }
}

#[test]
fn fuzz_multipart_through_the_router() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut cfg = ServeConfig::new(common::root().join("models"), data.path());
    cfg.max_image_pixels = 1 << 20;
    cfg.max_body_bytes = 1 << 20;
    cfg.max_upload_bytes = 4 << 20;
    let built = rt.block_on(App::build(&cfg)).unwrap();
    // As a client on loopback: without an API key only loopback peers may upload.
    let app = built.router().layer(MockConnectInfo(std::net::SocketAddr::from(([127, 0, 0, 1], 40000))));
    let call = |req: Request<Body>| {
        let app = app.clone();
        rt.block_on(async move {
            let resp = tokio::spawn(app.oneshot(req)).await.map_err(|e| format!("the handler panicked: {e}"))?.unwrap();
            let status = resp.status().as_u16();
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.map_err(|e| format!("reading the answer: {e}"))?;
            Ok::<_, String>((status, body))
        })
    };
    let create = Request::post("/datasets").header("content-type", "application/json").body(Body::from(r#"{"name":"fuzz"}"#)).unwrap();
    let (_, ds) = call(create).unwrap();
    let id = serde_json::from_slice::<Value>(&ds).unwrap()["id"].as_str().unwrap().to_string();

    let imgs = image_seeds();
    let archives = archive_seeds();
    let boundary = "fuzzBoundary7MA4YWxkTrZu0gW";
    let seeds = vec![
        multipart(boundary, &[("image", "a.png", &imgs[0])]),
        multipart(boundary, &[("image", "b.jpg", &imgs[3])]),
        multipart(boundary, &[("files", "a.png", &imgs[0]), ("files", "c.gif", &imgs[5]), ("files", "set.zip", &archives[0])]),
        multipart(boundary, &[("other", "x.txt", b"hello"), ("image", "d.webp", &imgs[10])]),
        multipart(boundary, &[("files", "set.tar", &archives[3])]),
    ];
    for (path, body) in [("/segment", &seeds[0]), (&format!("/datasets/{id}/images") as &str, &seeds[2])] {
        let req = Request::post(path)
            .header("content-type", format!("multipart/form-data; boundary={boundary}"))
            .body(Body::from(body.clone()))
            .unwrap();
        let (status, answer) = call(req).unwrap();
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&answer));
    }

    let n = iters() / 8;
    for (t, path) in [(3u64, "/segment?format=json".to_string()), (4, format!("/datasets/{id}/images"))] {
        let mut m = Mutator::new(seed(t));
        let start = Instant::now();
        let mut failures = vec![];
        let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
        for i in 0..n {
            let input = m.mutate(&seeds[i % seeds.len()], &seeds);
            // Now and then the content type lies about the boundary too.
            let ct = match m.rng.random_range(0..10) {
                0 => "multipart/form-data".to_string(),
                1 => "multipart/form-data; boundary=other".to_string(),
                2 => format!("multipart/form-data; boundary=\"{boundary}\""),
                _ => format!("multipart/form-data; boundary={boundary}"),
            };
            let req = Request::post(&path).header("content-type", ct).body(Body::from(input.clone())).unwrap();
            let answer = call(req).inspect(|(status, _)| *statuses.entry(*status).or_default() += 1);
            if let Err(why) = answer.and_then(|(status, body)| check_answer(status, &body)) {
                keep_failure(&format!("multipart{t}"), i, &input, &why, &mut failures);
            }
        }
        report(&format!("multipart {path}"), n, start, &failures, &format!("statuses {statuses:?}"));
    }
    assert_eq!(std::fs::read_dir(data.path().join("tmp")).unwrap().count(), 0, "scratch files are removed");
}
