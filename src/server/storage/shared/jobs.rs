//! Jobs in the shared database, run by whichever worker claims them.
//!
//! A worker claims the oldest queued job with `FOR UPDATE SKIP LOCKED` (two workers never take
//! the same one) and holds it by a lease: every heartbeat (a second, or a third of the lease if
//! that is shorter) pushes `lease_expires` on, writes the job's stage and progress, and reads
//! whether a cancel was asked for. A job whose worker died (SIGKILL, a lost node) is claimed
//! again once its lease has run out; a fine-tuning job continues from its last epoch's
//! checkpoint in the object store, a re-clustering job starts over. After `max_attempts` such
//! expiries the job is marked interrupted instead, so a job that kills its worker cannot kill
//! every worker in turn; `POST /jobs/{id}/resume` runs it again.
//!
//! Workers wait for new jobs on the database's notifications, and look again every sync
//! interval for leases that ran out.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::broadcast;

use super::Shared;
use crate::server::core::jobs::{Job, JobReport, JobState, Standing};
use crate::server::core::Page;
use crate::server::storage::blocking;
use crate::server::storage::local::DataDir;
use crate::server::storage::{Claimed, Error, JobStore, Lease, Result};

pub struct SharedJobs {
    shared: Arc<Shared>,
    /// This process's data folder: the cache of the segmentations' results it serves.
    cache: Arc<DataDir>,
}

impl SharedJobs {
    pub fn new(shared: Arc<Shared>, cache: Arc<DataDir>) -> Self {
        Self { shared, cache }
    }

    fn me(&self) -> &str {
        &self.shared.settings.instance
    }

    fn lease_secs(&self) -> f64 {
        self.shared.settings.lease.as_secs_f64()
    }
}

fn parse(doc: sqlx::types::Json<serde_json::Value>) -> Result<Job> {
    serde_json::from_value(doc.0).map_err(|e| Error::Corrupt(format!("a stored job does not parse: {e}")))
}

fn json(job: &Job) -> sqlx::types::Json<serde_json::Value> {
    sqlx::types::Json(serde_json::to_value(job).unwrap_or_default())
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("job `{id}` not found"))
}

/// The job, its row locked until the transaction ends.
async fn lock(tx: &mut Transaction<'static, Postgres>, id: &str) -> Result<Job> {
    let doc: Option<sqlx::types::Json<serde_json::Value>> =
        sqlx::query_scalar("SELECT doc FROM jobs WHERE id = $1 FOR UPDATE").bind(id).fetch_optional(&mut **tx).await?;
    parse(doc.ok_or_else(|| not_found(id))?)
}

async fn write(tx: &mut Transaction<'static, Postgres>, job: &Job) -> Result<()> {
    sqlx::query("UPDATE jobs SET state = $2, doc = $3 WHERE id = $1")
        .bind(&job.id)
        .bind(job.state.as_str())
        .bind(json(job))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Writes a job that no worker holds any more (ended, or interrupted).
async fn release(tx: &mut Transaction<'static, Postgres>, job: &Job) -> Result<()> {
    sqlx::query("UPDATE jobs SET state = $2, doc = $3, lease_owner = NULL, lease_expires = NULL WHERE id = $1")
        .bind(&job.id)
        .bind(job.state.as_str())
        .bind(json(job))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl SharedJobs {
    /// Takes the oldest job that is queued or whose worker's lease ran out, if there is one.
    pub async fn try_claim(&self) -> Result<Option<Job>> {
        loop {
            let mut tx = self.shared.db.begin().await?;
            let row = sqlx::query(
                "SELECT doc, state, cancel_requested, attempts, lease_owner FROM jobs \
                 WHERE state = 'queued' OR (state = 'running' AND lease_expires < now()) \
                 ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
            )
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                tx.rollback().await?;
                return Ok(None);
            };
            let mut job = parse(row.try_get("doc")?)?;
            let state: String = row.try_get("state")?;
            let attempts: i32 = row.try_get("attempts")?;
            if state == "running" {
                let owner: Option<String> = row.try_get("lease_owner")?;
                if row.try_get::<bool, _>("cancel_requested")? {
                    job.finish(Err("canceled".into()), true);
                    release(&mut tx, &job).await?;
                    tx.commit().await?;
                    continue;
                }
                if attempts >= self.shared.settings.max_attempts {
                    job.interrupt(format!(
                        "its worker stopped {attempts} times while running it (last: {}); POST /jobs/{}/resume runs it again",
                        owner.as_deref().unwrap_or("unknown"),
                        job.id
                    ));
                    release(&mut tx, &job).await?;
                    tx.commit().await?;
                    tracing::warn!(job = %job.id, attempts, "job interrupted: its workers kept stopping");
                    continue;
                }
                tracing::warn!(job = %job.id, previous = owner.as_deref().unwrap_or("unknown"), "claiming a job whose worker's lease ran out");
            }
            job.start();
            job.worker = Some(self.me().to_string());
            sqlx::query(
                "UPDATE jobs SET state = $2, doc = $3, lease_owner = $4, lease_expires = now() + make_interval(secs => $5), \
                 attempts = attempts + 1 WHERE id = $1",
            )
            .bind(&job.id)
            .bind(job.state.as_str())
            .bind(json(&job))
            .bind(self.me())
            .bind(self.lease_secs())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(job = %job.id, attempt = attempts + 1, "job claimed");
            return Ok(Some(job));
        }
    }

    /// Holds a claimed job: a heartbeat task keeps its lease and writes its progress.
    fn lease(&self, job: &Job) -> SharedLease {
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(Mutex::new(Standing::at(job.stage, job.progress)));
        let beat = (self.shared.settings.lease / 3).min(Duration::from_secs(1));
        let heartbeat = {
            let (db, id, me, lease) = (self.shared.db.clone(), job.id.clone(), self.me().to_string(), self.lease_secs());
            let (stop, lost, latest) = (stop.clone(), lost.clone(), latest.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(beat).await;
                    let s = *latest.lock().expect("progress lock");
                    let stage = serde_json::to_value(s.stage).unwrap_or_default();
                    let r: std::result::Result<Option<bool>, _> = sqlx::query_scalar(
                        "UPDATE jobs SET lease_expires = now() + make_interval(secs => $3), \
                         doc = doc || jsonb_build_object('stage', $4::jsonb, 'epoch', $5::bigint, 'epochs', $6::bigint, 'progress', $7::float8) \
                         WHERE id = $1 AND lease_owner = $2 AND state = 'running' RETURNING cancel_requested",
                    )
                    .bind(&id)
                    .bind(&me)
                    .bind(lease)
                    .bind(stage)
                    .bind(s.epoch.map(|e| e as i64))
                    .bind(s.epochs.map(|e| e as i64))
                    .bind(s.progress)
                    .fetch_optional(&db)
                    .await;
                    match r {
                        Ok(Some(true)) => stop.store(true, Ordering::Relaxed),
                        Ok(Some(false)) => {}
                        Ok(None) => {
                            tracing::warn!(job = %id, "lost the job's lease: stopping it");
                            lost.store(true, Ordering::Relaxed);
                            stop.store(true, Ordering::Relaxed);
                            return;
                        }
                        // The lease outlives a short outage; a long one loses it (above).
                        Err(e) => tracing::warn!(job = %id, error = %e, "heartbeat failed"),
                    }
                }
            })
        };
        SharedLease { shared: self.shared.clone(), id: job.id.clone(), stop, lost, latest, heartbeat }
    }
}

#[async_trait]
impl JobStore for SharedJobs {
    /// Stores the job, its dataset's row locked (shared) meanwhile: a dataset being deleted
    /// is not used by a new job.
    async fn submit(&self, job: Job) -> Result<Job> {
        let mut tx = self.shared.db.begin().await?;
        let dataset: Option<String> =
            sqlx::query_scalar("SELECT id FROM datasets WHERE id = $1 FOR SHARE").bind(job.spec.dataset()).fetch_optional(&mut *tx).await?;
        if dataset.is_none() {
            tx.rollback().await?;
            return Err(Error::NotFound(format!("dataset `{}` not found", job.spec.dataset())));
        }
        sqlx::query("INSERT INTO jobs (id, created_at, state, doc) VALUES ($1, $2, $3, $4)")
            .bind(&job.id)
            .bind(&job.created_at)
            .bind(job.state.as_str())
            .bind(json(&job))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(job)
    }

    async fn list(&self, page: Page) -> Result<Vec<Job>> {
        let page = page.clamped();
        let rows = sqlx::query("SELECT doc FROM jobs ORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2")
            .bind(page.limit as i64)
            .bind(page.offset as i64)
            .fetch_all(&self.shared.db)
            .await?;
        rows.into_iter().map(|r| parse(r.try_get("doc")?)).collect()
    }

    async fn get(&self, id: &str) -> Result<Job> {
        let doc: Option<sqlx::types::Json<serde_json::Value>> =
            sqlx::query_scalar("SELECT doc FROM jobs WHERE id = $1").bind(id).fetch_optional(&self.shared.db).await?;
        parse(doc.ok_or_else(|| not_found(id))?)
    }

    /// Cancels a queued job at once; asks a running one's worker to stop (it sees the request
    /// at its next heartbeat and stops within one step).
    async fn cancel(&self, id: &str) -> Result<Job> {
        let mut tx = self.shared.db.begin().await?;
        let mut job = lock(&mut tx, id).await?;
        match job.state {
            s if s.is_terminal() => {
                // Let go of the row now, not when the connection is next used.
                tx.rollback().await?;
                return Err(Error::Conflict(format!("job `{id}` has already ended ({})", s.as_str())));
            }
            JobState::Queued => {
                job.finish(Err("canceled".into()), true);
                write(&mut tx, &job).await?;
            }
            _ => {
                sqlx::query("UPDATE jobs SET cancel_requested = true WHERE id = $1").bind(id).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(job)
    }

    /// Queues an interrupted or failed job again (same id, spec and source model).
    async fn resume(&self, id: &str) -> Result<Job> {
        let mut tx = self.shared.db.begin().await?;
        let mut job = lock(&mut tx, id).await?;
        if let Err(state) = job.requeue() {
            // Let go of the row now, not when the connection is next used.
            tx.rollback().await?;
            return Err(Error::Conflict(format!("job `{id}` is {}; only interrupted or failed jobs can be resumed", state.as_str())));
        }
        sqlx::query(
            "UPDATE jobs SET state = $2, doc = $3, attempts = 0, cancel_requested = false, lease_owner = NULL, lease_expires = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(job.state.as_str())
        .bind(json(&job))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(job = id, resumed = job.resumed, "job resumed");
        Ok(job)
    }

    async fn counts(&self) -> Result<Vec<(JobState, usize)>> {
        let rows = sqlx::query("SELECT state, count(*) AS n FROM jobs GROUP BY state").fetch_all(&self.shared.db).await?;
        let mut counts: Vec<(JobState, usize)> = JobState::ALL.iter().map(|s| (*s, 0)).collect();
        for r in rows {
            let (state, n): (String, i64) = (r.try_get("state")?, r.try_get("n")?);
            if let Some(c) = counts.iter_mut().find(|c| c.0.as_str() == state) {
                c.1 = n as usize;
            }
        }
        Ok(counts)
    }

    async fn uses_dataset(&self, dataset: &str) -> Result<bool> {
        Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE state IN ('queued', 'running') AND doc->'spec'->>'dataset' = $1)")
            .bind(dataset)
            .fetch_one(&self.shared.db)
            .await?)
    }

    async fn writes_model(&self, name: &str, except: Option<&str>) -> Result<bool> {
        // A job writes the name it asks for, else `<type>-<id without "job-">` (JobSpec::model_name).
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE state IN ('queued', 'running') AND id <> coalesce($2, '') \
             AND doc->'spec'->>'type' <> 'segment' \
             AND coalesce(doc->'spec'->>'name', (doc->'spec'->>'type') || '-' || substr(id, 5)) = $1)",
        )
        .bind(name)
        .bind(except)
        .fetch_one(&self.shared.db)
        .await?)
    }

    fn changes(&self) -> broadcast::Receiver<String> {
        self.shared.notices.jobs.subscribe()
    }

    /// Claims the next job; between tries it waits for a job notice or the sync interval (a
    /// lease that runs out sends no notice).
    async fn claim(&self) -> Result<Claimed> {
        let mut notices = self.shared.notices.jobs.subscribe();
        loop {
            match self.try_claim().await {
                Ok(Some(job)) => {
                    let lease = self.lease(&job);
                    return Ok(Claimed { job, lease: Box::new(lease) });
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot claim a job"),
            }
            let _ = tokio::time::timeout(self.shared.settings.sync_interval, notices.recv()).await;
        }
    }

    async fn save_checkpoint(&self, job: &str, dir: &Path) -> Result<()> {
        self.shared.blobs.put_dir(&format!("checkpoints/{job}"), dir).await.map(|_| ())
    }

    async fn fetch_checkpoint(&self, job: &str, dir: &Path) -> Result<usize> {
        self.shared.blobs.get_dir(&format!("checkpoints/{job}"), dir).await
    }

    async fn drop_checkpoint(&self, job: &str) -> Result<()> {
        self.shared.blobs.delete_prefix(&format!("checkpoints/{job}")).await.map(|_| ())
    }

    /// Uploads the results under `results/<job id>/`, then keeps the folder as this process's
    /// cached copy.
    async fn save_results(&self, job: &str, dir: &Path) -> Result<()> {
        let prefix = format!("results/{job}");
        // A job saved again (resumed after it had saved) replaces the whole set.
        self.shared.blobs.delete_prefix(&prefix).await?;
        self.shared.blobs.put_dir(&prefix, dir).await?;
        let (cache, job, dir) = (self.cache.clone(), job.to_string(), dir.to_path_buf());
        blocking("caching a job's results", move || cache.keep_results(&job, &dir).map(|_| ())).await
    }

    /// The cached copy, else the results downloaded into a leftover-named folder and renamed
    /// into the cache.
    async fn local_results(&self, job: &str) -> Result<PathBuf> {
        if let Some(dir) = self.cache.results_of(job) {
            return Ok(dir);
        }
        let partial = self.cache.results().join(format!(".{job}.partial-{}-{}", std::process::id(), crate::util::unique()));
        let fetched = self.shared.blobs.get_dir(&format!("results/{job}"), &partial).await;
        if !matches!(fetched, Ok(n) if n > 0) {
            let _ = tokio::fs::remove_dir_all(&partial).await;
            fetched?;
            return Err(Error::NotFound(format!("job `{job}` has no results")));
        }
        let (cache, job) = (self.cache.clone(), job.to_string());
        blocking("caching a job's results", move || {
            // Another request may have fetched them meanwhile: either copy is whole.
            if let Some(dir) = cache.results_of(&job) {
                let _ = std::fs::remove_dir_all(&partial);
                return Ok(dir);
            }
            cache.keep_results(&job, &partial)
        })
        .await
    }
}

struct SharedLease {
    shared: Arc<Shared>,
    id: String,
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    latest: Arc<Mutex<Standing>>,
    heartbeat: tokio::task::JoinHandle<()>,
}

#[async_trait]
impl Lease for SharedLease {
    fn report(&self, standing: Standing) {
        *self.latest.lock().expect("progress lock") = standing;
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Writes the job's end unless the lease was lost meanwhile (then another worker owns it).
    async fn finish(self: Box<Self>, outcome: std::result::Result<JobReport, String>, canceled: bool) -> Result<()> {
        self.heartbeat.abort();
        if self.lost.load(Ordering::Relaxed) {
            return Ok(());
        }
        let me = &self.shared.settings.instance;
        let mut tx = self.shared.db.begin().await?;
        let row = sqlx::query("SELECT doc, cancel_requested FROM jobs WHERE id = $1 AND lease_owner = $2 AND state = 'running' FOR UPDATE")
            .bind(&self.id)
            .bind(me)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            tracing::warn!(job = %self.id, "the job's lease was taken over before it ended; its result is dropped");
            return Ok(());
        };
        let mut job = parse(row.try_get("doc")?)?;
        job.stand(*self.latest.lock().expect("progress lock"));
        job.finish(outcome, canceled || row.try_get::<bool, _>("cancel_requested")?);
        release(&mut tx, &job).await?;
        tx.commit().await?;
        tracing::info!(job = %self.id, state = job.state.as_str(), "job ended");
        Ok(())
    }
}

impl Drop for SharedLease {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}
