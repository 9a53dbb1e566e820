//! Fencing: every write a worker makes under a lease names the lease and its fence, and is
//! applied only while that lease is live and the worker holds it. The job that a lease-scoped
//! write lands on is found here, in the write's own transaction, so that a write racing the
//! reaper either lands before the requeue or is refused with 409, never half of each.

use crate::db::{Query, now_ms};
use crate::error::{AppError, AppResult};
use vmfarm_proto::JobState;

/// A worker's call under one of its leases ([`crate::extract`] takes it from the request).
#[derive(Debug, Clone)]
pub struct LeaseCall {
    /// The worker, by its token.
    pub worker: String,
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

/// The job of a live lease held by the worker, or of one whose job it ended (so that the
/// worker's retried final report is accepted).
const LIVE_JOB: &str = "SELECT id, state, attempt FROM jobs WHERE lease_id = $1 AND fence = $2 \
     AND worker = $3 AND (lease_expires_at >= $4 \
     OR state IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'error'))";

/// The job of `call`'s lease, if the lease is live and the caller holds it; else why not.
pub async fn live_job(q: &mut impl Query, call: &LeaseCall) -> AppResult<LiveJob> {
    let args = [
        (&call.lease_id).into(),
        call.fence.into(),
        (&call.worker).into(),
        now_ms().into(),
    ];
    let Some(row) = q.fetch_optional(LIVE_JOB, &args).await? else {
        return Err(refusal(q, call).await);
    };
    Ok(LiveJob {
        id: row.int(0)?,
        state: row.parsed(1)?,
        attempt: row.int(2)?,
    })
}

/// Why a write under `call`'s lease was refused, read after its guarded statement changed
/// nothing.
pub async fn refusal(q: &mut impl Query, call: &LeaseCall) -> AppError {
    match why_refused(q, call).await {
        Ok(refusal) | Err(refusal) => refusal,
    }
}

async fn why_refused(q: &mut impl Query, call: &LeaseCall) -> AppResult<AppError> {
    let row = q
        .fetch_optional(
            "SELECT id, state, fence, worker FROM jobs WHERE lease_id = $1",
            &[(&call.lease_id).into()],
        )
        .await?;
    let Some(row) = row else {
        return Ok(AppError::Conflict(format!(
            "lease {} is not live: it expired, and its job went back to the queue or ended",
            call.lease_id
        )));
    };
    let (id, state, fence) = (row.int(0)?, row.parsed::<JobState>(1)?, row.int(2)?);
    Ok(
        if row.opt_text(3)?.as_deref() != Some(call.worker.as_str()) {
            AppError::Forbidden(format!("lease {} belongs to another worker", call.lease_id))
        } else if fence != call.fence {
            AppError::Conflict(format!(
                "stale fence {} for lease {}: the live fence is {fence}",
                call.fence, call.lease_id
            ))
        } else if state.is_terminal() {
            AppError::Conflict(format!("job {id} has already ended ({state})"))
        } else {
            AppError::Conflict(format!("lease {} has expired", call.lease_id))
        },
    )
}
