//! Leases: how a worker takes a job ([`take`]), keeps it and reports on it ([`update`]), and
//! loses it when it stops renewing ([`reaper`]). Every write under a lease is fenced
//! ([`crate::fence`]); every end of a job goes through [`crate::job_end`].

pub mod reaper;
pub mod take;
pub mod update;

use crate::state::AppState;

/// A lease's time to live, in milliseconds.
fn ttl_ms(state: &AppState) -> i64 {
    i64::try_from(state.config.leases.ttl.0.as_millis()).unwrap_or(i64::MAX)
}
