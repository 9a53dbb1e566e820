//! One stream between a host Unix socket and a guest port, with the spec's credit accounting.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{Header, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The receive buffer the host side offers each connection (its `buf_alloc`).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// A connection is named by its host-side port and its guest-side port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The host asked to connect; REQUEST sent, waiting for the guest's RESPONSE until then.
    Connecting {
        deadline: Instant,
    },
    Established,
}

pub struct Conn {
    pub stream: UnixStream,
    pub token: u64,
    pub state: State,
    /// Data from the guest the host socket has not taken yet (at most CONN_BUF_ALLOC bytes).
    to_host: VecDeque<u8>,
    /// Bytes that followed the CONNECT line, for the guest once connected.
    early: Vec<u8>,
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_sent: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Edge-triggered readiness: cleared when the socket says EAGAIN.
    pub host_readable: bool,
    pub host_writable: bool,
    pub host_eof: bool,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    pub credit_request_queued: bool,
    pub credit_update_queued: bool,
    write_shut: bool,
}

/// The guest sent more than the credit it was given.
#[derive(Debug)]
pub struct CreditExceeded;

impl Conn {
    pub fn new(stream: UnixStream, token: u64, state: State, early: Vec<u8>) -> Conn {
        Conn {
            stream,
            token,
            state,
            to_host: VecDeque::new(),
            early,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_readable: true,
            host_writable: true,
            host_eof: false,
            peer_shutdown: 0,
            credit_request_queued: false,
            credit_update_queued: false,
            write_shut: false,
        }
    }

    /// Record the credit information every guest packet carries.
    pub fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_request_queued = false;
        }
    }

    /// How many bytes the guest can still take.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Fill the credit fields of a packet to the guest.
    pub fn stamp(&mut self, h: &mut Header) {
        h.buf_alloc = CONN_BUF_ALLOC;
        h.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_sent = self.fwd_cnt;
        self.credit_update_queued = false;
    }

    /// Whether the guest may be waiting for credit that the host side has freed.
    pub fn wants_credit_update(&self) -> bool {
        let unreported = (self.rx_cnt - self.last_fwd_sent).0;
        self.fwd_cnt != self.last_fwd_sent
            && unreported > CONN_BUF_ALLOC / 2
            && !self.credit_update_queued
    }

    /// Take guest data for the host socket.
    pub fn push_to_host(&mut self, data: &[u8]) -> Result<(), CreditExceeded> {
        if self.to_host.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(CreditExceeded);
        }
        self.to_host.extend(data);
        self.rx_cnt += Wrapping(data.len() as u32);
        Ok(())
    }

    /// Write buffered guest data to the host socket until it would block.
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() && self.host_writable {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.host_writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.to_host.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            self.write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Everything the guest sent has reached the host socket.
    pub fn drained(&self) -> bool {
        self.to_host.is_empty()
    }

    /// Whether there is data for the guest and the guest can take some.
    pub fn has_data_for_guest(&self) -> bool {
        self.state == State::Established
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && (!self.early.is_empty() || (self.host_readable && !self.host_eof))
    }

    /// Read up to `buf.len()` bytes meant for the guest: Ok(0) is the host's end of stream.
    pub fn read_for_guest(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = if !self.early.is_empty() {
            let n = buf.len().min(self.early.len());
            buf[..n].copy_from_slice(&self.early[..n]);
            self.early.drain(..n);
            n
        } else {
            loop {
                match self.stream.read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            }
        };
        self.tx_cnt += Wrapping(n as u32);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        let (a, _b) = UnixStream::pair().unwrap();
        Conn::new(a, 7, State::Established, Vec::new())
    }

    #[test]
    fn test_conn_peer_credit_survives_counter_wrap() {
        let mut c = conn();
        c.tx_cnt = Wrapping(u32::MAX - 100);
        let h = Header {
            buf_alloc: 4096,
            fwd_cnt: u32::MAX - 1000,
            ..Header::default()
        };
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 4096 - 900);
        c.tx_cnt += Wrapping(1000);
        assert_eq!(c.peer_credit(), 4096 - 1900);
        // A guest that shrinks its buffer below what is in flight has no credit, not a wrap.
        let h = Header {
            buf_alloc: 10,
            fwd_cnt: u32::MAX - 1000,
            ..Header::default()
        };
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn test_conn_refuses_data_beyond_its_buffer() {
        let mut c = conn();
        c.host_writable = false;
        assert!(c.push_to_host(&vec![0u8; CONN_BUF_ALLOC as usize]).is_ok());
        assert!(c.push_to_host(&[0u8]).is_err());
        assert!(!c.wants_credit_update(), "nothing consumed yet");
    }
}
