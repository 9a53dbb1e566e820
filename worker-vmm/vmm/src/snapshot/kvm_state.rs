//! What KVM holds of a paused VM: each vCPU's registers and in-kernel state, and the VM's
//! irqchip (two PICs and the IOAPIC), PIT and clock. Read once every vCPU thread has left
//! KVM_RUN; written, in the order KVM needs, before any vCPU runs again.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// A KVM ioctl of the save or the restore failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed")]
pub struct KvmStateError {
    /// The ioctl, and on which vCPU.
    pub what: String,
    /// Why.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn failed(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    let what = what.into();
    move |source| KvmStateError { what, source }
}

/// One vCPU, as KVM_GET_* give it.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
}

/// At most this many MSRs are read or written by one ioctl.
const MSR_CHUNK: usize = 64;

impl VcpuState {
    /// Reads vCPU `id`'s state; `msr_list` is what KVM_GET_MSR_INDEX_LIST named (an MSR this
    /// CPU cannot read is left out, as KVM stops at the first one it cannot).
    pub fn save(vcpu: &VcpuFd, id: usize, msr_list: &[u32]) -> Result<VcpuState, KvmStateError> {
        let on = |what: &str| format!("{what} of vCPU {id}");
        Ok(VcpuState {
            mp_state: vcpu
                .get_mp_state()
                .map_err(failed(on("KVM_GET_MP_STATE")))?,
            regs: vcpu.get_regs().map_err(failed(on("KVM_GET_REGS")))?,
            sregs: vcpu.get_sregs().map_err(failed(on("KVM_GET_SREGS")))?,
            xsave: vcpu.get_xsave().map_err(failed(on("KVM_GET_XSAVE")))?,
            xcrs: vcpu.get_xcrs().map_err(failed(on("KVM_GET_XCRS")))?,
            debugregs: vcpu
                .get_debug_regs()
                .map_err(failed(on("KVM_GET_DEBUGREGS")))?,
            lapic: vcpu.get_lapic().map_err(failed(on("KVM_GET_LAPIC")))?,
            msrs: read_msrs(vcpu, msr_list).map_err(failed(on("KVM_GET_MSRS")))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(failed(on("KVM_GET_VCPU_EVENTS")))?,
        })
    }

    /// Writes the state into vCPU `id` (created with the same CPUID), in Firecracker's order:
    /// the MP state and registers first, the LAPIC before the MSRs (the TSC deadline timer), the
    /// pending events last.
    pub fn restore(&self, vcpu: &VcpuFd, id: usize) -> Result<(), KvmStateError> {
        let on = |what: &str| format!("{what} of vCPU {id}");
        vcpu.set_mp_state(self.mp_state)
            .map_err(failed(on("KVM_SET_MP_STATE")))?;
        vcpu.set_regs(&self.regs)
            .map_err(failed(on("KVM_SET_REGS")))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(failed(on("KVM_SET_SREGS")))?;
        // SAFETY: `self.xsave` is a whole `kvm_xsave` (4 KiB, as KVM_GET_XSAVE gave it), the
        // size KVM_SET_XSAVE reads; no larger XSAVE area (KVM_CAP_XSAVE2) is in use.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(failed(on("KVM_SET_XSAVE")))?;
        vcpu.set_xcrs(&self.xcrs)
            .map_err(failed(on("KVM_SET_XCRS")))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(failed(on("KVM_SET_DEBUGREGS")))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(failed(on("KVM_SET_LAPIC")))?;
        write_msrs(vcpu, &self.msrs)
            .map_err(|(msr, source)| failed(on(&format!("KVM_SET_MSRS (MSR {msr:#x})")))(source))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(failed(on("KVM_SET_VCPU_EVENTS")))
    }
}

/// Reads every MSR of `list` KVM can read on this vCPU.
fn read_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, kvm_ioctls::Error> {
    let mut read = Vec::with_capacity(list.len());
    let mut left = list;
    while !left.is_empty() {
        let chunk = &left[..left.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| enomem())?;
        let n = vcpu.get_msrs(&mut msrs)?;
        read.extend_from_slice(&msrs.as_slice()[..n]);
        // KVM stops at the first MSR it cannot read: that one is skipped.
        let done = match chunk.get(n) {
            Some(msr) => {
                tracing::debug!(msr, "an MSR KVM cannot read is not saved");
                n + 1
            }
            None => n,
        };
        left = &left[done..];
    }
    Ok(read)
}

/// Writes `entries`, all of them or an error with the first one KVM refused (or of the chunk
/// the ioctl failed on).
fn write_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), (u32, kvm_ioctls::Error)> {
    for chunk in entries.chunks(MSR_CHUNK) {
        let first = chunk.first().map_or(0, |e| e.index);
        let msrs = Msrs::from_entries(chunk).map_err(|_| (first, enomem()))?;
        let n = vcpu.set_msrs(&msrs).map_err(|e| (first, e))?;
        if let Some(refused) = chunk.get(n) {
            return Err((refused.index, kvm_ioctls::Error::new(libc::EINVAL)));
        }
    }
    Ok(())
}

fn enomem() -> kvm_ioctls::Error {
    kvm_ioctls::Error::new(libc::ENOMEM)
}

/// The VM's in-kernel devices and clock.
#[derive(Serialize, Deserialize)]
pub struct VmKvmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

fn irqchip(vm: &VmFd, chip_id: u32, what: &str) -> Result<kvm_irqchip, KvmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(failed(format!("KVM_GET_IRQCHIP of the {what}")))?;
    Ok(chip)
}

impl VmKvmState {
    /// Reads them from a VM whose vCPUs are out of KVM_RUN.
    pub fn save(vm: &VmFd) -> Result<VmKvmState, KvmStateError> {
        let mut clock = vm.get_clock().map_err(failed("KVM_GET_CLOCK"))?;
        // KVM_SET_CLOCK takes no flags but KVM_CLOCK_REALTIME, which is not used here.
        clock.flags = 0;
        Ok(VmKvmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "master PIC")?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "slave PIC")?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC, "IOAPIC")?,
            pit: vm.get_pit2().map_err(failed("KVM_GET_PIT2"))?,
            clock,
        })
    }

    /// Writes them into a new VM that has its irqchip and PIT, before its vCPUs are restored.
    pub fn restore(&self, vm: &VmFd) -> Result<(), KvmStateError> {
        vm.set_pit2(&self.pit).map_err(failed("KVM_SET_PIT2"))?;
        vm.set_clock(&self.clock).map_err(failed("KVM_SET_CLOCK"))?;
        for (chip, what) in [
            (&self.pic_master, "master PIC"),
            (&self.pic_slave, "slave PIC"),
            (&self.ioapic, "IOAPIC"),
        ] {
            vm.set_irqchip(chip)
                .map_err(failed(format!("KVM_SET_IRQCHIP of the {what}")))?;
        }
        Ok(())
    }
}
