//! `vmfarm vm run`'s arguments.

use std::path::PathBuf;

use super::jail::JailSpec;
use super::seccomp::SeccompMode;

/// What `vmfarm vm run` does, in the whole CLI's list and in its own help.
pub const ABOUT: &str = "Boot one guest in this process; the console goes to stdout";

/// `vmfarm vm run` parsed on its own, by `vmfarm`'s `main` before it builds its whole command tree
/// (the worker starts one such process per guest); help and errors read as the subcommand's.
#[derive(Debug, clap::Parser)]
#[command(
    name = "vmfarm vm run",
    bin_name = "vmfarm vm run",
    about = ABOUT
)]
pub struct VmRunCli {
    #[command(flatten)]
    pub args: VmRunArgs,
}

impl VmRunCli {
    /// Parses the arguments after `vmfarm vm run`; on an error or `--help`, prints and exits as
    /// clap does.
    pub fn parse_rest(args: std::env::ArgsOs) -> Self {
        <Self as clap::Parser>::parse_from(std::iter::once("vmfarm vm run".into()).chain(args))
    }
}

/// Run one guest in this process until it reboots, powers off, panics or times out.
#[derive(Debug, Clone, clap::Args)]
pub struct VmRunArgs {
    /// Kernel image: a bzImage, or an ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// A virtio-blk disk (raw or qcow2); `,ro` makes it read-only. Repeat for more disks
    /// (the first is /dev/vda).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    pub disks: Vec<String>,
    /// Host side of the guest's virtio-vsock: a Unix socket path (hybrid vsock: connect and
    /// write `CONNECT <port>\n`; guest connections to port P arrive at `<SOCKET>_P`).
    #[arg(long, value_name = "SOCKET")]
    pub vsock: Option<PathBuf>,
    /// Number of vCPUs (1 to 32).
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Guest RAM, 16MiB to 1TiB, written as in a job manifest: 512MiB, 2GiB.
    #[arg(long, default_value = "512MiB")]
    pub memory: String,
    /// The kernel command line, passed as is.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Write the guest console (COM1) to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
    /// Stop the guest and fail after this long, written as in a job manifest: 90s, 5m, 1h30m.
    #[arg(long)]
    pub timeout: Option<String>,
    /// Also declare the virtio-mmio devices on the command line (`virtio_mmio.device=`), for
    /// custom kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES; stock kernels find them
    /// through ACPI.
    #[arg(long)]
    pub virtio_mmio_cmdline: bool,
    /// Print on stderr when the vCPUs start (CLOCK_MONOTONIC), for `vmfarm bench boot`, and
    /// after a restore how long it took.
    #[arg(long)]
    pub timings: bool,
    /// When a line `save` arrives on stdin, stop the guest, write the memory it touched to
    /// DIR/memory and its state to DIR/devices, and end (status 0).
    #[arg(long, value_name = "DIR", conflicts_with = "restore")]
    pub save: Option<PathBuf>,
    /// Start the guest from a snapshot `--save` wrote in DIR instead of booting it (--kernel
    /// and --initrd are not read; the disks, vCPUs, memory and devices must be those it was
    /// saved with, each disk holding what it held then, e.g. an overlay on a copy of it).
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,
    /// The snapshot's memory from this file instead of DIR/memory (e.g. a sealed copy).
    #[arg(long, value_name = "FILE", requires = "restore")]
    pub restore_memory: Option<PathBuf>,
    /// Jail the VMM (root only): its own mount, PID, IPC, UTS and network namespaces, DIR as its
    /// root (the files it reads from elsewhere shown read-only at their paths), --jail-uid's user,
    /// resource limits and no environment. What it writes (the disk, the vsock socket, a console
    /// file) must be in DIR.
    #[arg(long, value_name = "DIR", requires = "jail_uid")]
    pub jail: Option<PathBuf>,
    /// The unprivileged user the jailed VMM runs as.
    #[arg(long, value_name = "UID", requires = "jail")]
    pub jail_uid: Option<u32>,
    /// Its group (default: the same number as the uid).
    #[arg(long, value_name = "GID", requires = "jail")]
    pub jail_gid: Option<u32>,
    /// A cgroup directory the jailed VMM joins (repeat for each cgroup v1 hierarchy).
    #[arg(long = "jail-cgroup", value_name = "DIR", requires = "jail")]
    pub jail_cgroups: Vec<PathBuf>,
    /// What a system call outside the VMM's seccomp filter does once the VM is built: kill the
    /// process (SIGSYS), log it (dmesg) and go on, or no filter at all.
    #[arg(long, value_enum, default_value = "kill")]
    pub seccomp: SeccompMode,
    /// Tests only: once the filter is in place, make a system call it forbids (open a file).
    #[arg(long, hide = true)]
    pub test_forbidden_syscall: bool,
}

impl VmRunArgs {
    /// The jail asked for, if any.
    pub fn jail_spec(&self) -> Option<JailSpec> {
        let (root, uid) = (self.jail.clone()?, self.jail_uid?);
        Some(JailSpec {
            root,
            uid,
            gid: self.jail_gid.unwrap_or(uid),
            cgroups: self.jail_cgroups.clone(),
        })
    }
}
