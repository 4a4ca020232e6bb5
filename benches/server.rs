//! `/segment` against the bare inference call, side by side in one run, on a 480x360 JPEG:
//! p50/p95 latency of each (the HTTP path adds decoding, queueing, PNG encoding and the
//! network), then images/s at 1, 4 and 16 concurrent clients.
//!
//!     cargo bench --bench server            (needs scripts/setup.sh --no-build first)

use std::time::{Duration, Instant};

use picie::server::{build_state, serve_on, ServeConfig};

const REPS: usize = 40;

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
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

    // The job runner inside the state is spawned on this runtime.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let guard = rt.enter();
    // Bare inference: decode + embed + assign, no HTTP.
    let state = build_state(&cfg)?;
    let (_, seg) = state.models.active();
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
        let server = tokio::spawn(serve_on(listener, state, async {
            let _ = rx.await;
        }));
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
    let (b50, b95, h50, h95) = (percentile(bare.clone(), 0.5), percentile(bare, 0.95), percentile(http.clone(), 0.5), percentile(http, 0.95));
    println!("480x360 JPEG, model default, {threads} threads, {REPS} requests each");
    println!("{:<36} {:>9} {:>9}", "", "p50 ms", "p95 ms");
    println!("{:<36} {:>9.1} {:>9.1}", "bare inference (decode+embed+assign)", ms(b50), ms(b95));
    println!("{:<36} {:>9.1} {:>9.1}", "POST /segment (mask PNG)", ms(h50), ms(h95));
    println!("ratio /segment : bare (p50) = {:.3} (target <= 1.15)", h50.as_secs_f64() / b50.as_secs_f64());
    for (c, ips) in throughput {
        println!("{c:>2} concurrent clients: {ips:>6.2} images/s");
    }
    Ok(())
}
