//! `vmfarm-agent shutdown`: end every process, flush and unmount the disks, reboot (with
//! `reboot=k` the VMM exits).

use std::path::Path;
use std::time::Duration;

use crate::sys;

pub fn run() -> ! {
    println!("vmfarm-agent: shutting down");
    sys::sync();
    sys::kill_all(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    sys::kill_all(libc::SIGKILL);
    sys::sync();
    for dir in ["/tmp", "/dev/shm", "/dev/pts"] {
        let _ = sys::umount(Path::new(dir), libc::MNT_DETACH);
    }
    if let Err(e) = sys::mount(
        "",
        Path::new("/"),
        "",
        libc::MS_REMOUNT | libc::MS_RDONLY,
        "",
    ) {
        eprintln!("vmfarm-agent: remounting / read-only: {e}");
    }
    sys::sync();
    let err = sys::reboot();
    eprintln!("vmfarm-agent: reboot: {err}");
    std::process::exit(1)
}
