//! `vmfarm vm run`: build the VM from the arguments, run it, and turn its end into an exit status.

use std::process::ExitCode;

use anyhow::Context;

use super::cli::VmRunArgs;
use super::config::VmConfig;
use super::exit::VmExit;
use super::jail;
use super::seccomp;
use super::snapshot::{RestoreFrom, SaveTo, on_save_line};
use super::timing::{RESTORED, vcpus_start_line};
use super::vm::{build_vm, restore_vm, shape};

/// Runs one guest to its end. A clean reboot or power-off gives success; otherwise the reason
/// is printed on stderr as one line and the status says which (see [`VmExit::exit_status`](super::exit::VmExit::exit_status)).
/// Errors are for a VM that could not be built at all.
///
/// With `--jail` the process enters the jail first ([`jail::enter`]); either way the VM is built
/// and then the seccomp filter ([`seccomp::filters`], `--seccomp`) is installed before the vCPUs
/// start.
pub fn run(args: &VmRunArgs) -> anyhow::Result<ExitCode> {
    one_malloc_arena();
    let mut config = VmConfig::try_from(args)?;
    // The snapshot's files are opened before the jail, which has no path to them.
    let save = args
        .save
        .as_deref()
        .map(|dir| SaveTo::create(dir, config.memory))
        .transpose()
        .context("--save")?;
    let restore = args
        .restore
        .as_deref()
        .map(|dir| RestoreFrom::open(dir, args.restore_memory.as_deref(), &shape(&config)))
        .transpose()
        .context("--restore")?;
    if let Some(spec) = args.jail_spec() {
        config = jail::enter(&spec, &config).context("jailing the VMM")?;
    }
    // Compiled before the VM is built, so that a bad rule costs no guest.
    let filters = seccomp::filters(
        args.seccomp,
        std::process::id() as libc::pid_t,
        save.is_some(),
    )?;
    let vm = match &restore {
        Some(from) => restore_vm(&config, from).context("restoring the VM")?,
        None => build_vm(&config).context("building the VM")?,
    };
    drop(restore);
    if args.timings {
        if let Some(restored) = vm.restored() {
            eprintln!("{RESTORED} {restored}");
        }
        eprintln!("{}", vcpus_start_line());
    }
    if args.test_forbidden_syscall {
        seccomp::install(&filters)?;
        // SAFETY: opens a file by a NUL-terminated name; the filter should kill the process.
        let fd = unsafe { libc::open(c"/".as_ptr(), libc::O_RDONLY) };
        anyhow::bail!("the seccomp filter let open(\"/\") through (it returned {fd})");
    }
    let exit = match &save {
        Some(save) => {
            let handle = vm.save_handle();
            on_save_line(move || handle.save())
                .context("starting the thread that waits for `save` on stdin")?;
            vm.run_to_save(config.timeout, &filters, save)
        }
        None => vm.run_filtered(config.timeout, &filters),
    }
    .context("running the VM")?;
    if save.is_some() && exit != VmExit::Saved {
        anyhow::bail!("the guest ended ({exit}) before it was saved");
    }
    if !exit.is_clean() {
        eprintln!("vmfarm vm run: {exit}");
    }
    Ok(ExitCode::from(exit.exit_status()))
}

/// Makes glibc's malloc keep one arena for all threads, as musl's does. A thread's own arena,
/// when it shrinks, reads /proc/sys/vm/overcommit_memory (an `openat`, which the seccomp filter
/// kills); one arena also holds less memory.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt with integer arguments, before any thread of the VMM exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
