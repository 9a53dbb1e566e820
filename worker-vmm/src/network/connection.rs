//! One connection from the guest: its traffic, what it asked for, the origin connection it keeps
//! for its next request, the tunnel it became, and the farm log line at its end.

use hyper::Response;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use vmfarm_proto::units::{ByteSize, GIB, KIB, MIB, format_duration};

use super::body::{self, ProxyBody};
use super::forward::Upstream;
use super::limits::Traffic;
use super::policy::Target;
use super::proxy::Shared;
use super::refusal::Refusal;
use super::tunnel::PendingTunnel;

/// Targets named in a connection's log line; more are counted.
const LISTED_TARGETS: usize = 4;

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// The guest or the origin closed it, or an error did.
    Done,
    /// No byte moved for the idle timeout.
    Idle,
    /// The job ended (`JobNetwork::close`).
    Closed,
}

pub(super) struct Connection {
    pub(super) job: Arc<Shared>,
    pub(super) traffic: Arc<Traffic>,
    /// Bytes sent to the guest from the cache.
    pub(super) cache_bytes: Arc<AtomicU64>,
    summary: Mutex<Summary>,
    upstream: Mutex<Option<Upstream>>,
    tunnel: Mutex<Option<PendingTunnel>>,
}

/// What a connection was allowed to do.
#[derive(Debug, Default)]
struct Summary {
    targets: Vec<Target>,
    more_targets: usize,
    requests: u64,
    hits: u64,
    tunnel: bool,
}

impl Summary {
    fn add_target(&mut self, target: &Target) {
        if self.targets.contains(target) {
            return;
        }
        if self.targets.len() < LISTED_TARGETS {
            self.targets.push(target.clone());
        } else {
            self.more_targets += 1;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Connection {
    pub(super) fn new(job: Arc<Shared>, traffic: Arc<Traffic>) -> Connection {
        Connection {
            job,
            traffic,
            cache_bytes: Arc::new(AtomicU64::new(0)),
            summary: Mutex::new(Summary::default()),
            upstream: Mutex::new(None),
            tunnel: Mutex::new(None),
        }
    }

    /// An http request to `target` was let through; `hit`: answered from the cache.
    pub(super) fn note_request(&self, target: &Target, hit: bool) {
        let mut summary = lock(&self.summary);
        summary.add_target(target);
        summary.requests += 1;
        summary.hits += u64::from(hit);
    }

    /// The connection becomes a tunnel to `target`, which it stays until its end.
    pub(super) fn set_tunnel(&self, target: &Target, tunnel: PendingTunnel) {
        let mut summary = lock(&self.summary);
        summary.add_target(target);
        summary.tunnel = true;
        *lock(&self.tunnel) = Some(tunnel);
    }

    pub(super) fn take_tunnel(&self) -> Option<PendingTunnel> {
        lock(&self.tunnel).take()
    }

    /// The origin connection kept from the last request, if it goes to `target`.
    pub(super) fn take_upstream(&self, target: &Target) -> Option<Upstream> {
        let mut slot = lock(&self.upstream);
        match slot.take() {
            Some(upstream) if upstream.target() == target => Some(upstream),
            _ => None,
        }
    }

    /// Keeps `upstream` for the next request (one at a time: HTTP/1.1 answers in order).
    pub(super) fn keep_upstream(&self, upstream: Upstream) {
        *lock(&self.upstream) = Some(upstream);
    }

    /// The proxy's own answer for `refusal`, which also goes to the job's log.
    pub(super) fn refuse(&self, refusal: &Refusal) -> Response<ProxyBody> {
        let text = refusal.to_string();
        (self.job.log)(&text);
        body::message(refusal.status(), &text)
    }

    /// The farm log line for the end of the connection, if anything was let through.
    pub(super) fn end_line(&self, ending: Ending) -> Option<String> {
        let summary = lock(&self.summary);
        if summary.targets.is_empty() {
            return None;
        }
        let mut targets: Vec<String> = summary.targets.iter().map(Target::to_string).collect();
        if summary.more_targets > 0 {
            targets.push(format!("{} more", summary.more_targets));
        }
        let what = if summary.tunnel {
            "tunnel".to_owned()
        } else {
            let requests = plural(summary.requests, "request");
            match summary.hits {
                0 => format!("{requests}, none from the cache"),
                hits => format!(
                    "{requests}, {hits} from the cache ({})",
                    human_bytes(self.cache_bytes.load(Ordering::Relaxed))
                ),
            }
        };
        let limits = &self.job.limits;
        let how = if self.traffic.was_cut() {
            format!(
                "; cut at the job's network byte limit of {} (network.max_bytes_per_job in the worker's config)",
                ByteSize(limits.max_bytes)
            )
        } else {
            match ending {
                Ending::Done => String::new(),
                Ending::Idle => format!(
                    "; closed after {} without traffic (network.idle_timeout in the worker's config)",
                    format_duration(limits.idle_timeout)
                ),
                Ending::Closed => "; closed at the job's end".to_owned(),
            }
        };
        Some(format!(
            "network {}: {what}; the guest sent {}, received {} in {}{how}",
            targets.join(", "),
            human_bytes(self.traffic.sent_by_guest()),
            human_bytes(self.traffic.received_by_guest()),
            seconds(self.traffic.elapsed()),
        ))
    }
}

fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `512 B`, `1.5 KiB`, `64.0 MiB`.
fn human_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if n >= size {
            return format!("{:.1} {unit}", n as f64 / size as f64);
        }
    }
    format!("{n} B")
}

fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_human_bytes() {
        let cases = [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (64 * MIB, "64.0 MiB"),
            (3 * GIB / 2, "1.5 GiB"),
        ];
        for (n, want) in cases {
            assert_eq!(human_bytes(n), want);
        }
    }
}
