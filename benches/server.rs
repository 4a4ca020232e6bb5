//! `/segment` against the bare inference call, side by side in one run, on a 480x360 JPEG:
//! p50/p95 latency of each (the HTTP path adds decoding, queueing, PNG encoding and the
//! network), then images/s at 1, 4 and 16 concurrent clients.
//!
//! Then the thread budget of jobs: /segment p50 with no job running and while a fine-tuning
//! job trains, with `--job-threads` 1 and 2 (BENCH_JOB_THREADS="1 2" to choose, BENCH_JOBS=0
//! to skip).
//!
//! Last, the peak RSS of clustering N images as recluster does (sampling while embedding)
//! against keeping every feature (as `picie eval` still does), each in a child process
//! (BENCH_RECLUSTER=0 to skip; 64x64 inputs and a 50,000-vector cap keep it short).
//!
//!     cargo bench --bench server            (needs scripts/setup.sh --no-build first)

use std::time::{Duration, Instant};

use picie::server::{serve_on, App, ServeConfig};

const REPS: usize = 40;

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var("BENCH_RECLUSTER_CHILD") {
        return recluster_child(&spec);
    }
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // A 480x360 JPEG: a CamVid frame when the data is there, else a shipped photo resized.
    let camvid = root.join("../shared/data/camvid/val/images/0001TP_008550.jpg");
    let jpeg = if camvid.exists() {
        std::fs::read(&camvid)?
    } else {
        let img = image::open(root.join("fixtures/images/rocket.jpg"))?.resize_exact(480, 360, image::imageops::FilterType::Triangle);
        let mut out = vec![];
        img.to_rgb8().write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Jpeg)?;
        out
    };
    let data = tempfile::tempdir()?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut cfg = ServeConfig::new(root.join("models"), data.path());
    cfg.threads = Some(threads);
    cfg.max_concurrent = 64;
    // Like for like with the bare path below (embed + assign, no CRF); BENCH_QUALITY=crf
    // measures the default /segment instead.
    cfg.quality = std::env::var("BENCH_QUALITY").ok().and_then(|q| q.parse().ok()).unwrap_or(picie::infer::Quality::Fast);

    // The job runner inside the state is spawned on this runtime.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let guard = rt.enter();
    // Bare inference: decode + embed + assign, no HTTP.
    let app = rt.block_on(App::build(&cfg))?;
    let (_, seg) = app.state.services.catalog.active();
    let mut bare = vec![];
    for _ in 0..REPS {
        let t = Instant::now();
        let img = picie::infer::decode_image(&jpeg, u64::MAX)?;
        std::hint::black_box(seg.segment(&img)?);
        bare.push(t.elapsed());
    }

    drop(guard);
    let (http, throughput) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/segment", listener.local_addr()?);
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
        let post = |c: reqwest::Client, url: String, body: Vec<u8>| async move {
            let r = c.post(url).header("content-type", "image/jpeg").body(body).send().await?;
            anyhow::ensure!(r.status() == 200, "status {}", r.status());
            r.bytes().await?;
            anyhow::Ok(())
        };
        post(client.clone(), url.clone(), jpeg.clone()).await?;
        let mut http = vec![];
        for _ in 0..REPS {
            let t = Instant::now();
            post(client.clone(), url.clone(), jpeg.clone()).await?;
            http.push(t.elapsed());
        }
        let mut throughput = vec![];
        for clients in [1usize, 4, 16] {
            let per_client = 48 / clients.max(1);
            let t = Instant::now();
            let tasks: Vec<_> = (0..clients)
                .map(|_| {
                    let (c, u, b) = (client.clone(), url.clone(), jpeg.clone());
                    tokio::spawn(async move {
                        for _ in 0..per_client {
                            post(c.clone(), u.clone(), b.clone()).await?;
                        }
                        anyhow::Ok(())
                    })
                })
                .collect();
            for task in tasks {
                task.await??;
            }
            throughput.push((clients, (clients * per_client) as f64 / t.elapsed().as_secs_f64()));
        }
        let _ = tx.send(());
        server.await??;
        anyhow::Ok((http, throughput))
    })?;

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (b50, b95, h50, h95) =
        (percentile(bare.clone(), 0.5), percentile(bare, 0.95), percentile(http.clone(), 0.5), percentile(http, 0.95));
    println!("480x360 JPEG, model default, {threads} threads, {REPS} requests each");
    println!("{:<36} {:>9} {:>9}", "", "p50 ms", "p95 ms");
    println!("{:<36} {:>9.1} {:>9.1}", "bare inference (decode+embed+assign)", ms(b50), ms(b95));
    println!("{:<36} {:>9.1} {:>9.1}", "POST /segment (mask PNG)", ms(h50), ms(h95));
    println!("ratio /segment : bare (p50) = {:.3} (target <= 1.15)", h50.as_secs_f64() / b50.as_secs_f64());
    for (c, ips) in throughput {
        println!("{c:>2} concurrent clients: {ips:>6.2} images/s");
    }

    if std::env::var("BENCH_JOBS").as_deref() != Ok("0") {
        let budgets: Vec<usize> =
            std::env::var("BENCH_JOB_THREADS").unwrap_or_else(|_| "1 2".into()).split_whitespace().filter_map(|v| v.parse().ok()).collect();
        println!("\n/segment while a finetune job runs (320x320 frames, batch 8), inference threads {threads}");
        println!("{:<12} {:>14} {:>14} {:>14} {:>14}", "job threads", "idle p50 ms", "idle p95 ms", "job p50 ms", "job p95 ms");
        for n in budgets {
            let mut cfg = cfg.clone();
            cfg.job_threads = n;
            let data = tempfile::tempdir()?;
            cfg.data_dir = data.path().to_path_buf();
            let (idle, busy) = rt.block_on(segment_during_job(cfg, &jpeg, &root))?;
            println!(
                "{n:<12} {:>14.1} {:>14.1} {:>14.1} {:>14.1}",
                ms(percentile(idle.clone(), 0.5)),
                ms(percentile(idle, 0.95)),
                ms(percentile(busy.clone(), 0.5)),
                ms(percentile(busy, 0.95))
            );
        }
    }

    if std::env::var("BENCH_RECLUSTER").as_deref() != Ok("0") {
        println!("\npeak RSS clustering N images (64x64 inputs, 256 features of 128 floats each, cap {RECLUSTER_CAP} vectors)");
        println!("{:<8} {:>26} {:>26}", "images", "sampled while embedding MB", "every feature kept MB");
        for n in [500, 2000] {
            let mut row = vec![];
            for mode in ["sampled", "all"] {
                let out =
                    std::process::Command::new(std::env::current_exe()?).env("BENCH_RECLUSTER_CHILD", format!("{mode}:{n}")).output()?;
                anyhow::ensure!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
                row.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
            }
            println!("{n:<8} {:>26} {:>26}", row[0], row[1]);
        }
    }
    Ok(())
}

const RECLUSTER_CAP: usize = 50_000;

/// Peak RSS (VmHWM) in MB.
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// In a child process: clusters `n` generated images, sampling while embedding (`sampled`,
/// the recluster path) or keeping every feature first (`all`, the eval path); prints the
/// growth of peak RSS over the loaded session.
fn recluster_child(spec: &str) -> anyhow::Result<()> {
    use picie::train::cluster::{cluster_images, embed_images, ClassFit};
    let (mode, n) = spec.split_once(':').ok_or_else(|| anyhow::anyhow!("mode:n"))?;
    let n: usize = n.parse()?;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir()?;
    let paths: Vec<std::path::PathBuf> = (0..n)
        .map(|i| {
            let img = image::RgbImage::from_fn(64, 64, |x, y| {
                let v = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ (i as u32).wrapping_mul(97)) as u8;
                image::Rgb([v, v.wrapping_add(i as u8), (x * 4) as u8])
            });
            let p = dir.path().join(format!("{i:05}.png"));
            img.save(&p).map(|_| p)
        })
        .collect::<Result<_, _>>()?;
    let session = picie::infer::EmbedSession::load(&root.join("models/default/embedder.onnx"), picie::infer::DeviceChoice::Cpu, Some(1))?;
    let policy =
        picie::package::InputPolicy { short_side: 64, max_long_side: 64, multiple: 32, flip: false, normalize: Default::default() };
    let config = ClassFit::new(8, 0);
    let base = peak_rss_mb();
    match mode {
        "sampled" => {
            cluster_images(&session, &policy, &paths, config, RECLUSTER_CAP, |_, _| true)?;
        }
        _ => {
            let features = embed_images(&session, &policy, &paths, |_, _| true)?;
            features.fit(config, RECLUSTER_CAP)?;
        }
    }
    println!("{:.0}", peak_rss_mb() - base);
    Ok(())
}

/// Sequential /segment latencies on a fresh server: first with no job, then while a
/// fine-tuning job (on the shipped photos, more epochs than it will get to run) is training.
async fn segment_during_job(cfg: ServeConfig, jpeg: &[u8], root: &std::path::Path) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    const JOB_REPS: usize = 20;
    let app = App::build(&cfg).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        serve_on(listener, app, &cfg, async {
            let _ = rx.await;
        })
        .await
    });
    let client = reqwest::Client::new();
    let segment = || async {
        let t = Instant::now();
        let r = client.post(format!("{base}/segment")).header("content-type", "image/jpeg").body(jpeg.to_vec()).send().await?;
        anyhow::ensure!(r.status() == 200, "status {}", r.status());
        r.bytes().await?;
        anyhow::Ok(t.elapsed())
    };
    segment().await?;
    let mut idle = vec![];
    for _ in 0..JOB_REPS {
        idle.push(segment().await?);
    }

    let ds: serde_json::Value =
        client.post(format!("{base}/datasets")).json(&serde_json::json!({"name": "bench"})).send().await?.json().await?;
    let id = ds["id"].as_str().unwrap_or_default().to_string();
    let mut form = reqwest::multipart::Form::new();
    for p in picie::train::cluster::list_images(&root.join("fixtures/images"))? {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("x.jpg").to_string();
        form = form.part("files", reqwest::multipart::Part::bytes(std::fs::read(&p)?).file_name(name));
    }
    let r = client.post(format!("{base}/datasets/{id}/images")).multipart(form).send().await?;
    anyhow::ensure!(r.status() == 200, "upload: status {}", r.status());
    let spec = serde_json::json!({"type": "finetune", "dataset": id, "k": 4, "k2": 8, "epochs": 50, "batch": 8});
    let job: serde_json::Value = client.post(format!("{base}/jobs")).json(&spec).send().await?.json().await?;
    let jid = job["id"].as_str().unwrap_or_default().to_string();
    // Wait until it computes (past loading and decoding).
    loop {
        let j: serde_json::Value = client.get(format!("{base}/jobs/{jid}")).send().await?.json().await?;
        anyhow::ensure!(["queued", "running"].contains(&j["state"].as_str().unwrap_or("")), "the job ended: {j}");
        if j["progress"].as_f64().unwrap_or(0.0) > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut busy = vec![];
    for _ in 0..JOB_REPS {
        busy.push(segment().await?);
    }
    let j: serde_json::Value = client.get(format!("{base}/jobs/{jid}")).send().await?.json().await?;
    anyhow::ensure!(j["state"] == "running", "the job stopped before the measurement ended: {j}");
    client.post(format!("{base}/jobs/{jid}/cancel")).send().await?;
    loop {
        let j: serde_json::Value = client.get(format!("{base}/jobs/{jid}")).send().await?.json().await?;
        if j["state"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = tx.send(());
    server.await??;
    Ok((idle, busy))
}
