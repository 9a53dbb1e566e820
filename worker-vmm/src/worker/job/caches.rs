//! The job's cache disks: checked out before the guest boots (each an overlay on its cache's
//! newest version), mounted by the agent on the manifest's paths, and stored as the newest
//! version when the job succeeded, once its guest has ended.

use super::limits::Halt;
use super::outcome::Outcome;
use super::{JobRun, create_private_dir};
use crate::worker::caches::CacheKey;
use anyhow::Context as _;
use vmfarm_proto::JobState;
use vmfarm_proto::Manifest;
use vmfarm_proto::cache::CacheMount;

/// What the identity line tells the agent to mount: the `i`th cache's disk on its paths.
pub(super) fn mounts(manifest: &Manifest) -> Vec<CacheMount> {
    manifest
        .caches
        .iter()
        .enumerate()
        .map(|(i, cache)| CacheMount {
            serial: CacheMount::serial(i),
            paths: cache.paths.clone(),
        })
        .collect()
}

impl JobRun<'_> {
    /// Checks out each of the manifest's caches, saying in the log what the job starts on.
    pub(super) async fn check_out_caches(&mut self) -> Result<(), Halt> {
        let manifest = self.manifest;
        if manifest.caches.is_empty() {
            return Ok(());
        }
        if self.ctx.image.firmware().is_some() {
            return Err(Halt::Failed(anyhow::anyhow!(
                "the manifest's [[caches]] are mounted by vmfarm's agent, which the image {} \
                 (booted by firmware) lacks: use an image with the agent, or remove [[caches]]",
                self.lease.job.image
            )));
        }
        if self.lease.job.owner.is_empty() {
            return Err(Halt::Failed(anyhow::anyhow!(
                "the server did not say who owns the job (a server older than this worker): its \
                 caches cannot be kept apart from other users'"
            )));
        }
        let dir = self.run_dir.join("caches");
        let made = async {
            create_private_dir(&dir)
                .await
                .context("creating the job's cache folder")
        };
        self.limits.step("checking out the caches", made).await?;
        for (i, cache) in manifest.caches.iter().enumerate() {
            let key = CacheKey {
                owner: self.lease.job.owner.clone(),
                image: self.lease.job.image.clone(),
                name: cache.name.clone(),
            };
            let (store, size, overlay) = (
                self.ctx.caches.clone(),
                cache.size,
                dir.join(CacheMount::serial(i)),
            );
            let checked = async {
                tokio::task::spawn_blocking(move || store.check_out(&key, size, &overlay))
                    .await?
                    .with_context(|| format!("the cache `{}`", cache.name))
            };
            let checked = self.limits.step("checking out the caches", checked).await?;
            self.log
                .farm(&match (&checked.why_empty, checked.started_on) {
                    (Some(why), _) => format!("cache {} ({size}): {why}", cache.name),
                    (None, Some(version)) => format!(
                        "cache {} ({size}): version {version}, mounted on {}",
                        cache.name,
                        cache.paths.join(", ")
                    ),
                    (None, None) => format!("cache {} ({size})", cache.name),
                });
            self.caches.push(checked);
        }
        Ok(())
    }

    /// Stores what the job wrote in its caches when it succeeded (its guest has ended); a job
    /// that did not stores nothing.
    pub(super) async fn store_caches(&mut self, outcome: &Result<Outcome, Halt>) {
        let caches = std::mem::take(&mut self.caches);
        if caches.is_empty() {
            return;
        }
        let succeeded = matches!(
            outcome,
            Ok(Outcome {
                state: JobState::Succeeded,
                ..
            })
        );
        if !succeeded {
            self.log
                .farm("the caches are not stored: the job did not succeed");
            return;
        }
        if !self.shut_cleanly {
            self.log.farm(
                "the caches are not stored: the guest did not shut down cleanly, so its disks \
                 may be half written",
            );
            return;
        }
        for checked in caches {
            let name = checked.key.name.clone();
            let store = self.ctx.caches.clone();
            let said = match tokio::task::spawn_blocking(move || store.commit(checked)).await {
                Ok(Ok(said)) => said,
                Ok(Err(e)) => format!("not stored: {e:#}"),
                Err(e) => format!("not stored: {e}"),
            };
            self.log.farm(&format!("cache {name}: {said}"));
        }
    }
}
