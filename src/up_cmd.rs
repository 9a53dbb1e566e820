//! `vmfarm up`: the server and a local worker in one process, on the embedded defaults —
//! SQLite in the data dir, images in `<data dir>/images` (tiny and debian-12 built on first use).

use crate::cli::UpArgs;
use anyhow::Context;
use std::path::{Path, PathBuf};
use vmfarm_server::auth::Caller;
use vmfarm_server::config::ServerConfig;
use vmfarm_worker::config::WorkerConfig;
use vmfarm_worker::images::{self, BuildOptions, Recipe};

/// The images `up` makes sure of, smallest first so that the first jobs can start early.
const IMAGES: [&str; 2] = ["tiny", "debian-12"];

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
        let images_dir = images_dir.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = build_missing(&images_dir) {
                eprintln!(
                    "vmfarm: {e:#}\n  (the server keeps running; jobs for a missing image wait in the queue)"
                );
            }
        });
    }
    let base = match &args.worker_config {
        Some(path) => WorkerConfig::load(path)?,
        None => WorkerConfig::default(),
    };
    let mut worker = WorkerConfig {
        server: format!("http://{}", running.addr),
        name: "local".into(),
        token: worker_token,
        images_dir,
        work_dir: data.join("work"),
        ..base
    };
    worker.network.cache_dir = data.join("proxy-cache");
    let worker = tokio::spawn(vmfarm_worker::worker::daemon::run(worker));
    tokio::select! {
        served = running.wait() => served.context("the server stopped")?,
        ran = worker => ran.context("the worker stopped")?.context("the worker stopped")?,
    }
    Ok(())
}

/// Builds the default images that are not there yet, saying what it does.
fn build_missing(images_dir: &Path) -> anyhow::Result<()> {
    let recipes = PathBuf::from(
        std::env::var_os("VMFARM_RECIPES").unwrap_or_else(|| "configs/images".into()),
    );
    let agent = match std::env::var_os("VMFARM_AGENT") {
        Some(agent) => PathBuf::from(agent),
        None => images::default_agent()?,
    };
    let options = BuildOptions {
        images_dir: images_dir.to_owned(),
        cache_dir: images::cache_dir(),
        agent,
    };
    for name in IMAGES {
        let recipe = Recipe::load(name, &recipes)?;
        eprintln!("image {name}: making sure it is built (the first time takes minutes)");
        let report = images::build(&recipe, &options, &mut |step| {
            eprintln!("image {name}: {step}")
        })
        .with_context(|| format!("building image {name}"))?;
        let state = if report.reused { "ready" } else { "built" };
        eprintln!("image {name}: {state} ({})", report.image.manifest.version);
    }
    Ok(())
}
