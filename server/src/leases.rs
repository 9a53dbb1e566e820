//! Leases: how a worker takes a job, keeps it, writes to it and loses it.
//!
//! A lease is (lease id, fence). Every write a worker makes names both and is applied only
//! while the lease is live: a statement guarded by `lease_id = .. AND fence = .. AND
//! lease_expires_at >= now`, so a write racing the reaper either lands before the requeue or
//! is refused with 409 — never half of each.

use crate::db::now_ms;
use crate::error::{AppError, AppResult};
use crate::state::AppState;
use base64::Engine;
use sqlx::Row;
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

/// Records the worker as seen now (at most once per [`SEEN_EVERY`]).
async fn record_worker(state: &AppState, req: &LeaseRequest) -> AppResult<()> {
    if let Ok(mut seen) = state.workers_seen.lock() {
        let now = Instant::now();
        match seen.get(&req.name) {
            Some(last) if now.duration_since(*last) < SEEN_EVERY => return Ok(()),
            _ => {
                seen.insert(req.name.clone(), now);
            }
        }
    }
    let images = serde_json::to_string(&req.images).map_err(AppError::internal)?;
    sqlx::query(
        "INSERT INTO workers (name, last_seen, slots, images, version) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen, slots = excluded.slots, \
         images = excluded.images, version = excluded.version",
    )
    .bind(&req.name)
    .bind(now_ms())
    .bind(i64::from(req.slots))
    .bind(images)
    .bind(&req.version)
    .execute(&state.db.writer)
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
    record_worker(state, req).await?;
    if req.images.is_empty() {
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
         RETURNING id, group_id, image, manifest, secrets, attempt, fence",
        per_image.join(" UNION ALL ")
    );
    let mut query = sqlx::query(&sql)
        .bind(JobState::Leased.as_str())
        .bind(&lease_id)
        .bind(expires_at)
        .bind(now)
        .bind(worker);
    for image in &req.images {
        query = query.bind(&image.name);
    }
    let Some(row) = query.fetch_optional(&state.db.writer).await? else {
        return Ok(None);
    };
    let job_id: i64 = row.try_get("id")?;
    let manifest_text: String = row.try_get("manifest")?;
    let secret_names: String = row.try_get("secrets")?;
    let secrets = lease_secrets(state, &secret_names).await?;
    state.metrics.lease_latency(started.elapsed());
    state.events.job_changed(job_id);
    Ok(Some(LeaseResponse {
        lease_id,
        fence: u64::try_from(row.try_get::<i64, _>("fence")?).unwrap_or(0),
        expires_at,
        job: LeasedJob {
            id: job_id.to_string(),
            group_id: row.try_get::<i64, _>("group_id")?.to_string(),
            image: row.try_get("image")?,
            manifest: manifest_text,
            attempt: u32::try_from(row.try_get::<i64, _>("attempt")?).unwrap_or(u32::MAX),
        },
        secrets,
    }))
}

/// The secrets a job names (a JSON array of names, stored at submit), base64-encoded, for its
/// lease only.
async fn lease_secrets(state: &AppState, names: &str) -> AppResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let names: Vec<String> = serde_json::from_str(names).map_err(AppError::internal)?;
    for name in names {
        let value: Option<(Vec<u8>,)> = sqlx::query_as("SELECT value FROM secrets WHERE name = $1")
            .bind(&name)
            .fetch_optional(&state.db.pool)
            .await?;
        if let Some((value,)) = value {
            out.insert(
                name,
                base64::engine::general_purpose::STANDARD.encode(value),
            );
        }
    }
    Ok(out)
}

/// Why a lease-scoped write was refused, read after its guarded statement changed nothing.
pub async fn refusal(state: &AppState, lease: &LeaseRef) -> AppError {
    let row: Result<Option<(i64, i64)>, _> =
        sqlx::query_as("SELECT fence, COALESCE(lease_expires_at, 0) FROM jobs WHERE lease_id = $1")
            .bind(&lease.lease_id)
            .fetch_optional(&state.db.pool)
            .await;
    match row {
        Err(e) => AppError::from(e),
        Ok(None) => AppError::Conflict(format!(
            "lease {} is not live: it expired and its job went back to the queue",
            lease.lease_id
        )),
        Ok(Some((fence, _))) if fence != lease.fence => AppError::Conflict(format!(
            "stale fence {} for lease {}: the live fence is {fence}",
            lease.fence, lease.lease_id
        )),
        Ok(Some(_)) => AppError::Conflict(format!("lease {} has expired", lease.lease_id)),
    }
}

/// The job of a live lease, checking the caller is its worker.
pub async fn live_job(
    state: &AppState,
    worker: &str,
    lease: &LeaseRef,
) -> AppResult<(i64, JobState)> {
    let row: Option<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT id, state, worker FROM jobs WHERE lease_id = $1 AND fence = $2 \
         AND (lease_expires_at >= $3 OR state IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'error'))",
    )
    .bind(&lease.lease_id)
    .bind(lease.fence)
    .bind(now_ms())
    .fetch_optional(&state.db.pool)
    .await?;
    let Some((id, job_state, owner)) = row else {
        return Err(refusal(state, lease).await);
    };
    if owner.as_deref() != Some(worker) {
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
    let row: Option<(i64,)> = sqlx::query_as(
        "UPDATE jobs SET lease_expires_at = $1 WHERE lease_id = $2 AND fence = $3 AND worker = $4 \
         AND lease_expires_at >= $5 AND state IN ('leased', 'booting', 'running') RETURNING cancel_requested",
    )
    .bind(expires_at)
    .bind(&lease.lease_id)
    .bind(lease.fence)
    .bind(worker)
    .bind(now)
    .fetch_optional(&state.db.writer)
    .await?;
    match row {
        Some((cancel,)) => Ok(HeartbeatResponse {
            expires_at,
            cancel: cancel != 0,
        }),
        None => Err(refusal(state, lease).await),
    }
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
    if update.task.is_none()
        && let Some(next) = update.job_state
        && let Some(job_id) = move_job(state, worker, lease, update, next).await?
    {
        job_moved(state, job_id, next).await;
        return Ok(());
    }
    // A task's move, or a job move the fast path did not apply (a repeat, a refused move, a
    // dead lease): the slow path reads the job first, accepts repeats and explains refusals.
    let (job_id, current) = live_job(state, worker, lease).await?;
    let now = now_ms();
    let mut tx = state.db.writer.begin().await?;
    // The guarded touch comes first: it takes SQLite's write lock and proves the lease live.
    let touched = sqlx::query(
        "UPDATE jobs SET image_version = COALESCE($1, image_version), reason = COALESCE($2, reason) \
         WHERE id = $3 AND lease_id = $4 AND fence = $5",
    )
    .bind(update.image_version.as_deref())
    .bind(update.reason.as_deref())
    .bind(job_id)
    .bind(&lease.lease_id)
    .bind(lease.fence)
    .execute(&mut *tx)
    .await?;
    if touched.rows_affected() != 1 {
        return Err(refusal(state, lease).await);
    }
    if let Some(task) = &update.task {
        apply_task(&mut tx, job_id, task, now).await?;
    }
    if let Some(next) = update.job_state
        && next != current
    {
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
        sqlx::query(
            "UPDATE jobs SET state = $1, started_at = COALESCE($2, started_at), finished_at = $3 \
             WHERE id = $4 AND state = $5",
        )
        .bind(next.as_str())
        .bind(started)
        .bind(finished)
        .bind(job_id)
        .bind(current.as_str())
        .execute(&mut *tx)
        .await?;
        if next.is_terminal() {
            finish_tasks(&mut tx, job_id, next, now).await?;
        }
    }
    tx.commit().await?;
    match update.job_state {
        Some(next) if next != current => job_moved(state, job_id, next).await,
        _ => state.events.job_changed(job_id),
    }
    Ok(())
}

/// Moves the job of a live lease to `next` in one guarded statement (plus its tasks' cleanup
/// when `next` ends it), if the job is in a state that may become `next`. `None`: nothing moved.
async fn move_job(
    state: &AppState,
    worker: &str,
    lease: &LeaseRef,
    update: &StateUpdate,
    next: JobState,
) -> AppResult<Option<i64>> {
    let from: Vec<String> = JobState::ALL
        .iter()
        .filter(|s| s.can_become(next) && next != JobState::Queued)
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    if from.is_empty() {
        return Ok(None);
    }
    let now = now_ms();
    let sql = format!(
        "UPDATE jobs SET state = $1, started_at = COALESCE($2, started_at), finished_at = COALESCE($3, finished_at), \
         image_version = COALESCE($4, image_version), reason = COALESCE($5, reason) \
         WHERE lease_id = $6 AND fence = $7 AND worker = $8 AND lease_expires_at >= $9 AND state IN ({}) \
         RETURNING id",
        from.join(", ")
    );
    let query = sqlx::query_as::<_, (i64,)>(&sql)
        .bind(next.as_str())
        .bind((next == JobState::Running).then_some(now))
        .bind(next.is_terminal().then_some(now))
        .bind(update.image_version.as_deref())
        .bind(update.reason.as_deref())
        .bind(&lease.lease_id)
        .bind(lease.fence)
        .bind(worker)
        .bind(now);
    if !next.is_terminal() {
        return Ok(query
            .fetch_optional(&state.db.writer)
            .await?
            .map(|(id,)| id));
    }
    let mut tx = state.db.writer.begin().await?;
    let Some((job_id,)) = query.fetch_optional(&mut *tx).await? else {
        return Ok(None);
    };
    finish_tasks(&mut tx, job_id, next, now).await?;
    tx.commit().await?;
    Ok(Some(job_id))
}

/// When a job ends as `end`: tasks that never ran are skipped (cancelled when the job is), and
/// a running one was cut short.
async fn finish_tasks(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job_id: i64,
    end: JobState,
    now: i64,
) -> Result<(), sqlx::Error> {
    let leftover = if end == JobState::Cancelled {
        TaskState::Cancelled
    } else {
        TaskState::Skipped
    };
    sqlx::query(
        "UPDATE tasks SET state = CASE WHEN state = 'pending' THEN $1 ELSE 'cancelled' END, \
         finished_at = CASE WHEN state = 'running' THEN $2 ELSE finished_at END \
         WHERE job_id = $3 AND state IN ('pending', 'running')",
    )
    .bind(leftover.as_str())
    .bind(now)
    .bind(job_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// What follows a job's move: waking readers, and for an ending, metrics, waiting workers and
/// the manifest's triggers.
async fn job_moved(state: &AppState, job_id: i64, next: JobState) {
    if next.is_terminal() {
        state.metrics.job_finished(next);
        state.events.work.notify_waiters();
        crate::triggers::job_ended(state, job_id).await;
    }
    state.events.job_changed(job_id);
}

async fn apply_task(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job_id: i64,
    task: &vmfarm_proto::wire::TaskUpdate,
    now: i64,
) -> AppResult<()> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT state FROM tasks WHERE job_id = $1 AND name = $2")
            .bind(job_id)
            .bind(&task.name)
            .fetch_optional(&mut **tx)
            .await?;
    let (current,) = row
        .ok_or_else(|| AppError::BadRequest(format!("job {job_id} has no task `{}`", task.name)))?;
    let current: TaskState = current.parse().map_err(AppError::internal)?;
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
    sqlx::query(
        "UPDATE tasks SET state = $1, exit_code = $2, started_at = COALESCE($3, started_at), \
         finished_at = COALESCE($4, finished_at) WHERE job_id = $5 AND name = $6",
    )
    .bind(task.state.as_str())
    .bind(task.exit_code.map(i64::from))
    .bind(started)
    .bind(finished)
    .bind(job_id)
    .bind(&task.name)
    .execute(&mut **tx)
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
        let mut tx = state.db.writer.begin().await?;
        // Requeued: the lease is dropped. Ended: finished_at is set and the lease stays on record.
        let sql = if next == JobState::Queued {
            "UPDATE jobs SET reason = $1, state = 'queued', attempt = attempt + 1, lease_id = NULL, \
             lease_expires_at = NULL, worker = NULL \
             WHERE id = $2 AND fence = $3 AND lease_expires_at < $4 AND state IN ('leased', 'booting', 'running')"
                .to_owned()
        } else {
            format!(
                "UPDATE jobs SET reason = $1, state = '{}', lease_expires_at = NULL, finished_at = $2 \
                 WHERE id = $3 AND fence = $4 AND lease_expires_at < $5 AND state IN ('leased', 'booting', 'running')",
                next.as_str()
            )
        };
        let mut query = sqlx::query(&sql).bind(&reason);
        if next != JobState::Queued {
            query = query.bind(now);
        }
        let done = query
            .bind(id)
            .bind(fence)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            continue;
        }
        let task_state = if next == JobState::Queued {
            sqlx::query("UPDATE tasks SET state = 'pending', exit_code = NULL, started_at = NULL, finished_at = NULL WHERE job_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            None
        } else {
            Some(if next == JobState::Cancelled {
                TaskState::Cancelled
            } else {
                TaskState::Skipped
            })
        };
        if let Some(task_state) = task_state {
            sqlx::query(
                "UPDATE tasks SET state = $1 WHERE job_id = $2 AND state IN ('pending', 'running')",
            )
            .bind(task_state.as_str())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        crate::logs::append_farm_line(&mut tx, id, &reason).await?;
        tx.commit().await?;
        tracing::warn!(job = id, attempt, "{reason}");
        state.events.job_changed(id);
        if next != JobState::Queued {
            crate::triggers::job_ended(state, id).await;
        }
        moved += 1;
    }
    if moved > 0 {
        state.events.work.notify_waiters();
    }
    Ok(moved)
}
