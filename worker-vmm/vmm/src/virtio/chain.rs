//! Descriptor chains as checked lists of guest buffers: every address and length the guest
//! wrote is validated against guest memory before the device touches it.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Why a descriptor chain cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A readable descriptor follows a writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    /// The lengths add up to more than the device accepts.
    #[error("the chain's buffers are larger than {max} bytes")]
    TooLong { max: u64 },
    /// Guest memory could not be accessed.
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// One guest buffer, already checked to lie in guest memory.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// The device-readable and then device-writable buffers of one chain.
#[derive(Debug)]
pub struct Chain {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
}

impl Chain {
    /// Collect and check `chain`; no side accepts more than `max_len` bytes.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        max_len: u64,
    ) -> Result<Chain, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut parsed = Chain {
            readable: Vec::new(),
            writable: Vec::new(),
            readable_len: 0,
            writable_len: 0,
        };
        for desc in chain {
            let (addr, len) = (desc.addr(), desc.len());
            if !mem.check_range(addr, len as usize, Permissions::ReadWrite) {
                return Err(ChainError::OutOfMemory { addr: addr.0, len });
            }
            let (list, total) = if desc.is_write_only() {
                (&mut parsed.writable, &mut parsed.writable_len)
            } else {
                if !parsed.writable.is_empty() {
                    return Err(ChainError::ReadableAfterWritable);
                }
                (&mut parsed.readable, &mut parsed.readable_len)
            };
            *total += u64::from(len);
            if *total > max_len {
                return Err(ChainError::TooLong { max: max_len });
            }
            if len > 0 {
                list.push(Segment { addr, len });
            }
        }
        Ok(parsed)
    }

    /// Bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// Read `buf.len()` bytes of the readable side starting at `offset`.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let mut done = 0;
        for (addr, len) in window(&self.readable, offset, buf.len()) {
            mem.read_slice(&mut buf[done..done + len], addr)
                .map_err(ChainError::Memory)?;
            done += len;
        }
        if done == buf.len() {
            Ok(())
        } else {
            Err(ChainError::TooLong {
                max: self.readable_len,
            })
        }
    }

    /// Write `buf` into the writable side starting at `offset`.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), ChainError> {
        let mut done = 0;
        for (addr, len) in window(&self.writable, offset, buf.len()) {
            mem.write_slice(&buf[done..done + len], addr)
                .map_err(ChainError::Memory)?;
            done += len;
        }
        if done == buf.len() {
            Ok(())
        } else {
            Err(ChainError::TooLong {
                max: self.writable_len,
            })
        }
    }
}

impl Chain {
    /// `len` bytes of the device-writable side from `offset` as host memory, for reading a file
    /// straight into the guest's buffers. The pointers are valid while `mem` is.
    pub fn writable_iovecs(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        len: usize,
    ) -> Result<Vec<libc::iovec>, ChainError> {
        host_iovecs(
            mem,
            window(&self.writable, offset, len),
            len,
            self.writable_len,
        )
    }

    /// `len` bytes of the device-readable side from `offset` as host memory, for writing the
    /// guest's buffers straight to a file. The pointers are valid while `mem` is.
    pub fn readable_iovecs(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        len: usize,
    ) -> Result<Vec<libc::iovec>, ChainError> {
        host_iovecs(
            mem,
            window(&self.readable, offset, len),
            len,
            self.readable_len,
        )
    }
}

fn host_iovecs(
    mem: &GuestMemoryMmap,
    pieces: impl Iterator<Item = (GuestAddress, usize)>,
    len: usize,
    side_len: u64,
) -> Result<Vec<libc::iovec>, ChainError> {
    let mut iovecs = Vec::new();
    let mut total = 0;
    for (addr, n) in pieces {
        for slice in vm_memory::GuestMemoryBackend::get_slices(mem, addr, n) {
            let slice = slice.map_err(ChainError::Memory)?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            total += slice.len();
        }
    }
    if total == len {
        Ok(iovecs)
    } else {
        Err(ChainError::TooLong { max: side_len })
    }
}

/// The pieces of `segments` covering `len` bytes from `offset` (fewer if they end first).
fn window(
    segments: &[Segment],
    offset: u64,
    len: usize,
) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    let mut skip = offset;
    let mut left = len as u64;
    segments.iter().filter_map(move |seg| {
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            return None;
        }
        if left == 0 {
            return None;
        }
        let take = (seg_len - skip).min(left);
        let addr = GuestAddress(seg.addr.0 + skip);
        skip = 0;
        left -= take;
        Some((addr, take as usize))
    })
}

/// Pop the next chain the driver made available; an error means the driver wrote an
/// impossible avail index, and the device should be marked broken.
pub fn next_chain<'m>(
    queue: &mut virtio_queue::Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    use virtio_queue::QueueOwnedT;
    Ok(queue.iter(mem)?.next())
}
