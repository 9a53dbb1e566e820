//! virtio-blk over raw and qcow2 images, served on the device's own thread.

mod disk;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
mod request;
pub mod throughput;
mod vectored;

use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

pub use self::disk::DiskError;
use self::disk::{Disk, SECTOR_SIZE};
use self::request::{ID_LEN, Target, execute};
use super::chain::{Chain, next_chain};
use super::device::{ActivateError, Interrupt, VirtioDevice};
use crate::thread::{self, Stack};

/// The virtio device type of a block device.
pub const DEVICE_TYPE_BLOCK: u32 = 2;
const QUEUE_SIZE: u16 = 256;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// How long the queue stays idle before qcow2 metadata is written.
const METADATA_FLUSH_DELAY: Duration = Duration::from_millis(50);
/// The largest request accepted (bigger chains fail with IOERR).
const MAX_REQUEST: u64 = 128 << 20;

/// Why a disk cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image")]
    Disk(#[from] DiskError),
    #[error("cannot start the disk thread")]
    Spawn(#[source] std::io::Error),
    #[error("the disk thread died while opening the image")]
    WorkerDied,
}

enum Command {
    Activate {
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: Interrupt,
    },
    Notify,
    Reset(Sender<()>),
}

/// A virtio-blk device. Its image is opened on a thread of its own, which serves the queue:
/// `queue_notify` only wakes that thread, and `reset` waits for it to stop touching guest memory.
pub struct Block {
    max_sizes: [u16; 1],
    features: u64,
    config: [u8; 24],
    commands: Option<Sender<Command>>,
    worker: Option<JoinHandle<()>>,
}

impl Block {
    /// Attach the image at `path` (raw, or qcow2 whose backing chain is qcow2 with absolute
    /// paths). A read-only disk advertises VIRTIO_BLK_F_RO and fails writes with IOERR.
    pub fn open(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let probe = disk::probe(path, read_only)?;
        let id = disk_id(path);
        let (commands, receiver) = mpsc::channel();
        let (opened_tx, opened_rx) = mpsc::channel();
        let owned = path.to_owned();
        let worker = thread::spawn("virtio-blk", Stack::Device, move || {
            match Disk::open(&owned, probe.format, read_only) {
                Ok(disk) => {
                    let _ = opened_tx.send(Ok(()));
                    let worker = Worker {
                        disk,
                        size: probe.size,
                        read_only,
                        id,
                        active: None,
                        metadata_dirty: false,
                        bounce: Vec::new(),
                    };
                    worker.run(receiver);
                }
                Err(err) => {
                    let _ = opened_tx.send(Err(err));
                }
            }
        })
        .map_err(BlockError::Spawn)?;
        opened_rx.recv().map_err(|_| BlockError::WorkerDied)??;
        tracing::info!(path = %path.display(), format = ?probe.format, size = probe.size, read_only, "virtio-blk disk attached");
        let mut features = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_RING_INDIRECT_DESC;
        if read_only {
            features |= F_RO;
        }
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&(probe.size / SECTOR_SIZE).to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Ok(Block {
            max_sizes: [QUEUE_SIZE],
            features,
            config,
            commands: Some(commands),
            worker: Some(worker),
        })
    }

    fn send(&self, command: Command) -> bool {
        self.commands
            .as_ref()
            .is_some_and(|c| c.send(command).is_ok())
    }
}

/// The GET_ID serial: the image's file name, cut to 20 bytes.
fn disk_id(path: &Path) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = name.len().min(ID_LEN);
    id[..n].copy_from_slice(&name.as_bytes()[..n]);
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _acked_features: u64,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let queue = queues
            .into_iter()
            .next()
            .filter(|_| got == 1)
            .ok_or(ActivateError::QueueCount { expected: 1, got })?;
        if self.send(Command::Activate {
            mem,
            queue,
            interrupt,
        }) {
            Ok(())
        } else {
            Err(ActivateError::WorkerGone)
        }
    }

    fn queue_notify(&mut self, _index: u16) {
        self.send(Command::Notify);
    }

    fn reset(&mut self) -> bool {
        let (done_tx, done_rx) = mpsc::channel();
        if self.send(Command::Reset(done_tx))
            && done_rx.recv_timeout(Duration::from_secs(30)).is_err()
        {
            tracing::error!("virtio-blk worker did not acknowledge the reset");
            return false;
        }
        true
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.commands = None; // The worker flushes and ends when its channel closes.
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            tracing::error!("virtio-blk worker panicked");
        }
    }
}

/// Copy `data.len()` bytes of a configuration space at `offset`; bytes past its end read 0.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < config.len() {
        let n = data.len().min(config.len() - start);
        data[..n].copy_from_slice(&config[start..start + n]);
    }
}

struct Worker {
    disk: Disk,
    size: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    active: Option<(GuestMemoryMmap, Queue, Interrupt)>,
    metadata_dirty: bool,
    /// For qcow2 images, whose data cannot move straight to guest buffers.
    bounce: Vec<u8>,
}

impl Worker {
    fn run(mut self, commands: Receiver<Command>) {
        loop {
            // qcow2 metadata is written once the queue has been idle for a moment, as well as
            // on FLUSH, reset and shutdown.
            let command = if self.metadata_dirty {
                match commands.recv_timeout(METADATA_FLUSH_DELAY) {
                    Ok(command) => command,
                    Err(RecvTimeoutError::Timeout) => {
                        self.flush_metadata();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match commands.recv() {
                    Ok(command) => command,
                    Err(_) => break,
                }
            };
            match command {
                Command::Activate {
                    mem,
                    queue,
                    interrupt,
                } => {
                    self.active = Some((mem, queue, interrupt));
                    self.process();
                }
                Command::Notify => self.process(),
                Command::Reset(done) => {
                    self.active = None;
                    self.flush_metadata();
                    let _ = done.send(());
                }
            }
        }
        if let Err(err) = self.disk.flush() {
            tracing::error!(%err, "flushing the disk at shutdown failed");
        }
    }

    fn flush_metadata(&mut self) {
        self.metadata_dirty = false;
        if let Err(err) = self.disk.flush_metadata() {
            tracing::error!(%err, "flushing qcow2 metadata failed");
        }
    }

    fn process(&mut self) {
        let Some((mem, queue, interrupt)) = &mut self.active else {
            return;
        };
        if interrupt.needs_reset() {
            return;
        }
        let mut target = Target {
            disk: &mut self.disk,
            size: self.size,
            read_only: self.read_only,
            id: &self.id,
            bounce: &mut self.bounce,
        };
        let mut used = false;
        loop {
            let chain = match next_chain(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(err) => {
                    interrupt.set_needs_reset(&format!("virtio-blk queue: {err:?}"));
                    break;
                }
            };
            let head = chain.head_index();
            let done = match Chain::parse(chain, mem, MAX_REQUEST) {
                Ok(chain) => {
                    // qcow2-rs asserts on some inconsistencies: a panic there fails the
                    // device, not the VMM.
                    let run = std::panic::AssertUnwindSafe(|| execute(&chain, mem, &mut target));
                    match std::panic::catch_unwind(run) {
                        Ok(done) => done,
                        Err(_) => {
                            interrupt.set_needs_reset("the disk backend panicked");
                            break;
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "malformed virtio-blk chain");
                    None
                }
            };
            let written = match done {
                Some(done) => {
                    if done.status != request::S_OK {
                        interrupt.count_error();
                    }
                    done.written
                }
                None => {
                    interrupt.count_error();
                    0
                }
            };
            if let Err(err) = queue.add_used(mem, head, written) {
                interrupt.set_needs_reset(&format!("virtio-blk used ring: {err:?}"));
                break;
            }
            used = true;
        }
        if used {
            interrupt.signal_used();
        }
        self.metadata_dirty |= used;
    }
}

#[cfg(test)]
mod tests {
    use super::request::{S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT};
    use super::*;
    use crate::qcow2::ImageError;
    use crate::qcow2::overlay::create_overlay;
    use crate::qcow2::test_utils::{checked_contents, qcow2_from, qemu_img};
    use crate::test_utils::{TempDir, pattern};
    use crate::virtio::test_utils::{DATA_BASE, DESC_F_NEXT, TestDriver};

    const HDR: u64 = DATA_BASE;
    const DATA: u64 = DATA_BASE + 0x1000;
    const STATUS: u64 = DATA_BASE + 0x80;

    fn raw_disk(dir: &TempDir, len: usize) -> std::path::PathBuf {
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, pattern(len, 7)).unwrap();
        path
    }

    fn header(d: &TestDriver, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        d.write_mem(HDR, &h);
        d.write_mem(STATUS, &[0xff]);
    }

    /// Submit header + one data buffer + status; returns (status, used length).
    fn request(
        d: &mut TestDriver,
        kind: u32,
        sector: u64,
        len: u32,
        device_writes: bool,
    ) -> (u8, u32) {
        header(d, kind, sector);
        let head = d.submit(
            0,
            &[
                (HDR, 16, false),
                (DATA, len, device_writes),
                (STATUS, 1, true),
            ],
        );
        let (id, used) = d.wait_used(0);
        assert_eq!(id, u32::from(head));
        (d.read_mem(STATUS, 1)[0], used)
    }

    #[test]
    fn test_block_reads_and_writes_raw_file() {
        let dir = TempDir::new("blk");
        let path = raw_disk(&dir, 1 << 20);
        let mut d = TestDriver::new(Box::new(Block::open(&path, false).unwrap()), 64);
        assert_eq!(d.read32(0x100), (1 << 20) / 512);
        assert_eq!(request(&mut d, T_IN, 2, 4096, true), (S_OK, 4097));
        assert_eq!(
            d.read_mem(DATA, 4096),
            pattern(1 << 20, 7)[1024..1024 + 4096]
        );
        d.write_mem(DATA, &pattern(8192, 99));
        assert_eq!(request(&mut d, T_OUT, 10, 8192, false), (S_OK, 1));
        header(&d, T_FLUSH, 0);
        d.submit(0, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(d.wait_used(0).1, 1);
        assert_eq!(d.read_mem(STATUS, 1)[0], S_OK);
        drop(d);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[5120..5120 + 8192], &pattern(8192, 99)[..]);
    }

    #[test]
    fn test_block_read_only_disk_fails_writes() {
        let dir = TempDir::new("blk");
        let path = raw_disk(&dir, 64 << 10);
        let mut d = TestDriver::new(Box::new(Block::open(&path, true).unwrap()), 64);
        assert_ne!(d.device_features() & F_RO, 0);
        assert_eq!(request(&mut d, T_OUT, 0, 512, false), (S_IOERR, 1));
        assert_eq!(request(&mut d, T_IN, 0, 512, true), (S_OK, 513));
        drop(d);
        assert_eq!(std::fs::read(&path).unwrap(), pattern(64 << 10, 7));
    }

    #[test]
    fn test_block_out_of_range_sectors_fail() {
        let dir = TempDir::new("blk");
        let path = raw_disk(&dir, 64 << 10);
        let mut d = TestDriver::new(Box::new(Block::open(&path, false).unwrap()), 64);
        assert_eq!(request(&mut d, T_IN, 127, 512, true), (S_OK, 513));
        assert_eq!(request(&mut d, T_IN, 127, 1024, true), (S_IOERR, 1));
        assert_eq!(request(&mut d, T_OUT, 128, 512, false), (S_IOERR, 1));
        assert_eq!(
            request(&mut d, T_IN, u64::MAX / 256, 512, true),
            (S_IOERR, 1)
        );
        assert_eq!(
            request(&mut d, T_IN, 0, 100, true),
            (S_IOERR, 1),
            "not whole sectors"
        );
        assert!(d.transport.error_count() >= 4);
    }

    #[test]
    fn test_block_unsupported_type_and_get_id() {
        let dir = TempDir::new("blk");
        let path = raw_disk(&dir, 64 << 10);
        let mut d = TestDriver::new(Box::new(Block::open(&path, false).unwrap()), 64);
        assert_eq!(request(&mut d, 0x1234, 0, 512, true), (S_UNSUPP, 1));
        assert_eq!(request(&mut d, T_GET_ID, 0, 20, true), (S_OK, 21));
        assert_eq!(&d.read_mem(DATA, 9), b"disk.raw\0");
    }

    #[test]
    fn test_block_malformed_chains_fail_without_breaking_the_device() {
        let dir = TempDir::new("blk");
        let path = raw_disk(&dir, 64 << 10);
        let mut d = TestDriver::new(Box::new(Block::open(&path, false).unwrap()), 64);
        // Read whose data buffer is device-readable: IOERR.
        assert_eq!(request(&mut d, T_IN, 0, 512, false), (S_IOERR, 1));
        // Write whose data buffer is device-writable: IOERR.
        assert_eq!(request(&mut d, T_OUT, 0, 512, true), (S_IOERR, 1));
        // No writable byte for the status: dropped with length 0.
        header(&d, T_IN, 0);
        d.submit(0, &[(HDR, 16, false), (DATA, 512, false)]);
        assert_eq!(d.wait_used(0).1, 0);
        // Header too short.
        d.submit(0, &[(HDR, 8, false), (STATUS, 1, true)]);
        assert_eq!(d.wait_used(0).1, 1);
        assert_eq!(d.read_mem(STATUS, 1)[0], S_IOERR);
        // Readable descriptor after a writable one.
        header(&d, T_IN, 0);
        d.submit(
            0,
            &[(HDR, 16, false), (STATUS, 1, true), (DATA, 512, false)],
        );
        assert_eq!(d.wait_used(0).1, 0);
        // Lengths that overflow and a buffer outside guest memory.
        header(&d, T_IN, 0);
        d.submit(
            0,
            &[
                (HDR, 16, false),
                (DATA, u32::MAX, true),
                (DATA, u32::MAX, true),
                (STATUS, 1, true),
            ],
        );
        assert_eq!(d.wait_used(0).1, 0);
        d.submit(
            0,
            &[
                (HDR, 16, false),
                (u64::MAX - 100, 4096, true),
                (STATUS, 1, true),
            ],
        );
        assert_eq!(d.wait_used(0).1, 0);
        // A descriptor that chains to itself: the chain ends at the queue size.
        let slot = d.queues[0].next_slot();
        d.queues[0].add_raw(&d.mem, &[(HDR, 16, DESC_F_NEXT, slot)]);
        d.notify(0);
        assert_eq!(d.wait_used(0).1, 0);
        // Still serving well-formed requests, and not marked broken.
        assert_eq!(request(&mut d, T_IN, 0, 512, true), (S_OK, 513));
        assert_eq!(d.status() & 0x40, 0);
    }

    #[test]
    fn test_block_qcow2_overlay_writes_leave_base_unchanged() {
        let dir = TempDir::new("blk");
        let base = qcow2_from(dir.path(), "base.qcow2", &pattern(4 << 20, 3));
        let base_before = std::fs::read(&base).unwrap();
        let overlay = dir.path().join("overlay.qcow2");
        create_overlay(&base, &overlay).unwrap();

        let mut d = TestDriver::new(Box::new(Block::open(&overlay, false).unwrap()), 64);
        assert_eq!(d.read32(0x100), (4 << 20) / 512);
        // Read through to the base.
        assert_eq!(request(&mut d, T_IN, 100, 4096, true), (S_OK, 4097));
        assert_eq!(
            d.read_mem(DATA, 4096),
            pattern(4 << 20, 3)[51200..51200 + 4096]
        );
        // A partial-cluster write copies the rest of the cluster from the base.
        d.write_mem(DATA, &pattern(1024, 200));
        assert_eq!(request(&mut d, T_OUT, 101, 1024, false), (S_OK, 1));
        assert_eq!(request(&mut d, T_IN, 100, 4096, true), (S_OK, 4097));
        let mut expect = pattern(4 << 20, 3)[51200..51200 + 4096].to_vec();
        expect[512..1536].copy_from_slice(&pattern(1024, 200));
        assert_eq!(d.read_mem(DATA, 4096), expect);
        drop(d);

        assert_eq!(
            std::fs::read(&base).unwrap(),
            base_before,
            "the base is never written"
        );
        let image = checked_contents(dir.path(), &overlay);
        let mut whole = pattern(4 << 20, 3);
        whole[51712..51712 + 1024].copy_from_slice(&pattern(1024, 200));
        assert!(image == whole, "qemu-img sees the same image");
    }

    #[test]
    fn test_block_refuses_relative_or_non_qcow2_backing() {
        let dir = TempDir::new("blk");
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let top = dir.path().join("top.qcow2");
        let (r, t) = (raw.to_str().unwrap(), top.to_str().unwrap());
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", r, "-F", "raw", t]);
        assert!(matches!(
            Block::open(&top, false),
            Err(BlockError::Disk(DiskError::Qcow2(
                ImageError::BackingNotQcow2 { .. }
            )))
        ));
        std::fs::remove_file(&top).unwrap();
        let base = dir.path().join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            t,
        ]);
        assert!(matches!(
            Block::open(&top, false),
            Err(BlockError::Disk(DiskError::Qcow2(
                ImageError::RelativeBacking { .. }
            )))
        ));
        assert!(matches!(
            Block::open(&dir.path().join("missing"), false),
            Err(BlockError::Disk(DiskError::Open { .. }))
        ));
    }

    #[test]
    fn test_block_read_only_qcow2_with_backing_is_readable() {
        let dir = TempDir::new("blk");
        let base = qcow2_from(dir.path(), "base.qcow2", &pattern(1 << 20, 11));
        let overlay = dir.path().join("ro.qcow2");
        create_overlay(&base, &overlay).unwrap();
        let before = std::fs::read(&overlay).unwrap();
        let mut d = TestDriver::new(Box::new(Block::open(&overlay, true).unwrap()), 64);
        assert_eq!(request(&mut d, T_IN, 8, 8192, true), (S_OK, 8193));
        assert_eq!(
            d.read_mem(DATA, 8192),
            pattern(1 << 20, 11)[4096..4096 + 8192]
        );
        assert_eq!(request(&mut d, T_OUT, 8, 512, false), (S_IOERR, 1));
        drop(d);
        assert_eq!(std::fs::read(&overlay).unwrap(), before);
    }

    #[test]
    fn test_block_overlay_over_compressed_base() {
        let dir = TempDir::new("blk");
        let raw = dir.path().join("seed.raw");
        let seed = pattern(2 << 20, 21);
        std::fs::write(&raw, &seed).unwrap();
        let base = dir.path().join("cloud.qcow2");
        let (r, b) = (raw.to_str().unwrap(), base.to_str().unwrap());
        qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", r, b]);
        let overlay = dir.path().join("job.qcow2");
        create_overlay(&base, &overlay).unwrap();
        let mut d = TestDriver::new(Box::new(Block::open(&overlay, false).unwrap()), 64);
        assert_eq!(request(&mut d, T_IN, 300, 8192, true), (S_OK, 8193));
        assert_eq!(d.read_mem(DATA, 8192), seed[300 * 512..300 * 512 + 8192]);
        d.write_mem(DATA, &pattern(512, 77));
        assert_eq!(request(&mut d, T_OUT, 301, 512, false), (S_OK, 1));
        drop(d);
        let image = checked_contents(dir.path(), &overlay);
        let mut expect = seed;
        expect[301 * 512..302 * 512].copy_from_slice(&pattern(512, 77));
        assert!(image == expect);
    }

    #[test]
    fn test_block_qcow2_metadata_reaches_disk_when_idle() {
        let dir = TempDir::new("blk");
        let base = dir.path().join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
        let overlay = dir.path().join("job.qcow2");
        create_overlay(&base, &overlay).unwrap();
        let mut d = TestDriver::new(Box::new(Block::open(&overlay, false).unwrap()), 64);
        d.write_mem(DATA, &pattern(64 << 10, 4));
        assert_eq!(request(&mut d, T_OUT, 2048, 64 << 10, false), (S_OK, 1));
        std::thread::sleep(METADATA_FLUSH_DELAY * 4);
        // The device is still attached: what is on disk is already a consistent image.
        let image = checked_contents(dir.path(), &overlay);
        assert!(image[1 << 20..(1 << 20) + (64 << 10)] == pattern(64 << 10, 4));
        drop(d);
    }
}
