//! Prometheus metrics, kept by hand (a few counters and histograms do not need a framework).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

const LATENCY_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Clone, Default)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    inference: Mutex<Histogram>,
}

/// Values read at scrape time.
pub struct Snapshot<'a> {
    pub queue_depth: usize,
    pub jobs_by_state: Vec<(&'a str, usize)>,
    pub provider: &'a str,
    pub model: &'a str,
}

impl Metrics {
    pub fn observe_request(&self, method: &str, route: &str, status: u16, latency: Duration) {
        let mut m = self.requests.lock().expect("metrics lock");
        m.entry((method.to_string(), route.to_string(), status)).or_default().observe(latency.as_secs_f64());
    }

    pub fn observe_inference(&self, latency: Duration) {
        self.inference.lock().expect("metrics lock").observe(latency.as_secs_f64());
    }

    pub fn render(&self, s: &Snapshot<'_>) -> String {
        let mut out = String::new();
        out.push_str("# HELP picie_http_requests_total HTTP requests by method, route and status.\n");
        out.push_str("# TYPE picie_http_requests_total counter\n");
        let reqs = self.requests.lock().expect("metrics lock").clone();
        for ((method, route, status), h) in &reqs {
            let _ = writeln!(out, "picie_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {}", h.count);
        }
        out.push_str("# HELP picie_http_request_duration_seconds Request latency by method, route and status.\n");
        out.push_str("# TYPE picie_http_request_duration_seconds histogram\n");
        for ((method, route, status), h) in &reqs {
            h.render(&mut out, "picie_http_request_duration_seconds", &format!("method=\"{method}\",route=\"{route}\",status=\"{status}\""));
        }
        out.push_str("# HELP picie_inference_duration_seconds Embedder + assignment time per batch.\n");
        out.push_str("# TYPE picie_inference_duration_seconds histogram\n");
        self.inference.lock().expect("metrics lock").render(&mut out, "picie_inference_duration_seconds", "");
        out.push_str("# HELP picie_inference_queue_depth Images waiting for the inference thread.\n");
        out.push_str("# TYPE picie_inference_queue_depth gauge\n");
        let _ = writeln!(out, "picie_inference_queue_depth {}", s.queue_depth);
        out.push_str("# HELP picie_jobs Jobs by state.\n# TYPE picie_jobs gauge\n");
        for (state, n) in &s.jobs_by_state {
            let _ = writeln!(out, "picie_jobs{{state=\"{state}\"}} {n}");
        }
        out.push_str("# HELP picie_model_info The active model and execution provider.\n# TYPE picie_model_info gauge\n");
        let _ = writeln!(out, "picie_model_info{{model=\"{}\",provider=\"{}\"}} 1", s.model, s.provider);
        out
    }
}
