//! `picie serve` settings: command-line flags, each also an environment variable.

use std::path::PathBuf;

use crate::infer::DeviceChoice;

pub use super::state::Limits;

#[derive(clap::Args, Clone, Debug)]
pub struct ServeConfig {
    #[arg(long, env = "PICIE_HOST", default_value = "0.0.0.0")]
    pub host: String,
    #[arg(long, env = "PICIE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Where datasets, jobs and new model versions are kept.
    #[arg(long, env = "PICIE_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Folder of shipped model packages.
    #[arg(long, env = "PICIE_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Model to serve (default: the last one activated, else `default`).
    #[arg(long, env = "PICIE_MODEL")]
    pub model: Option<String>,
    /// When set, required (x-api-key or Bearer) on every route that changes state.
    #[arg(long, env = "PICIE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "PICIE_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// ONNX Runtime intra-op threads (default: ONNX Runtime's choice).
    #[arg(long, env = "PICIE_THREADS")]
    pub threads: Option<usize>,
    #[arg(long, env = "PICIE_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    #[arg(long, env = "PICIE_MAX_UPLOAD_BYTES", default_value_t = Limits::default().max_upload_bytes)]
    pub max_upload_bytes: usize,
    #[arg(long, env = "PICIE_MAX_IMAGE_PIXELS", default_value_t = Limits::default().max_image_pixels)]
    pub max_image_pixels: u64,
    #[arg(long, env = "PICIE_MAX_CONCURRENT", default_value_t = Limits::default().max_concurrent)]
    pub max_concurrent: usize,
    #[arg(long, env = "PICIE_REQUEST_TIMEOUT_SECS", default_value_t = Limits::default().request_timeout_secs)]
    pub request_timeout_secs: u64,
    /// Images per inference batch when requests queue up.
    #[arg(long, env = "PICIE_MAX_BATCH", default_value_t = 4)]
    pub max_batch: usize,
    /// Threads for background jobs (training, k-means and their ONNX Runtime sessions), a
    /// budget apart from inference's (default: half the available cores, at least 1).
    #[arg(long, env = "PICIE_JOB_THREADS", default_value_t = default_job_threads(), value_parser = positive_threads)]
    pub job_threads: usize,
}

/// Half the available cores, at least 1: jobs leave the rest to inference.
pub fn default_job_threads() -> usize {
    (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) / 2).max(1)
}

fn positive_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{s}` is not a positive number of threads")),
    }
}

impl ServeConfig {
    /// The defaults of the command line, for `models_dir` and `data_dir`.
    pub fn new(models_dir: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        let l = Limits::default();
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            data_dir: data_dir.into(),
            models_dir: models_dir.into(),
            model: None,
            api_key: None,
            device: DeviceChoice::Auto,
            threads: None,
            max_body_bytes: l.max_body_bytes,
            max_upload_bytes: l.max_upload_bytes,
            max_image_pixels: l.max_image_pixels,
            max_concurrent: l.max_concurrent,
            request_timeout_secs: l.request_timeout_secs,
            max_batch: 4,
            job_threads: default_job_threads(),
        }
    }
}

