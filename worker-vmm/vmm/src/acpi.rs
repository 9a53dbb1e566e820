//! ACPI tables for a hardware-reduced platform: RSDP, XSDT, FADT (sleep and reset registers),
//! MADT (local APICs, the IOAPIC, the ISA override) and a DSDT declaring COM1, pvpanic and the
//! virtio-mmio devices (`LNRO0005`, which is how stock kernels find virtio-mmio).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, aml};

use super::layout::{
    ACPI_PM_PORT, ACPI_START, GED_GSI, IOAPIC_ADDR, LAPIC_ADDR, PVPANIC_PORT, RTC_GSI, RTC_PORT,
    SERIAL_GSI, SERIAL_PORT, VMGENID_ADDR,
};
use super::legacy::acpi_pm::{RESET, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL, SLEEP_STATUS};

const OEM_ID: [u8; 6] = *b"VMFARM";
const OEM_TABLE_ID: [u8; 8] = *b"VMFARMVM";
const OEM_REVISION: u32 = 1;
/// IAPC_BOOT_ARCH: no VGA. (No 8042 flag: Linux's i8042 driver then skips probing, while
/// `reboot=k` still pulses the reset line through port 0x64.)
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
/// CMOS index of the century register.
const CMOS_CENTURY: u8 = 0x32;

/// A virtio-mmio device as the firmware tables describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Base of its register window.
    pub base: u64,
    /// Length of the window.
    pub len: u64,
    /// Its IOAPIC pin.
    pub gsi: u32,
}

/// The tables, laid out from [`ACPI_START`].
pub struct AcpiTables {
    /// The bytes to write at [`ACPI_START`].
    pub bytes: Vec<u8>,
    /// Where the RSDP is (for the zero page).
    pub rsdp_addr: u64,
}

/// Building the tables failed.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables outgrew the BIOS area.
    #[error("the ACPI tables ({0} bytes) do not fit below the VM generation ID")]
    TooLarge(usize),
    /// A value does not fit its ACPI field.
    #[error("{0} does not fit in a 32-bit ACPI field")]
    Address(u64),
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// AML already serialized, placed as is in a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// `Device (name) { _HID, _UID, _CRS }` serialized into `sink`.
fn device(name: &str, hid: &dyn Aml, uid: u32, resources: &[&dyn Aml], sink: &mut Vec<u8>) {
    let crs = aml::ResourceTemplate::new(resources.to_vec());
    let hid = aml::Name::new("_HID".into(), hid);
    let uid = aml::Name::new("_UID".into(), &uid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new(name.into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

fn dsdt(slots: &[MmioSlot]) -> Result<Sdt, AcpiError> {
    let mut body = Vec::new();

    // \_S5_: the sleep type written to the sleep control register to power off.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8]),
    )
    .to_aml_bytes(&mut body);

    let mut devices = Vec::new();
    device(
        "COM1",
        &aml::EISAName::new("PNP0501"),
        0,
        &[
            &aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8),
            &aml::Interrupt::new(true, true, false, false, SERIAL_GSI),
        ],
        &mut devices,
    );
    // The CMOS RTC as a PNP device: rtc_cmos then gets IRQ 8 mapped through the IOAPIC (its
    // legacy platform device fails to request IRQ 8 on a hardware-reduced platform).
    device(
        "RTC_",
        &aml::EISAName::new("PNP0B00"),
        0,
        &[
            &aml::IO::new(RTC_PORT, RTC_PORT, 1, 2),
            &aml::Interrupt::new(true, true, false, false, RTC_GSI),
        ],
        &mut devices,
    );
    device(
        "PEVT",
        &"QEMU0001",
        0,
        &[&aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1)],
        &mut devices,
    );
    for (i, slot) in slots.iter().enumerate() {
        let base = u32::try_from(slot.base).map_err(|_| AcpiError::Address(slot.base))?;
        let len = u32::try_from(slot.len).map_err(|_| AcpiError::Address(slot.len))?;
        device(
            &format!("V{i:03X}"),
            &"LNRO0005",
            i as u32,
            &[
                &aml::Memory32Fixed::new(true, base, len),
                // Edge-triggered, active high, exclusive: the device pulses its irqfd.
                &aml::Interrupt::new(true, true, false, false, slot.gsi),
            ],
            &mut devices,
        );
    }
    vm_generation(&mut devices)?;
    let devices = RawAml(devices);
    aml::Scope::new("\\_SB_".into(), vec![&devices]).to_aml_bytes(&mut body);

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    Ok(sdt)
}

/// The VM generation ID device (`VGEN`: QEMU's ids, its 16 bytes at `ADDR`) and the Generic
/// Event Device (`GED_`, ACPI0013) whose line's `_EVT` tells the guest the ID changed.
fn vm_generation(sink: &mut Vec<u8>) -> Result<(), AcpiError> {
    let low = u32::try_from(VMGENID_ADDR).map_err(|_| AcpiError::Address(VMGENID_ADDR))?;
    let addr = aml::Package::new(vec![&low, &0u32]);
    let hid = aml::Name::new("_HID".into(), &"QEMUVGID");
    let cid = aml::Name::new("_CID".into(), &"VM_GEN_COUNTER");
    let ddn = aml::Name::new("_DDN".into(), &"VM_GEN_COUNTER");
    let addr = aml::Name::new("ADDR".into(), &addr);
    aml::Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr]).to_aml_bytes(sink);

    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &0u32);
    // Edge-triggered, active high, exclusive: the VMM pulses its irqfd.
    let line = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let crs = aml::ResourceTemplate::new(vec![&line]);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let vgen = aml::Path::new("\\_SB_.VGEN");
    let notify = aml::Notify::new(&vgen, &0x80u8);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&notify]);
    aml::Device::new("GED_".into(), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(sink);
    Ok(())
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_NO_VGA.into();
    fadt.century = CMOS_CENTURY;
    fadt.reset_reg = io_register(ACPI_PM_PORT + RESET as u16);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_register(ACPI_PM_PORT + SLEEP_CONTROL as u16);
    fadt.sleep_status_reg = io_register(ACPI_PM_PORT + SLEEP_STATUS as u16);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"VMFARM\0\0").into();
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

fn madt(cpus: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 36, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.append_slice(&LAPIC_ADDR.to_le_bytes());
    madt.append_slice(&0u32.to_le_bytes()); // flags: no dual 8259 to mask
    for id in 0..cpus {
        // Processor local APIC: uid, APIC id, enabled.
        madt.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    // I/O APIC: id (after the CPUs), its address, GSI base 0.
    madt.append_slice(&[1, 12, cpus, 0]);
    madt.append_slice(&IOAPIC_ADDR.to_le_bytes());
    madt.append_slice(&0u32.to_le_bytes());
    // Interrupt source override: ISA IRQ 0 (PIT) is GSI 2, conforming polarity and trigger.
    madt.append_slice(&[2, 10, 0, 0]);
    madt.append_slice(&2u32.to_le_bytes());
    madt.append_slice(&0u16.to_le_bytes());
    // Local APIC NMI: every processor, conforming, LINT1.
    madt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt
}

fn align16(bytes: &mut Vec<u8>) {
    bytes.resize(bytes.len().next_multiple_of(16), 0);
}

/// Builds the tables for `cpus` vCPUs and the virtio-mmio devices in `slots`.
pub fn build_acpi_tables(cpus: u8, slots: &[MmioSlot]) -> Result<AcpiTables, AcpiError> {
    let mut bytes = vec![0u8; Rsdp::len()];
    align16(&mut bytes);
    let at = |bytes: &Vec<u8>| ACPI_START + bytes.len() as u64;

    let dsdt_addr = at(&bytes);
    bytes.extend_from_slice(dsdt(slots)?.as_slice());
    align16(&mut bytes);

    let fadt_addr = at(&bytes);
    bytes.extend_from_slice(&fadt(dsdt_addr));
    align16(&mut bytes);

    let madt_addr = at(&bytes);
    bytes.extend_from_slice(madt(cpus).as_slice());
    align16(&mut bytes);

    let xsdt_addr = at(&bytes);
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for table in [fadt_addr, madt_addr] {
        xsdt.append_slice(&table.to_le_bytes());
    }
    bytes.extend_from_slice(xsdt.as_slice());

    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    bytes[..rsdp.len()].copy_from_slice(&rsdp);

    if ACPI_START + bytes.len() as u64 > VMGENID_ADDR {
        return Err(AcpiError::TooLarge(bytes.len()));
    }
    Ok(AcpiTables {
        bytes,
        rsdp_addr: ACPI_START,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The table at guest address `addr`, checked: signature, length, checksum.
    fn table<'a>(tables: &'a AcpiTables, addr: u64, signature: &[u8; 4]) -> &'a [u8] {
        let off = (addr - ACPI_START) as usize;
        let b = &tables.bytes[off..];
        assert_eq!(&b[..4], signature);
        let len = u32_at(b, 4) as usize;
        assert_eq!(
            sum(&b[..len]),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        &b[..len]
    }

    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    /// Where `needle` first is in `haystack`.
    fn find_at(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap_or_else(|| panic!("{needle:x?} is not there"))
    }

    #[test]
    fn test_acpi_tables_link_up_with_valid_checksums() {
        let slots = [
            MmioSlot {
                base: 0xd000_0000,
                len: 0x200,
                gsi: 5,
            },
            MmioSlot {
                base: 0xd000_1000,
                len: 0x200,
                gsi: 6,
            },
        ];
        let tables = build_acpi_tables(2, &slots).unwrap();
        assert_eq!(tables.rsdp_addr, ACPI_START);
        let rsdp = &tables.bytes[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);

        let xsdt = table(&tables, u64_at(rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = table(&tables, u64_at(xsdt, 36), b"FACP");
        let madt = table(&tables, u64_at(xsdt, 44), b"APIC");

        // FADT: hardware reduced, reset register at ACPI_PM_PORT + 2, DSDT through X_DSDT.
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0);
        assert_eq!(fadt[116], 1, "reset register in I/O space");
        assert_eq!(u64_at(fadt, 120), u64::from(ACPI_PM_PORT) + 2);
        let dsdt = table(&tables, u64_at(fadt, 140), b"DSDT");

        // MADT: two local APICs, an IOAPIC at its address.
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
        assert_eq!(&madt[44..52], &[0, 8, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&madt[52..60], &[0, 8, 1, 1, 1, 0, 0, 0]);
        assert_eq!(&madt[60..64], &[1, 12, 2, 0]);
        assert_eq!(u32_at(madt, 64), IOAPIC_ADDR);

        // DSDT: one LNRO0005 device per slot, pvpanic, COM1, _S5_.
        assert_eq!(find(dsdt, b"LNRO0005\0"), 2);
        assert_eq!(find(dsdt, b"QEMU0001\0"), 1);
        assert_eq!(find(dsdt, b"V000"), 1);
        assert_eq!(find(dsdt, b"V001"), 1);
        assert_eq!(find(dsdt, b"_S5_"), 1);
        // COM1 (PNP0501) and the RTC (PNP0B00) as EISA ids.
        assert_eq!(find(dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
        assert_eq!(find(dsdt, &[0x0c, 0x41, 0xd0, 0x0b, 0x00]), 1);
        // Memory32Fixed descriptor of the second slot: tag 0x86, length 9, read-write, base, len.
        let mut desc = vec![0x86, 9, 0, 1];
        desc.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        desc.extend_from_slice(&0x200u32.to_le_bytes());
        assert_eq!(find(dsdt, &desc), 1);
        // Extended interrupt descriptor of the first slot: consumer, edge, GSI 5.
        assert_eq!(find(dsdt, &[0x89, 6, 0, 0x03, 1, 5, 0, 0, 0]), 1);
        // The VM generation ID: its ids, ADDR as a package of the address's two halves (a
        // DWord 0xff000, then Zero), and the GED on its own edge-triggered line with an _EVT.
        assert_eq!(find(dsdt, b"QEMUVGID\0"), 1);
        assert_eq!(find(dsdt, b"VM_GEN_COUNTER\0"), 2);
        let at = find_at(dsdt, b"ADDR\x12");
        let mut first = vec![0x0c];
        first.extend_from_slice(&(VMGENID_ADDR as u32).to_le_bytes());
        assert_eq!(find(&dsdt[at..at + 16], &first), 1, "ADDR's first element");
        assert_eq!(find(dsdt, b"ACPI0013\0"), 1);
        assert_eq!(
            find(dsdt, &[0x89, 6, 0, 0x03, 1, GED_GSI as u8, 0, 0, 0]),
            1
        );
        assert_eq!(find(dsdt, b"_EVT"), 1);
    }

    #[test]
    fn test_acpi_refuses_slots_above_4g() {
        let slots = [MmioSlot {
            base: 1 << 32,
            len: 0x200,
            gsi: 5,
        }];
        assert!(matches!(
            build_acpi_tables(1, &slots),
            Err(AcpiError::Address(_))
        ));
    }
}
