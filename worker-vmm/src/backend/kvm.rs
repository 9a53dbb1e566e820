//! The `kvm` backend: the integrated VMM, one `vmfarm vm run` process per guest (so a fault or
//! an escape stays in one job), the agent's SSH over vsock in the hybrid style: connect to the
//! guest's vsock Unix socket, write `CONNECT 22`, read `OK <port>`, then the stream is the guest's.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::Command;

use super::jail::{GuestJail, Jailer};
use super::{
    AgentChannel, Backend, BackendError, Boot, BootSpec, BoxFuture, ChannelKind, LinuxBoot,
    Prepared, ProcessVm, SealedMemory, Snapshot, Vm, clear_environment, die_with_parent, prepare,
};

/// The guest port the agent serves SSH on.
pub const SSH_PORT: u32 = 22;

/// The VMM's vsock socket in the guest's folder.
pub(crate) const VSOCK: &str = "vsock.sock";

#[derive(Debug, Clone)]
pub struct KvmBackend {
    /// The `vmfarm` binary that runs `vm run` (this process's own executable).
    pub vmm: PathBuf,
    /// Jails each `vm run` (`--jail`) when set.
    pub jail: Option<Arc<Jailer>>,
    /// What its snapshots are stamped with, read once.
    snapshot_version: String,
}

impl KvmBackend {
    pub fn new(vmm: PathBuf, jail: Option<Arc<Jailer>>) -> Self {
        let snapshot_version = super::kvm_snapshot::vmm_version(&vmm);
        KvmBackend {
            vmm,
            jail,
            snapshot_version,
        }
    }

    /// The `vm run` arguments that jail the VMM in `run_dir` as `jail` says.
    pub fn jail_args(run_dir: &Path, jail: &GuestJail) -> Vec<String> {
        let mut args = vec![
            "--jail".to_owned(),
            run_dir.display().to_string(),
            "--jail-uid".to_owned(),
            jail.uid.to_string(),
            "--jail-gid".to_owned(),
            jail.gid.to_string(),
        ];
        for cgroup in &jail.cgroups {
            args.extend(["--jail-cgroup".to_owned(), cgroup.display().to_string()]);
        }
        args
    }

    /// The `vm run` command for `spec`'s guest (jailed in `run_dir` by `jail`, if any): its
    /// console on stdout, no stdin, its stderr the worker's.
    pub(crate) fn command(
        &self,
        spec: &BootSpec,
        linux: &LinuxBoot,
        overlay: &Path,
        jail: Option<&GuestJail>,
        run_dir: &Path,
    ) -> Command {
        let mut command = Command::new(&self.vmm);
        command.args(Self::args(spec, linux, overlay, &run_dir.join(VSOCK)));
        if let Some(jail) = jail {
            command.args(Self::jail_args(run_dir, jail));
        }
        clear_environment(&mut command);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        die_with_parent(command.as_std_mut());
        command
    }

    /// The `vm run` arguments for `spec`, which boots `linux`.
    pub fn args(spec: &BootSpec, linux: &LinuxBoot, overlay: &Path, vsock: &Path) -> Vec<String> {
        let mut args = vec![
            "vm".to_owned(),
            "run".to_owned(),
            "--kernel".to_owned(),
            linux.kernel.display().to_string(),
        ];
        if let Some(initrd) = &linux.initrd {
            args.extend(["--initrd".to_owned(), initrd.display().to_string()]);
        }
        args.extend(["--disk".to_owned(), overlay.display().to_string()]);
        for disk in spec.cache_disks() {
            args.extend(["--disk".to_owned(), disk.display().to_string()]);
        }
        args.extend([
            "--vsock".to_owned(),
            vsock.display().to_string(),
            "--cpus".to_owned(),
            spec.vcpus.to_string(),
            "--memory".to_owned(),
            format!("{}MiB", spec.memory_mib),
            "--cmdline".to_owned(),
            linux.cmdline.clone(),
        ]);
        args
    }
}

impl Backend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn channel(&self) -> ChannelKind {
        ChannelKind::Vsock(SSH_PORT)
    }

    fn emulated(&self) -> bool {
        false
    }

    fn boot<'a>(&'a self, spec: &'a BootSpec) -> BoxFuture<'a, Result<Box<dyn Vm>, BackendError>> {
        Box::pin(async move {
            let Boot::Linux(linux) = &spec.boot else {
                return Err(BackendError::Unsupported {
                    backend: "kvm",
                    why: "it boots Linux kernels; a disk that boots by firmware runs on the qemu backend".into(),
                });
            };
            let Prepared { dir, overlay, jail } = prepare(spec, self.jail.as_ref())?;
            let mut command = self.command(spec, linux, &overlay, jail.as_ref(), &dir.0);
            let child = command.spawn().map_err(BackendError::Spawn)?;
            let channel = AgentChannel::Vsock {
                socket: dir.0.join(VSOCK),
                port: SSH_PORT,
            };
            Ok(Box::new(ProcessVm::new(child, channel, jail, dir)) as Box<dyn Vm>)
        })
    }

    fn snapshot_version(&self) -> Option<String> {
        Some(self.snapshot_version.clone())
    }

    fn save<'a>(
        &'a self,
        spec: &'a BootSpec,
        into: &'a Snapshot,
        timeout: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.save_snapshot(spec, into, timeout))
    }

    fn restore<'a>(
        &'a self,
        spec: &'a BootSpec,
        from: &'a Snapshot,
        memory: &'a SealedMemory,
    ) -> BoxFuture<'a, Result<Box<dyn Vm>, BackendError>> {
        Box::pin(self.restore_snapshot(spec, from, memory))
    }
}

/// Opens a stream to guest port `port` through the VMM's hybrid vsock socket.
pub async fn connect_vsock(socket: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    // Byte by byte up to the newline, so that nothing of the guest's stream is read here.
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > 64 {
            return Err(std::io::Error::other(
                "the VMM's answer to CONNECT is too long",
            ));
        }
    }
    let answer = String::from_utf8_lossy(&line);
    if !answer.starts_with("OK ") {
        return Err(std::io::Error::other(format!(
            "the VMM answered `{answer}` to CONNECT {port}"
        )));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::super::GuestCmdline;
    use super::*;

    /// The argv goes through `vmfarm vm run`'s own parser (what `main` does with it) and comes
    /// back as the VM the spec asked for.
    #[test]
    fn test_args_are_what_vm_run_parses_back() {
        use crate::vmm::cli::VmRunCli;
        use crate::vmm::config::{ConsoleConfig, DiskConfig, VmConfig};
        use clap::Parser as _;

        let cmdline = GuestCmdline {
            channel: ChannelKind::Vsock(SSH_PORT),
            user: "build".into(),
            emulated: false,
        }
        .compose();
        for (initrd, vcpus, memory_mib, caches) in [
            (Some(PathBuf::from("/img/initrd")), 2, 512, 0),
            (None, 1, 4096, 2),
        ] {
            let linux = LinuxBoot {
                kernel: "/img/kernel".into(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
            };
            let spec = BootSpec {
                boot: Boot::Linux(linux.clone()),
                base_disk: "/img/rootfs.qcow2".into(),
                vcpus,
                memory_mib,
                run_dir: "/run/g".into(),
                caches: (0..caches)
                    .map(|i| PathBuf::from(format!("/work/job/caches/{i}")))
                    .collect(),
            };
            let args = KvmBackend::args(
                &spec,
                &linux,
                Path::new("/run/g/o.qcow2"),
                Path::new("/run/g/v.sock"),
            );
            let (subcommand, rest) = args.split_at(2);
            assert_eq!(subcommand, ["vm", "run"]);
            let cli = VmRunCli::try_parse_from(
                std::iter::once("vmfarm vm run").chain(rest.iter().map(String::as_str)),
            )
            .unwrap_or_else(|e| panic!("vm run refuses {args:?}: {e}"));
            let vm = VmConfig::try_from(&cli.args)
                .unwrap_or_else(|e| panic!("vm run refuses {args:?}: {e}"));
            assert_eq!(vm.kernel, linux.kernel);
            assert_eq!(vm.initrd, initrd);
            // The root disk, then each cache disk by its link in the guest's folder, whose name
            // the VMM reports as the disk's serial.
            let disks: Vec<DiskConfig> = ["o.qcow2", "cache-0.qcow2", "cache-1.qcow2"]
                .into_iter()
                .take(1 + caches)
                .map(|name| DiskConfig {
                    path: Path::new("/run/g").join(name),
                    read_only: false,
                })
                .collect();
            assert_eq!(vm.disks, disks);
            assert_eq!(vm.vsock, Some(PathBuf::from("/run/g/v.sock")));
            assert_eq!(u32::from(vm.cpus), vcpus);
            assert_eq!(vm.memory, u64::from(memory_mib) << 20);
            assert_eq!(vm.cmdline, cmdline);
            assert_eq!(vm.timeout, None);
            // The backend reads the console from the process's stdout.
            assert_eq!(vm.console, ConsoleConfig::Stdout);
        }
    }

    /// The jail's flags parse back into the jail `vm run` enters.
    #[test]
    fn test_jail_args_are_what_vm_run_parses_back() {
        use crate::vmm::cli::VmRunCli;
        use crate::vmm::jail::JailSpec;
        use clap::Parser as _;

        let (jailer, _) = super::super::jail::tests::jailer_without_cgroups();
        let mut jail = jailer.guest(2, 512).unwrap();
        jail.cgroups = vec!["/cg/memory/vmfarm/guest-5000".into(), "/cg/pids/x".into()];
        let args = KvmBackend::jail_args(Path::new("/run/g"), &jail);
        let cli = VmRunCli::try_parse_from(
            ["vmfarm vm run", "--kernel", "/k"]
                .into_iter()
                .chain(args.iter().map(String::as_str)),
        )
        .unwrap_or_else(|e| panic!("vm run refuses {args:?}: {e}"));
        assert_eq!(
            cli.args.jail_spec(),
            Some(JailSpec {
                root: "/run/g".into(),
                uid: jail.uid,
                gid: jail.gid,
                cgroups: jail.cgroups.clone(),
            })
        );
        // Without --jail, no jail; --jail-uid alone is a usage error.
        let plain = VmRunCli::try_parse_from(["vmfarm vm run", "--kernel", "/k"]).unwrap();
        assert_eq!(plain.args.jail_spec(), None);
        assert!(VmRunCli::try_parse_from(["vm", "--kernel", "/k", "--jail-uid", "5"]).is_err());
    }

    #[tokio::test]
    async fn test_connect_reads_only_the_ok_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let vmm = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 11];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 22\n");
            // The guest's banner arrives in the same write as the OK line.
            s.write_all(b"OK 1024\nSSH-2.0-agent\r\n").await.unwrap();
        });
        let mut stream = connect_vsock(&path, 22).await.unwrap();
        let mut banner = String::new();
        stream.read_to_string(&mut banner).await.unwrap();
        assert_eq!(banner, "SSH-2.0-agent\r\n");
        vmm.await.unwrap();

        let listener = tokio::net::UnixListener::bind(dir.path().join("w.sock")).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 11];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(b"REFUSED\n").await.unwrap();
        });
        let err = connect_vsock(&dir.path().join("w.sock"), 22)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("REFUSED"), "{err}");
    }
}
