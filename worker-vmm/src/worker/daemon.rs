//! The worker daemon: announce the images it has, lease jobs while slots are free, run each
//! job in its own task, and keep going whatever a job or the server does.

use super::backend_choice::{choose, probe_kvm};
use super::budget::Budget;
use super::job::{self, JobContext};
use super::server_client::{ServerClient, ServerError};
use crate::config::WorkerConfig;
use crate::images::manifest::{InstalledImage, list};
use anyhow::Context;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use vmfarm_proto::wire::{LeaseRequest, StateUpdate, WorkerImage};
use vmfarm_proto::{JobState, Manifest};

/// The newest version of each image in the images dir.
fn newest_images(config: &WorkerConfig) -> BTreeMap<String, InstalledImage> {
    let mut newest = BTreeMap::new();
    match list(&config.images_dir) {
        // `list` is sorted oldest first, so later entries replace earlier ones.
        Ok(images) => {
            for image in images {
                newest.insert(image.manifest.name.clone(), image);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the images dir"),
    }
    newest
}

pub async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let name = if config.name.is_empty() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "worker".into())
    } else {
        config.name.clone()
    };
    anyhow::ensure!(
        !config.token.is_empty(),
        "the worker has no token: set `token` in its config or VMFARM_TOKEN"
    );
    let client =
        ServerClient::new(&config.server, &config.token).context("making the HTTP client")?;
    let kvm = probe_kvm();
    let vmm =
        std::env::current_exe().context("finding the vmfarm binary for the integrated VMM")?;
    // One backend per configured choice (the default, and any per-image override), each
    // decided once and explained.
    let mut backends = BTreeMap::new();
    for choice in
        std::iter::once(config.backend.default).chain(config.backend.images.values().copied())
    {
        if let std::collections::btree_map::Entry::Vacant(slot) = backends.entry(choice) {
            let (backend, why) = choose(choice, kvm, &vmm).map_err(anyhow::Error::msg)?;
            tracing::info!(worker = %name, backend = backend.name(), "{why}");
            slot.insert(backend);
        }
    }
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("creating {}", config.work_dir.display()))?;
    remove_leftovers(&config.work_dir);

    let budget = Arc::new(Budget::new(
        config.slots.cpus,
        config.slots.memory.0 / (1024 * 1024),
    ));
    let default_size = (
        config.guest.default_cpus,
        config.guest.default_memory.0 / (1024 * 1024),
    );
    // Said once: the dir is looked at again every 2 s until an image is there.
    let mut said_no_images = false;
    loop {
        let images = newest_images(&config);
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
        let request = LeaseRequest {
            name: name.clone(),
            images: images
                .values()
                .map(|i| WorkerImage {
                    name: i.manifest.name.clone(),
                    version: i.manifest.version.clone(),
                })
                .collect(),
            slots: 1 + budget.free_slots(default_size),
            version: env!("CARGO_PKG_VERSION").into(),
        };
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
        let Some(image) = images.get(&lease.job.image).cloned() else {
            tracing::error!(job = %lease.job.id, image = %lease.job.image, "leased a job for an image this worker does not have");
            continue;
        };
        let size = Manifest::parse(&lease.job.manifest)
            .map(|m| job::job_size(&m, &config))
            .unwrap_or(default_size);
        if !budget.fits_at_all(size) {
            refuse(&client, &lease, size, &config).await;
            continue;
        }
        if size != default_size {
            // A bigger (or smaller) job: trade the reserved slot for its own size.
            drop(share);
            share = budget.take(size).await;
        }
        let Some(backend) = backends.get(&config.backend_for(&lease.job.image)).cloned() else {
            continue;
        };
        let ctx = JobContext {
            client: client.clone(),
            config: config.clone(),
            backend,
            image,
        };
        tokio::spawn(async move {
            let _share = share;
            let id = lease.job.id.clone();
            tracing::info!(job = %id, image = %lease.job.image, "job started");
            match job::run(&ctx, lease).await {
                Some(outcome) => tracing::info!(job = %id, state = %outcome.state, "job ended"),
                None => tracing::warn!(job = %id, "job abandoned: its lease was lost"),
            }
        });
    }
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

/// A job bigger than this whole worker ends in `error` at once, saying so.
async fn refuse(
    client: &ServerClient,
    lease: &vmfarm_proto::wire::LeaseResponse,
    size: (u32, u64),
    config: &WorkerConfig,
) {
    let handle = super::server_client::LeaseHandle {
        lease_id: lease.lease_id.clone(),
        fence: lease.fence,
    };
    let reason = format!(
        "the job asks for {} vCPUs and {} MiB; this worker has {} vCPUs and {} in all",
        size.0, size.1, config.slots.cpus, config.slots.memory
    );
    let update = StateUpdate {
        job_state: Some(JobState::Error),
        reason: Some(reason),
        ..StateUpdate::default()
    };
    if let Err(e) = client.state(&handle, &update).await {
        tracing::warn!(job = %lease.job.id, error = %e, "could not refuse the job");
    }
}
