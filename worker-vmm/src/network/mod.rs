//! The guest network (issue 14): a per-job HTTP(S) proxy on the worker, its policy checks and
//! its cache.
//!
//! A guest has no network device. Its tasks' `http_proxy`/`https_proxy` point at a port inside
//! the guest whose connections the agent carries over the host channel; each arrives on the
//! worker as a byte stream (an SSH `forwarded-tcpip` channel) and is handed to
//! [`JobNetwork::serve`]. The proxy speaks HTTP/1.1 (hyper) on it:
//! - `CONNECT host:port` (https and anything else over TLS): checked, connected, answered 200,
//!   then bytes both ways, untouched (`tunnel.rs`);
//! - absolute-form `GET http://host/path` and the other methods: checked, forwarded in origin
//!   form over a connection the proxy opened, hop-by-hop headers removed, bodies streamed
//!   (`forward.rs`); Debian's immutable package files are served from and kept in the worker's
//!   cache (`cache.rs`);
//! - anything else (a request to the proxy itself, https:// in absolute form, a host:port target
//!   with another method) gets a 400 that says what to send.
//!
//! Every request's host and port must match the job's allow-list (`policy.rs`); names are
//! resolved on the worker and each address must be public unless the operator's `allow_private`
//! covers it; the connection goes to a checked address (`connect.rs`). A refusal is an answer of
//! the proxy's own whose body is also the job's log line (`refusal.rs`). Each job is bounded in
//! connections at once, bytes in all and idle time per connection (`limits.rs`); every
//! connection that was let through ends with one log line: targets, bytes each way, duration,
//! cache hits (`connection.rs`).
//!
//! Wiring, per job: `JobNetwork::new(allow, allow_private, NetworkLimits::from(&config.network),
//! cache.clone(), meter.clone(), log)`; for each forwarded channel, `tokio::spawn(network.clone().serve(stream))`
//! (or the like); `set_allow` around the packages step and source fetches; `close()` at the job's
//! end, which ends every connection. The worker opens one [`ProxyCache`] at start and reads
//! [`ProxyCache::stats`] for `/metrics`, beside its [`ProxyMeter`] of the bytes moved.

mod body;
mod cache;
mod connect;
mod connection;
mod forward;
mod limits;
mod meter;
mod policy;
mod proxy;
mod refusal;
mod tunnel;

pub use cache::{CacheError, ProxyCache};
pub use limits::NetworkLimits;
pub use meter::ProxyMeter;
pub use proxy::{FarmLog, JobNetwork};
pub use vmfarm_proto::wire::CacheStats;
#[cfg(test)]
mod test_utils;
