//! A worker's reports under its lease: heartbeats (which also carry cancels back), and moves
//! of the job and its tasks. A move that ends the job goes through [`end_job`].

use crate::db::{Query, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use crate::fence::{LeaseCall, live_job, refusal};
use crate::job_end::{End, Ended, EndedBy, Seen, end_job};
use crate::state::AppState;
use vmfarm_proto::wire::{HeartbeatResponse, StateUpdate, TaskUpdate};
use vmfarm_proto::{JobState, TaskState};

/// Longest `reason` a worker may give.
const MAX_REASON: usize = 4096;

/// Renews the lease; the answer says whether a user asked to cancel the job.
pub async fn heartbeat(state: &AppState, call: &LeaseCall) -> AppResult<HeartbeatResponse> {
    let now = now_ms();
    let expires_at = super::expiry(state, now);
    let ttl_ms = super::ttl_ms(state);
    let call = call.clone();
    state
        .db
        .write(move |tx| {
            Box::pin(async move {
                let row = tx
                    .fetch_optional(
                        "UPDATE jobs SET lease_expires_at = $1 WHERE lease_id = $2 AND fence = $3 AND worker = $4 \
                         AND lease_expires_at >= $5 AND state IN ('leased', 'booting', 'running') RETURNING cancel_requested",
                        &[
                            expires_at.into(),
                            (&call.lease_id).into(),
                            call.fence.into(),
                            (&call.worker).into(),
                            now.into(),
                        ],
                    )
                    .await?;
                match row {
                    Some(row) => Ok(HeartbeatResponse {
                        expires_at,
                        ttl_ms,
                        cancel: row.int(0)? != 0,
                    }),
                    None => Err(refusal(tx, &call).await),
                }
            })
        })
        .await
}

/// Applies a worker's state update: the image version, a reason, a task's move, the job's move.
pub async fn update_state(
    state: &AppState,
    call: &LeaseCall,
    update: &StateUpdate,
) -> AppResult<()> {
    if update.reason.as_ref().is_some_and(|r| r.len() > MAX_REASON) {
        return Err(AppError::BadRequest(format!(
            "reason is longer than {MAX_REASON} bytes"
        )));
    }
    if update
        .image_version
        .as_ref()
        .is_some_and(|v| v.is_empty() || v.len() > 64)
    {
        return Err(AppError::BadRequest(
            "image_version must be 1 to 64 bytes".into(),
        ));
    }
    let call = call.clone();
    let update = update.clone();
    let (job_id, ended) = state
        .db
        .write(move |tx| Box::pin(async move { apply_update(tx, &call, &update, now_ms()).await }))
        .await?;
    if let Some(ended) = ended {
        crate::job_end::ended(state, &ended);
    }
    state.events.job_changed(job_id);
    Ok(())
}

/// [`update_state`] in its transaction: the job's id, and its end if it ended.
/// A repeat of a move already made is accepted and changes nothing.
async fn apply_update(
    tx: &mut WriteTx,
    call: &LeaseCall,
    update: &StateUpdate,
    now: i64,
) -> AppResult<(i64, Option<Ended>)> {
    let job = live_job(tx, call).await?;
    if update.image_version.is_some() || update.reason.is_some() {
        tx.execute(
            "UPDATE jobs SET image_version = COALESCE($1, image_version), reason = COALESCE($2, reason) \
             WHERE id = $3",
            &[
                update.image_version.as_deref().into(),
                update.reason.as_deref().into(),
                job.id.into(),
            ],
        )
        .await?;
    }
    if let Some(task) = &update.task {
        apply_task(tx, job.id, task, now).await?;
    }
    let Some(next) = update.job_state.filter(|next| *next != job.state) else {
        return Ok((job.id, None));
    };
    let seen = Seen {
        id: job.id,
        state: job.state,
        fence: call.fence,
    };
    if next.is_terminal() {
        let end = End {
            state: next,
            reason: update.reason.as_deref(),
            by: EndedBy::Worker,
            now,
        };
        return match end_job(tx, &seen, &end).await? {
            Some(ended) => Ok((job.id, Some(ended))),
            None => Err(refusal(tx, call).await),
        };
    }
    if !job.state.can_become(next) || next == JobState::Queued {
        return Err(AppError::Conflict(format!(
            "job {} cannot go from {} to {next}",
            job.id, job.state
        )));
    }
    let started = (next == JobState::Running).then_some(now);
    let moved = tx
        .execute(
            "UPDATE jobs SET state = $1, started_at = COALESCE($2, started_at) \
             WHERE id = $3 AND state = $4 AND fence = $5",
            &[
                next.as_str().into(),
                started.into(),
                job.id.into(),
                job.state.as_str().into(),
                seen.fence.into(),
            ],
        )
        .await?;
    if moved != 1 {
        return Err(refusal(tx, call).await);
    }
    Ok((job.id, None))
}

/// Moves a task of job `job_id`; a repeat of its current state is accepted.
async fn apply_task(tx: &mut WriteTx, job_id: i64, task: &TaskUpdate, now: i64) -> AppResult<()> {
    let row = tx
        .fetch_optional(
            "SELECT state FROM tasks WHERE job_id = $1 AND name = $2",
            &[job_id.into(), (&task.name).into()],
        )
        .await?
        .ok_or_else(|| AppError::BadRequest(format!("job {job_id} has no task `{}`", task.name)))?;
    let current: TaskState = row.parsed(0)?;
    if current == task.state {
        return Ok(());
    }
    if !current.can_become(task.state) {
        return Err(AppError::Conflict(format!(
            "task `{}` cannot go from {current} to {}",
            task.name, task.state
        )));
    }
    let (started, finished) = match task.state {
        TaskState::Running => (Some(now), None),
        s if s.is_terminal() => (None, Some(now)),
        _ => (None, None),
    };
    tx.execute(
        "UPDATE tasks SET state = $1, exit_code = $2, started_at = COALESCE($3, started_at), \
         finished_at = COALESCE($4, finished_at) WHERE job_id = $5 AND name = $6",
        &[
            task.state.as_str().into(),
            task.exit_code.map(i64::from).into(),
            started.into(),
            finished.into(),
            job_id.into(),
            (&task.name).into(),
        ],
    )
    .await?;
    Ok(())
}
