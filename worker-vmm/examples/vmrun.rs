//! Temporary stand-in for `vmfarm vm run` until the CLI is wired in src/main.rs: accepts
//! `vm run ARGS...` like the real binary, so that the KVM lab's checks can run it as `vmfarm`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmfarm_worker::vmm::cli::VmRunArgs;

#[derive(Parser)]
#[command(name = "vmfarm", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
}

#[derive(Subcommand)]
enum VmCommand {
    /// Run one guest.
    Run(VmRunArgs),
}

fn main() -> ExitCode {
    // RUST_LOG=info shows the VM's build and run times (seconds since start).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let Cli {
        command: Command::Vm {
            command: VmCommand::Run(args),
        },
    } = Cli::parse();
    match vmfarm_worker::vmm::run::run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmfarm vm run: {e:#}");
            ExitCode::FAILURE
        }
    }
}
