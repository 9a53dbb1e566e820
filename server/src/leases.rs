//! Leases: how a worker takes a job, keeps it, writes to it and loses it.
//!
//! A lease is (lease id, fence). Every write a worker makes names both and is applied only
//! while the lease is live: a statement guarded by `lease_id = .. AND fence = .. AND
//! lease_expires_at >= now`, so a write racing the reaper either lands before the requeue or
//! is refused with 409 — never half of each.

use crate::db::{Arg, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use crate::state::AppState;
use base64::Engine;
use std::collections::BTreeMap;
use std::time::Instant;
use vmfarm_proto::names::{NameKind, check_name};
use vmfarm_proto::wire::{HeartbeatResponse, LeaseRequest, LeaseResponse, LeasedJob, StateUpdate};
use vmfarm_proto::{JobState, TaskState};

/// Most images one worker may announce.
pub const MAX_WORKER_IMAGES: usize = 256;

/// Which lease a lease-scoped call speaks for.
#[derive(Debug, Clone)]
pub struct LeaseRef {
    pub lease_id: String,
    pub fence: i64,
}

fn check_request(worker: &str, req: &LeaseRequest) -> AppResult<()> {
    if req.name != worker {
        return Err(AppError::Forbidden(format!(
            "this token belongs to worker `{worker}`, not `{}`",
            req.name
        )));
    }
    if req.slots == 0 {
        return Err(AppError::BadRequest(
            "slots is 0: ask for work only with a free slot".into(),
        ));
    }
    if req.images.len() > MAX_WORKER_IMAGES {
        return Err(AppError::BadRequest(format!(
            "{} images announced; the limit is {MAX_WORKER_IMAGES}",
            req.images.len()
        )));
    }
    for image in &req.images {
        check_name(NameKind::Image, &image.name)
            .map_err(|e| AppError::BadRequest(e.to_string()))?;
        if image.version.is_empty() || image.version.len() > 64 {
            return Err(AppError::BadRequest(format!(
                "image `{}` has an empty or over-long version",
                image.name
            )));
        }
    }
    Ok(())
}

/// How often a worker's presence is written down at most.
const SEEN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The worker's row, when it is due to be written down (at most once per [`SEEN_EVERY`]).
fn worker_seen(state: &AppState, req: &LeaseRequest) -> AppResult<Option<WorkerSeen>> {
    if let Ok(mut seen) = state.workers_seen.lock() {
        let now = Instant::now();
        match seen.get(&req.name) {
            Some(last) if now.duration_since(*last) < SEEN_EVERY => return Ok(None),
            _ => {
                seen.insert(req.name.clone(), now);
            }
        }
    }
    Ok(Some(WorkerSeen {
        name: req.name.clone(),
        images: serde_json::to_string(&req.images).map_err(AppError::internal)?,
        slots: i64::from(req.slots),
        version: req.version.clone(),
    }))
}

struct WorkerSeen {
    name: String,
    images: String,
    slots: i64,
    version: String,
}

async fn record_worker(tx: &mut WriteTx, seen: &WorkerSeen) -> AppResult<()> {
    tx.execute(
        "INSERT INTO workers (name, last_seen, slots, images, version) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen, slots = excluded.slots, \
         images = excluded.images, version = excluded.version",
        &[
            (&seen.name).into(),
            now_ms().into(),
            seen.slots.into(),
            (&seen.images).into(),
            (&seen.version).into(),
        ],
    )
    .await?;
    Ok(())
}

/// Takes the oldest job of the highest priority whose image the worker has, if any.
pub async fn try_lease(
    state: &AppState,
    worker: &str,
    req: &LeaseRequest,
) -> AppResult<Option<LeaseResponse>> {
    check_request(worker, req)?;
    let seen = worker_seen(state, req)?;
    if req.images.is_empty() {
        if let Some(seen) = seen {
            state
                .db
                .write(move |tx| Box::pin(async move { record_worker(tx, &seen).await }))
                .await?;
        }
        return Ok(None);
    }
    let started = Instant::now();
    let now = now_ms();
    let ttl_ms = i64::try_from(state.config.leases.ttl.0.as_millis()).unwrap_or(i64::MAX);
    let expires_at = now.saturating_add(ttl_ms);
    let lease_id = crate::random::random_hex(16).map_err(AppError::internal)?;
    // The best job of each image is one index seek (state, image, priority DESC, id); the
    // best of those few wins. Far cheaper than sorting every queued job of the images.
    let per_image: Vec<String> = (0..req.images.len())
        .map(|i| {
            format!(
                "SELECT id, priority FROM (SELECT id, priority FROM jobs WHERE state = 'queued' AND image = ${} \
                 ORDER BY priority DESC, id LIMIT 1{}) AS q{i}",
                i + 6,
                state.db.skip_locked()
            )
        })
        .collect();
    let sql = format!(
        "UPDATE jobs SET state = $1, lease_id = $2, fence = fence + 1, lease_expires_at = $3, \
         leased_at = $4, worker = $5, log_seq = 0 \
         WHERE id = (SELECT id FROM ({}) AS best ORDER BY priority DESC, id LIMIT 1) AND state = 'queued' \
         RETURNING id, group_id, image, manifest, secrets, attempt, fence, timeout_ms",
        per_image.join(" UNION ALL ")
    );
    let worker = worker.to_owned();
    let images: Vec<String> = req.images.iter().map(|i| i.name.clone()).collect();
    let leased = state
        .db
        .write(move |tx| {
            Box::pin(async move {
                if let Some(seen) = &seen {
                    record_worker(tx, seen).await?;
                }
                let mut args: Vec<Arg> = vec![
                    JobState::Leased.as_str().into(),
                    (&lease_id).into(),
                    expires_at.into(),
                    now.into(),
                    (&worker).into(),
                ];
                args.extend(images.iter().map(Arg::from));
                let Some(row) = tx.fetch_optional(&sql, &args).await? else {
                    return Ok(None);
                };
                let job_id = row.int(0)?;
                let secrets = lease_secrets(tx, &row.text(4)?).await?;
                let lease = LeaseResponse {
                    fence: u64::try_from(row.int(6)?).unwrap_or(0),
                    expires_at,
                    job: LeasedJob {
                        id: job_id.to_string(),
                        group_id: row.int(1)?.to_string(),
                        image: row.text(2)?,
                        manifest: row.text(3)?,
                        attempt: u32::try_from(row.int(5)?).unwrap_or(u32::MAX),
                        timeout_ms: u64::try_from(row.int(7)?).unwrap_or(0),
                    },
                    secrets,
                    lease_id,
                };
                Ok::<_, AppError>(Some((job_id, lease)))
            })
        })
        .await?;
    let Some((job_id, lease)) = leased else {
        return Ok(None);
    };
    state.metrics.lease_latency(started.elapsed());
    state.events.job_changed(job_id);
    Ok(Some(lease))
}

/// The secrets a job names (a JSON array of names, stored at submit), base64-encoded, for its
/// lease only.
async fn lease_secrets(tx: &mut WriteTx, names: &str) -> AppResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let names: Vec<String> = serde_json::from_str(names).map_err(AppError::internal)?;
    for name in names {
        let row = tx
            .fetch_optional(
                "SELECT value FROM secrets WHERE name = $1",
                &[(&name).into()],
            )
            .await?;
        if let Some(row) = row {
            out.insert(
                name,
                base64::engine::general_purpose::STANDARD.encode(row.blob(0)?),
            );
        }
    }
    Ok(out)
}

/// The lease's job's fence, if the lease is still on record.
const LEASE_FENCE: &str = "SELECT fence FROM jobs WHERE lease_id = $1";

/// Why a lease-scoped write was refused, read after its guarded statement changed nothing.
pub async fn refusal(state: &AppState, lease: &LeaseRef) -> AppError {
    let row: Result<Option<(i64,)>, _> = sqlx::query_as(LEASE_FENCE)
        .bind(&lease.lease_id)
        .fetch_optional(&state.db.pool)
        .await;
    match row {
        Err(e) => AppError::from(e),
        Ok(fence) => refusal_for(lease, fence.map(|(f,)| f)),
    }
}

/// [`refusal`], read in the write's own transaction.
pub async fn refusal_in(tx: &mut WriteTx, lease: &LeaseRef) -> AppError {
    let row = tx
        .fetch_optional(LEASE_FENCE, &[(&lease.lease_id).into()])
        .await;
    match row.and_then(|row| row.map(|r| r.int(0)).transpose()) {
        Err(e) => AppError::from(e),
        Ok(fence) => refusal_for(lease, fence),
    }
}

/// The refusal of a write under `lease`, whose job's live fence is `fence` (`None`: the lease
/// is no longer on record).
fn refusal_for(lease: &LeaseRef, fence: Option<i64>) -> AppError {
    match fence {
        None => AppError::Conflict(format!(
            "lease {} is not live: it expired and its job went back to the queue",
            lease.lease_id
        )),
        Some(fence) if fence != lease.fence => AppError::Conflict(format!(
            "stale fence {} for lease {}: the live fence is {fence}",
            lease.fence, lease.lease_id
        )),
        Some(_) => AppError::Conflict(format!("lease {} has expired", lease.lease_id)),
    }
}

/// The job of a live lease (or of one whose job has ended), with its state and worker.
const LIVE_JOB: &str = "SELECT id, state, worker FROM jobs WHERE lease_id = $1 AND fence = $2 \
     AND (lease_expires_at >= $3 OR state IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'error'))";

/// The job of a live lease, checking the caller is its worker.
pub async fn live_job(
    state: &AppState,
    worker: &str,
    lease: &LeaseRef,
) -> AppResult<(i64, JobState)> {
    let row: Option<(i64, String, Option<String>)> = sqlx::query_as(LIVE_JOB)
        .bind(&lease.lease_id)
        .bind(lease.fence)
        .bind(now_ms())
        .fetch_optional(&state.db.pool)
        .await?;
    let Some((id, job_state, owner)) = row else {
        return Err(refusal(state, lease).await);
    };
    owned_job(worker, lease, id, &job_state, owner.as_deref())
}

/// [`live_job`], read in the write's own transaction.
pub async fn live_job_in(
    tx: &mut WriteTx,
    worker: &str,
    lease: &LeaseRef,
) -> AppResult<(i64, JobState)> {
    let args = [
        (&lease.lease_id).into(),
        lease.fence.into(),
        now_ms().into(),
    ];
    let Some(row) = tx.fetch_optional(LIVE_JOB, &args).await? else {
        return Err(refusal_in(tx, lease).await);
    };
    owned_job(
        worker,
        lease,
        row.int(0)?,
        &row.text(1)?,
        row.opt_text(2)?.as_deref(),
    )
}

fn owned_job(
    worker: &str,
    lease: &LeaseRef,
    id: i64,
    job_state: &str,
    owner: Option<&str>,
) -> AppResult<(i64, JobState)> {
    if owner != Some(worker) {
        return Err(AppError::Forbidden(format!(
            "lease {} belongs to another worker",
            lease.lease_id
        )));
    }
    Ok((id, job_state.parse().map_err(AppError::internal)?))
}

pub async fn heartbeat(
    state: &AppState,
    worker: &str,
    lease: &LeaseRef,
) -> AppResult<HeartbeatResponse> {
    let now = now_ms();
    let ttl_ms = i64::try_from(state.config.leases.ttl.0.as_millis()).unwrap_or(i64::MAX);
    let expires_at = now.saturating_add(ttl_ms);
    let worker = worker.to_owned();
    let lease = lease.clone();
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
                            (&lease.lease_id).into(),
                            lease.fence.into(),
                            (&worker).into(),
                            now.into(),
                        ],
                    )
                    .await?;
                match row {
                    Some(row) => Ok(HeartbeatResponse {
                        expires_at,
                        cancel: row.int(0)? != 0,
                    }),
                    None => Err(refusal_in(tx, &lease).await),
                }
            })
        })
        .await
}

/// Applies a worker's state update: job state, a task's state, the image version, a reason.
pub async fn update_state(
    state: &AppState,
    worker: &str,
    lease: &LeaseRef,
    update: &StateUpdate,
) -> AppResult<()> {
    if update.reason.as_ref().is_some_and(|r| r.len() > 4096) {
        return Err(AppError::BadRequest(
            "reason is longer than 4096 bytes".into(),
        ));
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
    let worker = worker.to_owned();
    let lease = lease.clone();
    let update = update.clone();
    let (job_id, moved) = state
        .db
        .write(move |tx| Box::pin(async move { apply_update(tx, &worker, &lease, &update).await }))
        .await?;
    match moved {
        Some(next) => job_moved(state, job_id, next).await,
        None => state.events.job_changed(job_id),
    }
    Ok(())
}

/// [`update_state`] in its transaction: the job's id, and its new state if it moved.
async fn apply_update(
    tx: &mut WriteTx,
    worker: &str,
    lease: &LeaseRef,
    update: &StateUpdate,
) -> AppResult<(i64, Option<JobState>)> {
    if update.task.is_none()
        && let Some(next) = update.job_state
        && let Some(job_id) = move_job(tx, worker, lease, update, next).await?
    {
        return Ok((job_id, Some(next)));
    }
    // A task's move, or a job move the fast path did not apply (a repeat, a refused move, a
    // dead lease): the slow path reads the job first, accepts repeats and explains refusals.
    let (job_id, current) = live_job_in(tx, worker, lease).await?;
    let now = now_ms();
    let touched = tx
        .execute(
            "UPDATE jobs SET image_version = COALESCE($1, image_version), reason = COALESCE($2, reason) \
             WHERE id = $3 AND lease_id = $4 AND fence = $5",
            &[
                update.image_version.as_deref().into(),
                update.reason.as_deref().into(),
                job_id.into(),
                (&lease.lease_id).into(),
                lease.fence.into(),
            ],
        )
        .await?;
    if touched != 1 {
        return Err(refusal_in(tx, lease).await);
    }
    if let Some(task) = &update.task {
        apply_task(tx, job_id, task, now).await?;
    }
    let Some(next) = update.job_state.filter(|next| *next != current) else {
        return Ok((job_id, None));
    };
    if !current.can_become(next) || next == JobState::Queued {
        return Err(AppError::Conflict(format!(
            "job {job_id} cannot go from {current} to {next}"
        )));
    }
    let (started, finished) = match next {
        JobState::Running => (Some(now), None),
        s if s.is_terminal() => (None, Some(now)),
        _ => (None, None),
    };
    tx.execute(
        "UPDATE jobs SET state = $1, started_at = COALESCE($2, started_at), finished_at = $3 \
         WHERE id = $4 AND state = $5",
        &[
            next.as_str().into(),
            started.into(),
            finished.into(),
            job_id.into(),
            current.as_str().into(),
        ],
    )
    .await?;
    if next.is_terminal() {
        finish_job(tx, job_id, next, now).await?;
    }
    Ok((job_id, Some(next)))
}

/// Moves the job of a live lease to `next` in one guarded statement (plus its tasks' cleanup
/// when `next` ends it), if the job is in a state that may become `next`. `None`: nothing moved.
async fn move_job(
    tx: &mut WriteTx,
    worker: &str,
    lease: &LeaseRef,
    update: &StateUpdate,
    next: JobState,
) -> AppResult<Option<i64>> {
    let Some(sql) = move_sql(next) else {
        return Ok(None);
    };
    let now = now_ms();
    let row = tx
        .fetch_optional(
            &sql,
            &[
                next.as_str().into(),
                (next == JobState::Running).then_some(now).into(),
                next.is_terminal().then_some(now).into(),
                update.image_version.as_deref().into(),
                update.reason.as_deref().into(),
                (&lease.lease_id).into(),
                lease.fence.into(),
                worker.into(),
                now.into(),
            ],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let job_id = row.int(0)?;
    if next.is_terminal() {
        finish_job(tx, job_id, next, now).await?;
    }
    Ok(Some(job_id))
}

/// The guarded statement of [`move_job`] to `next`: the same text for the same `next`, so
/// that its prepared statement is reused. `None` when no state may become `next` this way.
fn move_sql(next: JobState) -> Option<String> {
    let from: Vec<String> = JobState::ALL
        .iter()
        .filter(|s| s.can_become(next) && next != JobState::Queued)
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    if from.is_empty() {
        return None;
    }
    Some(format!(
        "UPDATE jobs SET state = $1, started_at = COALESCE($2, started_at), finished_at = COALESCE($3, finished_at), \
         image_version = COALESCE($4, image_version), reason = COALESCE($5, reason) \
         WHERE lease_id = $6 AND fence = $7 AND worker = $8 AND lease_expires_at >= $9 AND state IN ({}) \
         RETURNING id",
        from.join(", ")
    ))
}

/// The rest of a job's end as `end`, in its transaction: tasks that never ran are skipped
/// (cancelled when the job is), a running one was cut short, and its triggers' deliveries are
/// queued.
async fn finish_job(tx: &mut WriteTx, job_id: i64, end: JobState, now: i64) -> AppResult<()> {
    let leftover = if end == JobState::Cancelled {
        TaskState::Cancelled
    } else {
        TaskState::Skipped
    };
    tx.execute(
        "UPDATE tasks SET state = CASE WHEN state = 'pending' THEN $1 ELSE 'cancelled' END, \
         finished_at = CASE WHEN state = 'running' THEN $2 ELSE finished_at END \
         WHERE job_id = $3 AND state IN ('pending', 'running')",
        &[leftover.as_str().into(), now.into(), job_id.into()],
    )
    .await?;
    crate::triggers::queue_in(tx, job_id, end, now).await
}

/// What follows a job's move: waking readers, and for an ending, metrics, waiting workers and
/// the manifest's triggers.
async fn job_moved(state: &AppState, job_id: i64, next: JobState) {
    if next.is_terminal() {
        state.metrics.job_finished(next);
        state.events.work.notify_waiters();
        crate::triggers::wake(state);
    }
    state.events.job_changed(job_id);
}

async fn apply_task(
    tx: &mut WriteTx,
    job_id: i64,
    task: &vmfarm_proto::wire::TaskUpdate,
    now: i64,
) -> AppResult<()> {
    let row = tx
        .fetch_optional(
            "SELECT state FROM tasks WHERE job_id = $1 AND name = $2",
            &[job_id.into(), (&task.name).into()],
        )
        .await?
        .ok_or_else(|| AppError::BadRequest(format!("job {job_id} has no task `{}`", task.name)))?;
    let current: TaskState = row.text(0)?.parse().map_err(AppError::internal)?;
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

/// Sends the jobs of expired leases back to the queue (attempt + 1), or to `error` once they
/// have used their attempts, or to `cancelled` when a cancel was pending. Returns how many moved.
pub async fn reap_expired(state: &AppState) -> AppResult<usize> {
    let now = now_ms();
    let expired: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT id, attempt, fence, cancel_requested FROM jobs \
         WHERE state IN ('leased', 'booting', 'running') AND lease_expires_at < $1",
    )
    .bind(now)
    .fetch_all(&state.db.pool)
    .await?;
    let max_attempts = i64::from(state.config.leases.max_attempts);
    let mut moved = 0;
    for (id, attempt, fence, cancel) in expired {
        let (next, reason) = if cancel != 0 {
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
            (
                JobState::Queued,
                format!("attempt {attempt} lost: its worker stopped renewing the lease"),
            )
        };
        let expired = Expired {
            id,
            fence,
            next,
            reason: reason.clone(),
            now,
        };
        let done = state
            .db
            .write(move |tx| Box::pin(async move { expired.apply(tx).await }))
            .await?;
        if !done {
            continue;
        }
        tracing::warn!(job = id, attempt, "{reason}");
        state.events.job_changed(id);
        if next != JobState::Queued {
            crate::triggers::wake(state);
        }
        moved += 1;
    }
    if moved > 0 {
        state.events.work.notify_waiters();
    }
    Ok(moved)
}

/// A job whose lease expired, and where it goes.
struct Expired {
    id: i64,
    fence: i64,
    next: JobState,
    reason: String,
    now: i64,
}

impl Expired {
    /// Moves the job unless its lease was renewed or superseded meanwhile; true if it moved.
    async fn apply(&self, tx: &mut WriteTx) -> AppResult<bool> {
        let (id, now) = (self.id, self.now);
        // Requeued: the lease is dropped. Ended: finished_at is set and the lease stays on record.
        let done = if self.next == JobState::Queued {
            tx.execute(
                "UPDATE jobs SET reason = $1, state = 'queued', attempt = attempt + 1, lease_id = NULL, \
                 lease_expires_at = NULL, worker = NULL \
                 WHERE id = $2 AND fence = $3 AND lease_expires_at < $4 AND state IN ('leased', 'booting', 'running')",
                &[(&self.reason).into(), id.into(), self.fence.into(), now.into()],
            )
            .await?
        } else {
            tx.execute(
                "UPDATE jobs SET reason = $1, state = $2, lease_expires_at = NULL, finished_at = $3 \
                 WHERE id = $4 AND fence = $5 AND lease_expires_at < $6 AND state IN ('leased', 'booting', 'running')",
                &[
                    (&self.reason).into(),
                    self.next.as_str().into(),
                    now.into(),
                    id.into(),
                    self.fence.into(),
                    now.into(),
                ],
            )
            .await?
        };
        if done != 1 {
            return Ok(false);
        }
        if self.next == JobState::Queued {
            tx.execute(
                "UPDATE tasks SET state = 'pending', exit_code = NULL, started_at = NULL, finished_at = NULL WHERE job_id = $1",
                &[id.into()],
            )
            .await?;
        } else {
            let task_state = if self.next == JobState::Cancelled {
                TaskState::Cancelled
            } else {
                TaskState::Skipped
            };
            tx.execute(
                "UPDATE tasks SET state = $1 WHERE job_id = $2 AND state IN ('pending', 'running')",
                &[task_state.as_str().into(), id.into()],
            )
            .await?;
            crate::triggers::queue_in(tx, id, self.next, now).await?;
        }
        crate::logs::append_farm_line(tx, id, &self.reason).await?;
        Ok(true)
    }
}
