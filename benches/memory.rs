//! Peak memory (VmHWM) of `picie serve` run as a child process, a fresh server per scenario:
//!   (a) upload of a zip bomb: 40 entries of 200 MB of zeros, deflated (about 8 MB) (goal < 0.5 GB);
//!   (b) 32 concurrent /segment clients for 20 s on a 480x360 JPEG (goal < 0.4 GB), with
//!       requests/s, p50/p95 latency and the number of 429s;
//!   (c) a recluster job (k = 11) over 500 and over 2000 uploaded images (goal: peak RSS
//!       independent of the image count);
//!   (d) a segment job over 200 uploaded 480x360 images, against posting the same 200 images to
//!       /segment one by one at the same quality on the same server (goal: the job's images/s
//!       within 10 % of /segment's or above); then the job alone over 200 and over 800 images on
//!       fresh servers (goal: peak RSS independent of the image count). The servers run with
//!       `--job-threads` = all cores, as a worker would.
//!
//!     cargo build --release && cargo bench --bench memory            (about 10 minutes)
//!     cargo bench --bench memory -- --quick                            (smaller sizes)
//!
//! The binary is `PICIE_BIN`, else target/release/picie; models come from `models/`. `PICIE_BENCH_QUICK=1`
//! is `--quick`; `PICIE_BENCH_ONLY=a,b,c,d` picks scenarios.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Sizes are printed in GiB (2^30 bytes).
const GB: f64 = (1u64 << 30) as f64;

struct Server {
    child: Child,
    base: String,
    _data: tempfile::TempDir,
}

impl Server {
    async fn start(bin: &Path, root: &Path) -> Result<Server> {
        Self::start_with(bin, root, &[]).await
    }

    async fn start_with(bin: &Path, root: &Path, extra: &[&str]) -> Result<Server> {
        let data = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::fs::File::create(data.path().join("server.log"))?;
        let child = Command::new(bin)
            .current_dir(root)
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--models-dir", "models", "--data-dir"])
            .arg(data.path().join("data"))
            // The figures in docs/benchmarks.md were measured at this quality; PICIE_QUALITY overrides.
            .args(["--quality", &std::env::var("PICIE_QUALITY").unwrap_or_else(|_| "fast".into())])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let s = Server { child, base: format!("http://127.0.0.1:{port}"), _data: data };
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(s.url("/health/ready")).send().await {
                if r.status() == 200 {
                    return Ok(s);
                }
            }
            if start.elapsed() > Duration::from_secs(180) {
                bail!(
                    "the server did not get ready; its log: {}",
                    std::fs::read_to_string(s._data.path().join("server.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn status_kb(&self, key: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        text.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
    }

    /// Peak resident memory so far, in GB.
    fn peak_gb(&self) -> f64 {
        self.status_kb("VmHWM:") as f64 * 1024.0 / GB
    }

    async fn create_dataset(&self, client: &reqwest::Client, name: &str) -> Result<String> {
        let ds: Value = client.post(self.url("/datasets")).json(&json!({"name": name})).send().await?.json().await?;
        Ok(ds["id"].as_str().context("no dataset id")?.to_string())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

/// The zip bomb, written once to a temporary file.
fn build_bomb(entries: usize, entry_mb: usize) -> Result<tempfile::NamedTempFile> {
    let file = tempfile::NamedTempFile::new()?;
    let mut z = zip::ZipWriter::new(std::io::BufWriter::new(file.reopen()?));
    let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    let zeros = vec![0u8; 1 << 20];
    for i in 0..entries {
        z.start_file(format!("zeros-{i:02}.png"), o)?;
        for _ in 0..entry_mb {
            z.write_all(&zeros)?;
        }
    }
    z.finish()?.flush()?;
    Ok(file)
}

async fn scenario_bomb(bin: &Path, root: &Path, quick: bool) -> Result<()> {
    let (entries, entry_mb) = if quick { (40, 20) } else { (40, 200) };
    let t = Instant::now();
    let bomb = build_bomb(entries, entry_mb)?;
    let body = std::fs::read(bomb.path())?;
    println!(
        "(a) zip bomb: {entries} entries of {entry_mb} MB of zeros = {:.1} MB zipped (built in {:.1} s)",
        body.len() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let s = Server::start(bin, root).await?;
    let client = reqwest::Client::new();
    let base = s.peak_gb();
    let id = s.create_dataset(&client, "bomb").await?;
    let t = Instant::now();
    let r = client.post(s.url(&format!("/datasets/{id}/images"))).header("content-type", "application/zip").body(body).send().await?;
    let status = r.status();
    let report: Value = r.json().await.unwrap_or(Value::Null);
    let peak = s.peak_gb();
    let rejected = report["rejected"].as_array().map(|v| v.len()).unwrap_or(0);
    let first = report["rejected"][0]["reason"].as_str().unwrap_or("");
    println!("    answer {status} in {:.2} s: {rejected} rejected (first: {first})", t.elapsed().as_secs_f64());
    println!("    peak RSS {peak:.3} GB (idle server {base:.3} GB)   goal < 0.5 GB: {}", verdict(peak < 0.5));
    Ok(())
}

fn textured_jpeg(w: u32, h: u32, seed: u64) -> Result<Vec<u8>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (fx, fy) = (rng.random_range(1.0..9.0f32), rng.random_range(1.0..9.0f32));
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let g = ((x as f32 / w as f32 * fx).sin() * 60.0 + (y as f32 / h as f32 * fy).cos() * 60.0 + 128.0) as i32;
        let n: i32 = rng.random_range(-40..40);
        let c = |v: i32| v.clamp(0, 255) as u8;
        image::Rgb([c(g + n), c((x * 255 / w) as i32 + n / 2), c((y * 255 / h) as i32 - n / 2)])
    });
    let mut out = vec![];
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85).encode_image(&img)?;
    Ok(out)
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn scenario_segment(bin: &Path, root: &Path, quick: bool) -> Result<()> {
    let (clients, secs) = (32, if quick { 5 } else { 20 });
    let jpeg = Arc::new(textured_jpeg(480, 360, 1)?);
    let s = Server::start(bin, root).await?;
    let base = s.peak_gb();
    let client = reqwest::Client::builder().pool_max_idle_per_host(clients).build()?;
    let url = s.url("/segment?format=mask");
    let busy = Arc::new(AtomicUsize::new(0));
    let other = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = vec![];
    for _ in 0..clients {
        let (client, url, jpeg, busy, other) = (client.clone(), url.clone(), jpeg.clone(), busy.clone(), other.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = vec![];
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = client.post(&url).header("content-type", "image/jpeg").body(jpeg.to_vec()).send().await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed());
                    }
                    Ok(r) if r.status() == 429 => {
                        busy.fetch_add(1, Ordering::Relaxed);
                        let wait = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<f64>().ok()).unwrap_or(0.05);
                        tokio::time::sleep(Duration::from_secs_f64(wait.min(0.1))).await;
                    }
                    _ => {
                        other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut lat = vec![];
    for t in tasks {
        lat.extend(t.await?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let peak = s.peak_gb();
    let ok = lat.len();
    let (p50, p95) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.95));
    println!(
        "(b) {clients} clients x {secs} s of /segment (480x360 JPEG): {:.1} req/s (200s), p50 {:.0} ms, p95 {:.0} ms, {} x 429, {} other",
        ok as f64 / elapsed,
        p50.as_secs_f64() * 1e3,
        p95.as_secs_f64() * 1e3,
        busy.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed)
    );
    println!("    peak RSS {peak:.3} GB (idle server {base:.3} GB)   goal < 0.4 GB: {}", verdict(peak < 0.4));
    Ok(())
}

/// Uploads `n` distinct 320x240 JPEGs as tar archives of 250 images each.
async fn upload_images(s: &Server, client: &reqwest::Client, id: &str, n: usize) -> Result<usize> {
    upload_sized(s, client, id, n, (320, 240)).await
}

/// Uploads `n` distinct JPEGs of this size (the image `i` is `textured_jpeg(w, h, 1000 + i)`).
async fn upload_sized(s: &Server, client: &reqwest::Client, id: &str, n: usize, (w, h): (u32, u32)) -> Result<usize> {
    let mut added = 0;
    for batch in (0..n).collect::<Vec<_>>().chunks(250) {
        let mut b = tar::Builder::new(vec![]);
        for &i in batch {
            let jpeg = textured_jpeg(w, h, 1000 + i as u64)?;
            let mut h = tar::Header::new_ustar();
            h.set_size(jpeg.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("img-{i:05}.jpg"), &jpeg[..])?;
        }
        let body = b.into_inner()?;
        let r: Value = client
            .post(s.url(&format!("/datasets/{id}/images")))
            .header("content-type", "application/x-tar")
            .body(body)
            .send()
            .await?
            .json()
            .await?;
        added += r["added"].as_array().map(|v| v.len()).unwrap_or(0);
    }
    Ok(added)
}

/// Returns (peak after upload, peak after the job) in GB.
async fn recluster(bin: &Path, root: &Path, n: usize) -> Result<(f64, f64)> {
    let s = Server::start(bin, root).await?;
    let client = reqwest::Client::new();
    let id = s.create_dataset(&client, &format!("bench-{n}")).await?;
    let t = Instant::now();
    let added = upload_images(&s, &client, &id, n).await?;
    let after_upload = s.peak_gb();
    println!("    {n} images: uploaded {added} in {:.1} s, peak so far {after_upload:.3} GB", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let job: Value = client.post(s.url("/jobs")).json(&json!({"type": "recluster", "dataset": id, "k": 11})).send().await?.json().await?;
    let state = wait_job(&s, &client, &job).await?;
    let peak = s.peak_gb();
    println!("    {n} images: recluster {state} in {:.1} s, peak RSS {peak:.3} GB", t.elapsed().as_secs_f64());
    Ok((after_upload, peak))
}

async fn scenario_recluster(bin: &Path, root: &Path, quick: bool) -> Result<()> {
    let sizes = if quick { [100, 400] } else { [500, 2000] };
    println!("(c) recluster k=11 over {} and {} images (320x240 JPEGs)", sizes[0], sizes[1]);
    let (_, small) = recluster(bin, root, sizes[0]).await?;
    let (_, large) = recluster(bin, root, sizes[1]).await?;
    let diff = large - small;
    println!(
        "    peak RSS {small:.3} GB at {} images, {large:.3} GB at {} images: difference {diff:+.3} GB ({:+.0}%)   goal independent of the count: {}",
        sizes[0],
        sizes[1],
        diff / small * 100.0,
        verdict(diff.abs() < 0.1 * small.max(0.1))
    );
    Ok(())
}

/// Waits for a job to end; its final state, with the error when it did not succeed.
async fn wait_job(s: &Server, client: &reqwest::Client, job: &Value) -> Result<String> {
    let jid = job["id"].as_str().with_context(|| format!("no job id in {job}"))?.to_string();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let j: Value = client.get(s.url(&format!("/jobs/{jid}"))).send().await?.json().await?;
        let st = j["state"].as_str().unwrap_or("").to_string();
        if st != "queued" && st != "running" {
            return Ok(if st == "succeeded" { st } else { format!("{st}: {}", j["error"]) });
        }
    }
}

/// A segment job over `n` 480x360 images: (images/s from submission to success, peak RSS in
/// GB, and /segment's images/s posting the first `sequential` of them one by one, if asked).
async fn segment_job(bin: &Path, root: &Path, n: usize, quality: &str, sequential: usize) -> Result<(f64, f64, Option<f64>)> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).to_string();
    let s = Server::start_with(bin, root, &["--job-threads", &threads]).await?;
    let client = reqwest::Client::new();
    let id = s.create_dataset(&client, &format!("segment-{n}")).await?;
    upload_sized(&s, &client, &id, n, (480, 360)).await?;
    let one_by_one = if sequential > 0 {
        let jpegs: Vec<Vec<u8>> = (0..sequential).map(|i| textured_jpeg(480, 360, 1000 + i as u64)).collect::<Result<_>>()?;
        let t = Instant::now();
        for jpeg in jpegs {
            let r = client
                .post(s.url(&format!("/segment?format=mask&quality={quality}")))
                .header("content-type", "image/jpeg")
                .body(jpeg)
                .send()
                .await?;
            if r.status() != 200 {
                bail!("/segment answered {}", r.status());
            }
            r.bytes().await?;
        }
        Some(sequential as f64 / t.elapsed().as_secs_f64())
    } else {
        None
    };
    let t = Instant::now();
    let job: Value =
        client.post(s.url("/jobs")).json(&json!({"type": "segment", "dataset": id, "quality": quality})).send().await?.json().await?;
    let state = wait_job(&s, &client, &job).await?;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    if state != "succeeded" {
        bail!("the segment job ended {state}");
    }
    Ok((rate, s.peak_gb(), one_by_one))
}

async fn scenario_segment_job(bin: &Path, root: &Path, quick: bool) -> Result<()> {
    let sizes = if quick { [50, 200] } else { [200, 800] };
    let quality = std::env::var("PICIE_QUALITY").unwrap_or_else(|_| "edges".into());
    println!("(d) segment job at quality {quality} over {} and {} images (480x360 JPEGs) against /segment one by one", sizes[0], sizes[1]);
    let (job_rate, _, Some(one_rate)) = segment_job(bin, root, sizes[0], &quality, sizes[0]).await? else { unreachable!() };
    println!(
        "    {} images: /segment one by one {one_rate:.2} images/s, the job {job_rate:.2} images/s ({:+.0}%)   goal within 10 %: {}",
        sizes[0],
        (job_rate / one_rate - 1.0) * 100.0,
        verdict(job_rate >= 0.9 * one_rate)
    );
    // Memory on servers that ran the job alone: the /segment requests above raise a peak too.
    let (_, small, _) = segment_job(bin, root, sizes[0], &quality, 0).await?;
    let (large_rate, large, _) = segment_job(bin, root, sizes[1], &quality, 0).await?;
    let diff = large - small;
    println!(
        "    peak RSS {small:.3} GB at {} images, {large:.3} GB at {} images ({large_rate:.2} images/s): difference {diff:+.3} GB   goal independent of the count: {}",
        sizes[0],
        sizes[1],
        verdict(diff.abs() < 0.1 * small.max(0.1))
    );
    Ok(())
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var("PICIE_BENCH_QUICK").is_ok_and(|v| v == "1");
    let only = std::env::var("PICIE_BENCH_ONLY").unwrap_or_else(|_| "a,b,c,d".into());
    let bin = std::env::var_os("PICIE_BIN").map(PathBuf::from).unwrap_or_else(|| root.join("target/release/picie"));
    if !bin.exists() {
        bail!("{} is missing: run `cargo build --release` first, or set PICIE_BIN", bin.display());
    }
    println!("memory bench: {} ({})", bin.display(), if quick { "quick" } else { "full" });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        if only.contains('a') {
            scenario_bomb(&bin, &root, quick).await?;
        }
        if only.contains('b') {
            scenario_segment(&bin, &root, quick).await?;
        }
        if only.contains('c') {
            scenario_recluster(&bin, &root, quick).await?;
        }
        if only.contains('d') {
            scenario_segment_job(&bin, &root, quick).await?;
        }
        Ok(())
    })
}
