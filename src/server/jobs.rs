//! Background jobs (re-clustering, later fine-tuning): queued, run one at a time on a blocking
//! thread, persisted as JSON after every state change so they survive a restart. A job that was
//! running when the server stopped comes back `interrupted`; queued jobs are queued again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};

#[derive(Serialize, Deserialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
    Interrupted,
}

impl JobState {
    pub const ALL: [JobState; 6] =
        [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Canceled, JobState::Interrupted];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
            JobState::Interrupted => "interrupted",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// What a job does.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum JobSpec {
    /// Cluster a dataset's pixels with the active model's embedder into `k` classes; writes a new model version.
    Recluster {
        dataset: String,
        k: usize,
        #[serde(default)]
        seed: Option<u64>,
        /// Name of the new model version (default `recluster-<job id>`).
        #[serde(default)]
        name: Option<String>,
    },
    /// Fine-tune the active model's embedder with PiCIE on a dataset; writes a new model version
    /// whose centroids are re-clustered on the dataset.
    Finetune {
        dataset: String,
        /// Clusters of the training head (default 27).
        #[serde(default)]
        k: Option<usize>,
        /// Over-clustering head (default 100).
        #[serde(default)]
        k2: Option<usize>,
        /// Default 1.
        #[serde(default)]
        epochs: Option<usize>,
        /// Default 3e-4.
        #[serde(default)]
        lr: Option<f64>,
        #[serde(default)]
        seed: Option<u64>,
        /// Height of the training frames, a multiple of 32 (default 320); square frames
        /// unless `width` is given.
        #[serde(default)]
        size: Option<usize>,
        /// Width of the training frames, a multiple of 32 (default: `size`).
        #[serde(default)]
        width: Option<usize>,
        /// Backbone layers up to this stride stay frozen: 0, 4, 8, 16 or 32 (default 16, the
        /// setting the shipped model was trained with: it kept the ImageNet features of a few
        /// hundred images and trained fastest).
        #[serde(default)]
        freeze_stride: Option<usize>,
        /// Images per step (default 8).
        #[serde(default)]
        batch: Option<usize>,
        /// K of the new model's centroids (default: the source model's K).
        #[serde(default)]
        package_k: Option<usize>,
        /// Name of the new model version (default `finetune-<job id>`).
        #[serde(default)]
        name: Option<String>,
    },
}

impl JobSpec {
    pub fn dataset(&self) -> &str {
        match self {
            JobSpec::Recluster { dataset, .. } | JobSpec::Finetune { dataset, .. } => dataset,
        }
    }

    pub fn model_name(&self) -> Option<&str> {
        match self {
            JobSpec::Recluster { name, .. } | JobSpec::Finetune { name, .. } => name.as_deref(),
        }
    }
}

/// The training settings of a fine-tuning job, defaults filled in.
pub fn finetune_config(spec: &JobSpec) -> Option<crate::train::picie::TrainConfig> {
    let JobSpec::Finetune { k, k2, epochs, lr, seed, size, width, freeze_stride, batch, .. } = spec else { return None };
    let d = crate::train::picie::TrainConfig::default();
    Some(crate::train::picie::TrainConfig {
        k: k.unwrap_or(d.k),
        k2: k2.unwrap_or(d.k2),
        epochs: epochs.unwrap_or(1),
        lr: lr.unwrap_or(d.lr),
        seed: seed.unwrap_or(0),
        size: size.unwrap_or(d.size),
        width: *width,
        batch: batch.unwrap_or(d.batch),
        freeze_stride: freeze_stride.unwrap_or(d.freeze_stride),
        ..d
    })
}

#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    /// What the job is doing now, e.g. `embedding`.
    pub stage: String,
    /// 0 to 1.
    pub progress: f64,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    #[schema(value_type = Object)]
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    /// The model the job started from.
    pub source_model: String,
}

/// Lets a running job report progress and see a cancel request.
#[derive(Clone)]
pub struct JobContext {
    pub id: String,
    manager: Arc<JobManagerInner>,
    cancel: Arc<AtomicBool>,
    last_persist: Arc<Mutex<Instant>>,
}

impl JobContext {
    pub fn canceled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    pub fn progress(&self, stage: &str, progress: f64) {
        let persist = {
            let mut last = self.last_persist.lock().expect("persist lock");
            let due = last.elapsed() > Duration::from_secs(2);
            if due {
                *last = Instant::now();
            }
            due
        };
        self.manager.update(&self.id, persist, |j| {
            j.stage = stage.to_string();
            j.progress = progress.clamp(0.0, 1.0);
        });
    }
}

/// The work a job runs; given the spec, returns the result JSON.
pub type Runner = Arc<dyn Fn(&Job, &JobContext) -> anyhow::Result<serde_json::Value> + Send + Sync>;

struct JobManagerInner {
    dir: PathBuf,
    jobs: Mutex<BTreeMap<String, Job>>,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    events: broadcast::Sender<Job>,
}

impl JobManagerInner {
    fn persist(&self, job: &Job) {
        let path = self.dir.join(format!("{}.json", job.id));
        if let Err(e) = serde_json::to_vec_pretty(job).map_err(anyhow::Error::from).and_then(|b| crate::util::write_atomic(&path, &b)) {
            tracing::error!(job = %job.id, error = %e, "cannot persist job");
        }
    }

    fn update(&self, id: &str, persist: bool, f: impl FnOnce(&mut Job)) -> Option<Job> {
        let job = {
            let mut jobs = self.jobs.lock().expect("jobs lock");
            let j = jobs.get_mut(id)?;
            f(j);
            j.clone()
        };
        if persist {
            self.persist(&job);
        }
        let _ = self.events.send(job.clone());
        Some(job)
    }
}

#[derive(Clone)]
pub struct JobManager {
    inner: Arc<JobManagerInner>,
    queue: mpsc::UnboundedSender<String>,
}

impl JobManager {
    /// Loads the jobs of a previous run and starts the runner.
    pub fn open(data_dir: &Path, runner: Runner) -> anyhow::Result<Self> {
        let dir = data_dir.join("jobs");
        std::fs::create_dir_all(&dir)?;
        let mut jobs = BTreeMap::new();
        for e in std::fs::read_dir(&dir)?.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&p).map_err(anyhow::Error::from).and_then(|b| Ok(serde_json::from_slice::<Job>(&b)?)) {
                Ok(j) => {
                    jobs.insert(j.id.clone(), j);
                }
                Err(e) => tracing::warn!(file = %p.display(), error = %e, "skipping unreadable job file"),
            }
        }
        let (events, _) = broadcast::channel(256);
        let inner = Arc::new(JobManagerInner { dir, jobs: Mutex::new(jobs), cancels: Default::default(), events });
        let (queue, mut rx) = mpsc::unbounded_channel::<String>();
        let mgr = Self { inner: inner.clone(), queue };

        let mut requeue = vec![];
        let ids: Vec<String> = inner.jobs.lock().expect("jobs lock").keys().cloned().collect();
        for id in ids {
            let state = inner.jobs.lock().expect("jobs lock")[&id].state;
            match state {
                JobState::Running => {
                    inner.update(&id, true, |j| {
                        j.state = JobState::Interrupted;
                        j.finished_at = Some(crate::package::now_rfc3339());
                        j.error = Some("the server stopped while this job was running".into());
                    });
                }
                JobState::Queued => requeue.push(id),
                _ => {}
            }
        }

        let run_inner = inner.clone();
        tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                let inner = run_inner.clone();
                let runner = runner.clone();
                let _ = tokio::task::spawn_blocking(move || run_one(&inner, &runner, &id)).await;
            }
        });
        for id in requeue {
            mgr.enqueue(id);
        }
        Ok(mgr)
    }

    fn enqueue(&self, id: String) {
        self.inner.cancels.lock().expect("cancel lock").insert(id.clone(), Arc::new(AtomicBool::new(false)));
        let _ = self.queue.send(id);
    }

    pub fn submit(&self, spec: JobSpec, source_model: String) -> Job {
        let id = format!("job-{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff);
        let job = Job {
            id: id.clone(),
            spec,
            state: JobState::Queued,
            stage: "queued".into(),
            progress: 0.0,
            created_at: crate::package::now_rfc3339(),
            started_at: None,
            finished_at: None,
            result: None,
            error: None,
            source_model,
        };
        self.inner.jobs.lock().expect("jobs lock").insert(id.clone(), job.clone());
        self.inner.persist(&job);
        self.enqueue(id);
        job
    }

    pub fn list(&self) -> Vec<Job> {
        let mut v: Vec<Job> = self.inner.jobs.lock().expect("jobs lock").values().cloned().collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        v
    }

    pub fn get(&self, id: &str) -> ApiResult<Job> {
        self.inner.jobs.lock().expect("jobs lock").get(id).cloned().ok_or_else(|| ApiError::NotFound(format!("job `{id}` not found")))
    }

    /// Cancels a queued job at once, a running one at its next check (within one step).
    pub fn cancel(&self, id: &str) -> ApiResult<Job> {
        let job = self.get(id)?;
        if job.state.is_terminal() {
            return Err(ApiError::Conflict(format!("job `{id}` has already ended ({})", job.state.as_str())));
        }
        if let Some(flag) = self.inner.cancels.lock().expect("cancel lock").get(id) {
            flag.store(true, Ordering::Relaxed);
        }
        if job.state == JobState::Queued {
            return Ok(self
                .inner
                .update(id, true, |j| {
                    j.state = JobState::Canceled;
                    j.stage = "canceled".into();
                    j.finished_at = Some(crate::package::now_rfc3339());
                })
                .expect("job exists"));
        }
        self.get(id)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Job> {
        self.inner.events.subscribe()
    }

    pub fn counts_by_state(&self) -> Vec<(JobState, usize)> {
        let jobs = self.inner.jobs.lock().expect("jobs lock");
        JobState::ALL.iter().map(|s| (*s, jobs.values().filter(|j| j.state == *s).count())).collect()
    }
}

fn run_one(inner: &Arc<JobManagerInner>, runner: &Runner, id: &str) {
    let cancel = inner.cancels.lock().expect("cancel lock").get(id).cloned().unwrap_or_default();
    let Some(job) = inner.update(id, true, |j| {
        if j.state == JobState::Queued {
            j.state = JobState::Running;
            j.stage = "starting".into();
            j.started_at = Some(crate::package::now_rfc3339());
        }
    }) else {
        return;
    };
    if job.state != JobState::Running {
        return; // canceled while queued
    }
    let ctx = JobContext { id: id.to_string(), manager: inner.clone(), cancel: cancel.clone(), last_persist: Arc::new(Mutex::new(Instant::now())) };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner(&job, &ctx)))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the job panicked")));
    inner.update(id, true, |j| {
        j.finished_at = Some(crate::package::now_rfc3339());
        match outcome {
            Ok(result) => {
                j.state = JobState::Succeeded;
                j.stage = "done".into();
                j.progress = 1.0;
                j.result = Some(result);
            }
            Err(_) if cancel.load(Ordering::Relaxed) => {
                j.state = JobState::Canceled;
                j.stage = "canceled".into();
            }
            Err(e) => {
                j.state = JobState::Failed;
                j.stage = "failed".into();
                j.error = Some(format!("{e:#}"));
            }
        }
    });
    inner.cancels.lock().expect("cancel lock").remove(id);
}
