//! The inference backend: one thread that owns the ONNX Runtime calls, fed by a bounded
//! channel. Requests that arrive together for the same model and input size are run as one
//! batch. Each request carries the model it arrived under, so a hot swap never changes the
//! model of a request already accepted.
//!
//! The thread cannot fail silently: a panic inside a batch is caught and answered as an error to
//! that batch's requests only, the thread goes on with the next one, and `is_live` turns false
//! when the thread has ended or a batch has run longer than the stall limit (readiness reads it).
//! It also keeps a running estimate of the time per image, so admission can refuse work (429
//! with Retry-After) before the queue's wait grows past a configured bound. A request whose
//! client has gone (its timeout fired, its connection closed) before its turn is not computed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use tokio::sync::{mpsc, oneshot};

use crate::infer::{preprocess, LabelMask, Quality, Refinement, Segmenter};

/// What the thread runs for one batch of images that share a quality: the model's
/// `segment_batch_at`, or a stand-in in tests.
pub type Engine = Arc<dyn Fn(&Segmenter, &[RgbImage], Quality) -> anyhow::Result<Vec<LabelMask>> + Send + Sync>;

/// Why a request got no mask.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("the inference thread has stopped")]
    Stopped,
    #[error("inference failed on this batch: {0}")]
    Panicked(String),
    #[error("{0}")]
    Failed(String),
}

pub struct InferenceRequest {
    pub model: Arc<Segmenter>,
    pub image: RgbImage,
    pub quality: Quality,
    pub reply: oneshot::Sender<Result<(LabelMask, Duration), InferenceError>>,
}

#[derive(Clone, Debug)]
pub struct InferenceConfig {
    /// Requests that may wait in the channel.
    pub capacity: usize,
    /// Images per run.
    pub max_batch: usize,
    /// A batch running longer than this marks the worker not live (readiness answers 503).
    pub stall_after: Duration,
    /// The refinements' settings, for requests whose quality asks for one.
    pub refine: Refinement,
    /// The time per image assumed until the first batch has been measured (the warm-up's):
    /// without it a burst arriving at a fresh server is admitted whole.
    pub initial_time_per_image: Duration,
}

/// Shared between the thread and the handles.
struct Health {
    alive: AtomicBool,
    origin: Instant,
    /// Milliseconds since `origin` when the running batch started, plus one; 0 when idle.
    busy_since: AtomicU64,
    /// Images in the batch being run.
    in_flight: AtomicUsize,
    /// Running mean of the time per image, in microseconds (0 until the first batch).
    per_image_us: AtomicU64,
    /// Requests dropped unrun because nobody waited for them any more.
    abandoned: AtomicU64,
    /// Whether `per_image_us` is a measurement of real requests yet (until then it is the
    /// warm-up's estimate, which the first real batch replaces).
    measured: AtomicBool,
    stall_after: Duration,
}

impl Health {
    fn elapsed_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }
}

/// Marks the worker dead when its thread ends, however it ends.
struct AliveGuard(Arc<Health>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Relaxed);
    }
}

#[derive(Clone)]
pub struct Inference {
    tx: mpsc::Sender<InferenceRequest>,
    queued: Arc<AtomicUsize>,
    health: Arc<Health>,
}

impl Inference {
    /// Starts the backend thread running the models' own `segment_batch_at`. The CRF runs on
    /// this thread too, so the measured time per image (and the 429 bound) includes it.
    pub fn start(config: InferenceConfig) -> Self {
        let refine = config.refine;
        Self::start_with(
            config,
            Arc::new(move |model: &Segmenter, images: &[RgbImage], quality| model.segment_batch_at(images, quality, &refine)),
        )
    }

    /// Starts the backend thread with another engine (tests inject failures this way).
    pub fn start_with(config: InferenceConfig, engine: Engine) -> Self {
        let (tx, mut rx) = mpsc::channel::<InferenceRequest>(config.capacity.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(Health {
            alive: AtomicBool::new(true),
            origin: Instant::now(),
            busy_since: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            per_image_us: AtomicU64::new(config.initial_time_per_image.as_micros() as u64),
            abandoned: AtomicU64::new(0),
            measured: AtomicBool::new(false),
            stall_after: config.stall_after,
        });
        let (q, h) = (queued.clone(), health.clone());
        let max_batch = config.max_batch.max(1);
        std::thread::Builder::new()
            .name("picie-inference".into())
            .spawn(move || {
                let _guard = AliveGuard(h.clone());
                while let Some(first) = rx.blocking_recv() {
                    let mut pending = vec![first];
                    while pending.len() < max_batch {
                        match rx.try_recv() {
                            Ok(r) => pending.push(r),
                            Err(_) => break,
                        }
                    }
                    q.fetch_sub(pending.len(), Ordering::AcqRel);
                    // Grouping itself should not panic; if it does, the requests of this round
                    // are dropped (their handlers answer 500) and the thread goes on.
                    if catch_unwind(AssertUnwindSafe(|| run_grouped(pending, &engine, &h))).is_err() {
                        tracing::error!("the inference thread recovered from a panic outside a batch");
                        h.busy_since.store(0, Ordering::Relaxed);
                        h.in_flight.store(0, Ordering::Relaxed);
                    }
                }
            })
            .expect("spawning the inference thread");
        Self { tx, queued, health }
    }

    /// Requests dropped unrun since the start because their clients had gone.
    pub fn abandoned(&self) -> u64 {
        self.health.abandoned.load(Ordering::Relaxed)
    }

    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The thread is running and no batch has been running for longer than the stall limit.
    pub fn is_live(&self) -> bool {
        let h = &self.health;
        if !h.alive.load(Ordering::Relaxed) || self.tx.is_closed() {
            return false;
        }
        match h.busy_since.load(Ordering::Relaxed) {
            0 => true,
            since => h.elapsed_ms().saturating_sub(since - 1) <= h.stall_after.as_millis() as u64,
        }
    }

    /// The expected wait of a request queued now: images ahead of it (queued and running)
    /// times the running mean time per image (the configured initial time until the first
    /// batch has run).
    pub fn estimated_wait(&self) -> Duration {
        self.wait_behind(self.queue_depth())
    }

    /// The expected wait behind `queued` admitted images plus the batch running now.
    fn wait_behind(&self, queued: usize) -> Duration {
        let per_image = self.health.per_image_us.load(Ordering::Relaxed);
        let ahead = queued + self.health.in_flight.load(Ordering::Relaxed);
        Duration::from_micros(per_image.saturating_mul(ahead as u64))
    }

    /// Admits one image if the expected wait, counting it and every image admitted before it
    /// (queued, running, or still being read and decoded), is within `max_wait`; otherwise
    /// returns that wait. Counting from admission rather than from queueing closes the gap in
    /// which a burst of requests would all see an empty queue and all be let in.
    pub fn admit(&self, max_wait: Duration) -> Result<Ticket, Duration> {
        let wait = self.wait_behind(self.queued.fetch_add(1, Ordering::AcqRel));
        if wait > max_wait {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(wait);
        }
        Ok(Ticket { queued: Some(self.queued.clone()) })
    }

    /// Segments an admitted image; the ticket's place in the count passes to the queue.
    pub async fn segment(
        &self,
        mut ticket: Ticket,
        model: Arc<Segmenter>,
        image: RgbImage,
        quality: Quality,
    ) -> Result<(LabelMask, Duration), InferenceError> {
        let (reply, rx) = oneshot::channel();
        let counted = ticket.queued.take();
        if self.tx.send(InferenceRequest { model, image, quality, reply }).await.is_err() {
            if let Some(q) = counted {
                q.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(InferenceError::Stopped);
        }
        rx.await.map_err(|_| InferenceError::Panicked("the inference thread dropped the request".into()))?
    }
}

/// An admitted image's place in the queue count; given back if the request ends before its
/// image reaches the queue (a body or decoding error, a client gone).
pub struct Ticket {
    queued: Option<Arc<AtomicUsize>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(q) = self.queued.take() {
            q.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Weight of the newest batch in the running mean time per image.
const EWMA_WEIGHT: f64 = 0.2;

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs requests in groups that share a model, a padded input size and a quality; those whose
/// client has gone are dropped first.
fn run_grouped(mut pending: Vec<InferenceRequest>, engine: &Engine, health: &Health) {
    let before = pending.len();
    pending.retain(|r| !r.reply.is_closed());
    let gone = before - pending.len();
    if gone > 0 {
        health.abandoned.fetch_add(gone as u64, Ordering::Relaxed);
        tracing::debug!(requests = gone, "skipped requests nobody waits for any more");
    }
    while !pending.is_empty() {
        let key = |r: &InferenceRequest| {
            let g = preprocess::geometry(r.image.width(), r.image.height(), &r.model.package.manifest.input);
            (Arc::as_ptr(&r.model) as usize, g.padded, r.quality)
        };
        let k0 = key(&pending[0]);
        let (group, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|r| key(r) == k0);
        pending = rest;
        let model = group[0].model.clone();
        let quality = group[0].quality;
        let images: Vec<RgbImage> = group.iter().map(|r| r.image.clone()).collect();
        health.in_flight.store(images.len(), Ordering::Relaxed);
        health.busy_since.store(health.elapsed_ms() + 1, Ordering::Relaxed);
        let start = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| engine(&model, &images, quality)));
        let elapsed = start.elapsed();
        health.busy_since.store(0, Ordering::Relaxed);
        health.in_flight.store(0, Ordering::Relaxed);
        match result {
            Ok(Ok(masks)) if masks.len() == group.len() => {
                let per_image = elapsed.as_micros() as f64 / group.len() as f64;
                let old = health.per_image_us.load(Ordering::Relaxed) as f64;
                let new = if health.measured.swap(true, Ordering::Relaxed) { old + EWMA_WEIGHT * (per_image - old) } else { per_image };
                health.per_image_us.store(new.round() as u64, Ordering::Relaxed);
                for (r, m) in group.into_iter().zip(masks) {
                    let _ = r.reply.send(Ok((m, elapsed)));
                }
            }
            Ok(Ok(masks)) => {
                let msg = format!("the engine returned {} masks for {} images", masks.len(), group.len());
                for r in group {
                    let _ = r.reply.send(Err(InferenceError::Failed(msg.clone())));
                }
            }
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                for r in group {
                    let _ = r.reply.send(Err(InferenceError::Failed(msg.clone())));
                }
            }
            Err(payload) => {
                let msg = panic_message(payload.as_ref());
                tracing::error!(panic = %msg, images = group.len(), "inference panicked; answering this batch with 500");
                for r in group {
                    let _ = r.reply.send(Err(InferenceError::Panicked(msg.clone())));
                }
            }
        }
    }
}
