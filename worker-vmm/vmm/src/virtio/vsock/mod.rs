//! virtio-vsock in Firecracker's "hybrid" style: the host side is a Unix socket.
//!
//! A host process connects to the socket, writes `CONNECT <port>\n`, reads `OK <host port>\n`
//! and then has a stream to the guest's port (bytes after the CONNECT line in the same write
//! belong to the stream). A guest connection to host port P is forwarded to `<socket>_P`.
//! A host connection whose REQUEST the guest does not answer within 5 s (no driver yet, or
//! no listener and no RST) is closed without an OK line: the host should retry.

mod backend;
mod conn;
mod packet;

#[cfg(feature = "fuzzing")]
pub use self::backend::fuzz;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use self::backend::{Backend, Command};
use super::device::{ActivateError, Interrupt, VirtioDevice};
use crate::thread::{self, Stack};

/// The virtio device type of a socket device.
pub const DEVICE_TYPE_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;

/// Why the vsock device cannot start.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (valid: 3 to 2^32 - 2)")]
    ReservedCid(u64),
    #[error("{path} exists and is not a socket")]
    PathInUse { path: PathBuf },
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the vsock worker")]
    Setup(#[source] std::io::Error),
}

/// The vsock device. A worker thread runs an epoll loop over the host sockets; the vCPU
/// thread's `queue_notify` only wakes it through an eventfd.
pub struct Vsock {
    max_sizes: [u16; 3],
    config: [u8; 8],
    uds_path: PathBuf,
    commands: Option<Sender<Command>>,
    wake: EventFd,
    worker: Option<JoinHandle<()>>,
}

impl Vsock {
    /// A vsock device for the guest `guest_cid` whose host side listens on `uds_path`
    /// (a stale socket there is replaced; the socket is removed when the device is dropped).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::ReservedCid(guest_cid));
        }
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if !meta.file_type().is_socket() {
                return Err(VsockError::PathInUse {
                    path: uds_path.to_owned(),
                });
            }
            let _ = std::fs::remove_file(uds_path);
        }
        let bind_err = |source| VsockError::Bind {
            path: uds_path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(VsockError::Setup)?;
        let backend = Backend::new(
            guest_cid,
            uds_path.to_owned(),
            listener,
            wake.try_clone().map_err(VsockError::Setup)?,
        )
        .map_err(VsockError::Setup)?;
        let (commands, receiver) = mpsc::channel();
        let worker = thread::spawn("virtio-vsock", Stack::Device, move || backend.run(receiver))
            .map_err(VsockError::Setup)?;
        Ok(Vsock {
            max_sizes: [QUEUE_SIZE; 3],
            config: guest_cid.to_le_bytes(),
            uds_path: uds_path.to_owned(),
            commands: Some(commands),
            wake,
            worker: Some(worker),
        })
    }

    fn send(&self, command: Command) -> bool {
        let sent = self
            .commands
            .as_ref()
            .is_some_and(|c| c.send(command).is_ok());
        sent && self.wake.write(1).is_ok()
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::block::read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _acked_features: u64,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: queues.len(),
            });
        }
        if self.send(Command::Activate {
            mem,
            queues,
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
            && done_rx.recv_timeout(Duration::from_secs(10)).is_err()
        {
            tracing::error!("virtio-vsock worker did not acknowledge the reset");
            return false;
        }
        true
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.commands = None;
        let _ = self.wake.write(1);
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            tracing::error!("virtio-vsock worker panicked");
        }
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use super::packet::*;
    use super::*;
    use crate::test_utils::{TempDir, pattern};
    use crate::virtio::test_utils::TestDriver;

    const CID: u64 = 3;
    const TX_AREA: u64 = 0x10_0000;
    const TX_SLOT: u64 = 0x1_1000;
    const TX_SLOTS: u64 = 32;
    const RX_AREA: u64 = 0x80_0000;
    const RX_BUF: u32 = 16 * 1024;
    const RX_BUFS: u64 = 64;

    /// A guest vsock driver over guest memory held in the test.
    struct Guest {
        d: TestDriver,
        rx_addr: HashMap<u32, u64>,
        tx_next: u64,
    }

    /// The guest's side of one connection.
    #[derive(Default)]
    struct Stream {
        port: u32,
        host_port: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
        reported: u32,
        tx_cnt: u32,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    }

    impl Stream {
        fn credit(&self) -> u32 {
            self.peer_buf_alloc
                .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
        }
        fn header(&mut self, op: u16, len: u32) -> Header {
            self.reported = self.fwd_cnt;
            Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port: self.port,
                dst_port: self.host_port,
                len,
                kind: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: self.buf_alloc,
                fwd_cnt: self.fwd_cnt,
            }
        }
        fn learn(&mut self, h: &Header) {
            self.peer_buf_alloc = h.buf_alloc;
            self.peer_fwd_cnt = h.fwd_cnt;
        }
    }

    impl Guest {
        fn new(dir: &TempDir) -> (Guest, PathBuf) {
            let path = dir.path().join("v.sock");
            let g = Guest::attach(Vsock::new(CID, &path).unwrap());
            (g, path)
        }

        /// Initialize the driver of `device` and give it receive buffers.
        fn attach(device: Vsock) -> Guest {
            let d = TestDriver::new(Box::new(device), 128);
            let mut g = Guest {
                d,
                rx_addr: HashMap::new(),
                tx_next: 0,
            };
            assert_eq!(g.d.read32(0x100), CID as u32);
            for i in 0..RX_BUFS {
                g.post_rx(RX_AREA + i * u64::from(RX_BUF));
            }
            g
        }

        fn post_rx(&mut self, addr: u64) {
            let head = self.d.queues[0].add(&self.d.mem, &[(addr, RX_BUF, true)]);
            self.rx_addr.insert(u32::from(head), addr);
            self.d.notify(0);
        }

        /// Send a packet as a header descriptor and a data descriptor.
        fn send(&mut self, h: Header, data: &[u8]) {
            let slot = TX_AREA + (self.tx_next % TX_SLOTS) * TX_SLOT;
            self.tx_next += 1;
            self.d.write_mem(slot, &h.to_bytes());
            self.d.write_mem(slot + 0x100, data);
            let mut bufs = vec![(slot, HEADER_LEN as u32, false)];
            if !data.is_empty() {
                bufs.push((slot + 0x100, data.len() as u32, false));
            }
            self.send_bufs(&bufs);
        }

        fn send_bufs(&mut self, bufs: &[(u64, u32, bool)]) {
            self.d.submit(1, bufs);
            self.d.wait_used(1);
        }

        fn recv_timeout(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
            let (head, len) = self.d.try_wait_used(0, timeout)?;
            let addr = self.rx_addr.remove(&head).expect("a posted buffer");
            assert!(len as usize >= HEADER_LEN);
            let raw = self.d.read_mem(addr, len as usize);
            let mut hb = [0u8; HEADER_LEN];
            hb.copy_from_slice(&raw[..HEADER_LEN]);
            let h = Header::from_bytes(&hb);
            assert_eq!((h.src_cid, h.dst_cid, h.kind), (HOST_CID, CID, TYPE_STREAM));
            assert_eq!(h.len as usize, len as usize - HEADER_LEN);
            self.post_rx(addr);
            Some((h, raw[HEADER_LEN..].to_vec()))
        }

        fn recv(&mut self) -> (Header, Vec<u8>) {
            self.recv_timeout(Duration::from_secs(10))
                .expect("a packet from the device")
        }

        /// Move `out` to the host and `expect` bytes from it under the spec's credit rules.
        fn exchange(&mut self, s: &mut Stream, out: &[u8], expect: usize) -> Vec<u8> {
            let mut got = Vec::new();
            let mut sent = 0;
            let mut host_eof = false;
            while got.len() < expect || sent < out.len() {
                while sent < out.len() && s.credit() > 0 {
                    let n = (out.len() - sent).min(16 * 1024).min(s.credit() as usize);
                    let h = s.header(OP_RW, n as u32);
                    self.send(h, &out[sent..sent + n]);
                    s.tx_cnt = s.tx_cnt.wrapping_add(n as u32);
                    sent += n;
                }
                let (h, data) = self.recv();
                assert_eq!((h.src_port, h.dst_port), (s.host_port, s.port));
                s.learn(&h);
                match h.op {
                    OP_RW => {
                        assert!(!host_eof);
                        assert!(
                            s.fwd_cnt
                                .wrapping_add(data.len() as u32)
                                .wrapping_sub(s.reported)
                                <= s.buf_alloc,
                            "credit exceeded"
                        );
                        got.extend_from_slice(&data);
                        s.fwd_cnt = s.fwd_cnt.wrapping_add(data.len() as u32);
                        if s.fwd_cnt.wrapping_sub(s.reported) >= 64 * 1024 {
                            let h = s.header(OP_CREDIT_UPDATE, 0);
                            self.send(h, &[]);
                        }
                    }
                    OP_CREDIT_UPDATE => {}
                    OP_CREDIT_REQUEST => {
                        let h = s.header(OP_CREDIT_UPDATE, 0);
                        self.send(h, &[]);
                    }
                    OP_SHUTDOWN => host_eof = true,
                    op => panic!("unexpected op {op}"),
                }
            }
            got
        }
    }

    fn host_connect(path: &Path, first: &[u8]) -> UnixStream {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(first).unwrap();
        s
    }

    /// The guest accepts the host's pending connection to `port`, granting `buf_alloc` bytes of
    /// credit; the host then reads `OK <its port>`. Returns the guest's side of the stream.
    fn accept_host(g: &mut Guest, host: &mut UnixStream, port: u32, buf_alloc: u32) -> Stream {
        let (req, _) = g.recv();
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, port));
        let mut s = Stream {
            port,
            host_port: req.src_port,
            buf_alloc,
            ..Stream::default()
        };
        s.learn(&req);
        let h = s.header(OP_RESPONSE, 0);
        g.send(h, &[]);
        assert_eq!(read_ok(host), format!("OK {}\n", req.src_port));
        s
    }

    /// Read the `OK <port>\n` line byte by byte.
    fn read_ok(s: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut b = [0u8];
        while line.last() != Some(&b'\n') {
            s.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    }

    #[test]
    fn test_vsock_host_connect_moves_mebibytes_both_ways() {
        let dir = TempDir::new("vsock");
        let (mut g, path) = Guest::new(&dir);
        let to_guest = pattern(4 << 20, 1);
        let to_host = pattern(3 << 20, 2);
        let mut host = host_connect(&path, b"CONNECT 52\nhello");
        let mut s = accept_host(&mut g, &mut host, 52, 256 * 1024);

        let (mut reader, writer_data) = (host.try_clone().unwrap(), to_guest.clone());
        let writer = std::thread::spawn(move || host.write_all(&writer_data).map(|()| host));
        let expect = to_host.len();
        let read = std::thread::spawn(move || {
            let mut buf = vec![0u8; expect];
            reader.read_exact(&mut buf).map(|()| buf)
        });
        let got = g.exchange(&mut s, &to_host, 5 + to_guest.len());
        assert_eq!(&got[..5], b"hello");
        assert!(got[5..] == to_guest[..], "host->guest stream intact");
        assert!(
            read.join().unwrap().unwrap() == to_host,
            "guest->host stream intact"
        );
        let mut host = writer.join().unwrap().unwrap();

        // The guest closes: the device answers RST and the host sees the end of the stream.
        let mut h = s.header(OP_SHUTDOWN, 0);
        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        g.send(h, &[]);
        loop {
            let (h, _) = g.recv();
            if h.op == OP_RST {
                break;
            }
            assert!(
                matches!(h.op, OP_CREDIT_UPDATE | OP_CREDIT_REQUEST),
                "op {}",
                h.op
            );
        }
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(g.d.transport.error_count(), 0);
    }

    #[test]
    fn test_vsock_guest_connect_forwards_to_port_socket() {
        let dir = TempDir::new("vsock");
        let (mut g, path) = Guest::new(&dir);
        let listener = UnixListener::bind(format!("{}_1234", path.display())).unwrap();
        let to_host = pattern(3 << 20, 5);
        let to_guest = pattern(2 << 20, 6);
        let back = to_guest.clone();
        let host = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut w = stream.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                w.write_all(&back).unwrap();
                w.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut got = Vec::new();
            (&stream).read_to_end(&mut got).unwrap();
            writer.join().unwrap();
            got
        });
        let mut s = Stream {
            port: 5000,
            host_port: 1234,
            buf_alloc: 256 * 1024,
            ..Stream::default()
        };
        let h = s.header(OP_REQUEST, 0);
        g.send(h, &[]);
        let (resp, _) = g.recv();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (OP_RESPONSE, 1234, 5000)
        );
        s.learn(&resp);
        let got = g.exchange(&mut s, &to_host, to_guest.len());
        assert!(got == to_guest);
        let mut h = s.header(OP_SHUTDOWN, 0);
        h.flags = SHUTDOWN_SEND;
        g.send(h, &[]);
        assert!(
            host.join().unwrap() == to_host,
            "guest->host stream intact, then EOF"
        );
    }

    #[test]
    fn test_vsock_guest_connect_to_missing_port_gets_rst() {
        let dir = TempDir::new("vsock");
        let (mut g, _path) = Guest::new(&dir);
        let mut s = Stream {
            port: 7,
            host_port: 999,
            buf_alloc: 4096,
            ..Stream::default()
        };
        let h = s.header(OP_REQUEST, 0);
        g.send(h, &[]);
        let (h, _) = g.recv();
        assert_eq!((h.op, h.dst_port), (OP_RST, 7));
    }

    #[test]
    fn test_vsock_respects_guest_credit() {
        let dir = TempDir::new("vsock");
        let (mut g, path) = Guest::new(&dir);
        let mut host = host_connect(&path, b"CONNECT 80\n");
        let mut s = accept_host(&mut g, &mut host, 80, 8192);
        host.write_all(&pattern(64 * 1024, 9)).unwrap();
        let mut got = 0;
        let mut asked = false;
        while let Some((h, data)) = g.recv_timeout(Duration::from_millis(500)) {
            match h.op {
                OP_RW => got += data.len(),
                OP_CREDIT_REQUEST => asked = true,
                op => panic!("unexpected op {op}"),
            }
        }
        assert_eq!(got, 8192, "no more than the advertised buffer");
        assert!(asked, "the device asks for credit");
        s.fwd_cnt = 8192;
        let h = s.header(OP_CREDIT_UPDATE, 0);
        g.send(h, &[]);
        let mut more = 0;
        while let Some((h, data)) = g.recv_timeout(Duration::from_millis(500)) {
            if h.op == OP_RW {
                more += data.len();
            }
        }
        assert_eq!(more, 8192);
    }

    #[test]
    fn test_vsock_guest_exceeding_credit_is_reset() {
        let dir = TempDir::new("vsock");
        let (mut g, path) = Guest::new(&dir);
        let listener = UnixListener::bind(format!("{}_22", path.display())).unwrap();
        let mut s = Stream {
            port: 6000,
            host_port: 22,
            buf_alloc: 4096,
            ..Stream::default()
        };
        let h = s.header(OP_REQUEST, 0);
        g.send(h, &[]);
        let (resp, _) = g.recv();
        assert_eq!(resp.op, OP_RESPONSE);
        let (_held, _) = listener.accept().unwrap(); // never read
        let chunk = pattern(60 * 1024, 3);
        let mut reset = false;
        for _ in 0..64 {
            let h = s.header(OP_RW, chunk.len() as u32);
            g.send(h, &chunk);
            if let Some((h, _)) = g.recv_timeout(Duration::from_millis(20))
                && h.op == OP_RST
            {
                reset = true;
                break;
            }
        }
        assert!(reset, "a guest ignoring credit is reset");
        assert!(g.d.transport.error_count() >= 1);
    }

    #[test]
    fn test_vsock_malformed_packets_are_dropped_or_reset() {
        let dir = TempDir::new("vsock");
        let (mut g, _path) = Guest::new(&dir);
        let mut s = Stream {
            port: 9,
            host_port: 10,
            buf_alloc: 4096,
            ..Stream::default()
        };
        let quiet = Duration::from_millis(200);
        // Wrong source or destination CID: dropped silently.
        let mut h = s.header(OP_REQUEST, 0);
        h.src_cid = 4;
        g.send(h, &[]);
        let mut h = s.header(OP_REQUEST, 0);
        h.dst_cid = 7;
        g.send(h, &[]);
        assert!(g.recv_timeout(quiet).is_none());
        // A header shorter than 44 bytes: dropped.
        g.send_bufs(&[(TX_AREA, 20, false)]);
        assert!(g.recv_timeout(quiet).is_none());
        // Unknown op, wrong type, length beyond the buffers, data for no connection: RST.
        let h = s.header(99, 0);
        g.send(h, &[]);
        assert_eq!(g.recv().0.op, OP_RST);
        let mut h = s.header(OP_REQUEST, 0);
        h.kind = 2;
        g.send(h, &[]);
        assert_eq!(g.recv().0.op, OP_RST);
        let h = s.header(OP_RW, 100_000);
        g.send(h, &[1, 2, 3]);
        assert_eq!(g.recv().0.op, OP_RST);
        let h = s.header(OP_RW, 3);
        g.send(h, &[1, 2, 3]);
        assert_eq!(g.recv().0.op, OP_RST);
        // A descriptor outside guest memory, and a device-writable TX buffer: dropped.
        g.send_bufs(&[(u64::MAX - 8, 64, false)]);
        g.send_bufs(&[(TX_AREA, 44, true)]);
        assert!(g.recv_timeout(quiet).is_none());
        assert!(g.d.transport.error_count() >= 6);
        assert_eq!(g.d.status() & 0x40, 0, "not marked broken");
    }

    #[test]
    fn test_vsock_bad_connect_line_closes_host_stream() {
        let dir = TempDir::new("vsock");
        let (mut g, path) = Guest::new(&dir);
        let mut host = host_connect(&path, b"HELLO 52\n");
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(g.recv_timeout(Duration::from_millis(200)).is_none());
    }

    #[test]
    fn test_vsock_unanswered_request_times_out() {
        let dir = TempDir::new("vsock");
        let (mut g, path) = Guest::new(&dir);
        let mut host = host_connect(&path, b"CONNECT 1\n");
        assert_eq!(g.recv().0.op, OP_REQUEST);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed without OK");
        assert_eq!(g.recv().0.op, OP_RST);
    }

    #[test]
    fn test_vsock_device_reset_closes_host_streams() {
        let dir = TempDir::new("vsock");
        let (mut g, path) = Guest::new(&dir);
        let mut host = host_connect(&path, b"CONNECT 22\n");
        accept_host(&mut g, &mut host, 22, 4096);
        g.d.write32(0x70, 0);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        // The listener survives the reset.
        drop(g);
        assert!(!path.exists(), "the socket is removed with the device");
    }

    /// A device saved and started again from its transport's state takes the guest's receive
    /// buffers where the saved one stood, and serves its new socket.
    #[test]
    fn test_vsock_restored_transport_goes_on_where_it_was_saved() {
        use crate::virtio::mmio::MmioTransport;
        let dir = TempDir::new("vsock");
        let (mut g, path) = Guest::new(&dir);
        let mut host = host_connect(&path, b"CONNECT 22\n");
        accept_host(&mut g, &mut host, 22, 4096);
        let state = g.d.transport.save().unwrap();
        // The saved device's host streams are gone.
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        let again = dir.path().join("w.sock");
        let device = Vsock::new(CID, &again).unwrap();
        g.d.transport = MmioTransport::new(Box::new(device), g.d.mem.clone(), g.d.irq.clone());
        g.d.transport.restore(&state).unwrap();
        let mut host = host_connect(&again, b"CONNECT 22\n");
        accept_host(&mut g, &mut host, 22, 4096);
    }

    #[test]
    fn test_vsock_host_connect_before_driver_is_ready_waits() {
        let dir = TempDir::new("vsock");
        let path = dir.path().join("v.sock");
        let device = Vsock::new(CID, &path).unwrap();
        let mut host = host_connect(&path, b"CONNECT 22\nearly");
        std::thread::sleep(Duration::from_millis(100));
        let mut g = Guest::attach(device);
        accept_host(&mut g, &mut host, 22, 4096);
        let (h, data) = g.recv();
        assert_eq!((h.op, data.as_slice()), (OP_RW, &b"early"[..]));
    }
}
