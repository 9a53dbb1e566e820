//! A template snapshot's memory as restored guests map it: a sealed copy in memory (a memfd
//! with `F_SEAL_WRITE`, `F_SEAL_SHRINK`, `F_SEAL_GROW` and `F_SEAL_SEAL`), not the file itself.
//!
//! QEMU maps a private file mapping only from a descriptor it opened read-write, and keeps that
//! descriptor: a guest that broke into its jailed QEMU could write the template's file, and with
//! it every guest restored later and the pages other running guests have not written yet. The
//! seals make every write to the copy fail (`write`, shared writable mappings, resizing) while
//! private copy-on-write mappings still work, so restored guests share its pages and cannot
//! change them.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// The sealed copy of a snapshot's memory file.
#[derive(Debug)]
pub struct SealedMemory {
    copy: File,
}

/// What is copied at once; a piece of zeros is left a hole.
const PIECE: usize = 1 << 20;

impl SealedMemory {
    /// Copies the memory file at `file` (sparse: the guest's untouched pages are holes, and stay
    /// holes in the copy) and seals the copy.
    pub fn load(file: &Path) -> io::Result<SealedMemory> {
        let source = File::open(file)?;
        let len = source.metadata()?.len();
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new
        // descriptor this process owns, or -1.
        let fd = unsafe {
            libc::memfd_create(
                c"vmfarm-template-memory".as_ptr(),
                libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to this process and is owned by nothing else.
        let copy = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        copy.set_len(len)?;
        let mut piece = vec![0u8; PIECE];
        let mut at = 0;
        while let Some((start, end)) = next_data(&source, at, len)? {
            let mut offset = start;
            while offset < end {
                let n = usize::try_from(end - offset).map_or(PIECE, |left| left.min(PIECE));
                source.read_exact_at(&mut piece[..n], offset)?;
                if piece[..n].iter().any(|b| *b != 0) {
                    copy.write_all_at(&piece[..n], offset)?;
                }
                offset += n as u64;
            }
            at = end;
        }
        let seals =
            libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl(F_ADD_SEALS) on a descriptor this process owns, with an int argument.
        if unsafe { libc::fcntl(copy.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SealedMemory { copy })
    }

    /// The path a VMM started by this process opens the copy by (this process's descriptor,
    /// through /proc; QEMU opens it before it enters its jail).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.copy.as_raw_fd()
        ))
    }
}

/// The next range of `source` that holds data, from `at` on (`SEEK_DATA`, `SEEK_HOLE`).
fn next_data(source: &File, at: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    if at >= len {
        return Ok(None);
    }
    let seek = |offset: u64, whence| {
        let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: lseek on a descriptor this process owns.
        let found = unsafe { libc::lseek(source.as_raw_fd(), offset, whence) };
        if found < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(found as u64)
        }
    };
    let start = match seek(at, libc::SEEK_DATA) {
        Ok(start) => start,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some((start, seek(start, libc::SEEK_HOLE)?.min(len))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_copy_has_the_files_bytes_and_refuses_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory");
        let source = File::create(&file).unwrap();
        source.set_len(8 << 20).unwrap();
        source.write_all_at(b"page one", 4096).unwrap();
        source.write_all_at(b"far away", (6 << 20) + 17).unwrap();
        let sealed = SealedMemory::load(&file).unwrap();
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(sealed.path())
            .unwrap();
        assert_eq!(opened.metadata().unwrap().len(), 8 << 20);
        let mut got = [0u8; 8];
        opened.read_exact_at(&mut got, 4096).unwrap();
        assert_eq!(&got, b"page one");
        opened.read_exact_at(&mut got, (6 << 20) + 17).unwrap();
        assert_eq!(&got, b"far away");
        opened.read_exact_at(&mut got, 1 << 20).unwrap();
        assert_eq!(got, [0; 8]);
        let refused = opened.write_all_at(b"X", 4096).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EPERM), "{refused}");
        assert!(opened.set_len(0).is_err(), "the copy cannot shrink");
        assert!(opened.set_len(16 << 20).is_err(), "the copy cannot grow");
    }
}
