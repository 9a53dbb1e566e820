//! The guest side: packets from the TX queue, and filling the RX queue.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Backend, MAX_CONTROL_BACKLOG, RX, Slot, TX};
use crate::virtio::chain::{Chain, next_chain};
use crate::virtio::vsock::conn::{Conn, Key, State};
use crate::virtio::vsock::packet::*;

impl Backend {
    /// Take the guest's packets from the TX queue; true if any was consumed.
    pub(super) fn process_tx(&mut self) -> bool {
        let mut consumed = false;
        while self.control.len() < MAX_CONTROL_BACKLOG {
            let Some(active) = &mut self.active else {
                break;
            };
            if active.interrupt.needs_reset() {
                break;
            }
            let Some(queue) = active.queues.get_mut(TX) else {
                break;
            };
            let chain = match next_chain(queue, &active.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(err) => {
                    active
                        .interrupt
                        .set_needs_reset(&format!("vsock tx queue: {err:?}"));
                    break;
                }
            };
            let head = chain.head_index();
            let packet = Chain::parse(chain, &active.mem, (HEADER_LEN + MAX_PAYLOAD) as u64)
                .map_err(|err| err.to_string())
                .and_then(|chain| read_packet(&chain, &active.mem));
            if let Err(err) = queue.add_used(&active.mem, head, 0) {
                active
                    .interrupt
                    .set_needs_reset(&format!("vsock tx used ring: {err:?}"));
                break;
            }
            consumed = true;
            match packet {
                Ok((header, data)) => self.handle_packet(header, data),
                Err(why) => {
                    self.count_error();
                    tracing::warn!(why, "vsock: malformed packet from the guest dropped");
                }
            }
        }
        consumed
    }

    fn handle_packet(&mut self, h: Header, data: Vec<u8>) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            self.count_error();
            tracing::warn!(
                src = h.src_cid,
                dst = h.dst_cid,
                "vsock: packet with wrong addresses dropped"
            );
            return;
        }
        let key = Key {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if h.kind != TYPE_STREAM || data.len() != h.len as usize {
            self.count_error();
            tracing::warn!(
                kind = h.kind,
                len = h.len,
                "vsock: bad packet type or length"
            );
            if h.op != OP_RST {
                self.control.push_back((key, OP_RST, 0));
            }
            return;
        }
        if h.op == OP_REQUEST {
            self.guest_connect(key, &h);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.control.push_back((key, OP_RST, 0));
            }
            return;
        };
        conn.update_peer_credit(&h);
        match (h.op, conn.state) {
            (OP_RESPONSE, State::Connecting { .. }) => {
                conn.state = State::Established;
                let line = format!("OK {}\n", key.local_port);
                if conn.stream.write_all(line.as_bytes()).is_err() {
                    self.close(key, true);
                }
            }
            (OP_RST, _) => self.close(key, false),
            (OP_SHUTDOWN, State::Established) => {
                conn.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
            }
            (OP_RW, State::Established) => {
                if conn.peer_shutdown & SHUTDOWN_SEND != 0 || conn.push_to_host(&data).is_err() {
                    self.count_error();
                    tracing::warn!(
                        port = key.peer_port,
                        "vsock: guest sent beyond its credit or after shutdown"
                    );
                    self.close(key, true);
                }
            }
            (OP_CREDIT_UPDATE, State::Established) => {}
            (OP_CREDIT_REQUEST, State::Established) => {
                if !conn.credit_update_queued {
                    conn.credit_update_queued = true;
                    self.control.push_back((key, OP_CREDIT_UPDATE, 0));
                }
            }
            (op, state) => {
                self.count_error();
                tracing::warn!(op, ?state, "vsock: unexpected packet; connection reset");
                self.close(key, true);
            }
        }
    }

    /// The guest connects to host port P: forward to the Unix socket `<path>_P`.
    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.conns.contains_key(&key) {
            self.count_error();
            self.close(key, true);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        let stream = UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s));
        let stream = match stream {
            Ok(s) => s,
            Err(err) => {
                tracing::debug!(%err, port = key.local_port, "vsock: guest connection refused");
                self.control.push_back((key, OP_RST, 0));
                return;
            }
        };
        let token = self.token();
        if self.register(&stream, token).is_err() {
            self.control.push_back((key, OP_RST, 0));
            return;
        }
        let mut conn = Conn::new(stream, token, State::Established, Vec::new());
        conn.update_peer_credit(h);
        self.conns.insert(key, conn);
        self.slots.insert(token, Slot::Conn(key));
        self.control.push_back((key, OP_RESPONSE, 0));
    }

    /// Fill the guest's RX buffers: answers first, then stream data; true if any was used.
    pub(super) fn process_rx(&mut self) -> bool {
        let Some(active) = &mut self.active else {
            return false;
        };
        if active.interrupt.needs_reset() {
            return false;
        }
        let mut used = false;
        let mut keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.has_data_for_guest())
            .map(|(k, _)| *k)
            .collect();
        let payload = &mut self.payload;
        let mut broken = Vec::new();
        loop {
            let from_control = !self.control.is_empty();
            if !from_control {
                keys.retain(|k| {
                    self.conns
                        .get(k)
                        .is_some_and(|c| c.has_data_for_guest() && c.peer_credit() > 0)
                });
                if keys.is_empty() {
                    break;
                }
            }
            let Some(queue) = active.queues.get_mut(RX) else {
                break;
            };
            let chain = match next_chain(queue, &active.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(err) => {
                    active
                        .interrupt
                        .set_needs_reset(&format!("vsock rx queue: {err:?}"));
                    break;
                }
            };
            let head = chain.head_index();
            let chain = match Chain::parse(chain, &active.mem, u64::from(u32::MAX)) {
                Ok(c) if c.writable_len() >= HEADER_LEN as u64 => c,
                other => {
                    active.interrupt.count_error();
                    tracing::warn!(error = ?other.err(), "vsock: unusable RX buffer");
                    if let Err(err) = queue.add_used(&active.mem, head, 0) {
                        active
                            .interrupt
                            .set_needs_reset(&format!("vsock rx used ring: {err:?}"));
                        break;
                    }
                    used = true;
                    continue;
                }
            };
            let mut h = Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                kind: TYPE_STREAM,
                ..Header::default()
            };
            let mut len = 0usize;
            if let Some((key, op, flags)) = self.control.pop_front() {
                (h.src_port, h.dst_port, h.op, h.flags) =
                    (key.local_port, key.peer_port, op, flags);
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.stamp(&mut h);
                }
            } else {
                let key = keys[0];
                keys.rotate_left(1);
                let Some(conn) = self.conns.get_mut(&key) else {
                    continue;
                };
                let room =
                    (chain.writable_len() - HEADER_LEN as u64).min(MAX_PAYLOAD as u64) as usize;
                let cap = room.min(conn.peer_credit() as usize);
                if cap == 0 {
                    queue.go_to_previous_position();
                    break;
                }
                (h.src_port, h.dst_port) = (key.local_port, key.peer_port);
                match conn.read_for_guest(&mut payload[..cap]) {
                    Ok(0) => {
                        queue.go_to_previous_position();
                        conn.host_eof = true;
                        self.control.push_back((key, OP_SHUTDOWN, SHUTDOWN_SEND));
                        continue;
                    }
                    Ok(n) => {
                        h.op = OP_RW;
                        h.len = n as u32;
                        len = n;
                        conn.stamp(&mut h);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        queue.go_to_previous_position();
                        conn.host_readable = false;
                        continue;
                    }
                    Err(err) => {
                        queue.go_to_previous_position();
                        tracing::debug!(%err, "vsock: host stream read failed");
                        broken.push(key);
                        keys.retain(|k| *k != key);
                        continue;
                    }
                }
            }
            let written = chain
                .write_at(&active.mem, 0, &h.to_bytes())
                .and_then(|()| chain.write_at(&active.mem, HEADER_LEN as u64, &payload[..len]));
            let used_len = match written {
                Ok(()) => (HEADER_LEN + len) as u32,
                Err(err) => {
                    active.interrupt.count_error();
                    tracing::warn!(%err, "vsock: writing an RX buffer failed");
                    0
                }
            };
            if let Err(err) = queue.add_used(&active.mem, head, used_len) {
                active
                    .interrupt
                    .set_needs_reset(&format!("vsock rx used ring: {err:?}"));
                break;
            }
            used = true;
        }
        for key in broken {
            self.close(key, true);
        }
        used
    }
}

/// A packet's header and payload, checked against the chain's length.
fn read_packet(chain: &Chain, mem: &GuestMemoryMmap) -> Result<(Header, Vec<u8>), String> {
    if chain.readable_len() < HEADER_LEN as u64 {
        return Err(format!(
            "{} bytes, shorter than a header",
            chain.readable_len()
        ));
    }
    let mut raw = [0u8; HEADER_LEN];
    chain.read_at(mem, 0, &mut raw).map_err(|e| e.to_string())?;
    let h = Header::from_bytes(&raw);
    let len = h.len as usize;
    if len > MAX_PAYLOAD || (HEADER_LEN + len) as u64 > chain.readable_len() {
        // The payload is dropped; handle_packet sees the length mismatch and resets.
        return Ok((h, Vec::new()));
    }
    let mut data = vec![0u8; len];
    chain
        .read_at(mem, HEADER_LEN as u64, &mut data)
        .map_err(|e| e.to_string())?;
    Ok((h, data))
}
