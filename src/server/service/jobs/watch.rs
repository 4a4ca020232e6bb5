//! Following jobs (`GET /jobs/{id}/events`): one task per process reads the store's change
//! notices and, for each job someone watches, reads the job once and hands it to all of its
//! watchers. A watcher ends when its job ends or when its client goes (the stream is dropped,
//! and its place with it); there are caps per job and in all, so watchers cannot pile up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use tokio::sync::broadcast;

use super::super::error::{Error, Result};
use crate::server::core::jobs::Job;
use crate::server::storage::shared::EVERYTHING;
use crate::server::storage::JobStore;

/// Updates a watcher may fall behind by before it skips to the newest.
const BACKLOG: usize = 16;

pub struct WatchHub {
    store: Arc<dyn JobStore>,
    state: Arc<Mutex<Watched>>,
    per_job: usize,
    total: usize,
    /// The task reading the store's notices, ended with the hub.
    feed: tokio::task::AbortHandle,
}

impl Drop for WatchHub {
    fn drop(&mut self) {
        self.feed.abort();
    }
}

#[derive(Default)]
struct Watched {
    jobs: HashMap<String, (broadcast::Sender<Job>, usize)>,
    watchers: usize,
}

/// One watcher's stream state.
struct Following {
    first: Option<Job>,
    rx: broadcast::Receiver<Job>,
    done: bool,
    _place: Place,
}

/// A watcher's place, given back when its stream is dropped.
struct Place {
    state: Arc<Mutex<Watched>>,
    id: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut w = self.state.lock().expect("watch lock");
        w.watchers -= 1;
        if let Some((_, n)) = w.jobs.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                w.jobs.remove(&self.id);
            }
        }
    }
}

impl WatchHub {
    /// A hub over `store`'s notices, with at most `per_job` watchers of one job and `total` in all.
    pub fn start(store: Arc<dyn JobStore>, per_job: usize, total: usize) -> Self {
        let state = Arc::new(Mutex::new(Watched::default()));
        let mut changes = store.changes();
        let (feed_store, feed_state) = (store.clone(), Arc::downgrade(&state));
        let feed = tokio::spawn(async move {
            loop {
                let ids: Vec<String> = match changes.recv().await {
                    Ok(id) if id != EVERYTHING => vec![id],
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        let Some(state) = feed_state.upgrade() else { return };
                        let ids = state.lock().expect("watch lock").jobs.keys().cloned().collect();
                        ids
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(state) = feed_state.upgrade() else { return };
                for id in ids {
                    let sender = state.lock().expect("watch lock").jobs.get(&id).map(|(tx, _)| tx.clone());
                    let Some(sender) = sender else { continue };
                    match feed_store.get(&id).await {
                        Ok(job) => {
                            let _ = sender.send(job);
                        }
                        Err(e) => tracing::debug!(job = %id, error = %e, "cannot read a watched job"),
                    }
                }
            }
        });
        Self { store, state, per_job, total, feed: feed.abort_handle() }
    }

    /// Watchers now, in all.
    pub fn watchers(&self) -> usize {
        self.state.lock().expect("watch lock").watchers
    }

    /// The job now and after every change, until it ends or the stream is dropped.
    pub async fn watch(&self, id: &str) -> Result<impl Stream<Item = Job> + Send + 'static> {
        // Registered before the first read, so no change falls between the two.
        let (rx, place) = {
            let mut w = self.state.lock().expect("watch lock");
            let busy = |what: String| Error::Busy { message: what, retry_after: 5 };
            if w.watchers >= self.total {
                return Err(busy(format!("{} job watchers are open, the most this server keeps; retry later", self.total)));
            }
            let entry = w.jobs.entry(id.to_string()).or_insert_with(|| (broadcast::channel(BACKLOG).0, 0));
            if entry.1 >= self.per_job {
                return Err(busy(format!("job `{id}` has {} watchers, the most one job may have; retry later", self.per_job)));
            }
            entry.1 += 1;
            let rx = entry.0.subscribe();
            w.watchers += 1;
            (rx, Place { state: self.state.clone(), id: id.to_string() })
        };
        let first = self.store.get(id).await?;
        let follow = Following { first: Some(first), rx, done: false, _place: place };
        Ok(futures_util::stream::unfold(follow, |mut f| async move {
            if f.done {
                return None;
            }
            let job = match f.first.take() {
                Some(j) => j,
                None => loop {
                    match f.rx.recv().await {
                        Ok(j) => break j,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                },
            };
            f.done = job.state.is_terminal();
            Some((job, f))
        }))
    }
}
