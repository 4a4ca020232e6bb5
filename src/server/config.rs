//! `picie serve` settings: command-line flags, each also an environment variable.

use std::path::PathBuf;

use std::time::Duration;

use crate::infer::{CrfConfig, DeviceChoice, GuidedConfig, Quality, Refinement};

use super::core::datasets::DatasetLimits;
use super::http::state::HttpLimits;

/// Which parts of the server a process runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Role {
    /// HTTP only: serves `/segment` and the API, runs no jobs.
    Api,
    /// Claims and runs jobs (it serves the HTTP routes too, for probes and metrics).
    Worker,
    /// Both: the embedded default.
    #[default]
    All,
}

impl Role {
    pub fn runs_jobs(self) -> bool {
        matches!(self, Role::Worker | Role::All)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Worker => "worker",
            Role::All => "all",
        }
    }
}

/// Defaults of the flags that are not another type's defaults.
pub mod defaults {
    pub const MAX_IMAGE_PIXELS: u64 = crate::infer::preprocess::DEFAULT_MAX_PIXELS;
    pub const MAX_CONCURRENT: usize = 32;
    pub const MAX_QUEUE_MS: u64 = 2000;
    /// About 1 GB of decoded images and their masks at once.
    pub const MAX_INFLIGHT_PIXELS: u64 = 100_000_000;
    pub const HEADER_TIMEOUT_SECS: u64 = 10;
    pub const MAX_CONNECTIONS: usize = 512;
    pub const MAX_WATCHERS: usize = 256;
    pub const MAX_WATCHERS_PER_JOB: usize = 16;
    pub const MAX_BATCH: usize = 4;
}

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
    /// When set, required (x-api-key or Bearer) on every route that changes state. Without it,
    /// state changes are accepted only from a client on this machine that is not a page of
    /// another site and not forwarded by a proxy (README, "Running it safely").
    #[arg(long, env = "PICIE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Require the API key for reads too (segmentation, listings, /info, /metrics); health
    /// probes, the web page and the API documents stay open. Needs --api-key.
    #[arg(long, env = "PICIE_PROTECT_READS", requires = "api_key")]
    pub protect_reads: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "PICIE_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// ONNX Runtime intra-op threads (default: ONNX Runtime's choice).
    #[arg(long, env = "PICIE_THREADS")]
    pub threads: Option<usize>,
    /// Largest /segment body, in bytes.
    #[arg(long, env = "PICIE_MAX_BODY_BYTES", default_value_t = HttpLimits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Largest dataset upload body, in bytes.
    #[arg(long, env = "PICIE_MAX_UPLOAD_BYTES", default_value_t = HttpLimits::default().max_upload_bytes)]
    pub max_upload_bytes: usize,
    /// Largest image, in pixels, read from its header before anything is decoded.
    #[arg(long, env = "PICIE_MAX_IMAGE_PIXELS", default_value_t = defaults::MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
    /// /segment requests admitted at once (decoding, queued or running); more get 429.
    #[arg(long, env = "PICIE_MAX_CONCURRENT", default_value_t = defaults::MAX_CONCURRENT)]
    pub max_concurrent: usize,
    /// Pixels of the /segment images admitted at once (about 10 bytes each while decoded and
    /// segmented); an image that does not fit now gets 429, one larger than this 413.
    #[arg(long, env = "PICIE_MAX_INFLIGHT_PIXELS", default_value_t = defaults::MAX_INFLIGHT_PIXELS)]
    pub max_inflight_pixels: u64,
    /// A /segment request is answered within this (504 otherwise), its body's arrival excluded,
    /// and an inference batch running longer marks the server not ready.
    #[arg(long, env = "PICIE_REQUEST_TIMEOUT_SECS", default_value_t = HttpLimits::default().request_timeout.as_secs())]
    pub request_timeout_secs: u64,
    /// Refuse /segment with 429 (and Retry-After) when the inference queue's expected wait,
    /// images ahead times the measured time per image, is longer than this.
    #[arg(long, env = "PICIE_MAX_QUEUE_MS", default_value_t = defaults::MAX_QUEUE_MS)]
    pub max_queue_ms: u64,
    /// A request's headers must arrive within this, and an idle connection is closed after it.
    #[arg(long, env = "PICIE_HEADER_TIMEOUT_SECS", default_value_t = defaults::HEADER_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_secs: u64,
    /// A /segment body must arrive within this (408 otherwise); an upload may take longer but
    /// not pause longer.
    #[arg(long, env = "PICIE_BODY_TIMEOUT_SECS", default_value_t = HttpLimits::default().body_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout_secs: u64,
    /// Connections open at once; more wait to be accepted.
    #[arg(long, env = "PICIE_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Bytes of /segment bodies held in memory at once, across all requests; past it, 429.
    #[arg(long, env = "PICIE_MAX_BODY_BYTES_IN_FLIGHT", default_value_t = HttpLimits::default().max_body_bytes_in_flight)]
    pub max_body_bytes_in_flight: usize,
    /// Parts of one multipart body, and bytes of one part's headers.
    #[arg(long, env = "PICIE_MAX_PARTS", default_value_t = HttpLimits::default().max_parts)]
    pub max_parts: usize,
    #[arg(long, env = "PICIE_MAX_PART_HEADER_BYTES", default_value_t = HttpLimits::default().max_part_header_bytes)]
    pub max_part_header_bytes: usize,
    /// Open job event streams (/jobs/{id}/events) in all, and per job; past them, 429.
    #[arg(long, env = "PICIE_MAX_WATCHERS", default_value_t = defaults::MAX_WATCHERS)]
    pub max_watchers: usize,
    #[arg(long, env = "PICIE_MAX_WATCHERS_PER_JOB", default_value_t = defaults::MAX_WATCHERS_PER_JOB)]
    pub max_watchers_per_job: usize,
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
    /// horizontal flip), edges (scores guided-filtered with the image), crf (labels refined by
    /// the dense CRF) or best (flip and CRF).
    #[arg(long, env = "PICIE_QUALITY", default_value_t = DEFAULT_QUALITY)]
    pub quality: Quality,
    /// Dense CRF settings as key=value pairs over the defaults: iterations (10), temperature (2),
    /// smooth_sxy (1), smooth_weight (3), appearance_sxy (67), appearance_srgb (3),
    /// appearance_weight (4), max_pixels (1048576: larger images are refined scaled down).
    #[arg(long, env = "PICIE_CRF", default_value = "")]
    pub crf: CrfConfig,
    /// Guided-filter settings (quality `edges`) as key=value pairs over the defaults: radius (32,
    /// in pixels of the network's input), eps (0.0001), temperature (10: the class probabilities,
    /// softmax of 10 times the similarities, are filtered; 0 filters the similarities), scale
    /// (0.5: the filter works at half the network's input size, its coefficients scaled up),
    /// max_output_pixels (1048576: larger images' labels are scaled up).
    #[arg(long, env = "PICIE_GUIDED", default_value = "")]
    pub guided: GuidedConfig,
    /// Images per inference batch when requests queue up.
    #[arg(long, env = "PICIE_MAX_BATCH", default_value_t = defaults::MAX_BATCH)]
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
    /// Changes arrive by PostgreSQL LISTEN/NOTIFY; this is the longest an idle worker waits
    /// before looking for queued jobs anyway (and five times it, a replica for a newly
    /// activated model), in case a notice was lost with its connection.
    #[arg(long, env = "PICIE_SYNC_INTERVAL_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..))]
    pub sync_interval_ms: u64,
}

/// The quality of a `/segment` request that names none: the guided filter of the class scores.
/// On both drives left out of training it scores above `fast` in pixel accuracy, mIoU and
/// boundary F (+4.0 / +1.5 / +10.7 and +4.6 / +0.9 / +4.1, 5 seeds), level with the dense CRF,
/// at 1.7-1.9x `fast`'s time where the CRF costs 15x (docs/quality.md, docs/benchmarks.md).
pub const DEFAULT_QUALITY: Quality = Quality::Edges;

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
    /// The defaults of the command line, for `models_dir` and `data_dir`, on loopback at a free port.
    pub fn new(models_dir: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        let h = HttpLimits::default();
        let d = DatasetLimits::default();
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            data_dir: data_dir.into(),
            models_dir: models_dir.into(),
            model: None,
            api_key: None,
            protect_reads: false,
            device: DeviceChoice::Auto,
            threads: None,
            max_body_bytes: h.max_body_bytes,
            max_upload_bytes: h.max_upload_bytes,
            max_image_pixels: defaults::MAX_IMAGE_PIXELS,
            max_concurrent: defaults::MAX_CONCURRENT,
            max_inflight_pixels: defaults::MAX_INFLIGHT_PIXELS,
            request_timeout_secs: h.request_timeout.as_secs(),
            max_queue_ms: defaults::MAX_QUEUE_MS,
            header_timeout_secs: defaults::HEADER_TIMEOUT_SECS,
            body_timeout_secs: h.body_timeout.as_secs(),
            max_connections: defaults::MAX_CONNECTIONS,
            max_body_bytes_in_flight: h.max_body_bytes_in_flight,
            max_parts: h.max_parts,
            max_part_header_bytes: h.max_part_header_bytes,
            max_watchers: defaults::MAX_WATCHERS,
            max_watchers_per_job: defaults::MAX_WATCHERS_PER_JOB,
            max_batch: defaults::MAX_BATCH,
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

    /// What the HTTP layer itself limits.
    pub fn http_limits(&self) -> HttpLimits {
        HttpLimits {
            max_body_bytes: self.max_body_bytes,
            max_upload_bytes: self.max_upload_bytes,
            body_timeout: Duration::from_secs(self.body_timeout_secs),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            max_body_bytes_in_flight: self.max_body_bytes_in_flight,
            max_parts: self.max_parts,
            max_part_header_bytes: self.max_part_header_bytes,
        }
    }
}
