//! Port-I/O and MMIO dispatch: a device sees accesses relative to its own base address.

/// A device on the PIO or MMIO bus. `offset` is relative to the base the device was placed at.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; the device fills `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

use std::sync::{Arc, Mutex};

/// A device shared between the vCPU threads (and, for some, an I/O thread).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Placing a device on a bus failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps one already placed, or is empty, or wraps.
    #[error("bus range {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// An address space (port I/O or MMIO) made of non-overlapping device windows.
/// It is built once, then shared read-only by the vCPU threads.
#[derive(Default)]
pub struct Bus {
    /// `(base, len, device)`, sorted by base.
    ranges: Vec<(u64, u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base + len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        if self.ranges.iter().any(|&(b, l, _)| base < b + l && b < end) {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|&(b, _, _)| b < base);
        self.ranges.insert(at, (base, len, device));
        Ok(())
    }

    /// The device whose window holds `addr`, and the offset of `addr` in that window.
    fn find(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let at = self.ranges.partition_point(|&(b, _, _)| b <= addr);
        let (base, len, device) = self.ranges.get(at.checked_sub(1)?)?;
        let offset = addr - base;
        (offset < *len).then_some((device, offset))
    }

    /// A guest read at `addr`. Returns false (and fills `data` with ones, as an empty bus
    /// reads) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A guest write at `addr`. Returns false when no device is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device; a device whose lock was poisoned by a panicking thread is still usable
/// (its state is plain data), and the VM is being torn down anyway.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn test_bus_dispatches_by_offset_and_refuses_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(0x60, 5, a.clone()).unwrap();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Echo(Vec::new()))))
            .unwrap();
        assert!(bus.insert(0x64, 1, a.clone()).is_err());
        assert!(bus.insert(0x10, 0, a.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, a.clone()).is_err());

        let mut data = [0u8; 1];
        assert!(bus.read(0x64, &mut data));
        assert_eq!(data, [4]);
        assert!(!bus.read(0x65, &mut data));
        assert_eq!(data, [0xff]);
        assert!(!bus.read(0x5f, &mut data));
        assert!(bus.write(0x64, &[0xfe]));
        assert!(!bus.write(0x400, &[1]));
        assert_eq!(a.lock().unwrap().0, vec![(4, vec![0xfe])]);
    }
}
