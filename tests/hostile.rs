//! The server under hostile or careless traffic, over real loopback sockets: slow and half-open
//! connections, huge images in small files, abandoned requests, event streams left open,
//! cross-site requests, oversized multipart bodies, and requests that would lose data.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::{error_code, png, TestServer};
use common::until;
use picie::server::app::Parts;
use picie::server::service::inference::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A JPEG street-frame-sized photo.
fn photo() -> Vec<u8> {
    std::fs::read(common::fixture("astronaut.jpg")).unwrap()
}

/// Reads until the server closes the connection (or `within` passes); the bytes it sent.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut out = vec![];
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|_| out)
}

async fn metric(s: &TestServer, name: &str) -> f64 {
    let text = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_half_open_sockets_neither_block_segment_nor_stay_open() {
    let s = TestServer::start(|c| {
        c.quality = picie::infer::Quality::Fast;
        c.header_timeout_secs = 2;
        c.body_timeout_secs = 2;
        c.max_concurrent = 4;
    })
    .await;
    let addr = s.base.trim_start_matches("http://").to_string();
    // 32 sockets that promise a megabyte of image and send 4 bytes; 32 that never finish their headers.
    let mut slow = vec![];
    for _ in 0..32 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"POST /segment HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n\x89PNG")
            .await
            .unwrap();
        slow.push(c);
    }
    let mut half = vec![];
    for _ in 0..32 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"POST /segment HTTP/1.1\r\nHost: local").await.unwrap();
        half.push(c);
    }
    // Meanwhile /segment answers as usual, more times than it has places.
    let started = Instant::now();
    for _ in 0..8 {
        let r = s.client.post(s.url("/segment?quality=fast")).header("content-type", "image/jpeg").body(photo()).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert!(started.elapsed() < Duration::from_secs(30), "served while the sockets were open: {:?}", started.elapsed());
    // And the server closes them within its timeouts: the slow bodies with 408, the headers silently.
    for mut c in slow {
        let answer = read_until_closed(&mut c, Duration::from_secs(10)).await.expect("the server closes a slow body's connection");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    for mut c in half {
        read_until_closed(&mut c, Duration::from_secs(10)).await.expect("the server closes a connection whose headers never end");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_is_free() {
    let s = TestServer::start(|c| {
        c.max_connections = 4;
        c.header_timeout_secs = 1;
    })
    .await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let idle: Vec<TcpStream> =
        futures_util::future::join_all((0..4).map(|_| TcpStream::connect(&addr))).await.into_iter().map(Result::unwrap).collect();
    // The fifth is accepted once the idle ones are closed (after the header timeout).
    let started = Instant::now();
    let r = s.client.get(s.url("/health/live")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(500), "it waited for a free connection: {:?}", started.elapsed());
    drop(idle);
    s.stop().await;
}

/// An engine that holds every batch until released, counting the images it was given.
fn held_engine() -> (Engine, Arc<AtomicBool>, Arc<AtomicUsize>) {
    let (hold, seen) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicUsize::new(0)));
    let (h, n) = (hold.clone(), seen.clone());
    let engine: Engine = Arc::new(move |model, images, quality| {
        n.fetch_add(images.len(), Ordering::SeqCst);
        while h.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        model.segment_batch_at(images, quality, &Default::default())
    });
    (engine, hold, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_nobody_waits_for_are_not_computed() {
    let (engine, hold, seen) = held_engine();
    let s = TestServer::start_with(
        |c| {
            c.quality = picie::infer::Quality::Fast;
            c.max_batch = 1;
            c.max_queue_ms = 600_000;
        },
        Parts { engine: Some(engine), stall_after: Some(Duration::from_secs(600)) },
    )
    .await;
    let post = || s.client.post(s.url("/segment")).header("content-type", "image/png").body(png(32, 32));
    // The first is held in the engine; five more queue behind it, and their clients give up.
    let first = tokio::spawn(post().send());
    until("the first request to reach the engine", Duration::from_secs(10), || async { (seen.load(Ordering::SeqCst) == 1).then_some(()) })
        .await;
    for _ in 0..5 {
        assert!(post().timeout(Duration::from_millis(300)).send().await.is_err(), "the client timed out");
    }
    hold.store(false, Ordering::SeqCst);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    until("the abandoned requests to be skipped", Duration::from_secs(10), || async {
        (metric(&s, "picie_segment_abandoned_total").await == 5.0).then_some(())
    })
    .await;
    assert_eq!(seen.load(Ordering::SeqCst), 1, "only the request someone waited for was computed");
    s.stop().await;
}

/// A PNG of `w` x `h` black pixels: a small file that decodes to a large image.
fn large_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = vec![];
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Grayscale);
        let mut wr = enc.write_header().unwrap();
        wr.write_image_data(&vec![0u8; (w * h) as usize]).unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_images_are_admitted_by_their_pixels() {
    let (engine, hold, seen) = held_engine();
    let s = TestServer::start_with(
        |c| {
            c.quality = picie::infer::Quality::Fast;
            c.max_inflight_pixels = 20_000_000;
            c.max_queue_ms = 600_000;
        },
        Parts { engine: Some(engine), stall_after: Some(Duration::from_secs(600)) },
    )
    .await;
    let big = large_png(4000, 3000);
    assert!(big.len() < 1 << 20, "{} bytes", big.len());
    let post = |body: Vec<u8>| s.client.post(s.url("/segment")).header("content-type", "image/png").body(body).send();
    // 12 megapixels fit the 20 MP budget once; the second waits its turn with a 429.
    let first = tokio::spawn(post(big.clone()));
    until("the first image to reach the engine", Duration::from_secs(20), || async { (seen.load(Ordering::SeqCst) == 1).then_some(()) })
        .await;
    assert!(metric(&s, "picie_segment_pixels_in_flight").await >= 12_000_000.0);
    let r = post(big.clone()).await.unwrap();
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_code(r).await, (StatusCode::TOO_MANY_REQUESTS, "too_many_requests".into()));
    // One over the whole budget could never fit: 413.
    let r = post(large_png(5000, 5000)).await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large".into()));
    hold.store(false, Ordering::SeqCst);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(metric(&s, "picie_segment_pixels_in_flight").await, 0.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_cross_site_and_proxied_changes_are_refused() {
    let s = TestServer::start(|_| {}).await;
    let create = |headers: &[(&str, &str)]| {
        let mut r = s.client.post(s.url("/datasets")).json(&json!({"name": "x"}));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send()
    };
    assert_eq!(create(&[]).await.unwrap().status(), StatusCode::CREATED, "a local client");
    assert_eq!(create(&[("sec-fetch-site", "same-origin")]).await.unwrap().status(), StatusCode::CREATED, "the server's own page");
    for headers in [
        &[("origin", "http://evil.example")][..],
        &[("sec-fetch-site", "cross-site")][..],
        &[("host", "evil.example")][..],
        &[("x-forwarded-for", "203.0.113.7")][..],
    ] {
        let r = create(headers).await.unwrap();
        assert_eq!(error_code(r).await, (StatusCode::FORBIDDEN, "forbidden".into()), "{headers:?}");
    }
    // Reads stay open.
    assert_eq!(s.client.get(s.url("/datasets")).header("origin", "http://evil.example").send().await.unwrap().status(), StatusCode::OK);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protect_reads_asks_for_the_key_everywhere_but_health_and_the_page() {
    let s = TestServer::start(|c| {
        c.api_key = Some("sesame".into());
        c.protect_reads = true;
    })
    .await;
    for path in ["/models", "/datasets", "/jobs", "/info", "/metrics"] {
        let r = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(error_code(r).await.0, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(s.client.get(s.url(path)).header("x-api-key", "sesame").send().await.unwrap().status(), StatusCode::OK, "{path}");
    }
    let r = s.client.post(s.url("/segment")).header("content-type", "image/png").body(png(32, 32)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for path in ["/health/live", "/health/ready", "/", "/openapi.json"] {
        assert_eq!(s.client.get(s.url(path)).send().await.unwrap().status(), StatusCode::OK, "{path}");
    }
    s.stop().await;
}

/// A dataset of `n` small noise images on `s`; its id.
async fn dataset(s: &TestServer, n: u32) -> String {
    let ds: Value = s.client.post(s.url("/datasets")).json(&json!({"name": "d"})).send().await.unwrap().json().await.unwrap();
    let id = ds["id"].as_str().unwrap().to_string();
    let mut form = reqwest::multipart::Form::new();
    for i in 0..n {
        form = form.part("files", reqwest::multipart::Part::bytes(common::noise_png(i, 64, 64)).file_name(format!("n{i}.png")));
    }
    assert_eq!(s.client.post(s.url(&format!("/datasets/{id}/images"))).multipart(form).send().await.unwrap().status(), StatusCode::OK);
    id
}

/// A fine-tuning job that runs long enough for a test to watch it (canceled by the test).
async fn long_job(s: &TestServer, dataset: &str) -> String {
    let r = s
        .client
        .post(s.url("/jobs"))
        .json(&json!({"type": "finetune", "dataset": dataset, "epochs": 100, "size": 64, "batch": 2, "name": "long"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_end_with_their_clients_and_are_capped() {
    let s = TestServer::start(|c| {
        c.max_watchers = 40;
        c.max_watchers_per_job = 30;
    })
    .await;
    let id = dataset(&s, 4).await;
    let job = long_job(&s, &id).await;
    let events = s.url(&format!("/jobs/{job}/events"));
    // 30 watchers of one job: the 31st is refused; each sees the job's first event.
    let mut open = vec![];
    for _ in 0..30 {
        let mut r = s.client.get(&events).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let first = r.chunk().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).contains(&job));
        open.push(r);
    }
    assert_eq!(metric(&s, "picie_job_watchers").await, 30.0);
    let r = s.client.get(&events).send().await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::TOO_MANY_REQUESTS, "too_many_requests".into()));
    // The clients go: so do their watchers, well before the job ends.
    drop(open);
    until("the watchers of closed streams to end", Duration::from_secs(30), || async {
        (metric(&s, "picie_job_watchers").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(s.client.post(s.url(&format!("/jobs/{job}/cancel"))).send().await.unwrap().status(), StatusCode::OK);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_to_a_careless_request() {
    let data = tempfile::tempdir().unwrap();
    let cfg = common::server::config(data.path());
    let s = TestServer::serve(cfg.clone(), Parts::default()).await;

    // A second server on the same data folder refuses to start, and says why.
    let e = format!("{:#}", picie::server::App::build(&cfg).await.err().expect("the folder is held"));
    assert!(e.contains("in use by another picie server"), "{e}");

    // A dataset that a queued or running job uses is not deleted.
    let id = dataset(&s, 4).await;
    let job = long_job(&s, &id).await;
    let r = s.client.delete(s.url(&format!("/datasets/{id}"))).send().await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::CONFLICT, "conflict".into()));
    // Nor may a second job write the model name the first will write.
    let r = s.client.post(s.url("/jobs")).json(&json!({"type": "recluster", "dataset": id, "k": 3, "name": "long"})).send().await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::CONFLICT, "conflict".into()));
    assert_eq!(s.client.post(s.url(&format!("/jobs/{job}/cancel"))).send().await.unwrap().status(), StatusCode::OK);
    until("the job to end", Duration::from_secs(60), || async {
        let j: Value = s.client.get(s.url(&format!("/jobs/{job}"))).send().await.unwrap().json().await.unwrap();
        (j["state"] == "canceled").then_some(())
    })
    .await;
    assert_eq!(s.client.delete(s.url(&format!("/datasets/{id}"))).send().await.unwrap().status(), StatusCode::NO_CONTENT);

    // Renaming a shipped model's class writes an edited copy in the data folder; the shipped
    // package is not touched.
    let shipped = common::root().join("models/default/centroids.json");
    let before = std::fs::read(&shipped).unwrap();
    let r = s.client.put(s.url("/models/default/classes")).json(&json!({"classes": [{"index": 0, "name": "sky!"}]})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(std::fs::read(&shipped).unwrap(), before);
    assert!(data.path().join("models/default/centroids.json").exists());
    let m: Value = s.client.get(s.url("/models/default")).send().await.unwrap().json().await.unwrap();
    assert_eq!((m["classes"][0]["name"].as_str(), m["builtin"].as_bool()), (Some("sky!"), Some(true)));
    let r = s.client.delete(s.url("/models/default")).send().await.unwrap();
    assert_eq!(error_code(r).await.0, StatusCode::CONFLICT, "a shipped name, edited or not, is never deleted");

    // Activating a model that does not exist changes nothing.
    let r = s.client.post(s.url("/models/nope/activate")).send().await.unwrap();
    assert_eq!(error_code(r).await.0, StatusCode::NOT_FOUND);
    assert!(!data.path().join("active_model").exists());

    // A broken index is an internal error whose message names no server path.
    let id = dataset(&s, 1).await;
    std::fs::write(data.path().join("datasets").join(&id).join("dataset.json"), b"{ broken").unwrap();
    let r = s.client.get(s.url(&format!("/datasets/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = r.text().await.unwrap();
    assert!(!body.contains(&data.path().display().to_string()) && !body.contains("/datasets/"), "{body}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_bodies_are_capped_in_parts_and_part_headers() {
    let s = TestServer::start(|c| {
        c.max_parts = 10;
        c.max_part_header_bytes = 4096;
    })
    .await;
    let id = dataset(&s, 1).await;
    let upload = |body: Vec<u8>| {
        s.client
            .post(s.url(&format!("/datasets/{id}/images")))
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(body)
            .send()
    };
    let part = |i: usize, pad: usize| {
        format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{i}.png\"\r\nX-Pad: {}\r\n\r\nabc\r\n",
            "p".repeat(pad)
        )
    };
    let body: String = (0..20).map(|i| part(i, 0)).collect::<String>() + "--XyZ--\r\n";
    let r = upload(body.into_bytes()).await.unwrap();
    let (status, code) = error_code(r).await;
    assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
    // Headers that run on without an end are refused before the body ends.
    let body =
        part(0, 0) + &format!("--XyZ\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x\"\r\nX-Pad: {}", "p".repeat(1 << 20));
    let r = upload(body.into_bytes()).await.unwrap();
    let (status, _) = error_code(r).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Within the caps, the same form is fine (files that are not images are reported by name).
    let body: String = (0..3).map(|i| part(i, 100)).collect::<String>() + "--XyZ--\r\n";
    let report: Value = upload(body.into_bytes()).await.unwrap().json().await.unwrap();
    assert_eq!(report["rejected"].as_array().unwrap().len(), 3, "{report}");
    s.stop().await;
}
