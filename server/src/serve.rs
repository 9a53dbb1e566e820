//! Starting the server: data dir, database, tokens, the lease reaper, the listener.

use crate::app::app;
use crate::auth::bootstrap;
use crate::config::ServerConfig;
use crate::db::{Db, DbError};
use crate::secrets::SecretKey;
use crate::state::AppState;
use crate::store::ArtifactStore;
use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the data dir {0}")]
    DataDir(std::path::PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::OpenError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretError),
    #[error("cannot set up the tokens")]
    Tokens(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error(transparent)]
    Schedules(#[from] crate::schedules::ScheduleError),
    #[error("the server stopped")]
    Serve(#[source] std::io::Error),
}

/// A server that is listening; `addr` is where (the port is real even when 0 was asked).
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    pub admin_token_created: bool,
    server: tokio::task::JoinHandle<Result<(), std::io::Error>>,
    reaper: tokio::task::JoinHandle<()>,
    /// The scheduler, the webhook deliverer and the retention sweep.
    background: [tokio::task::JoinHandle<()>; 3],
}

impl Running {
    /// Serves until the listener fails.
    pub async fn wait(self) -> Result<(), ServeError> {
        let result = self.server.await;
        self.reaper.abort();
        for task in &self.background {
            task.abort();
        }
        match result {
            Ok(r) => r.map_err(ServeError::Serve),
            Err(e) => Err(ServeError::Serve(std::io::Error::other(e))),
        }
    }
}

/// Opens everything and starts listening.
pub async fn start(config: ServerConfig) -> Result<Running, ServeError> {
    crate::files::private_dir(&config.data_dir)
        .map_err(|e| ServeError::DataDir(config.data_dir.clone(), e))?;
    let store = ArtifactStore::open(&config).await?;
    crate::commit_manifests::clear_scratch(&crate::pushes::scratch_dir(&config));
    let db = Db::open(&config.database_url(), config.sqlite_synchronous).await?;
    let secret_key = SecretKey::load(&config.data_dir, true)?;
    let sealed = crate::secrets::seal_stored(&db, &secret_key).await?;
    if sealed > 0 {
        tracing::info!(
            sealed,
            "sealed the secrets stored before secrets were encrypted"
        );
    }
    let created = bootstrap(&db, &config).await.map_err(ServeError::Tokens)?;
    if created.is_some() {
        tracing::info!(
            path = %config.data_dir.join("admin-token").display(),
            "no tokens were configured: wrote a new admin token"
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServeError::Listen(config.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServeError::Listen(config.listen, e))?;
    let state = AppState::new(db, config, store, secret_key);
    if state.db.backend() == crate::db::Backend::Postgres {
        crate::replicas::start(state.db.clone(), state.config.database_url(), &state.events);
    }
    let reaper = tokio::spawn(crate::leases::reaper::run(state.clone()));
    crate::schedules::load_config(&state).await?;
    let background = [
        tokio::spawn(crate::schedules::run(state.clone())),
        tokio::spawn(crate::outbox::run(state.clone())),
        tokio::spawn(crate::retention::run(
            state.db.clone(),
            state.store.clone(),
            state.config.retention.clone(),
        )),
    ];
    let router = app(state.clone());
    // The peer's address counts failed logins per address.
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, service).await });
    tracing::info!(%addr, "vmfarm server listening");
    Ok(Running {
        addr,
        state,
        admin_token_created: created.is_some(),
        server,
        reaper,
        background,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn test_the_data_is_the_servers_own_and_half_uploads_are_gone_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let leftover = data.join("artifacts/.uploads/0123abcd");
        std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
        std::fs::write(&leftover, b"half an upload").unwrap();
        let hour_ago = std::time::SystemTime::now() - crate::store::STALE_UPLOAD;
        std::fs::File::options()
            .write(true)
            .open(&leftover)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        // Another replica's upload under way (the folder may be shared): kept.
        let under_way = data.join("artifacts/.uploads/4567cdef");
        std::fs::write(&under_way, b"being received").unwrap();
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: data.clone(),
            ..ServerConfig::default()
        };
        let running = start(config).await.unwrap();
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("artifacts")), 0o700);
        for file in ["vmfarm.db", "vmfarm.db-wal", "admin-token"] {
            assert_eq!(mode(&data.join(file)), 0o600, "{file}");
        }
        assert!(!leftover.exists());
        assert!(under_way.exists());
        drop(running);
    }
}
