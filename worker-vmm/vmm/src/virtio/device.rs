//! What a virtio device implements, and the interrupt state it shares with its transport.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::irq::IrqLine;

/// Interrupt status bit: the device added buffers to a used ring.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the device configuration (or its NEEDS_RESET state) changed.
pub const INT_CONFIG: u32 = 2;

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver handed a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    /// The device's worker thread is gone.
    #[error("the device worker is not running")]
    WorkerGone,
}

/// The interrupt side of a transport, shared with the device's data path.
///
/// The device raises "used buffer" or "configuration change" through it; the transport reads
/// and acknowledges the status bits, and reports a broken device as NEEDS_RESET.
#[derive(Clone)]
pub struct Interrupt {
    inner: Arc<InterruptInner>,
}

struct InterruptInner {
    status: AtomicU32,
    needs_reset: AtomicBool,
    errors: AtomicU64,
    irq: Arc<dyn IrqLine>,
}

impl Interrupt {
    /// Interrupt state that raises `irq`.
    pub fn new(irq: Arc<dyn IrqLine>) -> Self {
        Interrupt {
            inner: Arc::new(InterruptInner {
                status: AtomicU32::new(0),
                needs_reset: AtomicBool::new(false),
                errors: AtomicU64::new(0),
                irq,
            }),
        }
    }

    /// Tell the driver that used buffers are waiting.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Mark the device broken (DEVICE_NEEDS_RESET) after the driver broke the protocol.
    pub fn set_needs_reset(&self, why: &str) {
        tracing::warn!(why, "virtio device needs reset");
        self.count_error();
        if !self.inner.needs_reset.swap(true, Ordering::AcqRel) {
            self.raise(INT_CONFIG);
        }
    }

    /// Count one data-path error (the caller logs it).
    pub fn count_error(&self) {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// How many data-path errors the device has seen since it was created.
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// Whether the device was marked broken.
    pub fn needs_reset(&self) -> bool {
        self.inner.needs_reset.load(Ordering::Acquire)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.inner.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clear the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.inner.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Device reset: clear every bit and the broken state.
    pub fn reset(&self) {
        self.inner.status.store(0, Ordering::Release);
        self.inner.needs_reset.store(false, Ordering::Release);
    }

    /// Raises the line again if a status bit is set (after a restore, an edge the saved irqchip
    /// may have missed; one too many is harmless).
    pub fn raise_pending(&self) {
        if self.status() != 0
            && let Err(err) = self.inner.irq.trigger()
        {
            self.count_error();
            tracing::error!(%err, "cannot raise the virtio interrupt");
        }
    }

    /// A restored transport's status bits and broken state, as they were saved (the interrupt
    /// itself is in the restored irqchip's state).
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.inner.status.store(status, Ordering::Release);
        self.inner.needs_reset.store(needs_reset, Ordering::Release);
    }

    fn raise(&self, bit: u32) {
        self.inner.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(err) = self.inner.irq.trigger() {
            self.count_error();
            tracing::error!(%err, "cannot raise the virtio interrupt");
        }
    }
}

/// A virtio device behind a transport.
///
/// The transport calls these from the vCPU thread that performed the MMIO access, under the
/// transport's lock; none of them may block for long except `reset`, which must return only
/// when the device no longer touches guest memory.
pub trait VirtioDevice: Send {
    /// The virtio device type (2 block, 4 rng, 19 vsock).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers (the transport adds VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;
    /// Read the device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device configuration space (ignored where it is read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "ignored virtio config write");
    }
    /// DRIVER_OK: start the data path with the negotiated features, the queues and guest memory.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        acked_features: u64,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: u16);
    /// Stop the data path and forget the queues; the device can be activated again. False when
    /// its worker did not say it stopped in time (it may still touch guest memory).
    fn reset(&mut self) -> bool;
}
