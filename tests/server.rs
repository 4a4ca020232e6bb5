//! The HTTP API, driven over loopback with a real client against the real server.

mod common;

use std::path::Path;
use std::time::Duration;

use picie::server::app::App;
use picie::server::ServeConfig;
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::{json, Value};

use common::noise_png;
use common::server::{error_code, TestServer as Server};

/// What these tests ask of a server beyond the shared harness.
trait ServerExt {
    async fn fresh(tweak: impl FnOnce(&mut ServeConfig)) -> Server;
    async fn segment(&self, bytes: Vec<u8>, content_type: &str, format: &str) -> reqwest::Response;
    async fn wait_job(&self, id: &str) -> Value;
    fn shipped_flip(&self) -> bool;
}

impl ServerExt for Server {
    /// A server on the shipped models and a fresh data dir, with `tweak` applied to the config.
    async fn fresh(tweak: impl FnOnce(&mut ServeConfig)) -> Server {
        Server::start_with(tweak, Default::default()).await
    }

    async fn segment(&self, bytes: Vec<u8>, content_type: &str, format: &str) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/segment?format={format}")))
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await
            .unwrap()
    }

    /// Whether the shipped default was clustered on flip-averaged features.
    fn shipped_flip(&self) -> bool {
        picie::package::Package::load(&common::root().join("models/default")).unwrap().manifest.input.flip
    }

    async fn wait_job(&self, id: &str) -> Value {
        common::until(&format!("job {id} to end"), Duration::from_secs(60), async || {
            let j: Value = self.client.get(self.url(&format!("/jobs/{id}"))).send().await.unwrap().json().await.unwrap();
            (!["queued", "running"].contains(&j["state"].as_str().unwrap())).then_some(j)
        })
        .await
    }
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(common::fixture(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_in_every_format() {
    let s = Server::fresh(|_| {}).await;
    let cat = fixture_bytes("chelsea.png");

    let r = s.segment(cat.clone(), "image/png", "mask").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.headers()["x-num-classes"], "11");
    assert!(r.headers()["x-model-version"].to_str().unwrap().starts_with("default@"));
    let mask = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(mask.color(), image::ColorType::L8);
    assert_eq!((mask.width(), mask.height()), (451, 300));
    assert!(mask.to_luma8().pixels().all(|p| p[0] < 11));

    let r = s.segment(cat.clone(), "image/png", "palette").await;
    assert_eq!(r.status(), 200);
    let bytes = r.bytes().await.unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()));
    let reader = decoder.read_info().unwrap();
    assert_eq!(reader.info().color_type, png::ColorType::Indexed);
    assert_eq!(reader.info().palette.as_ref().unwrap().len(), 3 * 11);

    let r = s.segment(fixture_bytes("coffee.jpg"), "image/jpeg", "overlay").await;
    assert_eq!(r.status(), 200);
    let overlay = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (600, 400));
    assert_eq!(overlay.color(), image::ColorType::Rgb8);

    let r = s.segment(cat.clone(), "image/png", "json").await;
    assert_eq!(r.status(), 200);
    let j: Value = r.json().await.unwrap();
    assert_eq!((j["width"].as_u64(), j["height"].as_u64(), j["num_classes"].as_u64()), (Some(451), Some(300), Some(11)));
    let total: f64 = j["classes"].as_array().unwrap().iter().map(|c| c["fraction"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-9);
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD.decode(j["mask_png_base64"].as_str().unwrap()).unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().width(), 451);

    // Multipart with the field `image`.
    let form = Form::new().part("image", Part::bytes(cat).file_name("cat.png").mime_str("image/png").unwrap());
    let r = s.client.post(s.url("/segment")).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // The metrics saw all of it.
    let m = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains(r#"picie_http_requests_total{method="POST",route="/segment",status="200"} 5"#), "{m}");
    assert!(m.contains("picie_inference_duration_seconds_count"));
    assert!(m.contains(r#"picie_model_info{model="default",provider="cpu"} 1"#));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_is_chosen_per_request_with_a_server_default() {
    let s = Server::fresh(|_| {}).await;
    let cat = fixture_bytes("chelsea.png");
    let info: Value = s.client.get(s.url("/info")).send().await.unwrap().json().await.unwrap();
    assert_eq!(info["default_quality"], "edges");
    assert_eq!(info["clustered_with_flip"], s.shipped_flip());

    // The same masks the library makes at each quality.
    let seg = picie::infer::Segmenter::load(&common::root().join("models/default"), picie::infer::DeviceChoice::Cpu, None).unwrap();
    let img = image::load_from_memory(&cat).unwrap().to_rgb8();
    let mut masks = std::collections::BTreeMap::new();
    for q in ["fast", "flip", "edges", "crf", "best"] {
        let r = s
            .client
            .post(s.url(&format!("/segment?quality={q}")))
            .header("content-type", "image/png")
            .body(cat.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{q}");
        assert_eq!(r.headers()["x-quality"], q);
        let mask = image::load_from_memory(&r.bytes().await.unwrap()).unwrap().to_luma8().into_raw();
        let want = seg.segment_batch_at(std::slice::from_ref(&img), q.parse().unwrap(), &Default::default()).unwrap().remove(0);
        assert_eq!(mask, want.labels, "{q}: the server's mask is the library's");
        masks.insert(q, mask);
    }
    // Each lever changes the mask, and none of them changes it wholesale.
    for (a, b) in [("fast", "flip"), ("fast", "edges"), ("fast", "crf"), ("flip", "best"), ("crf", "best")] {
        let same = masks[a].iter().zip(&masks[b]).filter(|(x, y)| x == y).count() as f64 / masks[a].len() as f64;
        assert!((0.5..1.0).contains(&same), "{a} vs {b}: {same} of the pixels agree");
    }
    // No quality named: the server's default.
    let r = s.segment(cat.clone(), "image/png", "mask").await;
    assert_eq!(r.headers()["x-quality"], "edges");
    let r = s.client.post(s.url("/segment?quality=ultra")).header("content-type", "image/png").body(cat.clone()).send().await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::BAD_REQUEST, "invalid_query".into()));
    s.stop().await;

    let s = Server::fresh(|c| c.quality = picie::infer::Quality::Fast).await;
    let r = s.segment(cat, "image/png", "mask").await;
    assert_eq!(r.headers()["x-quality"], "fast");
    let mask = image::load_from_memory(&r.bytes().await.unwrap()).unwrap().to_luma8().into_raw();
    assert_eq!(mask, masks["fast"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_clear_errors() {
    let s = Server::fresh(|_| {}).await;
    let png = fixture_bytes("chelsea.png");
    let jpg = fixture_bytes("coffee.jpg");
    let cases: Vec<(&str, Vec<u8>, &str, StatusCode, &str)> = vec![
        ("garbage", b"\x00\x01garbage bytes that are no image".to_vec(), "image/png", StatusCode::UNPROCESSABLE_ENTITY, "invalid_image"),
        ("truncated png", png[..png.len() / 2].to_vec(), "image/png", StatusCode::UNPROCESSABLE_ENTITY, "invalid_image"),
        ("truncated jpeg", jpg[..600].to_vec(), "image/jpeg", StatusCode::UNPROCESSABLE_ENTITY, "invalid_image"),
        ("wrong content type", png.clone(), "application/json", StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
        ("empty body", vec![], "image/png", StatusCode::BAD_REQUEST, "bad_request"),
    ];
    for (what, body, ct, status, code) in cases {
        let r = s.segment(body, ct, "mask").await;
        assert_eq!(error_code(r).await, (status, code.to_string()), "{what}");
    }
    let form = Form::new().part("photo", Part::bytes(png).file_name("x.png"));
    let r = s.client.post(s.url("/segment")).multipart(form).send().await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::BAD_REQUEST, "bad_request".into()));
    let r = s
        .client
        .post(s.url("/segment?format=gif"))
        .header("content-type", "image/png")
        .body(fixture_bytes("chelsea.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    for path in ["/jobs/job-nope", "/datasets/ds-nope", "/models/nope", "/no/such/route", "/models/..%2F..%2Fetc"] {
        let r = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(error_code(r).await, (StatusCode::NOT_FOUND, "not_found".into()), "{path}");
    }
    let r = s.client.post(s.url("/jobs/job-nope/cancel")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = s.client.post(s.url("/jobs")).json(&json!({"type": "recluster", "dataset": "ds-nope", "k": 3})).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = s.client.post(s.url("/jobs")).header("content-type", "application/json").body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_enforced() {
    // Body limit.
    let s = Server::fresh(|c| c.max_body_bytes = 100_000).await;
    let r = s.segment(fixture_bytes("chelsea.png"), "image/png", "mask").await;
    assert_eq!(error_code(r).await, (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large".into()));
    s.stop().await;

    // Pixel limit, read from the header before decoding.
    let s = Server::fresh(|c| c.max_image_pixels = 100_000).await;
    let r = s.segment(fixture_bytes("chelsea.png"), "image/png", "mask").await;
    assert_eq!(error_code(r).await, (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large".into()));
    // A PNG header claiming 100000 x 100000 pixels (a decompression bomb) is refused without decoding.
    let bomb_file = tempfile::NamedTempFile::new().unwrap();
    {
        let mut enc = png::Encoder::new(bomb_file.reopen().unwrap(), 100_000, 100_000);
        enc.set_color(png::ColorType::Grayscale);
        let mut stream = enc.write_header().unwrap().into_stream_writer().unwrap();
        // A few rows of real data, so the file has an IDAT like a real bomb.
        std::io::Write::write_all(&mut stream, &vec![0u8; 100_000 * 10]).unwrap();
        std::io::Write::flush(&mut stream).unwrap();
    }
    let bomb = std::fs::read(bomb_file.path()).unwrap();
    let r = s.segment(bomb, "image/png", "mask").await;
    assert_eq!(error_code(r).await, (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large".into()));
    s.stop().await;

    // Concurrency: one request at a time, the rest get 429 with Retry-After.
    let s = Server::fresh(|c| c.max_concurrent = 1).await;
    let img = fixture_bytes("astronaut.jpg");
    let url = s.url("/segment");
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let rq = s.client.post(&url).header("content-type", "image/jpeg").body(img.clone());
            tokio::spawn(async move { rq.send().await.unwrap() })
        })
        .collect();
    let mut resps = vec![];
    for h in handles {
        resps.push(h.await.unwrap());
    }
    let busy: Vec<_> = resps.iter().filter(|r| r.status() == 429).collect();
    assert!(!busy.is_empty(), "no request was refused");
    // Retry-After: the expected wait in whole seconds, at least 1.
    assert!(busy.iter().all(|r| r.headers()["retry-after"].to_str().unwrap().parse::<u64>().is_ok_and(|s| (1..=120).contains(&s))));
    assert!(resps.iter().all(|r| r.status() == 200 || r.status() == 429));
    s.stop().await;

    // Timeout.
    let s = Server::fresh(|c| c.request_timeout_secs = 0).await;
    let r = s.segment(fixture_bytes("chelsea.png"), "image/png", "mask").await;
    assert_eq!(error_code(r).await, (StatusCode::GATEWAY_TIMEOUT, "timeout".into()));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_every_mutation() {
    let s = Server::fresh(|c| c.api_key = Some("s3cret".into())).await;
    let create = |key: Option<&str>| {
        let mut rq = s.client.post(s.url("/datasets")).json(&json!({"name": "x"}));
        if let Some(k) = key {
            rq = rq.header("x-api-key", k);
        }
        rq.send()
    };
    assert_eq!(error_code(create(None).await.unwrap()).await, (StatusCode::UNAUTHORIZED, "unauthorized".into()));
    assert_eq!(error_code(create(Some("wrong")).await.unwrap()).await, (StatusCode::UNAUTHORIZED, "unauthorized".into()));
    assert_eq!(create(Some("s3cret")).await.unwrap().status(), 201);
    let r = s.client.post(s.url("/datasets")).bearer_auth("s3cret").json(&json!({"name": "y"})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    for (method, path) in [
        ("POST", "/models/default/activate"),
        ("DELETE", "/models/default"),
        ("PUT", "/models/default/classes"),
        ("POST", "/jobs"),
        ("POST", "/jobs/x/cancel"),
    ] {
        let r = s.client.request(method.parse().unwrap(), s.url(path)).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 401, "{method} {path}");
    }
    // Reading and segmenting stay open.
    assert_eq!(s.client.get(s.url("/datasets")).send().await.unwrap().status(), 200);
    assert_eq!(s.segment(fixture_bytes("chelsea.png"), "image/png", "mask").await.status(), 200);
    s.stop().await;
}

async fn upload(s: &Server, ds: &str, files: Vec<(&str, Vec<u8>)>) -> Value {
    let mut form = Form::new();
    for (name, bytes) in files {
        form = form.part("files", Part::bytes(bytes).file_name(name.to_string()));
    }
    let r = s.client.post(s.url(&format!("/datasets/{ds}/images"))).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataset_recluster_activate_segment_cycle() {
    let s = Server::fresh(|_| {}).await;
    let ds: Value = s.client.post(s.url("/datasets")).json(&json!({"name": "street"})).send().await.unwrap().json().await.unwrap();
    let id = ds["id"].as_str().unwrap().to_string();

    let report = upload(
        &s,
        &id,
        vec![
            ("chelsea.png", fixture_bytes("chelsea.png")),
            ("coffee.jpg", fixture_bytes("coffee.jpg")),
            ("broken.jpg", b"not a jpeg at all".to_vec()),
        ],
    )
    .await;
    assert_eq!(report["added"], json!(["chelsea.png", "coffee.jpg"]));
    assert_eq!(report["rejected"][0]["name"], "broken.jpg");
    // A zip with a duplicate and a new image.
    let mut zipped = vec![];
    {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(&mut zipped));
        let o = zip::write::SimpleFileOptions::default();
        z.start_file("set/coffee-again.jpg", o).unwrap();
        std::io::Write::write_all(&mut z, &fixture_bytes("coffee.jpg")).unwrap();
        z.start_file("set/rocket.jpg", o).unwrap();
        std::io::Write::write_all(&mut z, &fixture_bytes("rocket.jpg")).unwrap();
        z.finish().unwrap();
    }
    let r = s
        .client
        .post(s.url(&format!("/datasets/{id}/images")))
        .header("content-type", "application/zip")
        .body(zipped)
        .send()
        .await
        .unwrap();
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["duplicates"], json!(["archive/set/coffee-again.jpg"]));
    assert_eq!(report["added"], json!(["archive/set/rocket.jpg"]));
    assert_eq!(report["num_images"], 3);
    let shown: Value = s.client.get(s.url(&format!("/datasets/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(shown["num_images"], 3);

    // Recluster into 3 classes, following the job over SSE.
    let r =
        s.client.post(s.url("/jobs")).json(&json!({"type": "recluster", "dataset": id, "k": 3, "name": "street-k3"})).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    let jid = job["id"].as_str().unwrap().to_string();
    let sse = s.client.get(s.url(&format!("/jobs/{jid}/events"))).send().await.unwrap();
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let text = tokio::time::timeout(Duration::from_secs(120), sse.text()).await.unwrap().unwrap();
    assert!(text.contains("event: end"), "{text}");
    let done = s.wait_job(&jid).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["model"], "street-k3");
    assert_eq!(done["progress"], 1.0);

    let models: Value = s.client.get(s.url("/models")).send().await.unwrap().json().await.unwrap();
    assert!(models.as_array().unwrap().iter().any(|m| m["name"] == "street-k3" && m["k"] == 3 && m["active"] == false));

    // Activate, segment with it, rename a class.
    let r = s.client.post(s.url("/models/street-k3/activate")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let info: Value = s.client.get(s.url("/info")).send().await.unwrap().json().await.unwrap();
    assert_eq!((info["model"].as_str(), info["num_classes"].as_u64()), (Some("street-k3"), Some(3)));
    let r = s.segment(fixture_bytes("chelsea.png"), "image/png", "mask").await;
    assert_eq!(r.headers()["x-num-classes"], "3");
    let r = s
        .client
        .put(s.url("/models/street-k3/classes"))
        .json(&json!({"classes": [{"index": 1, "name": "fur", "color": [1, 2, 3]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let j: Value = s.segment(fixture_bytes("chelsea.png"), "image/png", "json").await.json().await.unwrap();
    assert_eq!(j["classes"][1]["name"], "fur");
    assert_eq!(j["classes"][1]["color"], json!([1, 2, 3]));
    let r = s.client.put(s.url("/models/street-k3/classes")).json(&json!({"classes": [{"index": 9, "name": "x"}]})).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // The active model cannot be deleted; the shipped one never.
    assert_eq!(s.client.delete(s.url("/models/street-k3")).send().await.unwrap().status(), 409);
    assert_eq!(s.client.post(s.url("/models/default/activate")).send().await.unwrap().status(), 200);
    assert_eq!(s.client.delete(s.url("/models/default")).send().await.unwrap().status(), 409);
    assert_eq!(s.client.delete(s.url("/models/street-k3")).send().await.unwrap().status(), 204);
    assert_eq!(s.client.get(s.url("/models/street-k3")).send().await.unwrap().status(), 404);

    // Bad job requests.
    // Fine-tuning (tiny frames to keep the test short) writes a trained version.
    let r = s.client.post(s.url("/jobs")).json(&json!({"type": "finetune", "dataset": id, "k": 3, "k2": 5, "epochs": 1, "size": 64, "width": 96, "freeze_stride": 8, "batch": 2, "package_k": 4, "name": "tuned", "self_train_epochs": 1})).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    let done = s.wait_job(job["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["k"], 4);
    let tuned: Value = s.client.get(s.url("/models/tuned")).send().await.unwrap().json().await.unwrap();
    assert_eq!(tuned["manifest"]["provenance"]["trained"], true);
    let settings = &tuned["manifest"]["provenance"]["details"]["train"];
    assert_eq!((&settings["size"], &settings["width"], &settings["freeze_stride"]), (&json!(64), &json!(96), &json!(8)), "{settings}");
    // ...then self-trained for one epoch on its own refined labels.
    assert_eq!(tuned["manifest"]["provenance"]["details"]["self_train_losses"].as_array().map(|l| l.len()), Some(1), "{tuned}");

    for body in [
        json!({"type": "recluster", "dataset": id, "k": 1}),
        json!({"type": "recluster", "dataset": id, "k": 3, "name": "../x"}),
        json!({"type": "finetune", "dataset": id, "k": 5, "k2": 5}),
        json!({"type": "finetune", "dataset": id, "size": 100}),
        json!({"type": "finetune", "dataset": id, "width": 100}),
        json!({"type": "finetune", "dataset": id, "freeze_stride": 5}),
        json!({"type": "finetune", "dataset": id, "epochs": 0}),
        json!({"type": "finetune", "dataset": id, "self_train_epochs": 101}),
        json!({"type": "recluster", "dataset": id, "k": 3, "name": "tuned"}),
    ] {
        let r = s.client.post(s.url("/jobs")).json(&body).send().await.unwrap();
        let expected = if body.get("name") == Some(&json!("tuned")) { 409 } else { 400 };
        assert_eq!(r.status(), expected, "{body}");
    }
    assert_eq!(s.client.delete(s.url(&format!("/datasets/{id}"))).send().await.unwrap().status(), 204);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_is_segmented_into_an_archive_and_a_gallery() {
    use std::io::Read;
    let s = Server::fresh(|_| {}).await;
    let ds: Value = s.client.post(s.url("/datasets")).json(&json!({"name": "pile"})).send().await.unwrap().json().await.unwrap();
    let id = ds["id"].as_str().unwrap().to_string();
    let images = [("chelsea.png", "chelsea.png"), ("coffee.jpg", "my coffee.jpg"), ("rocket.jpg", "rocket.jpg")];
    upload(&s, &id, images.iter().map(|(f, name)| (*name, fixture_bytes(f))).collect()).await;

    // A job of another kind has no masks; a segmentation's results wait for it to succeed.
    let r = s
        .client
        .post(s.url("/jobs"))
        .json(&json!({"type": "segment", "dataset": id, "quality": "fast", "model": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "an unknown model");
    let r = s.client.post(s.url("/jobs")).json(&json!({"type": "segment", "dataset": id, "quality": "fast"})).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    let jid = job["id"].as_str().unwrap().to_string();
    let done = s.wait_job(&jid).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let result = &done["result"];
    assert_eq!((&result["model"], &result["quality"], &result["masks"]), (&json!("default"), &json!("fast"), &json!(3)), "{result}");
    let k = result["k"].as_u64().unwrap() as usize;
    let shares: f64 = result["shares"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
    assert!((shares - 1.0).abs() < 1e-6, "{result}");

    // Classes named after the job ran are named in what is downloaded.
    let r =
        s.client.put(s.url("/models/default/classes")).json(&json!({"classes": [{"index": 0, "name": "road, wet"}]})).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let r = s.client.get(s.url(&format!("/jobs/{jid}/masks.zip"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/zip");
    let bytes = r.bytes().await.unwrap().to_vec();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut names: Vec<String> = zip.file_names().map(str::to_string).collect();
    names.sort();
    assert_eq!(names, ["classes.json", "fractions.csv", "masks/chelsea.png", "masks/my_coffee.png", "masks/rocket.png"]);
    let mut read = |name: &str| {
        let mut out = vec![];
        zip.by_name(name).unwrap().read_to_end(&mut out).unwrap();
        out
    };
    let classes: Value = serde_json::from_slice(&read("classes.json")).unwrap();
    assert_eq!((classes.as_array().unwrap().len(), &classes[0]["name"]), (k, &json!("road, wet")));
    let table = String::from_utf8(read("fractions.csv")).unwrap();
    let mut rows = table.lines();
    assert!(rows.next().unwrap().starts_with("mask,image,\"road, wet\","), "{table}");
    for ((file, name), row) in images.iter().zip(rows) {
        // The archive's mask is the one /segment answers at the same quality.
        let mask_name = row.split(',').next().unwrap();
        let mask = image::load_from_memory(&read(mask_name)).unwrap().to_luma8();
        let answered =
            s.segment(fixture_bytes(file), if file.ends_with("png") { "image/png" } else { "image/jpeg" }, "mask&quality=fast").await;
        let answered = image::load_from_memory(&answered.bytes().await.unwrap()).unwrap().to_luma8();
        assert_eq!(mask, answered, "{name}");
        let fields: Vec<&str> = row.split(',').collect();
        assert_eq!(fields[1], *name);
        let class0 = mask.pixels().filter(|p| p.0[0] == 0).count() as f64 / mask.len() as f64;
        assert!((fields[2].parse::<f64>().unwrap() - class0).abs() < 1e-5, "{row}");
    }

    // The gallery: each class's share, its crops, named as now.
    let gallery: Value = s.client.get(s.url(&format!("/jobs/{jid}/gallery"))).send().await.unwrap().json().await.unwrap();
    let classes = gallery["classes"].as_array().unwrap();
    assert_eq!((classes.len(), &classes[0]["name"]), (k, &json!("road, wet")));
    let crop = classes.iter().flat_map(|c| c["crops"].as_array().unwrap()).next().expect("some class has a crop");
    let r = s.client.get(s.url(&format!("/jobs/{jid}/gallery/{}", crop["file"].as_str().unwrap()))).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    let jpeg = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert_eq!((jpeg.width(), jpeg.height()), (160, 160));
    for bad in ["class-200-0.jpg", "..%2Fgallery.json", "gallery.json"] {
        let r = s.client.get(s.url(&format!("/jobs/{jid}/gallery/{bad}"))).send().await.unwrap();
        assert_eq!(r.status(), 404, "{bad}");
    }

    // A re-clustering that suggests K from a range; it has no masks.
    for bad in [json!({"k": 3, "k_min": 2}), json!({"k_min": 5, "k_max": 3}), json!({"k_min": 2, "k_max": 60})] {
        let mut body = json!({"type": "recluster", "dataset": id});
        body.as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
        let r = s.client.post(s.url("/jobs")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
    }
    let r = s.client.post(s.url("/jobs")).json(&json!({"type": "recluster", "dataset": id, "k_min": 2, "k_max": 5})).send().await.unwrap();
    let other: Value = r.json().await.unwrap();
    let r = s.client.get(s.url(&format!("/jobs/{}/masks.zip", other["id"].as_str().unwrap()))).send().await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::NOT_FOUND, "not_found".to_string()));
    let suggested = s.wait_job(other["id"].as_str().unwrap()).await;
    assert_eq!(suggested["state"], "succeeded", "{suggested}");
    let scores = suggested["result"]["k_scores"].as_array().unwrap();
    assert_eq!(scores.iter().map(|s| s["k"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 3, 4, 5]);
    let curve: Vec<picie::train::ksuggest::KScore> = serde_json::from_value(suggested["result"]["k_scores"].clone()).unwrap();
    assert_eq!(suggested["result"]["k"], picie::train::ksuggest::knee(&curve), "the K at the distortion's knee: {suggested}");
    assert!(curve.windows(2).all(|w| w[1].distortion < w[0].distortion + 0.02), "more clusters, closer centroids: {suggested}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_cancel_and_survive_restart() {
    let data = tempfile::tempdir().unwrap();
    let cfg = ServeConfig::new(common::root().join("models"), data.path());
    let s = Server::serve(cfg.clone(), Default::default()).await;
    let ds: Value = s.client.post(s.url("/datasets")).json(&json!({"name": "noise"})).send().await.unwrap().json().await.unwrap();
    let id = ds["id"].as_str().unwrap().to_string();
    let files: Vec<(String, Vec<u8>)> = (0..24).map(|i| (format!("n{i}.png"), noise_png(i, 480, 360))).collect();
    let report = upload(&s, &id, files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect()).await;
    assert_eq!(report["num_images"], 24);

    // Two jobs: the second is canceled while queued, the first while running.
    let submit = |k: usize| s.client.post(s.url("/jobs")).json(&json!({"type": "recluster", "dataset": id, "k": k})).send();
    let a: Value = submit(4).await.unwrap().json().await.unwrap();
    let b: Value = submit(5).await.unwrap().json().await.unwrap();
    let b_id = b["id"].as_str().unwrap();
    let r: Value = s.client.post(s.url(&format!("/jobs/{b_id}/cancel"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["state"], "canceled");
    let a_id = a["id"].as_str().unwrap();
    common::until("the first job to make progress", Duration::from_secs(30), async || {
        let j: Value = s.client.get(s.url(&format!("/jobs/{a_id}"))).send().await.unwrap().json().await.unwrap();
        (j["state"] == "running" && j["progress"].as_f64().unwrap() > 0.0).then_some(())
    })
    .await;
    assert_eq!(s.client.post(s.url(&format!("/jobs/{a_id}/cancel"))).send().await.unwrap().status(), 200);
    let a_done = s.wait_job(a_id).await;
    assert_eq!(a_done["state"], "canceled", "{a_done}");
    assert_eq!(s.client.post(s.url(&format!("/jobs/{a_id}/cancel"))).send().await.unwrap().status(), 409);
    // Nothing half-written from the canceled job.
    let models: Value = s.client.get(s.url("/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models.as_array().unwrap().len(), 1, "{models}");
    s.stop().await;

    // A job that was running when the server died comes back interrupted; a queued one runs.
    let jobs_dir = data.path().join("jobs");
    let mut running: Value = serde_json::from_slice(&std::fs::read(jobs_dir.join(format!("{a_id}.json"))).unwrap()).unwrap();
    running["id"] = json!("job-crashed");
    running["state"] = json!("running");
    running["finished_at"] = Value::Null;
    std::fs::write(jobs_dir.join("job-crashed.json"), serde_json::to_vec(&running).unwrap()).unwrap();
    let mut queued = running.clone();
    queued["id"] = json!("job-waiting");
    queued["state"] = json!("queued");
    queued["spec"]["k"] = json!(2);
    std::fs::write(jobs_dir.join("job-waiting.json"), serde_json::to_vec(&queued).unwrap()).unwrap();
    std::fs::write(jobs_dir.join("junk.json"), b"{ broken").unwrap();

    let s = Server::serve(cfg, Default::default()).await;
    let crashed: Value = s.client.get(s.url("/jobs/job-crashed")).send().await.unwrap().json().await.unwrap();
    assert_eq!(crashed["state"], "interrupted");
    let waited = s.wait_job("job-waiting").await;
    assert_eq!(waited["state"], "succeeded", "{waited}");
    let all: Value = s.client.get(s.url("/jobs")).send().await.unwrap().json().await.unwrap();
    assert_eq!(all.as_array().unwrap().len(), 4);
    let ds_again: Value = s.client.get(s.url(&format!("/datasets/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(ds_again["num_images"], 24);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_health_and_committed_spec() {
    let s = Server::fresh(|_| {}).await;
    assert_eq!(s.client.get(s.url("/health/live")).send().await.unwrap().status(), 200);
    let r: Value = s.client.get(s.url("/health/ready")).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["status"], "ready");
    let served: Value = s.client.get(s.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(served["openapi"], "3.1.0");
    let committed: Value = serde_json::from_slice(&std::fs::read(common::root().join("openapi/openapi.json")).unwrap()).unwrap();
    assert_eq!(served, committed, "openapi/openapi.json is stale: regenerate it with `picie openapi > openapi/openapi.json`");
    let docs = s.client.get(s.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("swagger"), "Swagger UI is served from the binary");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_fails_clearly() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = ServeConfig::new(common::root().join("models"), data.path());
    cfg.model = Some("nope".into());
    let e = format!("{:#}", App::build(&cfg).await.err().unwrap());
    assert!(e.contains("model `nope` not found"), "{e}");
    let _ = Path::new("");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_cuda_device_reports_registration_errors() {
    // This machine's ONNX Runtime is the CPU build: asking for CUDA must fail loudly, not fall back.
    let data = tempfile::tempdir().unwrap();
    let mut cfg = ServeConfig::new(common::root().join("models"), data.path());
    cfg.device = "cuda:0".parse().unwrap();
    let e = format!("{:#}", App::build(&cfg).await.err().unwrap());
    assert!(e.contains("CUDA execution provider (device 0) failed to register"), "{e}");
    assert!("cuda:x".parse::<picie::infer::DeviceChoice>().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_command_sees_the_server() {
    let s = Server::fresh(|_| {}).await;
    let port = s.base.rsplit(':').next().unwrap().to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_picie")).args(["healthcheck", "--port", &port]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.stop().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_picie")).args(["healthcheck", "--port", &port]).output().await.unwrap();
    assert!(!out.status.success(), "nothing listens any more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zip_bomb_entry_is_rejected_by_name() {
    let s = Server::fresh(|_| {}).await;
    let ds: Value = s.client.post(s.url("/datasets")).json(&json!({"name": "bomb"})).send().await.unwrap().json().await.unwrap();
    let id = ds["id"].as_str().unwrap().to_string();
    let mut zipped = vec![];
    {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(&mut zipped));
        let o = zip::write::SimpleFileOptions::default().large_file(true);
        z.start_file("huge.png", o).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..=(picie::server::core::datasets::MAX_ENTRY_BYTES >> 20) {
            std::io::Write::write_all(&mut z, &zeros).unwrap();
        }
        z.start_file("rocket.jpg", o).unwrap();
        std::io::Write::write_all(&mut z, &fixture_bytes("rocket.jpg")).unwrap();
        z.finish().unwrap();
    }
    assert!(zipped.len() < 2 << 20, "the bomb itself is small");
    let r = s
        .client
        .post(s.url(&format!("/datasets/{id}/images")))
        .header("content-type", "application/zip")
        .body(zipped)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["rejected"][0]["name"], "archive/huge.png");
    assert!(report["rejected"][0]["reason"].as_str().unwrap().contains("unpacks to more than"));
    assert_eq!(report["added"], json!(["archive/rocket.jpg"]));
    s.stop().await;
}
