//! Taking a lease, fairly between users: the owner served longest ago (among those with queued
//! work under their running limit) gets the free slot, with its oldest job of the highest
//! priority whose image the worker has.

use crate::db::{Arg, Query, now_ms};
use crate::error::{AppError, AppResult};
use crate::state::AppState;
use crate::workers::{self, WorkerView};
use std::time::{Duration, Instant};
use vmfarm_proto::JobState;
use vmfarm_proto::names::{NameKind, check_name};
use vmfarm_proto::wire::{
    LeaseLimits, LeaseRequest, LeaseResponse, LeasedJob, MAX_HELD_CACHES, NetworkGrant,
};

use super::affinity;

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
    if req.caches.len() > MAX_HELD_CACHES {
        return Err(AppError::BadRequest(format!(
            "{} caches announced; the limit is {MAX_HELD_CACHES}",
            req.caches.len()
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

/// Owners whose turn may come, the one served longest ago first: those with a queued job of
/// one of `images` images (`$2`...) and, when `limited`, fewer jobs leased or running than `$1`.
/// The owners are walked in the order of `job_owners_turn`, a few index probes each, and the
/// walk stops at the first few: the first is the one served, unless a concurrent lease took its
/// job.
fn turns_sql(images: usize, limited: bool, left: &[i64]) -> String {
    let images: Vec<String> = (0..images).map(|i| format!("${}", i + 2)).collect();
    let but = but(left);
    let limit = if limited {
        "AND (SELECT COUNT(*) FROM jobs r WHERE r.state IN ('leased', 'booting', 'running') \
         AND r.owner = o.owner) < $1"
    } else {
        "AND $1 > 0"
    };
    // An owner with nothing queued at all is passed over with one probe, not one per image.
    format!(
        "SELECT o.owner FROM job_owners o \
         WHERE EXISTS (SELECT 1 FROM jobs q WHERE q.state = 'queued' AND q.owner = o.owner) \
         AND EXISTS (SELECT 1 FROM jobs j WHERE j.state = 'queued' \
         AND j.owner = o.owner AND j.image IN ({}){but}) {limit} \
         ORDER BY o.last_served_us, o.owner LIMIT {TURNS_TRIED}",
        images.join(", ")
    )
}

/// The condition that leaves out the jobs `left` to other workers ([`affinity`]); their ids
/// are integers the database gave.
fn but(left: &[i64]) -> String {
    match left {
        [] => String::new(),
        ids => {
            let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
            format!(" AND id NOT IN ({})", ids.join(", "))
        }
    }
}

/// How many of an owner's (`$1`) jobs are leased or running.
const RUNNING_SQL: &str =
    "SELECT COUNT(*) FROM jobs WHERE state IN ('leased', 'booting', 'running') AND owner = $1";

/// Owners tried by one lease at most.
const TURNS_TRIED: usize = 3;

/// The statement that leases one owner's (`$6`) best queued job of `images` images (`$7`...),
/// but those `left` to another worker ([`affinity`]). The best job of each image is one index
/// seek (state, owner, image, priority DESC, id); the best of those few wins. Far cheaper than
/// sorting every queued job of the images.
fn lease_sql(images: usize, skip_locked: &str, left: &[i64]) -> String {
    let but = but(left);
    let per_image: Vec<String> = (0..images)
        .map(|i| {
            format!(
                "SELECT id, priority FROM (SELECT id, priority FROM jobs WHERE state = 'queued' AND owner = $6 \
                 AND image = ${}{but} ORDER BY priority DESC, id LIMIT 1{skip_locked}) AS q{i}",
                i + 7,
            )
        })
        .collect();
    format!(
        "UPDATE jobs SET state = $1, lease_id = $2, fence = fence + 1, lease_expires_at = $3, \
         leased_at = $4, worker = $5, log_seq = 0 \
         WHERE id = (SELECT id FROM ({}) AS best ORDER BY priority DESC, id LIMIT 1) AND state = 'queued' \
         RETURNING id, group_id, image, manifest, secrets, attempt, fence, timeout_ms, owner, push_id, \
         created_at",
        per_image.join(" UNION ALL ")
    )
}

/// The queued jobs of `images` that wait for another worker than `asking` ([`affinity`]).
async fn left_to_others(
    tx: &mut crate::db::WriteTx,
    holders: &affinity::Holders,
    asking: &str,
    images: &[String],
    sql: &str,
    waited_from: i64,
) -> AppResult<Vec<i64>> {
    let now = Instant::now();
    if !holders.others_hold_caches(asking, now) {
        return Ok(Vec::new());
    }
    let mut args: Vec<Arg> = vec![waited_from.into()];
    args.extend(images.iter().map(Arg::from));
    let mut left = Vec::new();
    for row in tx.fetch_all(sql, &args).await? {
        let job = affinity::QueuedWithCaches {
            owner: row.text(1)?,
            image: row.text(2)?,
            caches: row.text(3)?,
        };
        if holders.leave_to_another(asking, &job, now) {
            left.push(row.int(0)?);
        }
    }
    Ok(left)
}

/// Takes a job whose image the worker has, if any: the turn's owner's oldest of the highest
/// priority, but for one that waits for a worker holding its caches.
pub async fn try_lease(
    state: &AppState,
    worker: &str,
    req: &LeaseRequest,
) -> AppResult<Option<LeaseResponse>> {
    check_request(worker, req)?;
    state.cache_holders.record(req, Instant::now());
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
    let skip_locked = state.db.skip_locked().to_owned();
    let holders = state.cache_holders.clone();
    let waiting_sql = affinity::waiting_sql(req.images.len());
    let waited_from = now - i64::try_from(affinity::WAIT.as_millis()).unwrap_or(i64::MAX);
    let limit = state.config.limits.max_running_per_user;
    let limited = limit.is_some();
    // A concurrent lease of the same owner's job (PostgreSQL) is writing about the same time
    // already: that one is kept rather than waited for.
    let limit_lock_sql = limit
        .is_some()
        .then(|| crate::jobs::lock_owner_sql(&state.db));
    let served_sql = format!(
        "UPDATE job_owners SET last_served_us = $1 WHERE owner = \
         (SELECT owner FROM job_owners WHERE owner = $2{})",
        state.db.skip_locked()
    );
    let max_running = limit.map_or(i64::MAX, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let served_us = crate::db::now_us();
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
                let left =
                    left_to_others(tx, &holders, &worker, &images, &waiting_sql, waited_from)
                        .await?;
                let sql = lease_sql(images.len(), &skip_locked, &left);
                let turns_sql = turns_sql(images.len(), limited, &left);
                let mut turn_args: Vec<Arg> = vec![max_running.into()];
                turn_args.extend(images.iter().map(Arg::from));
                let turns = tx.fetch_all(&turns_sql, &turn_args).await?;
                let mut leased = None;
                for turn in turns {
                    let owner = turn.text(0)?;
                    let mut args: Vec<Arg> = vec![
                        JobState::Leased.as_str().into(),
                        (&lease_id).into(),
                        expires_at.into(),
                        now.into(),
                        (&worker).into(),
                        (&owner).into(),
                    ];
                    args.extend(images.iter().map(Arg::from));
                    if let Some(lock_sql) = &limit_lock_sql {
                        // Counted again with the owner's row held, so that concurrent leases
                        // (PostgreSQL) cannot both pass the limit.
                        tx.fetch_optional(lock_sql, &[(&owner).into()]).await?;
                        let running = tx
                            .fetch_optional(RUNNING_SQL, &[(&owner).into()])
                            .await?
                            .map_or(Ok(0), |row| row.int(0))?;
                        if running >= max_running {
                            continue;
                        }
                    }
                    if let Some(row) = tx.fetch_optional(&sql, &args).await? {
                        tx.execute(&served_sql, &[served_us.into(), (&owner).into()])
                            .await?;
                        leased = Some(row);
                        break;
                    }
                }
                let Some(row) = leased else {
                    return Ok(None);
                };
                let job_id = row.int(0)?;
                let (secrets, left_out) =
                    crate::secrets::for_lease(tx, &secret_key, &row.text(4)?, &row.text(8)?)
                        .await?;
                for line in &left_out {
                    crate::logs::append_farm_line(tx, job_id, line).await?;
                }
                let checkout = match row.opt_int(9)? {
                    Some(push_id) => Some(crate::pushes::checkout(tx, push_id).await?),
                    None => None,
                };
                let lease = LeaseResponse {
                    fence: u64::try_from(row.int(6)?).unwrap_or(0),
                    expires_at,
                    ttl_ms,
                    limits,
                    job: LeasedJob {
                        id: job_id.to_string(),
                        group_id: row.int(1)?.to_string(),
                        image: row.text(2)?,
                        owner: row.text(8)?,
                        manifest: row.text(3)?,
                        attempt: u32::try_from(row.int(5)?).unwrap_or(u32::MAX),
                        timeout_ms: u64::try_from(row.int(7)?).unwrap_or(0),
                        checkout,
                    },
                    secrets,
                    network,
                    lease_id,
                };
                let waited = now.saturating_sub(row.int(10)?);
                Ok::<_, AppError>(Some((job_id, waited, lease)))
            })
        })
        .await?;
    let Some((job_id, waited, lease)) = leased else {
        return Ok(None);
    };
    let waited = Duration::from_millis(u64::try_from(waited).unwrap_or(0));
    if req.slots <= 1 {
        state.cache_holders.busy(&req.name);
    }
    state
        .metrics
        .job_leased(&lease.job.image, waited, started.elapsed());
    state.events.job_changed(job_id);
    Ok(Some(lease))
}

#[cfg(test)]
mod tests {
    use crate::test_utils::{ALICE, BOB, Database, TestApp, on_both_databases};
    use axum::http::StatusCode;
    use vmfarm_proto::JobState;

    on_both_databases!(
        test_free_slots_go_round_robin_between_users,
        test_a_user_at_the_running_limit_waits_its_turn,
        test_a_submit_past_the_queue_limit_gets_429_naming_it,
        test_a_job_with_caches_waits_for_the_worker_that_holds_them,
    );

    fn job(image: &str, priority: i64) -> String {
        format!(
            "image = \"{image}\"\npriority = {priority}\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n"
        )
    }

    /// The owner of each job leased by `n` leases of worker w0 on image `a`.
    async fn lease_owners(app: &TestApp, n: usize) -> Vec<String> {
        let mut owners = Vec::new();
        for _ in 0..n {
            let lease = app.lease("w0", "a").await;
            let id: i64 = lease.job.id.parse().unwrap();
            owners.push(app.job(id).await["owner"].as_str().unwrap().to_owned());
        }
        owners
    }

    async fn test_free_slots_go_round_robin_between_users(db: Database) {
        let app = TestApp::new(db).await;
        let mut alices = Vec::new();
        for i in 0..50 {
            // Her later jobs ask for more: priority orders her own queue, not the others'.
            alices.push(app.submit_as(ALICE, &job("a", i % 3)).await[0]);
        }
        let first = app.lease("w0", "a").await;
        assert_eq!(
            first.job.id,
            alices[2].to_string(),
            "her best: priority 2, oldest"
        );
        let bobs = app.submit_as(BOB, &job("a", 0)).await[0];
        let next = app.lease("w0", "a").await;
        assert_eq!(
            next.job.id,
            bobs.to_string(),
            "Bob's one job takes the next free slot, ahead of Alice's 49"
        );
        app.submit_as(BOB, &job("a", 0)).await;
        app.submit_as(BOB, &job("a", 0)).await;
        assert_eq!(
            lease_owners(&app, 6).await,
            ["alice", "bob", "alice", "bob", "alice", "alice"],
            "turns alternate while both have work"
        );
    }

    async fn test_a_user_at_the_running_limit_waits_its_turn(db: Database) {
        let app = TestApp::with_config(db, |c| {
            c.limits.max_running_per_user = Some(1);
            c.leases.long_poll =
                vmfarm_proto::units::HumanDuration(std::time::Duration::from_millis(300));
        })
        .await;
        for _ in 0..3 {
            app.submit_as(ALICE, &job("a", 0)).await;
        }
        app.submit_as(BOB, &job("a", 0)).await;
        let hers = app.lease("w0", "a").await;
        assert_eq!(lease_owners(&app, 1).await, ["bob"]);
        let none = app
            .post(
                "/api/workers/lease",
                &crate::test_utils::worker_token("w0"),
                r#"{"name": "w0", "images": [{"name": "a", "version": "v1"}], "slots": 1, "version": "test"}"#,
            )
            .await;
        assert_eq!(
            none.status,
            StatusCode::NO_CONTENT,
            "Alice has 2 queued but 1 running, her limit: {:?}",
            none.body
        );
        app.start("w0", &hers).await;
        app.move_job("w0", &hers, JobState::Succeeded).await;
        assert_eq!(
            lease_owners(&app, 1).await,
            ["alice"],
            "her slot is free again"
        );
    }

    async fn test_a_submit_past_the_queue_limit_gets_429_naming_it(db: Database) {
        let app = TestApp::with_config(db, |c| c.limits.max_queued_per_user = Some(2)).await;
        let two = "images = [\"a\", \"b\"]\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n";
        assert_eq!(app.submit_as(ALICE, two).await.len(), 2);
        let refused = app.post("/api/jobs", ALICE, job("a", 0)).await;
        assert_eq!(
            refused.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{:?}",
            refused.body
        );
        assert_eq!(
            refused.error(),
            "user `alice` has 2 jobs queued and this adds 1; the limit is 2 \
             (max_queued_per_user): wait for some to start"
        );
        assert_eq!(
            app.submit_as(BOB, &job("a", 0)).await.len(),
            1,
            "Bob has his own"
        );
        app.lease("w0", "a").await;
        assert_eq!(
            app.submit_as(ALICE, &job("a", 0)).await.len(),
            1,
            "a started job frees its place in the queue"
        );
    }

    /// Worker `worker` asks for a job of image `a`, naming the caches it holds; the job's id,
    /// or `None` when it gets none.
    async fn ask(app: &TestApp, worker: &str, caches: &[(&str, &str)]) -> Option<String> {
        let caches: Vec<serde_json::Value> = caches
            .iter()
            .map(|(owner, name)| serde_json::json!({"owner": owner, "image": "a", "name": name}))
            .collect();
        let request = serde_json::json!({
            "name": worker, "images": [{"name": "a", "version": "v1"}], "slots": 1,
            "version": "test", "caches": caches,
        });
        let answer = app
            .call(
                axum::http::Method::POST,
                "/api/workers/lease",
                Some(&crate::test_utils::worker_token(worker)),
                &[("content-type", "application/json".into())],
                axum::body::Body::from(request.to_string()),
            )
            .await;
        match answer.status {
            StatusCode::OK => Some(answer.body["job"]["id"].as_str().unwrap().to_owned()),
            StatusCode::NO_CONTENT => None,
            other => panic!("lease answered {other}: {:?}", answer.body),
        }
    }

    async fn test_a_job_with_caches_waits_for_the_worker_that_holds_them(db: Database) {
        let app = TestApp::with_config(db, |c| {
            c.leases.long_poll =
                vmfarm_proto::units::HumanDuration(std::time::Duration::from_millis(200));
        })
        .await;
        let cached = |name: &str| {
            format!(
                "image = \"a\"\n[[caches]]\nname = \"{name}\"\npaths = [\"~/.cache\"]\nsize = \"1GiB\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n"
            )
        };
        // w0 holds Alice's `pip`, and asks for work (there is none yet).
        assert_eq!(ask(&app, "w0", &[("alice", "pip")]).await, None);
        let pip = app.submit_as(ALICE, &cached("pip")).await[0].to_string();
        assert_eq!(
            ask(&app, "w1", &[]).await,
            None,
            "w1 lacks the cache, and w0, which holds it, asks for work"
        );
        let plain = app.submit_as(ALICE, &job("a", 0)).await[0].to_string();
        assert_eq!(
            ask(&app, "w1", &[]).await,
            Some(plain),
            "a job without caches"
        );
        assert_eq!(ask(&app, "w0", &[("alice", "pip")]).await, Some(pip));
        let bobs = app.submit_as(BOB, &cached("pip")).await[0].to_string();
        assert_eq!(
            ask(&app, "w1", &[]).await,
            Some(bobs),
            "Bob's `pip` is not Alice's: nobody holds it, the first to ask takes it"
        );
        let other = app.submit_as(ALICE, &cached("npm")).await[0].to_string();
        assert_eq!(ask(&app, "w1", &[]).await, Some(other));
    }
}
