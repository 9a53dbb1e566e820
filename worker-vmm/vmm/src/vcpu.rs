//! The vCPU threads: run KVM_RUN, route port and MMIO exits to the buses, report how the VM
//! ends, and stop when kicked.

use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::bus::Bus;
use super::exit::{ExitSignal, VmExit};

/// What a vCPU thread shares with the others.
pub struct VcpuShared {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where the end of the VM is reported.
    pub exit: Arc<ExitSignal>,
    /// Set when the VM is being torn down.
    pub stop: Arc<AtomicBool>,
}

/// The signal that knocks a vCPU thread out of KVM_RUN (it returns EINTR).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of [`kick_signal`], once per process; without a handler the
/// signal would kill the process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
    });
    result
}

/// Reports an internal error if the thread unwinds, so that `run` never waits for a dead vCPU.
struct PanicGuard<'a> {
    id: u32,
    exit: &'a ExitSignal,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.exit.report(VmExit::Internal {
                vcpu: self.id,
                reason: "the vCPU thread panicked".into(),
            });
        }
    }
}

/// Runs vCPU `id` until the VM ends or `shared.stop` is set, and gives the vCPU back. Stopped,
/// it has completed the I/O of its last exit (KVM does that on the next KVM_RUN, here one that
/// returns at once), so that its registers are whole for a snapshot.
pub fn run_vcpu(id: u32, mut vcpu: VcpuFd, shared: &VcpuShared) -> VcpuFd {
    let _guard = PanicGuard {
        id,
        exit: &shared.exit,
    };
    let internal = |reason: String| VmExit::Internal { vcpu: id, reason };
    while !shared.stop.load(Ordering::Acquire) {
        let ended = match vcpu.run() {
            Ok(exit) if is_bus_exit(&exit) => {
                on_bus(id, exit, shared);
                None
            }
            // With the in-kernel LAPIC, HLT only exits when the guest halts for good.
            Ok(VcpuExit::Hlt) => Some(VmExit::PowerOff),
            Ok(VcpuExit::Shutdown) => Some(VmExit::TripleFault {
                vcpu: id,
                state: String::new(),
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                KVM_SYSTEM_EVENT_CRASH => VmExit::Panic,
                other => internal(format!("unexpected system event {other}")),
            }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(internal(format!(
                "VM entry failed on CPU {cpu} (hardware reason {reason:#x})"
            ))),
            Ok(VcpuExit::InternalError) => {
                let run = vcpu.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills the
                // `internal` member of the union; every bit pattern is a valid value of it.
                let suberror = unsafe { run.__bindgen_anon_1.internal };
                Some(internal(format!(
                    "KVM_EXIT_INTERNAL_ERROR suberror {}",
                    suberror.suberror
                )))
            }
            Ok(VcpuExit::Intr) => None,
            Ok(other) => Some(internal(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(internal(format!("KVM_RUN failed: {e}"))),
        };
        if let Some(mut exit) = ended {
            if let VmExit::TripleFault { state, .. } = &mut exit {
                *state = fault_state(&vcpu);
            }
            shared.exit.report(exit);
            return vcpu;
        }
    }
    // KVM_RUN returns EINTR at once, once the last exit's I/O is done; an access that takes more
    // than one exit (a string instruction) goes on to its end first.
    vcpu.set_kvm_immediate_exit(1);
    for _ in 0..MAX_DRAIN_EXITS {
        match vcpu.run() {
            Ok(exit) if is_bus_exit(&exit) => on_bus(id, exit, shared),
            _ => break,
        }
    }
    vcpu.set_kvm_immediate_exit(0);
    vcpu
}

/// The most port or MMIO exits a stopping vCPU serves to finish its last instruction.
const MAX_DRAIN_EXITS: usize = 4096;

fn is_bus_exit(exit: &VcpuExit) -> bool {
    matches!(
        exit,
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)
    )
}

/// Serves a port or MMIO exit of vCPU `id` on the buses (others are not given here).
fn on_bus(id: u32, exit: VcpuExit, shared: &VcpuShared) {
    let (served, port, what, at) = match exit {
        VcpuExit::IoIn(port, data) => (
            shared.pio.read(u64::from(port), data),
            true,
            "read from an empty port",
            u64::from(port),
        ),
        VcpuExit::IoOut(port, data) => (
            shared.pio.write(u64::from(port), data),
            true,
            "write to an empty port",
            u64::from(port),
        ),
        VcpuExit::MmioRead(addr, data) => (
            shared.mmio.read(addr, data),
            false,
            "MMIO read outside any device",
            addr,
        ),
        VcpuExit::MmioWrite(addr, data) => (
            shared.mmio.write(addr, data),
            false,
            "MMIO write outside any device",
            addr,
        ),
        _ => return,
    };
    // Linux probes many empty ports: those are only traced.
    match (served, port) {
        (true, _) => {}
        (false, true) => tracing::trace!(vcpu = id, port = at, "{what}"),
        (false, false) => tracing::debug!(vcpu = id, addr = at, "{what}"),
    }
}

/// Where a vCPU stood when it stopped on a triple fault, as one line; empty if KVM would not
/// give its registers, or gives the reset state instead (on AMD, KVM reinitializes the vCPU when
/// it intercepts the shutdown: real mode at the reset vector).
fn fault_state(vcpu: &VcpuFd) -> String {
    const RESET_VECTOR: u64 = 0xfff0;
    const CR0_PE: u64 = 1;
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(regs), Ok(sregs)) if regs.rip == RESET_VECTOR && sregs.cr0 & CR0_PE == 0 => {
            String::new()
        }
        (Ok(regs), Ok(sregs)) => format!(
            "rip {:#x}, rsp {:#x}, cr0 {:#x}, cr2 {:#x}, cr3 {:#x}, cr4 {:#x}, efer {:#x}",
            regs.rip, regs.rsp, sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer
        ),
        _ => String::new(),
    }
}
