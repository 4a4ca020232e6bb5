//! Dataset uploads under caps: archives streamed entry by entry and refused whole when they break
//! a per-archive cap, bomb entries refused by name, full datasets, oversized bodies. Requests go
//! through the real router in process.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode};
use picie::server::ServeConfig;
use serde_json::{json, Value};
use tower::ServiceExt;

use common::noise_png;

struct App {
    router: axum::Router,
    _built: picie::server::App,
    data: tempfile::TempDir,
}

impl App {
    async fn new(tweak: impl FnOnce(&mut ServeConfig)) -> App {
        let data = tempfile::tempdir().unwrap();
        let mut cfg = ServeConfig::new(common::root().join("models"), data.path());
        tweak(&mut cfg);
        let built = picie::server::App::build(&cfg).await.unwrap();
        // As a client on loopback: without an API key only loopback peers may upload.
        let router = built.router().layer(MockConnectInfo(std::net::SocketAddr::from(([127, 0, 0, 1], 40000))));
        App { router, _built: built, data }
    }

    async fn call(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn create(&self) -> String {
        let req = Request::post("/datasets").header("content-type", "application/json").body(Body::from(r#"{"name":"t"}"#)).unwrap();
        let (status, ds) = self.call(req).await;
        assert_eq!(status, 201);
        ds["id"].as_str().unwrap().to_string()
    }

    async fn post_raw(&self, id: &str, ct: &str, body: Vec<u8>) -> (StatusCode, Value) {
        self.call(Request::post(format!("/datasets/{id}/images")).header("content-type", ct).body(Body::from(body)).unwrap()).await
    }

    async fn post_files(&self, id: &str, files: &[(&str, Vec<u8>)]) -> (StatusCode, Value) {
        let (ct, body) = multipart(files);
        self.post_raw(id, &ct, body).await
    }

    async fn show(&self, id: &str) -> Value {
        self.call(Request::get(format!("/datasets/{id}?images=true&limit=1000")).body(Body::empty()).unwrap()).await.1
    }

    fn images_dir(&self, id: &str) -> PathBuf {
        self.data.path().join("datasets").join(id).join("images")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.data.path().join("tmp")
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|rd| rd.count()).unwrap_or(0)
}

fn multipart(files: &[(&str, Vec<u8>)]) -> (String, Vec<u8>) {
    let boundary = "XxPicieBoundaryxX";
    let mut body = vec![];
    for (name, bytes) in files {
        write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").unwrap();
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn zip_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![];
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(&mut out));
    for (name, bytes) in entries {
        z.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
    out
}

fn tar_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(vec![]);
    for (name, bytes) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, &bytes[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// A zip bomb: `n` entries of `mb` MiB of zeros each, deflated.
fn bomb(n: usize, mb: usize) -> Vec<u8> {
    let mut out = vec![];
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(&mut out));
    let zeros = vec![0u8; 1 << 20];
    for i in 0..n {
        z.start_file(format!("zeros-{i}.png"), zip::write::SimpleFileOptions::default()).unwrap();
        for _ in 0..mb {
            z.write_all(&zeros).unwrap();
        }
    }
    z.finish().unwrap();
    out
}

/// Rewrites every size a zip declares for its entries (local and central headers) to `size`,
/// so only the bytes actually inflated can tell how big an entry is.
fn lie_about_sizes(zip: &mut [u8], size: u32) {
    let mut i = 0;
    while i + 30 <= zip.len() {
        if zip[i..].starts_with(b"PK\x03\x04") {
            zip[i + 22..i + 26].copy_from_slice(&size.to_le_bytes());
        } else if zip[i..].starts_with(b"PK\x01\x02") {
            zip[i + 24..i + 28].copy_from_slice(&size.to_le_bytes());
        }
        i += 1;
    }
}

fn rejected_reason<'a>(report: &'a Value, name: &str) -> &'a str {
    report["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("`{name}` is not rejected in {report}"))["reason"]
        .as_str()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zip_bomb_is_refused_by_name_and_the_dataset_is_unchanged() {
    let app = App::new(|c| {
        c.max_entry_bytes = 8 << 20;
        c.max_unpacked_bytes = 32 << 20;
    })
    .await;
    let id = app.create().await;
    let (status, first) = app.post_files(&id, &[("a.png", noise_png(1, 40, 30))]).await;
    assert_eq!(status, 200, "{first}");
    let before = app.show(&id).await;

    // 40 entries of 4 MiB of zeros: each under the entry cap, 160 MiB in all.
    let (status, report) = app.post_raw(&id, "application/zip", bomb(40, 4)).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["added"], json!([]));
    assert_eq!(report["rejected"].as_array().unwrap().len(), 1, "{report}");
    let reason = rejected_reason(&report, "archive");
    assert!(reason.contains("unpacks to more than 33554432 bytes in all (--max-unpacked-bytes)"), "{reason}");
    assert_eq!(report["num_images"], 1);
    assert_eq!(app.show(&id).await, before);
    assert_eq!(count_files(&app.images_dir(&id)), 1);

    // The same bomb with the sizes it declares falsified: caught while inflating, per entry by
    // the ratio cap, and nothing is kept.
    let mut liar = bomb(3, 2);
    lie_about_sizes(&mut liar, 1000);
    let (status, report) = app.post_raw(&id, "application/zip", liar).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["added"], json!([]));
    for i in 0..3 {
        let reason = rejected_reason(&report, &format!("archive/zeros-{i}.png"));
        assert!(reason.contains("times its compressed size") && reason.contains("--max-compression-ratio"), "{reason}");
    }
    assert_eq!(app.show(&id).await, before);
    assert_eq!(count_files(&app.images_dir(&id)), 1);
    assert_eq!(count_files(&app.tmp_dir()), 0, "scratch files are removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_over_a_per_archive_cap_are_refused_whole() {
    let app = App::new(|c| {
        c.max_archive_entries = 5;
        c.max_unpacked_bytes = 20_000;
    })
    .await;
    let id = app.create().await;
    let pngs: Vec<(String, Vec<u8>)> = (0..6).map(|i| (format!("n{i}.png"), noise_png(i, 30, 20))).collect();
    let small: Vec<(&str, Vec<u8>)> = pngs.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    assert!(small.iter().map(|(_, b)| b.len()).sum::<usize>() < 20_000);

    // Six entries where five are allowed, as zip and as tar.
    for (ct, body) in [("application/zip", zip_of(&small)), ("application/x-tar", tar_of(&small))] {
        let (status, report) = app.post_raw(&id, ct, body).await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["added"], json!([]), "{ct}: {report}");
        assert!(rejected_reason(&report, "archive").contains("more than 5 entries (--max-archive-entries)"), "{report}");
        assert_eq!(report["num_images"], 0);
    }
    // Five entries are fine.
    let (status, report) = app.post_raw(&id, "application/x-tar", tar_of(&small[..5])).await;
    assert_eq!((status, &report["added"].as_array().unwrap().len()), (StatusCode::OK, &5), "{report}");

    // Total unpacked bytes: a tar streams its entries, so the first ones are stored before the
    // total is passed; they must be removed again, files included. Multipart, beside a plain
    // image that is kept.
    let big: Vec<(String, Vec<u8>)> = (10..14).map(|i| (format!("b{i}.png"), noise_png(i, 64, 48))).collect();
    assert!(big[0].1.len() > 7_000, "each entry is over a third of the cap");
    let big: Vec<(&str, Vec<u8>)> = big.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let plain = noise_png(99, 40, 30);
    let (status, report) = app.post_files(&id, &[("big.tar", tar_of(&big)), ("plain.png", plain), ("big.zip", zip_of(&big))]).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["added"], json!(["plain.png"]), "{report}");
    for name in ["big.tar", "big.zip"] {
        assert!(rejected_reason(&report, name).contains("more than 20000 bytes in all (--max-unpacked-bytes)"), "{report}");
    }
    assert_eq!(report["rejected"].as_array().unwrap().len(), 2, "no entry of a refused archive is reported: {report}");
    assert_eq!(report["num_images"], 6);
    assert_eq!(app.show(&id).await["num_images"], 6);
    assert_eq!(count_files(&app.images_dir(&id)), 6, "no file of a refused archive is left");
    assert_eq!(count_files(&app.tmp_dir()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_dataset_rejects_new_files_by_name() {
    let app = App::new(|c| c.max_dataset_images = 3).await;
    let id = app.create().await;
    let files: Vec<(String, Vec<u8>)> = (0..5).map(|i| (format!("n{i}.png"), noise_png(i, 40, 30))).collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let (_, report) = app.post_files(&id, &files[..4]).await;
    assert_eq!(report["added"], json!(["n0.png", "n1.png", "n2.png"]));
    assert!(rejected_reason(&report, "n3.png").starts_with("dataset is full: "), "{report}");
    // Duplicates are still recognised as such; new files are refused.
    let (_, report) = app.post_files(&id, &[files[0].clone(), files[4].clone()]).await;
    assert_eq!(report["duplicates"], json!(["n0.png"]));
    assert!(rejected_reason(&report, "n4.png").contains("--max-dataset-images"), "{report}");
    assert_eq!(app.show(&id).await["num_images"], 3);

    // By bytes.
    let one = files[0].1.len() as u64;
    let app = App::new(|c| c.max_dataset_bytes = one * 2 + one / 2).await;
    let id = app.create().await;
    let (_, report) = app.post_raw(&id, "application/zip", zip_of(&files[..3])).await;
    assert_eq!(report["added"].as_array().unwrap().len(), 2, "{report}");
    assert!(
        rejected_reason(&report, "archive/n2.png").contains("dataset is full")
            && rejected_reason(&report, "archive/n2.png").contains("--max-dataset-bytes")
    );
    assert_eq!(count_files(&app.images_dir(&id)), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_the_body_limit_gets_413_and_leaves_no_scratch_file() {
    let app = App::new(|c| c.max_upload_bytes = 100_000).await;
    let id = app.create().await;
    // Several fields, the later ones past the limit: the earlier ones were already on disk.
    let files: Vec<(String, Vec<u8>)> = (0..8).map(|i| (format!("n{i}.png"), noise_png(i, 100, 80))).collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    assert!(files.iter().map(|(_, b)| b.len()).sum::<usize>() > 100_000);
    let (status, body) = app.post_files(&id, &files).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
    assert!(body["error"]["message"].as_str().unwrap().contains("100000 bytes"), "{body}");
    assert_eq!(count_files(&app.tmp_dir()), 0, "scratch files are removed");

    // A raw archive too, with and without a declared length.
    let big = tar_of(&files);
    let req = Request::post(format!("/datasets/{id}/images"))
        .header("content-type", "application/x-tar")
        .header("content-length", big.len().to_string())
        .body(Body::from(big.clone()))
        .unwrap();
    let (status, body) = app.call(req).await;
    assert_eq!(status, 413, "{body}");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    let req = Request::post(format!("/datasets/{id}/images"))
        .header("content-type", "application/x-tar")
        .body(Body::from_stream(tokio_stream::iter(chunks)))
        .unwrap();
    let (status, body) = app.call(req).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(count_files(&app.tmp_dir()), 0);
    assert_eq!(app.show(&id).await["num_images"], 0);

    // Under the limit it is accepted, and nothing stays in tmp either.
    let (status, report) = app.post_files(&id, &files[..2]).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["added"].as_array().unwrap().len(), 2);
    assert_eq!(count_files(&app.tmp_dir()), 0);
}
