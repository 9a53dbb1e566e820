//! The application state every handler gets: cheap to clone, shared handles inside.

use crate::config::ServerConfig;
use crate::db::Db;
use crate::metrics::Metrics;
use crate::secrets::SecretKey;
use crate::store::ArtifactStore;
use std::sync::Arc;
use tokio::sync::{Notify, broadcast};

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
        }
    }
}

/// In-process wake-ups: new work for long-polling workers, new log or state for SSE readers.
/// Readers also poll, so replicas sharing a PostgreSQL queue see each other's writes.
#[derive(Clone)]
pub struct Events {
    pub work: Arc<Notify>,
    pub job: broadcast::Sender<i64>,
    /// A job ended with webhooks to deliver.
    pub triggers: Arc<Notify>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            work: Arc::new(Notify::new()),
            job: broadcast::channel(1024).0,
            triggers: Arc::new(Notify::new()),
        }
    }
}

impl Events {
    pub fn job_changed(&self, job_id: i64) {
        // No receiver is fine: nobody is watching that job.
        let _ = self.job.send(job_id);
    }
}
