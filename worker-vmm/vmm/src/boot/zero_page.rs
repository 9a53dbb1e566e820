//! The zero page (`struct boot_params`): e820 map, command line, initrd, RSDP, loader type.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use crate::layout::{ACPI_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader (0xff): Linux accepts it.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Minimum alignment of a relocatable kernel (used for ELF boots, which carry no header).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// loadflags: the kernel is loaded high; the loader may use the heap.
const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;

/// Building the zero page failed.
#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    /// The e820 map does not fit the zero page.
    #[error("the e820 map has {0} entries, more than the zero page holds")]
    TooManyE820Entries(usize),
}

/// The e820 map for `mem_size` bytes of RAM: low memory up to the EBDA, the BIOS area
/// reserved (MP table, ACPI tables), RAM from 1 MiB to the MMIO gap, and above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, r#type: u32| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    // The reserved range covers 0x9fc00..1 MiB, so the ACPI tables are inside it.
    const { assert!(ACPI_START > EBDA_START && ACPI_START < HIMEM_START) };
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push(entry(HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if mem_size > MMIO_GAP_START {
        map.push(entry(MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    map
}

/// What goes into the zero page.
pub struct ZeroPageParams {
    /// The bzImage's setup header, `None` for an ELF vmlinux.
    pub setup_header: Option<setup_header>,
    /// Guest address and length (without the NUL) of the command line.
    pub cmdline: (u64, u32),
    /// Guest address and size of the initrd.
    pub initrd: Option<(u64, u32)>,
    /// RAM size.
    pub mem_size: u64,
    /// Where the ACPI RSDP is.
    pub rsdp_addr: u64,
}

/// Builds the zero page.
pub fn build_zero_page(params: &ZeroPageParams) -> Result<boot_params, ZeroPageError> {
    let mut zp = boot_params::default();
    if let Some(header) = params.setup_header {
        zp.hdr = header;
    } else {
        zp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        zp.hdr.header = KERNEL_HDR_MAGIC;
        zp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    zp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    zp.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    zp.hdr.heap_end_ptr = 0xfe00;
    zp.hdr.cmd_line_ptr = params.cmdline.0 as u32;
    zp.hdr.cmdline_size = params.cmdline.1;
    if let Some((addr, size)) = params.initrd {
        zp.hdr.ramdisk_image = addr as u32;
        zp.hdr.ramdisk_size = size;
    }
    zp.acpi_rsdp_addr = params.rsdp_addr;
    let map = e820_map(params.mem_size);
    if map.len() > zp.e820_table.len() {
        return Err(ZeroPageError::TooManyE820Entries(map.len()));
    }
    zp.e820_table[..map.len()].copy_from_slice(&map);
    zp.e820_entries = map.len() as u8;
    Ok(zp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(map: &[boot_e820_entry]) -> Vec<(u64, u64, u32)> {
        map.iter().map(|e| (e.addr, e.size, e.r#type)).collect()
    }

    #[test]
    fn test_e820_small_guest_has_no_high_ram() {
        assert_eq!(
            ranges(&e820_map(512 << 20)),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x10_0000 - 0x9fc00, E820_RESERVED),
                (0x10_0000, (512 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn test_e820_large_guest_skips_the_mmio_gap() {
        let map = ranges(&e820_map(5 << 30));
        assert_eq!(map[2], (0x10_0000, 0xc000_0000 - 0x10_0000, E820_RAM));
        assert_eq!(map[3], (0x1_0000_0000, (5 << 30) - 0xc000_0000, E820_RAM));
        // No RAM entry overlaps the gap.
        for (addr, size, t) in map {
            if t == E820_RAM {
                assert!(addr + size <= MMIO_GAP_START || addr >= MMIO_GAP_END);
            }
        }
    }

    #[test]
    fn test_zero_page_carries_cmdline_initrd_rsdp_and_loader() {
        let header = setup_header {
            version: 0x020f,
            ..Default::default()
        };
        let zp = build_zero_page(&ZeroPageParams {
            setup_header: Some(header),
            cmdline: (0x20000, 27),
            initrd: Some((0x1f00_0000, 0x10_0000)),
            mem_size: 512 << 20,
            rsdp_addr: 0xe0000,
        })
        .unwrap();
        let hdr = zp.hdr;
        assert_eq!(
            (
                hdr.cmd_line_ptr,
                hdr.cmdline_size,
                hdr.type_of_loader,
                hdr.version
            ),
            (0x20000, 27, 0xff, 0x020f)
        );
        assert_eq!(
            (hdr.ramdisk_image, hdr.ramdisk_size),
            (0x1f00_0000, 0x10_0000)
        );
        assert_eq!({ zp.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(zp.e820_entries, 3);

        let elf = build_zero_page(&ZeroPageParams {
            setup_header: None,
            cmdline: (0x20000, 0),
            initrd: None,
            mem_size: 128 << 20,
            rsdp_addr: 0xe0000,
        })
        .unwrap();
        let hdr = elf.hdr;
        assert_eq!(
            (hdr.boot_flag, hdr.header, hdr.ramdisk_image),
            (0xaa55, 0x5372_6448, 0)
        );
    }
}
