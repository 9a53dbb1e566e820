//! Interrupt lines backed by KVM irqfds: writing the eventfd pulses an IOAPIC pin in the kernel.

use std::io;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::irq::IrqLine;

/// One IOAPIC pin (GSI) of the in-kernel irqchip, driven through an eventfd.
pub struct IrqFd {
    gsi: u32,
    event: EventFd,
    vm: Arc<VmFd>,
}

impl IrqFd {
    /// Creates the eventfd and registers it with KVM for `gsi`.
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> io::Result<Self> {
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&event, gsi)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        Ok(Self { gsi, event, vm })
    }
}

impl IrqLine for IrqFd {
    fn trigger(&self) -> io::Result<()> {
        self.event.write(1)
    }
}

impl vm_superio::Trigger for IrqFd {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        IrqLine::trigger(self)
    }
}

impl Drop for IrqFd {
    fn drop(&mut self) {
        if let Err(e) = self.vm.unregister_irqfd(&self.event, self.gsi) {
            tracing::debug!(gsi = self.gsi, error = %e, "unregistering irqfd");
        }
    }
}
