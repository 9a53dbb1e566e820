//! The bytes every job's proxy moved, for the worker's metrics: one meter per worker, shared by
//! its jobs' networks, added to as each connection ends.

use prometheus_client::metrics::counter::Counter;

#[derive(Debug, Clone, Default)]
pub struct ProxyMeter {
    /// Bytes guests sent through the proxy (requests, and what they sent through tunnels).
    pub from_guests: Counter,
    /// Bytes the proxy sent to guests (answers, from origins or the cache, and tunnels).
    pub to_guests: Counter,
    /// Connections guests opened to the proxy.
    pub connections: Counter,
}

impl ProxyMeter {
    /// One connection ended, having moved these bytes.
    pub(super) fn connection_ended(&self, from_guest: u64, to_guest: u64) {
        self.connections.inc();
        self.from_guests.inc_by(from_guest);
        self.to_guests.inc_by(to_guest);
    }
}
