//! The PID-1 role in the root disk: mounts, the build user, then the SSH server as a child
//! process (which takes on the job's identity) while PID 1 reaps every orphan.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::cmdline::BootConfig;
use crate::{sys, user};

pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn run() -> Result<()> {
    // SAFETY: PID 1 is single-threaded here; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PATH", PATH) };
    mount_system().context("mounting the system folders")?;
    let config = read_config()?;
    sys::loopback_up().context("bringing the loopback interface up")?;
    user::ensure(&config.user).context("creating the build user")?;
    supervise()
}

pub fn read_config() -> Result<BootConfig> {
    let text = std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    Ok(BootConfig::parse(&text)?)
}

fn mount_system() -> Result<()> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    let mounts: [(&str, &str, &str, libc::c_ulong, &str); 4] = [
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        ),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid, "mode=1777"),
        ("tmpfs", "/tmp", "tmpfs", nosuid, "mode=1777"),
        ("proc", "/proc", "proc", nosuid | libc::MS_NOEXEC, ""),
    ];
    for (source, target, fstype, flags, data) in mounts {
        let target = Path::new(target);
        if fstype == "proc" && target.join("self").exists() {
            continue; // moved here by the init role
        }
        std::fs::create_dir_all(target)?;
        sys::mount(source, target, fstype, flags, data)
            .with_context(|| format!("mounting {}", target.display()))?;
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            std::os::unix::fs::symlink(target, link).with_context(|| format!("linking {link}"))?;
        }
    }
    Ok(())
}

/// Runs the SSH server as a child, restarting it if it dies, and reaps every process that ends.
fn supervise() -> Result<()> {
    loop {
        let server = Command::new(crate::init::AGENT_PATH)
            .arg("serve")
            .spawn()
            .context("starting the SSH server")?;
        let server_pid = server.id() as libc::pid_t;
        loop {
            match sys::reap_any(true) {
                Some((pid, status)) if pid == server_pid => {
                    eprintln!(
                        "vmfarm-agent: the SSH server ended (wait status {status}); restarting it"
                    );
                    std::thread::sleep(Duration::from_secs(1));
                    break;
                }
                Some(_) => {}
                None => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}
