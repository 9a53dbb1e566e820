//! The seccomp filter of a running VMM (seccompiler, rust-vmm's): installed on every thread
//! (TSYNC) once the VM is built and before a vCPU runs guest code, so that the guest can only
//! ever reach a process that makes the system calls listed here; any other kills the process
//! (SIGSYS), as Firecracker's filters do.
//!
//! What the running VMM does, and so what the filter allows (x86_64):
//! - vCPU threads: `ioctl` KVM_RUN on their vCPU (and KVM_GET_REGS/KVM_GET_SREGS to say where a
//!   triple fault happened; KVM_IRQFD when the devices let go of their interrupt lines at the
//!   end); port and MMIO exits are handled in the process: the serial console
//!   `write`s to stdout or its file, interrupts are `write`s to irqfd eventfds, the buses are
//!   behind mutexes (`futex`); the kick that stops a vCPU is a signal (`tgkill` to this process
//!   only; musl's pthread_kill uses `tkill`, which names a thread alone: jailed, only this
//!   process's threads are in its PID namespace), `rt_sigreturn`, `rt_sigprocmask`.
//! - virtio-blk: `pread64`/`pwrite64`/`preadv`/`pwritev`, `fsync`/`fdatasync`, `fallocate` (discard
//!   and write-zeroes), `lseek`, `fstat`/`statx`/`newfstatat`, `ftruncate` (a qcow2 overlay grows).
//! - virtio-vsock: its epoll loop (`epoll_wait`/`epoll_pwait`/`epoll_ctl`, eventfd `read`s),
//!   `accept4` on the host socket, `socket` (AF_UNIX only) and `connect` for a guest's connection
//!   to `<socket>_PORT`, `read`/`write`/`recvfrom`/`sendto`/`recvmsg`/`sendmsg`/`shutdown` on the
//!   streams, `ioctl` FIONBIO/FIOCLEX and `fcntl` on them, `close`, and `unlink` of the socket
//!   file when the device goes.
//! - virtio-rng: `getrandom`.
//! - `--save` only: the `ioctl`s that read the paused VM's state (KVM_GET_MP_STATE, _XSAVE,
//!   _XCRS, _DEBUGREGS, _LAPIC, _MSRS, _VCPU_EVENTS on the vCPUs; KVM_GET_IRQCHIP, _PIT2,
//!   _CLOCK on the VM), and the `pwrite64`s, `write`s and `fsync`s of the snapshot's files,
//!   opened before.
//! - Its own end: `Vm::run` returns, the devices are dropped (`KVM_IRQFD` deassign, `unlink`,
//!   `close`), guest memory unmapped, `exit_group`; the log lines are `write`s to stderr.
//! - Threads and memory as Rust's std and the C library do them: `mmap`/`munmap`/`mprotect`/
//!   `madvise`/`mremap`/`brk`, `clone` of threads only (CLONE_THREAD; `clone3`, whose flags a
//!   filter cannot see, fails with ENOSYS so that the C library falls back to `clone`),
//!   `set_robust_list`, `rseq`, `sigaltstack`, `prctl` PR_SET_NAME (thread names),
//!   `sched_getaffinity`, `sched_yield`, `gettid`, `getpid`, `exit`, `exit_group`,
//!   `restart_syscall`.
//! - Time: `clock_gettime`, `clock_nanosleep`, `nanosleep`, `gettimeofday` (when the vDSO is not
//!   used, e.g. on a clock source it cannot read).
//!
//! Nothing that opens a file by name (`open`, `openat`), executes (`execve`), makes another
//! process, changes identity, namespaces or mounts, traces, or opens a network socket is
//! allowed: the running VMM has every file it needs open already. (glibc's malloc opens
//! /proc/sys/vm/overcommit_memory when a thread's own arena shrinks: `vm run` keeps one arena,
//! `run::one_malloc_arena`.)

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What happens on a system call outside the filter (`vm run --seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// The process is killed (SIGSYS): the default.
    Kill,
    /// The call is allowed and logged by the kernel (dmesg: `audit: type=1326 ... syscall=N`),
    /// for finding what a new code path needs.
    Log,
    /// No filter.
    Off,
}

/// Building or installing the filter failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be compiled (a bug in the rules).
    #[error("compiling the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    /// The kernel refused it.
    #[error("installing the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_REGS,
    kvm_bindings::KVMIO,
    0x81,
    kvm_bindings::kvm_regs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_SREGS,
    kvm_bindings::KVMIO,
    0x83,
    kvm_bindings::kvm_sregs
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_IRQFD,
    kvm_bindings::KVMIO,
    0x76,
    kvm_bindings::kvm_irqfd
);

// What `vm run --save` reads of a paused VM (crate::snapshot::kvm_state).
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_MP_STATE,
    kvm_bindings::KVMIO,
    0x98,
    kvm_bindings::kvm_mp_state
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XSAVE,
    kvm_bindings::KVMIO,
    0xa4,
    kvm_bindings::kvm_xsave
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XCRS,
    kvm_bindings::KVMIO,
    0xa6,
    kvm_bindings::kvm_xcrs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_DEBUGREGS,
    kvm_bindings::KVMIO,
    0xa1,
    kvm_bindings::kvm_debugregs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_LAPIC,
    kvm_bindings::KVMIO,
    0x8e,
    kvm_bindings::kvm_lapic_state
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_MSRS,
    kvm_bindings::KVMIO,
    0x88,
    kvm_bindings::kvm_msrs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_IRQCHIP,
    kvm_bindings::KVMIO,
    0x62,
    kvm_bindings::kvm_irqchip
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_PIT2,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_pit_state2
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_CLOCK,
    kvm_bindings::KVMIO,
    0x7c,
    kvm_bindings::kvm_clock_data
);

// The ioctl requests on sockets and the console: `c_ulong` in glibc's headers, `c_int` in musl's.
#[allow(clippy::unnecessary_cast)]
const FIONBIO: u64 = libc::FIONBIO as u64;
#[allow(clippy::unnecessary_cast)]
const FIOCLEX: u64 = libc::FIOCLEX as u64;
#[allow(clippy::unnecessary_cast)]
const TCGETS: u64 = libc::TCGETS as u64;

/// The system calls allowed whatever their arguments.
const ALLOWED: &[libc::c_long] = &[
    // I/O on descriptors the VMM holds.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_close,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    // vsock streams and their epoll loop.
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // virtio-rng.
    libc::SYS_getrandom,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    // Threads, locks and signals.
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_gettid,
    libc::SYS_getpid,
    // musl's pthread_kill (the vCPU kick) signals a thread by its id alone; jailed, only this
    // process's threads are in its PID namespace.
    libc::SYS_tkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    // Time.
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(SeccompError::Compile)
}

/// One rule per value: argument `arg` equal to any of `values`.
fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    values
        .iter()
        .map(|&v| {
            SeccompRule::new(vec![cond(arg, SeccompCmpOp::Eq, v)?]).map_err(SeccompError::Compile)
        })
        .collect()
}

/// The rules of the allow-list filter (the module's list), for the process `pid`; `saving`:
/// also the ioctls that read a paused VM's state (`vm run --save`).
fn allow_rules(
    pid: libc::pid_t,
    saving: bool,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let mut ioctls = vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_IRQFD(),
        FIONBIO,
        FIOCLEX,
        TCGETS,
    ];
    if saving {
        ioctls.extend([
            KVM_GET_MP_STATE(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_LAPIC(),
            KVM_GET_MSRS(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_IRQCHIP(),
            KVM_GET_PIT2(),
            KVM_GET_CLOCK(),
        ]);
    }
    rules.insert(libc::SYS_ioctl, any_of(1, &ioctls)?);
    // Threads only: a new process would be a new thread of attack.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![
            SeccompRule::new(vec![cond(0, SeccompCmpOp::MaskedEq(thread), thread)?])
                .map_err(SeccompError::Compile)?,
        ],
    );
    // clone3 passes its flags in memory, where a filter cannot look: see `clone3_rules`.
    rules.insert(libc::SYS_clone3, Vec::new());
    rules.insert(libc::SYS_socket, any_of(0, &[libc::AF_UNIX as u64])?);
    rules.insert(libc::SYS_tgkill, any_of(0, &[pid as u64])?);
    rules.insert(libc::SYS_prctl, any_of(0, &[libc::PR_SET_NAME as u64])?);
    Ok(rules)
}

/// The VMM's filters for the process `pid`, to be installed in order: one that makes `clone3`
/// fail with ENOSYS (the stricter action of stacked filters wins, so the C library falls back
/// to `clone`, whose flags the allow-list checks), then the allow-list, which forbids
/// installing any more. `saving`: the VMM will save the VM (`--save`).
pub fn filters(
    mode: SeccompMode,
    pid: libc::pid_t,
    saving: bool,
) -> Result<Vec<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(Vec::new()),
    };
    let arch = TargetArch::x86_64;
    let allow = SeccompFilter::new(
        allow_rules(pid, saving)?,
        mismatch,
        SeccompAction::Allow,
        arch,
    )
    .map_err(SeccompError::Compile)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(SeccompError::Compile)?;
    [clone3, allow]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(SeccompError::Compile))
        .collect()
}

/// Installs `filters` on every thread of the process (TSYNC); threads started later inherit
/// them. Sets `no_new_privs`, which an unprivileged process needs to install a filter.
pub fn install(filters: &[BpfProgram]) -> Result<(), SeccompError> {
    for filter in filters {
        seccompiler::apply_filter_all_threads(filter).map_err(SeccompError::Install)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_filters_compile_for_each_mode() {
        assert_eq!(filters(SeccompMode::Off, 1, false).unwrap().len(), 0);
        for (mode, saving) in [
            (SeccompMode::Kill, false),
            (SeccompMode::Log, false),
            (SeccompMode::Kill, true),
        ] {
            let programs = filters(mode, 1, saving).unwrap();
            assert_eq!(programs.len(), 2);
            assert!(programs.iter().all(|p| !p.is_empty() && p.len() < 4096));
        }
    }
}
