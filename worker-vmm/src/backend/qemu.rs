//! The `qemu` backend: qemu-system-x86_64 `-M microvm`, the agent's SSH over a virtio-serial
//! port on a Unix socket, the console on QEMU's stdout, a qcow2 overlay per guest (made as the
//! `kvm` backend makes it, by [`prepare`]).
//!
//! A disk that boots by firmware runs on `-M q35` with OVMF (UEFI) or SeaBIOS, the job's
//! cloud-init seed as a second disk, and a user-mode network (QEMU's slirp) of its own with
//! `restrict=on`: the guest reaches nothing through it, and its port 22 is forwarded from a
//! loopback port of the VMM's network namespace (the jail's own, which the worker enters to
//! connect; the host's when unjailed). The guest's egress is the worker's proxy, reached
//! through SSH as on the agent images.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::process::Command;

use super::jail::{GuestJail, Jailer};
use super::qemu_snapshot::{self, MemoryFile};
use super::{
    AgentChannel, Backend, BackendError, Boot, BootSpec, BoxFuture, CacheMount, ChannelKind,
    LinuxBoot, OVERLAY, Prepared, ProcessVm, SealedMemory, Snapshot, Vm, clear_environment,
    die_with_parent, prepare,
};
use crate::images::recipe::Firmware;

pub(crate) const QEMU: &str = "qemu-system-x86_64";
/// QEMU's TCG translation cache, in MiB. QEMU's own default is up to 1 GiB, which would be
/// resident beside the guest's RAM; this bound is part of what `[jail] memory_overhead` covers.
const TCG_CODE_CACHE_MIB: u32 = 256;
/// OVMF as one image (code and variables; the variables are not kept), Debian package `ovmf`.
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// The loopback port forwarded to a firmware guest's SSH server in a jailed QEMU's own
/// network namespace (where nothing else listens).
const JAILED_SSH_PORT: u16 = 2222;

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Emulation: works everywhere, ~3-5 s to boot a Debian guest.
    Tcg,
    /// The host's /dev/kvm.
    Kvm,
}

#[derive(Debug, Clone)]
pub struct QemuBackend {
    pub accel: Accel,
    /// Jails each QEMU as it can be (see [`QemuBackend::jail_args`]) when set.
    pub jail: Option<Arc<Jailer>>,
}

/// How this host's QEMU is told to change user and root (QEMU 9.1 moved `-runas` and
/// `-chroot` into `-run-with`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunWith {
    /// `-run-with chroot=DIR,user=UID:GID`.
    RunWith,
    /// `-chroot DIR -runas UID:GID`.
    Separate,
}

impl RunWith {
    /// What this host's QEMU takes, read once from its `-help`.
    pub(crate) fn of_host() -> RunWith {
        static FOUND: OnceLock<RunWith> = OnceLock::new();
        *FOUND.get_or_init(|| {
            let help = std::process::Command::new(QEMU)
                .arg("-help")
                .env_clear()
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            RunWith::from_help(&help)
        })
    }

    fn from_help(help: &str) -> RunWith {
        let run_with_user = help
            .lines()
            .any(|l| l.starts_with("-run-with") && l.contains("user="));
        if run_with_user {
            RunWith::RunWith
        } else {
            RunWith::Separate
        }
    }
}

impl QemuBackend {
    pub fn new(accel: Accel) -> Self {
        QemuBackend { accel, jail: None }
    }

    pub fn with_jail(accel: Accel, jail: Option<Arc<Jailer>>) -> Self {
        QemuBackend { accel, jail }
    }

    /// What QEMU offers of a jail: its seccomp sandbox (no obsolete calls, no new processes, no
    /// scheduler or resource changes), and once it has opened its files, `run_dir` as its root
    /// and `jail`'s user. `elevateprivileges` stays `allow`: QEMU installs its filter before it
    /// changes user, so `deny` would kill it at its own setuid; once it has, it has no
    /// capability left to regain.
    pub fn jail_args(run_with: RunWith, run_dir: &Path, jail: &GuestJail) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "-sandbox".into(),
            "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny".into(),
        ];
        let user = format!("{}:{}", jail.uid, jail.gid);
        match run_with {
            RunWith::RunWith => args.extend([
                "-run-with".into(),
                format!("chroot={},user={user}", run_dir.display()),
            ]),
            RunWith::Separate => args.extend([
                "-chroot".into(),
                run_dir.display().to_string(),
                "-runas".into(),
                user,
            ]),
        }
        args
    }

    /// How QEMU runs guest code: `-accel` and `-cpu`.
    fn accel_args(&self) -> [String; 4] {
        let (accel, cpu) = match self.accel {
            Accel::Tcg => (
                format!("tcg,thread=multi,tb-size={TCG_CODE_CACHE_MIB}"),
                "max",
            ),
            Accel::Kvm => ("kvm".to_owned(), "host"),
        };
        ["-accel".into(), accel, "-cpu".into(), cpu.into()]
    }

    /// What every guest has: its size, no default devices, the console on stdout, a random
    /// source.
    fn common_args(&self, spec: &BootSpec) -> Vec<String> {
        let mut args: Vec<String> = self.accel_args().into();
        args.extend([
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-serial".into(),
            "stdio".into(),
            "-object".into(),
            "rng-random,id=rng,filename=/dev/urandom".into(),
        ]);
        args
    }

    /// QEMU's arguments for `spec`, booting `linux` from `overlay` and serving SSH on `socket`;
    /// the guest's memory in `memory` when given (a template snapshot's).
    pub(crate) fn args(
        &self,
        spec: &BootSpec,
        linux: &LinuxBoot,
        overlay: &Path,
        socket: &Path,
        memory: Option<MemoryFile<'_>>,
    ) -> Vec<String> {
        let machine = match memory {
            None => "microvm,rtc=on",
            Some(_) => "microvm,rtc=on,memory-backend=ram",
        };
        let mut args: Vec<String> = vec!["-M".into(), machine.into()];
        args.extend(self.common_args(spec));
        if let Some(memory) = memory {
            args.extend(memory.args(spec.memory_mib));
        }
        args.extend([
            "-kernel".into(),
            linux.kernel.display().to_string(),
            "-append".into(),
            linux.cmdline.clone(),
        ]);
        if let Some(initrd) = &linux.initrd {
            args.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        args.extend([
            "-drive".into(),
            format!(
                "id=root,file={},format=qcow2,if=none,discard=unmap",
                overlay.display()
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
        ]);
        for (i, disk) in spec.cache_disks().iter().enumerate() {
            args.extend([
                "-drive".into(),
                format!(
                    "id=cache{i},file={},format=qcow2,if=none,discard=unmap",
                    disk.display()
                ),
                "-device".into(),
                format!(
                    "virtio-blk-device,drive=cache{i},serial={}",
                    CacheMount::serial(i)
                ),
            ]);
        }
        args.extend([
            // microvm has no keyboard controller: without one a `reboot=k` guest (Linux 6.12)
            // never resets, and QEMU (-no-reboot) never exits.
            "-device".into(),
            "i8042".into(),
            "-device".into(),
            "virtio-rng-device,rng=rng".into(),
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!("socket,id=ssh,path={},server=on,wait=off", socket.display()),
            "-device".into(),
            format!("virtserialport,chardev=ssh,name={}", ChannelKind::QEMU_PORT),
        ]);
        args
    }

    /// QEMU's arguments for `spec`, booting `overlay` by `firmware` with the cloud-init `seed`,
    /// the guest's port 22 forwarded from loopback port `ssh_port`.
    pub fn firmware_args(
        &self,
        spec: &BootSpec,
        firmware: Firmware,
        seed: &Path,
        overlay: &Path,
        ssh_port: u16,
        qmp: &Path,
    ) -> Vec<String> {
        let mut args: Vec<String> = vec!["-M".into(), "q35".into()];
        args.extend(self.common_args(spec));
        if firmware == Firmware::Uefi {
            args.extend(["-bios".into(), OVMF.into()]);
        }
        args.extend([
            "-drive".into(),
            format!(
                "id=disk,file={},format=qcow2,if=none,discard=unmap",
                overlay.display()
            ),
            "-device".into(),
            "virtio-blk-pci,drive=disk,bootindex=0".into(),
            "-drive".into(),
            format!(
                "id=seed,file={},format=raw,if=none,readonly=on",
                seed.display()
            ),
            "-device".into(),
            "virtio-blk-pci,drive=seed".into(),
            "-netdev".into(),
            format!("user,id=net,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"),
            "-device".into(),
            "virtio-net-pci,netdev=net".into(),
            "-device".into(),
            "virtio-rng-pci,rng=rng".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ]);
        args
    }
}

/// The longest line QEMU's control socket may answer with.
pub(crate) const QMP_LINE: usize = 64 * 1024;

/// Presses the ACPI power button of the guest whose QEMU serves QMP on `socket`: the greeting,
/// `qmp_capabilities`, then `system_powerdown`, each answered within 5 s.
pub(crate) async fn press_power_button(socket: &Path) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read.take(QMP_LINE as u64 * 4)).lines();
        let mut answer = async || -> std::io::Result<String> {
            let line = lines
                .next_line()
                .await?
                .ok_or_else(|| std::io::Error::other("QEMU closed its control socket"))?;
            if line.contains("\"error\"") {
                return Err(std::io::Error::other(format!("QEMU refused: {line}")));
            }
            Ok(line)
        };
        answer().await?;
        for command in ["qmp_capabilities", "system_powerdown"] {
            write
                .write_all(format!("{{\"execute\": \"{command}\"}}\n").as_bytes())
                .await?;
            // Events (a line with "event") may come before the answer.
            while answer().await?.contains("\"event\"") {}
        }
        Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
        .await
        .map_err(|_| std::io::Error::other("QEMU's control socket did not answer within 5 s"))?
}

/// A loopback port free now in the host's network namespace (for an unjailed firmware guest).
fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// Connects to loopback `port`, in the network namespace of process `netns` when given: from a
/// thread of its own that enters that namespace and ends after (a thread of the async runtime
/// would stay there).
pub(crate) async fn connect_loopback(
    port: u16,
    netns: Option<u32>,
) -> std::io::Result<tokio::net::TcpStream> {
    let Some(pid) = netns else {
        return tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    };
    let namespace = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vmfarm-netns".into())
        .spawn(move || {
            use std::os::fd::AsRawFd as _;
            // SAFETY: setns takes a descriptor this thread owns; it moves only this thread, which
            // connects and ends.
            let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
            let stream = if entered == 0 {
                std::net::TcpStream::connect(("127.0.0.1", port))
            } else {
                Err(std::io::Error::last_os_error())
            };
            let _ = tx.send(stream);
        })?;
    let stream = rx
        .await
        .map_err(|_| std::io::Error::other("the connecting thread ended"))??;
    stream.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(stream)
}

impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn channel(&self) -> ChannelKind {
        ChannelKind::Vport(ChannelKind::QEMU_PORT.into())
    }

    fn emulated(&self) -> bool {
        self.accel == Accel::Tcg
    }

    fn boot<'a>(&'a self, spec: &'a BootSpec) -> BoxFuture<'a, Result<Box<dyn Vm>, BackendError>> {
        Box::pin(self.boot_with(spec, None))
    }

    fn snapshot_version(&self) -> Option<String> {
        Some(format!(
            "{} ({:?})",
            qemu_snapshot::qemu_version(),
            self.accel
        ))
    }

    fn save<'a>(
        &'a self,
        spec: &'a BootSpec,
        into: &'a Snapshot,
        timeout: Duration,
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

impl QemuBackend {
    /// Starts QEMU for `spec`; with `restore`, the guest's memory is a snapshot's file and QEMU
    /// waits for the devices' state (`-incoming defer`) on its control socket at the path given
    /// (a kernel boot only).
    pub(crate) async fn boot_with(
        &self,
        spec: &BootSpec,
        restore: Option<(MemoryFile<'_>, &Path)>,
    ) -> Result<Box<dyn Vm>, BackendError> {
        {
            let Prepared { dir, overlay, jail } = prepare(spec, self.jail.as_ref())?;
            let mut command = Command::new(QEMU);
            let channel = match &spec.boot {
                Boot::Linux(linux) => {
                    let socket = dir.0.join("ssh.sock");
                    let memory = restore.map(|r| r.0);
                    match restore {
                        None => command.args(self.args(spec, linux, &overlay, &socket, memory)),
                        // A restored guest's overlay is opened again when it resumes, after a
                        // jailed QEMU entered its root (the guest's folder) as the jail's user:
                        // the overlay is named from the folder, QEMU's working directory both
                        // before and after, and is that user's (it is that guest's own disk).
                        Some(_) => {
                            if let Some(jail) = &jail {
                                std::os::unix::fs::chown(&overlay, Some(jail.uid), Some(jail.gid))
                                    .map_err(BackendError::RunDir)?;
                            }
                            command.current_dir(&dir.0).args(self.args(
                                spec,
                                linux,
                                Path::new(OVERLAY),
                                &socket,
                                memory,
                            ))
                        }
                    };
                    if let Some((_, qmp)) = restore {
                        command.args([
                            "-incoming".into(),
                            "defer".into(),
                            "-qmp".into(),
                            format!("unix:{},server=on,wait=off", qmp.display()),
                        ]);
                    }
                    AgentChannel::SerialSocket(socket)
                }
                Boot::Firmware { firmware, seed } => {
                    if *firmware == Firmware::Uefi && !Path::new(OVMF).is_file() {
                        return Err(BackendError::MissingTool {
                            tool: OVMF,
                            package: "ovmf",
                        });
                    }
                    let port = match jail {
                        Some(_) => JAILED_SSH_PORT,
                        None => free_loopback_port().map_err(BackendError::Spawn)?,
                    };
                    let qmp = dir.0.join("qmp.sock");
                    command.args(self.firmware_args(spec, *firmware, seed, &overlay, port, &qmp));
                    AgentChannel::Loopback {
                        port,
                        own_netns: jail.is_some(),
                        qmp,
                    }
                }
            };
            // First: the confinement's forks must leave a process that dies with the worker.
            die_with_parent(command.as_std_mut());
            if let Some(jail) = &jail {
                command.args(Self::jail_args(RunWith::of_host(), &dir.0, jail));
                confine_before_exec(&mut command, jail).map_err(BackendError::Spawn)?;
            }
            clear_environment(&mut command);
            command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            let child = command.spawn().map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => BackendError::MissingTool {
                    tool: QEMU,
                    package: "qemu-system-x86",
                },
                _ => BackendError::Spawn(e),
            })?;
            Ok(Box::new(ProcessVm::new(child, channel, jail, dir)) as Box<dyn Vm>)
        }
    }
}

/// Closes every descriptor of the calling process (async-signal-safe).
fn close_all() {
    // SAFETY: close_range takes no pointers; closing descriptors this process owns.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) };
    if ret != 0 {
        for fd in 0..4096 {
            // SAFETY: as above; an fd that is not open gives EBADF.
            unsafe { libc::close(fd) };
        }
    }
}

/// How the process `pid` ended, as an exit status (128 + the signal that killed it); for the
/// waiting processes between fork and exec (async-signal-safe: waitpid only).
fn wait_status(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid int for the kernel to fill.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret == pid {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 127;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

/// Between fork and exec: joins the guest's cgroups, unshares the IPC, UTS, network and PID
/// namespaces (the new network namespace has its loopback up and nothing else: a firmware
/// guest's SSH port is forwarded there; agent guests' sockets are files in their folder),
/// lowers the resource limits as `vm run --jail` does, and forks twice so that QEMU runs below
/// a PID 1 that dies with the worker.
pub(crate) fn confine_before_exec(command: &mut Command, jail: &GuestJail) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    use vmfarm_vmm::jail::{MAX_OPEN_FILES, MAX_PROCESSES};
    // Made here: the child may not allocate.
    let procs: Vec<std::ffi::CString> = jail
        .cgroups
        .iter()
        .map(|c| std::ffi::CString::new(c.join("cgroup.procs").as_os_str().as_bytes()))
        .collect::<Result<_, _>>()?;
    let err = std::io::Error::last_os_error;
    // SAFETY: the closure runs in the child between fork and exec and only makes system calls
    // (open, write, close, unshare, socket, ioctl, setrlimit, fork, prctl, waitpid, _exit) on
    // memory made before the fork; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            for path in &procs {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(err());
                }
                // "0" is the writing process.
                let written = libc::write(fd, c"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(err());
                }
            }
            if libc::unshare(
                libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET | libc::CLONE_NEWPID,
            ) != 0
            {
                return Err(err());
            }
            // The loopback interface up: `lo` with IFF_UP (an all-zero ifreq is a valid value
            // of the plain C struct, on this stack).
            let mut loopback: libc::ifreq = std::mem::zeroed();
            loopback.ifr_name[0] = b'l' as libc::c_char;
            loopback.ifr_name[1] = b'o' as libc::c_char;
            loopback.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if socket < 0 {
                return Err(err());
            }
            let up = libc::ioctl(socket, libc::SIOCSIFFLAGS, &loopback);
            let failed = (up != 0).then(err);
            libc::close(socket);
            if let Some(e) = failed {
                return Err(e);
            }
            for (resource, value) in [
                (libc::RLIMIT_NOFILE, MAX_OPEN_FILES),
                (libc::RLIMIT_NPROC, MAX_PROCESSES * 2),
                (libc::RLIMIT_CORE, 0),
            ] {
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(resource, &mut limit) != 0 {
                    return Err(err());
                }
                limit.rlim_cur = limit.rlim_cur.min(value);
                limit.rlim_max = limit.rlim_max.min(value);
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(err());
                }
            }
            // This process only waits and passes on how QEMU ended; its child is PID 1 of the
            // new PID namespace and dies with it (PR_SET_PDEATHSIG); QEMU is that one's child,
            // so it goes when either goes, although its change of user clears its own
            // parent-death signal.
            // The waiting processes close every descriptor: the console pipe must end with
            // QEMU, and the pipe through which exec reports to the spawner must close at exec.
            match libc::fork() {
                -1 => return Err(err()),
                0 => {}
                child => {
                    close_all();
                    libc::_exit(wait_status(child))
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                libc::_exit(127);
            }
            match libc::fork() {
                -1 => libc::_exit(127),
                0 => Ok(()),
                qemu => {
                    close_all();
                    libc::_exit(wait_status(qemu))
                }
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_args_boot_microvm_with_the_contracts_devices() {
        let linux = LinuxBoot {
            kernel: "/img/kernel".into(),
            initrd: Some("/img/initrd".into()),
            cmdline: "console=ttyS0".into(),
        };
        let spec = BootSpec {
            boot: Boot::Linux(linux.clone()),
            base_disk: "/img/rootfs.qcow2".into(),
            vcpus: 2,
            memory_mib: 1024,
            run_dir: "/run/g".into(),
            caches: Vec::new(),
        };
        let args = QemuBackend::new(Accel::Tcg).args(
            &spec,
            &linux,
            Path::new("/run/g/o.qcow2"),
            Path::new("/run/g/s"),
            None,
        );
        let text = args.join(" ");
        for part in [
            "-M microvm,rtc=on -accel tcg,thread=multi,tb-size=256",
            "-smp 2 -m 1024M",
            "-nodefaults -no-user-config -nographic",
            "-kernel /img/kernel -append console=ttyS0 -initrd /img/initrd",
            "file=/run/g/o.qcow2,format=qcow2",
            "virtio-rng-device",
            "-no-reboot",
            "-device i8042",
            "socket,id=ssh,path=/run/g/s,server=on,wait=off",
            "virtserialport,chardev=ssh,name=org.vmfarm.ssh",
        ] {
            assert!(text.contains(part), "{part} missing from {text}");
        }
        assert!(!text.contains("netdev"), "guests have no network");
    }

    #[test]
    fn test_firmware_args_boot_the_disk_with_its_seed_and_a_closed_network() {
        let spec = BootSpec {
            boot: Boot::Firmware {
                firmware: Firmware::Uefi,
                seed: "/run/g/seed.img".into(),
            },
            base_disk: "/img/disk.qcow2".into(),
            vcpus: 2,
            memory_mib: 2048,
            run_dir: "/run/g".into(),
            caches: Vec::new(),
        };
        let backend = QemuBackend::new(Accel::Kvm);
        let args = backend.firmware_args(
            &spec,
            Firmware::Uefi,
            Path::new("/run/g/seed.img"),
            Path::new("/run/g/o.qcow2"),
            2222,
            Path::new("/run/g/qmp.sock"),
        );
        let text = args.join(" ");
        for part in [
            "-M q35 -accel kvm -cpu host -smp 2 -m 2048M",
            &format!("-bios {OVMF}"),
            "id=disk,file=/run/g/o.qcow2,format=qcow2",
            "virtio-blk-pci,drive=disk,bootindex=0",
            "id=seed,file=/run/g/seed.img,format=raw,if=none,readonly=on",
            // The only way in: port 22 from loopback; restrict=on: no way out.
            "-netdev user,id=net,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22",
            "-qmp unix:/run/g/qmp.sock,server=on,wait=off",
            "-serial stdio",
        ] {
            assert!(text.contains(part), "{part} missing from {text}");
        }
        assert!(
            !text.contains("-kernel"),
            "the disk's own boot loader boots it"
        );
        let bios = backend.firmware_args(
            &spec,
            Firmware::Bios,
            Path::new("/run/g/seed.img"),
            Path::new("/run/g/o.qcow2"),
            2222,
            Path::new("/run/g/qmp.sock"),
        );
        assert!(!bios.join(" ").contains("-bios"), "SeaBIOS is QEMU's own");
    }

    #[test]
    fn test_jail_args_fit_the_hosts_qemu() {
        let old = "-chroot dir     chroot to dir just before starting the VM\n\
                   -runas user     change to user id user just before starting the VM\n";
        let new = "-run-with [async-teardown=on|off][,chroot=dir][,user=username|uid:gid]\n";
        assert_eq!(RunWith::from_help(old), RunWith::Separate);
        assert_eq!(RunWith::from_help(new), RunWith::RunWith);
        // 8.x: -run-with without user= still needs -runas.
        assert_eq!(
            RunWith::from_help("-run-with [async-teardown=on|off][,chroot=dir]\n"),
            RunWith::Separate
        );
        let (jailer, _) = super::super::jail::tests::jailer_without_cgroups();
        let jail = jailer.guest(1, 256).unwrap();
        let dir = Path::new("/run/g");
        let text = QemuBackend::jail_args(RunWith::Separate, dir, &jail).join(" ");
        let user = format!("{}:{}", jail.uid, jail.gid);
        assert!(text.starts_with("-sandbox on,obsolete=deny,"), "{text}");
        assert!(text.contains("spawn=deny,resourcecontrol=deny"), "{text}");
        assert!(
            text.ends_with(&format!("-chroot /run/g -runas {user}")),
            "{text}"
        );
        let text = QemuBackend::jail_args(RunWith::RunWith, dir, &jail).join(" ");
        assert!(
            text.ends_with(&format!("-run-with chroot=/run/g,user={user}")),
            "{text}"
        );
    }

    /// What runs with QEMU's confinement (here a shell in QEMU's place) runs as PID 2 of a PID
    /// namespace of its own, in new IPC, UTS and network namespaces, with the limits, and its
    /// output and exit status come through.
    #[tokio::test]
    async fn test_confinement_before_exec() {
        // SAFETY: geteuid takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: namespaces need root");
            return;
        }
        let (jailer, _) = super::super::jail::tests::jailer_without_cgroups();
        let jail = jailer.guest(1, 256).unwrap();
        let mut command = Command::new("/bin/sh");
        command
            .args([
                "-c",
                "echo $$; readlink /proc/self/ns/net; ulimit -n; exit 3",
            ])
            .stdout(Stdio::piped());
        confine_before_exec(&mut command, &jail).unwrap();
        let out = tokio::time::timeout(std::time::Duration::from_secs(10), command.output())
            .await
            .expect("the confined shell ends")
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        let our_net = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "2", "PID 2 of its own namespace: {text}");
        assert_ne!(lines[1], our_net.to_string_lossy(), "{text}");
        assert_eq!(lines[2], "1024", "{text}");
        assert_eq!(out.status.code(), Some(3));

        // Spawning returns at once, and the program goes on running.
        let mut command = Command::new("sh");
        command
            .args(["-c", "sleep 1; echo done"])
            .stdout(Stdio::piped())
            .env_clear();
        confine_before_exec(&mut command, &jail).unwrap();
        let started = std::time::Instant::now();
        let child = command.spawn().unwrap();
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
        let out = child.wait_with_output().await.unwrap();
        assert_eq!(out.stdout, b"done\n");
        assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    }
}
