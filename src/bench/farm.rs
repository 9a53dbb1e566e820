//! A farm in this process for the benchmarks that run jobs: a server on loopback and one worker
//! with its own data, on a given images dir and backend.

use std::path::Path;
use std::time::Duration;
use vmfarm_server::access::{Reach, Submitter};
use vmfarm_server::auth::Caller;
use vmfarm_server::config::ServerConfig;
use vmfarm_server::state::AppState;
use vmfarm_worker::config::{BackendChoice, WorkerConfig};

pub struct Farm {
    pub state: AppState,
    /// The server's address (`http://127.0.0.1:PORT`).
    pub url: String,
    daemon: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The server's and the worker's data; removed with the farm (after the worker stopped).
    _dir: tempfile::TempDir,
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.daemon.abort();
    }
}

impl Farm {
    /// Starts a server (its config changed by `server`) and a worker on `images_dir` booting
    /// with `backend` (its config changed by `worker`).
    pub async fn start(
        images_dir: &Path,
        backend: BackendChoice,
        server: impl FnOnce(&mut ServerConfig),
        worker: impl FnOnce(&mut WorkerConfig),
    ) -> anyhow::Result<Farm> {
        let dir = tempfile::tempdir()?;
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse()?,
            data_dir: dir.path().to_owned(),
            ..ServerConfig::default()
        };
        server(&mut config);
        let running = vmfarm_server::serve::start(config).await?;
        let state = running.state.clone();
        let url = format!("http://{}", running.addr);
        let token = vmfarm_server::admin::create_token(
            &state.db,
            &state.config,
            &Caller::Worker {
                name: "bench".into(),
            },
        )
        .await?;
        let mut config = WorkerConfig {
            server: vmfarm_worker::config::ServerUrls::one(url.clone()),
            name: "bench".into(),
            token,
            images_dir: images_dir.to_owned(),
            work_dir: dir.path().join("work"),
            ..WorkerConfig::default()
        };
        config.backend.default = backend;
        config.network.cache_dir = dir.path().join("proxy-cache");
        config.warm_start.dir = dir.path().join("templates");
        config.caches.dir = dir.path().join("caches");
        // Guests boot cold unless a benchmark asks for warm starts (a first job would otherwise
        // have a snapshot made beside the measured ones).
        config.warm_start.enabled = false;
        worker(&mut config);
        let daemon = tokio::spawn(vmfarm_worker::worker::daemon::run(config));
        Ok(Farm {
            state,
            url,
            daemon,
            _dir: dir,
        })
    }

    /// Waits until the worker has a template snapshot (a `stamp.json` in its folder).
    pub async fn template_made(&self, limit: Duration) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let templates = self._dir.path().join("templates");
        loop {
            let made = std::fs::read_dir(&templates)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.path().join("stamp.json").exists());
            if made {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < limit,
                "the worker made no template snapshot within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Submits `manifest`; its job's id.
    pub async fn submit(&self, manifest: &str) -> anyhow::Result<i64> {
        let submitted = vmfarm_server::jobs::submit(
            &self.state,
            manifest,
            None,
            &Submitter::uncapped(vmfarm_server::users::ADMIN),
        )
        .await?;
        Ok(submitted.jobs[0].id.parse()?)
    }

    /// Waits until job `id` has ended; its view.
    pub async fn ended(&self, id: i64) -> anyhow::Result<vmfarm_proto::api::JobView> {
        loop {
            let job = vmfarm_server::job_views::get(&self.state.db, id, &Reach::All).await?;
            if job.state.is_terminal() {
                return Ok(job);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
