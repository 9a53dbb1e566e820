//! Where everything sits in the guest's physical address space and port space.
//!
//! Low memory (below 1 MiB) holds the boot structures; RAM above 1 MiB runs up to the 32-bit MMIO
//! gap (`MMIO_GAP_START..MMIO_GAP_END`) and continues above 4 GiB.

/// The boot GDT (four entries: null, code, data, TSS).
pub const GDT_ADDR: u64 = 0x500;
/// The (empty) boot IDT.
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT and one page directory of 2 MiB pages (the first GiB).
pub const PML4_ADDR: u64 = 0x9000;
/// See [`PML4_ADDR`].
pub const PDPTE_ADDR: u64 = 0xa000;
/// See [`PML4_ADDR`].
pub const PDE_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Start of the extended BIOS data area: the MP table lives here, reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory (640 KiB).
pub const LOW_MEM_END: u64 = 0xa0000;
/// ACPI tables (RSDP first, where the BIOS area scan finds it), reserved in the e820 map.
pub const ACPI_START: u64 = 0xe0000;
/// The VM generation ID (16 bytes, [`crate::legacy::vmgenid`]): the last page of the ACPI
/// area, reserved with it; the tables end below it.
pub const VMGENID_ADDR: u64 = 0xf_f000;
/// End of the BIOS area, start of high memory.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap: no RAM here.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// See [`MMIO_GAP_START`].
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where KVM keeps its TSS pages (three pages, inside the gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// The IOAPIC (in-kernel).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs (in-kernel).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// First virtio-mmio window; each device gets `VIRTIO_MMIO_STRIDE` bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Distance between two virtio-mmio windows.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// Size of a virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// Pins of the IOAPIC given to virtio-mmio devices, in order: ISA lines with no legacy device
/// here (8 stays with the RTC), then the PCI-style pins.
pub const VIRTIO_GSIS: [u32; 16] = [5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21];
/// The ACPI Generic Event Device's line: raised after a restore, when the VM generation ID
/// changed.
pub const GED_GSI: u32 = 22;
/// Number of IOAPIC pins (KVM's in-kernel IOAPIC).
pub const IOAPIC_PINS: u32 = 24;

/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const SERIAL_GSI: u32 = 4;
/// i8042 data port; the command/status port is `I8042_PORT + 4`.
pub const I8042_PORT: u16 = 0x60;
/// CMOS RTC index port; data is at `RTC_PORT + 1`.
pub const RTC_PORT: u16 = 0x70;
/// The RTC's interrupt line (never raised: no alarms or periodic interrupts are emulated).
pub const RTC_GSI: u32 = 8;
/// pvpanic's port (QEMU's default).
pub const PVPANIC_PORT: u16 = 0x505;
/// ACPI sleep control (+0), sleep status (+1) and reset (+2) registers.
pub const ACPI_PM_PORT: u16 = 0x600;
