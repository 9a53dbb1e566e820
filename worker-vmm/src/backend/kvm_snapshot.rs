//! Template snapshots on the `kvm` backend: `vmfarm vm run --save` boots the template guest;
//! once its agent waits for a job, a `save` line on the VMM's stdin has it stop and write its
//! memory and its vCPUs' and devices' state into the snapshot's folder. A job's guest is
//! `vmfarm vm run --restore` from that folder, its memory the sealed copy ([`SealedMemory`])
//! mapped private, its disk an overlay of its own on the template's frozen one.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use super::kvm::{KvmBackend, SSH_PORT};
use super::saving::{
    io_error, keep_disk, last_words, no_cache_disks, refused, wait_for_template, within,
};
use super::{
    AgentChannel, BackendError, Boot, BootSpec, Prepared, ProcessVm, SealedMemory, Snapshot,
    prepare,
};
use crate::vmm::snapshot::{SAVE_LINE, VMM_VERSION};
use crate::vmm::timing::{RESTORED, VCPUS_START};

/// The longest a restore may take before the job boots cold instead.
const RESTORE_LIMIT: Duration = Duration::from_secs(30);

/// What the VMM `vmm` is, as a snapshot's stamp names it: its state format and its binary
/// (size and time of change); a snapshot of another is not restored.
pub(crate) fn vmm_version(vmm: &Path) -> String {
    let binary = std::fs::metadata(vmm).map_or_else(
        |_| "an unreadable binary".to_owned(),
        |m| {
            use std::os::unix::fs::MetadataExt as _;
            format!("{} bytes changed at {}", m.len(), m.mtime())
        },
    );
    format!("{VMM_VERSION} ({binary})")
}

fn linux(spec: &BootSpec) -> Result<&super::LinuxBoot, BackendError> {
    match &spec.boot {
        Boot::Linux(linux) => Ok(linux),
        Boot::Firmware { .. } => Err(BackendError::Unsupported {
            backend: "kvm",
            why: "only guests with vmfarm's agent (a kernel boot) are snapshotted".into(),
        }),
    }
}

impl KvmBackend {
    /// Boots `spec`'s guest with `--save` into `into`, jailed as jobs' guests are, waits until
    /// its agent waits for a job, has the VMM save it, and keeps its disk as `into`'s.
    pub(crate) async fn save_snapshot(
        &self,
        spec: &BootSpec,
        into: &Snapshot,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let linux = linux(spec)?;
        std::fs::create_dir_all(&into.dir).map_err(BackendError::RunDir)?;
        let Prepared { dir, overlay, jail } = prepare(spec, self.jail.as_ref())?;
        let run = &dir.0;
        let messages = run.join("vmm.stderr");
        let stderr = std::fs::File::create(&messages).map_err(BackendError::RunDir)?;
        let mut command = self.command(spec, linux, &overlay, jail.as_ref(), run);
        command
            .arg("--save")
            .arg(&into.dir)
            .stdin(Stdio::piped())
            .stderr(stderr);
        let mut child = command.spawn().map_err(BackendError::Spawn)?;
        let (Some(mut console), Some(mut stdin)) = (child.stdout.take(), child.stdin.take()) else {
            return Err(refused("starting the template's VMM", "no console".into()));
        };
        if let Err(e) = wait_for_template(&mut console, timeout, &messages).await {
            let _ = child.kill().await;
            return Err(e);
        }
        let saved = within("the VMM", timeout, "saving the template guest", async {
            stdin
                .write_all(format!("{SAVE_LINE}\n").as_bytes())
                .await
                .map_err(io_error("asking the VMM to save"))?;
            // The console is drained as the VMM ends (a full pipe would stop it).
            let mut rest = Vec::new();
            let (status, _) = tokio::join!(
                child.wait(),
                tokio::io::AsyncReadExt::read_to_end(&mut console, &mut rest)
            );
            match status.map_err(io_error("waiting for the VMM"))? {
                status if status.success() => Ok(()),
                status => Err(refused(
                    "saving the template guest",
                    format!(
                        "the VMM ended with {status}: {}",
                        last_words(&messages).await
                    ),
                )),
            }
        })
        .await;
        if saved.is_err() {
            let _ = child.kill().await;
        }
        saved?;
        keep_disk(&overlay, &into.disk(), jail.is_some())
            .map_err(io_error("keeping the template's disk"))?;
        // The jail (its user, its cgroup) goes once the VMM has ended and its disk is given back.
        drop(jail);
        drop(dir);
        Ok(())
    }

    /// Starts a `--restore` VMM for `spec` from `from`, its memory `sealed`, and returns once
    /// the VM is restored and its vCPUs start.
    pub(crate) async fn restore_snapshot(
        &self,
        spec: &BootSpec,
        from: &Snapshot,
        sealed: &SealedMemory,
    ) -> Result<Box<dyn super::Vm>, BackendError> {
        let linux = linux(spec)?;
        no_cache_disks(spec, "kvm")?;
        let spec = BootSpec {
            base_disk: from.disk(),
            ..spec.clone()
        };
        let Prepared { dir, overlay, jail } = prepare(&spec, self.jail.as_ref())?;
        let mut command = self.command(&spec, linux, &overlay, jail.as_ref(), &dir.0);
        command
            .arg("--restore")
            .arg(&from.dir)
            .arg("--restore-memory")
            .arg(sealed.path())
            .arg("--timings")
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(BackendError::Spawn)?;
        let Some(stderr) = child.stderr.take() else {
            return Err(refused("restoring the guest", "no stderr".into()));
        };
        // The VMM prints its vCPUs' start once the VM is restored; before it, only errors. Each
        // line is read up to MAX_LINE bytes, and its last lines are kept, where its error is.
        const MAX_LINE: u64 = 4096;
        let mut stderr = BufReader::new(stderr);
        let mut said = std::collections::VecDeque::new();
        let started = within("the VMM", RESTORE_LIMIT, "restoring the guest", async {
            loop {
                let mut line = Vec::new();
                let n = (&mut stderr)
                    .take(MAX_LINE)
                    .read_until(b'\n', &mut line)
                    .await
                    .map_err(io_error("reading the VMM's stderr"))?;
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                if n == 0 {
                    return Err(refused(
                        "restoring the guest",
                        format!("the VMM ended: {}", said.make_contiguous().join("\n")),
                    ));
                } else if line.starts_with(VCPUS_START) {
                    return Ok(());
                } else if let Some(took) = line.strip_prefix(RESTORED) {
                    let took = took.trim();
                    tracing::info!(vm = %spec.run_dir.display(), "the VMM restored the guest {took}");
                } else {
                    if said.len() == 32 {
                        said.pop_front();
                    }
                    said.push_back(line);
                }
            }
        })
        .await;
        if let Err(e) = started {
            let _ = child.kill().await;
            return Err(e);
        }
        // What the VMM says from then on goes where a booted VMM's stderr goes.
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut stderr, &mut tokio::io::stderr()).await;
        });
        let channel = AgentChannel::Vsock {
            socket: dir.0.join(super::kvm::VSOCK),
            port: SSH_PORT,
        };
        Ok(Box::new(ProcessVm::new(child, channel, jail, dir)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_version_names_the_state_format_and_the_binary() {
        let exe = std::env::current_exe().unwrap();
        let version = vmm_version(&exe);
        assert!(version.starts_with(VMM_VERSION), "{version}");
        let len = std::fs::metadata(&exe).unwrap().len();
        assert!(version.contains(&format!("{len} bytes")), "{version}");
    }
}
