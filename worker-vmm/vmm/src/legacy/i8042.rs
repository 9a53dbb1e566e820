//! The i8042 keyboard controller, reduced to what ends a VM: the CPU reset command (`reboot=k`).

use std::sync::Arc;

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, VmExit};

/// Reports a guest reboot when the controller pulses the reset line.
pub struct ResetLine(pub Arc<ExitSignal>);

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.report(VmExit::Reset);
        Ok(())
    }
}

/// The controller at ports 0x60..=0x64 (offset 4 is the command/status port).
pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    /// A controller that reports resets to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(I8042Device::new(ResetLine(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (Linux's kb_wait passes at once).
        data.fill(0);
        if let (Ok(offset), [first, ..]) = (u8::try_from(offset), data) {
            *first = self.0.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value, ..]) = (u8::try_from(offset), data) {
            // The reset line cannot fail.
            let Ok(()) = self.0.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_i8042_reset_command_reboots_and_other_writes_do_not() {
        let exit = Arc::new(ExitSignal::new());
        let mut kbd = I8042::new(exit.clone());
        let mut status = [0xaa];
        kbd.read(4, &mut status);
        assert_eq!(status, [0]);
        kbd.write(0, &[0xfe]);
        kbd.write(4, &[0xd1]);
        kbd.write(4, &[]);
        assert_eq!(exit.get(), None);
        kbd.write(4, &[0xfe]);
        assert_eq!(exit.get(), Some(VmExit::Reset));
    }
}
