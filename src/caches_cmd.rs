//! `vmfarm caches list|drop`: the cache disks a worker keeps, read from its `[caches] dir`.

use crate::cli::{CachesArgs, CachesCommand};
use anyhow::Context as _;
use std::time::SystemTime;
use vmfarm_proto::units::format_duration;
use vmfarm_worker::config::{CachesConfig, WorkerConfig};
use vmfarm_worker::worker::caches::{CacheKey, Caches};

pub fn run(command: CachesCommand) -> anyhow::Result<()> {
    match command {
        CachesCommand::List(args) => {
            let caches = open(&args)?;
            let now = SystemTime::now();
            println!("CACHE\tVERSION\tSIZE\tON DISK\tLAST USED");
            for cache in caches.list()? {
                let ago = now.duration_since(cache.used).unwrap_or_default();
                println!(
                    "{}\t{}\t{}\t{:.1} MiB\t{} ago",
                    cache.key,
                    cache.version,
                    cache.size,
                    cache.bytes as f64 / (1u64 << 20) as f64,
                    format_duration(std::time::Duration::from_secs(ago.as_secs()))
                );
            }
            Ok(())
        }
        CachesCommand::Drop { where_, cache } => {
            let key: CacheKey = cache.parse().map_err(anyhow::Error::msg)?;
            if open(&where_)?.drop_cache(&key)? {
                println!("dropped {key}");
                Ok(())
            } else {
                anyhow::bail!("there is no cache {key}: `vmfarm caches list` shows them")
            }
        }
    }
}

/// The store the arguments name: `--dir`, else the worker config's `[caches] dir`.
fn open(args: &CachesArgs) -> anyhow::Result<std::sync::Arc<Caches>> {
    let config = match &args.dir {
        Some(dir) => CachesConfig {
            dir: dir.clone(),
            ..CachesConfig::default()
        },
        None => match crate::config_file::chosen(args.config.as_deref(), "worker.toml") {
            Some(path) => WorkerConfig::load(&path)?.caches,
            None => CachesConfig::default(),
        },
    };
    Caches::open(&config).with_context(|| format!("opening the caches in {}", config.dir.display()))
}
