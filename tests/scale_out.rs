//! Scale-out on loopback: a real PostgreSQL and an S3-protocol server, started by
//! `scripts/scale-out-test.sh` (which `scripts/test.sh`, so CI, runs), named by
//! `PICIE_TEST_DATABASE_URL`, `PICIE_TEST_LEASE_DATABASE_URL` and `PICIE_TEST_STORE`. Without
//! them (a plain `cargo test`) these tests say so and pass: they need the servers.
//!
//! - `two_replicas_and_two_workers`: two API replicas and two workers of the real binary. A
//!   dataset uploaded through replica A, a re-clustering job submitted there, the worker that
//!   claims it SIGKILLed mid-job, the other worker finishing it after the lease runs out; the new
//!   model activated on A, replica B following it, and both answering `/segment` with
//!   byte-identical masks.
//! - `leases`: the claim, heartbeat and expiry rules against the database directly.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::ServeProcess;
use common::until;
use reqwest::multipart::{Form, Part};
use serde_json::json;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `picie serve` in a scaled-out role, named by its `--instance-id`; SIGKILLed when dropped.
struct Proc {
    name: String,
    process: ServeProcess,
}

impl std::ops::Deref for Proc {
    type Target = ServeProcess;
    fn deref(&self) -> &ServeProcess {
        &self.process
    }
}

impl Proc {
    fn spawn(name: &str, role: &str, dir: &Path, db: &str, store: &str) -> Proc {
        Self::spawn_with(name, role, dir, db, store, &[])
    }

    fn spawn_with(name: &str, role: &str, dir: &Path, db: &str, store: &str, extra: &[&str]) -> Proc {
        let mut flags = vec![
            "--role",
            role,
            "--instance-id",
            name,
            "--database-url",
            db,
            "--store",
            store,
            "--lease-secs",
            "3",
            "--sync-interval-ms",
            "200",
            // One job thread: the re-clustering job lasts long enough to be killed in the middle.
            "--job-threads",
            "1",
            "--threads",
            "1",
            "--quality",
            "fast",
        ];
        flags.extend_from_slice(extra);
        Proc { name: name.to_string(), process: ServeProcess::spawn(&dir.join(name), &flags, dir.join(format!("{name}.log"))) }
    }

    async fn ready(&self) {
        self.process.ready(Duration::from_secs(180)).await;
    }

    /// The label mask PNG for `image`, and the model version header.
    async fn segment(&self, image: &[u8]) -> (Vec<u8>, String) {
        let r = self.client.post(self.url("/segment")).header("content-type", "image/png").body(image.to_vec()).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", self.name);
        let version = r.headers()["x-model-version"].to_str().unwrap().to_string();
        (r.bytes().await.unwrap().to_vec(), version)
    }

    /// Resident memory, from /proc.
    fn rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    }
}

/// Street-like frames, 480 x 360: bands of sky, wall and road with a seeded pattern.
fn frames(n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|seed| {
            let img = image::RgbImage::from_fn(480, 360, |x, y| {
                let base = match y * 3 / 360 {
                    0 => [90, 140, 220],
                    1 => [150u8.wrapping_add((seed * 7) as u8), 90, 60],
                    _ => [70, 70, 80],
                };
                let stripe = if (x / (8 + seed % 13)) % 2 == 0 { 25 } else { 0 };
                let n = ((x * 31 + y * 17 + seed * 101) % 11) as u8;
                image::Rgb(base.map(|c: u8| c.saturating_add(n + stripe)))
            });
            let mut out = vec![];
            img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
            out
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_and_two_workers() {
    let (Some(db), Some(store)) = (env("PICIE_TEST_DATABASE_URL"), env("PICIE_TEST_STORE")) else {
        eprintln!("skipped: needs PostgreSQL and an S3 server; run scripts/scale-out-test.sh");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = Proc::spawn("api-a", "api", dir.path(), &db, &store);
    let b = Proc::spawn("api-b", "api", dir.path(), &db, &store);
    let mut workers =
        vec![Proc::spawn("worker-1", "worker", dir.path(), &db, &store), Proc::spawn("worker-2", "worker", dir.path(), &db, &store)];
    for p in [&a, &b].into_iter().chain(&workers) {
        p.ready().await;
    }
    let (_, info) = a.get("/info").await;
    assert_eq!((info["role"].as_str(), info["storage"].as_str()), (Some("api"), Some("shared")), "{info}");
    let idle_rss: Vec<(String, f64)> = [&a, &b].into_iter().chain(&workers).map(|p| (p.name.clone(), p.rss_mb())).collect();

    // A dataset through replica A; replica B sees it at once (one database).
    let (status, ds) = a.post("/datasets", json!({"name": "streets"})).await;
    assert_eq!(status, 201, "{ds}");
    let id = ds["id"].as_str().unwrap().to_string();
    const N: u32 = 48;
    let images = frames(N);
    let mut form = Form::new();
    for (i, bytes) in images.iter().enumerate() {
        form = form.part("files", Part::bytes(bytes.clone()).file_name(format!("f{i}.png")));
    }
    let r = a.client.post(a.url(&format!("/datasets/{id}/images"))).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", a.log_text());
    let (status, seen) = b.get(&format!("/datasets/{id}")).await;
    assert_eq!((status, seen["num_images"].as_u64()), (200, Some(N as u64)), "{seen}");

    // A re-clustering job through A, claimed by a worker, which is killed in the middle.
    let (status, job) = a.post("/jobs", json!({"type": "recluster", "dataset": id, "k": 5, "seed": 1, "name": "streets-k5"})).await;
    assert_eq!(status, 202, "{job}");
    let job_id = job["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    // Killed once it is embedding images, as its heartbeats report.
    let first = until("a worker to be embedding the job's images", Duration::from_secs(60), async || {
        let (_, j) = b.get(&format!("/jobs/{job_id}")).await;
        (j["state"] == "running" && j["stage"] == "embedding" && j["progress"].as_f64().unwrap_or(0.0) > 0.0)
            .then(|| j["worker"].as_str().unwrap().to_string())
    })
    .await;
    let killed = workers.iter().position(|w| w.name == first).expect("a known worker");
    let mut victim = workers.remove(killed);
    victim.process.child.kill().unwrap(); // SIGKILL
    victim.process.child.wait().unwrap();
    let (_, j) = a.get(&format!("/jobs/{job_id}")).await;
    assert_eq!(j["state"], "running", "killed in the middle of the job: {j}");
    eprintln!(
        "killed {first} at {:.1} s, job at stage {} ({:.2})",
        started.elapsed().as_secs_f64(),
        j["stage"],
        j["progress"].as_f64().unwrap_or(0.0)
    );

    let survivor = &workers[0];
    until("the other worker to take the job over", Duration::from_secs(30), async || {
        let (_, j) = a.get(&format!("/jobs/{job_id}")).await;
        (j["worker"].as_str() == Some(survivor.name.as_str())).then_some(())
    })
    .await;
    let taken_over = Instant::now();
    let done = until("the other worker to finish the job", Duration::from_secs(180), async || {
        let (_, j) = a.get(&format!("/jobs/{job_id}")).await;
        (!["queued", "running"].contains(&j["state"].as_str().unwrap_or(""))).then_some(j)
    })
    .await;
    assert_eq!(done["state"], "succeeded", "{done}\n{}", survivor.log_text());
    assert_eq!(done["worker"].as_str(), Some(survivor.name.as_str()), "{done}");
    assert_eq!(done["result"]["model"], "streets-k5");
    let (job_secs, rerun_secs) = (started.elapsed().as_secs_f64(), taken_over.elapsed().as_secs_f64());
    assert!(survivor.log_text().contains("claiming a job whose worker's lease ran out"), "{}", survivor.log_text());

    // Activated on A; B follows within its sync interval.
    let (status, m) = a.post("/models/streets-k5/activate", json!({})).await;
    assert_eq!(status, 200, "{m}\n{}", a.log_text());
    until("replica B to serve the new model", Duration::from_secs(20), async || {
        let (_, info) = b.get("/info").await;
        (info["model"] == "streets-k5").then_some(())
    })
    .await;
    let (_, models) = b.get("/models").await;
    assert!(models.as_array().unwrap().iter().any(|m| m["name"] == "streets-k5" && m["active"] == true), "{models}");

    // Both replicas answer with the same mask, from the new model (K = 5).
    let probe = &images[3];
    let (mask_a, version_a) = a.segment(probe).await;
    let (mask_b, version_b) = b.segment(probe).await;
    assert_eq!(version_a, version_b);
    assert!(version_a.starts_with("streets-k5"), "{version_a}");
    assert!(mask_a == mask_b, "replicas A and B answer different masks");
    let decoded = image::load_from_memory(&mask_a).unwrap().to_luma8();
    assert!(decoded.pixels().all(|p| p.0[0] < 5), "labels of a K = 5 model");

    // Deleting the active model is refused for every replica; a job's model is listed on both.
    let r = b.client.delete(b.url("/models/streets-k5")).send().await.unwrap();
    assert_eq!(r.status(), 409);

    // The set segmented by the worker; its masks downloaded from replica B, which fetches the
    // results from the object store.
    let (status, job) = a.post("/jobs", json!({"type": "segment", "dataset": id})).await;
    assert_eq!(status, 202, "{job}");
    let seg_id = job["id"].as_str().unwrap().to_string();
    let done = until("the worker to segment the set", Duration::from_secs(180), async || {
        let (_, j) = a.get(&format!("/jobs/{seg_id}")).await;
        (!["queued", "running"].contains(&j["state"].as_str().unwrap_or(""))).then_some(j)
    })
    .await;
    assert_eq!((done["state"].as_str(), done["result"]["masks"].as_u64()), (Some("succeeded"), Some(N as u64)), "{done}");
    assert_eq!(done["result"]["model"], "streets-k5");
    let r = b.client.get(b.url(&format!("/jobs/{seg_id}/masks.zip"))).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", b.log_text());
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(r.bytes().await.unwrap().to_vec())).unwrap();
    assert_eq!(zip.len(), 2 + N as usize, "classes.json, fractions.csv and a mask per image");
    let mut mask = vec![];
    std::io::Read::read_to_end(&mut zip.by_name("masks/f3.png").unwrap(), &mut mask).unwrap();
    assert!(mask == mask_b, "the job's mask of an image is the one /segment answers");
    let (status, gallery) = b.get(&format!("/jobs/{seg_id}/gallery")).await;
    assert_eq!((status, gallery["classes"].as_array().map(|c| c.len())), (200, Some(5)), "{gallery}");

    eprintln!(
        "scale-out: {N} images of 480x360 re-clustered (k = 5): {job_secs:.1} s from submission, with a worker killed mid-job and a 3 s lease; \
         the second worker's run {rerun_secs:.1} s ({:.1} images/s, one job thread, debug build)",
        N as f64 / rerun_secs
    );
    for (name, rss) in idle_rss {
        eprintln!("scale-out: idle RSS {name}: {rss:.0} MB");
    }
    for p in [&a, &b, survivor] {
        eprintln!("scale-out: RSS after the run {}: {:.0} MB", p.name, p.rss_mb());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases() {
    use picie::server::core::jobs::{Job, JobSpec, JobState};
    use picie::server::storage::local::{datasets::LocalDatasets, DataDir};
    use picie::server::storage::shared::datasets::SharedDatasets;
    use picie::server::storage::shared::jobs::SharedJobs;
    use picie::server::storage::shared::{Shared, SharedSettings};
    use picie::server::storage::{DatasetStore, Error, JobStore};

    let (Some(db), Some(store)) = (env("PICIE_TEST_LEASE_DATABASE_URL"), env("PICIE_TEST_STORE")) else {
        eprintln!("skipped: needs PostgreSQL and an S3 server; run scripts/scale-out-test.sh");
        return;
    };
    let connect = |name: &str, max_attempts| {
        let settings = SharedSettings {
            instance: name.to_string(),
            lease: Duration::from_millis(1500),
            sync_interval: Duration::from_millis(100),
            max_attempts,
        };
        let (db, store) = (db.clone(), format!("{store}-leases"));
        async move { Arc::new(Shared::connect(&db, &store, settings).await.unwrap()) }
    };
    let (s1, s2) = (connect("w1", 2).await, connect("w2", 2).await);
    // A job needs its dataset.
    let cache = tempfile::tempdir().unwrap();
    let (dir, _lock) = DataDir::open(cache.path()).unwrap();
    let (w1, w2) = (SharedJobs::new(s1.clone(), dir.clone()), SharedJobs::new(s2, dir.clone()));
    let local = Arc::new(LocalDatasets::new(dir, Default::default()));
    let dataset = SharedDatasets::new(s1, local).create("leases").await.unwrap().id;
    let spec = || JobSpec::Recluster {
        dataset: dataset.clone(),
        k: Some(3),
        k_min: None,
        k_max: None,
        seed: None,
        over_cluster: None,
        name: None,
    };
    let lease_out = Duration::from_secs(10);

    // One claim per job: the second worker finds nothing while the lease holds.
    let job = w1.submit(Job::new(spec(), "default".into())).await.unwrap();
    let claimed = w1.try_claim().await.unwrap().expect("the queued job");
    assert_eq!((claimed.id.as_str(), claimed.state, claimed.worker.as_deref()), (job.id.as_str(), JobState::Running, Some("w1")));
    assert!(w2.try_claim().await.unwrap().is_none(), "held by w1's lease");

    // w1 "dies" (no heartbeat): once the lease runs out, w2 takes the job over.
    let again = until("w1's lease to run out", lease_out, || async { w2.try_claim().await.unwrap() }).await;
    assert_eq!((again.id.as_str(), again.worker.as_deref()), (job.id.as_str(), Some("w2")));
    assert_eq!(again.started_at, claimed.started_at, "the first start is kept");

    // Expired twice (max_attempts = 2): interrupted, not claimed a third time; resume queues it.
    let j = until("the job to be interrupted", lease_out, || async {
        assert!(w1.try_claim().await.unwrap().is_none(), "never claimed a third time");
        Some(w1.get(&job.id).await.unwrap()).filter(|j| j.state == JobState::Interrupted)
    })
    .await;
    assert!(j.error.as_deref().unwrap_or("").contains("stopped 2 times"), "{j:?}");
    let resumed = w1.resume(&job.id).await.unwrap();
    assert_eq!((resumed.state, resumed.resumed), (JobState::Queued, 1));
    assert!(matches!(w1.resume(&job.id).await, Err(Error::Conflict(_))));

    // Cancel: a queued job at once; a running one whose worker died ends canceled when
    // reclaimed, never running again.
    let c = w2.try_claim().await.unwrap().expect("the resumed job");
    assert_eq!(c.id, job.id);
    let asked = w1.cancel(&job.id).await.unwrap();
    assert_eq!(asked.state, JobState::Running, "a running job stops at its worker's next heartbeat");
    until("the canceled job's lease to run out", lease_out, || async {
        assert!(w1.try_claim().await.unwrap().is_none());
        (w1.get(&job.id).await.unwrap().state == JobState::Canceled).then_some(())
    })
    .await;
    let queued = w1.submit(Job::new(spec(), "default".into())).await.unwrap();
    assert_eq!(w2.cancel(&queued.id).await.unwrap().state, JobState::Canceled);
    assert!(matches!(w2.cancel(&queued.id).await, Err(Error::Conflict(_))));
    let counts = w1.counts().await.unwrap();
    assert_eq!(counts.iter().find(|c| c.0 == JobState::Canceled).map(|c| c.1), Some(2));
}

/// Transactions committed in the database so far (PostgreSQL's own count, all sessions).
async fn commits(db: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetch_one(db).await.unwrap()
}

/// Commits per second over `window`, measured once `settle` has passed: a backend reports its
/// counts to the shared view at most once a second, and an idle one only after ten, so what a
/// burst before did would otherwise land in the window.
async fn commit_rate(db: &sqlx::PgPool, settle: Duration, window: Duration) -> f64 {
    tokio::time::sleep(settle).await;
    let _ = sqlx::query("SELECT pg_stat_clear_snapshot()").execute(db).await;
    let a = commits(db).await;
    tokio::time::sleep(window).await;
    let _ = sqlx::query("SELECT pg_stat_clear_snapshot()").execute(db).await;
    (commits(db).await - a) as f64 / window.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_cost_the_database_nothing_when_nothing_changes() {
    let (Some(db), Some(store)) = (env("PICIE_TEST_EVENTS_DATABASE_URL"), env("PICIE_TEST_STORE")) else {
        eprintln!("skipped: needs PostgreSQL and an S3 server; run scripts/scale-out-test.sh");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // An API replica and no worker: a job stays queued, and nothing about it changes.
    let api = Proc::spawn_with(
        "api-events",
        "api",
        dir.path(),
        &db,
        &format!("{store}-events"),
        &["--max-watchers", "400", "--max-watchers-per-job", "400"],
    );
    api.ready().await;
    let ds: serde_json::Value =
        api.client.post(api.url("/datasets")).json(&json!({"name": "events"})).send().await.unwrap().json().await.unwrap();
    let id = ds["id"].as_str().unwrap();
    let form = Form::new().part("files", Part::bytes(frames(1).remove(0)).file_name("f.png"));
    assert_eq!(api.client.post(api.url(&format!("/datasets/{id}/images"))).multipart(form).send().await.unwrap().status(), 200);
    let job: serde_json::Value = api
        .client
        .post(api.url("/jobs"))
        .json(&json!({"type": "recluster", "dataset": id, "k": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = api.url(&format!("/jobs/{}/events", job["id"].as_str().unwrap()));

    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&db).await.unwrap();
    let (settled, window) = (Duration::from_secs(11), Duration::from_secs(3));
    let idle = commit_rate(&pool, settled, window).await;
    // 300 clients follow the job, then all of them go.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut streams = vec![];
    for _ in 0..300 {
        let mut r = client.get(&events).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.chunk().await.unwrap().is_some(), "the job's first event");
        streams.push(r);
    }
    let watched = commit_rate(&pool, settled, window).await;
    drop(streams);
    let metric = || async {
        let m = api.client.get(api.url("/metrics")).send().await.unwrap().text().await.unwrap();
        m.lines().find_map(|l| l.strip_prefix("picie_job_watchers ")?.trim().parse::<f64>().ok()).unwrap_or(-1.0)
    };
    until("the watchers of the closed streams to end", Duration::from_secs(30), || async { (metric().await == 0.0).then_some(()) }).await;
    let after = commit_rate(&pool, Duration::from_secs(1), window).await;
    eprintln!("scale-out: database commits/s idle {idle:.1}, with 300 job watchers {watched:.1}, after they closed {after:.1}");
    // Watching costs the database nothing while the job does not change (the old watchers
    // polled it twice a second each, 600 transactions/s for 300 streams).
    assert!(watched <= idle + 5.0, "{watched:.1} commits/s with 300 watchers, {idle:.1} idle");
    assert!(after <= idle + 5.0, "{after:.1} commits/s after the watchers went, {idle:.1} idle");
}
