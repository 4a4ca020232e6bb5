//! The inference backend: one thread that owns the ONNX Runtime calls, fed by a bounded
//! channel. Requests that arrive together for the same model and input size are run as one
//! batch. Each request carries the model it arrived under, so a hot swap never changes the
//! model of a request already accepted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use tokio::sync::{mpsc, oneshot};

use crate::infer::{preprocess, LabelMask, Segmenter};

pub struct InferenceRequest {
    pub model: Arc<Segmenter>,
    pub image: RgbImage,
    pub reply: oneshot::Sender<anyhow::Result<(LabelMask, Duration)>>,
}

#[derive(Clone)]
pub struct WorkerHandle {
    tx: mpsc::Sender<InferenceRequest>,
    queued: Arc<AtomicUsize>,
}

impl WorkerHandle {
    /// Starts the backend thread. `capacity` bounds the queue; `max_batch` the images per run.
    pub fn start(capacity: usize, max_batch: usize) -> Self {
        let (tx, mut rx) = mpsc::channel::<InferenceRequest>(capacity.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        std::thread::Builder::new()
            .name("picie-inference".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut pending = vec![first];
                    while pending.len() < max_batch.max(1) {
                        match rx.try_recv() {
                            Ok(r) => pending.push(r),
                            Err(_) => break,
                        }
                    }
                    q.fetch_sub(pending.len(), Ordering::Relaxed);
                    run_grouped(pending);
                }
            })
            .expect("spawning the inference thread");
        Self { tx, queued }
    }

    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub async fn segment(&self, model: Arc<Segmenter>, image: RgbImage) -> anyhow::Result<(LabelMask, Duration)> {
        let (reply, rx) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(InferenceRequest { model, image, reply }).await.is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            anyhow::bail!("the inference thread has stopped");
        }
        rx.await.map_err(|_| anyhow::anyhow!("the inference thread dropped the request"))?
    }
}

/// Runs requests in groups that share a model and a padded input size.
fn run_grouped(mut pending: Vec<InferenceRequest>) {
    while !pending.is_empty() {
        let key = |r: &InferenceRequest| {
            let g = preprocess::geometry(r.image.width(), r.image.height(), &r.model.package.manifest.input);
            (Arc::as_ptr(&r.model) as usize, g.padded)
        };
        let k0 = key(&pending[0]);
        let (group, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|r| key(r) == k0);
        pending = rest;
        let model = group[0].model.clone();
        let images: Vec<RgbImage> = group.iter().map(|r| r.image.clone()).collect();
        let start = Instant::now();
        let result = model.segment_batch(&images);
        let elapsed = start.elapsed();
        match result {
            Ok(masks) => {
                for (r, m) in group.into_iter().zip(masks) {
                    let _ = r.reply.send(Ok((m, elapsed)));
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                for r in group {
                    let _ = r.reply.send(Err(anyhow::anyhow!(msg.clone())));
                }
            }
        }
    }
}
