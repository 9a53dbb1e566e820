//! Leases: how a worker takes a job ([`take`]), keeps it and reports on it ([`update`]), and
//! loses it when it stops renewing ([`reaper`]). Every write under a lease is fenced
//! ([`crate::fence`]); every end of a job goes through [`crate::job_end`]. A job with caches
//! waits a little for a worker that holds them ([`affinity`]).

pub mod affinity;
pub mod reaper;
pub mod take;
pub mod update;

use crate::state::AppState;

/// A lease's time to live, in milliseconds.
fn ttl_ms(state: &AppState) -> u64 {
    u64::try_from(state.config.leases.ttl.0.as_millis()).unwrap_or(u64::MAX)
}

/// When a lease renewed at `now` expires, by the server's clock.
fn expiry(state: &AppState, now: i64) -> i64 {
    now.saturating_add(i64::try_from(ttl_ms(state)).unwrap_or(i64::MAX))
}
