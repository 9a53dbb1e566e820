//! The worker daemon: announce the images it has, lease jobs while slots are free, run each
//! job in its own task, and keep going whatever a job or the server does.

use super::backend_choice::{choose, probe_kvm};
use super::budget::{Budget, Share};
use super::caches::Caches;
use super::heartbeat;
use super::job::{self, Job, JobContext};
use super::metrics::WorkerMetrics;
use super::server_client::{LeaseHandle, ServerClient, ServerError};
use super::templates::Templates;
use crate::backend::Backend;
use crate::backend::jail::choose_jail;
use crate::config::JailMode;
use crate::config::{BackendChoice, WorkerConfig};
use crate::images::manifest::{InstalledImage, current};
use crate::network::{CacheStats, ProxyCache};
use anyhow::Context;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use vmfarm_proto::wire::{HeldCache, LeaseRequest, LeaseResponse, StateUpdate, WorkerImage};
use vmfarm_proto::{JobState, Manifest};

/// The version of each image in the images dir that jobs run.
fn current_images(config: &WorkerConfig) -> BTreeMap<String, InstalledImage> {
    current(&config.images_dir).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the images dir");
        BTreeMap::new()
    })
}

pub async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let name = worker_name(&config);
    anyhow::ensure!(
        !config.token.is_empty(),
        "the worker has no token: set `token` in its config or VMFARM_TOKEN"
    );
    let client =
        ServerClient::new(&config.server, &config.token).context("making the HTTP client")?;
    let backends = choose_backends(&config, &name)?;
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("creating {}", config.work_dir.display()))?;
    remove_leftovers(&config.work_dir);
    let cache = ProxyCache::open(&config.network.cache_dir, config.network.cache_max_size.0)
        .await
        .context("opening the network proxy's cache")?;
    let ca_certificates = job::trusted_authorities(&config.guest.ca_certificates)
        .context("reading guest.ca_certificates")?;

    let budget = Arc::new(Budget::new(
        config.slots.cpus,
        config.slots.memory.0 / (1024 * 1024),
    ));
    let metrics = Arc::new(WorkerMetrics::new(budget.clone(), cache.clone()));
    let templates = Arc::new(Templates::open(
        &config.warm_start.dir,
        config.warm_start.max_templates,
        budget.clone(),
    ));
    let caches = {
        let config = config.caches.clone();
        tokio::task::spawn_blocking(move || Caches::open_for_worker(&config))
            .await?
            .context("opening the cache disks' folder ([caches] dir)")?
    };
    super::metrics::serve(&config.metrics, metrics.clone()).await?;
    let default_size = (
        config.guest.default_cpus,
        config.guest.default_memory.0 / (1024 * 1024),
    );
    // Said once: the dir is looked at again every 2 s until an image is there.
    let mut said_no_images = false;
    loop {
        let images = current_images(&config);
        if images.is_empty() {
            if !said_no_images {
                tracing::warn!(dir = %config.images_dir.display(), "no images yet; build one with `vmfarm images build tiny`");
                said_no_images = true;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        said_no_images = false;
        // A slot is reserved before asking, so that no job is leased that must then wait.
        let mut share = budget.take(default_size).await;
        let held = {
            let caches = caches.clone();
            tokio::task::spawn_blocking(move || caches.held()).await?
        };
        let held = held.unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "listing the cache disks");
            Vec::new()
        });
        let request = lease_request(
            &name,
            &images,
            1 + budget.free_slots(default_size),
            cache.stats(),
            held,
        );
        let lease = match client.lease(&request).await {
            Ok(Some(lease)) => lease,
            Ok(None) => continue,
            Err(e @ ServerError::Unauthorized(_)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "leasing failed; trying again");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        // The job's time counts from here (its deadline), whatever it waits for below.
        let leased_at = tokio::time::Instant::now();
        let Some(image) = images.get(&lease.job.image).cloned() else {
            tracing::error!(job = %lease.job.id, image = %lease.job.image, "leased a job for an image this worker does not have");
            continue;
        };
        let (manifest, size) = match admit(&lease, &config, &budget) {
            Ok(admitted) => admitted,
            Err(reason) => {
                refuse(&client, &lease, reason).await;
                continue;
            }
        };
        // The lease is renewed from here on, also while the job waits for room below.
        let heartbeat = heartbeat::start(client.clone(), LeaseHandle::of(&lease), lease.ttl_ms);
        if size != default_size {
            // A bigger (or smaller) job: trade the reserved slot for its own size.
            drop(share);
            share = budget.take(size).await;
        }
        // A disk that boots by firmware runs on QEMU (with KVM where the host has it).
        let choice = match image.firmware() {
            Some(_) => BackendChoice::Qemu,
            None => config.backend_for(&lease.job.image),
        };
        let Some(backend) = backends.get(&choice).cloned() else {
            continue;
        };
        let ctx = JobContext {
            client: client.clone(),
            config: config.clone(),
            backend,
            image,
            cache: cache.clone(),
            ca_certificates: ca_certificates.clone(),
            metrics: metrics.clone(),
            templates: templates.clone(),
            caches: caches.clone(),
        };
        let job = Job {
            lease,
            manifest,
            leased_at,
            heartbeat,
        };
        spawn_job(ctx, job, share);
    }
}

/// What the worker asks the server for: a job for one of `images`, with `slots` free, naming
/// the cache disks it holds.
fn lease_request(
    name: &str,
    images: &BTreeMap<String, InstalledImage>,
    slots: u32,
    cache: CacheStats,
    caches: Vec<HeldCache>,
) -> LeaseRequest {
    LeaseRequest {
        name: name.to_owned(),
        images: images
            .values()
            .map(|i| WorkerImage {
                name: i.manifest.name.clone(),
                version: i.manifest.version.clone(),
            })
            .collect(),
        slots,
        version: env!("CARGO_PKG_VERSION").into(),
        cache,
        caches,
    }
}

/// Runs `job` in a task of its own, which holds the job's `share` of the budget to its end.
fn spawn_job(ctx: JobContext, job: Job, share: Share) {
    tokio::spawn(async move {
        let _share = share;
        let _running = ctx.metrics.job_running();
        let id = job.lease.job.id.clone();
        tracing::info!(job = %id, image = %job.lease.job.image, "job started");
        match job::run(&ctx, job).await {
            Some(outcome) => {
                ctx.metrics.job_finished(outcome.state);
                tracing::info!(job = %id, state = %outcome.state, "job ended");
            }
            None => tracing::warn!(job = %id, "job abandoned: its lease was lost"),
        }
    });
}

/// The worker's name: the configured one, else the host's.
fn worker_name(config: &WorkerConfig) -> String {
    if !config.name.is_empty() {
        return config.name.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".into())
}

/// One backend per configured choice (the default, and any per-image override), each decided
/// once and explained in the log.
fn choose_backends(
    config: &WorkerConfig,
    name: &str,
) -> anyhow::Result<BTreeMap<BackendChoice, Arc<dyn Backend>>> {
    let kvm = probe_kvm();
    let vmm =
        std::env::current_exe().context("finding the vmfarm binary for the integrated VMM")?;
    let (jail, why) = choose_jail(&config.jail).map_err(anyhow::Error::msg)?;
    if jail.is_some() || config.jail.mode == JailMode::Off {
        tracing::info!(worker = %name, "{why}");
    } else {
        tracing::warn!(worker = %name, "{why}");
    }
    let mut backends = BTreeMap::new();
    // QEMU always: images that boot by firmware run on it whatever the config says.
    let choices = [config.backend.default, BackendChoice::Qemu]
        .into_iter()
        .chain(config.backend.images.values().copied());
    for choice in choices {
        if let std::collections::btree_map::Entry::Vacant(slot) = backends.entry(choice) {
            let (backend, why) =
                choose(choice, kvm, &vmm, jail.clone()).map_err(anyhow::Error::msg)?;
            if choice == BackendChoice::Qemu && config.backend.default != BackendChoice::Qemu {
                tracing::info!(worker = %name, backend = backend.name(), "images that boot by firmware run on {why}");
            } else {
                tracing::info!(worker = %name, backend = backend.name(), "{why}");
            }
            slot.insert(backend);
        }
    }
    Ok(backends)
}

/// What the worker makes of a leased job before it runs it: its manifest, parsed here once for
/// the whole job, and its size; or why the job is refused (a manifest that does not parse, a
/// job bigger than this whole worker).
fn admit(
    lease: &LeaseResponse,
    config: &WorkerConfig,
    budget: &Budget,
) -> Result<(Manifest, (u32, u64)), String> {
    let mut manifest = Manifest::parse(&lease.job.manifest)
        .map_err(|e| format!("the leased manifest is invalid: {e}"))?;
    if let Some(checkout) = &lease.job.checkout {
        manifest
            .check_out(checkout)
            .map_err(|e| format!("the pushed repository cannot be checked out: {e}"))?;
    }
    let size = job::job_size(&manifest, config);
    if !budget.fits_at_all(size) {
        return Err(format!(
            "the job asks for {} vCPUs and {} MiB; this worker has {} vCPUs and {} in all",
            size.0, size.1, config.slots.cpus, config.slots.memory
        ));
    }
    Ok((manifest, size))
}

/// Removes what a previous run of this worker left (it was killed mid-job): its guests died
/// with it, their overlays and sockets are still here. Their jobs were requeued by the server.
fn remove_leftovers(work_dir: &std::path::Path) {
    for entry in std::fs::read_dir(work_dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => tracing::info!(path = %path.display(), "removed a previous run's leftovers"),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a previous run's leftovers")
            }
        }
    }
}

/// A job the worker cannot run ends in `error` at once, saying why.
async fn refuse(client: &ServerClient, lease: &LeaseResponse, reason: String) {
    let handle = LeaseHandle::of(lease);
    tracing::warn!(job = %lease.job.id, "refused: {reason}");
    let update = StateUpdate {
        job_state: Some(JobState::Error),
        reason: Some(reason),
        ..StateUpdate::default()
    };
    if let Err(e) = client.state(&handle, &update).await {
        tracing::warn!(job = %lease.job.id, error = %e, "could not refuse the job");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmfarm_proto::wire::LeasedJob;

    fn lease(manifest: &str) -> LeaseResponse {
        LeaseResponse {
            lease_id: "l1".into(),
            fence: 1,
            expires_at: 0,
            ttl_ms: 30_000,
            limits: vmfarm_proto::wire::LeaseLimits {
                max_log_bytes: 1 << 26,
                max_artifact_bytes: 1 << 31,
                max_artifacts_total_bytes: 1 << 32,
            },
            job: LeasedJob {
                id: "7".into(),
                group_id: "g".into(),
                image: "tiny".into(),
                owner: "alice".into(),
                manifest: manifest.into(),
                attempt: 1,
                timeout_ms: 60_000,
                checkout: None,
            },
            secrets: BTreeMap::new(),
            network: Default::default(),
        }
    }

    #[test]
    fn test_admit_parses_the_manifest_once_and_sizes_the_job() {
        let config = WorkerConfig::default();
        let budget = Budget::new(2, 4096);
        let text = "image = \"tiny\"\n[resources]\ncpus = 2\nmemory = \"2GiB\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n";
        let (manifest, size) = admit(&lease(text), &config, &budget).unwrap();
        assert_eq!(manifest.tasks[0].name, "t");
        assert_eq!(size, (2, 2048));
        let plain = "image = \"tiny\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n";
        let (_, size) = admit(&lease(plain), &config, &budget).unwrap();
        assert_eq!(size, (1, 1024), "the worker's defaults");
    }

    #[test]
    fn test_admit_refuses_with_the_reason() {
        let config = WorkerConfig::default();
        let budget = Budget::new(2, 4096);
        let cases = [
            (
                "image = \"tiny\"\ntasks = 3\n",
                "the leased manifest is invalid:",
            ),
            ("this is not toml", "the leased manifest is invalid:"),
            (
                "image = \"tiny\"\n[resources]\ncpus = 4\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n",
                "asks for 4 vCPUs and 1024 MiB; this worker has 2 vCPUs and 4GiB in all",
            ),
        ];
        for (text, want) in cases {
            let err = admit(&lease(text), &config, &budget).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
