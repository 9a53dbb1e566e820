//! Loading the kernel (bzImage or ELF vmlinux, both entered through the 64-bit boot protocol),
//! the initrd (high, under the top of low RAM) and the command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{CMDLINE_ADDR, HIMEM_START, MMIO_GAP_START};
use crate::memory::GuestMem;

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Command line size when the kernel does not say (protocol < 2.06, ELF).
const DEFAULT_CMDLINE_CAPACITY: usize = 2048;
/// Highest initrd address for kernels that do not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 0x1000;

/// Loading the kernel, the initrd or the command line failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The file could not be opened or read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// linux-loader refused the kernel image.
    #[error("cannot load kernel {} (neither a bzImage nor an x86-64 ELF vmlinux?)", path.display())]
    Kernel {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd does not fit between the kernel and the top of memory.
    #[error("initrd {} ({size} bytes) does not fit in guest memory below {limit:#x}", path.display())]
    InitrdTooLarge {
        /// The initrd.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The highest address it may reach.
        limit: u64,
    },
    /// The command line is invalid or too long for the kernel.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line to guest memory failed.
    #[error("cannot write the command line to guest memory")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy initrd {} into guest memory", path.display())]
    WriteInitrd {
        /// The initrd.
        path: PathBuf,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the kernel landed and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage setup header (`None` for an ELF vmlinux).
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// How long a command line (with its NUL) this kernel accepts.
    pub fn cmdline_capacity(&self) -> usize {
        match self.setup_header {
            Some(h) if h.version >= 0x0206 && h.cmdline_size > 0 => h.cmdline_size as usize + 1,
            _ => DEFAULT_CMDLINE_CAPACITY,
        }
    }

    /// The highest address the initrd may reach.
    fn initrd_addr_max(&self) -> u64 {
        match self.setup_header {
            Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
            _ => DEFAULT_INITRD_ADDR_MAX,
        }
    }
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads a bzImage or an ELF vmlinux into `memory`.
pub fn load_kernel(memory: &GuestMem, path: &Path) -> Result<LoadedKernel, BootError> {
    let read_err = |source| BootError::Read {
        path: path.to_owned(),
        source,
    };
    let kernel_err = |source| BootError::Kernel {
        path: path.to_owned(),
        source,
    };
    let mut file = open(path)?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if &magic == b"\x7fELF" {
        let loaded = Elf::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(kernel_err)?;
        Ok(LoadedKernel {
            entry: loaded.kernel_load.0,
            end: loaded.kernel_end,
            setup_header: None,
        })
    } else {
        let loaded = BzImage::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(kernel_err)?;
        Ok(LoadedKernel {
            entry: loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            end: loaded.kernel_end,
            setup_header: loaded.setup_header,
        })
    }
}

/// Where an initrd of `size` bytes goes: as high as possible under the top of low RAM and the
/// kernel's limit, page aligned, above the kernel.
pub fn initrd_address(size: u64, mem_size: u64, kernel_end: u64, addr_max: u64) -> Option<u64> {
    let top = mem_size.min(MMIO_GAP_START).min(addr_max.saturating_add(1));
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

/// Copies the initrd into `memory`; returns its address and size.
pub fn load_initrd(
    memory: &GuestMem,
    path: &Path,
    mem_size: u64,
    kernel: &LoadedKernel,
) -> Result<(u64, u32), BootError> {
    let mut file = open(path)?;
    let size = file
        .metadata()
        .map_err(|source| BootError::Read {
            path: path.to_owned(),
            source,
        })?
        .len();
    let limit = kernel.initrd_addr_max();
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        limit,
    };
    let size32 = u32::try_from(size).map_err(|_| too_large())?;
    let addr = initrd_address(size, mem_size, kernel.end, limit).ok_or_else(too_large)?;
    memory
        .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::WriteInitrd {
            path: path.to_owned(),
            source,
        })?;
    Ok((addr, size32))
}

/// Writes `cmdline` at [`CMDLINE_ADDR`]; returns its address and length without the NUL.
pub fn load_cmdline(memory: &GuestMem, cmdline: &Cmdline) -> Result<(u64, u32), BootError> {
    linux_loader::loader::load_cmdline(memory, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(BootError::WriteCmdline)?;
    let len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len();
    Ok((CMDLINE_ADDR, len as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_initrd_goes_high_page_aligned_and_above_the_kernel() {
        let mib = 1 << 20;
        assert_eq!(
            initrd_address(3 * mib + 5, 512 * mib, 20 * mib, 0x7fff_ffff),
            Some(512 * mib - 3 * mib - 0x1000)
        );
        // The kernel's limit wins over the top of memory.
        assert_eq!(
            initrd_address(mib, 2048 * mib, 20 * mib, 0x37ff_ffff),
            Some(0x3800_0000 - mib)
        );
        // Memory above the gap is never used.
        assert_eq!(
            initrd_address(mib, 8192 * mib, 20 * mib, u64::from(u32::MAX)),
            Some(MMIO_GAP_START - mib)
        );
        assert_eq!(
            initrd_address(500 * mib, 512 * mib, 20 * mib, 0x7fff_ffff),
            None
        );
        assert_eq!(initrd_address(u64::MAX, 512 * mib, 0, 0x7fff_ffff), None);
    }

    #[test]
    fn test_cmdline_is_written_nul_terminated() {
        use vm_memory::Bytes;
        let ram = crate::memory::create_guest_memory(1 << 20).unwrap();
        let memory = ram.memory();
        let cmdline = Cmdline::try_from("console=ttyS0 reboot=k panic=-1", 2048).unwrap();
        let (addr, len) = load_cmdline(memory, &cmdline).unwrap();
        let mut buf = vec![0u8; len as usize + 1];
        memory.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 reboot=k panic=-1\0");
    }

    #[test]
    fn test_garbage_kernel_is_refused_with_its_path() {
        let dir = std::env::temp_dir().join(format!("vmfarm-kernel-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 4096]).unwrap();
        let ram = crate::memory::create_guest_memory(16 << 20).unwrap();
        let memory = ram.memory();
        let err = load_kernel(memory, &dir).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(err, BootError::Kernel { .. }), "{err:?}");
        assert!(err.to_string().contains("vmfarm-kernel"));
    }
}
