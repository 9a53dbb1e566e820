//! Building a VM from its configuration (a list of steps, one device at a time) and running it.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::Killable;

use super::acpi::{AcpiError, MmioSlot, build_acpi_tables};
use super::boot::cpu::{self, CpuSetupError};
use super::boot::cpuid::filter_cpuid;
use super::boot::kernel::{BootError, LoadedKernel, load_cmdline, load_initrd, load_kernel};
use super::boot::mptable::{MpTableError, build_mptable};
use super::boot::zero_page::{ZeroPageError, ZeroPageParams, build_zero_page};
use super::bus::{Bus, BusDevice, BusError};
use super::config::{ConsoleConfig, DiskConfig, GUEST_CID, VmConfig};
use super::exit::{ExitSignal, VmExit};
use super::irq::IrqLine;
use super::irqfd::IrqFd;
use super::layout::{
    ACPI_PM_PORT, ACPI_START, EBDA_START, GED_GSI, I8042_PORT, KVM_TSS_ADDR, PVPANIC_PORT,
    RTC_PORT, SERIAL_GSI, SERIAL_PORT, VIRTIO_GSIS, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
    VIRTIO_MMIO_STRIDE, ZERO_PAGE_ADDR,
};
use super::legacy::{
    acpi_pm::AcpiPm,
    i8042::I8042,
    pvpanic::PvPanic,
    rtc::{Rtc, RtcState},
    serial::SerialDevice,
    vmgenid,
};
use super::memory::{
    Backing, GuestRam, MemoryError, create_guest_memory, create_guest_memory_from, register_memory,
};
use super::seccomp::{self, SeccompError};
use super::snapshot::kvm_state::{VcpuState, VmKvmState};
use super::snapshot::{RestoreFrom, SaveTo, Shape, SnapshotError, VMM_VERSION, VmState};
use super::thread::{self, Stack};
use super::vcpu::{VcpuShared, install_kick_handler, kick_signal, run_vcpu};
use super::virtio::{block::Block, mmio::MmioTransport, rng::Rng, vsock::Vsock};
use vm_superio::serial::SerialState;

/// Building the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("{what} failed (is /dev/kvm there and usable?)")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM.
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    /// Kernel, initrd or command line.
    #[error("boot")]
    Boot(#[from] BootError),
    /// A thread that builds part of the VM (the loader, the memory registration) could not
    /// start or panicked.
    #[error("the {name} thread")]
    Helper {
        /// Which thread.
        name: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// vCPU setup.
    #[error("vCPU setup")]
    Cpu(#[from] CpuSetupError),
    /// ACPI tables.
    #[error("ACPI tables")]
    Acpi(#[from] AcpiError),
    /// MP table.
    #[error("MP table")]
    MpTable(#[from] MpTableError),
    /// Zero page.
    #[error("zero page")]
    ZeroPage(#[from] ZeroPageError),
    /// Two devices at one address (a bug in the layout).
    #[error("device placement")]
    Bus(#[from] BusError),
    /// Writing firmware tables or the zero page to guest memory.
    #[error("cannot write {what} to guest memory")]
    WriteMemory {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The console file.
    #[error("cannot create console file {}", path.display())]
    Console {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A device could not be set up.
    #[error("cannot attach {what}")]
    Device {
        /// Which device.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// More virtio devices than interrupt lines.
    #[error("too many virtio devices (at most {})", VIRTIO_GSIS.len())]
    TooManyDevices,
    /// The kernel command line.
    #[error("kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The seccomp filter.
    #[error("seccomp")]
    Seccomp(#[from] SeccompError),
    /// The kick signal handler.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Saving or restoring the VM.
    #[error("snapshot")]
    Snapshot(#[from] SnapshotError),
    /// A vCPU thread.
    #[error("cannot start vCPU thread {id}")]
    Thread {
        /// The vCPU.
        id: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn device_err<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> VmError {
    let what = what.into();
    move |e| VmError::Device {
        what,
        source: Box::new(e),
    }
}

/// Asks a VM that runs [`Vm::run_to_save`] to stop and be saved.
#[derive(Clone)]
pub struct SaveHandle(Arc<ExitSignal>);

impl SaveHandle {
    /// Stops the VM to save it (unless it already ended).
    pub fn save(&self) {
        self.0.report(VmExit::Saved);
    }
}

/// The devices whose state a snapshot holds, beside their places on the buses.
struct Stateful {
    serial: Arc<Mutex<SerialDevice<IrqFd>>>,
    rtc: Arc<Mutex<Rtc>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

/// What a VM [`restore_vm`] built has that a booted one has not.
struct Restored {
    /// The ACPI GED's line, raised as the vCPUs start: the VM generation ID changed.
    generation_line: IrqFd,
    /// The restore's steps and when each ended ([`Vm::restored`]).
    steps: String,
}

/// A VM ready to run: memory loaded, devices placed, vCPUs set up.
pub struct Vm {
    /// How long building took.
    built_in: Duration,
    vcpus: Vec<VcpuFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    slots: Vec<MmioSlot>,
    stateful: Stateful,
    shape: Shape,
    restored: Option<Restored>,
    // Dropped after the devices and vCPUs that use them, guest RAM last.
    vm_fd: Arc<VmFd>,
    kvm: Kvm,
    ram: Arc<GuestRam>,
}

/// The VM while its devices are being attached.
struct VmBuilder {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    pio: Bus,
    mmio: Bus,
    exit: Arc<ExitSignal>,
    slots: Vec<MmioSlot>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl VmBuilder {
    fn new(ram: Arc<GuestRam>) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        vm_fd
            .set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Self {
            kvm,
            vm_fd,
            ram,
            pio: Bus::new(),
            mmio: Bus::new(),
            exit: Arc::new(ExitSignal::new()),
            slots: Vec::new(),
            transports: Vec::new(),
        })
    }

    fn irq(&self, gsi: u32) -> Result<IrqFd, VmError> {
        IrqFd::new(self.vm_fd.clone(), gsi).map_err(device_err(format!("irqfd for GSI {gsi}")))
    }

    /// Places `device` on the port bus at `port`; returns it, shared with the bus.
    fn attach_pio<D: BusDevice + 'static>(
        &mut self,
        port: u16,
        len: u16,
        device: D,
    ) -> Result<Arc<Mutex<D>>, VmError> {
        let device = Arc::new(Mutex::new(device));
        self.pio
            .insert(u64::from(port), u64::from(len), device.clone())?;
        Ok(device)
    }

    /// COM1, new or as `restored` left it.
    fn attach_serial(
        &mut self,
        console: &ConsoleConfig,
        restored: Option<&SerialState>,
    ) -> Result<Arc<Mutex<SerialDevice<IrqFd>>>, VmError> {
        let out: Box<dyn Write + Send> = match console {
            ConsoleConfig::Stdout => Box::new(std::io::stdout()),
            ConsoleConfig::File(path) => {
                let file = File::create(path).map_err(|source| VmError::Console {
                    path: path.clone(),
                    source,
                })?;
                Box::new(LineWriter::new(file))
            }
        };
        let irq = self.irq(SERIAL_GSI)?;
        let serial = match restored {
            None => SerialDevice::new(irq, out),
            Some(state) => {
                SerialDevice::restored(state, irq, out).map_err(|why| SnapshotError::Device {
                    what: "COM1".into(),
                    why,
                })?
            }
        };
        self.attach_pio(SERIAL_PORT, 8, serial)
    }

    fn attach_i8042(&mut self) -> Result<(), VmError> {
        self.attach_pio(I8042_PORT, 5, I8042::new(self.exit.clone()))
            .map(drop)
    }

    /// The CMOS, new or as `restored` left it.
    fn attach_rtc(&mut self, restored: Option<&RtcState>) -> Result<Arc<Mutex<Rtc>>, VmError> {
        let rtc = match restored {
            None => Rtc::new(),
            Some(state) => Rtc::restored(state).ok_or_else(|| SnapshotError::Device {
                what: "the CMOS".into(),
                why: "its RAM is not 128 bytes".into(),
            })?,
        };
        self.attach_pio(RTC_PORT, 2, rtc)
    }

    fn attach_pvpanic(&mut self) -> Result<(), VmError> {
        self.attach_pio(PVPANIC_PORT, 1, PvPanic::new(self.exit.clone()))
            .map(drop)
    }

    fn attach_acpi_pm(&mut self) -> Result<(), VmError> {
        self.attach_pio(ACPI_PM_PORT, 3, AcpiPm::new(self.exit.clone()))
            .map(drop)
    }

    /// Puts a virtio device behind a transport in the next MMIO window, with the next GSI.
    fn attach_virtio(
        &mut self,
        device: Box<dyn super::virtio::device::VirtioDevice>,
    ) -> Result<(), VmError> {
        let index = self.slots.len();
        let gsi = *VIRTIO_GSIS.get(index).ok_or(VmError::TooManyDevices)?;
        let base = VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_STRIDE;
        let irq: Arc<dyn IrqLine> = Arc::new(self.irq(gsi)?);
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            self.ram.memory().clone(),
            irq,
        )));
        self.mmio.insert(
            base,
            super::virtio::mmio::MMIO_WINDOW_SIZE,
            transport.clone(),
        )?;
        self.transports.push(transport);
        self.slots.push(MmioSlot {
            base,
            len: VIRTIO_MMIO_SIZE,
            gsi,
        });
        Ok(())
    }

    fn attach_block(&mut self, disk: &DiskConfig) -> Result<(), VmError> {
        let block = Block::open(&disk.path, disk.read_only)
            .map_err(device_err(format!("disk {}", disk.path.display())))?;
        self.attach_virtio(Box::new(block))
    }

    fn attach_vsock(&mut self, socket: &Path) -> Result<(), VmError> {
        let vsock = Vsock::new(GUEST_CID, socket)
            .map_err(device_err(format!("vsock {}", socket.display())))?;
        self.attach_virtio(Box::new(vsock))
    }

    fn attach_rng(&mut self) -> Result<(), VmError> {
        self.attach_virtio(Box::new(Rng::new()))
    }

    fn write(&self, what: &'static str, bytes: &[u8], addr: u64) -> Result<(), VmError> {
        self.ram
            .memory()
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|source| VmError::WriteMemory { what, source })
    }

    /// Loads the kernel, initrd and command line and writes the firmware tables and zero page;
    /// returns the kernel's entry point.
    /// Writes what the guest reads at boot besides the kernel and initrd (`images`): command
    /// line, ACPI and MP tables, zero page, page tables; returns the entry point.
    fn load_guest(&self, config: &VmConfig, images: LoadedImages) -> Result<u64, VmError> {
        let LoadedImages { kernel, initrd } = images;
        let cmdline = compose_cmdline(
            &config.cmdline,
            kernel.cmdline_capacity(),
            &self.slots,
            config.virtio_mmio_cmdline,
        )
        .map_err(VmError::Cmdline)?;
        let cmdline = load_cmdline(self.ram.memory(), &cmdline)?;

        let acpi = build_acpi_tables(config.cpus, &self.slots)?;
        self.write("the ACPI tables", &acpi.bytes, ACPI_START)?;
        self.write("the MP table", &build_mptable(config.cpus)?, EBDA_START)?;
        let zero_page = build_zero_page(&ZeroPageParams {
            setup_header: kernel.setup_header,
            cmdline,
            initrd,
            mem_size: config.memory,
            rsdp_addr: acpi.rsdp_addr,
        })?;
        self.ram
            .memory()
            .write_obj(zero_page, GuestAddress(ZERO_PAGE_ADDR))
            .map_err(|source| VmError::WriteMemory {
                what: "the zero page",
                source,
            })?;
        cpu::write_boot_structures(self.ram.memory())?;
        self.write_generation_id()?;
        Ok(kernel.entry)
    }

    /// Hands guest RAM to KVM on a thread of its own: on some hosts the ioctl takes milliseconds,
    /// which the devices and vCPUs are set up in. The thread holds the VM and the RAM until done.
    fn register_memory_in_background(&self) -> Result<Helper<Result<(), MemoryError>>, VmError> {
        let (vm_fd, ram) = (self.vm_fd.clone(), self.ram.clone());
        Helper::spawn("memory", move || register_memory(&vm_fd, ram.memory()))
    }

    /// Creates the vCPUs with their CPUID, MSRs, FPU and LAPIC. The boot vCPU's registers are
    /// set once the kernel's entry point is known ([`cpu::setup_boot_vcpu`]); the others wait
    /// for SIPI.
    fn create_vcpus(&self, cpus: u8) -> Result<Vec<VcpuFd>, VmError> {
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        (0..cpus)
            .map(|id| {
                let vcpu = self
                    .vm_fd
                    .create_vcpu(u64::from(id))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?;
                let mut cpuid = supported.clone();
                filter_cpuid(cpuid.as_mut_slice(), id, cpus);
                vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
                cpu::setup_msrs(&vcpu)?;
                cpu::setup_fpu(&vcpu)?;
                cpu::setup_lapic(&vcpu)?;
                Ok(vcpu)
            })
            .collect()
    }

    /// Attaches the devices `config` asks for, in the one order a snapshot's devices are in
    /// ([`shape`]); each legacy device with a state is new, or as `restored` left it.
    fn attach_devices(
        &mut self,
        config: &VmConfig,
        restored: Option<&VmState>,
    ) -> Result<Stateful, VmError> {
        let serial = self.attach_serial(&config.console, restored.map(|s| &s.serial))?;
        self.attach_i8042()?;
        let rtc = self.attach_rtc(restored.map(|s| &s.rtc))?;
        self.attach_pvpanic()?;
        self.attach_acpi_pm()?;
        for device in virtio_devices(config) {
            match device {
                VirtioPart::Block(disk) => self.attach_block(disk)?,
                VirtioPart::Vsock(socket) => self.attach_vsock(socket)?,
                VirtioPart::Rng => self.attach_rng()?,
            }
        }
        Ok(Stateful {
            serial,
            rtc,
            transports: std::mem::take(&mut self.transports),
        })
    }

    /// Writes a new VM generation ID into guest memory.
    fn write_generation_id(&self) -> Result<(), VmError> {
        vmgenid::write_new_id(self.ram.memory()).map_err(|source| VmError::Device {
            what: "the VM generation ID".into(),
            source: Box::new(source),
        })
    }

    fn finish(
        self,
        vcpus: Vec<VcpuFd>,
        stateful: Stateful,
        config: &VmConfig,
        built_in: Duration,
    ) -> Vm {
        Vm {
            built_in,
            vcpus,
            pio: Arc::new(self.pio),
            mmio: Arc::new(self.mmio),
            exit: self.exit,
            slots: self.slots,
            stateful,
            shape: shape(config),
            restored: None,
            vm_fd: self.vm_fd,
            kvm: self.kvm,
            ram: self.ram,
        }
    }
}

/// A virtio device `config` asks for.
enum VirtioPart<'a> {
    Block(&'a DiskConfig),
    Vsock(&'a Path),
    Rng,
}

/// The virtio devices of `config`'s VM, in the one order they take their slots: the disks,
/// vsock, rng.
fn virtio_devices(config: &VmConfig) -> Vec<VirtioPart<'_>> {
    let disks = config.disks.iter().map(VirtioPart::Block);
    let vsock = config.vsock.as_deref().map(VirtioPart::Vsock);
    let rng = config.rng.then_some(VirtioPart::Rng);
    disks.chain(vsock).chain(rng).collect()
}

/// What a snapshot of `config`'s VM must match: its vCPUs, RAM and virtio devices' types, in
/// slot order.
pub fn shape(config: &VmConfig) -> Shape {
    let devices = virtio_devices(config)
        .iter()
        .map(|device| match device {
            VirtioPart::Block(_) => super::virtio::block::DEVICE_TYPE_BLOCK,
            VirtioPart::Vsock(_) => super::virtio::vsock::DEVICE_TYPE_VSOCK,
            VirtioPart::Rng => super::virtio::rng::DEVICE_TYPE_RNG,
        })
        .collect();
    Shape {
        cpus: config.cpus,
        memory: config.memory,
        devices,
    }
}

/// The kernel command line: `text` as given, plus, when `declare_virtio` (custom kernels with
/// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES), one `virtio_mmio.device=` per slot.
fn compose_cmdline(
    text: &str,
    capacity: usize,
    slots: &[MmioSlot],
    declare_virtio: bool,
) -> Result<Cmdline, linux_loader::cmdline::Error> {
    let mut cmdline = Cmdline::try_from(text, capacity)?;
    if declare_virtio {
        for slot in slots {
            cmdline.add_virtio_mmio_device(slot.len, GuestAddress(slot.base), slot.gsi, None)?;
        }
    }
    Ok(cmdline)
}

/// The kernel and initrd in guest RAM.
struct LoadedImages {
    kernel: LoadedKernel,
    /// Address and size.
    initrd: Option<(u64, u32)>,
}

fn load_images(ram: &GuestRam, config: &VmConfig) -> Result<LoadedImages, BootError> {
    let kernel = load_kernel(ram.memory(), &config.kernel)?;
    let initrd = config
        .initrd
        .as_deref()
        .map(|path| load_initrd(ram.memory(), path, config.memory, &kernel))
        .transpose()?;
    Ok(LoadedImages { kernel, initrd })
}

/// A thread doing one part of building the VM while the rest goes on.
struct Helper<T> {
    name: &'static str,
    handle: std::thread::JoinHandle<T>,
}

impl<T: Send + 'static> Helper<T> {
    fn spawn(
        name: &'static str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Self, VmError> {
        let handle = thread::spawn(name, Stack::Small, work)
            .map_err(|source| VmError::Helper { name, source })?;
        Ok(Self { name, handle })
    }

    /// Waits for the thread's result.
    fn join(self) -> Result<T, VmError> {
        let name = self.name;
        self.handle.join().map_err(|_| VmError::Helper {
            name,
            source: std::io::Error::other("it panicked"),
        })
    }
}

/// Builds the VM `config` describes: KVM VM with in-kernel irqchip and PIT, RAM, legacy
/// devices, virtio devices, kernel, firmware tables, vCPUs.
pub fn build_vm(config: &VmConfig) -> Result<Vm, VmError> {
    let started = Instant::now();
    let step = |what: &str| {
        tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "{what}");
    };
    let ram = Arc::new(create_guest_memory(config.memory)?);
    // The kernel and initrd (tens of MiB) are copied into guest RAM on a thread of their own
    // while KVM makes the VM and the devices are attached. The thread holds the RAM too, so it
    // stays mapped until the copy ends even if building fails first.
    let loader = {
        let (ram, config) = (ram.clone(), config.clone());
        Helper::spawn("loader", move || load_images(&ram, &config))?
    };
    let mut vm = VmBuilder::new(ram)?;
    let memory = vm.register_memory_in_background()?;
    step("VM created");
    let stateful = vm.attach_devices(config, None)?;
    step("devices attached");
    let vcpus = vm.create_vcpus(config.cpus)?;
    step("vCPUs created");
    memory.join()??;
    step("memory registered");
    let images = loader.join()??;
    tracing::debug!(end = images.kernel.end, "kernel and initrd loaded");
    let entry = vm.load_guest(config, images)?;
    if let Some(boot_vcpu) = vcpus.first() {
        cpu::setup_boot_vcpu(boot_vcpu, entry)?;
    }
    step("guest loaded");
    Ok(vm.finish(vcpus, stateful, config, started.elapsed()))
}

/// Builds `config`'s VM as `from` saved it, instead of booting: its memory mapped private from
/// the snapshot's file, its legacy devices put back, KVM's VM state, each vCPU's, then each
/// virtio device's data path started again where the driver had it. `from` was checked against `config`'s
/// [`shape`] when it was opened.
pub fn restore_vm(config: &VmConfig, from: &RestoreFrom) -> Result<Vm, VmError> {
    let started = Instant::now();
    let mut steps = Vec::new();
    let mut step = |what: &str| {
        let ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(ms, "{what}");
        steps.push(format!("{what} at {ms:.1} ms"));
    };
    let ram = Arc::new(create_guest_memory_from(
        config.memory,
        Backing::Snapshot(&from.memory),
    )?);
    let mut vm = VmBuilder::new(ram)?;
    let memory = vm.register_memory_in_background()?;
    step("memory mapped, VM created");
    let state = &from.state;
    let stateful = vm.attach_devices(config, Some(state))?;
    // This guest is a copy: it gets a generation ID of its own, announced as it starts.
    vm.write_generation_id()?;
    let generation_line = vm.irq(GED_GSI)?;
    step("devices attached");
    // KVM checks the guest addresses some MSRs name (kvmclock, PV EOI) against its memory, and
    // the irqchip delivers to vCPUs: memory, then the vCPUs, the VM's state, each vCPU's.
    memory.join()??;
    step("memory registered");
    let vcpus = vm.create_vcpus(config.cpus)?;
    state.kvm.restore(&vm.vm_fd).map_err(SnapshotError::from)?;
    step("VM state restored");
    for (id, (vcpu, saved)) in vcpus.iter().zip(&state.vcpus).enumerate() {
        saved.restore(vcpu, id).map_err(SnapshotError::from)?;
    }
    step("vCPUs restored");
    // Last: a device's data path may raise its interrupt as soon as it starts.
    for (slot, (transport, saved)) in stateful.transports.iter().zip(&state.virtio).enumerate() {
        lock(transport)
            .restore(saved)
            .map_err(|why| SnapshotError::Device {
                what: format!("virtio device {slot}"),
                why,
            })?;
    }
    step("virtio devices started");
    let mut vm = vm.finish(vcpus, stateful, config, started.elapsed());
    vm.restored = Some(Restored {
        generation_line,
        steps: steps.join(", "),
    });
    Ok(vm)
}

fn lock<T>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vm {
    /// For a VM [`restore_vm`] built: how long that took, and where the time went.
    pub fn restored(&self) -> Option<String> {
        let restored = self.restored.as_ref()?;
        Some(format!(
            "in {:.1} ms ({})",
            self.built_in.as_secs_f64() * 1e3,
            restored.steps
        ))
    }

    /// The virtio-mmio devices, in attach order.
    pub fn mmio_slots(&self) -> &[MmioSlot] {
        &self.slots
    }

    /// Runs the vCPUs until the guest ends or `timeout` passes, then stops every vCPU thread
    /// and returns why the VM ended.
    pub fn run(self, timeout: Option<Duration>) -> Result<VmExit, VmError> {
        self.run_filtered(timeout, &[])
    }

    /// [`Vm::run`], with the seccomp `filters` ([`crate::seccomp::filters`]) installed on every
    /// thread before the first vCPU starts: from then on, nothing the guest does can make this
    /// process call outside them.
    pub fn run_filtered(
        self,
        timeout: Option<Duration>,
        filters: &[seccompiler::BpfProgram],
    ) -> Result<VmExit, VmError> {
        self.run_with(timeout, filters, None)
    }

    /// What asks this VM, once it runs [`Vm::run_to_save`], to stop and be saved.
    pub fn save_handle(&self) -> SaveHandle {
        SaveHandle(self.exit.clone())
    }

    /// [`Vm::run_filtered`], and when its [`SaveHandle`] is used, the vCPUs stop, every
    /// device's data path stops, the memory and the state are written to `save`, and the VM ends
    /// [`VmExit::Saved`].
    pub fn run_to_save(
        self,
        timeout: Option<Duration>,
        filters: &[seccompiler::BpfProgram],
        save: &SaveTo,
    ) -> Result<VmExit, VmError> {
        self.run_with(timeout, filters, Some(save))
    }

    fn run_with(
        mut self,
        timeout: Option<Duration>,
        filters: &[seccompiler::BpfProgram],
        save: Option<&SaveTo>,
    ) -> Result<VmExit, VmError> {
        // Asked before the filter, which forbids it.
        let msr_list = match save {
            None => Vec::new(),
            Some(_) => self
                .kvm
                .get_msr_index_list()
                .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
                .as_slice()
                .to_vec(),
        };
        install_kick_handler().map_err(VmError::Signal)?;
        seccomp::install(filters)?;
        if let Some(restored) = &self.restored {
            self.raise_after_restore(restored);
        }
        let started = Instant::now();
        tracing::info!(
            build_ms = self.built_in.as_secs_f64() * 1e3,
            vcpus = self.vcpus.len(),
            "VM built, starting vCPUs"
        );
        let deadline = timeout.map(|t| Instant::now() + t);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (id, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let id = id as u32;
            let shared = VcpuShared {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                exit: self.exit.clone(),
                stop: stop.clone(),
            };
            let spawned = thread::spawn(format!("vcpu{id}"), Stack::Small, move || {
                run_vcpu(id, vcpu, &shared)
            });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(source) => {
                    self.exit.report(VmExit::Internal {
                        vcpu: id,
                        reason: "thread start failed".into(),
                    });
                    stop_vcpus(&stop, threads);
                    return Err(VmError::Thread { id, source });
                }
            }
        }
        let exit = match self.exit.wait(deadline) {
            Some(exit) => exit,
            None => {
                self.exit
                    .report(VmExit::Timeout(timeout.unwrap_or_default()));
                self.exit
                    .get()
                    .unwrap_or(VmExit::Timeout(timeout.unwrap_or_default()))
            }
        };
        let ran_for = started.elapsed();
        let vcpus = stop_vcpus(&stop, threads);
        if let (VmExit::Saved, Some(save)) = (&exit, save) {
            let state = self.state(&vcpus, &msr_list)?;
            // SAFETY: the vCPU threads have ended, and `state` stopped every device's data path
            // (it fails if one did not stop).
            unsafe { save.write(&state, self.ram.memory()) }?;
        }
        tracing::info!(
            run_ms = ran_for.as_secs_f64() * 1e3,
            teardown_ms = (started.elapsed() - ran_for).as_secs_f64() * 1e3,
            %exit,
            "VM ended"
        );
        Ok(exit)
    }
}

/// Sets `stop` and kicks every vCPU thread out of KVM_RUN until it has ended; returns the
/// vCPUs (`None` for one whose thread panicked).
fn stop_vcpus(
    stop: &AtomicBool,
    threads: Vec<std::thread::JoinHandle<VcpuFd>>,
) -> Vec<Option<VcpuFd>> {
    stop.store(true, Ordering::Release);
    threads
        .into_iter()
        .map(|thread| {
            while !thread.is_finished() {
                if let Err(e) = thread.kill(kick_signal()) {
                    tracing::debug!(error = %e, "kicking a vCPU thread");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let vcpu = thread.join().ok();
            if vcpu.is_none() {
                tracing::error!("a vCPU thread panicked");
            }
            vcpu
        })
        .collect()
}

impl Vm {
    /// A restored VM's interrupts, pending in the irqchip until a vCPU runs: the GED's (its VM
    /// generation ID changed), and every device's that was pending when it was saved (an edge
    /// on its way then may be in no saved state; one too many is harmless).
    fn raise_after_restore(&self, restored: &Restored) {
        if let Err(e) = restored.generation_line.trigger() {
            tracing::error!(error = %e, "cannot announce the new VM generation ID");
        }
        for transport in &self.stateful.transports {
            lock(transport).raise_pending();
        }
        lock(&self.stateful.serial).raise_pending();
    }

    /// The state of this stopped VM: each virtio device's data path is stopped first (what it
    /// still completes, and the interrupts it raises, are then in memory and in KVM's state).
    fn state(&self, vcpus: &[Option<VcpuFd>], msr_list: &[u32]) -> Result<VmState, VmError> {
        let virtio = self
            .stateful
            .transports
            .iter()
            .enumerate()
            .map(|(slot, t)| {
                lock(t).save().map_err(|why| SnapshotError::Device {
                    what: format!("virtio device {slot}"),
                    why,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vcpus = vcpus
            .iter()
            .enumerate()
            .map(|(id, vcpu)| {
                let vcpu = vcpu.as_ref().ok_or_else(|| SnapshotError::Device {
                    what: format!("vCPU {id}"),
                    why: "its thread panicked".into(),
                })?;
                Ok(VcpuState::save(vcpu, id, msr_list).map_err(SnapshotError::from)?)
            })
            .collect::<Result<Vec<_>, VmError>>()?;
        Ok(VmState {
            vmm: VMM_VERSION.into(),
            shape: self.shape.clone(),
            kvm: VmKvmState::save(&self.vm_fd).map_err(SnapshotError::from)?,
            vcpus,
            serial: lock(&self.stateful.serial).state(),
            rtc: lock(&self.stateful.rtc).state(),
            virtio,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cmdline_is_exactly_the_given_one_unless_virtio_is_declared() {
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
        let text = "console=ttyS0 reboot=k panic=-1";
        let plain = compose_cmdline(text, 2048, &slots, false).unwrap();
        assert_eq!(plain.as_cstring().unwrap().to_str().unwrap(), text);
        let declared = compose_cmdline(text, 2048, &slots, true).unwrap();
        assert_eq!(
            declared.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=k panic=-1 virtio_mmio.device=512@0xd0000000:5 \
             virtio_mmio.device=512@0xd0001000:6"
        );
        assert!(compose_cmdline(&"x".repeat(3000), 2048, &[], false).is_err());
    }
}
