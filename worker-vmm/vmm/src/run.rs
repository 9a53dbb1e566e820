//! `vmfarm vm run`: build the VM from the arguments, run it, and turn its end into an exit status.

use std::process::ExitCode;

use anyhow::Context;

use super::cli::VmRunArgs;
use super::config::VmConfig;
use super::timing::vcpus_start_line;
use super::vm::build_vm;

/// Runs one guest to its end. A clean reboot or power-off gives success; otherwise the reason
/// is printed on stderr as one line and the status says which (see [`VmExit::exit_status`](super::exit::VmExit::exit_status)).
/// Errors are for a VM that could not be built at all.
pub fn run(args: &VmRunArgs) -> anyhow::Result<ExitCode> {
    let config = VmConfig::try_from(args)?;
    let vm = build_vm(&config).context("building the VM")?;
    if args.timings {
        eprintln!("{}", vcpus_start_line());
    }
    let exit = vm.run(config.timeout).context("running the VM")?;
    if !exit.is_clean() {
        eprintln!("vmfarm vm run: {exit}");
    }
    Ok(ExitCode::from(exit.exit_status()))
}
