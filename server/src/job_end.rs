//! How a job ends, or goes back to the queue, in one place. A worker's final report, a cancel
//! and the lease reaper all end jobs here, so that the job's and every task's end state and
//! times follow one rule (CONTRACTS.md, "States"):
//!
//! - the job gets its end state, `finished_at`, and the reason when one is given;
//! - a task still `running` was cut short: `timed_out` when the job timed out, else `cancelled`,
//!   with `finished_at`; tasks still `pending` never ran: `skipped`, without times; tasks that
//!   had ended keep their state;
//! - the manifest's triggers get their deliveries, in the same transaction;
//! - an end the worker did not report (a cancel before it ran, the reaper) is said in the log.
//!
//! A requeued job ([`requeue_job`]) starts its next attempt clean: queued, no lease, its tasks
//! `pending` without exit codes or times, no artifacts (the lost attempt's are discarded), and
//! its log goes on after a farm line that starts the new attempt's section.

use crate::db::{Query, WriteTx};
use crate::error::{AppError, AppResult};
use crate::logs::append_farm_line;
use crate::state::AppState;
use crate::triggers;
use vmfarm_proto::{JobState, TaskState};

/// A job as a write read it in its transaction: an end applies only if it is still so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub id: i64,
    pub state: JobState,
    /// The fence of its newest lease: a lease taken meanwhile makes the end miss.
    pub fence: i64,
}

impl Seen {
    /// Reads job `id`'s state and fence in `tx`, locking its row until the write ends (on
    /// PostgreSQL; SQLite's writer is alone anyway).
    pub async fn read(tx: &mut WriteTx, id: i64) -> AppResult<Seen> {
        let sql = format!(
            "SELECT state, fence FROM jobs WHERE id = $1{}",
            tx.for_update()
        );
        let row = tx
            .fetch_optional(&sql, &[id.into()])
            .await?
            .ok_or_else(|| AppError::NotFound(format!("no job {id}")))?;
        Ok(Seen {
            id,
            state: row.parsed(0)?,
            fence: row.int(1)?,
        })
    }
}

/// Who ends a job: it decides what happens to the lease and whether the log says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    /// Its worker reported the end. The lease stays on record, so that a retried report is
    /// accepted; the worker's log already says why.
    Worker,
    /// A user cancelled it before any worker had it.
    User,
    /// The farm itself, before any worker had it: its image cannot be had (`vmfarm up` could
    /// not build it).
    Farm,
    /// The reaper: its worker stopped renewing the lease. The lease is dropped, so that the
    /// lost worker's late writes are refused.
    Reaper,
}

/// How a job ends.
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    /// A terminal state.
    pub state: JobState,
    /// Kept as the job's reason when given.
    pub reason: Option<&'a str>,
    pub by: EndedBy,
    pub now: i64,
}

/// A job's end as it committed: what [`ended`] follows it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub job: i64,
    pub state: JobState,
    /// How long it ran, when it had started.
    pub ran: Option<std::time::Duration>,
}

/// Ends job `seen` as `end`. `Ok(None)`: the job is no longer as `seen` (another write moved it
/// first), and nothing changed. An end the job's state cannot take is refused.
pub async fn end_job(tx: &mut WriteTx, seen: &Seen, end: &End<'_>) -> AppResult<Option<Ended>> {
    if !end.state.is_terminal() || !seen.state.can_become(end.state) {
        return Err(AppError::Conflict(format!(
            "job {} cannot go from {} to {}",
            seen.id, seen.state, end.state
        )));
    }
    let keeps_lease = i64::from(end.by == EndedBy::Worker);
    let moved = tx
        .fetch_optional(
            "UPDATE jobs SET state = $1, finished_at = $2, reason = COALESCE($3, reason), \
             lease_expires_at = NULL, lease_id = CASE WHEN $4 = 1 THEN lease_id ELSE NULL END \
             WHERE id = $5 AND state = $6 AND fence = $7 RETURNING finished_at - started_at",
            &[
                end.state.as_str().into(),
                end.now.into(),
                end.reason.into(),
                keeps_lease.into(),
                seen.id.into(),
                seen.state.as_str().into(),
                seen.fence.into(),
            ],
        )
        .await?;
    let Some(row) = moved else {
        return Ok(None);
    };
    let ran = row
        .opt_int(0)?
        .and_then(|ms| u64::try_from(ms).ok())
        .map(std::time::Duration::from_millis);
    tx.execute(
        "UPDATE tasks SET state = CASE WHEN state = 'running' THEN $1 ELSE $2 END, \
         finished_at = CASE WHEN state = 'running' THEN $3 ELSE finished_at END \
         WHERE job_id = $4 AND state IN ('pending', 'running')",
        &[
            cut_short(end.state).as_str().into(),
            TaskState::Skipped.as_str().into(),
            end.now.into(),
            seen.id.into(),
        ],
    )
    .await?;
    triggers::queue_in(tx, seen.id, end.state, end.now).await?;
    crate::commit_status::queue_in(tx, seen.id, end.state, end.now).await?;
    if end.by != EndedBy::Worker
        && let Some(reason) = end.reason
    {
        append_farm_line(tx, seen.id, reason).await?;
    }
    Ok(Some(Ended {
        job: seen.id,
        state: end.state,
        ran,
    }))
}

/// What a task still running becomes when its job ends as `job`.
fn cut_short(job: JobState) -> TaskState {
    match job {
        JobState::TimedOut => TaskState::TimedOut,
        _ => TaskState::Cancelled,
    }
}

/// Sends job `seen` back to the queue for its next attempt, saying `reason` in its log.
/// `Ok(None)`: the job is no longer as `seen`, and nothing changed; `Ok(Some(attempt))`: the
/// attempt that was lost, whose stored artifacts the caller removes once this has committed.
pub async fn requeue_job(tx: &mut WriteTx, seen: &Seen, reason: &str) -> AppResult<Option<i64>> {
    let Some(row) = tx
        .fetch_optional(
            "UPDATE jobs SET state = 'queued', attempt = attempt + 1, reason = $1, lease_id = NULL, \
             lease_expires_at = NULL, worker = NULL, leased_at = NULL, started_at = NULL, \
             image_version = NULL WHERE id = $2 AND state = $3 AND fence = $4 \
             AND state IN ('leased', 'booting', 'running') RETURNING attempt",
            &[
                reason.into(),
                seen.id.into(),
                seen.state.as_str().into(),
                seen.fence.into(),
            ],
        )
        .await?
    else {
        return Ok(None);
    };
    let next = row.int(0)?;
    tx.execute(
        "UPDATE tasks SET state = 'pending', exit_code = NULL, started_at = NULL, finished_at = NULL \
         WHERE job_id = $1",
        &[seen.id.into()],
    )
    .await?;
    tx.execute("DELETE FROM artifacts WHERE job_id = $1", &[seen.id.into()])
        .await?;
    append_farm_line(tx, seen.id, reason).await?;
    append_farm_line(
        tx,
        seen.id,
        &format!("attempt {next} starts when a worker takes the job"),
    )
    .await?;
    Ok(Some(next - 1))
}

/// What follows a job's end once it has committed: the metrics, long-polling workers, and the
/// outbox (webhooks, commit statuses).
pub fn ended(state: &AppState, ended: &Ended) {
    state.metrics.job_finished(ended.state, ended.ran);
    state.events.new_work();
    crate::outbox::wake(state);
}

#[cfg(test)]
mod tests {
    use crate::leases::reaper::reap_expired;
    use crate::test_utils::{ADMIN, Answer, Database, TestApp, on_both_databases};
    use axum::body::Body;
    use axum::http::{Method, StatusCode};
    use serde_json::{Value, json};
    use vmfarm_proto::wire::LeaseResponse;
    use vmfarm_proto::{JobState, TaskState};

    on_both_databases!(
        test_cancel_of_a_queued_job_skips_every_task,
        test_cancel_of_a_running_job_cuts_its_task_and_skips_the_rest,
        test_a_failed_task_skips_the_rest,
        test_a_timed_out_job_times_its_running_task_out,
        test_a_lost_attempt_is_requeued_clean,
        test_a_lost_last_attempt_ends_in_error,
        test_a_lost_job_with_a_pending_cancel_ends_cancelled,
    );

    const TWO_TASKS: &str = "image = \"a\"\n[[tasks]]\nname = \"x\"\nscript = \"true\"\n\
                             [[tasks]]\nname = \"y\"\nscript = \"true\"\n\
                             [[triggers]]\non = \"failure\"\nwebhook = \"http://127.0.0.1:9/hook\"\n";

    fn task(job: &Value, i: usize) -> &Value {
        &job["tasks"][i]
    }

    /// The stored times of job `id`'s tasks, by index: (started_at, finished_at).
    async fn task_times(app: &TestApp, id: i64) -> Vec<(Option<i64>, Option<i64>)> {
        use crate::db::Query;
        app.state
            .db
            .read()
            .fetch_all(
                "SELECT started_at, finished_at FROM tasks WHERE job_id = $1 ORDER BY idx",
                &[id.into()],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.opt_int(0).unwrap(), r.opt_int(1).unwrap()))
            .collect()
    }

    /// A job of [`TWO_TASKS`] leased by `w0`, running its first task.
    async fn running_job(app: &TestApp) -> (i64, LeaseResponse) {
        let id = app.submit(TWO_TASKS).await[0];
        let lease = app.lease("w0", "a").await;
        app.start("w0", &lease).await;
        app.move_task("w0", &lease, "x", TaskState::Running, None)
            .await;
        (id, lease)
    }

    async fn deliveries(app: &TestApp, id: i64) -> usize {
        crate::triggers::for_job(&app.state, id)
            .await
            .unwrap()
            .len()
    }

    async fn cancel(app: &TestApp, id: i64) -> Answer {
        app.call(
            Method::POST,
            &format!("/api/jobs/{id}/cancel"),
            Some(ADMIN),
            &[],
            Body::empty(),
        )
        .await
    }

    async fn test_cancel_of_a_queued_job_skips_every_task(db: Database) {
        let app = TestApp::new(db).await;
        let id = app.submit(TWO_TASKS).await[0];
        let job = cancel(&app, id).await.body;
        assert_eq!(job["state"], "cancelled");
        assert_eq!(job["reason"], "cancelled before it started");
        assert!(job["finished_at"].is_i64());
        assert_eq!(task(&job, 0)["state"], "skipped");
        assert_eq!(task(&job, 1)["state"], "skipped");
        assert_eq!(task_times(&app, id).await, [(None, None), (None, None)]);
        assert!(
            app.log(id)
                .await
                .contains("[vmfarm] cancelled before it started\n")
        );
        assert_eq!(
            deliveries(&app, id).await,
            1,
            "a cancel is a failure for triggers"
        );
        let again = cancel(&app, id).await;
        assert_eq!(again.status, StatusCode::CONFLICT);
        assert!(again.error().contains("has already ended (cancelled)"));
    }

    async fn test_cancel_of_a_running_job_cuts_its_task_and_skips_the_rest(db: Database) {
        let app = TestApp::new(db).await;
        let (id, lease) = running_job(&app).await;
        let job = cancel(&app, id).await.body;
        assert_eq!(
            job["state"], "running",
            "it stops when its worker hears of it"
        );
        let heartbeat = app.lease_post("w0", &lease, "heartbeat", &json!({})).await;
        assert_eq!(heartbeat.body["cancel"], true);
        app.move_job("w0", &lease, JobState::Cancelled).await;
        let job = app.job(id).await;
        assert_eq!(job["state"], "cancelled");
        assert_eq!(task(&job, 0)["state"], "cancelled");
        assert_eq!(task(&job, 1)["state"], "skipped");
        let times = task_times(&app, id).await;
        assert!(times[0].0.is_some() && times[0].1.is_some(), "{times:?}");
        assert_eq!(times[1], (None, None));
        assert_eq!(deliveries(&app, id).await, 1);
        // The worker's retried report is accepted and changes nothing.
        app.move_job("w0", &lease, JobState::Cancelled).await;
        assert_eq!(deliveries(&app, id).await, 1);
    }

    async fn test_a_failed_task_skips_the_rest(db: Database) {
        let app = TestApp::new(db).await;
        let (id, lease) = running_job(&app).await;
        app.move_task("w0", &lease, "x", TaskState::Failed, Some(2))
            .await;
        app.move_job("w0", &lease, JobState::Failed).await;
        let job = app.job(id).await;
        assert_eq!(job["state"], "failed");
        assert_eq!(task(&job, 0)["state"], "failed");
        assert_eq!(task(&job, 0)["exit_code"], 2);
        assert_eq!(task(&job, 1)["state"], "skipped");
        assert_eq!(task_times(&app, id).await[1], (None, None));
        // An ended job does not move again.
        let update = vmfarm_proto::wire::StateUpdate {
            job_state: Some(JobState::Succeeded),
            ..Default::default()
        };
        let answer = app.report("w0", &lease, &update).await;
        assert_eq!(answer.status, StatusCode::CONFLICT);
        assert!(
            answer
                .error()
                .contains("cannot go from failed to succeeded"),
            "{:?}",
            answer.body
        );
    }

    async fn test_a_timed_out_job_times_its_running_task_out(db: Database) {
        let app = TestApp::new(db).await;
        let (id, lease) = running_job(&app).await;
        app.move_job("w0", &lease, JobState::TimedOut).await;
        let job = app.job(id).await;
        assert_eq!(job["state"], "timed_out");
        assert_eq!(task(&job, 0)["state"], "timed_out");
        assert_eq!(task(&job, 1)["state"], "skipped");
        assert!(task_times(&app, id).await[0].1.is_some());
    }

    async fn test_a_lost_attempt_is_requeued_clean(db: Database) {
        let app = TestApp::new(db).await;
        let (id, lease) = running_job(&app).await;
        let log = json!({"seq": 1, "chunks": [{"stream": "task", "task": "x", "ts_ms": 1, "data": "half a li"}]});
        assert_eq!(
            app.lease_post("w0", &lease, "log", &log).await.status,
            StatusCode::OK
        );
        assert_eq!(
            app.upload("w0", &lease, "out/a.bin", b"first attempt")
                .await
                .status,
            StatusCode::CREATED
        );
        let stored = app.dir.path().join(format!("artifacts/{id}/1/out/a.bin"));
        assert!(stored.exists());

        app.expire(id).await;
        assert_eq!(reap_expired(&app.state).await.unwrap(), 1);
        let job = app.job(id).await;
        assert_eq!(job["state"], "queued");
        assert_eq!(job["attempt"], 2);
        assert!(job["started_at"].is_null());
        assert_eq!(task(&job, 0)["state"], "pending");
        assert!(task(&job, 0)["exit_code"].is_null());
        assert_eq!(task_times(&app, id).await, [(None, None), (None, None)]);
        let artifacts = app.get(&format!("/api/jobs/{id}/artifacts"), ADMIN).await;
        assert_eq!(artifacts.body, json!([]));
        assert!(!stored.exists(), "the lost attempt's file is removed");
        let text = app.log(id).await;
        assert!(
            text.starts_with(
                "half a li\n[vmfarm] attempt 1 lost: its worker stopped renewing the lease\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("[vmfarm] attempt 2 starts when a worker takes the job\n"),
            "{text}"
        );
        assert_eq!(deliveries(&app, id).await, 0, "a requeue is not an end");

        // The lost worker's writes change nothing.
        let zombie = json!({"seq": 2, "chunks": [{"stream": "task", "task": "x", "ts_ms": 2, "data": "zombie"}]});
        assert_eq!(
            app.lease_post("w0", &lease, "log", &zombie).await.status,
            StatusCode::CONFLICT
        );
        assert_eq!(
            app.upload("w0", &lease, "late.bin", b"late").await.status,
            StatusCode::CONFLICT
        );
        assert!(!app.log(id).await.contains("zombie"));

        // The next attempt starts its own log section and its own artifacts.
        let second = app.lease("w1", "a").await;
        assert_eq!(second.job.attempt, 2);
        assert_eq!(
            app.upload("w1", &second, "out/a.bin", b"second")
                .await
                .status,
            StatusCode::CREATED
        );
        let download = app
            .get(&format!("/api/jobs/{id}/artifacts/out/a.bin"), ADMIN)
            .await;
        assert_eq!(download.body, json!("second"));
    }

    async fn test_a_lost_last_attempt_ends_in_error(db: Database) {
        let app = TestApp::with_config(db, |c| c.leases.max_attempts = 1).await;
        let (id, lease) = running_job(&app).await;
        app.expire(id).await;
        assert_eq!(reap_expired(&app.state).await.unwrap(), 1);
        let job = app.job(id).await;
        assert_eq!(job["state"], "error");
        assert!(
            job["reason"]
                .as_str()
                .unwrap()
                .contains("giving up after 1 attempts"),
            "{job}"
        );
        assert!(job["finished_at"].is_i64());
        assert_eq!(task(&job, 0)["state"], "cancelled");
        assert_eq!(task(&job, 1)["state"], "skipped");
        let times = task_times(&app, id).await;
        assert!(
            times[0].1.is_some(),
            "the cut task has its end time: {times:?}"
        );
        assert_eq!(deliveries(&app, id).await, 1);
        assert!(
            app.log(id)
                .await
                .contains("[vmfarm] its worker was lost 1 times")
        );
        // The lost worker cannot report anything more, not even its own end.
        let update = vmfarm_proto::wire::StateUpdate {
            job_state: Some(JobState::Succeeded),
            ..Default::default()
        };
        assert_eq!(
            app.report("w0", &lease, &update).await.status,
            StatusCode::CONFLICT
        );
        assert_eq!(app.job(id).await["state"], "error");
    }

    async fn test_a_lost_job_with_a_pending_cancel_ends_cancelled(db: Database) {
        let app = TestApp::new(db).await;
        let id = app.submit(TWO_TASKS).await[0];
        let lease = app.lease("w0", "a").await;
        app.move_job("w0", &lease, JobState::Booting).await;
        assert_eq!(cancel(&app, id).await.status, StatusCode::OK);
        app.expire(id).await;
        assert_eq!(reap_expired(&app.state).await.unwrap(), 1);
        let job = app.job(id).await;
        assert_eq!(job["state"], "cancelled");
        assert_eq!(task(&job, 0)["state"], "skipped");
        assert_eq!(task(&job, 1)["state"], "skipped");
        // Nothing is left to reap.
        assert_eq!(reap_expired(&app.state).await.unwrap(), 0);
    }
}
