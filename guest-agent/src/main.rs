//! vmfarm-agent: the guest's first process and its SSH server.
//!
//! Roles, chosen by the first argument:
//! - none, as PID 1: `/init` of the initramfs (see `init`);
//! - `pid1`: PID 1 in the root disk (see `pid1`);
//! - `serve`: the SSH server, a child of PID 1;
//! - `sftp-server`: one SFTP session on stdin/stdout, as the build user;
//! - `shutdown`: flush, unmount and reboot (root only).

mod caches;
mod channel;
mod cmdline;
mod forward;
mod init;
mod pid1;
mod pty;
mod server;
mod session;
mod sftp;
mod shutdown;
mod sys;
mod user;

use anyhow::{Context as _, Result, bail};

fn main() {
    let role = std::env::args().nth(1);
    let result = match role.as_deref() {
        None if sys::getpid() == 1 => init::run(),
        Some("pid1") => pid1::run(),
        Some("serve") => runtime().and_then(|rt| rt.block_on(serve())),
        Some("sftp-server") => runtime().map(|rt| rt.block_on(sftp::serve())),
        Some("shutdown") => shutdown::run(),
        _ => Err(anyhow::anyhow!(
            "usage: vmfarm-agent [pid1|serve|sftp-server|shutdown] (with no argument only as PID 1)"
        )),
    };
    if let Err(e) = result {
        eprintln!("vmfarm-agent: {e:#}");
        if sys::getpid() == 1 {
            // Nothing can go on without PID 1: end the guest so the worker sees it at once.
            sys::sync();
            let err = sys::reboot();
            eprintln!("vmfarm-agent: reboot: {err}");
        }
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn serve() -> Result<()> {
    let config = pid1::read_config()?;
    server::serve(config).await?;
    bail!("the SSH server stopped")
}
