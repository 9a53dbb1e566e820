//! The host side: accepting clients on the Unix socket, their `CONNECT` line, timeouts.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::{Backend, FIRST_LOCAL_PORT, HANDSHAKE_TIMEOUT, Handshake, MAX_CONNECT_LINE, Slot};
use crate::virtio::vsock::conn::{Conn, Key, State};
use crate::virtio::vsock::packet::OP_REQUEST;

impl Backend {
    pub(super) fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(err) = stream.set_nonblocking(true) {
                        tracing::warn!(%err, "vsock: cannot make a host stream non-blocking");
                        continue;
                    }
                    let token = self.token();
                    if self.register(&stream, token).is_ok() {
                        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
                        self.slots.insert(
                            token,
                            Slot::Handshake(Handshake {
                                stream,
                                line: Vec::new(),
                                deadline,
                            }),
                        );
                        self.read_handshake(token);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    tracing::warn!(%err, "vsock: accept failed");
                    return;
                }
            }
        }
    }

    pub(super) fn register(&self, stream: &UnixStream, token: u64) -> io::Result<()> {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(events, token),
            )
            .inspect_err(|err| tracing::warn!(%err, "vsock: epoll add failed"))
    }

    pub(super) fn host_event(&mut self, token: u64, events: EventSet) {
        match self.slots.get(&token) {
            Some(Slot::Handshake(_)) => self.read_handshake(token),
            Some(Slot::Conn(key)) => {
                if let Some(conn) = self.conns.get_mut(key) {
                    if events.intersects(
                        EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                    ) {
                        conn.host_readable = true;
                    }
                    if events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                        conn.host_writable = true;
                    }
                }
            }
            None => {}
        }
    }

    /// Read the host's `CONNECT <port>\n`; what follows it in the same read goes to the guest.
    fn read_handshake(&mut self, token: u64) {
        let Some(Slot::Handshake(hs)) = self.slots.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; 4096];
        let outcome = loop {
            match hs.stream.read(&mut buf) {
                Ok(0) => break Err("closed before CONNECT"),
                Ok(n) => {
                    hs.line.extend_from_slice(&buf[..n]);
                    if hs.line.contains(&b'\n') {
                        break Ok(());
                    }
                    if hs.line.len() > MAX_CONNECT_LINE {
                        break Err("CONNECT line too long");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err("read failed"),
            }
        };
        let Some(Slot::Handshake(hs)) = self.slots.remove(&token) else {
            return;
        };
        let port = outcome.and_then(|()| parse_connect(&hs.line));
        let (port, rest_at) = match port {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(why, "vsock: host connection refused");
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    hs.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
                return;
            }
        };
        let local_port = self.allocate_local_port(port);
        let key = Key {
            local_port,
            peer_port: port,
        };
        let early = hs.line[rest_at..].to_vec();
        let state = State::Connecting {
            deadline: Instant::now() + HANDSHAKE_TIMEOUT,
        };
        self.conns
            .insert(key, Conn::new(hs.stream, token, state, early));
        self.slots.insert(token, Slot::Conn(key));
        self.control.push_back((key, OP_REQUEST, 0));
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&Key {
                local_port: port,
                peer_port,
            }) {
                return port;
            }
        }
    }

    pub(super) fn expire(&mut self) {
        let now = Instant::now();
        let stale: Vec<u64> = self
            .slots
            .iter()
            .filter_map(|(&t, s)| matches!(s, Slot::Handshake(h) if h.deadline <= now).then_some(t))
            .collect();
        for token in stale {
            if let Some(Slot::Handshake(hs)) = self.slots.remove(&token) {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    hs.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        let late: Vec<Key> = self
            .conns
            .iter()
            .filter_map(|(&k, c)| {
                matches!(c.state, State::Connecting { deadline } if deadline <= now).then_some(k)
            })
            .collect();
        for key in late {
            tracing::debug!(
                port = key.peer_port,
                "vsock: the guest did not answer a connection request"
            );
            self.close(key, true);
        }
    }
}

/// `CONNECT <port>\n`: the port and where the bytes after the line start.
fn parse_connect(line: &[u8]) -> Result<(u32, usize), &'static str> {
    let end = line.iter().position(|&b| b == b'\n').ok_or("no newline")?;
    let text = std::str::from_utf8(&line[..end]).map_err(|_| "not UTF-8")?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("CONNECT ").ok_or("not a CONNECT line")?;
    let port = port.trim().parse().map_err(|_| "bad port")?;
    Ok((port, end + 1))
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn test_parse_connect_line_and_following_bytes() {
        assert_eq!(parse_connect(b"CONNECT 22\nSSH-2.0"), Ok((22, 11)));
        assert_eq!(parse_connect(b"CONNECT 1024\r\n"), Ok((1024, 14)));
        assert!(parse_connect(b"CONNECT\n").is_err());
        assert!(parse_connect(b"CONNECT -1\n").is_err());
        assert!(parse_connect(b"CONNECT 99999999999\n").is_err());
        assert!(parse_connect(b"connect 22\n").is_err());
        assert!(parse_connect(b"\xff\n").is_err());
    }
}
