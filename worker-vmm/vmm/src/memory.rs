//! Guest RAM: mappings around the 32-bit MMIO gap, registered with KVM. Anonymous memory for a
//! VM that boots; a snapshot's memory file for one restored from it, mapped private: copy on
//! write, loaded as the guest touches it, the pages it never writes shared with every guest
//! restored from the same file. [`save_memory`] writes a stopped guest's memory to such a file.

use std::fs::File;
use std::os::fd::AsRawFd as _;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use super::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The guest's memory as the VMM and its devices see it.
pub type GuestMem = vm_memory::GuestMemoryMmap<()>;

/// Setting up guest RAM failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not map the RAM.
    #[error("cannot map {size} bytes of guest memory")]
    Map {
        /// Requested size.
        size: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed")]
    Register {
        /// The slot.
        slot: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The RAM ranges `(start, len)` for `size` bytes of memory: below the gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

/// Host mappings are aligned to this, so that transparent huge pages of the host line up with
/// the guest's 2 MiB pages and KVM can map guest memory with 2 MiB (nested) page table entries.
const HUGE_PAGE: usize = 2 << 20;

/// What guest RAM is made of.
#[derive(Clone, Copy)]
pub enum Backing<'a> {
    /// Anonymous memory.
    Anonymous,
    /// A snapshot's memory file, as long as the RAM (the ranges of [`ram_ranges`] one after the
    /// other), mapped private: the guest writes copies of its pages.
    Snapshot(&'a File),
}

/// One mapping, unmapped on drop.
struct AlignedMapping {
    addr: usize,
    len: usize,
}

impl AlignedMapping {
    /// Maps `len` bytes of `backing` (from `offset` in a file) at a [`HUGE_PAGE`]-aligned
    /// address.
    fn new(len: usize, backing: Backing, offset: u64) -> std::io::Result<Self> {
        let mapping = Self::anonymous(len)?;
        if let Backing::Snapshot(file) = backing {
            let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
            // SAFETY: replaces (MAP_FIXED) the anonymous mapping just made, which this function
            // owns and nothing references yet, with the file's pages at the same address.
            let raw = unsafe {
                libc::mmap(
                    mapping.addr as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    offset,
                )
            };
            if raw == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(mapping)
    }

    /// Maps `len` bytes of anonymous memory at a [`HUGE_PAGE`]-aligned address.
    fn anonymous(len: usize) -> std::io::Result<Self> {
        let total = len
            .checked_add(HUGE_PAGE)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a new anonymous mapping where the kernel chooses: no existing memory changes.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = raw as usize;
        let addr = start.next_multiple_of(HUGE_PAGE);
        let head = addr - start;
        let tail = total - head - len;
        // SAFETY: both ranges lie inside the mapping made above and outside `addr..addr + len`;
        // nothing references them.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((addr + len) as *mut libc::c_void, tail);
            }
        }
        // Transparent huge pages for guest RAM where the host gives them only on request
        // (`madvise` mode): loading the kernel and initrd then faults in 2 MiB at a time, and
        // KVM can map the guest with 2 MiB entries. Only advice: failing it changes nothing.
        // SAFETY: advice on the mapping made above, which nothing else uses yet.
        unsafe {
            libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Ok(Self { addr, len })
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new`; `GuestRam` drops its `GuestMem` first, and the
        // VM drops every device (joining device threads) before its `GuestRam`.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

/// Guest RAM: the mappings and the [`GuestMem`] view of them. The VM keeps it until every
/// vCPU and device (each holding a `GuestMem` clone) is gone.
pub struct GuestRam {
    memory: GuestMem,
    _mappings: Vec<AlignedMapping>,
}

impl GuestRam {
    /// The memory, for loading and for devices.
    pub fn memory(&self) -> &GuestMem {
        &self.memory
    }
}

/// Maps `size` bytes of anonymous guest RAM, 2 MiB aligned.
pub fn create_guest_memory(size: u64) -> Result<GuestRam, MemoryError> {
    create_guest_memory_from(size, Backing::Anonymous)
}

/// Maps `size` bytes of guest RAM from `backing`, 2 MiB aligned.
pub fn create_guest_memory_from(size: u64, backing: Backing) -> Result<GuestRam, MemoryError> {
    let map_err = |source| MemoryError::Map { size, source };
    let mut mappings = Vec::new();
    let mut regions = Vec::new();
    // Where each range starts in a snapshot's file: the ranges one after the other.
    let mut file_offset = 0;
    for (start, size) in ram_ranges(size) {
        let len = usize::try_from(size)
            .map_err(|_| map_err(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
        let mapping = AlignedMapping::new(len, backing, file_offset).map_err(map_err)?;
        file_offset += size;
        // SAFETY: `mapping` is a live read-write mapping of `len` bytes, kept alive by the
        // returned `GuestRam` for as long as its users (see `AlignedMapping::drop`).
        let region = unsafe {
            MmapRegion::build_raw(
                mapping.addr as *mut u8,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| map_err(std::io::Error::other(e)))?;
        mappings.push(mapping);
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(start))
                .ok_or_else(|| map_err(std::io::Error::from_raw_os_error(libc::EINVAL)))?,
        );
    }
    let memory = GuestMem::from_regions(regions).map_err(|e| map_err(std::io::Error::other(e)))?;
    Ok(GuestRam {
        memory,
        _mappings: mappings,
    })
}

/// Writes the pages of `memory` that are not all zeros into `file`, at their offsets in
/// [`Backing::Snapshot`]'s layout; the rest of the file stays a hole. (Every page is read: a
/// page the host swapped out holds data too. Pages the guest never touched read as the host's
/// shared zero page and cost no memory.)
///
/// # Safety
///
/// Nothing may write `memory` meanwhile: every vCPU is out of KVM_RUN for good and every
/// device's data path is stopped. It is read as plain bytes.
pub unsafe fn save_memory(memory: &GuestMem, file: &File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    const PAGE: usize = 4096;
    static ZEROS: [u8; PAGE] = [0; PAGE];
    let mut offset = 0u64;
    for region in memory.iter() {
        let len = usize::try_from(region.len()).map_err(std::io::Error::other)?;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(std::io::Error::other)?;
        // SAFETY: `host..host + len` is the region's mapping, alive as long as `memory`;
        // nothing writes it while this runs (the caller's promise), so reading it as bytes
        // races with nothing.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        let pages = len.div_ceil(PAGE);
        // Slice equality is a memcmp: fast in every build.
        let zero = |i: usize| {
            let page = &bytes[i * PAGE..((i + 1) * PAGE).min(len)];
            page == &ZEROS[..page.len()]
        };
        let mut page = 0;
        while page < pages {
            if zero(page) {
                page += 1;
                continue;
            }
            let first = page;
            while page < pages && !zero(page) {
                page += 1;
            }
            let run = &bytes[first * PAGE..(page * PAGE).min(len)];
            file.write_all_at(run, offset + (first * PAGE) as u64)?;
        }
        offset += region.len();
    }
    Ok(())
}

/// Gives every region of `memory` to KVM as a memory slot.
pub fn register_memory(vm: &VmFd, memory: &GuestMem) -> Result<(), MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Register {
                slot,
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping behind `userspace_addr` belongs to `memory`, which the VM keeps alive
        // (it holds a clone) for as long as the VM fd exists, and slots never overlap.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn test_guest_ram_is_huge_page_aligned_and_usable() {
        let ram = create_guest_memory(64 << 20).unwrap();
        let memory = ram.memory();
        for region in memory.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap();
            assert_eq!(host as usize % HUGE_PAGE, 0);
        }
        memory
            .write_obj(0xdead_beef_u32, GuestAddress((64 << 20) - 4))
            .unwrap();
        assert_eq!(
            memory
                .read_obj::<u32>(GuestAddress((64 << 20) - 4))
                .unwrap(),
            0xdead_beef
        );
        assert!(memory.write_obj(0u8, GuestAddress(64 << 20)).is_err());
    }

    #[test]
    fn test_ram_ranges_split_around_the_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
