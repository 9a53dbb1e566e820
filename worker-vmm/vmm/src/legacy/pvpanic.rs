//! pvpanic: the guest writes 1 to this port when its kernel panics (Linux's pvpanic-mmio binds
//! it through the ACPI device `QEMU0001` with an I/O resource).

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, VmExit};

/// The guest panicked.
const PVPANIC_PANICKED: u8 = 1 << 0;
/// A crash kernel is loaded (the guest goes on into kdump; nothing to do).
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The pvpanic port.
pub struct PvPanic(Arc<ExitSignal>);

impl PvPanic {
    /// A device that reports panics to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(exit)
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // The events this device supports.
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PVPANIC_PANICKED != 0) {
            self.0.report(VmExit::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pvpanic_reports_a_panic_on_bit_0_only() {
        let exit = Arc::new(ExitSignal::new());
        let mut dev = PvPanic::new(exit.clone());
        let mut caps = [0u8];
        dev.read(0, &mut caps);
        assert_eq!(caps, [3]);
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        dev.write(0, &[]);
        assert_eq!(exit.get(), None);
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(exit.get(), Some(VmExit::Panic));
    }
}
