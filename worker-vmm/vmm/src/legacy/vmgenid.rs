//! The VM generation ID (QEMU's `vmgenid`, Firecracker's VMGenID): 16 random bytes at
//! [`VMGENID_ADDR`] that the guest's vmgenid driver finds through ACPI (`crate::acpi`). A
//! restored guest gets new ones, and an edge on the ACPI Generic Event Device's line
//! ([`GED_GSI`](crate::layout::GED_GSI)) has the guest read them: Linux then reseeds its random pool at once, so that
//! guests restored from one snapshot do not draw the same random numbers.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::VMGENID_ADDR;
use crate::memory::GuestMem;

/// Writes a new generation ID into guest memory.
pub fn write_new_id(memory: &GuestMem) -> std::io::Result<()> {
    let mut id = [0u8; 16];
    crate::virtio::rng::getrandom(&mut id)?;
    memory
        .write_slice(&id, GuestAddress(VMGENID_ADDR))
        .map_err(std::io::Error::other)
}
