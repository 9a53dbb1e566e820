//! `vmfarm`: the one binary of the build farm — server, worker, VMM and CLI.

mod bench;
mod caches_cmd;
mod cli;
mod client;
mod commands;
mod config_file;
#[cfg(test)]
mod dashboard;
mod exit_status;
mod hook;
mod server_cmd;
mod ssh;
mod up_cmd;
mod up_images;
mod validate;
mod worker_cmd;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    // The worker starts one `vm run` process per guest: it parses only its own flags, so a VMM
    // process never builds the rest of the command tree (nor faults in its code and help texts).
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == "vm") && args.next().is_some_and(|a| a == "run") {
        let vm = vmfarm_worker::vmm::cli::VmRunCli::parse_rest(args);
        init_logging();
        return vm_run(&vm.args);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and the version are what was asked for; a usage error is an error (1).
            return if e.use_stderr() {
                ExitCode::from(exit_status::ERROR)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging();
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
        Command::Vm(cli::VmCommand::Run(args)) => vm_run(&args),
        Command::Worker(args) => {
            block_on(async { worker_cmd::run(args).await.map(|()| ExitCode::SUCCESS) })
        }
        Command::Submit(args) => block_on(commands::submit(args)),
        Command::Status(args) => block_on(commands::status(args)),
        Command::Logs(args) => block_on(commands::logs(args)),
        Command::Artifacts(args) => block_on(commands::artifacts(args)),
        Command::Cancel(args) => block_on(commands::cancel(args)),
        Command::Rerun(args) => block_on(commands::rerun(args)),
        Command::Ssh(args) => block_on(ssh::run(args)),
        Command::Hook(cli::HookCommand::PostReceive(args)) => block_on(hook::post_receive(args)),
        Command::Caches(command) => match caches_cmd::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmfarm: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "vmfarm", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::ManPages { dir } => match man_pages(&dir) {
            Ok(written) => {
                println!("{written} manual pages written to {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmfarm man-pages: {e:#}");
                ExitCode::FAILURE
            }
        },
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
            cli::BenchKind::Artifacts => block_on(async {
                bench::artifacts::run().await?;
                Ok(ExitCode::SUCCESS)
            }),
            cli::BenchKind::Queue { postgres } => block_on(async {
                let postgres = postgres.or_else(|| std::env::var("VMFARM_TEST_POSTGRES").ok());
                bench::queue::run(postgres).await?;
                Ok(ExitCode::SUCCESS)
            }),
            cli::BenchKind::Network { dir } => block_on(async {
                bench::network::run(dir.images_dir).await?;
                Ok(ExitCode::SUCCESS)
            }),
            cli::BenchKind::Push { dir } => block_on(async {
                bench::push::run(dir.images_dir).await?;
                Ok(ExitCode::SUCCESS)
            }),
            cli::BenchKind::LiveLog { dir } => block_on(async {
                bench::live_log::run(dir.images_dir).await?;
                Ok(ExitCode::SUCCESS)
            }),
            cli::BenchKind::JobStart { dir, images, jobs } => block_on(async {
                bench::job_start::run(dir.images_dir, &images, jobs).await?;
                Ok(ExitCode::SUCCESS)
            }),
            cli::BenchKind::CacheBuild { dir, image } => block_on(async {
                bench::cache_build::run(dir.images_dir, &image).await?;
                Ok(ExitCode::SUCCESS)
            }),
            cli::BenchKind::WarmMemory {
                dir,
                image,
                guests,
                memory_mib,
            } => block_on(async {
                bench::warm_memory::run(dir.images_dir, &image, guests, memory_mib).await?;
                Ok(ExitCode::SUCCESS)
            }),
        },
    }
}

/// Writes `vmfarm.1` and one page per subcommand (`vmfarm-submit.1`, `vmfarm-server-token.1`,
/// ...) into `dir`; returns how many.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<usize> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut command = <Cli as clap::CommandFactory>::command();
    command.build();
    let mut pending = vec![("vmfarm".to_owned(), command)];
    let mut written = 0;
    while let Some((name, command)) = pending.pop() {
        // Not clap's own `help` subcommands: each page has its options already.
        let pages = command
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help");
        for sub in pages {
            pending.push((format!("{name}-{}", sub.get_name()), sub.clone()));
        }
        let page = command.clone().name(name.clone());
        let mut text = Vec::new();
        clap_mangen::Man::new(page).render(&mut text)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written += 1;
    }
    Ok(written)
}

/// Log lines go to stderr, filtered by `VMFARM_LOG` (default `info`): a level (`warn`), or
/// `tracing` directives (`info,vmfarm::access=debug`). A bare level skips compiling the
/// directive parser's regular expressions, which every VMM process would otherwise pay for at
/// start. `VMFARM_LOG_FORMAT=json` writes each line as a JSON object (for log shippers).
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::LevelFilter;
    let spec = std::env::var("VMFARM_LOG").unwrap_or_else(|_| "info".to_owned());
    let json = match std::env::var("VMFARM_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") | Err(_) => false,
        Ok(other) => {
            eprintln!("vmfarm: VMFARM_LOG_FORMAT={other:?}: use text or json; logging text");
            false
        }
    };
    let logger = tracing_subscriber::fmt().with_writer(std::io::stderr);
    let filter = || {
        EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!(
                "vmfarm: VMFARM_LOG={spec:?} is neither a level (error, warn, info, debug, trace, \
                 off) nor tracing directives ({e}); logging at info"
            );
            EnvFilter::new("info")
        })
    };
    match (json, spec.parse::<LevelFilter>()) {
        (false, Ok(level)) => logger.with_max_level(level).init(),
        (true, Ok(level)) => logger.json().with_max_level(level).init(),
        (false, Err(_)) => logger.with_env_filter(filter()).init(),
        (true, Err(_)) => logger.json().with_env_filter(filter()).init(),
    }
}

fn vm_run(args: &vmfarm_worker::vmm::cli::VmRunArgs) -> ExitCode {
    match vmfarm_worker::vmm::run::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmfarm vm run: {e:#}");
            ExitCode::FAILURE
        }
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
