//! Port-I/O and MMIO dispatch: a device sees accesses relative to its own base address.

/// A device on the PIO or MMIO bus. `offset` is relative to the base the device was placed at.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; the device fills `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}
