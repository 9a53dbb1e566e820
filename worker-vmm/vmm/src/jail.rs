//! The jail of `vmfarm vm run --jail DIR --jail-uid UID` (Firecracker's jailer is the model),
//! entered before the VM is built, in this order:
//!
//! 1. [`plan`]: every file the VM reads from outside DIR (kernel, initrd, read-only disks and the
//!    backing chain of every qcow2 disk) is to be shown read-only inside DIR at its own absolute
//!    path (so the backing names in qcow2 headers stay valid); the paths inside DIR (the
//!    writable disk, the vsock socket, a console file) become paths from DIR as `/`. A writable
//!    disk, the vsock socket or a console file outside DIR is refused.
//! 2. The process joins the cgroups it was given (the worker made them, with the guest's
//!    memory, CPU and pids limits), then unshares its mount, PID, IPC, UTS and network
//!    namespaces and forks: the child is PID 1 of the new PID namespace (when it ends, every
//!    process in it ends); the parent only waits for it and exits as it did, and the child dies
//!    with the parent (`PR_SET_PDEATHSIG`, set once the child has its user, as a change of user
//!    clears it), so a worker that kills `vm run` kills the VMM.
//! 3. In the child: mounts stop propagating to the host; DIR is bind-mounted on itself
//!    (nosuid, nodev, noexec) and given to the jail's uid with the writable disks; a small tmpfs
//!    on DIR/dev holds one node, `kvm`, owned by the jail's uid; the outside files are
//!    bind-mounted read-only (nosuid, nodev, noexec); then `pivot_root` makes DIR the root and the
//!    old root is detached: nothing else of the host is reachable. (Where the host's root is an
//!    initramfs, which cannot be pivoted, DIR is moved over `/` and chrooted into instead.)
//! 4. Resource limits (open files, processes, no core dumps), then the jail's uid and gid with
//!    no supplementary groups (every capability goes with uid 0), `no_new_privs`, and an empty
//!    environment.
//!
//! The VM is then built as that user; [`crate::seccomp`] closes the last door before the vCPUs
//! run.

pub mod sys;

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::config::{ConsoleConfig, VmConfig};
use super::qcow2::MAX_BACKING_DEPTH;
use super::qcow2::header::Header;

/// Where and as whom the VMM is jailed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    /// The folder that becomes the VMM's root (the guest's run directory).
    pub root: PathBuf,
    /// The unprivileged user the VMM runs as.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// cgroup directories to join (one per hierarchy with cgroup v1, one with v2).
    pub cgroups: Vec<PathBuf>,
}

/// Open files the jailed VMM may hold: disks, KVM's (a few per vCPU), vsock connections.
pub const MAX_OPEN_FILES: u64 = 1024;
/// Processes (threads) the jail's uid may have: vCPUs, device threads and a few more.
pub const MAX_PROCESSES: u64 = 128;

/// The jail could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Namespaces, mounts and other users are root's.
    #[error(
        "--jail needs root (this process's effective uid is {0}); run `vm run` without --jail, \
         or as root"
    )]
    NotRoot(u32),
    /// A jailed VMM as root would be no jail.
    #[error("--jail-uid 0: the jail's user must not be root")]
    RootUid,
    /// A file the VMM writes or creates is not in the jail's folder.
    #[error(
        "{what} {} is outside the jail's folder {}: the jailed VMM can only write there",
        path.display(),
        root.display()
    )]
    Outside {
        /// `--disk`, `--vsock`, `--console`.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The jail's folder.
        root: PathBuf,
    },
    /// A qcow2 disk's backing chain could not be read.
    #[error("reading the backing chain of {}", path.display())]
    Chain {
        /// The image whose header failed.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// One step of setting the jail up failed.
    #[error("{step}")]
    Step {
        /// What was being done.
        step: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn step(what: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let step = what.into();
    move |source| JailError::Step { step, source }
}

/// What entering the jail does to a VM's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The configuration with the paths the VMM sees inside the jail.
    pub config: VmConfig,
    /// Host files shown read-only in the jail at their own absolute paths.
    pub binds: Vec<PathBuf>,
    /// Files inside the jail's folder the jail's user must own (writable disks).
    pub owned: Vec<PathBuf>,
}

/// `path` made absolute with its symbolic links resolved; a path that does not exist yet (a
/// socket the VMM creates) is resolved through its parent.
fn resolve(path: &Path) -> io::Result<PathBuf> {
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let name = path.file_name().ok_or(e)?;
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            Ok(std::fs::canonicalize(parent)?.join(name))
        }
        Err(e) => Err(e),
    }
}

/// `path` as the jailed VMM sees it, if it is inside `root` (which is resolved).
fn inside(root: &Path, path: &Path) -> io::Result<Option<PathBuf>> {
    let path = resolve(path)?;
    Ok(path
        .strip_prefix(root)
        .ok()
        .map(|rel| Path::new("/").join(rel)))
}

/// The files below the qcow2 image at `path`: its backing file, that one's, and so on, as their
/// headers name them (absolute paths, as vmfarm's qcow2 code requires). Empty for a raw image.
pub fn backing_chain(path: &Path) -> Result<Vec<PathBuf>, JailError> {
    let chain_err = |path: &Path| {
        let path = path.to_owned();
        move |e: Box<dyn std::error::Error + Send + Sync>| JailError::Chain { path, source: e }
    };
    let mut chain = Vec::new();
    let mut current = path.to_owned();
    loop {
        let file = File::open(&current).map_err(|e| chain_err(&current)(e.into()))?;
        let backing = match Header::read(&file).map_err(|e| chain_err(&current)(e.into()))? {
            Some(header) => header
                .backing_file(&file)
                .map_err(|e| chain_err(&current)(e.into()))?,
            None => None,
        };
        let Some(backing) = backing else {
            return Ok(chain);
        };
        if chain.len() >= MAX_BACKING_DEPTH {
            return Err(chain_err(path)("the backing chain is too deep".into()));
        }
        let backing = PathBuf::from(backing);
        if !backing.is_absolute() {
            return Err(chain_err(&current)(
                format!("backing file {} is not an absolute path", backing.display()).into(),
            ));
        }
        chain.push(backing.clone());
        current = backing;
    }
}

/// What the jail rooted at `root` (resolved) does to `config`: see the module's step 1.
/// `chain` gives the backing files of a disk (see [`backing_chain`]).
pub fn plan(
    root: &Path,
    config: &VmConfig,
    chain: impl Fn(&Path) -> Result<Vec<PathBuf>, JailError>,
) -> Result<Plan, JailError> {
    let mut binds = BTreeSet::new();
    let mut owned = Vec::new();
    let io_err = |path: &Path| step(format!("resolving {}", path.display()));
    // A file only read: its path in the jail, bound from outside if need be.
    let read_only = |path: &Path, binds: &mut BTreeSet<PathBuf>| -> Result<PathBuf, JailError> {
        match inside(root, path).map_err(io_err(path))? {
            Some(jailed) => Ok(jailed),
            None => {
                // As named, not resolved: the VMM opens it by this name.
                let host = std::path::absolute(path).map_err(io_err(path))?;
                binds.insert(host.clone());
                Ok(host)
            }
        }
    };
    let mut jailed = config.clone();
    jailed.kernel = read_only(&config.kernel, &mut binds)?;
    jailed.initrd = config
        .initrd
        .as_deref()
        .map(|i| read_only(i, &mut binds))
        .transpose()?;
    let outside = |what, path: &Path| JailError::Outside {
        what,
        path: path.to_owned(),
        root: root.to_owned(),
    };
    for disk in &mut jailed.disks {
        let host = disk.path.clone();
        if disk.read_only {
            disk.path = read_only(&host, &mut binds)?;
        } else {
            disk.path = inside(root, &host)
                .map_err(io_err(&host))?
                .ok_or_else(|| outside("--disk", &host))?;
            owned.push(resolve(&host).map_err(io_err(&host))?);
        }
        binds.extend(chain(&host)?);
    }
    if let Some(vsock) = &config.vsock {
        jailed.vsock = Some(
            inside(root, vsock)
                .map_err(io_err(vsock))?
                .ok_or_else(|| outside("--vsock", vsock))?,
        );
    }
    if let ConsoleConfig::File(file) = &config.console {
        jailed.console = ConsoleConfig::File(
            inside(root, file)
                .map_err(io_err(file))?
                .ok_or_else(|| outside("--console", file))?,
        );
    }
    Ok(Plan {
        config: jailed,
        binds: binds.into_iter().collect(),
        owned,
    })
}

/// Enters the jail (the module's steps) and returns `config` with the paths the VMM sees in it.
/// Returns in the jailed child only: the parent waits for the child and exits as it did.
pub fn enter(spec: &JailSpec, config: &VmConfig) -> Result<VmConfig, JailError> {
    let euid = sys::euid();
    if euid != 0 {
        return Err(JailError::NotRoot(euid));
    }
    if spec.uid == 0 || spec.gid == 0 {
        return Err(JailError::RootUid);
    }
    let root = std::fs::canonicalize(&spec.root)
        .map_err(step(format!("the jail's folder {}", spec.root.display())))?;
    let plan = plan(&root, config, backing_chain)?;
    for cgroup in &spec.cgroups {
        let procs = cgroup.join("cgroup.procs");
        std::fs::write(&procs, sys::pid().to_string())
            .map_err(step(format!("joining the cgroup {}", cgroup.display())))?;
    }
    sys::unshare(
        libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWNET,
    )
    .map_err(step("unsharing the namespaces"))?;
    // The child learns through this pipe whether the parent died before PR_SET_PDEATHSIG was
    // set (the write end closes with the parent).
    let (alive_r, alive_w) = sys::pipe().map_err(step("making a pipe"))?;
    match sys::fork().map_err(step("forking the VMM"))? {
        sys::Forked::Parent(child) => {
            drop(alive_r);
            std::process::exit(wait_for_vmm(child));
        }
        sys::Forked::Child => drop(alive_w),
    }
    build_root(&root, &plan, spec)?;
    sys::lower_rlimit(libc::RLIMIT_NOFILE, MAX_OPEN_FILES).map_err(step("RLIMIT_NOFILE"))?;
    sys::lower_rlimit(libc::RLIMIT_NPROC, MAX_PROCESSES).map_err(step("RLIMIT_NPROC"))?;
    sys::lower_rlimit(libc::RLIMIT_CORE, 0).map_err(step("RLIMIT_CORE"))?;
    sys::become_user(spec.uid, spec.gid)
        .map_err(step(format!("becoming uid {} gid {}", spec.uid, spec.gid)))?;
    // Set only now: a change of user clears it. Then the pipe says whether the parent died
    // before it was set.
    sys::die_with_parent().map_err(step("PR_SET_PDEATHSIG"))?;
    if sys::pipe_closed(&alive_r) {
        std::process::exit(1);
    }
    drop(alive_r);
    sys::no_new_privs().map_err(step("PR_SET_NO_NEW_PRIVS"))?;
    for (key, _) in std::env::vars_os() {
        // SAFETY: the process is single-threaded here (the VM's threads start later), so no
        // other thread reads the environment while it changes.
        unsafe { std::env::remove_var(key) };
    }
    Ok(plan.config)
}

/// The parent's part: waits for the VMM and gives its exit status (128 + the signal if it was
/// killed, saying which when it was seccomp's).
fn wait_for_vmm(child: libc::pid_t) -> i32 {
    let status = match sys::wait_for(child) {
        Ok(status) => status,
        Err(e) => {
            eprintln!("vmfarm vm run: waiting for the jailed VMM: {e}");
            return 4;
        }
    };
    if libc::WIFEXITED(status) {
        return libc::WEXITSTATUS(status);
    }
    let signal = libc::WTERMSIG(status);
    if signal == libc::SIGSYS {
        eprintln!(
            "vmfarm vm run: the VMM was killed by SIGSYS: it made a system call its seccomp \
             filter does not allow"
        );
    } else {
        eprintln!("vmfarm vm run: the VMM was killed by signal {signal}");
    }
    128 + signal
}

/// Step 3 of the module: the jail's file system, then `pivot_root` into it.
fn build_root(root: &Path, plan: &Plan, spec: &JailSpec) -> Result<(), JailError> {
    use libc::{MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_REC, MS_REMOUNT};
    sys::mount(None, Path::new("/"), None, MS_REC | MS_PRIVATE, None)
        .map_err(step("making the mounts private"))?;
    let jail_dir = || step(format!("mounting the jail's folder {}", root.display()));
    sys::mount(Some(root), root, None, MS_BIND, None).map_err(jail_dir())?;
    sys::mount(
        None,
        root,
        None,
        MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC,
        None,
    )
    .map_err(jail_dir())?;
    for path in std::iter::once(root).chain(plan.owned.iter().map(PathBuf::as_path)) {
        sys::chown(path, spec.uid, spec.gid).map_err(step(format!(
            "giving {} to the jail's user",
            path.display()
        )))?;
    }
    make_dev(root, spec)?;
    for host in &plan.binds {
        bind_read_only(root, host)?;
    }
    let pivot = || step(format!("pivot_root into {}", root.display()));
    std::env::set_current_dir(root).map_err(pivot())?;
    match sys::pivot_root_here() {
        Ok(()) => sys::umount(Path::new("."), libc::MNT_DETACH).map_err(pivot())?,
        // The root is the initramfs (as in the KVM lab's L1): move and chroot instead.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            sys::move_root_here().map_err(pivot())?;
        }
        Err(e) => return Err(pivot()(e)),
    }
    std::env::set_current_dir("/").map_err(pivot())?;
    Ok(())
}

/// A tmpfs on `root`/dev holding `kvm`, a node of the host's /dev/kvm device owned by the jail's
/// user (nothing else of /dev is needed: guest entropy comes from getrandom).
fn make_dev(root: &Path, spec: &JailSpec) -> Result<(), JailError> {
    let dev = root.join("dev");
    let failed = || step(format!("making {}", dev.display()));
    match std::fs::create_dir(&dev) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(failed()(e)),
        _ => {}
    }
    sys::mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=16k,nr_inodes=8"),
    )
    .map_err(failed())?;
    let kvm = std::fs::metadata("/dev/kvm").map_err(step("/dev/kvm"))?;
    if !kvm.file_type().is_char_device() {
        return Err(step("/dev/kvm")(io::Error::other(
            "it is not a character device",
        )));
    }
    let node = dev.join("kvm");
    sys::mknod_char(&node, 0o600, kvm.rdev()).map_err(failed())?;
    sys::chown(&node, spec.uid, spec.gid).map_err(failed())
}

/// Shows the host file `host` read-only at the same path under `root`.
fn bind_read_only(root: &Path, host: &Path) -> Result<(), JailError> {
    use libc::{MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT};
    let target = root.join(host.strip_prefix("/").unwrap_or(host));
    let failed = || step(format!("showing {} in the jail", host.display()));
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(failed())?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&target)
        .map_err(failed())?;
    sys::mount(Some(host), &target, None, MS_BIND, None).map_err(failed())?;
    sys::mount(
        None,
        &target,
        None,
        MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
        None,
    )
    .map_err(failed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;

    fn config(dir: &Path) -> VmConfig {
        VmConfig {
            // Outside files need not exist: `resolve` falls back to their parent, and / exists.
            kernel: "/kernel-for-test".into(),
            initrd: None,
            disks: vec![
                DiskConfig {
                    path: dir.join("overlay.qcow2"),
                    read_only: false,
                },
                DiskConfig {
                    path: "/extra-for-test.raw".into(),
                    read_only: true,
                },
            ],
            vsock: Some(dir.join("vsock.sock")),
            rng: true,
            cpus: 1,
            memory: 512 << 20,
            cmdline: String::new(),
            virtio_mmio_cmdline: false,
            console: ConsoleConfig::Stdout,
            timeout: None,
        }
    }

    /// Files outside the folder keep their paths and are bound read-only (with the backing
    /// chain); files inside it are seen from it as `/`; the writable disk is the jail user's.
    #[test]
    fn test_plan_binds_what_is_read_and_moves_what_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::write(root.join("overlay.qcow2"), b"").unwrap();
        let cfg = config(&root);
        let chain = |disk: &Path| -> Result<Vec<PathBuf>, JailError> {
            Ok(if disk.ends_with("overlay.qcow2") {
                vec!["/base-for-test.qcow2".into()]
            } else {
                Vec::new()
            })
        };
        let plan = plan(&root, &cfg, chain).unwrap();
        assert_eq!(plan.config.kernel, PathBuf::from("/kernel-for-test"));
        assert_eq!(plan.config.disks[0].path, PathBuf::from("/overlay.qcow2"));
        assert_eq!(
            plan.config.disks[1].path,
            PathBuf::from("/extra-for-test.raw")
        );
        assert_eq!(plan.config.vsock, Some(PathBuf::from("/vsock.sock")));
        assert_eq!(
            plan.binds,
            [
                "/base-for-test.qcow2",
                "/extra-for-test.raw",
                "/kernel-for-test"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(plan.owned, [root.join("overlay.qcow2")]);
    }

    #[test]
    fn test_plan_refuses_what_the_vmm_would_write_outside() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let none = |_: &Path| Ok(Vec::new());
        let mut cfg = config(&root);
        cfg.disks[0].path = "/elsewhere.qcow2".into();
        let err = plan(&root, &cfg, none).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--disk /elsewhere.qcow2 is outside"),
            "{err}"
        );
        let mut cfg = config(&root);
        cfg.vsock = Some("/run-elsewhere.sock".into());
        let err = plan(&root, &cfg, none).unwrap_err();
        assert!(err.to_string().starts_with("--vsock"), "{err}");
        let mut cfg = config(&root);
        cfg.console = ConsoleConfig::File("/console-elsewhere.log".into());
        let err = plan(&root, &cfg, none).unwrap_err();
        assert!(err.to_string().starts_with("--console"), "{err}");
    }

    #[test]
    fn test_backing_chain_follows_qcow2_headers() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let base = crate::qcow2::test_utils::qcow2_from(&root, "base.qcow2", b"base");
        let overlay = root.join("overlay.qcow2");
        crate::qcow2::overlay::create_overlay(&base, &overlay).unwrap();
        let top = root.join("top.qcow2");
        crate::qcow2::overlay::create_overlay(&overlay, &top).unwrap();
        assert_eq!(
            backing_chain(&top).unwrap(),
            [overlay.clone(), base.clone()]
        );
        assert_eq!(backing_chain(&base).unwrap(), Vec::<PathBuf>::new());
        let raw = root.join("disk.raw");
        std::fs::write(&raw, [0u8; 4096]).unwrap();
        assert!(backing_chain(&raw).unwrap().is_empty());
    }
}
