//! `vmfarm`: the one binary of the build farm — server, worker, VMM and CLI.

mod bench;
mod cli;
mod client;
mod commands;
mod server_cmd;
mod up_cmd;
mod validate;
mod worker_cmd;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMFARM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Validate(args) => validate::run(&args),
        Command::Server(args) => {
            block_on(async { server_cmd::run(args).await.map(|()| ExitCode::SUCCESS) })
        }
        Command::Images(args) => match vmfarm_worker::images::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmfarm: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Up(args) => {
            block_on(async { up_cmd::run(args).await.map(|()| ExitCode::SUCCESS) })
        }
        Command::Vm(cli::VmCommand::Run(args)) => match vmfarm_worker::vmm::run::run(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("vmfarm vm run: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Worker(args) => {
            block_on(async { worker_cmd::run(args).await.map(|()| ExitCode::SUCCESS) })
        }
        Command::Submit(args) => block_on(commands::submit(args)),
        Command::Status(args) => block_on(commands::status(args)),
        Command::Logs(args) => block_on(commands::logs(args)),
        Command::Artifacts(args) => block_on(commands::artifacts(args)),
        Command::Cancel(args) => block_on(commands::cancel(args)),
        Command::Bench(args) => match args.which {
            cli::BenchKind::Boot(args) => match bench::boot::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vmfarm bench boot: {e:#}");
                    ExitCode::FAILURE
                }
            },
            cli::BenchKind::Disk(args) => match bench::disk::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vmfarm bench disk: {e:#}");
                    ExitCode::FAILURE
                }
            },
            cli::BenchKind::Queue { postgres } => block_on(async {
                let postgres = postgres.or_else(|| std::env::var("VMFARM_TEST_POSTGRES").ok());
                bench::queue::run(postgres).await?;
                Ok(ExitCode::SUCCESS)
            }),
            cli::BenchKind::JobStart { images_dir } => block_on(async {
                bench::job_start::run(images_dir).await?;
                Ok(ExitCode::SUCCESS)
            }),
        },
    }
}

/// Runs an async subcommand; an error is printed with its causes and gives exit status 1.
fn block_on(fut: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmfarm: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmfarm: {e:#}");
            ExitCode::FAILURE
        }
    }
}
