//! Prometheus metrics through the `metrics` crate and its Prometheus exporter. Each server keeps
//! its own recorder (not the process-global one), so several servers in one process, as in the
//! tests, keep separate counts.

use std::sync::Mutex;
use std::time::Duration;

use metrics::{Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

const LATENCY_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

const REQUESTS: &str = "picie_http_requests_total";
const REQUEST_DURATION: &str = "picie_http_request_duration_seconds";
const INFERENCE_DURATION: &str = "picie_inference_duration_seconds";
const REJECTED: &str = "picie_segment_rejected_total";
const QUEUE_DEPTH: &str = "picie_inference_queue_depth";
const QUEUE_WAIT: &str = "picie_inference_expected_wait_seconds";
const WORKER_LIVE: &str = "picie_inference_worker_live";
const JOBS: &str = "picie_jobs";
const WATCHERS: &str = "picie_job_watchers";
const PIXELS_IN_FLIGHT: &str = "picie_segment_pixels_in_flight";
const ABANDONED: &str = "picie_segment_abandoned_total";
const MODEL_INFO: &str = "picie_model_info";

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

pub struct Metrics {
    recorder: PrometheusRecorder,
    /// The labels of the model-info series last set to 1, set to 0 when the model changes.
    last_model: Mutex<Option<(String, String)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let recorder = PrometheusBuilder::new().set_buckets(&LATENCY_BUCKETS).expect("latency buckets are not empty").build_recorder();
        let describe = [
            (REQUESTS, None, "HTTP requests by method, route and status."),
            (REQUEST_DURATION, Some(Unit::Seconds), "Request latency by method, route and status."),
            (INFERENCE_DURATION, Some(Unit::Seconds), "Embedder + assignment time per batch."),
            (REJECTED, None, "Segment requests refused with 429 (busy)."),
            (QUEUE_DEPTH, None, "Images waiting for the inference thread."),
            (QUEUE_WAIT, Some(Unit::Seconds), "Expected wait of a segment request queued now."),
            (WORKER_LIVE, None, "1 while the inference thread is alive and not stuck."),
            (JOBS, None, "Jobs by state."),
            (WATCHERS, None, "Open job event streams."),
            (PIXELS_IN_FLIGHT, None, "Pixels of the /segment requests admitted now."),
            (ABANDONED, None, "Segment requests dropped unrun because their clients had gone."),
            (MODEL_INFO, None, "The active model and execution provider."),
        ];
        for (name, unit, help) in describe {
            recorder.describe_counter(name.into(), unit, help.into());
        }
        Self { recorder, last_model: Mutex::new(None) }
    }
}

/// Values read at scrape time.
pub struct Snapshot<'a> {
    pub queue_depth: usize,
    pub expected_wait: Duration,
    pub worker_live: bool,
    pub jobs_by_state: Vec<(&'a str, usize)>,
    pub watchers: usize,
    pub pixels_in_flight: u64,
    pub abandoned: u64,
    pub provider: &'a str,
    pub model: &'a str,
}

fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
    Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, v.clone())).collect::<Vec<_>>())
}

impl Metrics {
    pub fn observe_request(&self, method: &str, route: &str, status: u16, latency: Duration) {
        let labels = [("method", method.to_string()), ("route", route.to_string()), ("status", status.to_string())];
        self.recorder.register_counter(&key(REQUESTS, &labels), &METADATA).increment(1);
        self.recorder.register_histogram(&key(REQUEST_DURATION, &labels), &METADATA).record(latency.as_secs_f64());
    }

    pub fn observe_inference(&self, latency: Duration) {
        self.recorder.register_histogram(&key(INFERENCE_DURATION, &[]), &METADATA).record(latency.as_secs_f64());
    }

    pub fn observe_rejection(&self) {
        self.recorder.register_counter(&key(REJECTED, &[]), &METADATA).increment(1);
    }

    pub fn render(&self, s: &Snapshot<'_>) -> String {
        let gauge = |name: &'static str, labels: &[(&'static str, String)], v: f64| {
            self.recorder.register_gauge(&key(name, labels), &METADATA).set(v);
        };
        gauge(QUEUE_DEPTH, &[], s.queue_depth as f64);
        gauge(QUEUE_WAIT, &[], s.expected_wait.as_secs_f64());
        gauge(WORKER_LIVE, &[], if s.worker_live { 1.0 } else { 0.0 });
        gauge(WATCHERS, &[], s.watchers as f64);
        gauge(PIXELS_IN_FLIGHT, &[], s.pixels_in_flight as f64);
        gauge(ABANDONED, &[], s.abandoned as f64);
        for (state, n) in &s.jobs_by_state {
            gauge(JOBS, &[("state", state.to_string())], *n as f64);
        }
        let current = (s.model.to_string(), s.provider.to_string());
        {
            let mut last = self.last_model.lock().expect("metrics lock");
            if let Some((model, provider)) = last.as_ref().filter(|l| **l != current) {
                gauge(MODEL_INFO, &[("model", model.clone()), ("provider", provider.clone())], 0.0);
            }
            *last = Some(current.clone());
        }
        gauge(MODEL_INFO, &[("model", current.0), ("provider", current.1)], 1.0);
        self.recorder.handle().render()
    }
}
