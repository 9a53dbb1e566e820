//! The hardware-reduced ACPI power registers named in the FADT: sleep control (S5 = power
//! off), sleep status, and the reset register.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, VmExit};

/// Offset of the sleep control register.
pub const SLEEP_CONTROL: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u64 = 1;
/// Offset of the reset register.
pub const RESET: u64 = 2;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 1;
/// The sleep type of S5 declared by the DSDT's `_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The three registers.
pub struct AcpiPm(Arc<ExitSignal>);

impl AcpiPm {
    /// Registers that report power-off and reset to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(exit)
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            SLEEP_CONTROL
                if value & SLP_EN != 0
                    && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE =>
            {
                self.0.report(VmExit::PowerOff)
            }
            RESET if value == RESET_VALUE => self.0.report(VmExit::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_s5_powers_off_and_reset_register_reboots() {
        let cases: [(u64, u8, Option<VmExit>); 5] = [
            (
                SLEEP_CONTROL,
                SLP_EN | (S5_SLEEP_TYPE << 2),
                Some(VmExit::PowerOff),
            ),
            (SLEEP_CONTROL, S5_SLEEP_TYPE << 2, None),
            (SLEEP_CONTROL, SLP_EN | (3 << 2), None),
            (RESET, RESET_VALUE, Some(VmExit::Reset)),
            (SLEEP_STATUS, 0xff, None),
        ];
        for (offset, value, expected) in cases {
            let exit = Arc::new(ExitSignal::new());
            AcpiPm::new(exit.clone()).write(offset, &[value]);
            assert_eq!(exit.get(), expected, "offset {offset} value {value:#x}");
        }
    }
}
