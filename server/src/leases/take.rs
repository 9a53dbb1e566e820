//! Taking a lease: the oldest job of the highest priority whose image the worker has.

use crate::db::{Arg, Query, now_ms};
use crate::error::{AppError, AppResult};
use crate::state::AppState;
use crate::workers::{self, WorkerView};
use std::time::{Duration, Instant};
use vmfarm_proto::JobState;
use vmfarm_proto::names::{NameKind, check_name};
use vmfarm_proto::wire::{LeaseLimits, LeaseRequest, LeaseResponse, LeasedJob, NetworkGrant};

/// Most images one worker may announce.
pub const MAX_WORKER_IMAGES: usize = 256;

/// How often a worker's presence is written down at most.
const SEEN_EVERY: Duration = Duration::from_secs(1);

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

/// The worker as it calls in, when it is due to be written down (at most once per
/// [`SEEN_EVERY`]).
fn worker_seen(state: &AppState, req: &LeaseRequest) -> Option<WorkerView> {
    if let Ok(mut seen) = state.workers_seen.lock() {
        let now = Instant::now();
        match seen.get(&req.name) {
            Some(last) if now.duration_since(*last) < SEEN_EVERY => return None,
            _ => {
                seen.insert(req.name.clone(), now);
            }
        }
    }
    Some(WorkerView {
        name: req.name.clone(),
        last_seen: now_ms(),
        slots: i64::from(req.slots),
        images: req.images.clone(),
        version: req.version.clone(),
        cache: req.cache,
    })
}

/// The statement that leases the best queued job of `images` images. The best job of each
/// image is one index seek (state, image, priority DESC, id); the best of those few wins. Far
/// cheaper than sorting every queued job of the images.
fn lease_sql(images: usize, skip_locked: &str) -> String {
    let per_image: Vec<String> = (0..images)
        .map(|i| {
            format!(
                "SELECT id, priority FROM (SELECT id, priority FROM jobs WHERE state = 'queued' AND image = ${} \
                 ORDER BY priority DESC, id LIMIT 1{skip_locked}) AS q{i}",
                i + 6,
            )
        })
        .collect();
    format!(
        "UPDATE jobs SET state = $1, lease_id = $2, fence = fence + 1, lease_expires_at = $3, \
         leased_at = $4, worker = $5, log_seq = 0 \
         WHERE id = (SELECT id FROM ({}) AS best ORDER BY priority DESC, id LIMIT 1) AND state = 'queued' \
         RETURNING id, group_id, image, manifest, secrets, attempt, fence, timeout_ms, owner",
        per_image.join(" UNION ALL ")
    )
}

/// Takes the oldest job of the highest priority whose image the worker has, if any.
pub async fn try_lease(
    state: &AppState,
    worker: &str,
    req: &LeaseRequest,
) -> AppResult<Option<LeaseResponse>> {
    check_request(worker, req)?;
    let seen = worker_seen(state, req);
    if req.images.is_empty() {
        if let Some(seen) = seen {
            state
                .db
                .write(move |tx| Box::pin(async move { workers::record(tx, &seen).await }))
                .await?;
        }
        return Ok(None);
    }
    let started = Instant::now();
    let now = now_ms();
    let expires_at = super::expiry(state, now);
    let ttl_ms = super::ttl_ms(state);
    let config = &state.config.limits;
    let limits = LeaseLimits {
        max_log_bytes: config.max_log_size.0,
        max_artifact_bytes: config.max_artifact_size.0,
        max_artifacts_total_bytes: config.max_artifacts_per_job.0,
    };
    let network = NetworkGrant {
        allow_private: state.config.network.allow_private.clone(),
    };
    let lease_id = crate::random::random_hex(16).map_err(AppError::internal)?;
    let sql = lease_sql(req.images.len(), state.db.skip_locked());
    let worker = worker.to_owned();
    let images: Vec<String> = req.images.iter().map(|i| i.name.clone()).collect();
    let secret_key = state.secret_key.clone();
    let leased = state
        .db
        .write(move |tx| {
            Box::pin(async move {
                if let Some(seen) = &seen {
                    workers::record(tx, seen).await?;
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
                let (secrets, left_out) =
                    crate::secrets::for_lease(tx, &secret_key, &row.text(4)?, &row.text(8)?)
                        .await?;
                for line in &left_out {
                    crate::logs::append_farm_line(tx, job_id, line).await?;
                }
                let lease = LeaseResponse {
                    fence: u64::try_from(row.int(6)?).unwrap_or(0),
                    expires_at,
                    ttl_ms,
                    limits,
                    job: LeasedJob {
                        id: job_id.to_string(),
                        group_id: row.int(1)?.to_string(),
                        image: row.text(2)?,
                        manifest: row.text(3)?,
                        attempt: u32::try_from(row.int(5)?).unwrap_or(u32::MAX),
                        timeout_ms: u64::try_from(row.int(7)?).unwrap_or(0),
                    },
                    secrets,
                    network,
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
