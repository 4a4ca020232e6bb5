//! The API's contract beyond the happy path: one error format for every rejection, safe
//! defaults for state-changing routes, an inference thread that cannot fail silently, and
//! backpressure that tells clients when to come back.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use common::server::{error_code, png, TestServer};
use common::until;
use picie::server::app::{App, Parts};
use picie::server::service::inference::Engine;
use reqwest::StatusCode;
use tower::ServiceExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_is_json() {
    let s = TestServer::start(|_| {}).await;
    let c = &s.client;

    // Unknown route, wrong method (with Allow), bad query value.
    assert_eq!(error_code(c.get(s.url("/nope")).send().await.unwrap()).await, (StatusCode::NOT_FOUND, "not_found".into()));
    let r = c.get(s.url("/segment")).send().await.unwrap();
    assert!(r.headers().get("allow").is_some_and(|v| v.to_str().unwrap().contains("POST")), "{:?}", r.headers());
    assert_eq!(error_code(r).await, (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed".into()));
    let r = c.delete(s.url("/jobs")).send().await.unwrap();
    assert_eq!(error_code(r).await.0, StatusCode::METHOD_NOT_ALLOWED);
    let r = c.post(s.url("/segment?format=nope")).header("content-type", "image/png").body(png(16, 16)).send().await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::BAD_REQUEST, "invalid_query".into()));

    // JSON bodies: malformed, wrong shape, wrong content type.
    let post = |path: &str, ct: Option<&str>, body: &'static str| {
        let mut r = c.post(s.url(path)).body(body);
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        r.send()
    };
    let r = post("/datasets", Some("application/json"), "{not json").await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::BAD_REQUEST, "invalid_json".into()));
    let r = post("/datasets", Some("application/json"), r#"{"name": 5}"#).await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::BAD_REQUEST, "invalid_json".into()));
    let r = post("/jobs", Some("application/json"), r#"{"type": "bogus", "dataset": "x"}"#).await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::BAD_REQUEST, "invalid_json".into()));
    let r = post("/datasets", None, r#"{"name": "x"}"#).await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type".into()));
    let r = post("/models/default/classes", Some("text/plain"), "{}").await.unwrap();
    assert_eq!(error_code(r).await.0, StatusCode::METHOD_NOT_ALLOWED);

    // Multipart without a boundary, and with a broken body.
    let r = post("/segment", Some("multipart/form-data"), "x").await.unwrap();
    assert_eq!(error_code(r).await.0, StatusCode::BAD_REQUEST);
    let r = post("/segment", Some("multipart/form-data; boundary=zz"), "--zz\r\nbroken").await.unwrap();
    assert_eq!(error_code(r).await.0, StatusCode::BAD_REQUEST);

    // The documented multipart forms only: `image` for /segment, file parts of `files` for uploads.
    use reqwest::multipart::{Form, Part};
    let form = Form::new().part("image", Part::bytes(png(16, 16)).file_name("a.png")).text("extra", "1");
    let r = c.post(s.url("/segment")).multipart(form).send().await.unwrap();
    assert_eq!(error_code(r).await, (StatusCode::BAD_REQUEST, "bad_request".into()));
    let ds: serde_json::Value =
        c.post(s.url("/datasets")).json(&serde_json::json!({"name": "d"})).send().await.unwrap().json().await.unwrap();
    let upload = s.url(&format!("/datasets/{}/images", ds["id"].as_str().unwrap()));
    for form in
        [Form::new().part("photos", Part::bytes(png(16, 16)).file_name("a.png")), Form::new().part("files", Part::bytes(png(16, 16)))]
    {
        let r = c.post(&upload).multipart(form).send().await.unwrap();
        assert_eq!(error_code(r).await, (StatusCode::BAD_REQUEST, "bad_request".into()));
    }
    let form = Form::new().part("files", Part::bytes(png(16, 16)).file_name("a.png"));
    assert_eq!(c.post(&upload).multipart(form).send().await.unwrap().status(), StatusCode::OK);

    // Path parameters that cannot be a name.
    let r = c.get(s.url("/datasets/..%2F..%2Fetc")).send().await.unwrap();
    assert_eq!(error_code(r).await.0, StatusCode::NOT_FOUND);
    s.stop().await;
}

/// A request to `router` as if it came from `peer`.
async fn post_from(app: axum::Router, peer: [u8; 4], key: Option<&str>) -> axum::response::Response {
    let mut req = axum::http::Request::post("/datasets").header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let app = app.layer(MockConnectInfo(SocketAddr::from((peer, 40000))));
    app.oneshot(req.body(Body::from(r#"{"name": "d"}"#)).unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_only_loopback_may_change_state() {
    let data = tempfile::tempdir().unwrap();
    let cfg = common::server::config(data.path());
    let built = App::build(&cfg).await.unwrap();
    let app = built.router();

    let remote = post_from(app.clone(), [203, 0, 113, 7], None).await;
    assert_eq!(remote.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = serde_json::from_slice(&axum::body::to_bytes(remote.into_body(), 1 << 16).await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "forbidden");
    assert!(body["error"]["message"].as_str().unwrap().contains("--api-key"), "{body}");
    assert_eq!(post_from(app.clone(), [127, 0, 0, 1], None).await.status(), StatusCode::CREATED);
    // Reads stay open to everyone.
    let get = axum::http::Request::get("/datasets").body(Body::empty()).unwrap();
    let app_remote = app.clone().layer(MockConnectInfo(SocketAddr::from(([203, 0, 113, 7], 1))));
    assert_eq!(app_remote.oneshot(get).await.unwrap().status(), StatusCode::OK);

    // With a key, remote clients that carry it may change state; loopback needs it too.
    let mut keyed = built.state.clone();
    keyed.access = Arc::new(picie::server::http::access::Access::new(Some("sesame"), false, "127.0.0.1"));
    let app = picie::server::http::router::router(keyed);
    assert_eq!(post_from(app.clone(), [203, 0, 113, 7], Some("sesame")).await.status(), StatusCode::CREATED);
    assert_eq!(post_from(app.clone(), [203, 0, 113, 7], Some("wrong")).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(post_from(app, [127, 0, 0, 1], None).await.status(), StatusCode::UNAUTHORIZED);
}

fn with_engine(engine: Engine, stall_after: Duration) -> Parts {
    Parts { engine: Some(engine), stall_after: Some(stall_after) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_inference_fails_only_its_batch() {
    // The real engine, except that it panics on 13-pixel-wide images.
    let engine: Engine = Arc::new(|model, images, quality| {
        if images.iter().any(|i| i.width() == 13) {
            panic!("injected failure");
        }
        model.segment_batch_at(images, quality, &Default::default())
    });
    let s = TestServer::start_with(|c| c.max_batch = 1, with_engine(engine, Duration::from_secs(30))).await;
    let seg = |bytes: Vec<u8>| s.client.post(s.url("/segment")).header("content-type", "image/png").body(bytes).send();

    let (status, code) = error_code(seg(png(13, 20)).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "internal"));
    // The thread lives on: the next request is served and readiness stays green.
    assert_eq!(seg(png(32, 20)).await.unwrap().status(), StatusCode::OK);
    assert_eq!(s.client.get(s.url("/health/ready")).send().await.unwrap().status(), StatusCode::OK);
    let m = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("picie_inference_worker_live 1"), "{m}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reflects_a_stuck_inference_thread() {
    let hold = Arc::new(AtomicBool::new(true));
    let h = hold.clone();
    let engine: Engine = Arc::new(move |model, images, quality| {
        while h.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        model.segment_batch_at(images, quality, &Default::default())
    });
    let s = TestServer::start_with(|c| c.max_batch = 1, with_engine(engine, Duration::from_millis(300))).await;
    let ready = || async { s.client.get(s.url("/health/ready")).send().await.unwrap().status() };
    assert_eq!(ready().await, StatusCode::OK);
    let pending = tokio::spawn({
        let (c, u) = (s.client.clone(), s.url("/segment"));
        async move { c.post(u).header("content-type", "image/png").body(png(32, 32)).send().await.unwrap().status() }
    });
    until("readiness to see the stuck batch", Duration::from_secs(10), || async {
        (ready().await == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    hold.store(false, Ordering::Relaxed);
    assert_eq!(pending.await.unwrap(), StatusCode::OK);
    assert_eq!(ready().await, StatusCode::OK);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_queue_answers_429_with_retry_after() {
    // Every image takes 1.5 s; a request that would wait longer than 200 ms is refused.
    let engine: Engine = Arc::new(|model, images, quality| {
        std::thread::sleep(Duration::from_millis(1500));
        model.segment_batch_at(images, quality, &Default::default())
    });
    let s = TestServer::start_with(
        |c| {
            c.max_queue_ms = 200;
            c.max_batch = 1;
            c.quality = picie::infer::Quality::Fast;
        },
        with_engine(engine, Duration::from_secs(30)),
    )
    .await;
    let seg = || s.client.post(s.url("/segment")).header("content-type", "image/png").body(png(32, 32)).send();
    // The first request teaches the worker its time per image.
    assert_eq!(seg().await.unwrap().status(), StatusCode::OK);
    let running = tokio::spawn({
        let (c, u) = (s.client.clone(), s.url("/segment"));
        async move { c.post(u).header("content-type", "image/png").body(png(32, 32)).send().await.unwrap().status() }
    });
    // Once that one runs, the queue's expected wait is its 1.5 s.
    let metrics = || async { s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap() };
    until("the running request to count in the expected wait", Duration::from_secs(10), || async {
        metrics().await.lines().any(|l| l.starts_with("picie_inference_expected_wait_seconds ") && !l.ends_with(" 0")).then_some(())
    })
    .await;
    let r = seg().await.unwrap();
    let retry: u64 = r.headers().get("retry-after").expect("Retry-After").to_str().unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry), "Retry-After {retry}");
    assert_eq!(error_code(r).await, (StatusCode::TOO_MANY_REQUESTS, "too_many_requests".into()));
    assert_eq!(running.await.unwrap(), StatusCode::OK);
    let m = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("picie_segment_rejected_total 1"), "{m}");
    s.stop().await;
}
