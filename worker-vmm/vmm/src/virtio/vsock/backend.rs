//! The vsock worker thread: an epoll loop over the host Unix sockets and the driver's
//! notifications, moving packets between the virtqueues and the host streams.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::conn::{Conn, Key, State};
use super::packet::*;
use crate::virtio::device::Interrupt;

#[cfg(feature = "fuzzing")]
pub mod fuzz;
mod guest;
mod host;

const TOKEN_WAKE: u64 = 0;
const TOKEN_LISTENER: u64 = 1;
const RX: usize = 0;
const TX: usize = 1;
/// How long a host gets to send its CONNECT line, and the guest to answer a REQUEST.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECT_LINE: usize = 64;
/// Guest packets are not taken while this many answers wait for RX buffers.
const MAX_CONTROL_BACKLOG: usize = 1024;
/// Host-initiated connections get host ports from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

pub enum Command {
    Activate {
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    },
    Notify,
    Reset(Sender<()>),
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Interrupt,
}

/// A host client that has not yet sent its whole CONNECT line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum Slot {
    Handshake(Handshake),
    Conn(Key),
}

pub struct Backend {
    guest_cid: u64,
    uds_path: PathBuf,
    epoll: Epoll,
    wake: EventFd,
    listener: UnixListener,
    active: Option<Active>,
    slots: HashMap<u64, Slot>,
    conns: HashMap<Key, Conn>,
    control: VecDeque<(Key, u16, u32)>,
    next_token: u64,
    next_local_port: u32,
    /// Stream data on its way to an RX buffer ([`MAX_PAYLOAD`] bytes, kept from turn to turn).
    payload: Vec<u8>,
}

impl Backend {
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        wake: EventFd,
    ) -> io::Result<Backend> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Backend {
            guest_cid,
            uds_path,
            epoll,
            wake,
            listener,
            active: None,
            slots: HashMap::new(),
            conns: HashMap::new(),
            control: VecDeque::new(),
            next_token: 2,
            next_local_port: FIRST_LOCAL_PORT,
            payload: vec![0u8; MAX_PAYLOAD],
        })
    }

    /// Serve until the device is dropped (the command channel closes).
    pub fn run(mut self, commands: Receiver<Command>) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let timeout = if self.has_deadlines() { 200 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(err) => {
                    tracing::error!(%err, "vsock epoll failed; the device stops");
                    return;
                }
            };
            // Consume the wake-up before the commands, so that none sent after is missed.
            let _ = self.wake.read();
            loop {
                match commands.try_recv() {
                    Ok(Command::Activate {
                        mem,
                        queues,
                        interrupt,
                    }) => {
                        self.active = Some(Active {
                            mem,
                            queues,
                            interrupt,
                        })
                    }
                    Ok(Command::Notify) => {}
                    Ok(Command::Reset(done)) => {
                        self.reset();
                        let _ = done.send(());
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            for event in &events[..n] {
                match event.data() {
                    TOKEN_WAKE => {}
                    TOKEN_LISTENER => self.accept(),
                    token => self.host_event(token, event.event_set()),
                }
            }
            self.expire();
            self.pump();
        }
    }

    fn has_deadlines(&self) -> bool {
        self.slots.values().any(|s| matches!(s, Slot::Handshake(_)))
            || self
                .conns
                .values()
                .any(|c| matches!(c.state, State::Connecting { .. }))
    }

    fn reset(&mut self) {
        for (_, conn) in self.conns.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.slots.clear();
        self.control.clear();
        self.active = None;
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn count_error(&self) {
        if let Some(active) = &self.active {
            active.interrupt.count_error();
        }
    }

    /// Forget a connection (closing its host stream), telling the guest with RST if asked.
    fn close(&mut self, key: Key, rst: bool) {
        if let Some(conn) = self.conns.remove(&key) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.slots.remove(&conn.token);
        }
        // Without a driver there is no one to tell; a new driver starts with no connections.
        if rst && self.active.is_some() {
            self.control.push_back((key, OP_RST, 0));
        }
    }

    /// Move packets until nothing more can move, then interrupt the guest once.
    fn pump(&mut self) {
        let mut used = false;
        loop {
            let mut progress = self.process_tx();
            self.service_conns();
            progress |= self.process_rx();
            used |= progress;
            if !progress {
                break;
            }
        }
        if used && let Some(active) = &self.active {
            active.interrupt.signal_used();
        }
    }

    fn service_conns(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if let Err(err) = conn.flush_to_host() {
                tracing::debug!(%err, "vsock: host stream write failed");
                self.close(key, true);
                continue;
            }
            if conn.wants_credit_update() {
                conn.credit_update_queued = true;
                self.control.push_back((key, OP_CREDIT_UPDATE, 0));
            }
            let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
            let guest_done = conn.peer_shutdown & both == both;
            let all_done = conn.host_eof && conn.peer_shutdown & SHUTDOWN_SEND != 0;
            if conn.drained() && (guest_done || all_done) {
                self.close(key, true);
            } else if conn.has_data_for_guest()
                && conn.peer_credit() == 0
                && !conn.credit_request_queued
            {
                conn.credit_request_queued = true;
                self.control.push_back((key, OP_CREDIT_REQUEST, 0));
            }
        }
    }
}
