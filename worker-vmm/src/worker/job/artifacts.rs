//! The artifacts: each a regular file (or a directory, collected as one tar file, or each file
//! a glob matches) under the server's limits, copied from the guest and uploaded. After the
//! tasks succeed every artifact is collected and one that cannot be fails the job; after a task
//! fails only those with `when = "always"` are, and what cannot be is noted in the log.

use super::artifact_glob;
use super::limits::Halt;
use super::{JobRun, Outcome};
use crate::guest::Guest;
use crate::guest::ssh::EntryKind;
use crate::worker::guest_paths::{BUILD_DIR, FARM_DIR, pack_command};
use anyhow::Context;
use vmfarm_proto::JobState;
use vmfarm_proto::manifest::{Artifact, ArtifactWhen};

impl JobRun<'_> {
    /// Collects the artifacts due after tasks that `succeeded` (or failed).
    pub(super) async fn artifacts(&self, guest: &Guest, succeeded: bool) -> Result<Outcome, Halt> {
        let limits = &self.lease.limits;
        let mut room = limits.max_artifacts_total_bytes;
        let due = self
            .manifest
            .artifacts
            .iter()
            .filter(|a| succeeded || a.when == ArtifactWhen::Always);
        for artifact in due {
            let path = &artifact.path;
            let step = format!("collecting artifact {path}");
            let collected = self.collect(guest, artifact, &mut room);
            if let Err(e) = self.limits.bounded(&step, collected).await? {
                self.log.farm(&format!("artifact {path}: {e:#}"));
                if succeeded {
                    return Ok(Outcome::new(
                        JobState::Failed,
                        format!("artifact {path} could not be collected: {e:#}"),
                    ));
                }
            }
        }
        Ok(Outcome::succeeded())
    }

    /// Collects one artifact of the manifest (a file, a directory or a glob), taking what it
    /// uploads from `room`.
    async fn collect(
        &self,
        guest: &Guest,
        artifact: &Artifact,
        room: &mut u64,
    ) -> anyhow::Result<()> {
        let path = &artifact.path;
        if artifact.is_glob() {
            let matches = artifact_glob::expand(guest, path).await?;
            if matches.is_empty() {
                self.log.farm(&format!("artifact {path}: no file matches"));
            }
            for file in matches {
                let remote = format!("{BUILD_DIR}/{file}");
                *room -= self.collect_file(guest, &remote, &file, *room).await?;
            }
            return Ok(());
        }
        let remote = format!("{BUILD_DIR}/{path}");
        if guest.kind_of(&remote).await? == Some(EntryKind::Dir) {
            let archive = format!("{FARM_DIR}/artifact.tar");
            let packed = guest
                .exec_collect(
                    &pack_command(path, &archive),
                    crate::guest::ExecLimits::default(),
                )
                .await?;
            if packed.exit_status != 0 {
                anyhow::bail!(
                    "packing the directory failed (tar exited with status {}): {}",
                    packed.exit_status,
                    String::from_utf8_lossy(&packed.stderr).trim()
                );
            }
            let name = format!("{path}.tar");
            *room -= self.collect_file(guest, &archive, &name, *room).await?;
            return Ok(());
        }
        *room -= self.collect_file(guest, &remote, path, *room).await?;
        Ok(())
    }

    /// Downloads the regular file `remote` (at most the server's limit for one artifact and
    /// `room`) from the guest and uploads it to the server as artifact `name`; its size.
    pub(super) async fn collect_file(
        &self,
        guest: &Guest,
        remote: &str,
        name: &str,
        room: u64,
    ) -> anyhow::Result<u64> {
        vmfarm_proto::names::check_artifact_path(name).map_err(|e| anyhow::anyhow!("{e}"))?;
        let max_bytes = self.lease.limits.max_artifact_bytes.min(room);
        let local = self.run_dir.join("artifact");
        let got = guest
            .download(remote, &local, max_bytes)
            .await
            .context("downloading it from the guest");
        let uploaded = match got {
            Ok(got) => self
                .ctx
                .client
                .upload_artifact(&self.handle, name, &local, &got.sha256)
                .await
                .context("uploading it to the server")
                .map(|()| got),
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&local).await;
        let got = uploaded?;
        self.log.farm(&format!(
            "artifact {name}: {} bytes, sha256 {}",
            got.size, got.sha256
        ));
        Ok(got.size)
    }
}
