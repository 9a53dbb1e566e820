//! The Linux calls the jail makes, each wrapped once (libc: the VMM already links it, and the
//! handful of calls here do not justify a second system-call crate in every VMM process).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mount(2); `source` and `fstype` may be `None` for remounts.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let fstype = fstype.map(CString::new).transpose()?;
    let data = data.map(CString::new).transpose()?;
    let target = cstr(target)?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
}

/// umount2(2).
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = cstr(target)?;
    // SAFETY: the path is a NUL-terminated string that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), flags) })
}

/// pivot_root(2) with the same directory twice, as the man page suggests: the old root ends up
/// mounted on top of the new one, to be detached with `umount2(".", MNT_DETACH)`.
pub fn pivot_root_here() -> io::Result<()> {
    let dot = c".";
    // SAFETY: both pointers are NUL-terminated strings that outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    check(if ret < 0 { -1 } else { 0 })
}

/// Makes the current directory the root where `pivot_root` cannot: when the root is the
/// initramfs (rootfs), which can never be unmounted. The current directory's mount is moved
/// over `/` and the process chroots into it; the old root is left below, out of reach of a
/// process without capabilities (what runc does there too).
pub fn move_root_here() -> io::Result<()> {
    mount(
        Some(Path::new(".")),
        Path::new("/"),
        None,
        libc::MS_MOVE,
        None,
    )?;
    let dot = c".";
    // SAFETY: the path is a NUL-terminated string that outlives the call.
    check(unsafe { libc::chroot(dot.as_ptr()) })
}

/// unshare(2).
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes no pointers.
    check(unsafe { libc::unshare(flags) })
}

/// mknod(2) of a character device.
pub fn mknod_char(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    let path = cstr(path)?;
    // SAFETY: the path is a NUL-terminated string that outlives the call.
    check(unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | mode, dev) })
}

/// chown(2), following symbolic links.
pub fn chown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

/// The type of a resource limit's name (`RLIMIT_*`): glibc's enum, musl's int.
#[cfg(target_env = "gnu")]
pub type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
pub type Resource = libc::c_int;

/// Lowers one resource limit to `value` (soft and hard); a limit already lower stays.
pub fn lower_rlimit(resource: Resource, value: u64) -> io::Result<()> {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `current` is a valid rlimit for the kernel to fill.
    check(unsafe { libc::getrlimit(resource, &mut current) })?;
    let limit = libc::rlimit {
        rlim_cur: current.rlim_cur.min(value),
        rlim_max: current.rlim_max.min(value),
    };
    // SAFETY: `limit` is a valid rlimit that outlives the call.
    check(unsafe { libc::setrlimit(resource, &limit) })
}

/// Drops to `uid`:`gid` with no supplementary groups, real, effective and saved alike, so that
/// no capability is left and none can come back.
pub fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups with a count of 0 reads no memory.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: no pointers.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: no pointers.
    check(unsafe { libc::setresuid(uid, uid, uid) })
}

/// prctl(PR_SET_NO_NEW_PRIVS): no exec can ever give this process more privileges.
pub fn no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}

/// prctl(PR_SET_PDEATHSIG, SIGKILL): this process dies with its parent.
pub fn die_with_parent() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) })
}

/// What fork(2) returned.
pub enum Forked {
    /// In the parent: the child's pid.
    Parent(libc::pid_t),
    /// In the child.
    Child,
}

/// fork(2). The caller must be single-threaded (the jail forks before any thread exists), so
/// the child may go on running ordinary Rust code.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: the process is single-threaded (see above), so the child's copy of every lock and
    // allocator state is consistent.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// Waits for `pid` to end; returns its wait status.
pub fn wait_for(pid: libc::pid_t) -> io::Result<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid int for the kernel to fill.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret == pid {
            return Ok(status);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A pipe (both ends close-on-exec).
pub fn pipe() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd as _;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) })?;
    // SAFETY: pipe2 succeeded: both are open descriptors that nothing else owns.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Whether the write end of the pipe whose read end is `read` has been closed everywhere
/// (a non-blocking read sees end of file).
pub fn pipe_closed(read: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd as _;
    let mut byte = 0u8;
    // SAFETY: reads at most one byte into `byte`, which outlives the call.
    let n = unsafe { libc::read(read.as_raw_fd(), (&raw mut byte).cast(), 1) };
    n == 0
}

/// geteuid(2).
pub fn euid() -> u32 {
    // SAFETY: no arguments; cannot fail.
    unsafe { libc::geteuid() }
}

/// getpid(2).
pub fn pid() -> libc::pid_t {
    // SAFETY: no arguments; cannot fail.
    unsafe { libc::getpid() }
}
