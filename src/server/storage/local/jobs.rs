//! Jobs in the data folder: one JSON file per job under `jobs/`, written after every change of
//! state (and every few seconds of progress), so jobs survive a restart. This process runs them
//! one at a time in the order they were queued. A job that was running when the process stopped
//! comes back `interrupted`; queued jobs are queued again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};

use super::DataDir;
use crate::server::core::jobs::{Job, JobReport, JobState, Standing};
use crate::server::core::Page;
use crate::server::storage::{blocking, Claimed, Error, JobStore, Lease, Result};

/// How often a running job's progress reaches its file.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct LocalJobs {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// The data folder, for the segmentations' results.
    data: Arc<DataDir>,
    jobs: Mutex<BTreeMap<String, Job>>,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    changes: broadcast::Sender<String>,
    queue: mpsc::UnboundedSender<String>,
    next: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    /// File writes one at a time, each of the job's state at the time of writing, so the last
    /// write is the latest state.
    writes: tokio::sync::Mutex<()>,
}

impl Inner {
    fn snapshot(&self, id: &str) -> Option<Job> {
        self.jobs.lock().expect("jobs lock").get(id).cloned()
    }

    /// Changes the job in memory and tells the watchers; the file is written by [`Inner::persist`].
    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) -> Option<Job> {
        let job = {
            let mut jobs = self.jobs.lock().expect("jobs lock");
            let j = jobs.get_mut(id)?;
            f(j);
            j.clone()
        };
        let _ = self.changes.send(id.to_string());
        Some(job)
    }

    /// Writes the job's current state to its file (off the runtime, atomically).
    async fn persist(&self, id: &str) -> Result<()> {
        let _one = self.writes.lock().await;
        let Some(job) = self.snapshot(id) else { return Ok(()) };
        let path = self.dir.join(format!("{id}.json"));
        blocking("saving a job", move || {
            let bytes = serde_json::to_vec_pretty(&job).map_err(|e| Error::Internal(e.to_string()))?;
            crate::util::write_atomic(&path, &bytes).map_err(|e| Error::Internal(format!("{e:#}")))
        })
        .await
    }

    fn enqueue(&self, id: &str) {
        self.cancels.lock().expect("cancel lock").insert(id.to_string(), Arc::new(AtomicBool::new(false)));
        let _ = self.queue.send(id.to_string());
    }
}

/// Reads the job files of an earlier run (blocking).
fn read_jobs(dir: &Path) -> Result<BTreeMap<String, Job>> {
    let mut jobs = BTreeMap::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&p).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice::<Job>(&b).map_err(|e| e.to_string())) {
            Ok(j) => {
                jobs.insert(j.id.clone(), j);
            }
            Err(e) => tracing::warn!(file = %p.display(), error = %e, "skipping unreadable job file"),
        }
    }
    Ok(jobs)
}

impl LocalJobs {
    /// Loads the jobs of an earlier run: running ones become interrupted, queued ones are queued
    /// again (in the order they were created).
    pub async fn open(data: &Arc<DataDir>) -> Result<Self> {
        let dir = data.jobs();
        let jobs = {
            let dir = dir.clone();
            blocking("reading jobs", move || read_jobs(&dir)).await?
        };
        let (changes, _) = broadcast::channel(1024);
        let (queue, next) = mpsc::unbounded_channel();
        let store = Self {
            inner: Arc::new(Inner {
                dir,
                data: data.clone(),
                jobs: Mutex::new(jobs),
                cancels: Default::default(),
                changes,
                queue,
                next: tokio::sync::Mutex::new(next),
                writes: tokio::sync::Mutex::new(()),
            }),
        };
        let mut queued: Vec<Job> =
            store.inner.jobs.lock().expect("jobs lock").values().filter(|j| j.state == JobState::Queued).cloned().collect();
        queued.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        let running: Vec<String> =
            store.inner.jobs.lock().expect("jobs lock").values().filter(|j| j.state == JobState::Running).map(|j| j.id.clone()).collect();
        for id in running {
            store.inner.update(&id, |j| {
                j.interrupt(format!("the server stopped while this job was running; POST /jobs/{id}/resume runs it again"))
            });
            store.inner.persist(&id).await?;
        }
        for j in queued {
            store.inner.enqueue(&j.id);
        }
        Ok(store)
    }
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("job `{id}` not found"))
}

#[async_trait]
impl JobStore for LocalJobs {
    async fn submit(&self, job: Job) -> Result<Job> {
        let id = job.id.clone();
        self.inner.jobs.lock().expect("jobs lock").insert(id.clone(), job.clone());
        if let Err(e) = self.inner.persist(&id).await {
            self.inner.jobs.lock().expect("jobs lock").remove(&id);
            return Err(e);
        }
        self.inner.enqueue(&id);
        let _ = self.inner.changes.send(id);
        Ok(job)
    }

    async fn list(&self, page: Page) -> Result<Vec<Job>> {
        let mut all: Vec<Job> = self.inner.jobs.lock().expect("jobs lock").values().cloned().collect();
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(page.slice(&all))
    }

    async fn get(&self, id: &str) -> Result<Job> {
        self.inner.snapshot(id).ok_or_else(|| not_found(id))
    }

    async fn cancel(&self, id: &str) -> Result<Job> {
        let job = self.get(id).await?;
        if job.state.is_terminal() {
            return Err(Error::Conflict(format!("job `{id}` has already ended ({})", job.state.as_str())));
        }
        if let Some(flag) = self.inner.cancels.lock().expect("cancel lock").get(id) {
            flag.store(true, Ordering::Relaxed);
        }
        // A queued job ends now; a running one at its next step (its lease sees the flag).
        let job = self
            .inner
            .update(id, |j| {
                if j.state == JobState::Queued {
                    j.finish(Err("canceled".into()), true);
                }
            })
            .ok_or_else(|| not_found(id))?;
        self.inner.persist(id).await?;
        Ok(job)
    }

    async fn resume(&self, id: &str) -> Result<Job> {
        let mut refused = None;
        // Checked and changed under one lock: two resumes cannot queue the job twice.
        let job = self.inner.update(id, |j| refused = j.requeue().err()).ok_or_else(|| not_found(id))?;
        if let Some(state) = refused {
            return Err(Error::Conflict(format!("job `{id}` is {}; only interrupted or failed jobs can be resumed", state.as_str())));
        }
        self.inner.persist(id).await?;
        tracing::info!(job = id, resumed = job.resumed, "job resumed");
        self.inner.enqueue(id);
        Ok(job)
    }

    async fn counts(&self) -> Result<Vec<(JobState, usize)>> {
        let jobs = self.inner.jobs.lock().expect("jobs lock");
        Ok(JobState::ALL.iter().map(|s| (*s, jobs.values().filter(|j| j.state == *s).count())).collect())
    }

    async fn uses_dataset(&self, dataset: &str) -> Result<bool> {
        Ok(self.inner.jobs.lock().expect("jobs lock").values().any(|j| !j.state.is_terminal() && j.spec.dataset() == dataset))
    }

    async fn writes_model(&self, name: &str, except: Option<&str>) -> Result<bool> {
        let jobs = self.inner.jobs.lock().expect("jobs lock");
        Ok(jobs
            .values()
            .any(|j| !j.state.is_terminal() && j.spec.writes_model() && Some(j.id.as_str()) != except && j.model_name() == name))
    }

    fn changes(&self) -> broadcast::Receiver<String> {
        self.inner.changes.subscribe()
    }

    async fn claim(&self) -> Result<Claimed> {
        let mut next = self.inner.next.lock().await;
        loop {
            let Some(id) = next.recv().await else { return Err(Error::Internal("the job queue has closed".into())) };
            let Some(job) = self.inner.update(&id, |j| {
                if j.state == JobState::Queued {
                    j.start();
                }
            }) else {
                continue;
            };
            if job.state != JobState::Running {
                continue; // canceled while queued
            }
            self.inner.persist(&id).await?;
            let cancel = self.inner.cancels.lock().expect("cancel lock").get(&id).cloned().unwrap_or_default();
            let (done, ended) = tokio::sync::oneshot::channel::<()>();
            // Progress reaches the file every few seconds while the job runs.
            let inner = self.inner.clone();
            let ticking = id.clone();
            tokio::spawn(async move {
                let mut ended = ended;
                loop {
                    tokio::select! {
                        _ = &mut ended => return,
                        _ = tokio::time::sleep(PROGRESS_EVERY) => {
                            if let Err(e) = inner.persist(&ticking).await {
                                tracing::warn!(job = %ticking, error = %e, "cannot save the job's progress");
                            }
                        }
                    }
                }
            });
            let lease = LocalLease { inner: self.inner.clone(), id, cancel, _ticker: done };
            return Ok(Claimed { job, lease: Box::new(lease) });
        }
    }

    async fn save_checkpoint(&self, _job: &str, _dir: &Path) -> Result<()> {
        Ok(())
    }

    async fn fetch_checkpoint(&self, _job: &str, _dir: &Path) -> Result<usize> {
        Ok(0)
    }

    async fn drop_checkpoint(&self, _job: &str) -> Result<()> {
        Ok(())
    }

    async fn save_results(&self, job: &str, dir: &Path) -> Result<()> {
        let (data, job, dir) = (self.inner.data.clone(), job.to_string(), dir.to_path_buf());
        blocking("keeping a job's results", move || data.keep_results(&job, &dir).map(|_| ())).await
    }

    async fn local_results(&self, job: &str) -> Result<PathBuf> {
        let (data, job) = (self.inner.data.clone(), job.to_string());
        blocking("finding a job's results", move || {
            data.results_of(&job).ok_or_else(|| Error::NotFound(format!("job `{job}` has no results")))
        })
        .await
    }
}

struct LocalLease {
    inner: Arc<Inner>,
    id: String,
    cancel: Arc<AtomicBool>,
    /// Dropping it ends the progress writer.
    _ticker: tokio::sync::oneshot::Sender<()>,
}

#[async_trait]
impl Lease for LocalLease {
    fn report(&self, standing: Standing) {
        self.inner.update(&self.id, |j| j.stand(standing));
    }

    fn stop_requested(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    async fn finish(self: Box<Self>, outcome: std::result::Result<JobReport, String>, canceled: bool) -> Result<()> {
        let canceled = canceled || self.cancel.load(Ordering::Relaxed);
        self.inner.update(&self.id, |j| j.finish(outcome, canceled));
        let saved = self.inner.persist(&self.id).await;
        self.inner.cancels.lock().expect("cancel lock").remove(&self.id);
        saved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::core::jobs::JobSpec;

    fn spec() -> JobSpec {
        JobSpec::Recluster { dataset: "ds-1".into(), k: Some(3), k_min: None, k_max: None, seed: None, over_cluster: None, name: None }
    }

    async fn store(dir: &Path) -> (LocalJobs, Arc<DataDir>) {
        let (data, _lock) = DataDir::open(dir).unwrap();
        (LocalJobs::open(&data).await.unwrap(), data)
    }

    fn stored(dir: &Path, id: &str) -> Job {
        serde_json::from_slice(&std::fs::read(dir.join("jobs").join(format!("{id}.json"))).unwrap()).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_interrupted_and_failed_jobs_resume() {
        let dir = tempfile::tempdir().unwrap();
        let (jobs, _) = store(dir.path()).await;
        let job = jobs.submit(Job::new(spec(), "default".into())).await.unwrap();
        assert_eq!(stored(dir.path(), &job.id).state, JobState::Queued, "on disk before it is answered");
        let claimed = jobs.claim().await.unwrap();
        assert_eq!((claimed.job.id.as_str(), claimed.job.state), (job.id.as_str(), JobState::Running));
        claimed.lease.finish(Err("first run fails".into()), false).await.unwrap();
        assert_eq!(jobs.get(&job.id).await.unwrap().state, JobState::Failed);
        let queued = jobs.resume(&job.id).await.unwrap();
        assert_eq!((queued.state, queued.resumed, queued.error.as_deref()), (JobState::Queued, 1, None));
        assert!(matches!(jobs.resume(&job.id).await, Err(Error::Conflict(_))), "queued: no second resume");
        let again = jobs.claim().await.unwrap();
        again.lease.finish(Ok(JobReport { model: "m".into(), k: 3, ..Default::default() }), false).await.unwrap();
        let done = jobs.get(&job.id).await.unwrap();
        assert_eq!((done.state, done.resumed), (JobState::Succeeded, 1));
        assert_eq!(stored(dir.path(), &job.id).state, JobState::Succeeded);
        assert!(matches!(jobs.resume(&job.id).await, Err(Error::Conflict(_))));
        assert!(matches!(jobs.resume("job-nope").await, Err(Error::NotFound(_))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_interrupts_running_jobs_and_queues_queued_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (running, queued) = {
            let (jobs, _) = store(dir.path()).await;
            let a = jobs.submit(Job::new(spec(), "default".into())).await.unwrap();
            let b = jobs.submit(Job::new(spec(), "default".into())).await.unwrap();
            let claimed = jobs.claim().await.unwrap();
            assert_eq!(claimed.job.id, a.id);
            // The process "dies" with `a` running: its lease is never finished.
            std::mem::forget(claimed.lease);
            (a.id, b.id)
        };
        let (jobs, _) = store(dir.path()).await;
        let j = jobs.get(&running).await.unwrap();
        assert_eq!(j.state, JobState::Interrupted);
        assert!(j.error.unwrap().contains(&format!("/jobs/{running}/resume")));
        let next = jobs.claim().await.unwrap();
        assert_eq!(next.job.id, queued, "the queued job runs, the interrupted one does not by itself");
        next.lease.finish(Ok(JobReport::default()), false).await.unwrap();
        jobs.resume(&running).await.unwrap();
        assert_eq!(jobs.claim().await.unwrap().job.id, running);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn canceling_ends_a_queued_job_at_once_and_a_running_one_at_its_next_step() {
        let dir = tempfile::tempdir().unwrap();
        let (jobs, _) = store(dir.path()).await;
        let a = jobs.submit(Job::new(spec(), "default".into())).await.unwrap();
        let b = jobs.submit(Job::new(spec(), "default".into())).await.unwrap();
        let claimed = jobs.claim().await.unwrap();
        assert_eq!(jobs.cancel(&b.id).await.unwrap().state, JobState::Canceled);
        assert!(!claimed.lease.stop_requested());
        assert_eq!(jobs.cancel(&a.id).await.unwrap().state, JobState::Running, "running until its next step");
        assert!(claimed.lease.stop_requested());
        claimed.lease.finish(Err("canceled".into()), false).await.unwrap();
        for id in [&a.id, &b.id] {
            assert_eq!(jobs.get(id).await.unwrap().state, JobState::Canceled);
            assert!(matches!(jobs.resume(id).await, Err(Error::Conflict(_))));
            assert!(matches!(jobs.cancel(id).await, Err(Error::Conflict(_))));
        }
        assert!(!jobs.uses_dataset("ds-1").await.unwrap(), "no queued or running job uses it any more");
    }
}
