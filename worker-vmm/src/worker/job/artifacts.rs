//! The artifacts: each a regular file under the server's limits, copied from the guest and
//! uploaded.

use super::limits::Halt;
use super::{JobRun, Outcome};
use crate::guest::Guest;
use crate::worker::guest_paths::BUILD_DIR;
use anyhow::Context;
use vmfarm_proto::JobState;

impl JobRun<'_> {
    /// Collects each declared artifact; one that cannot be collected fails the job.
    pub(super) async fn artifacts(&self, guest: &Guest) -> Result<Outcome, Halt> {
        let limits = &self.lease.limits;
        let mut room = limits.max_artifacts_total_bytes;
        for artifact in &self.manifest.artifacts {
            let path = &artifact.path;
            let step = format!("collecting artifact {path}");
            let max_bytes = limits.max_artifact_bytes.min(room);
            let collected = self.collect_artifact(guest, path, max_bytes);
            match self.limits.bounded(&step, collected).await? {
                Ok(size) => room -= size,
                Err(e) => {
                    self.log.farm(&format!("artifact {path}: {e:#}"));
                    return Ok(Outcome::new(
                        JobState::Failed,
                        format!("artifact {path} could not be collected: {e:#}"),
                    ));
                }
            }
        }
        Ok(Outcome::succeeded())
    }

    /// Downloads one artifact of at most `max_bytes` from the guest and uploads it to the
    /// server; its size.
    pub(super) async fn collect_artifact(
        &self,
        guest: &Guest,
        path: &str,
        max_bytes: u64,
    ) -> anyhow::Result<u64> {
        vmfarm_proto::names::check_artifact_path(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let local = self.run_dir.join("artifact");
        let remote = format!("{BUILD_DIR}/{path}");
        let got = guest
            .download(&remote, &local, max_bytes)
            .await
            .context("downloading it from the guest");
        let uploaded = match got {
            Ok(got) => self
                .ctx
                .client
                .upload_artifact(&self.handle, path, &local, &got.sha256)
                .await
                .context("uploading it to the server")
                .map(|()| got),
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&local).await;
        let got = uploaded?;
        self.log.farm(&format!(
            "artifact {path}: {} bytes, sha256 {}",
            got.size, got.sha256
        ));
        Ok(got.size)
    }
}
