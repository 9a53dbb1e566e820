//! Entry points for the fuzz targets (fuzz/ at the repository's root), built only with the
//! `fuzzing` feature: each takes the fuzzer's bytes, drives the device or parser they describe
//! and panics on anything that must not happen. `*_seeds` give the starting corpus of each.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

pub use crate::qcow2::fuzz::{image as qcow2, seeds as qcow2_seeds};
pub use crate::virtio::block::fuzz::{requests as virtio_blk, seeds as virtio_blk_seeds};
pub use crate::virtio::vsock::fuzz::{script as vsock, seeds as vsock_seeds};

/// Where the harnesses keep their files: memory (/dev/shm) where there is one, so that a
/// flush or a socket file costs no disk I/O.
pub(crate) fn scratch_dir() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

/// A file without a name in [`scratch_dir`], gone when closed.
pub(crate) fn unnamed_file() -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(scratch_dir())
        .expect("an O_TMPFILE file in the scratch directory")
}

/// The path under which this process reaches an open file again.
pub(crate) fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// An interrupt line that goes nowhere.
pub(crate) struct NoIrq;

impl crate::irq::IrqLine for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}
