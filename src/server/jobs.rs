//! Background jobs (re-clustering, fine-tuning): queued, run one at a time on a blocking
//! thread, persisted as JSON after every state change so they survive a restart. A job that was
//! running when the server stopped comes back `interrupted`; queued jobs are queued again.
//!
//! An interrupted or failed job is run again only when asked ([`JobManager::resume`],
//! `POST /jobs/{id}/resume`), never by itself at startup: a job that brings the process down
//! (out of memory, a native crash) would otherwise bring it down again on every restart. A
//! resumed fine-tuning job continues from its last epoch checkpoint; a re-clustering job starts
//! over.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use utoipa::ToSchema;

/// What job bookkeeping can fail with; the HTTP layer maps it (`server::error`).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job `{0}` not found")]
    NotFound(String),
    #[error("job `{id}` has already ended ({state})")]
    Ended { id: String, state: &'static str },
    #[error("job `{id}` is {state}; only interrupted or failed jobs can be resumed")]
    NotResumable { id: String, state: &'static str },
    #[error(transparent)]
    Storage(#[from] anyhow::Error),
    /// The shared database failed.
    #[error(transparent)]
    Shared(#[from] super::shared::SharedError),
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Shared(e.into())
    }
}

pub type JobResult<T> = Result<T, JobError>;

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
        #[schema(pattern = "^ds-[0-9a-f]{12}$")]
        dataset: String,
        #[schema(minimum = 2, maximum = 255)]
        k: usize,
        #[serde(default)]
        seed: Option<u64>,
        /// Name of the new model version (default `recluster-<job id>`).
        #[serde(default)]
        #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")]
        name: Option<String>,
    },
    /// Fine-tune the active model's embedder with PiCIE on a dataset; writes a new model version
    /// whose centroids are re-clustered on the dataset.
    Finetune {
        #[schema(pattern = "^ds-[0-9a-f]{12}$")]
        dataset: String,
        /// Clusters of the training head (default 27).
        #[serde(default)]
        #[schema(minimum = 2, maximum = 255)]
        k: Option<usize>,
        /// Over-clustering head (default 100).
        #[serde(default)]
        #[schema(minimum = 3, maximum = 1000)]
        k2: Option<usize>,
        /// Default 1.
        #[serde(default)]
        #[schema(minimum = 1, maximum = 100)]
        epochs: Option<usize>,
        /// Default 3e-4.
        #[serde(default)]
        #[schema(exclusive_minimum = 0.0, exclusive_maximum = 1.0)]
        lr: Option<f64>,
        #[serde(default)]
        seed: Option<u64>,
        /// Height of the training frames, a multiple of 32 (default 320); square frames
        /// unless `width` is given.
        #[serde(default)]
        #[schema(minimum = 32, maximum = 2048, multiple_of = 32)]
        size: Option<usize>,
        /// Width of the training frames, a multiple of 32 (default: `size`).
        #[serde(default)]
        #[schema(minimum = 32, maximum = 2048, multiple_of = 32)]
        width: Option<usize>,
        /// Backbone layers up to this stride stay frozen: 0, 4, 8, 16 or 32 (default 16, the
        /// setting the shipped model was trained with: it kept the ImageNet features of a few
        /// hundred images and trained fastest).
        #[serde(default)]
        freeze_stride: Option<usize>,
        /// Images per step (default 8).
        #[serde(default)]
        #[schema(minimum = 1, maximum = 64)]
        batch: Option<usize>,
        /// K of the new model's centroids (default: the source model's K).
        #[serde(default)]
        #[schema(minimum = 2, maximum = 255)]
        package_k: Option<usize>,
        /// Name of the new model version (default `finetune-<job id>`).
        #[serde(default)]
        #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")]
        name: Option<String>,
        /// Self-training epochs after the PiCIE epochs (default 0: none): the embedder learns
        /// the CRF-refined, confident labels of the PiCIE result, its centroids held fixed.
        #[serde(default)]
        #[schema(minimum = 0, maximum = 100)]
        self_train_epochs: Option<usize>,
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

/// The self-training stage of a fine-tuning job, if it asks for one.
pub fn finetune_self_train(spec: &JobSpec) -> Option<crate::train::selftrain::SelfTrainConfig> {
    let JobSpec::Finetune { self_train_epochs: Some(epochs), .. } = spec else { return None };
    (*epochs > 0).then(|| crate::train::selftrain::SelfTrainConfig { epochs: *epochs, ..Default::default() })
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
        // Fine-tuning starts from the package's embedder: its laterals are already set.
        fpn_init: crate::train::fpn_init::FpnInit::Random,
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
    /// How many times the job was resumed after it was interrupted or failed.
    #[serde(default)]
    pub resumed: u32,
    /// Scaled out: the worker (`--instance-id`) that runs or ran the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

impl Job {
    /// A new queued job with a fresh id.
    pub fn new(spec: JobSpec, source_model: String) -> Self {
        Self {
            id: format!("job-{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff),
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
            resumed: 0,
            worker: None,
        }
    }

    /// Back to `queued` for `POST /jobs/{id}/resume`: only an interrupted or failed job, its
    /// outcome cleared and the resumption counted.
    pub fn requeue(&mut self) -> JobResult<()> {
        if !matches!(self.state, JobState::Interrupted | JobState::Failed) {
            return Err(JobError::NotResumable { id: self.id.clone(), state: self.state.as_str() });
        }
        self.state = JobState::Queued;
        self.stage = "queued".into();
        self.progress = 0.0;
        self.finished_at = None;
        self.result = None;
        self.error = None;
        self.resumed += 1;
        Ok(())
    }

    /// The job's end: succeeded with the runner's result, canceled, or failed with its error.
    pub fn finish(&mut self, outcome: anyhow::Result<serde_json::Value>, canceled: bool) {
        self.finished_at = Some(crate::package::now_rfc3339());
        match outcome {
            Ok(result) => {
                self.state = JobState::Succeeded;
                self.stage = "done".into();
                self.progress = 1.0;
                self.result = Some(result);
            }
            Err(_) if canceled => {
                self.state = JobState::Canceled;
                self.stage = "canceled".into();
            }
            Err(e) => {
                self.state = JobState::Failed;
                self.stage = "failed".into();
                self.error = Some(format!("{e:#}"));
            }
        }
    }
}

/// Lets a running job report progress and see a cancel request.
#[derive(Clone)]
pub struct JobContext {
    pub id: String,
    sink: ProgressSink,
    cancel: Arc<AtomicBool>,
}

/// Where a job's progress goes.
#[derive(Clone)]
enum ProgressSink {
    /// Embedded: into the manager's table at once, into the job's file every 2 s.
    Manager { manager: Arc<JobManagerInner>, last_persist: Arc<Mutex<Instant>> },
    /// Scaled out: the latest (stage, progress), written to the database with each heartbeat.
    Latest(Arc<Mutex<(String, f64)>>),
}

impl JobContext {
    /// A context whose progress the caller reads from `latest` (scaled-out workers).
    pub fn with_latest(id: String, cancel: Arc<AtomicBool>, latest: Arc<Mutex<(String, f64)>>) -> Self {
        Self { id, sink: ProgressSink::Latest(latest), cancel }
    }

    pub fn canceled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    pub fn progress(&self, stage: &str, progress: f64) {
        let progress = progress.clamp(0.0, 1.0);
        match &self.sink {
            ProgressSink::Latest(latest) => *latest.lock().expect("progress lock") = (stage.to_string(), progress),
            ProgressSink::Manager { manager, last_persist } => {
                let persist = {
                    let mut last = last_persist.lock().expect("persist lock");
                    let due = last.elapsed() > Duration::from_secs(2);
                    if due {
                        *last = Instant::now();
                    }
                    due
                };
                manager.update(&self.id, persist, |j| {
                    j.stage = stage.to_string();
                    j.progress = progress;
                });
            }
        }
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
    pub fn open(data_dir: &Path, runner: Runner) -> JobResult<Self> {
        let dir = data_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        let mut jobs = BTreeMap::new();
        for e in std::fs::read_dir(&dir).map_err(|e| anyhow::anyhow!("reading {}: {e}", dir.display()))?.flatten() {
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
                        j.stage = "interrupted".into();
                        j.error = Some(format!("the server stopped while this job was running; POST /jobs/{}/resume runs it again", j.id));
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
        let job = Job::new(spec, source_model);
        let id = job.id.clone();
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

    pub fn get(&self, id: &str) -> JobResult<Job> {
        self.inner.jobs.lock().expect("jobs lock").get(id).cloned().ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    /// Queues an interrupted or failed job again, as it was submitted (same id, spec and source
    /// model). A fine-tuning job continues from its last epoch checkpoint, kept until the job
    /// succeeds; a re-clustering job starts over. Any other state is refused.
    pub fn resume(&self, id: &str) -> JobResult<Job> {
        let job = {
            let mut jobs = self.inner.jobs.lock().expect("jobs lock");
            let j = jobs.get_mut(id).ok_or_else(|| JobError::NotFound(id.to_string()))?;
            // Checked and changed under one lock: two resumes cannot queue the job twice.
            j.requeue()?;
            j.clone()
        };
        self.inner.persist(&job);
        let _ = self.inner.events.send(job.clone());
        tracing::info!(job = id, resumed = job.resumed, "job resumed");
        self.enqueue(id.to_string());
        Ok(job)
    }

    /// Cancels a queued job at once, a running one at its next check (within one step).
    pub fn cancel(&self, id: &str) -> JobResult<Job> {
        let job = self.get(id)?;
        if job.state.is_terminal() {
            return Err(JobError::Ended { id: id.to_string(), state: job.state.as_str() });
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

    /// The job now and after every change, until it ends (or the receiver is dropped).
    pub fn watch(&self, id: &str) -> JobResult<mpsc::Receiver<Job>> {
        // Subscribe before reading the snapshot so no change falls between them.
        let mut updates = self.subscribe();
        let job = self.get(id)?;
        let (jobs, id) = (self.clone(), id.to_string());
        let (tx, rx) = mpsc::channel::<Job>(16);
        tokio::spawn(async move {
            let done = job.state.is_terminal();
            if tx.send(job).await.is_err() || done {
                return;
            }
            loop {
                let next = match updates.recv().await {
                    Ok(j) if j.id == id => j,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => match jobs.get(&id) {
                        Ok(j) => j,
                        Err(_) => return,
                    },
                    Err(_) => return,
                };
                let done = next.state.is_terminal();
                if tx.send(next).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(rx)
    }

    pub fn counts_by_state(&self) -> Vec<(JobState, usize)> {
        let jobs = self.inner.jobs.lock().expect("jobs lock");
        JobState::ALL.iter().map(|s| (*s, jobs.values().filter(|j| j.state == *s).count())).collect()
    }
}

/// Runs the job body; a panic becomes the job's error, not the process's end.
pub fn run_caught(runner: &Runner, job: &Job, ctx: &JobContext) -> anyhow::Result<serde_json::Value> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner(job, ctx))).unwrap_or_else(|_| Err(anyhow::anyhow!("the job panicked")))
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
    let ctx = JobContext {
        id: id.to_string(),
        sink: ProgressSink::Manager { manager: inner.clone(), last_persist: Arc::new(Mutex::new(Instant::now())) },
        cancel: cancel.clone(),
    };
    let outcome = run_caught(runner, &job, &ctx);
    inner.update(id, true, |j| j.finish(outcome, cancel.load(Ordering::Relaxed)));
    inner.cancels.lock().expect("cancel lock").remove(id);
}

/// The jobs the API serves: run in this process (embedded), or kept in the shared database
/// and run by whichever worker claims them (scaled out).
#[derive(Clone)]
pub enum Jobs {
    Embedded(JobManager),
    Shared(Arc<super::shared::jobs::SharedJobs>),
}

impl Jobs {
    pub async fn submit(&self, spec: JobSpec, source_model: String) -> JobResult<Job> {
        match self {
            Jobs::Embedded(m) => Ok(m.submit(spec, source_model)),
            Jobs::Shared(s) => s.submit(spec, source_model).await,
        }
    }

    pub async fn list(&self) -> JobResult<Vec<Job>> {
        match self {
            Jobs::Embedded(m) => Ok(m.list()),
            Jobs::Shared(s) => s.list().await,
        }
    }

    pub async fn get(&self, id: &str) -> JobResult<Job> {
        match self {
            Jobs::Embedded(m) => m.get(id),
            Jobs::Shared(s) => s.get(id).await,
        }
    }

    pub async fn cancel(&self, id: &str) -> JobResult<Job> {
        match self {
            Jobs::Embedded(m) => m.cancel(id),
            Jobs::Shared(s) => s.cancel(id).await,
        }
    }

    pub async fn resume(&self, id: &str) -> JobResult<Job> {
        match self {
            Jobs::Embedded(m) => m.resume(id),
            Jobs::Shared(s) => s.resume(id).await,
        }
    }

    pub async fn counts_by_state(&self) -> JobResult<Vec<(JobState, usize)>> {
        match self {
            Jobs::Embedded(m) => Ok(m.counts_by_state()),
            Jobs::Shared(s) => s.counts_by_state().await,
        }
    }

    /// The job now and after every change, until it ends.
    pub async fn watch(&self, id: &str) -> JobResult<mpsc::Receiver<Job>> {
        match self {
            Jobs::Embedded(m) => m.watch(id),
            Jobs::Shared(s) => s.watch(id).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn spec() -> JobSpec {
        JobSpec::Recluster { dataset: "ds-1".into(), k: 3, seed: None, name: None }
    }

    async fn wait_end(m: &JobManager, id: &str) -> Job {
        for _ in 0..500 {
            let j = m.get(id).unwrap();
            if j.state.is_terminal() {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("job {id} did not end");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_interrupted_and_failed_jobs_resume() {
        let data = tempfile::tempdir().unwrap();
        // Fails its first run, succeeds afterwards.
        let runs = Arc::new(AtomicUsize::new(0));
        let runner: Runner = {
            let runs = runs.clone();
            Arc::new(move |_, _| {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    anyhow::bail!("first run fails")
                }
                Ok(serde_json::json!({"ok": true}))
            })
        };
        let m = JobManager::open(data.path(), runner.clone()).unwrap();
        let job = m.submit(spec(), "default".into());
        let failed = wait_end(&m, &job.id).await;
        assert_eq!(failed.state, JobState::Failed);
        let queued = m.resume(&job.id).unwrap();
        assert_eq!((queued.state, queued.resumed, queued.error.as_deref()), (JobState::Queued, 1, None));
        let done = wait_end(&m, &job.id).await;
        assert_eq!((done.state, done.resumed), (JobState::Succeeded, 1));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert!(matches!(m.resume(&job.id), Err(JobError::NotResumable { state: "succeeded", .. })));
        assert!(matches!(m.resume("job-nope"), Err(JobError::NotFound(_))));

        // A job "running" when the process died comes back interrupted and is not rerun until
        // resumed; the resumption is persisted.
        let mut crashed = done.clone();
        crashed.id = "job-crashed".into();
        crashed.state = JobState::Running;
        crashed.resumed = 0;
        std::fs::write(data.path().join("jobs/job-crashed.json"), serde_json::to_vec(&crashed).unwrap()).unwrap();
        drop(m);
        let m = JobManager::open(data.path(), runner).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let j = m.get("job-crashed").unwrap();
        assert_eq!(j.state, JobState::Interrupted);
        assert!(j.error.unwrap().contains("/jobs/job-crashed/resume"));
        assert_eq!(runs.load(Ordering::SeqCst), 2, "not rerun by itself");
        m.resume("job-crashed").unwrap();
        assert!(matches!(m.resume("job-crashed"), Err(JobError::NotResumable { .. })), "queued or running: no second resume");
        let done = wait_end(&m, "job-crashed").await;
        assert_eq!((done.state, done.resumed), (JobState::Succeeded, 1));
        // The file is written just after the state changes in memory (up to 10 s: a loaded
        // 2-core machine took over a second here).
        let stored = || -> Job { serde_json::from_slice(&std::fs::read(data.path().join("jobs/job-crashed.json")).unwrap()).unwrap() };
        for _ in 0..1000 {
            if stored().state == JobState::Succeeded {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!((stored().state, stored().resumed), (JobState::Succeeded, 1));

        // Canceled jobs stay canceled.
        let never: Runner = Arc::new(|_, ctx| {
            while !ctx.canceled() {
                std::thread::sleep(Duration::from_millis(5));
            }
            anyhow::bail!("canceled")
        });
        let other = tempfile::tempdir().unwrap();
        let m = JobManager::open(other.path(), never).unwrap();
        let a = m.submit(spec(), "default".into());
        let b = m.submit(spec(), "default".into());
        m.cancel(&b.id).unwrap();
        m.cancel(&a.id).unwrap();
        assert_eq!(wait_end(&m, &a.id).await.state, JobState::Canceled);
        for id in [&a.id, &b.id] {
            assert!(matches!(m.resume(id), Err(JobError::NotResumable { state: "canceled", .. })));
        }
    }
}
