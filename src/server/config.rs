//! `picie serve` settings: command-line flags, each also an environment variable.

use std::path::PathBuf;

use crate::infer::{CrfConfig, DeviceChoice, GuidedConfig, Quality, Refinement};

use super::datasets::DatasetLimits;
use super::shared::Role;
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
    /// Refuse /segment with 429 (and Retry-After) when the inference queue's expected wait,
    /// images ahead times the measured time per image, is longer than this.
    #[arg(long, env = "PICIE_MAX_QUEUE_MS", default_value_t = Limits::default().max_queue_ms)]
    pub max_queue_ms: u64,
    /// Largest file unpacked from an archive (or uploaded as is), in bytes.
    #[arg(long, env = "PICIE_MAX_ENTRY_BYTES", default_value_t = DatasetLimits::default().max_entry_bytes)]
    pub max_entry_bytes: u64,
    /// An archive entry may unpack to at most this many times its compressed size.
    #[arg(long, env = "PICIE_MAX_COMPRESSION_RATIO", default_value_t = DatasetLimits::default().max_compression_ratio)]
    pub max_compression_ratio: u64,
    /// Entries in one uploaded archive; more refuses the whole archive.
    #[arg(long, env = "PICIE_MAX_ARCHIVE_ENTRIES", default_value_t = DatasetLimits::default().max_archive_entries)]
    pub max_archive_entries: usize,
    /// Bytes unpacked from one archive in all; more refuses the whole archive.
    #[arg(long, env = "PICIE_MAX_UNPACKED_BYTES", default_value_t = DatasetLimits::default().max_unpacked_bytes)]
    pub max_unpacked_bytes: u64,
    /// Images in one dataset.
    #[arg(long, env = "PICIE_MAX_DATASET_IMAGES", default_value_t = DatasetLimits::default().max_dataset_images)]
    pub max_dataset_images: usize,
    /// Bytes of images in one dataset.
    #[arg(long, env = "PICIE_MAX_DATASET_BYTES", default_value_t = DatasetLimits::default().max_dataset_bytes)]
    pub max_dataset_bytes: u64,
    /// `/segment`'s quality when a request names none: fast, flip (features averaged over a
    /// horizontal flip), crf (labels refined by the dense CRF: the default) or best (both).
    #[arg(long, env = "PICIE_QUALITY", default_value_t = DEFAULT_QUALITY)]
    pub quality: Quality,
    /// Dense CRF settings as key=value pairs over the defaults: iterations (10), temperature (2),
    /// smooth_sxy (1), smooth_weight (3), appearance_sxy (67), appearance_srgb (3),
    /// appearance_weight (4), max_pixels (1048576: larger images are refined scaled down).
    #[arg(long, env = "PICIE_CRF", default_value = "")]
    pub crf: CrfConfig,
    /// Guided-filter settings (quality `edges`) as key=value pairs over the defaults: radius (24,
    /// in pixels), eps (0.001), temperature (0: the similarities themselves are filtered),
    /// max_pixels (524288: larger images are filtered scaled down and the filter's coefficients
    /// scaled back up).
    #[arg(long, env = "PICIE_GUIDED", default_value = "")]
    pub guided: GuidedConfig,
    /// Images per inference batch when requests queue up.
    #[arg(long, env = "PICIE_MAX_BATCH", default_value_t = 4)]
    pub max_batch: usize,
    /// Threads for background jobs (training, k-means and their ONNX Runtime sessions), a
    /// budget apart from inference's (default: half the available cores, at least 1).
    #[arg(long, env = "PICIE_JOB_THREADS", default_value_t = default_job_threads(), value_parser = positive_threads)]
    pub job_threads: usize,
    /// api (HTTP only, no jobs), worker (claims and runs jobs) or all (both). api and worker
    /// need --database-url and --store: they share their state through them.
    #[arg(long, env = "PICIE_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,
    /// PostgreSQL (postgres://user:password@host/db) for model versions, the active model,
    /// datasets and jobs, shared by every replica and worker. Unset: the data folder (embedded).
    #[arg(long, env = "PICIE_DATABASE_URL", hide_env_values = true, requires = "store")]
    pub database_url: Option<String>,
    /// Object storage for packages, dataset images and checkpoints: s3://bucket/prefix
    /// (credentials, region and endpoint from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_REGION, AWS_ENDPOINT; AWS_ALLOW_HTTP=true for a plain-HTTP endpoint) or
    /// file:///path (a volume every replica mounts). Needs --database-url.
    #[arg(long, env = "PICIE_STORE", requires = "database_url")]
    pub store: Option<String>,
    /// This process's name in job leases and logs (default: host name and process id).
    #[arg(long, env = "PICIE_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Seconds a worker holds a job without a heartbeat; a job whose worker died is claimed
    /// again after this.
    #[arg(long, env = "PICIE_LEASE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub lease_secs: u64,
    /// How often replicas look for a newly activated model and idle workers for queued jobs.
    #[arg(long, env = "PICIE_SYNC_INTERVAL_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..))]
    pub sync_interval_ms: u64,
}

/// The quality of a `/segment` request that names none: the dense CRF, the one lever that pays
/// on CamVid (README, "Quality on CamVid"); flip averaging did not, alone or with it.
pub const DEFAULT_QUALITY: Quality = Quality::Crf;

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
        let d = DatasetLimits::default();
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
            max_queue_ms: l.max_queue_ms,
            max_batch: 4,
            quality: DEFAULT_QUALITY,
            crf: CrfConfig::default(),
            guided: GuidedConfig::default(),
            max_entry_bytes: d.max_entry_bytes,
            max_compression_ratio: d.max_compression_ratio,
            max_archive_entries: d.max_archive_entries,
            max_unpacked_bytes: d.max_unpacked_bytes,
            max_dataset_images: d.max_dataset_images,
            max_dataset_bytes: d.max_dataset_bytes,
            job_threads: default_job_threads(),
            role: Role::All,
            database_url: None,
            store: None,
            instance_id: None,
            lease_secs: 30,
            sync_interval_ms: 2000,
        }
    }

    /// The settings of the refinements a request's quality may ask for.
    pub fn refinement(&self) -> Refinement {
        Refinement { crf: self.crf, guided: self.guided }
    }

    /// The caps dataset storage enforces on uploads.
    pub fn dataset_limits(&self) -> DatasetLimits {
        DatasetLimits {
            max_image_pixels: self.max_image_pixels,
            max_entry_bytes: self.max_entry_bytes,
            max_compression_ratio: self.max_compression_ratio,
            max_archive_entries: self.max_archive_entries,
            max_unpacked_bytes: self.max_unpacked_bytes,
            max_dataset_images: self.max_dataset_images,
            max_dataset_bytes: self.max_dataset_bytes,
        }
    }
}
