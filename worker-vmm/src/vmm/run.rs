//! `vmfarm vm run`: build the VM from the arguments, run it, and turn its end into an exit status.

use std::process::ExitCode;

use anyhow::Context;

use super::cli::VmRunArgs;
use super::config::VmConfig;
use super::exit::VmExit;
use super::vm::build_vm;

/// Runs one guest to its end. A clean reboot or power-off gives success; otherwise the reason
/// is printed on stderr as one line and the status says which (see [`VmExit::exit_status`]).
/// Errors are for a VM that could not be built at all.
pub fn run(args: &VmRunArgs) -> anyhow::Result<ExitCode> {
    let exit = run_vm(&VmConfig::try_from(args)?)?;
    if !exit.is_clean() {
        eprintln!("vmfarm vm run: {exit}");
    }
    Ok(ExitCode::from(exit.exit_status()))
}

/// Builds and runs the VM `config` describes; returns how it ended.
pub fn run_vm(config: &VmConfig) -> anyhow::Result<VmExit> {
    let vm = build_vm(config).context("building the VM")?;
    vm.run(config.timeout).context("running the VM")
}
