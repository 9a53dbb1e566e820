//! The virtio-mmio transport, version 2 ("modern") register layout.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::device::{Interrupt, VirtioDevice};
use crate::bus::BusDevice;
use crate::irq::IrqLine;

/// The size of one device's MMIO window (registers plus configuration space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x766d_6661; // "vmfa"
const F_VERSION_1: u64 = 1 << 32;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
const S_FAILED: u32 = 0x80;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// One virtio device on the MMIO bus: registers, feature negotiation, queue setup and the
/// status state machine; the device sees only `activate`, `queue_notify` and `reset`.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Put `device` behind a transport that accesses `mem` and raises `irq`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: Arc<dyn IrqLine>) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        MmioTransport {
            device,
            mem,
            interrupt: Interrupt::new(irq),
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    /// Data-path errors seen by the device (malformed requests, host I/O failures).
    pub fn error_count(&self) -> u64 {
        self.interrupt.errors()
    }

    /// The virtio device type behind this transport.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue registers are writable only while the driver sets the device up.
        let setting_up = self.status & S_FEATURES_OK != 0 && self.status & S_DRIVER_OK == 0;
        let queue = self.queues.get_mut(self.queue_sel as usize)?;
        (setting_up && !queue.ready()).then_some(queue)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => {
                let broken = if self.interrupt.needs_reset() {
                    S_NEEDS_RESET
                } else {
                    0
                };
                self.status | broken
            }
            // No shared memory regions: their length reads as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(offset, "read of an unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                if self.status & (S_DRIVER | S_FEATURES_OK) != S_DRIVER {
                    tracing::debug!("driver features written outside feature negotiation");
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                // Sizes that are not a power of two up to the maximum are refused by the queue.
                if let (Some(q), Ok(size)) = (self.selected_queue(), u16::try_from(value)) {
                    q.set_size(size);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                } else if value == 0
                    && let Some(q) = self.queues.get_mut(self.queue_sel as usize)
                    && self.status & S_DRIVER_OK == 0
                {
                    q.set_ready(false);
                }
            }
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            reg::QUEUE_DESC_HIGH => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_AVAIL_LOW => {
                self.with_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_AVAIL_HIGH => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_USED_LOW => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            reg::QUEUE_USED_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            reg::QUEUE_NOTIFY => {
                if self.activated && (value as usize) < self.queues.len() {
                    self.device.queue_notify(value as u16);
                } else {
                    tracing::debug!(value, "queue notify ignored");
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            _ => tracing::debug!(
                offset,
                value,
                "write to an unknown or read-only virtio-mmio register"
            ),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & S_FAILED != 0 {
            self.status |= S_FAILED;
            return;
        }
        // The driver only ever adds bits, in order: ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK.
        let added = value & !self.status;
        if value & self.status != self.status || added.count_ones() != 1 {
            tracing::debug!(
                old = self.status,
                new = value,
                "invalid virtio status transition"
            );
            return;
        }
        let prerequisite = match added {
            S_ACKNOWLEDGE => 0,
            S_DRIVER => S_ACKNOWLEDGE,
            S_FEATURES_OK => S_ACKNOWLEDGE | S_DRIVER,
            S_DRIVER_OK => S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK,
            _ => {
                tracing::debug!(value, "unknown virtio status bit");
                return;
            }
        };
        if self.status != prerequisite {
            tracing::debug!(old = self.status, new = value, "virtio status out of order");
            return;
        }
        match added {
            S_FEATURES_OK => {
                let unknown = self.driver_features & !self.offered_features();
                if self.driver_features & F_VERSION_1 == 0 || unknown != 0 {
                    tracing::warn!(features = self.driver_features, "driver features refused");
                    return; // FEATURES_OK stays clear: the driver sees the refusal.
                }
            }
            S_DRIVER_OK => self.activate(),
            _ => {}
        }
        self.status = value;
    }

    fn activate(&mut self) {
        let usable = self
            .queues
            .iter()
            .all(|q| q.ready() && q.is_valid(&self.mem));
        if !usable {
            self.interrupt
                .set_needs_reset("DRIVER_OK with a queue not ready or outside guest memory");
            return;
        }
        let queues = self.queues.iter().map(clone_queue).collect();
        match self.device.activate(
            self.mem.clone(),
            queues,
            self.driver_features,
            self.interrupt.clone(),
        ) {
            Ok(()) => self.activated = true,
            Err(err) => {
                tracing::error!(%err, "virtio device activation failed");
                self.interrupt.set_needs_reset("activation failed");
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            // A device that did not stop has logged it; the driver's reset goes on.
            let _ = self.device.reset();
            self.activated = false;
        }
        self.queues = new_queues(self.device.queue_max_sizes());
        self.interrupt.reset();
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

/// A transport's state in a snapshot: its registers, and each queue's setup and position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    device_type: u32,
    status: u32,
    driver_features: u64,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    config_generation: u32,
    interrupt_status: u32,
    needs_reset: bool,
    queues: Vec<QueueState>,
}

/// A queue's setup and position: the device has taken and answered every buffer up to `next`
/// (the used ring's index when it was saved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    next: u16,
}

impl MmioTransport {
    /// Stops the device's data path (as a reset does: it touches guest memory no more) and
    /// returns the transport's state. Each queue resumes at its used ring's index: a buffer the
    /// device had taken but not answered is taken again after a restore. The transport is left
    /// stopped: a saved VM does not run on.
    pub fn save(&mut self) -> Result<TransportState, String> {
        if self.activated {
            self.activated = false;
            if !self.device.reset() {
                return Err("its data path did not stop".into());
            }
        }
        let running = self.status & S_DRIVER_OK != 0;
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let next = if running && q.ready() {
                    q.used_idx(&self.mem, Ordering::Acquire)
                        .map_err(|e| format!("reading a used ring: {e:?}"))?
                        .0
                } else {
                    0
                };
                Ok(QueueState {
                    size: q.size(),
                    ready: q.ready(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                    next,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queues,
        })
    }

    /// Puts a new transport (of the same device type) in `state`, and starts its device's data
    /// path if the driver had: call it once the vCPUs and the irqchip are restored, as the device
    /// may raise its interrupt at once.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        if state.device_type != self.device.device_type() {
            return Err(format!(
                "the snapshot has a device of type {} where this VM has one of type {}",
                state.device_type,
                self.device.device_type()
            ));
        }
        let max_sizes = self.device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(format!(
                "the snapshot's device of type {} has {} queues, this one {}",
                state.device_type,
                state.queues.len(),
                max_sizes.len()
            ));
        }
        self.queues = state
            .queues
            .iter()
            .zip(max_sizes)
            .map(|(saved, &max)| {
                let mut q = Queue::new(max).map_err(|e| format!("{e:?}"))?;
                if saved.size > max {
                    return Err(format!(
                        "a saved queue of {} entries (at most {max})",
                        saved.size
                    ));
                }
                q.set_size(saved.size);
                q.set_ready(saved.ready);
                set_addresses(&mut q, saved.desc, saved.avail, saved.used);
                q.set_next_avail(saved.next);
                q.set_next_used(saved.next);
                Ok(q)
            })
            .collect::<Result<_, String>>()?;
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.config_generation = state.config_generation;
        self.interrupt
            .restore(state.interrupt_status, state.needs_reset);
        if self.status & S_DRIVER_OK != 0 && !state.needs_reset {
            self.activate();
            if !self.activated {
                return Err(format!(
                    "the device of type {} could not be started again",
                    state.device_type
                ));
            }
            // What the driver made available before the save and the device had not answered
            // is taken now, as after a notification (one too many is harmless).
            for index in 0..self.queues.len() {
                self.device.queue_notify(index as u16);
            }
        }
        Ok(())
    }

    /// Raises the transport's interrupt again if a status bit is set (a restored VM, as its
    /// vCPUs start).
    pub fn raise_pending(&self) {
        self.interrupt.raise_pending();
    }
}

fn set_addresses(q: &mut Queue, desc: u64, avail: u64, used: u64) {
    let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
    let (lo, hi) = split(desc);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(avail);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(used);
    q.set_used_ring_address(lo, hi);
}

fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .filter_map(|&max| match Queue::new(max) {
            Ok(q) => Some(q),
            Err(err) => {
                tracing::error!(?err, max, "invalid queue size in a virtio device");
                None
            }
        })
        .collect()
}

fn clone_queue(q: &Queue) -> Queue {
    let mut copy = Queue::new(q.max_size()).unwrap_or_default();
    copy.set_size(q.size());
    copy.set_ready(q.ready());
    set_addresses(&mut copy, q.desc_table(), q.avail_ring(), q.used_ring());
    // A restored queue resumes where it was; a new one starts at 0.
    copy.set_next_avail(q.next_avail());
    copy.set_next_used(q.next_used());
    copy
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let value = if data.len() == 4 && offset.is_multiple_of(4) {
            self.read_reg(offset)
        } else {
            tracing::debug!(
                offset,
                len = data.len(),
                "unaligned virtio-mmio register read"
            );
            0
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_reg(offset, u32::from_le_bytes(bytes))
            }
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "unaligned virtio-mmio register write"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::test_utils::{CountingIrq, DATA_BASE, TestDriver, guest_memory};

    fn bare() -> (MmioTransport, Arc<CountingIrq>) {
        let irq = Arc::new(CountingIrq::default());
        (
            MmioTransport::new(Box::new(Rng::new()), guest_memory(), irq.clone()),
            irq,
        )
    }

    fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn wr(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn test_mmio_identifies_a_modern_device() {
        let (mut t, _) = bare();
        assert_eq!(rd(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 4);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1");
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 256);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0, "no second queue");
        // Unaligned or narrow register accesses read 0 and are ignored.
        let mut two = [0xffu8; 2];
        t.read(reg::MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        t.write(reg::STATUS, &[1]);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn test_mmio_refuses_features_without_version_1() {
        let (mut t, _) = bare();
        wr(&mut t, reg::STATUS, S_ACKNOWLEDGE);
        wr(&mut t, reg::STATUS, S_ACKNOWLEDGE | S_DRIVER);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 0);
        wr(
            &mut t,
            reg::STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK,
        );
        assert_eq!(rd(&mut t, reg::STATUS) & S_FEATURES_OK, 0);
        // Unknown feature bits are refused too.
        wr(&mut t, reg::DRIVER_FEATURES, 1 | 2);
        wr(
            &mut t,
            reg::STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK,
        );
        assert_eq!(rd(&mut t, reg::STATUS) & S_FEATURES_OK, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(
            &mut t,
            reg::STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK,
        );
        assert_eq!(rd(&mut t, reg::STATUS) & S_FEATURES_OK, S_FEATURES_OK);
    }

    #[test]
    fn test_mmio_status_steps_must_come_in_order() {
        let (mut t, _) = bare();
        wr(&mut t, reg::STATUS, S_DRIVER_OK);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        wr(&mut t, reg::STATUS, S_ACKNOWLEDGE);
        wr(&mut t, reg::STATUS, S_ACKNOWLEDGE | S_FEATURES_OK);
        assert_eq!(rd(&mut t, reg::STATUS), S_ACKNOWLEDGE);
        // DRIVER_OK with a queue that was never set up: the device needs a reset.
        wr(&mut t, reg::STATUS, S_ACKNOWLEDGE | S_DRIVER);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(
            &mut t,
            reg::STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK,
        );
        wr(
            &mut t,
            reg::STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        assert_eq!(rd(&mut t, reg::STATUS) & S_NEEDS_RESET, S_NEEDS_RESET);
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn test_mmio_queue_registers_lock_after_driver_ok_and_reset_clears() {
        let mut d = TestDriver::new(Box::new(Rng::new()), 16);
        d.write32(reg::QUEUE_SEL, 0);
        assert_eq!(d.read32(reg::QUEUE_READY), 1);
        d.write32(reg::QUEUE_NUM, 4);
        d.write32(reg::QUEUE_DESC_LOW, 0x5000);
        // Still served from the rings set up before DRIVER_OK.
        let head = d.submit(0, &[(DATA_BASE, 8, true)]);
        assert_eq!(d.wait_used(0), (u32::from(head), 8));
        assert_eq!(d.read32(reg::INTERRUPT_STATUS), 1);
        d.write32(reg::INTERRUPT_ACK, 1);
        assert_eq!(d.read32(reg::INTERRUPT_STATUS), 0);
        let generation = d.read32(reg::CONFIG_GENERATION);
        d.write32(reg::STATUS, 0);
        assert_eq!(d.read32(reg::STATUS), 0);
        assert_eq!(d.read32(reg::QUEUE_READY), 0);
        assert_ne!(d.read32(reg::CONFIG_GENERATION), generation);
        // Notifications after the reset reach no device.
        d.queues[0].add(&d.mem, &[(DATA_BASE, 8, true)]);
        d.notify(0);
        assert!(d.queues[0].pop_used(&d.mem).is_none());
    }
}
