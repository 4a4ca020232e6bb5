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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::{Postgres, Row, Transaction};

use super::Shared;
use crate::server::jobs::{run_caught, Job, JobContext, JobError, JobResult, JobSpec, JobState, Runner};

pub struct SharedJobs {
    pub shared: Arc<Shared>,
}

fn parse(doc: sqlx::types::Json<serde_json::Value>) -> JobResult<Job> {
    serde_json::from_value(doc.0).map_err(|e| JobError::Storage(anyhow::anyhow!("a stored job does not parse: {e}")))
}

fn json(job: &Job) -> sqlx::types::Json<serde_json::Value> {
    sqlx::types::Json(serde_json::to_value(job).unwrap_or_default())
}

impl SharedJobs {
    fn me(&self) -> &str {
        &self.shared.settings.instance
    }

    fn lease_secs(&self) -> f64 {
        self.shared.settings.lease.as_secs_f64()
    }

    pub async fn submit(&self, spec: JobSpec, source_model: String) -> JobResult<Job> {
        let job = Job::new(spec, source_model);
        sqlx::query("INSERT INTO jobs (id, created_at, state, doc) VALUES ($1, $2, $3, $4)")
            .bind(&job.id)
            .bind(&job.created_at)
            .bind(job.state.as_str())
            .bind(json(&job))
            .execute(&self.shared.db)
            .await?;
        Ok(job)
    }

    /// All jobs, newest first.
    pub async fn list(&self) -> JobResult<Vec<Job>> {
        let rows = sqlx::query("SELECT doc FROM jobs ORDER BY created_at DESC, id DESC").fetch_all(&self.shared.db).await?;
        rows.into_iter().map(|r| parse(r.try_get("doc")?)).collect()
    }

    pub async fn get(&self, id: &str) -> JobResult<Job> {
        let doc: Option<sqlx::types::Json<serde_json::Value>> =
            sqlx::query_scalar("SELECT doc FROM jobs WHERE id = $1").bind(id).fetch_optional(&self.shared.db).await?;
        parse(doc.ok_or_else(|| JobError::NotFound(id.to_string()))?)
    }

    /// The job, its row locked until the transaction ends.
    async fn lock(tx: &mut Transaction<'static, Postgres>, id: &str) -> JobResult<Job> {
        let doc: Option<sqlx::types::Json<serde_json::Value>> =
            sqlx::query_scalar("SELECT doc FROM jobs WHERE id = $1 FOR UPDATE").bind(id).fetch_optional(&mut **tx).await?;
        parse(doc.ok_or_else(|| JobError::NotFound(id.to_string()))?)
    }

    async fn write(tx: &mut Transaction<'static, Postgres>, job: &Job) -> JobResult<()> {
        sqlx::query("UPDATE jobs SET state = $2, doc = $3 WHERE id = $1")
            .bind(&job.id)
            .bind(job.state.as_str())
            .bind(json(job))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Writes a job that no worker holds any more (ended, or interrupted).
    async fn release(tx: &mut Transaction<'static, Postgres>, job: &Job) -> JobResult<()> {
        sqlx::query("UPDATE jobs SET state = $2, doc = $3, lease_owner = NULL, lease_expires = NULL WHERE id = $1")
            .bind(&job.id)
            .bind(job.state.as_str())
            .bind(json(job))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Cancels a queued job at once; asks a running one's worker to stop (it sees the request
    /// at its next heartbeat and stops within one step).
    pub async fn cancel(&self, id: &str) -> JobResult<Job> {
        let mut tx = self.shared.db.begin().await?;
        let mut job = Self::lock(&mut tx, id).await?;
        match job.state {
            s if s.is_terminal() => return Err(JobError::Ended { id: id.to_string(), state: s.as_str() }),
            JobState::Queued => {
                job.finish(Err(anyhow::anyhow!("canceled")), true);
                Self::write(&mut tx, &job).await?;
            }
            _ => {
                sqlx::query("UPDATE jobs SET cancel_requested = true WHERE id = $1").bind(id).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(job)
    }

    /// Queues an interrupted or failed job again (same id, spec and source model).
    pub async fn resume(&self, id: &str) -> JobResult<Job> {
        let mut tx = self.shared.db.begin().await?;
        let mut job = Self::lock(&mut tx, id).await?;
        job.requeue()?;
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

    pub async fn counts_by_state(&self) -> JobResult<Vec<(JobState, usize)>> {
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

    /// The job now and after every change seen by polling the database, until it ends.
    pub async fn watch(self: &Arc<Self>, id: &str) -> JobResult<tokio::sync::mpsc::Receiver<Job>> {
        let first = self.get(id).await?;
        let (this, id) = (self.clone(), id.to_string());
        let (tx, rx) = tokio::sync::mpsc::channel::<Job>(16);
        tokio::spawn(async move {
            let mut last = serde_json::to_value(&first).unwrap_or_default();
            let mut done = first.state.is_terminal();
            if tx.send(first).await.is_err() || done {
                return;
            }
            while !done {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Ok(job) = this.get(&id).await else { return };
                let now = serde_json::to_value(&job).unwrap_or_default();
                if now == last {
                    continue;
                }
                last = now;
                done = job.state.is_terminal();
                if tx.send(job).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// Runs this process's worker: claims one job at a time, runs it, and looks for the next;
    /// between claims it waits the sync interval.
    pub fn start_worker(self: Arc<Self>, runner: Runner) {
        tracing::info!(instance = self.me(), lease_secs = self.lease_secs(), "job worker started");
        tokio::spawn(async move {
            loop {
                match self.claim().await {
                    Ok(Some(job)) => self.run(job, &runner).await,
                    Ok(None) => tokio::time::sleep(self.shared.settings.sync_interval).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim a job");
                        tokio::time::sleep(self.shared.settings.sync_interval).await;
                    }
                }
            }
        });
    }

    /// Takes the oldest job that is queued or whose worker's lease ran out.
    pub async fn claim(&self) -> JobResult<Option<Job>> {
        loop {
            let mut tx = self.shared.db.begin().await?;
            let row = sqlx::query(
                "SELECT doc, state, cancel_requested, attempts, lease_owner FROM jobs \
                 WHERE state = 'queued' OR (state = 'running' AND lease_expires < now()) \
                 ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
            )
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let mut job = parse(row.try_get("doc")?)?;
            let state: String = row.try_get("state")?;
            let attempts: i32 = row.try_get("attempts")?;
            if state == "running" {
                let owner: Option<String> = row.try_get("lease_owner")?;
                if row.try_get::<bool, _>("cancel_requested")? {
                    job.finish(Err(anyhow::anyhow!("canceled")), true);
                    Self::write(&mut tx, &job).await?;
                    tx.commit().await?;
                    continue;
                }
                if attempts >= self.shared.settings.max_attempts {
                    job.state = JobState::Interrupted;
                    job.stage = "interrupted".into();
                    job.finished_at = Some(crate::package::now_rfc3339());
                    job.error = Some(format!(
                        "its worker stopped {attempts} times while running it (last: {}); POST /jobs/{}/resume runs it again",
                        owner.as_deref().unwrap_or("unknown"),
                        job.id
                    ));
                    Self::release(&mut tx, &job).await?;
                    tx.commit().await?;
                    tracing::warn!(job = %job.id, attempts, "job interrupted: its workers kept stopping");
                    continue;
                }
                tracing::warn!(job = %job.id, previous = owner.as_deref().unwrap_or("unknown"), "claiming a job whose worker's lease ran out");
            }
            job.state = JobState::Running;
            job.stage = "starting".into();
            job.started_at.get_or_insert_with(crate::package::now_rfc3339);
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

    /// Runs a claimed job on a blocking thread while a heartbeat keeps its lease; writes its end
    /// unless the lease was lost meanwhile (then another worker owns it).
    async fn run(&self, job: Job, runner: &Runner) {
        let cancel = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(Mutex::new((job.stage.clone(), job.progress)));
        let beat = (self.shared.settings.lease / 3).min(Duration::from_secs(1));
        let heartbeat = {
            let (db, id, me, lease) = (self.shared.db.clone(), job.id.clone(), self.me().to_string(), self.lease_secs());
            let (cancel, lost, latest) = (cancel.clone(), lost.clone(), latest.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(beat).await;
                    let (stage, progress) = latest.lock().expect("progress lock").clone();
                    let r: Result<Option<bool>, _> = sqlx::query_scalar(
                        "UPDATE jobs SET lease_expires = now() + make_interval(secs => $3), \
                         doc = doc || jsonb_build_object('stage', $4::text, 'progress', $5::float8) \
                         WHERE id = $1 AND lease_owner = $2 AND state = 'running' RETURNING cancel_requested",
                    )
                    .bind(&id)
                    .bind(&me)
                    .bind(lease)
                    .bind(stage)
                    .bind(progress)
                    .fetch_optional(&db)
                    .await;
                    match r {
                        Ok(Some(true)) => cancel.store(true, Ordering::Relaxed),
                        Ok(Some(false)) => {}
                        Ok(None) => {
                            tracing::warn!(job = %id, "lost the job's lease: stopping it");
                            lost.store(true, Ordering::Relaxed);
                            cancel.store(true, Ordering::Relaxed);
                            return;
                        }
                        // The lease outlives a short outage; a long one loses it (above).
                        Err(e) => tracing::warn!(job = %id, error = %e, "heartbeat failed"),
                    }
                }
            })
        };
        let ctx = JobContext::with_latest(job.id.clone(), cancel.clone(), latest.clone());
        let id = job.id.clone();
        let outcome = {
            let (runner, job) = (runner.clone(), job.clone());
            tokio::task::spawn_blocking(move || run_caught(&runner, &job, &ctx))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("the job's thread failed: {e}")))
        };
        heartbeat.abort();
        if lost.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.finish(&id, outcome, cancel.load(Ordering::Relaxed), &latest).await {
            // The lease runs out and another worker runs the job again.
            tracing::error!(job = %id, error = %e, "cannot record the job's end");
        }
    }

    async fn finish(
        &self,
        id: &str,
        outcome: anyhow::Result<serde_json::Value>,
        canceled: bool,
        latest: &Mutex<(String, f64)>,
    ) -> JobResult<()> {
        let mut tx = self.shared.db.begin().await?;
        let row = sqlx::query("SELECT doc, cancel_requested FROM jobs WHERE id = $1 AND lease_owner = $2 AND state = 'running' FOR UPDATE")
            .bind(id)
            .bind(self.me())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tracing::warn!(job = id, "the job's lease was taken over before it ended; its result is dropped");
            return Ok(());
        };
        let mut job = parse(row.try_get("doc")?)?;
        (job.stage, job.progress) = latest.lock().expect("progress lock").clone();
        job.finish(outcome, canceled || row.try_get::<bool, _>("cancel_requested")?);
        Self::release(&mut tx, &job).await?;
        tx.commit().await?;
        tracing::info!(job = id, state = job.state.as_str(), "job ended");
        Ok(())
    }
}
