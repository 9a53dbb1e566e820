//! `vmfarm up`: the server and a local worker in one process, on the embedded defaults —
//! SQLite in the data dir, images in `<data dir>/images` (tiny and debian-12 built on first use,
//! any other recipe's image when a queued job names it: [`crate::up_images`]).

use crate::cli::UpArgs;
use anyhow::Context;
use vmfarm_server::auth::Caller;
use vmfarm_server::config::ServerConfig;
use vmfarm_worker::config::{ServerUrls, WorkerConfig};

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let mut config = match &args.server_config {
        Some(path) => ServerConfig::load(path)?,
        None => ServerConfig::default(),
    };
    let data = args.data.clone().unwrap_or_else(|| config.data_dir.clone());
    let data = std::path::absolute(&data).context("resolving the data dir")?;
    config.data_dir = data.clone();
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    config
        .network
        .allow_private
        .extend(args.allow_private.iter().cloned());
    let running = vmfarm_server::serve::start(config).await?;
    let worker_token = vmfarm_server::admin::create_token(
        &running.state.db,
        &running.state.config,
        &Caller::Worker {
            name: "local".into(),
        },
    )
    .await?;
    let images_dir = data.join("images");
    println!("vmfarm is up: http://{}", running.addr);
    println!("  admin token: {}", data.join("admin-token").display());
    println!("  images dir:  {}", images_dir.display());

    if !args.no_build {
        tokio::spawn(crate::up_images::run(
            running.state.clone(),
            images_dir.clone(),
        ));
    }
    let base = match &args.worker_config {
        Some(path) => WorkerConfig::load(path)?,
        None => WorkerConfig::default(),
    };
    let mut worker = WorkerConfig {
        server: ServerUrls::one(format!("http://{}", running.addr)),
        name: "local".into(),
        token: worker_token,
        images_dir,
        work_dir: data.join("work"),
        ..base
    };
    worker.network.cache_dir = data.join("proxy-cache");
    worker.warm_start.dir = data.join("templates");
    worker.caches.dir = data.join("caches");
    let worker = tokio::spawn(vmfarm_worker::worker::daemon::run(worker));
    tokio::select! {
        served = running.wait() => served.context("the server stopped")?,
        ran = worker => ran.context("the worker stopped")?.context("the worker stopped")?,
    }
    Ok(())
}
