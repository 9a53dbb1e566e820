//! Positioned vectored I/O between an image file (raw, or the data clusters of a qcow2 overlay)
//! and guest buffers: one system call for all of a request's buffers (per contiguous run in the
//! file), and no copy through a bounce buffer.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The most iovecs one preadv/pwritev takes (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// Reads `file` from byte `offset` until `iovecs` are full.
///
/// # Safety
/// Every iovec must describe memory that is writable and stays mapped for the whole call.
pub unsafe fn read_all_at(file: &File, iovecs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
    transfer_all(iovecs, offset, |batch, at| {
        // SAFETY: the caller vouches for the memory; `batch` is a live slice of iovecs of the
        // length passed.
        unsafe { libc::preadv(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, at) }
    })
}

/// Writes all of `iovecs` to `file` from byte `offset`.
///
/// # Safety
/// Every iovec must describe memory that is readable and stays mapped for the whole call.
pub unsafe fn write_all_at(file: &File, iovecs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
    transfer_all(iovecs, offset, |batch, at| {
        // SAFETY: as for `read_all_at`.
        unsafe { libc::pwritev(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, at) }
    })
}

/// Calls `op(iovecs, file offset)` until every byte of `iovecs` moved, advancing past what each
/// call moved (short transfers and EINTR are retried; a transfer of 0 bytes is an early end of
/// file).
fn transfer_all(
    mut iovecs: &mut [libc::iovec],
    offset: u64,
    mut op: impl FnMut(&[libc::iovec], libc::off_t) -> isize,
) -> io::Result<()> {
    let mut at = offset;
    while !iovecs.is_empty() {
        let batch = iovecs.len().min(IOV_MAX);
        let file_at = libc::off_t::try_from(at)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
        let moved = op(&iovecs[..batch], file_at);
        if moved < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if moved == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut left = moved as usize;
        at += left as u64;
        while left > 0 && !iovecs.is_empty() {
            let first = &mut iovecs[0];
            if left >= first.iov_len {
                left -= first.iov_len;
                iovecs = &mut iovecs[1..];
            } else {
                // SAFETY: moves the base forward inside the same iovec's buffer.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(left) }.cast();
                first.iov_len -= left;
                left = 0;
            }
        }
        while iovecs.first().is_some_and(|v| v.iov_len == 0) {
            iovecs = &mut iovecs[1..];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn iovec(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn test_scattered_buffers_round_trip_through_a_file() {
        let file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut a, mut b, mut c) = (
            data[..1].to_vec(),
            data[1..4097].to_vec(),
            data[4097..].to_vec(),
        );
        let mut out = [iovec(&mut a), iovec(&mut []), iovec(&mut b), iovec(&mut c)];
        // SAFETY: the iovecs point at the three live vectors above (and one empty slice).
        unsafe { write_all_at(&file, &mut out, 512) }.unwrap();
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 512).unwrap();
        assert_eq!(back, data);

        let (mut x, mut y) = (vec![0u8; 3000], vec![0u8; 7000]);
        let mut into = [iovec(&mut x), iovec(&mut y)];
        // SAFETY: the iovecs point at the two live vectors above.
        unsafe { read_all_at(&file, &mut into, 512) }.unwrap();
        assert_eq!([x, y].concat(), data);

        let mut past = vec![0u8; 100];
        let mut beyond = [iovec(&mut past)];
        // SAFETY: as above.
        let err = unsafe { read_all_at(&file, &mut beyond, 512 + 10_000 - 50) }.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn test_short_transfers_advance_through_the_iovecs() {
        let (mut a, mut b) = ([0u8; 5], [0u8; 5]);
        let mut iovecs = [iovec(&mut a), iovec(&mut b)];
        let mut calls = Vec::new();
        // Each call "moves" 3 bytes: the next call starts 3 bytes further in the file and the buffers.
        transfer_all(&mut iovecs, 100, |batch, at| {
            calls.push((at, batch.len(), batch[0].iov_len));
            batch.iter().map(|v| v.iov_len).sum::<usize>().min(3) as isize
        })
        .unwrap();
        assert_eq!(calls, [(100, 2, 5), (103, 2, 2), (106, 1, 4), (109, 1, 1)]);
    }
}
