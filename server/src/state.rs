//! The application state every handler gets: cheap to clone, shared handles inside.

use crate::auth::TokenCache;
use crate::config::ServerConfig;
use crate::db::Db;
use crate::metrics::Metrics;
use crate::store::ArtifactStore;
use std::sync::Arc;
use tokio::sync::{Notify, broadcast};

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub config: Arc<ServerConfig>,
    pub store: ArtifactStore,
    pub tokens: Arc<TokenCache>,
    pub events: Events,
    pub metrics: Arc<Metrics>,
}

/// In-process wake-ups: new work for long-polling workers, new log or state for SSE readers.
/// Readers also poll, so replicas sharing a PostgreSQL queue see each other's writes.
#[derive(Clone)]
pub struct Events {
    pub work: Arc<Notify>,
    pub job: broadcast::Sender<i64>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            work: Arc::new(Notify::new()),
            job: broadcast::channel(1024).0,
        }
    }
}

impl Events {
    pub fn job_changed(&self, job_id: i64) {
        // No receiver is fine: nobody is watching that job.
        let _ = self.job.send(job_id);
    }
}
