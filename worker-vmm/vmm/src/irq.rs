//! How a device signals the guest: an edge on one interrupt line.

use std::io;

/// One interrupt line of the guest. The VMM implements it with an irqfd registered with KVM;
/// tests implement it with a counter.
pub trait IrqLine: Send + Sync {
    /// Raise the line once (edge-triggered).
    fn trigger(&self) -> io::Result<()>;
}
