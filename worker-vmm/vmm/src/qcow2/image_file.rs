//! How qcow2-rs reaches an image file: positioned reads and writes, and fsync only when the
//! guest asks for a flush.
//!
//! qcow2-rs syncs the file after each cluster it allocates over a backing file, to order the
//! data before the mapping that points at it (crash consistency of the image). For vmfarm's
//! overlays, which die with their job, that bought nothing and cost most of the write time (68%
//! of it in a profile of allocating writes). The guest's FLUSH still makes everything written
//! before it durable, as QEMU's writeback cache does.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;

use qcow2_rs::error::Qcow2Result;
use qcow2_rs::ops::{Qcow2IoOps, Qcow2OpsFlags};

/// One image file of a qcow2 chain.
pub struct ImageFile {
    file: File,
    /// Set while the guest's FLUSH is being served: only then does `fsync` reach the disk.
    guest_flush: Rc<Cell<bool>>,
}

impl ImageFile {
    pub fn open(
        path: &Path,
        read_only: bool,
        guest_flush: Rc<Cell<bool>>,
    ) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Ok(ImageFile { file, guest_flush })
    }
}

impl Qcow2IoOps for ImageFile {
    /// Reads up to `buf.len()` bytes; fewer only at the end of the file (qcow2-rs reads whole
    /// sectors of metadata that may end past it).
    async fn read_to(&self, offset: u64, buf: &mut [u8]) -> Qcow2Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    async fn write_from(&self, offset: u64, buf: &[u8]) -> Qcow2Result<()> {
        Ok(self.file.write_all_at(buf, offset)?)
    }

    async fn fallocate(&self, offset: u64, len: usize, flags: u32) -> Qcow2Result<()> {
        let mode = if flags & Qcow2OpsFlags::FALLOCATE_ZERO_RAGE != 0 {
            libc::FALLOC_FL_ZERO_RANGE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL).into());
        };
        // SAFETY: fallocate on this struct's open file descriptor; no memory is involved.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().into())
        }
    }

    async fn fsync(&self, _offset: u64, _len: usize, _flags: u32) -> Qcow2Result<()> {
        if self.guest_flush.get() {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn test_reads_stop_at_the_end_and_writes_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"0123456789").unwrap();
        let file = ImageFile::open(&path, false, Rc::new(Cell::new(false))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(block_on(file.read_to(4, &mut buf)).unwrap(), 6);
        assert_eq!(&buf[..6], b"456789");
        block_on(file.write_from(8, b"abcd")).unwrap();
        block_on(file.fsync(0, 0, 0)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"01234567abcd");
        block_on(file.fallocate(0, 4, Qcow2OpsFlags::FALLOCATE_ZERO_RAGE)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"\x00\x00\x00\x004567abcd");
        let read_only = ImageFile::open(&path, true, Rc::new(Cell::new(false))).unwrap();
        assert!(block_on(read_only.write_from(0, b"x")).is_err());
        assert!(
            ImageFile::open(&dir.path().join("missing"), true, Rc::new(Cell::new(false))).is_err()
        );
    }
}
