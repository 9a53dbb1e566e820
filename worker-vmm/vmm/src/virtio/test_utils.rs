//! Test fixtures: guest memory in the test process, a counting interrupt line, and a
//! minimal guest driver that sets a device up through its MMIO registers and drives split queues.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::VirtioDevice;
use super::mmio::MmioTransport;
use crate::bus::BusDevice;
use crate::irq::IrqLine;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// Where tests place their data buffers; queue structures live below.
pub const DATA_BASE: u64 = 0x10_0000;
const MEM_SIZE: usize = 64 << 20;

/// An interrupt line that counts its edges.
#[derive(Default)]
pub struct CountingIrq(pub AtomicU64);

impl IrqLine for CountingIrq {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// 64 MiB of guest memory at guest address 0.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

/// The driver's view of one split queue in guest memory.
pub struct TestQueue {
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl TestQueue {
    fn new(index: usize, size: u16) -> TestQueue {
        let base = 0x1_0000 * (index as u64 + 1);
        TestQueue::at(base, base + 0x4000, base + 0x8000, size)
    }

    /// A queue of `size` entries with its descriptor table, avail ring and used ring at these
    /// guest addresses.
    pub fn at(desc: u64, avail: u64, used: u64, size: u16) -> TestQueue {
        TestQueue {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// The device's view of this queue: ready, at this queue's addresses.
    pub fn device_queue(&self) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let mut q = virtio_queue::Queue::new(self.size).expect("a power-of-two queue size");
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (lo, hi) = split(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    /// Publish a chain of `(addr, len, device-writable)` buffers; returns its head index.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let n = bufs.len() as u16;
        let raw: Vec<(u64, u32, u16, u16)> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let idx = (self.next_desc + i as u16) % self.size;
                let next = (idx + 1) % self.size;
                let mut flags = if w { DESC_F_WRITE } else { 0 };
                if (i as u16) + 1 < n {
                    flags |= DESC_F_NEXT;
                }
                (addr, len, flags, next)
            })
            .collect();
        self.add_raw(mem, &raw)
    }

    /// Publish descriptors exactly as given `(addr, len, flags, next)`, the first as the head.
    pub fn add_raw(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let at = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % self.size;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// The descriptor slot the next chain starts at.
    pub fn next_slot(&self) -> u16 {
        self.next_desc
    }

    /// Overwrite the avail index (to test impossible values).
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// The next used element `(head, written length)`, if the device returned one.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.last_used {
            return None;
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }
}

/// A guest driver talking to one device through its MMIO transport.
pub struct TestDriver {
    pub mem: GuestMemoryMmap,
    pub transport: MmioTransport,
    pub queues: Vec<TestQueue>,
    pub irq: Arc<CountingIrq>,
}

impl TestDriver {
    /// Run the virtio initialization sequence up to DRIVER_OK with every queue at `queue_size`.
    pub fn new(device: Box<dyn VirtioDevice>, queue_size: u16) -> TestDriver {
        Self::with_features(device, queue_size, None)
    }

    /// Like `new`, accepting `features` (None: everything offered).
    pub fn with_features(
        device: Box<dyn VirtioDevice>,
        queue_size: u16,
        features: Option<u64>,
    ) -> TestDriver {
        let mem = guest_memory();
        let irq = Arc::new(CountingIrq::default());
        let transport = MmioTransport::new(device, mem.clone(), irq.clone());
        let mut driver = TestDriver {
            mem,
            transport,
            queues: Vec::new(),
            irq,
        };
        assert_eq!(driver.read32(0x0), 0x7472_6976);
        driver.write32(0x70, 1);
        driver.write32(0x70, 3);
        let offered = driver.device_features();
        driver.set_driver_features(features.unwrap_or(offered));
        driver.write32(0x70, 3 | 8);
        assert_eq!(driver.read32(0x70) & 8, 8, "FEATURES_OK refused");
        let mut q = 0;
        loop {
            driver.write32(0x30, q);
            let max = driver.read32(0x34);
            if max == 0 {
                break;
            }
            let tq = TestQueue::new(q as usize, queue_size.min(max as u16));
            driver.write32(0x38, u32::from(tq.size));
            for (reg, addr) in [(0x80, tq.desc), (0x90, tq.avail), (0xa0, tq.used)] {
                driver.write32(reg, addr as u32);
                driver.write32(reg + 4, (addr >> 32) as u32);
            }
            driver.write32(0x44, 1);
            driver.queues.push(tq);
            q += 1;
        }
        driver.write32(0x70, 3 | 8 | 4);
        driver
    }

    pub fn device_features(&mut self) -> u64 {
        self.write32(0x14, 0);
        let lo = self.read32(0x10);
        self.write32(0x14, 1);
        u64::from(lo) | (u64::from(self.read32(0x10)) << 32)
    }

    pub fn set_driver_features(&mut self, features: u64) {
        self.write32(0x24, 0);
        self.write32(0x20, features as u32);
        self.write32(0x24, 1);
        self.write32(0x20, (features >> 32) as u32);
    }

    pub fn read32(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write32(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    pub fn notify(&mut self, queue: u16) {
        self.write32(0x50, u32::from(queue));
    }

    /// Publish a chain on `queue` and notify the device.
    pub fn submit(&mut self, queue: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.queues[queue].add(&self.mem, bufs);
        self.notify(queue as u16);
        head
    }

    /// Wait (up to 10 s) for the next used element of `queue`.
    pub fn wait_used(&mut self, queue: usize) -> (u32, u32) {
        self.try_wait_used(queue, Duration::from_secs(10))
            .expect("the device did not answer")
    }

    pub fn try_wait_used(&mut self, queue: usize, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(used) = self.queues[queue].pop_used(&self.mem) {
                return Some(used);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    pub fn status(&mut self) -> u32 {
        self.read32(0x70)
    }

    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    pub fn write_mem(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}
