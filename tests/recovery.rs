//! Crash recovery: the real binary SIGKILLed in the middle of a fine-tuning job, restarted on
//! the same data folder, the job resumed to the weights of a run never interrupted; and the
//! startup cleanup of what a killed process leaves behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::process::ServeProcess;
use picie::server::app::App;
use picie::server::{serve_on, ServeConfig};
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};

/// `picie serve` as a child process; killed (SIGKILL) when dropped.
type Proc = ServeProcess;

/// A server on `data`, listening once its model is warm.
async fn start_server(data: &Path, log: PathBuf) -> Proc {
    let p = Proc::spawn(data, &[], log);
    p.ready(Duration::from_secs(120)).await;
    p
}

impl Proc {
    async fn wait_job(&self, id: &str, timeout: Duration) -> Value {
        let ended = common::poll(timeout, async || {
            let (_, j) = self.get(&format!("/jobs/{id}")).await;
            (!["queued", "running"].contains(&j["state"].as_str().unwrap_or(""))).then_some(j)
        })
        .await;
        ended.unwrap_or_else(|| panic!("job {id} did not end:\n{}", self.log_text()))
    }

    /// A dataset of the generated images; returns its id.
    async fn dataset(&self) -> String {
        let (status, ds) = self.post("/datasets", json!({"name": "generated"})).await;
        assert_eq!(status, 201, "{ds}");
        let id = ds["id"].as_str().unwrap().to_string();
        let mut form = Form::new();
        for (i, bytes) in images().into_iter().enumerate() {
            form = form.part("files", Part::bytes(bytes).file_name(format!("img{i}.png")));
        }
        let r = self.client.post(self.url(&format!("/datasets/{id}/images"))).multipart(form).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let report: Value = r.json().await.unwrap();
        assert_eq!(report["num_images"], IMAGES, "{report}");
        id
    }

    async fn segment_ok(&self) {
        let r = self
            .client
            .post(self.url("/segment?format=json"))
            .header("content-type", "image/png")
            .body(images().remove(0))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }
}

const IMAGES: usize = 6;

/// Small street-like pictures: bands of sky, wall and road with a seeded pattern, 128 x 96.
fn images() -> Vec<Vec<u8>> {
    (0..IMAGES as u32)
        .map(|seed| {
            let img = image::RgbImage::from_fn(128, 96, |x, y| {
                let n = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ seed.wrapping_mul(97)) % 24;
                let base = match y * 3 / 96 {
                    0 => [90, 140, 220],
                    1 => [150 + (seed * 10) as u8, 90, 60],
                    _ => [70, 70, 80],
                };
                let stripe = if (x / (8 + seed)) % 2 == 0 { 20 } else { 0 };
                image::Rgb(base.map(|c: u8| c.saturating_add(n as u8 + stripe)))
            });
            let mut out = vec![];
            img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
            out
        })
        .collect()
}

fn finetune_spec(dataset: &str) -> Value {
    json!({"type": "finetune", "dataset": dataset, "size": 64, "batch": 2, "k": 4, "k2": 8, "epochs": 3, "seed": 3, "name": "tuned"})
}

/// Every entry under `dir` whose name is a leftover of an unfinished write.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_name().to_str().is_some_and(picie::util::is_leftover) {
            out.push(p);
        } else if e.file_type().unwrap().is_dir() {
            out.extend(leftovers(&p));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_recovers_and_the_job_resumes_to_the_same_weights() {
    let logs = tempfile::tempdir().unwrap();
    let (data, fresh) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    // The reference: the same job, never interrupted, in its own data folder.
    let reference = start_server(fresh.path(), logs.path().join("reference.log")).await;
    let ref_ds = reference.dataset().await;
    let (status, ref_job) = reference.post("/jobs", finetune_spec(&ref_ds)).await;
    assert_eq!(status, 202, "{ref_job}");

    let s = start_server(data.path(), logs.path().join("first.log")).await;
    let ds = s.dataset().await;
    // A model made before the crash, to be found whole after it.
    let (status, job) = s.post("/jobs", json!({"type": "recluster", "dataset": ds, "k": 3, "name": "before"})).await;
    assert_eq!(status, 202, "{job}");
    let done = s.wait_job(job["id"].as_str().unwrap(), Duration::from_secs(120)).await;
    assert_eq!(done["state"], "succeeded", "{done}");

    let (status, job) = s.post("/jobs", finetune_spec(&ds)).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let checkpoint = data.path().join("checkpoints").join(format!("{id}.checkpoint"));
    let state_file = checkpoint.join(picie::train::picie::CHECKPOINT_STATE);
    let submitted = Instant::now();
    let saved = common::poll(Duration::from_secs(120), async || state_file.exists().then_some(())).await;
    assert!(saved.is_some(), "no checkpoint after the first epoch:\n{}", s.log_text());
    // kill -9 in the middle of the job.
    let first_epoch = submitted.elapsed();
    drop(s);
    let state: Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    let epochs_done = state["epochs_done"].as_u64().unwrap();
    assert!((1..3).contains(&epochs_done), "killed mid-training (after epoch {epochs_done} of 3)");
    assert!(!data.path().join("models/tuned").exists(), "the job had not written its model");

    let restart = Instant::now();
    let s = start_server(data.path(), logs.path().join("second.log")).await;
    let restarted = restart.elapsed();
    assert_eq!(leftovers(data.path()), Vec::<PathBuf>::new(), "leftovers of the killed process are gone");
    // Every dataset and model loads; segmenting works.
    let (status, d) = s.get(&format!("/datasets/{ds}")).await;
    assert_eq!((status, d["num_images"].as_u64()), (200, Some(IMAGES as u64)), "{d}");
    let (_, models) = s.get("/models").await;
    let names: Vec<&str> = models.as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["before", "default"]);
    for name in names {
        let (status, m) = s.get(&format!("/models/{name}")).await;
        assert_eq!(status, 200, "{m}");
    }
    s.segment_ok().await;
    let (status, _) = s.post("/models/before/activate", json!({})).await;
    assert_eq!(status, 200);
    s.segment_ok().await;

    // The job is interrupted, its checkpoint kept; resuming continues from it.
    let (_, j) = s.get(&format!("/jobs/{id}")).await;
    assert_eq!(j["state"], "interrupted", "{j}");
    assert!(state_file.exists());
    assert_eq!(s.post("/jobs/job-nope/resume", json!({})).await.0, 404);
    let (status, j) = s.post(&format!("/jobs/{id}/resume"), json!({})).await;
    assert_eq!((status, &j["state"], &j["resumed"]), (202, &json!("queued"), &json!(1)), "{j}");
    assert_eq!(s.post(&format!("/jobs/{id}/resume"), json!({})).await.0, 409, "a queued or running job is not resumed twice");
    let resumed = Instant::now();
    let done = s.wait_job(&id, Duration::from_secs(150)).await;
    eprintln!(
        "first epoch checkpoint {:.1} s after submission; restart {:.1} s; resumed job done in {:.1} s",
        first_epoch.as_secs_f64(),
        restarted.as_secs_f64(),
        resumed.elapsed().as_secs_f64()
    );
    assert_eq!(done["state"], "succeeded", "{done}\n{}", s.log_text());
    assert_eq!(done["result"]["model"], "tuned");
    assert!(s.log_text().contains(&format!("resuming from {}", checkpoint.display())), "the job continued from its checkpoint");
    assert!(!checkpoint.exists(), "the checkpoint is removed once the job succeeded");
    assert_eq!(s.post(&format!("/jobs/{id}/resume"), json!({})).await.0, 409, "a succeeded job is not resumed");
    let (status, _) = s.get("/models/tuned").await;
    assert_eq!(status, 200);

    // The same weights as the run never interrupted.
    let ref_done = reference.wait_job(ref_job["id"].as_str().unwrap(), Duration::from_secs(150)).await;
    assert_eq!(ref_done["state"], "succeeded", "{ref_done}");
    for file in [picie::package::WEIGHTS_FILE, picie::package::ONNX_FILE] {
        let a = std::fs::read(data.path().join("models/tuned").join(file)).unwrap();
        let b = std::fs::read(fresh.path().join("models/tuned").join(file)).unwrap();
        assert!(a == b, "{file} differs between the resumed and the uninterrupted run");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_removes_leftovers_and_keeps_real_data() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let cfg = ServeConfig::new(common::root().join("models"), d);

    // Real data: a dataset with an image, a model, a job, a checkpoint.
    let app = App::build(&cfg).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let cfg = cfg.clone();
        async move {
            serve_on(listener, app, &cfg, async {
                let _ = rx.await;
            })
            .await
        }
    });
    let client = reqwest::Client::new();
    let ds: Value = client.post(format!("{base}/datasets")).json(&json!({"name": "real"})).send().await.unwrap().json().await.unwrap();
    let ds_id = ds["id"].as_str().unwrap().to_string();
    let form = Form::new().part("files", Part::bytes(images().remove(0)).file_name("a.png"));
    assert_eq!(client.post(format!("{base}/datasets/{ds_id}/images")).multipart(form).send().await.unwrap().status(), 200);
    let job: Value = client
        .post(format!("{base}/jobs"))
        .json(&json!({"type": "recluster", "dataset": ds_id, "k": 2, "name": "kept"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job_id = job["id"].as_str().unwrap().to_string();
    common::until("the job to succeed", Duration::from_secs(120), || async {
        let j: Value = client.get(format!("{base}/jobs/{job_id}")).send().await.unwrap().json().await.unwrap();
        assert!(["queued", "running", "succeeded"].contains(&j["state"].as_str().unwrap()), "{j}");
        (j["state"] == "succeeded").then_some(())
    })
    .await;
    // The API reports the end as soon as it is in memory; its file is written just after. Wait
    // for the file, or the edit below could be overwritten by that write on a slow machine.
    let job_file = d.join(format!("jobs/{job_id}.json"));
    common::until("the job's file to record its end", Duration::from_secs(60), || async {
        let stored: Value = serde_json::from_slice(&std::fs::read(&job_file).ok()?).ok()?;
        (stored["state"] == "succeeded").then_some(())
    })
    .await;
    let _ = tx.send(());
    server.await.unwrap().unwrap();
    let real_checkpoint = d.join("checkpoints/job-000000000001.checkpoint");
    std::fs::create_dir_all(&real_checkpoint).unwrap();
    std::fs::write(real_checkpoint.join("state.json"), b"{}").unwrap();
    let mut real: Vec<PathBuf> =
        vec![real_checkpoint.join("state.json"), d.join("models/kept/manifest.json"), d.join(format!("jobs/{job_id}.json"))];
    let image_dir = d.join("datasets").join(&ds_id).join("images");
    real.extend(std::fs::read_dir(&image_dir).unwrap().map(|e| e.unwrap().path()));
    real.push(d.join("datasets").join(&ds_id).join("dataset.json"));
    assert!(real.iter().all(|p| p.exists()));

    // Leftovers of every kind a killed process leaves.
    let folder = |p: PathBuf| {
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("manifest.json"), b"half").unwrap();
        p
    };
    let file = |p: PathBuf| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"half").unwrap();
        p
    };
    let planted = vec![
        folder(d.join("models/.tuned.partial-123-0")),
        folder(d.join("models/.kept.old-123-1")),
        folder(d.join("models/.deleting-gone-2")),
        file(d.join("models/.tuned.onnx-scratch-123-3")),
        file(d.join("models/tuned.onnx-scratch-123")),
        file(d.join("models/.tuned.onnx-scratch-123")),
        folder(d.join("checkpoints/.job-000000000001.checkpoint.partial-4")),
        file(d.join("jobs/.job-000000000002.json.tmp-Xy12Zw")),
        file(d.join(".active_model.tmp-Ab34Cd")),
        file(d.join("datasets").join(&ds_id).join(".dataset.json.tmp-Ef56Gh")),
        file(image_dir.join(".0123abcd.png.tmp-Ij78Kl")),
        file(image_dir.join(".tmpQr90St")),
        folder(d.join("datasets/.ds-000000000009.partial-5")),
        file(d.join("tmp/upload-1.zip")),
        folder(d.join("tmp/archive-2")),
    ];
    // The job that wrote `kept` as if the process had died just after writing it, before
    // marking the job done.
    let mut stored: Value = serde_json::from_slice(&std::fs::read(&job_file).unwrap()).unwrap();
    stored["state"] = json!("running");
    std::fs::write(&job_file, serde_json::to_vec(&stored).unwrap()).unwrap();
    let kept_manifest = std::fs::read(d.join("models/kept/manifest.json")).unwrap();
    // A link to real data: removed as a link, never followed.
    std::os::unix::fs::symlink(d.join("models/kept"), d.join("tmp/link")).unwrap();

    let app = App::build(&cfg).await.unwrap();
    let services = app.state.services.clone();
    for p in &planted {
        assert!(std::fs::symlink_metadata(p).is_err(), "{} survived the startup", p.display());
    }
    assert_eq!(std::fs::read_dir(d.join("tmp")).unwrap().count(), 0, "tmp/ is emptied");
    for p in &real {
        assert!(p.exists(), "{} was removed", p.display());
    }
    picie::package::Package::load(&services.catalog.package_dir("kept").await.unwrap()).expect("the model loads");
    assert_eq!(services.datasets.get(&ds_id, None).await.unwrap().num_images, 1);

    // Resumed, the job finds its model written and succeeds with it, untouched.
    use picie::server::core::jobs::JobState;
    assert_eq!(services.jobs.get(&job_id).await.unwrap().state, JobState::Interrupted);
    services.jobs.resume(&job_id).await.unwrap();
    let job = common::until("the resumed job to end", Duration::from_secs(60), || async {
        services.jobs.get(&job_id).await.ok().filter(|j| j.state.is_terminal())
    })
    .await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let result = job.result.unwrap();
    assert_eq!((result.model.as_str(), result.recovered), ("kept", true));
    assert_eq!(std::fs::read(d.join("models/kept/manifest.json")).unwrap(), kept_manifest);
}
