//! For the fuzz targets only (feature `fuzzing`): the vsock device's worker driven step by step
//! by a script the fuzzer writes, playing both a guest driver and host clients of the socket.
//!
//! The script is a list of [`Op`]s (packets on the TX queue, raw descriptor chains, RX buffers,
//! host clients that connect, write, read and close, the guest's connections accepted on the
//! host, device resets). After each, the worker takes one turn of its event loop as `run` does
//! (the host sockets' events, the deadlines, moving packets), without waiting.
//!
//! Beyond the absence of crashes: every packet the device puts in an RX buffer fits the buffer,
//! comes from the host's CID to the guest's, is a stream packet, and its header's length is
//! the payload it carries.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EpollEvent;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Active, Backend, TOKEN_LISTENER, TOKEN_WAKE};
use crate::fuzzing::{NoIrq, scratch_dir};
use crate::virtio::device::Interrupt;
use crate::virtio::test_utils::TestQueue;
use crate::virtio::vsock::packet::*;

const MEM_SIZE: usize = 256 << 10;
const QUEUE_SIZE: u16 = 16;
/// The guest's CID.
pub const CID: u64 = 3;
/// The host port on which the harness listens for the guest's connections (`<socket>_1234`).
pub const LISTEN_PORT: u32 = 1234;
const TX_AREA: u64 = 0x1000;
const TX_SLOT: u64 = 0x2000;
const TX_SLOTS: u64 = 8;
const RX_AREA: u64 = TX_AREA + TX_SLOT * TX_SLOTS;
const RX_SLOT: u64 = 0x1000;
const MAX_CLIENTS: usize = 16;
const MAX_OPS: usize = 64;

/// One step of the script.
#[derive(Clone, Debug)]
pub enum Op {
    /// A packet on the TX queue: its header, its payload, and how the descriptors split them
    /// (0: header and payload apart, 1: one descriptor, 2: the header itself in two).
    Tx {
        layout: u8,
        header: Header,
        payload: Vec<u8>,
    },
    /// Descriptors as given `(addr, len, flags, next)`, the first as the head of a TX chain.
    TxRaw(Vec<(u64, u32, u16, u16)>),
    /// RX buffers of this length (as many as the queue has room for, up to `count`).
    Rx { count: u8, len: u16 },
    /// A host client connects to the device's socket and writes these bytes.
    Connect(Vec<u8>),
    /// Client `client` writes these bytes, or `bulk` bytes of a pattern.
    Write {
        client: u8,
        data: Vec<u8>,
        bulk: u32,
    },
    /// Client `client` reads what it can.
    Read { client: u8 },
    /// Client `client` shuts its writing side (0), its reading side (1), or closes (2).
    Close { client: u8, how: u8 },
    /// The host accepts a connection the guest made to [`LISTEN_PORT`].
    Accept,
    /// The driver resets the device and sets it up again.
    Reset,
}

/// Reads the script: values past the end of the input are zeros.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.bytes(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

impl Op {
    fn decode(c: &mut Cursor<'_>) -> Op {
        match c.u8() % 9 {
            0 => {
                let layout = c.u8() % 3;
                let header = Header::from_bytes(&c.array());
                let max = (TX_SLOT as usize - HEADER_LEN).min(header.len as usize);
                let payload = c.bytes(max).to_vec();
                Op::Tx {
                    layout,
                    header,
                    payload,
                }
            }
            1 => {
                let n = 1 + c.u8() % 4;
                let descs = (0..n)
                    .map(|_| (c.u64(), c.u32(), c.u16(), c.u16()))
                    .collect();
                Op::TxRaw(descs)
            }
            2 => Op::Rx {
                count: c.u8(),
                len: c.u16(),
            },
            3 => {
                let n = c.u8() as usize % 96;
                Op::Connect(c.bytes(n).to_vec())
            }
            4 => {
                let client = c.u8();
                let n = c.u16() as usize;
                let bulk = c.u32() % (512 << 10);
                Op::Write {
                    client,
                    data: c.bytes(n).to_vec(),
                    bulk,
                }
            }
            5 => Op::Read { client: c.u8() },
            6 => Op::Close {
                client: c.u8(),
                how: c.u8(),
            },
            7 => Op::Accept,
            _ => Op::Reset,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Tx {
                layout,
                header,
                payload,
            } => {
                out.extend([0, *layout]);
                out.extend(header.to_bytes());
                out.extend(payload);
            }
            Op::TxRaw(descs) => {
                out.extend([1, descs.len() as u8 - 1]);
                for &(addr, len, flags, next) in descs {
                    out.extend(addr.to_le_bytes());
                    out.extend(len.to_le_bytes());
                    out.extend(flags.to_le_bytes());
                    out.extend(next.to_le_bytes());
                }
            }
            Op::Rx { count, len } => {
                out.extend([2, *count]);
                out.extend(len.to_le_bytes());
            }
            Op::Connect(line) => {
                out.extend([3, line.len() as u8]);
                out.extend(line);
            }
            Op::Write { client, data, bulk } => {
                out.extend([4, *client]);
                out.extend((data.len() as u16).to_le_bytes());
                out.extend(bulk.to_le_bytes());
                out.extend(data);
            }
            Op::Read { client } => out.extend([5, *client]),
            Op::Close { client, how } => out.extend([6, *client, *how]),
            Op::Accept => out.push(7),
            Op::Reset => out.push(8),
        }
    }
}

/// The guest side of the harness: memory, the three queues, and the RX buffers in flight.
struct Driver {
    mem: GuestMemoryMmap,
    queues: [TestQueue; 3],
    /// Buffer length of each RX descriptor slot in flight, by head index.
    rx_len: [u32; QUEUE_SIZE as usize],
    rx_in_flight: u16,
    tx_next: u64,
}

impl Driver {
    fn new(mem: GuestMemoryMmap) -> Driver {
        let queue =
            |i: u64| TestQueue::at(i * 0x400, i * 0x400 + 0x100, i * 0x400 + 0x200, QUEUE_SIZE);
        Driver {
            mem,
            queues: [queue(0), queue(1), queue(2)],
            rx_len: [0; QUEUE_SIZE as usize],
            rx_in_flight: 0,
            tx_next: 0,
        }
    }

    fn activate(&self, backend: &mut Backend) {
        backend.active = Some(Active {
            mem: self.mem.clone(),
            queues: self.queues.iter().map(TestQueue::device_queue).collect(),
            interrupt: Interrupt::new(Arc::new(NoIrq)),
        });
    }

    /// Check each packet the device returned in an RX buffer.
    fn check_rx(&mut self) {
        while let Some((head, len)) = self.queues[0].pop_used(&self.mem) {
            self.rx_in_flight = self
                .rx_in_flight
                .checked_sub(1)
                .expect("the device returned an RX buffer it was not given");
            let slot = head as usize % QUEUE_SIZE as usize;
            if len == 0 {
                continue;
            }
            let (len, room) = (len as usize, self.rx_len[slot] as usize);
            assert!(
                (HEADER_LEN..=room).contains(&len),
                "a packet of {len} bytes in an RX buffer of {room}"
            );
            let mut raw = [0u8; HEADER_LEN];
            let at = RX_AREA + slot as u64 * RX_SLOT;
            self.mem
                .read_slice(&mut raw, GuestAddress(at))
                .expect("in memory");
            let h = Header::from_bytes(&raw);
            assert_eq!((h.src_cid, h.dst_cid, h.kind), (HOST_CID, CID, TYPE_STREAM));
            assert_eq!(h.len as usize, len - HEADER_LEN, "{h:?}");
        }
    }
}

/// Runs one turn of the worker's event loop, as `Backend::run` does, without waiting.
fn turn(backend: &mut Backend, driver: &mut Driver) {
    let mut events = vec![EpollEvent::default(); 64];
    let n = backend.epoll.wait(0, &mut events).unwrap_or(0);
    let _ = backend.wake.read();
    for event in &events[..n] {
        match event.data() {
            TOKEN_WAKE => {}
            TOKEN_LISTENER => backend.accept(),
            token => backend.host_event(token, event.event_set()),
        }
    }
    backend.expire();
    backend.pump();
    driver.check_rx();
}

/// Where this process's sockets live.
fn socket_dir() -> PathBuf {
    let dir = scratch_dir().join(format!("vmfarm-fuzz-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

/// Runs the script `data` encodes (see the module documentation).
pub fn script(data: &[u8]) {
    let dir = socket_dir();
    let path = dir.join("v.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind the device's socket");
    listener.set_nonblocking(true).expect("non-blocking");
    let port_path = dir.join(format!("v.sock_{LISTEN_PORT}"));
    let _ = std::fs::remove_file(&port_path);
    let guest_conns = UnixListener::bind(&port_path).expect("bind the port socket");
    guest_conns.set_nonblocking(true).expect("non-blocking");
    let wake = EventFd::new(EFD_NONBLOCK).expect("an eventfd");
    let mut backend = Backend::new(CID, path.clone(), listener, wake.try_clone().expect("dup"))
        .expect("the backend");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let mut driver = Driver::new(mem);
    driver.activate(&mut backend);
    let mut clients: Vec<UnixStream> = Vec::new();
    let mut cursor = Cursor(data);
    // What the host clients write in bulk, and where they read to.
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut buf = [0u8; 16 << 10];
    for _ in 0..MAX_OPS {
        if cursor.0.is_empty() {
            break;
        }
        let client = |clients: &mut Vec<UnixStream>, i: u8| {
            let n = clients.len();
            (n > 0).then(|| i as usize % n)
        };
        match Op::decode(&mut cursor) {
            Op::Tx {
                layout,
                header,
                payload,
            } => {
                let at = TX_AREA + (driver.tx_next % TX_SLOTS) * TX_SLOT;
                driver.tx_next += 1;
                let mem = &driver.mem;
                mem.write_slice(&header.to_bytes(), GuestAddress(at))
                    .expect("in memory");
                let data_at = at + HEADER_LEN as u64;
                mem.write_slice(&payload, GuestAddress(data_at))
                    .expect("in memory");
                let (h, p) = (HEADER_LEN as u32, payload.len() as u32);
                let bufs: Vec<(u64, u32, bool)> = match layout {
                    0 if p > 0 => vec![(at, h, false), (data_at, p, false)],
                    0 | 1 => vec![(at, h + p, false)],
                    _ => vec![(at, 20, false), (at + 20, h - 20 + p, false)],
                };
                driver.queues[1].add(mem, &bufs);
            }
            Op::TxRaw(descs) => {
                driver.queues[1].add_raw(&driver.mem, &descs);
            }
            Op::Rx { count, len } => {
                let len = u32::from(len) % (RX_SLOT as u32 + 1);
                for _ in 0..count % 8 + 1 {
                    if driver.rx_in_flight == QUEUE_SIZE {
                        break;
                    }
                    let slot = driver.queues[0].next_slot();
                    let at = RX_AREA + u64::from(slot) * RX_SLOT;
                    driver.queues[0].add(&driver.mem, &[(at, len, true)]);
                    driver.rx_len[slot as usize] = len;
                    driver.rx_in_flight += 1;
                }
            }
            Op::Connect(line) => {
                if clients.len() < MAX_CLIENTS
                    && let Ok(mut s) = UnixStream::connect(&path)
                {
                    s.set_nonblocking(true).expect("non-blocking");
                    let _ = s.write(&line);
                    clients.push(s);
                }
            }
            Op::Write {
                client: i,
                data,
                bulk,
            } => {
                if let Some(i) = client(&mut clients, i) {
                    let _ = clients[i].write(&data);
                    let mut left = bulk as usize;
                    while left > 0 {
                        let n = left.min(ZEROS.len());
                        match clients[i].write(&ZEROS[..n]) {
                            Ok(k) if k > 0 => left -= k,
                            _ => break,
                        }
                    }
                }
            }
            Op::Read { client: i } => {
                if let Some(i) = client(&mut clients, i) {
                    while let Ok(n) = clients[i].read(&mut buf)
                        && n > 0
                    {}
                }
            }
            Op::Close { client: i, how } => {
                if let Some(i) = client(&mut clients, i) {
                    match how % 3 {
                        0 => {
                            let _ = clients[i].shutdown(std::net::Shutdown::Write);
                        }
                        1 => {
                            let _ = clients[i].shutdown(std::net::Shutdown::Read);
                        }
                        _ => drop(clients.swap_remove(i)),
                    }
                }
            }
            Op::Accept => {
                if clients.len() < MAX_CLIENTS
                    && let Ok((s, _)) = guest_conns.accept()
                {
                    s.set_nonblocking(true).expect("non-blocking");
                    clients.push(s);
                }
            }
            Op::Reset => {
                backend.reset();
                driver
                    .mem
                    .write_slice(&[0u8; 0xc00], GuestAddress(0))
                    .expect("in memory");
                driver = Driver::new(driver.mem.clone());
                driver.activate(&mut backend);
            }
        }
        turn(&mut backend, &mut driver);
    }
    drop(backend);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&port_path);
    let _ = std::fs::remove_dir(&dir);
}

/// The seed corpus: the exchanges of the device's tests, as scripts.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    /// A packet from guest port `port` to host port `host`, offering `buf_alloc` of credit.
    fn packet(op: u16, port: u32, host: u32, buf_alloc: u32, fwd_cnt: u32, payload: &[u8]) -> Op {
        Op::Tx {
            layout: 0,
            header: Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port: port,
                dst_port: host,
                len: payload.len() as u32,
                kind: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc,
                fwd_cnt,
            },
            payload: payload.to_vec(),
        }
    }
    fn shutdown(port: u32, host: u32, flags: u32) -> Op {
        let mut op = packet(OP_SHUTDOWN, port, host, 4096, 0, &[]);
        if let Op::Tx { header, .. } = &mut op {
            header.flags = flags;
        }
        op
    }
    let rx = Op::Rx {
        count: 7,
        len: 4096,
    };
    // The device numbers the host's connections from 2^30 on.
    let host_port = super::FIRST_LOCAL_PORT;
    let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
    let scripts: Vec<(&str, Vec<Op>)> = vec![
        (
            "host-connect",
            vec![
                rx.clone(),
                Op::Connect(b"CONNECT 52\nhello".to_vec()),
                packet(OP_RESPONSE, 52, host_port, 65536, 0, &[]),
                Op::Read { client: 0 },
                packet(OP_RW, 52, host_port, 65536, 0, b"from the guest"),
                Op::Write {
                    client: 0,
                    data: b"from the host".to_vec(),
                    bulk: 0,
                },
                rx.clone(),
                Op::Read { client: 0 },
                packet(OP_CREDIT_UPDATE, 52, host_port, 65536, 18, &[]),
                shutdown(52, host_port, both),
                rx.clone(),
            ],
        ),
        (
            "guest-connect",
            vec![
                rx.clone(),
                packet(OP_REQUEST, 5000, LISTEN_PORT, 262_144, 0, &[]),
                Op::Accept,
                packet(OP_RW, 5000, LISTEN_PORT, 262_144, 0, &[7; 300]),
                Op::Read { client: 0 },
                Op::Write {
                    client: 0,
                    data: b"answer".to_vec(),
                    bulk: 20_000,
                },
                rx.clone(),
                packet(OP_CREDIT_REQUEST, 5000, LISTEN_PORT, 262_144, 0, &[]),
                rx.clone(),
                shutdown(5000, LISTEN_PORT, SHUTDOWN_SEND),
                Op::Close { client: 0, how: 0 },
                rx.clone(),
            ],
        ),
        (
            "credit",
            vec![
                rx.clone(),
                Op::Connect(b"CONNECT 80\n".to_vec()),
                packet(OP_RESPONSE, 80, host_port, 8192, 0, &[]),
                Op::Write {
                    client: 0,
                    data: Vec::new(),
                    bulk: 65536,
                },
                rx.clone(),
                rx.clone(),
                packet(OP_CREDIT_UPDATE, 80, host_port, 8192, 8192, &[]),
                rx.clone(),
                packet(OP_RW, 80, host_port, 8192, 8192, &[1; 4000]),
                packet(OP_RW, 80, host_port, 8192, 8192, &[2; 4000]),
            ],
        ),
        (
            "malformed",
            vec![
                rx.clone(),
                Op::Tx {
                    layout: 1,
                    header: Header {
                        src_cid: 4,
                        ..Header::default()
                    },
                    payload: Vec::new(),
                },
                Op::TxRaw(vec![(TX_AREA, 20, 0, 0)]),
                packet(99, 9, 10, 4096, 0, &[]),
                packet(OP_RW, 9, 10, 4096, 0, &[1, 2, 3]),
                Op::TxRaw(vec![(u64::MAX - 8, 64, 0, 0)]),
                Op::TxRaw(vec![(TX_AREA, 44, 2, 0)]),
                Op::TxRaw(vec![(TX_AREA, 16, 1, 1), (TX_AREA + 16, 28, 1, 0)]),
                Op::Rx { count: 2, len: 10 },
                Op::Connect(b"HELLO 52\n".to_vec()),
                Op::Connect(b"CONNECT 1".to_vec()),
                Op::Write {
                    client: 1,
                    data: b"024\r\n".to_vec(),
                    bulk: 0,
                },
            ],
        ),
        (
            "reset",
            vec![
                rx.clone(),
                Op::Connect(b"CONNECT 22\n".to_vec()),
                packet(OP_RESPONSE, 22, host_port, 4096, 0, &[]),
                Op::Reset,
                rx,
                Op::Connect(b"CONNECT 22\nearly".to_vec()),
                Op::Read { client: 0 },
                Op::Close { client: 1, how: 2 },
            ],
        ),
    ];
    scripts
        .into_iter()
        .map(|(name, ops)| {
            let mut bytes = Vec::new();
            for op in &ops {
                op.encode(&mut bytes);
            }
            (name, bytes)
        })
        .collect()
}
