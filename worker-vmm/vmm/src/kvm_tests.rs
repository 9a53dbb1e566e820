//! Whole-VM tests on the host's /dev/kvm: tiny hand-assembled 64-bit guests, loaded as ELF
//! "kernels" through the real boot path (long-mode entry, zero page in RSI), that talk to the
//! legacy devices and end the VM in each of the ways a guest can.
//!
//! Without a usable /dev/kvm they print why and pass, unless `VMFARM_REQUIRE_KVM=1`, where they
//! fail.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::acpi::MmioSlot;
use super::config::{ConsoleConfig, VmConfig};
use super::exit::VmExit;
use super::layout::{VIRTIO_GSIS, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use super::vm::build_vm;

/// Where the tiny guests are loaded and entered.
const LOAD_ADDR: u64 = 0x10_0000;

/// Prints `message` on COM1, then runs `tail`.
fn serial_then(message: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut code = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0x48, 0x8d, 0x35, 0, 0, 0, 0, // lea rsi, [rip + message]
        0xb9, 0, 0, 0, 0,    // mov ecx, len
        0xac, // lodsb
        0xee, // out dx, al
        0xe2, 0xfc, // loop lodsb
    ];
    code.extend_from_slice(tail);
    let after_lea = 11;
    let disp = (code.len() - after_lea) as u32;
    code[7..11].copy_from_slice(&disp.to_le_bytes());
    code[12..16].copy_from_slice(&(message.len() as u32).to_le_bytes());
    code.extend_from_slice(message);
    code
}

/// `out 0x64, 0xfe` (i8042 CPU reset), then halt forever.
const I8042_RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
/// `mov dx, 0x505; mov al, 1; out dx, al` (pvpanic: panicked), then halt forever.
const PVPANIC: &[u8] = &[0x66, 0xba, 0x05, 0x05, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd];
/// `ud2` with an IDT too small for any vector: #UD, #GP, #DF, triple fault.
const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];
/// `jmp $`.
const SPIN: &[u8] = &[0xeb, 0xfe];
/// ACPI S5: `mov dx, 0x600; mov al, (5 << 2) | 0x20; out dx, al`, then halt forever.
const ACPI_POWER_OFF: &[u8] = &[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd];

/// A minimal ELF64 executable whose one segment, `code`, is loaded and entered at LOAD_ADDR.
fn elf_image(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let offset = (EHDR + PHDR) as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [EHDR as u16, PHDR as u16, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    assert_eq!(elf.len(), EHDR);
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [
        offset,
        LOAD_ADDR,
        LOAD_ADDR,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    assert_eq!(elf.len(), EHDR + PHDR);
    elf.extend_from_slice(code);
    elf
}

/// Whether /dev/kvm can create a VM here; `Err` says why not.
fn kvm_usable() -> Result<(), String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    kvm.create_vm()
        .map(drop)
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))
}

/// False (after printing why) when the test should be skipped; panics when KVM is required.
fn require_kvm() -> bool {
    match kvm_usable() {
        Ok(()) => true,
        Err(why) if std::env::var("VMFARM_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("VMFARM_REQUIRE_KVM=1 but /dev/kvm is unusable: {why}")
        }
        Err(why) => {
            eprintln!("skipped: {why} (set VMFARM_REQUIRE_KVM=1 to make this a failure)");
            false
        }
    }
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmfarm-vmm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Boots `code` on `cpus` vCPUs; returns how the VM ended, the console, and the time taken.
fn boot(name: &str, code: &[u8], cpus: u8, timeout: Duration) -> (VmExit, String, Duration) {
    let scratch = Scratch::new(name);
    let kernel = scratch.0.join("guest.elf");
    std::fs::write(&kernel, elf_image(code)).unwrap();
    let console = scratch.0.join("console.log");
    let config = tiny_config(&scratch, "console.log", cpus, timeout);
    let started = Instant::now();
    let vm = build_vm(&config).unwrap();
    // The rng device is the only virtio device: first window, first virtio GSI.
    assert_eq!(
        vm.mmio_slots(),
        &[MmioSlot {
            base: VIRTIO_MMIO_BASE,
            len: VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_GSIS[0]
        }]
    );
    let exit = vm.run(config.timeout).unwrap();
    let took = started.elapsed();
    let console = std::fs::read_to_string(&console).unwrap();
    (exit, console, took)
}

#[test]
fn test_tiny_guest_ends_the_vm_each_way() {
    if !require_kvm() {
        return;
    }
    let cases: [(&str, Vec<u8>, u8, VmExit); 5] = [
        (
            "reset",
            serial_then(b"hello from the guest\n", I8042_RESET),
            1,
            VmExit::Reset,
        ),
        (
            "reset-2cpu",
            serial_then(b"two vcpus\n", I8042_RESET),
            2,
            VmExit::Reset,
        ),
        (
            "poweroff",
            serial_then(b"bye\n", ACPI_POWER_OFF),
            1,
            VmExit::PowerOff,
        ),
        ("panic", serial_then(b"oops\n", PVPANIC), 1, VmExit::Panic),
        (
            "triple",
            serial_then(b"fault\n", TRIPLE_FAULT),
            1,
            VmExit::TripleFault {
                vcpu: 0,
                state: String::new(),
            },
        ),
    ];
    for (name, code, cpus, expected) in cases {
        let (exit, console, took) = boot(name, &code, cpus, Duration::from_secs(30));
        eprintln!("{name}: {exit} in {took:?}");
        // A triple fault says where the vCPU stood; the rest of the exit must match exactly.
        let exit = match exit {
            VmExit::TripleFault { vcpu, state } => {
                // Empty where KVM resets the vCPU on the shutdown (AMD).
                assert!(
                    state.is_empty() || state.starts_with("rip 0x1000"),
                    "{name}: {state}"
                );
                VmExit::TripleFault {
                    vcpu,
                    state: String::new(),
                }
            }
            other => other,
        };
        assert_eq!(exit, expected, "{name}");
        let message = String::from_utf8_lossy(&code[code.len() - console.len()..]).into_owned();
        assert_eq!(console, message, "{name}: console");
        assert!(took < Duration::from_secs(10), "{name} took {took:?}");
    }
}

#[test]
fn test_tiny_guest_that_spins_times_out() {
    if !require_kvm() {
        return;
    }
    let (exit, console, took) = boot(
        "spin",
        &serial_then(b"spinning\n", SPIN),
        1,
        Duration::from_millis(300),
    );
    assert_eq!(exit, VmExit::Timeout(Duration::from_millis(300)));
    assert_eq!(console, "spinning\n");
    assert!(took < Duration::from_secs(5), "teardown took {took:?}");
}

/// The guest byte a saved tiny guest waits on (its RAM file's offset is its address).
const FLAG: u64 = 0x20_0000;

/// Waits until the byte at [`FLAG`] is not zero: `cmp byte [FLAG], 0; je` back to the `cmp`.
fn wait_for_flag() -> Vec<u8> {
    let mut code = vec![0x80, 0x3c, 0x25];
    code.extend_from_slice(&(FLAG as u32).to_le_bytes());
    code.extend_from_slice(&[0x00, 0x74, 0xf6]);
    code
}

/// A tiny guest's VM: `scratch`'s guest.elf, 32 MiB, the rng device, COM1 to `console`.
fn tiny_config(scratch: &Scratch, console: &str, cpus: u8, timeout: Duration) -> VmConfig {
    VmConfig {
        kernel: scratch.0.join("guest.elf"),
        initrd: None,
        disks: Vec::new(),
        vsock: None,
        rng: true,
        cpus,
        memory: 32 << 20,
        cmdline: "console=ttyS0".into(),
        virtio_mmio_cmdline: false,
        console: ConsoleConfig::File(scratch.0.join(console)),
        timeout: Some(timeout),
    }
}

/// A guest saved while it waits on a byte of its memory goes on where it stood when restored
/// from the saved files with that byte set: it prints its second line on the new VM's console
/// and powers off. A snapshot is refused by a VM of another shape and when another VMM wrote it.
#[test]
fn test_a_saved_guest_goes_on_where_it_stood_when_restored() {
    use super::snapshot::{RestoreFrom, SaveTo, SnapshotError};
    use super::vm::{restore_vm, shape};

    if !require_kvm() {
        return;
    }
    let scratch = Scratch::new("snapshot");
    let rest = [wait_for_flag(), serial_then(b"two\n", ACPI_POWER_OFF)].concat();
    std::fs::write(
        scratch.0.join("guest.elf"),
        elf_image(&serial_then(b"one\n", &rest)),
    )
    .unwrap();
    let saved = scratch.0.join("saved");
    let config = tiny_config(&scratch, "first.log", 1, Duration::from_secs(30));
    let save = SaveTo::create(&saved, config.memory).unwrap();
    let vm = build_vm(&config).unwrap();
    let handle = vm.save_handle();
    let running =
        std::thread::spawn(move || vm.run_to_save(Some(Duration::from_secs(30)), &[], &save));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(scratch.0.join("first.log")).unwrap_or_default() != "one\n" {
        assert!(
            Instant::now() < deadline,
            "the guest never printed its first line"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.save();
    assert_eq!(running.join().unwrap().unwrap(), VmExit::Saved);

    // The flag, set in the saved memory: only a restored guest can see it.
    let memory = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(saved.join(super::snapshot::MEMORY_FILE))
        .unwrap();
    // The booted guest's VM generation ID is in its memory, where the ACPI tables say.
    let mut id = [0u8; 16];
    std::os::unix::fs::FileExt::read_exact_at(&memory, &mut id, super::layout::VMGENID_ADDR)
        .unwrap();
    assert_ne!(id, [0; 16], "no VM generation ID");
    std::os::unix::fs::FileExt::write_all_at(&memory, &[1], FLAG).unwrap();
    let again = tiny_config(&scratch, "second.log", 1, Duration::from_secs(30));
    let from = RestoreFrom::open(&saved, None, &shape(&again)).unwrap();
    let started = Instant::now();
    let vm = restore_vm(&again, &from).unwrap();
    eprintln!("restored in {:?}", started.elapsed());
    assert_eq!(vm.run(again.timeout).unwrap(), VmExit::PowerOff);
    assert_eq!(
        std::fs::read_to_string(scratch.0.join("second.log")).unwrap(),
        "two\n"
    );

    let two_cpus = tiny_config(&scratch, "third.log", 2, Duration::from_secs(30));
    let refused = RestoreFrom::open(&saved, None, &shape(&two_cpus))
        .err()
        .unwrap();
    assert!(
        matches!(refused, SnapshotError::OtherShape { .. })
            && refused.to_string().contains("restore it with the vCPUs"),
        "{refused}"
    );
    let state_file = saved.join(super::snapshot::STATE_FILE);
    let state = std::fs::read_to_string(&state_file).unwrap();
    let other = state.replacen(super::snapshot::VMM_VERSION, "vmfarm-vmm 0.0.1 state 0", 1);
    std::fs::write(&state_file, other).unwrap();
    let refused = RestoreFrom::open(&saved, None, &shape(&again))
        .err()
        .unwrap();
    assert!(
        refused
            .to_string()
            .contains("saved by vmfarm-vmm 0.0.1 state 0"),
        "{refused}"
    );
}
