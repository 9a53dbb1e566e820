//! The init role: `/init` of the initramfs. Loads the image's modules, mounts the root disk,
//! copies the agent to `/run/vmfarm-agent` in the new root and hands over to it as PID 1.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::sys;

/// Lists the initramfs's modules, one file name (under /lib/modules) a line, dependencies first.
const LOAD_ORDER: &str = "/lib/modules/load.order";
const ROOT_DEVICE: &str = "/dev/vda";
const NEW_ROOT: &str = "/newroot";
pub const AGENT_PATH: &str = "/run/vmfarm-agent";

pub fn run() -> Result<()> {
    mount_early().context("mounting /proc, /sys and /dev")?;
    load_modules().context("loading modules")?;
    wait_for(Path::new(ROOT_DEVICE), Duration::from_secs(20))?;
    let new_root = Path::new(NEW_ROOT);
    std::fs::create_dir_all(new_root).context("creating /newroot")?;
    sys::mount(ROOT_DEVICE, new_root, "ext4", 0, "")
        .with_context(|| format!("mounting {ROOT_DEVICE} (ext4)"))?;
    let run = new_root.join("run");
    std::fs::create_dir_all(&run).context("creating /run in the root disk")?;
    sys::mount(
        "tmpfs",
        &run,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )
    .context("mounting /run")?;
    let agent = new_root.join(AGENT_PATH.trim_start_matches('/'));
    std::fs::copy("/proc/self/exe", &agent).context("copying the agent into the root disk")?;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755))?;
    for dir in ["dev", "proc", "sys"] {
        let target = new_root.join(dir);
        std::fs::create_dir_all(&target)?;
        sys::mount(&format!("/{dir}"), &target, "", libc::MS_MOVE, "")
            .with_context(|| format!("moving /{dir} into the root disk"))?;
    }
    switch_root(new_root)
}

fn mount_early() -> Result<()> {
    for (fstype, dir) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        std::fs::create_dir_all(dir)?;
        sys::mount(fstype, Path::new(dir), fstype, libc::MS_NOSUID, "")
            .with_context(|| format!("mounting {dir}"))?;
    }
    Ok(())
}

fn load_modules() -> Result<()> {
    let order = match std::fs::read_to_string(LOAD_ORDER) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).context(LOAD_ORDER),
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new("/lib/modules").join(name);
        // A module the hardware does not need may fail to load (e.g. no device); say so and go on.
        if let Err(e) = sys::load_module(&path) {
            eprintln!("vmfarm-agent: loading {name}: {e}");
        }
    }
    Ok(())
}

fn wait_for(path: &Path, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > limit {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Makes `new_root` the root and executes the agent there as PID 1 (does not return on success).
fn switch_root(new_root: &Path) -> Result<()> {
    std::env::set_current_dir(new_root)?;
    sys::mount(".", Path::new("/"), "", libc::MS_MOVE, "").context("moving the root disk to /")?;
    sys::chroot(Path::new(".")).context("chroot")?;
    std::env::set_current_dir("/")?;
    let path = CString::new(AGENT_PATH)?;
    let argv = [c"vmfarm-agent".as_ptr(), c"pid1".as_ptr(), std::ptr::null()];
    // SAFETY: `path` and the argv strings are NUL-terminated and live across the call; argv is
    // NULL-terminated. execv only returns on failure.
    unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    Err(std::io::Error::last_os_error()).context("executing the agent in the root disk")
}
