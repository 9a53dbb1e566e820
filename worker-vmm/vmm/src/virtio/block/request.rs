//! One virtio-blk request: header, data buffers, status byte.

use vm_memory::GuestMemoryMmap;

use super::disk::{DirectWrite, Disk, DiskError, SECTOR_SIZE};
use super::vectored;
use crate::virtio::chain::Chain;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
const HEADER_LEN: u64 = 16;
/// Data that cannot move straight between guest buffers and the image file (any qcow2-rs image;
/// for vmfarm's overlay engine, data from the backing chain or for part of a new cluster) moves
/// through a bounce buffer of at most this size.
const CHUNK: usize = 256 << 10;

/// What the device serves requests from.
pub struct Target<'a> {
    pub disk: &'a mut Disk,
    pub size: u64,
    pub read_only: bool,
    pub id: &'a [u8; ID_LEN],
    /// The bounce buffer, kept from request to request.
    pub bounce: &'a mut Vec<u8>,
}

/// The outcome of a request whose chain had room for a status byte.
#[derive(Debug, PartialEq, Eq)]
pub struct Done {
    pub status: u8,
    /// Bytes written to the device-writable buffers, the status byte included.
    pub written: u32,
}

/// Why a request failed; the status is IOERR or UNSUPP.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("sectors {sector}+{len}B beyond the disk's {size} bytes")]
    OutOfRange { sector: u64, len: u64, size: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("guest memory")]
    Chain(#[source] crate::virtio::chain::ChainError),
    #[error("disk")]
    Disk(#[source] super::disk::DiskError),
}

/// Serve one request and write its status. None when the chain has no writable byte for the
/// status (the request is dropped with a used length of 0).
pub fn execute(chain: &Chain, mem: &GuestMemoryMmap, target: &mut Target<'_>) -> Option<Done> {
    if chain.writable_len() == 0 {
        tracing::warn!("virtio-blk request without a status byte");
        return None;
    }
    let status_at = chain.writable_len() - 1;
    let (status, data_written) = match serve(chain, mem, target, status_at) {
        Ok(n) => (S_OK, n),
        Err(Failure::Unsupported(kind)) => {
            tracing::debug!(kind, "unsupported virtio-blk request");
            (S_UNSUPP, 0)
        }
        Err(err) => {
            tracing::warn!(error = %err, source = ?std::error::Error::source(&err), "virtio-blk request failed");
            (S_IOERR, 0)
        }
    };
    if let Err(err) = chain.write_at(mem, status_at, &[status]) {
        tracing::warn!(%err, "cannot write the virtio-blk status");
        return None;
    }
    Some(Done {
        status,
        written: data_written + 1,
    })
}

/// Returns how many data bytes were written to the guest.
fn serve(
    chain: &Chain,
    mem: &GuestMemoryMmap,
    t: &mut Target<'_>,
    data_len_in: u64,
) -> Result<u32, Failure> {
    if chain.readable_len() < HEADER_LEN {
        return Err(Failure::Malformed("header shorter than 16 bytes"));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    chain.read_at(mem, 0, &mut header).map_err(Failure::Chain)?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let data_len_out = chain.readable_len() - HEADER_LEN;
    match kind {
        T_IN => {
            if data_len_out != 0 {
                return Err(Failure::Malformed("read request with device-readable data"));
            }
            let offset = check_range(sector, data_len_in, t.size)?;
            if let Some((file, at)) = t.disk.direct_read(offset, data_len_in) {
                let mut iovecs = chain
                    .writable_iovecs(mem, 0, data_len_in as usize)
                    .map_err(Failure::Chain)?;
                // SAFETY: the iovecs come from `mem`'s mappings, which `mem` (borrowed for this
                // call) keeps mapped; they lie inside the chain's device-writable buffers.
                unsafe { vectored::read_all_at(file, &mut iovecs, at) }
                    .map_err(|e| Failure::Disk(DiskError::Io(e)))?;
                return Ok(data_len_in as u32);
            }
            let buf = bounce(t.bounce, data_len_in);
            let mut done = 0u64;
            while done < data_len_in {
                let n = (data_len_in - done).min(buf.len() as u64) as usize;
                t.disk
                    .read_at(&mut buf[..n], offset + done)
                    .map_err(Failure::Disk)?;
                chain
                    .write_at(mem, done, &buf[..n])
                    .map_err(Failure::Chain)?;
                done += n as u64;
            }
            Ok(data_len_in as u32)
        }
        T_OUT => {
            if data_len_in != 0 {
                return Err(Failure::Malformed(
                    "write request with device-writable data",
                ));
            }
            if t.read_only {
                return Err(Failure::ReadOnly);
            }
            let offset = check_range(sector, data_len_out, t.size)?;
            // The guest's buffers are resolved before the disk maps any new cluster for them.
            let mut iovecs = chain
                .readable_iovecs(mem, HEADER_LEN, data_len_out as usize)
                .map_err(Failure::Chain)?;
            if let Some(DirectWrite { file, runs }) = t
                .disk
                .direct_write(offset, data_len_out)
                .map_err(Failure::Disk)?
            {
                let mut done = 0;
                for (at, len) in runs {
                    if len != data_len_out {
                        iovecs = chain
                            .readable_iovecs(mem, HEADER_LEN + done, len as usize)
                            .map_err(Failure::Chain)?;
                    }
                    // SAFETY: as for reads; these are the chain's device-readable buffers.
                    unsafe { vectored::write_all_at(file, &mut iovecs, at) }
                        .map_err(|e| Failure::Disk(DiskError::Io(e)))?;
                    done += len;
                }
                return Ok(0);
            }
            let buf = bounce(t.bounce, data_len_out);
            let mut done = 0u64;
            while done < data_len_out {
                let n = (data_len_out - done).min(buf.len() as u64) as usize;
                chain
                    .read_at(mem, HEADER_LEN + done, &mut buf[..n])
                    .map_err(Failure::Chain)?;
                t.disk
                    .write_at(&buf[..n], offset + done)
                    .map_err(Failure::Disk)?;
                done += n as u64;
            }
            Ok(0)
        }
        T_FLUSH => {
            t.disk.flush().map_err(Failure::Disk)?;
            Ok(0)
        }
        T_GET_ID => {
            let n = data_len_in.min(ID_LEN as u64) as usize;
            chain.write_at(mem, 0, &t.id[..n]).map_err(Failure::Chain)?;
            Ok(n as u32)
        }
        other => Err(Failure::Unsupported(other)),
    }
}

/// The bounce buffer for a transfer of `len` bytes: grown (up to [`CHUNK`]) when needed.
fn bounce(buf: &mut Vec<u8>, len: u64) -> &mut [u8] {
    let want = CHUNK.min(usize::try_from(len).unwrap_or(CHUNK));
    if buf.len() < want {
        buf.resize(want, 0);
    }
    buf
}

/// The byte offset of a transfer of `len` bytes at `sector`, if it is whole sectors on the disk.
fn check_range(sector: u64, len: u64, size: u64) -> Result<u64, Failure> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(Failure::Malformed("data length not a multiple of 512"));
    }
    sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|start| {
            start
                .checked_add(len)
                .filter(|&end| end <= size)
                .map(|_| start)
        })
        .ok_or(Failure::OutOfRange { sector, len, size })
}
