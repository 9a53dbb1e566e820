//! For the fuzz targets only (feature `fuzzing`): one batch of virtio-blk requests, served by
//! the device's own worker from guest memory the fuzzer writes.
//!
//! The input is a mode byte, then the bytes of guest memory from address 0 (the rest of it is
//! zeros). The one queue has [`QUEUE_SIZE`] entries: its descriptor table at [`DESC_TABLE`],
//! its avail ring at [`AVAIL_RING`] and its used ring at [`USED_RING`]; the fuzzer writes the
//! avail index, the descriptors (direct or indirect) and the request headers as a driver would,
//! or not. Mode bit 0 picks the disk: a raw file, or a fresh job overlay served by vmfarm's
//! qcow2 engine; bit 1 makes the raw disk read-only.
//!
//! Beyond the absence of crashes, the overlay's tables must survive the batch: after the
//! metadata flush the device does when the queue goes idle, the image opens again with the
//! engine and maps every cluster where it was.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::disk::Disk;
use super::request::ID_LEN;
use super::{Worker, disk_id};
use crate::fuzzing::{NoIrq, fd_path, scratch_dir, unnamed_file};
use crate::qcow2::header::Header;
use crate::qcow2::overlay::create_overlay;
use crate::qcow2::top::Qcow2Top;
use crate::virtio::device::Interrupt;

pub const MEM_SIZE: usize = 256 << 10;
pub const QUEUE_SIZE: u16 = 16;
pub const DESC_TABLE: u64 = 0;
pub const AVAIL_RING: u64 = 0x100;
pub const USED_RING: u64 = 0x200;
/// Where the seeds put request headers, status bytes and indirect tables...
pub const SMALL: u64 = 0x400;
/// ... and data buffers (left out of the seeds: zeros).
pub const BIG: u64 = 0x8000;
/// The virtual size of either disk: 16 clusters of the overlay.
pub const DISK_SIZE: u64 = 1 << 20;
/// The overlay's cluster size.
const CLUSTER: u64 = 64 << 10;
pub const MODE_OVERLAY: u8 = 1;
pub const MODE_READ_ONLY: u8 = 2;

/// The raw disk, shared by every run: its contents never steer the device.
fn raw_disk() -> &'static File {
    static RAW: OnceLock<File> = OnceLock::new();
    RAW.get_or_init(|| {
        let file = unnamed_file();
        file.set_len(DISK_SIZE).expect("size the raw disk");
        file
    })
}

/// An image file as its length and its pieces that are not zeros (offset, bytes).
type Sparse = (u64, Vec<(u64, Vec<u8>)>);

/// A job overlay as the worker makes it (over a 1 MiB base).
fn overlay_template() -> &'static Sparse {
    static TEMPLATE: OnceLock<Sparse> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let base = unnamed_file();
        let header = Header::empty_v3(DISK_SIZE);
        base.write_all_at(&header.to_bytes(), 0)
            .expect("write the base");
        let dir = scratch_dir().join(format!("vmfarm-fuzz-blk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let overlay = dir.join("overlay.qcow2");
        let _ = std::fs::remove_file(&overlay);
        create_overlay(&fd_path(&base), &overlay).expect("make the overlay");
        let bytes = std::fs::read(&overlay).expect("read the overlay");
        let _ = std::fs::remove_dir_all(&dir);
        let pieces = bytes
            .chunks(4096)
            .enumerate()
            .filter(|(_, chunk)| chunk.iter().any(|&b| b != 0))
            .map(|(i, chunk)| ((i * 4096) as u64, chunk.to_vec()))
            .collect();
        (bytes.len() as u64, pieces)
    })
}

/// A fresh overlay from the template, opened by vmfarm's engine, and its file.
fn fresh_overlay() -> (File, Box<Qcow2Top>) {
    let file = unnamed_file();
    let (len, pieces) = overlay_template();
    file.set_len(*len).expect("size the overlay");
    for (at, piece) in pieces {
        file.write_all_at(piece, *at).expect("write the overlay");
    }
    let top = Qcow2Top::open(&fd_path(&file))
        .expect("the overlay opens")
        .expect("the engine takes the overlay");
    (file, Box::new(top))
}

/// Where each cluster of the disk lies in the overlay's file (`None`: not in it).
fn placement(top: &Qcow2Top) -> Vec<Option<u64>> {
    (0..DISK_SIZE / CLUSTER)
        .map(|i| top.direct_read(i * CLUSTER, CLUSTER).map(|(_, at)| at))
        .collect()
}

/// Serves the requests `data` describes (see the module documentation).
pub fn requests(data: &[u8]) {
    let Some((&mode, memory)) = data.split_first() else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let n = memory.len().min(MEM_SIZE);
    mem.write_slice(&memory[..n], GuestAddress(0))
        .expect("inside guest memory");
    let queue =
        crate::virtio::test_utils::TestQueue::at(DESC_TABLE, AVAIL_RING, USED_RING, QUEUE_SIZE)
            .device_queue();
    let overlay = mode & MODE_OVERLAY != 0;
    let (file, disk) = if overlay {
        let (file, top) = fresh_overlay();
        (Some(file), Disk::Overlay { top, backing: None })
    } else {
        let file = raw_disk().try_clone().expect("dup the raw disk");
        (None, Disk::Raw(file))
    };
    let id: [u8; ID_LEN] = disk_id(Path::new("fuzz.qcow2"));
    let mut worker = Worker {
        disk,
        size: DISK_SIZE,
        read_only: !overlay && mode & MODE_READ_ONLY != 0,
        id,
        active: Some((mem, queue, Interrupt::new(Arc::new(NoIrq)))),
        metadata_dirty: false,
        bounce: Vec::new(),
    };
    worker.process();
    worker.flush_metadata();
    if let (Some(file), Disk::Overlay { top, .. }) = (file, &worker.disk) {
        let again = Qcow2Top::open(&fd_path(&file))
            .expect("the overlay opens again")
            .expect("the engine takes its own overlay again");
        assert_eq!(
            placement(&again),
            placement(top),
            "the overlay maps its clusters differently once reopened"
        );
    }
}

/// The seed corpus: requests like the device's tests make, written by the tests' driver.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use super::request::{T_FLUSH, T_GET_ID, T_IN, T_OUT};
    use crate::virtio::test_utils::{DESC_F_NEXT, DESC_F_WRITE, TestQueue};
    const DESC_F_INDIRECT: u16 = 4;

    /// Guest memory and the driver's queue, for one seed.
    struct Seed {
        mem: GuestMemoryMmap,
        queue: TestQueue,
        small: u64,
        big: u64,
        end: u64,
    }

    impl Seed {
        fn new() -> Seed {
            Seed {
                mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
                    .expect("guest memory"),
                queue: TestQueue::at(DESC_TABLE, AVAIL_RING, USED_RING, QUEUE_SIZE),
                small: SMALL,
                big: BIG,
                end: USED_RING + 4 + 8 * u64::from(QUEUE_SIZE),
            }
        }

        /// Places `bytes` in the seed's memory, 16-byte aligned.
        fn small(&mut self, bytes: &[u8]) -> u64 {
            let at = self.small;
            self.small = (at + bytes.len() as u64).next_multiple_of(16);
            self.mem
                .write_slice(bytes, GuestAddress(at))
                .expect("in memory");
            self.end = self.end.max(self.small);
            at
        }

        /// Room for a data buffer of `len` bytes, 512-byte aligned, left zero.
        fn big(&mut self, len: u32) -> u64 {
            let at = self.big;
            self.big = (at + u64::from(len)).next_multiple_of(512);
            at
        }

        fn header(&mut self, kind: u32, sector: u64) -> u64 {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.small(&h)
        }

        /// A request: its header, one data buffer (device-writable or not), a status byte.
        fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) {
            let header = self.header(kind, sector);
            let mut bufs = vec![(header, 16, false)];
            if let Some((len, device_writes)) = data {
                bufs.push((self.big(len), len, device_writes));
            }
            bufs.push((self.small(&[0xff]), 1, true));
            self.queue.add(&self.mem, &bufs);
        }

        /// A request through an indirect descriptor table.
        fn indirect(&mut self, kind: u32, sector: u64, len: u32) {
            let header = self.header(kind, sector);
            let data = self.big(len);
            let status = self.small(&[0xff]);
            let mut table = Vec::new();
            for (i, (addr, n, flags)) in [
                (header, 16, DESC_F_NEXT),
                (data, len, DESC_F_NEXT | DESC_F_WRITE),
                (status, 1, DESC_F_WRITE),
            ]
            .into_iter()
            .enumerate()
            {
                table.extend_from_slice(&u64::to_le_bytes(addr));
                table.extend_from_slice(&u32::to_le_bytes(n));
                table.extend_from_slice(&u16::to_le_bytes(flags));
                table.extend_from_slice(&u16::to_le_bytes(i as u16 + 1));
            }
            let at = self.small(&table);
            let head = self.queue.next_slot();
            self.queue
                .add_raw(&self.mem, &[(at, table.len() as u32, DESC_F_INDIRECT, 0)]);
            debug_assert_eq!(head + 1, self.queue.next_slot());
        }

        fn bytes(&self, mode: u8) -> Vec<u8> {
            let mut out = vec![mode];
            let mut memory = vec![0u8; self.end as usize];
            self.mem
                .read_slice(&mut memory, GuestAddress(0))
                .expect("in memory");
            out.extend_from_slice(&memory);
            out
        }
    }

    let mut seeds = Vec::new();
    for (name, mode) in [("raw", 0), ("overlay", MODE_OVERLAY)] {
        let mut s = Seed::new();
        s.request(T_IN, 2, Some((4096, true)));
        s.request(T_OUT, 10, Some((8192, false)));
        s.request(T_FLUSH, 0, None);
        s.request(T_GET_ID, 0, Some((20, true)));
        s.request(0x1234, 0, Some((512, true)));
        s.indirect(T_IN, 7, 1024);
        seeds.push((name, s.bytes(mode)));
    }
    let mut s = Seed::new();
    s.request(T_OUT, 1, Some((512, false)));
    s.request(T_IN, 2047, Some((1024, true)));
    s.request(T_IN, 0, Some((100, true)));
    seeds.push(("read-only", s.bytes(MODE_READ_ONLY)));
    // Whole clusters and parts of them in the overlay, across a cluster edge.
    let mut s = Seed::new();
    s.request(T_OUT, 128, Some((64 << 10, false)));
    s.request(T_OUT, 250, Some((4096, false)));
    s.request(T_IN, 120, Some((16 << 10, true)));
    s.request(T_FLUSH, 0, None);
    seeds.push(("overlay-clusters", s.bytes(MODE_OVERLAY)));
    seeds
}
