//! The VMM's threads: named, and with stacks sized for what they run rather than std's 2 MiB.
//!
//! A 2 MiB stack costs little where transparent huge pages are given only on request, but on a
//! host in THP `always` mode (the kernel also aligns mappings of 2 MiB and more to 2 MiB) the
//! first touch of such a stack can fault in a whole 2 MiB huge page. A stack smaller than a huge
//! page never gets one.

use std::io;
use std::thread::{Builder, JoinHandle};

/// How much stack a VMM thread gets.
#[derive(Clone, Copy, Debug)]
pub enum Stack {
    /// vCPU loops and the helpers that build the VM: device emulation and loading, no deep
    /// call chains.
    Small,
    /// Device threads, which may drive qcow2-rs's futures (held on the stack by `block_on`).
    Device,
}

impl Stack {
    fn bytes(self) -> usize {
        match self {
            Stack::Small => 256 << 10,
            Stack::Device => 1 << 20,
        }
    }
}

/// Starts `work` on a new thread called `name`.
pub fn spawn<T: Send + 'static>(
    name: impl Into<String>,
    stack: Stack,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    Builder::new()
        .name(name.into())
        .stack_size(stack.bytes())
        .spawn(work)
}
