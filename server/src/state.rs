//! The application state every handler gets: cheap to clone, shared handles inside.

use crate::config::ServerConfig;
use crate::db::Db;
use crate::metrics::Metrics;
use crate::secrets::SecretKey;
use crate::store::ArtifactStore;
use std::sync::Arc;
use std::sync::OnceLock;
use tokio::sync::{Notify, broadcast, mpsc};

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub config: Arc<ServerConfig>,
    pub store: ArtifactStore,
    /// Seals and opens secret values.
    pub secret_key: SecretKey,
    pub events: Events,
    pub metrics: Arc<Metrics>,
    /// When each worker was last recorded as seen, so that a busy worker's lease calls do not
    /// each cost a database write.
    pub workers_seen: Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
    /// `vmfarm ssh` sessions being opened.
    pub tunnels: Arc<crate::tunnels::Tunnels>,
    /// The caches each worker holds, from its last lease request.
    pub cache_holders: Arc<crate::leases::affinity::Holders>,
}

impl AppState {
    /// The state of a server on `db` with `config`, artifacts in `store`, secrets sealed with
    /// `secret_key`.
    pub fn new(
        db: Db,
        config: ServerConfig,
        store: ArtifactStore,
        secret_key: SecretKey,
    ) -> AppState {
        AppState {
            db,
            config: Arc::new(config),
            store,
            secret_key,
            events: Events::default(),
            metrics: Arc::default(),
            workers_seen: Arc::default(),
            tunnels: Arc::default(),
            cache_holders: Arc::default(),
        }
    }
}

/// Wake-ups: new work for long-polling workers, new log or state for SSE readers; passed on to
/// the other replicas on PostgreSQL ([`crate::replicas`]). Readers also look again every
/// second, so news a replica missed is late, not lost.
#[derive(Clone)]
pub struct Events {
    pub work: Arc<Notify>,
    pub job: broadcast::Sender<i64>,
    /// A job ended with webhooks to deliver.
    pub triggers: Arc<Notify>,
    /// Where news for the other replicas goes, once [`crate::replicas::start`] listens.
    replicas: Arc<OnceLock<mpsc::Sender<News>>>,
}

/// What the replicas tell each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum News {
    /// A job's log or state changed.
    Job(i64),
    /// A job may be leased (submitted, requeued, or a slot freed).
    Work,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            work: Arc::new(Notify::new()),
            job: broadcast::channel(1024).0,
            triggers: Arc::new(Notify::new()),
            replicas: Arc::default(),
        }
    }
}

impl Events {
    /// Job `job_id`'s log or state changed through this replica.
    pub fn job_changed(&self, job_id: i64) {
        self.job_changed_here(job_id);
        self.tell_replicas(News::Job(job_id));
    }

    /// There may be work for long-polling workers, through this replica.
    pub fn new_work(&self) {
        self.work_here();
        self.tell_replicas(News::Work);
    }

    /// Wakes this replica's readers of job `job_id`.
    pub fn job_changed_here(&self, job_id: i64) {
        // No receiver is fine: nobody is watching that job.
        let _ = self.job.send(job_id);
    }

    /// Wakes this replica's long-polling workers.
    pub fn work_here(&self) {
        self.work.notify_waiters();
    }

    pub fn send_to_replicas(&self, tx: mpsc::Sender<News>) {
        let _ = self.replicas.set(tx);
    }

    fn tell_replicas(&self, news: News) {
        if let Some(tx) = self.replicas.get() {
            // A full backlog drops the news: the other replicas' readers look again anyway.
            let _ = tx.try_send(news);
        }
    }
}
