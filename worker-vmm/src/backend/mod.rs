//! Backends: what boots a guest for the worker's job logic (DESIGN.md, "Backends").
//!
//! A backend boots a guest from an image with a command line composed by the worker
//! ([`GuestCmdline`], the boot contract, which lives in `vmfarm_proto::guest` beside the agent's
//! side of it) and hands back a [`Vm`]: the guest's console, a byte stream to the agent's
//! SSH server, a wait and a kill. `qemu` is here; the integrated `kvm` VMM implements the same
//! trait.

pub mod jail;
pub mod kvm;
mod kvm_snapshot;
pub mod qemu;
mod qemu_snapshot;
mod saving;
pub mod sealed_memory;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitStatus;

use tokio::io::{AsyncRead, AsyncWrite};

pub use sealed_memory::SealedMemory;
pub use vmfarm_proto::cache::CacheMount;
pub use vmfarm_proto::guest::{ChannelKind, GuestCmdline};

use crate::images::manifest::InstalledImage;
use crate::images::recipe::Firmware;
use crate::vmm::qcow2::overlay::OverlayError;

/// A boxed future, so that backends can be chosen at run time (`dyn Backend`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A byte stream to the agent's SSH server.
pub trait GuestIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> GuestIo for T {}

/// The guest's console output (its serial port), as it comes.
pub type Console = Box<dyn AsyncRead + Send + Unpin>;

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub boot: Boot,
    /// The image's read-only base disk (qcow2); the backend boots a per-guest overlay on it.
    pub base_disk: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// A folder of this guest's own where the backend keeps its files (overlay, sockets); the
    /// folder is created, and removed with everything in it when the [`Vm`] is dropped.
    pub run_dir: PathBuf,
    /// The job's cache disks: qcow2 overlays the worker made (on the same file system as
    /// `run_dir`), given to the guest after its root disk, the `i`th with the virtio serial
    /// [`CacheMount::serial`]`(i)`. A kernel boot with the agent only.
    pub caches: Vec<PathBuf>,
}

impl BootSpec {
    /// Where the guest's VMM finds its cache disks: hard links in `run_dir` named by their
    /// serial (the integrated VMM reports a disk's file name as its serial, and writes only
    /// disks inside its jail's folder); the worker keeps its own names for them.
    pub(crate) fn cache_disks(&self) -> Vec<PathBuf> {
        (0..self.caches.len())
            .map(|i| self.run_dir.join(CacheMount::serial(i)))
            .collect()
    }
}

/// How the guest boots.
#[derive(Debug, Clone)]
pub enum Boot {
    /// A kernel handed to the VMM, the agent in its initramfs (both backends).
    Linux(LinuxBoot),
    /// The disk's own boot loader, started by `firmware`; cloud-init reads `seed`, a NoCloud
    /// disk the worker made for the job ([`crate::guest::cloud_init`]). QEMU only.
    Firmware { firmware: Firmware, seed: PathBuf },
}

/// A direct kernel boot.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The complete kernel command line ([`GuestCmdline::compose`]); the backend adds nothing.
    pub cmdline: String,
}

impl BootSpec {
    /// The kernel boot of `image` with vmfarm's agent ([`LinuxBoot::with_agent`]) from the
    /// image's disk.
    pub fn with_agent(
        image: &InstalledImage,
        backend: &dyn Backend,
        (vcpus, memory_mib): (u32, u32),
        run_dir: PathBuf,
    ) -> BootSpec {
        BootSpec {
            boot: Boot::Linux(LinuxBoot::with_agent(image, backend)),
            base_disk: image.base_disk(),
            vcpus,
            memory_mib,
            run_dir,
            caches: Vec::new(),
        }
    }
}

impl LinuxBoot {
    /// The kernel boot of `image`, with vmfarm's agent in its initramfs, and the boot
    /// contract's command line for `backend`.
    pub fn with_agent(image: &InstalledImage, backend: &dyn Backend) -> LinuxBoot {
        LinuxBoot {
            kernel: image.kernel(),
            initrd: Some(image.initrd()),
            cmdline: GuestCmdline {
                channel: backend.channel(),
                user: "build".into(),
                emulated: backend.emulated(),
            }
            .compose(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{tool} is not installed (Debian package {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("creating the guest's folder")]
    RunDir(#[source] std::io::Error),
    #[error("creating the guest's overlay disk")]
    Overlay(#[source] OverlayError),
    #[error("starting the VMM")]
    Spawn(#[source] std::io::Error),
    #[error("connecting to the guest's SSH channel at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the VMM")]
    Wait(#[source] std::io::Error),
    #[error("stopping the VMM")]
    Kill(#[source] std::io::Error),
    #[error("jailing the VMM")]
    Jail(#[from] jail::JailError),
    #[error("the {backend} backend cannot boot this image: {why}")]
    Unsupported { backend: &'static str, why: String },
    #[error("{what}")]
    Snapshot {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A guest saved when its agent waited for a job (a template snapshot), in a folder of its own:
/// its memory, its devices' state, and its disk (a qcow2 overlay on the image's), frozen then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub dir: PathBuf,
}

/// Its files are named as the integrated VMM's `--save` names them, on both backends.
impl Snapshot {
    pub fn memory(&self) -> PathBuf {
        self.dir.join(crate::vmm::snapshot::MEMORY_FILE)
    }
    pub fn devices(&self) -> PathBuf {
        self.dir.join(crate::vmm::snapshot::STATE_FILE)
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
}

/// The name of a guest's overlay disk in its folder.
pub(crate) const OVERLAY: &str = "overlay.qcow2";

/// A guest's folder (overlay, sockets), removed when dropped, after its VMM has been killed.
pub(crate) struct RunDir(pub(crate) PathBuf);

/// What a guest starts from, made before its VMM: its run folder, the job's overlay over the
/// image's disk in it, and the VMM's user and cgroup when VMMs are jailed.
pub(crate) struct Prepared {
    pub(crate) dir: RunDir,
    pub(crate) overlay: PathBuf,
    pub(crate) jail: Option<jail::GuestJail>,
}

/// Makes what `spec`'s guest starts from (both backends, before they start their VMM).
pub(crate) fn prepare(
    spec: &BootSpec,
    jailer: Option<&std::sync::Arc<jail::Jailer>>,
) -> Result<Prepared, BackendError> {
    if !spec.caches.is_empty() && !matches!(spec.boot, Boot::Linux(_)) {
        return Err(BackendError::Unsupported {
            backend: "any",
            why:
                "cache disks are mounted by vmfarm's agent, which an image booted by firmware lacks"
                    .into(),
        });
    }
    std::fs::create_dir_all(&spec.run_dir).map_err(BackendError::RunDir)?;
    let dir = RunDir(spec.run_dir.clone());
    let overlay = dir.0.join(OVERLAY);
    crate::vmm::qcow2::overlay::create_overlay(&spec.base_disk, &overlay)
        .map_err(BackendError::Overlay)?;
    for (disk, link) in spec.caches.iter().zip(spec.cache_disks()) {
        std::fs::hard_link(disk, &link).map_err(BackendError::RunDir)?;
    }
    let jail = jailer
        .map(|j| j.guest(spec.vcpus, spec.memory_mib))
        .transpose()?;
    Ok(Prepared { dir, overlay, jail })
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes the process `command` starts die with the worker (`PR_SET_PDEATHSIG`), so that a
/// worker killed with SIGKILL leaves no guest (or tool) behind. The signal follows the spawning
/// thread: spawn from the async runtime's worker threads, which live as long as the runtime, or
/// from a thread that waits for the process.
pub(crate) fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl, which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Starts the VMM with an empty environment (the worker's holds its token), but for
/// `VMFARM_LOG`, the integrated VMM's log level.
pub(crate) fn clear_environment(command: &mut tokio::process::Command) {
    command.env_clear();
    if let Some(level) = std::env::var_os("VMFARM_LOG") {
        command.env("VMFARM_LOG", level);
    }
}

/// How the guest's SSH server is reached on the host.
pub(crate) enum AgentChannel {
    /// QEMU's virtio-serial port, served on this Unix socket.
    SerialSocket(PathBuf),
    /// The integrated VMM's hybrid vsock socket and the guest port.
    Vsock { socket: PathBuf, port: u32 },
    /// The loopback port QEMU's user-mode network forwards to the guest's port 22; in the
    /// network namespace of the VMM's process when it has one of its own (jailed). `qmp` is
    /// QEMU's control socket, which presses the guest's ACPI power button.
    Loopback {
        port: u16,
        own_netns: bool,
        qmp: PathBuf,
    },
}

/// A guest's VMM process (QEMU or `vmfarm vm run`): its console on the process's stdout, the
/// agent's channel, and its folder, removed after the process is gone.
pub(crate) struct ProcessVm {
    child: tokio::process::Child,
    console: Option<Console>,
    channel: AgentChannel,
    // After the process: its cgroups go once it is gone, and its user is free again.
    jail: Option<jail::GuestJail>,
    // Last: the folder goes after the process is killed.
    _dir: RunDir,
}

impl ProcessVm {
    /// `child` was spawned with its stdout piped: that is the console.
    pub(crate) fn new(
        mut child: tokio::process::Child,
        channel: AgentChannel,
        jail: Option<jail::GuestJail>,
        dir: RunDir,
    ) -> ProcessVm {
        let console = child.stdout.take().map(|c| Box::new(c) as Console);
        ProcessVm {
            child,
            console,
            channel,
            jail,
            _dir: dir,
        }
    }
}

impl Vm for ProcessVm {
    fn take_console(&mut self) -> Option<Console> {
        self.console.take()
    }

    fn connect(&mut self) -> BoxFuture<'_, Result<Box<dyn GuestIo>, BackendError>> {
        Box::pin(async move {
            let connect_error =
                |path: PathBuf| move |source| BackendError::Connect { path, source };
            let stream: Box<dyn GuestIo> = match &self.channel {
                AgentChannel::SerialSocket(path) => Box::new(
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map_err(connect_error(path.clone()))?,
                ),
                AgentChannel::Vsock { socket, port } => Box::new(
                    kvm::connect_vsock(socket, *port)
                        .await
                        .map_err(connect_error(socket.clone()))?,
                ),
                AgentChannel::Loopback {
                    port, own_netns, ..
                } => {
                    let shown = PathBuf::from(format!("127.0.0.1:{port}"));
                    let netns = match (own_netns, self.child.id()) {
                        (false, _) => None,
                        (true, Some(pid)) => Some(pid),
                        // Never the host's namespace in its place.
                        (true, None) => {
                            return Err(BackendError::Connect {
                                path: shown,
                                source: std::io::Error::other("the guest's VMM has ended"),
                            });
                        }
                    };
                    Box::new(
                        qemu::connect_loopback(*port, netns)
                            .await
                            .map_err(connect_error(shown))?,
                    )
                }
            };
            Ok(stream)
        })
    }

    fn wait(&mut self) -> BoxFuture<'_, Result<ExitStatus, BackendError>> {
        Box::pin(async move { self.child.wait().await.map_err(BackendError::Wait) })
    }

    fn memory_exhausted(&self) -> Option<String> {
        self.jail.as_ref()?.memory_exhausted()
    }

    fn power_off(&mut self) -> BoxFuture<'_, Result<bool, BackendError>> {
        Box::pin(async move {
            match &self.channel {
                AgentChannel::Loopback { qmp, .. } => qemu::press_power_button(qmp)
                    .await
                    .map(|()| true)
                    .map_err(|source| BackendError::Connect {
                        path: qmp.clone(),
                        source,
                    }),
                AgentChannel::SerialSocket(_) | AgentChannel::Vsock { .. } => Ok(false),
            }
        })
    }

    fn kill(&mut self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            // A VMM that has already exited (the guest shut down) is as killed as it gets.
            if self.child.try_wait().map_err(BackendError::Kill)?.is_some() {
                return Ok(());
            }
            self.child.kill().await.map_err(BackendError::Kill)
        })
    }
}

/// Boots guests.
pub trait Backend: Send + Sync {
    /// `qemu`, `kvm`: for logs and `auto`'s explanation.
    fn name(&self) -> &'static str;
    /// The host channel the agent must serve SSH on, for the command line.
    fn channel(&self) -> ChannelKind;
    /// Whether guests run under emulation (TCG): the command line then needs `tsc_early_khz`.
    fn emulated(&self) -> bool;
    fn boot<'a>(&'a self, spec: &'a BootSpec) -> BoxFuture<'a, Result<Box<dyn Vm>, BackendError>>;
    /// What makes this backend's snapshots differ (its VMM and how it runs guests), or `None`
    /// when it takes none.
    fn snapshot_version(&self) -> Option<String> {
        None
    }
    /// Boots `spec`'s guest (a kernel boot with vmfarm's agent), waits up to `timeout` until its
    /// agent waits for a job, and saves it into `into` (a folder it creates).
    fn save<'a>(
        &'a self,
        _spec: &'a BootSpec,
        _into: &'a Snapshot,
        _timeout: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { Err(self.no_snapshots()) })
    }
    /// Starts a guest of `spec`'s size from `from`, its memory mapped from `memory` (the sealed
    /// copy of `from`'s), on an overlay of its own over the snapshot's disk (`spec.base_disk` is
    /// not used); its agent waits for the job's identity.
    fn restore<'a>(
        &'a self,
        _spec: &'a BootSpec,
        _from: &'a Snapshot,
        _memory: &'a SealedMemory,
    ) -> BoxFuture<'a, Result<Box<dyn Vm>, BackendError>> {
        Box::pin(async move { Err(self.no_snapshots()) })
    }
    /// Why a backend without snapshots refuses them.
    fn no_snapshots(&self) -> BackendError {
        BackendError::Unsupported {
            backend: self.name(),
            why: "it does not save or restore guests".into(),
        }
    }
}

/// A running guest. Dropping it kills the guest and removes its files.
pub trait Vm: Send {
    /// The console output; `None` once taken.
    fn take_console(&mut self) -> Option<Console>;
    /// Opens a byte stream to the guest's SSH server, the agent's or the guest's own (after the
    /// guest said it is ready).
    fn connect(&mut self) -> BoxFuture<'_, Result<Box<dyn GuestIo>, BackendError>>;
    /// Waits for the guest to end (a reboot, as `vmfarm-agent shutdown` does, ends it).
    fn wait(&mut self) -> BoxFuture<'_, Result<ExitStatus, BackendError>>;
    /// Why the host ended the guest's VMM, when it did: the kernel killed it at its memory
    /// limit. Asked when a step failed, before the guest is killed.
    fn memory_exhausted(&self) -> Option<String>;
    /// Presses the guest's ACPI power button, for a guest without vmfarm's agent to shut it
    /// down (the caller then waits for the VM to end, and kills it). `Ok(false)`: the guest has
    /// the agent, which shuts it down instead.
    fn power_off(&mut self) -> BoxFuture<'_, Result<bool, BackendError>>;
    /// Ends the guest at once; a guest that has already ended is left as it is.
    fn kill(&mut self) -> BoxFuture<'_, Result<(), BackendError>>;
}
