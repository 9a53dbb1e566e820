//! Virtio devices on the virtio-mmio transport: block, vsock and rng.
//!
//! # Wiring (for the VMM core)
//!
//! Build each device, wrap it in a transport and place the transport on the MMIO bus (a window
//! of [`mmio::MMIO_WINDOW_SIZE`] bytes) with an interrupt line of its own:
//!
//! ```ignore
//! let blk = virtio::block::Block::open(Path::new("/disk.qcow2"), /* read_only */ false)?;
//! let vsock = virtio::vsock::Vsock::new(3, Path::new("/run/job/vsock.sock"))?;
//! let rng = virtio::rng::Rng::new();
//! let transport = virtio::mmio::MmioTransport::new(Box::new(blk), guest_mem.clone(), irq);
//! mmio_bus.insert(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))?;
//! ```
//!
//! Overlays: [`create_overlay`](crate::qcow2::overlay::create_overlay)`(base, overlay)` writes
//! a copy-on-write qcow2 over a qcow2 base; attach the overlay with `Block::open(overlay, false)`.
//!
//! - **Register accesses** arrive through [`BusDevice`](crate::bus::BusDevice) on the
//!   vCPU thread that exited, under the bus's lock of that transport. Registers are 32-bit and
//!   aligned; the configuration space (offset 0x100) takes any width.
//! - **Queue notifications** are writes to QueueNotify, handled in that same call:
//!   virtio-rng serves the request synchronously (getrandom does not block); virtio-blk and
//!   virtio-vsock only hand the notification to their own worker thread (an mpsc channel; for
//!   vsock plus an eventfd that wakes its epoll loop over the host sockets), so a vCPU never
//!   waits for disk or socket I/O. No ioeventfd is needed.
//! - **Interrupts**: the device sets InterruptStatus bits and calls
//!   [`IrqLine::trigger`](crate::irq::IrqLine::trigger) (an edge, e.g. an irqfd) from
//!   whichever thread completed the work, once per batch; the guest reads and acknowledges
//!   the status over MMIO.
//! - **Reset**: a status write of 0 stops the device's data path synchronously (its worker
//!   acknowledges before the write returns; vsock closes every host stream). A driver that
//!   breaks the protocol (impossible avail index, rings outside memory) gets
//!   DEVICE_NEEDS_RESET; one malformed request only fails that request. Errors are logged
//!   with `tracing` and counted ([`mmio::MmioTransport::error_count`]).
//! - **Teardown**: dropping a transport drops its device, which joins its thread; virtio-blk
//!   flushes (qcow2 metadata is also written after every batch of requests, so an exit without
//!   drop loses nothing the guest was told is done); vsock removes its socket file.
//! - Guest memory is a `GuestMemoryMmap` clone shared with the vCPUs; queues are split rings.

pub mod block;
pub mod chain;
pub mod device;
pub mod mmio;
pub mod rng;
pub mod vsock;

/// Guest memory and a guest driver held in the test (or the fuzz target: feature `fuzzing`).
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;
