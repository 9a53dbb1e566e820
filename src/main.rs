//! `vmfarm`: the one binary of the build farm — server, worker, VMM and CLI.

mod cli;
mod validate;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate(args) => validate::run(&args),
        other => {
            eprintln!(
                "vmfarm {}: not built yet — this subcommand arrives with its issue",
                other.name()
            );
            ExitCode::from(2)
        }
    }
}
