//! The lease reaper: a job whose worker stopped renewing its lease goes back to the queue for
//! another attempt, or ends in `error` once it has used its attempts, or `cancelled` when a
//! cancel was pending.

use crate::db::{Query, WriteTx, now_ms};
use crate::error::AppResult;
use crate::job_end::{End, Ended, EndedBy, Seen, end_job, requeue_job};
use crate::state::AppState;
use std::time::Duration;
use vmfarm_proto::JobState;

/// What became of a job whose lease had expired.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reaped {
    /// Queued again; the lost attempt's artifacts are to be removed from the store.
    Requeued {
        lost_attempt: i64,
        reason: String,
    },
    Ended {
        ended: Ended,
        reason: String,
    },
}

/// Moves every job whose lease has expired. Returns how many moved.
pub async fn reap_expired(state: &AppState) -> AppResult<usize> {
    let now = now_ms();
    let expired = state
        .db
        .read()
        .fetch_all(
            "SELECT id FROM jobs WHERE state IN ('leased', 'booting', 'running') AND lease_expires_at < $1",
            &[now.into()],
        )
        .await?;
    let max_attempts = i64::from(state.config.leases.max_attempts);
    let mut moved = 0;
    for row in expired {
        let id = row.int(0)?;
        let reaped = state
            .db
            .write(move |tx| Box::pin(async move { reap(tx, id, max_attempts, now).await }))
            .await?;
        let Some(reaped) = reaped else {
            // Renewed or moved meanwhile.
            continue;
        };
        moved += 1;
        match reaped {
            Reaped::Requeued {
                lost_attempt,
                reason,
            } => {
                tracing::warn!(job = id, "{reason}");
                if let Err(e) = state.store.remove_attempt(id, lost_attempt).await {
                    tracing::error!(job = id, attempt = lost_attempt, error = %e, "cannot remove a lost attempt's artifacts");
                }
                state.events.new_work();
            }
            Reaped::Ended { ended, reason } => {
                tracing::warn!(job = id, "{reason}");
                crate::job_end::ended(state, &ended);
            }
        }
        state.events.job_changed(id);
    }
    Ok(moved)
}

/// Moves job `id` if its lease is still expired at `now`, deciding where it goes in the same
/// transaction that moves it.
async fn reap(tx: &mut WriteTx, id: i64, max_attempts: i64, now: i64) -> AppResult<Option<Reaped>> {
    let sql = format!(
        "SELECT state, fence, attempt, cancel_requested FROM jobs WHERE id = $1 \
         AND state IN ('leased', 'booting', 'running') AND lease_expires_at < $2{}",
        tx.for_update()
    );
    let Some(row) = tx.fetch_optional(&sql, &[id.into(), now.into()]).await? else {
        return Ok(None);
    };
    let seen = Seen {
        id,
        state: row.parsed(0)?,
        fence: row.int(1)?,
    };
    let (attempt, cancel) = (row.int(2)?, row.int(3)? != 0);
    let (next, reason) = if cancel {
        (
            JobState::Cancelled,
            format!("cancelled; its worker stopped answering (attempt {attempt})"),
        )
    } else if attempt >= max_attempts {
        (
            JobState::Error,
            format!(
                "its worker was lost {attempt} times (lease expired); giving up after {max_attempts} attempts"
            ),
        )
    } else {
        let reason = format!("attempt {attempt} lost: its worker stopped renewing the lease");
        return Ok(requeue_job(tx, &seen, &reason)
            .await?
            .map(|lost_attempt| Reaped::Requeued {
                lost_attempt,
                reason,
            }));
    };
    let end = End {
        state: next,
        reason: Some(&reason),
        by: EndedBy::Reaper,
        now,
    };
    Ok(end_job(tx, &seen, &end)
        .await?
        .map(|ended| Reaped::Ended { ended, reason }))
}

/// Reaps every quarter of the lease's time to live (between 100 ms and 1 s), for as long as the
/// server runs.
pub async fn run(state: AppState) {
    let every =
        (state.config.leases.ttl.0 / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        if let Err(e) = reap_expired(&state).await {
            tracing::error!(error = %e, "lease reaper failed; trying again");
        }
        tokio::time::sleep(every).await;
    }
}
