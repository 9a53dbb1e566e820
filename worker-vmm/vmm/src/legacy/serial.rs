//! COM1: a 16550 UART (vm-superio) whose output is the guest console.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};

use crate::bus::BusDevice;

/// Where the console goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// A 16550 UART on the port bus, raising its line through `T`.
pub struct SerialDevice<T: Trigger> {
    uart: Serial<T, vm_superio::serial::NoEvents, ConsoleOut>,
}

impl<T: Trigger> SerialDevice<T> {
    /// A UART that writes what the guest sends to `out`.
    pub fn new(irq: T, out: ConsoleOut) -> Self {
        Self {
            uart: Serial::new(irq, out),
        }
    }

    /// Its registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// Raises its line again if it has an interrupt pending (a restored VM, as its vCPUs start:
    /// what [`SerialDevice::restored`] raised went to an irqchip not yet restored).
    pub fn raise_pending(&self) {
        const NO_INTERRUPT_PENDING: u8 = 1;
        if self.uart.state().interrupt_identification & NO_INTERRUPT_PENDING == 0
            && self.uart.interrupt_evt().trigger().is_err()
        {
            tracing::error!("cannot raise COM1's interrupt");
        }
    }

    /// A UART as `state` left it.
    pub fn restored(state: &SerialState, irq: T, out: ConsoleOut) -> Result<Self, String> {
        let uart = Serial::from_state(state, irq, vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("{e:?}"))?;
        Ok(Self { uart })
    }
}

/// vm-superio's UART state as a snapshot holds it (serde's remote derive: its fields, in its
/// names).
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
pub struct UartState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl<T: Trigger + Send> BusDevice for SerialDevice<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(offset), [first, ..]) = (u8::try_from(offset), data) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value, ..]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, *value) {
            tracing::debug!(error = ?e, "serial write");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct NoIrq;
    impl Trigger for NoIrq {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            Ok(())
        }
    }

    #[test]
    fn test_serial_writes_transmitted_bytes_to_the_console() {
        let out = Captured::default();
        let mut serial = SerialDevice::new(NoIrq, Box::new(out.clone()));
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        // Line status: transmitter empty.
        let mut lsr = [0u8; 1];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // Out-of-range offsets and empty accesses are ignored.
        serial.write(300, b"x");
        serial.write(0, &[]);
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }
}
