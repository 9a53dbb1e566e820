//! Fencing: every write a worker makes under a lease names the lease and its fence, and is
//! applied only while that lease is live. The job that a lease-scoped write lands on is found
//! here, in the write's own transaction, so that a write racing the reaper either lands before
//! the requeue or is refused with 409, never half of each.

use crate::db::{Query, now_ms};
use crate::error::{AppError, AppResult};
use vmfarm_proto::JobState;

/// Which lease a lease-scoped call speaks for.
#[derive(Debug, Clone)]
pub struct LeaseRef {
    pub lease_id: String,
    pub fence: i64,
}

/// The job of a live lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveJob {
    pub id: i64,
    pub state: JobState,
    pub attempt: i64,
}

/// The job of a live lease, or of one whose job it ended (so that a worker's retried final
/// report is accepted), with its state and worker.
const LIVE_JOB: &str = "SELECT id, state, worker, attempt FROM jobs WHERE lease_id = $1 AND fence = $2 \
     AND (lease_expires_at >= $3 OR state IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'error'))";

/// The job of `lease`, checking that the lease is live and that `worker` holds it.
pub async fn live_job(q: &mut impl Query, worker: &str, lease: &LeaseRef) -> AppResult<LiveJob> {
    let args = [
        (&lease.lease_id).into(),
        lease.fence.into(),
        now_ms().into(),
    ];
    let Some(row) = q.fetch_optional(LIVE_JOB, &args).await? else {
        return Err(refusal(q, lease).await);
    };
    if row.opt_text(2)?.as_deref() != Some(worker) {
        return Err(AppError::Forbidden(format!(
            "lease {} belongs to another worker",
            lease.lease_id
        )));
    }
    Ok(LiveJob {
        id: row.int(0)?,
        state: row.parsed(1)?,
        attempt: row.int(3)?,
    })
}

/// Why a write under `lease` was refused, read after its guarded statement changed nothing.
pub async fn refusal(q: &mut impl Query, lease: &LeaseRef) -> AppError {
    let row = q
        .fetch_optional(
            "SELECT fence FROM jobs WHERE lease_id = $1",
            &[(&lease.lease_id).into()],
        )
        .await;
    match row.and_then(|row| row.map(|r| r.int(0)).transpose()) {
        Err(e) => AppError::from(e),
        Ok(None) => AppError::Conflict(format!(
            "lease {} is not live: it expired and its job went back to the queue",
            lease.lease_id
        )),
        Ok(Some(fence)) if fence != lease.fence => AppError::Conflict(format!(
            "stale fence {} for lease {}: the live fence is {fence}",
            lease.fence, lease.lease_id
        )),
        Ok(Some(_)) => AppError::Conflict(format!("lease {} has expired", lease.lease_id)),
    }
}
