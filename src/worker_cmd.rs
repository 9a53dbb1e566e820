//! `vmfarm worker`: the worker daemon with its config file and the flags laid over it.

use crate::cli::WorkerArgs;
use vmfarm_worker::config::{ServerUrls, WorkerConfig};

pub fn load_config(args: &WorkerArgs) -> anyhow::Result<WorkerConfig> {
    let mut config = match crate::config_file::chosen(args.config.as_deref(), "worker.toml") {
        Some(path) => WorkerConfig::load(&path)?,
        None => WorkerConfig::default(),
    };
    if let Some(server) = &args.server {
        config.server = ServerUrls::one(server.clone());
    }
    if let Some(token) = &args.token {
        config.token = token.clone();
    }
    if let Some(dir) = &args.images_dir {
        config.images_dir = dir.clone();
    }
    if let Some(token) = &args.metrics_token {
        config.metrics.token = token.clone();
    }
    Ok(config)
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    vmfarm_worker::worker::daemon::run(load_config(&args)?).await
}
