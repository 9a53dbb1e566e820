//! Triggers: when a job reaches its final state, each `[[triggers]]` of its manifest that fires
//! for that outcome gets a delivery: a POST of the job's JSON to its webhook, retried with
//! exponential backoff until it is answered 2xx or its attempts are used. Deliveries live in the
//! database, so a restart goes on with them, and the job page shows their status.

use crate::db::{DbFailure, Query, Row, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use crate::state::AppState;
use serde::Serialize;
use std::time::Duration;
use vmfarm_proto::JobState;
use vmfarm_proto::manifest::Trigger;

/// A delivery as the job page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryView {
    pub on: String,
    pub url: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    pub attempts: i64,
    pub last_status: Option<String>,
    pub next_attempt_at: i64,
}

/// Queues the deliveries of the triggers that fire for job `job_id` ending in `end`, in the
/// transaction that ends it ([`crate::job_end::end_job`]): they commit together with the job's
/// end, or not at all. [`wake`] the delivery loop once it has committed.
pub async fn queue_in(tx: &mut WriteTx, job_id: i64, end: JobState, now: i64) -> AppResult<()> {
    let Some(row) = tx
        .fetch_optional("SELECT triggers FROM jobs WHERE id = $1", &[job_id.into()])
        .await?
    else {
        return Ok(());
    };
    let triggers: Vec<Trigger> = serde_json::from_str(&row.text(0)?).map_err(AppError::internal)?;
    let succeeded = end == JobState::Succeeded;
    for trigger in triggers.iter().filter(|t| t.on.fires(succeeded)) {
        let on = serde_json::to_value(trigger.on).map_err(AppError::internal)?;
        tx.execute(
            "INSERT INTO trigger_deliveries (job_id, trigger_on, url, state, attempts, next_attempt_at, created_at) \
             VALUES ($1, $2, $3, 'pending', 0, $4, $4)",
            &[
                job_id.into(),
                on.as_str().unwrap_or("always").into(),
                trigger.webhook.as_str().into(),
                now.into(),
            ],
        )
        .await?;
    }
    Ok(())
}

/// After a job's end has committed: the delivery loop looks for deliveries to make.
pub fn wake(state: &AppState) {
    state.events.triggers.notify_one();
}

/// The deliveries of a job, oldest first.
pub async fn for_job(state: &AppState, job_id: i64) -> AppResult<Vec<DeliveryView>> {
    let rows = state
        .db
        .read()
        .fetch_all(
            "SELECT trigger_on, url, state, attempts, last_status, next_attempt_at \
             FROM trigger_deliveries WHERE job_id = $1 ORDER BY id",
            &[job_id.into()],
        )
        .await?;
    let view = |row: &Row| -> Result<DeliveryView, DbFailure> {
        Ok(DeliveryView {
            on: row.text(0)?,
            url: row.text(1)?,
            state: row.text(2)?,
            attempts: row.int(3)?,
            last_status: row.opt_text(4)?,
            next_attempt_at: row.int(5)?,
        })
    };
    Ok(rows.iter().map(view).collect::<Result<_, _>>()?)
}

/// The wait before retry `n` (1 = the first retry): `first * 2^(n-1)`, at most an hour.
pub fn backoff(first: Duration, retry: u32) -> Duration {
    let factor = 2u32.saturating_pow(retry.saturating_sub(1).min(20));
    first.saturating_mul(factor).min(Duration::from_secs(3600))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Makes every delivery that is due at `now`. Returns how many were tried.
pub async fn deliver_due(state: &AppState, http: &reqwest::Client, now: i64) -> AppResult<usize> {
    let due = state
        .db
        .read()
        .fetch_all(
            "SELECT id, job_id, url, attempts, next_attempt_at FROM trigger_deliveries \
             WHERE state = 'pending' AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT 32",
            &[now.into()],
        )
        .await?;
    let config = &state.config.triggers;
    let mut tried = 0;
    for row in due {
        let (id, job_id, url) = (row.int(0)?, row.int(1)?, row.text(2)?);
        let (attempts, next_at) = (row.int(3)?, row.int(4)?);
        // Claim it (another replica may be delivering too) until well after this try's timeout.
        let until = now.saturating_add(2 * ms(config.timeout.0));
        let claimed = state
            .db
            .execute(
                "UPDATE trigger_deliveries SET next_attempt_at = $1 WHERE id = $2 \
                 AND state = 'pending' AND next_attempt_at = $3",
                &[until.into(), id.into(), next_at.into()],
            )
            .await?;
        if claimed != 1 {
            continue;
        }
        tried += 1;
        let job = crate::job_views::get(&state.db, job_id).await?;
        let outcome = http
            .post(&url)
            .header("X-Vmfarm-Event", "job.finished")
            .timeout(config.timeout.0)
            .json(&job)
            .send()
            .await;
        let attempts = attempts + 1;
        let (ok, status) = match outcome {
            Ok(r) => (r.status().is_success(), r.status().to_string()),
            Err(e) if e.is_timeout() => (false, format!("no answer in {}", config.timeout)),
            Err(e) if e.is_connect() => (false, "cannot connect".to_owned()),
            Err(_) => (false, "request failed".to_owned()),
        };
        let finished = now_ms();
        let (next_state, next_at) = if ok {
            ("delivered", finished)
        } else if attempts >= i64::from(config.max_attempts) {
            ("failed", finished)
        } else {
            let retry = u32::try_from(attempts).unwrap_or(u32::MAX);
            (
                "pending",
                finished.saturating_add(ms(backoff(config.first_retry.0, retry))),
            )
        };
        tracing::info!(job = job_id, %url, attempts, %status, "webhook {next_state}");
        state
            .db
            .execute(
                "UPDATE trigger_deliveries SET state = $1, attempts = $2, last_status = $3, \
                 next_attempt_at = $4, finished_at = $5 WHERE id = $6",
                &[
                    next_state.into(),
                    attempts.into(),
                    status.as_str().into(),
                    next_at.into(),
                    (next_state != "pending").then_some(finished).into(),
                    id.into(),
                ],
            )
            .await?;
        state.events.job_changed(job_id);
    }
    Ok(tried)
}

/// Delivers webhooks for as long as the server runs: at once when a job ends, and every
/// half second for retries that come due.
pub async fn run(state: AppState) {
    let http = reqwest::Client::new();
    loop {
        if let Err(e) = deliver_due(&state, &http, now_ms()).await {
            tracing::error!(error = %e, "webhook delivery failed; trying again");
        }
        tokio::select! {
            _ = state.events.triggers.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_backoff_doubles_and_is_capped() {
        let first = Duration::from_secs(2);
        assert_eq!(backoff(first, 1), Duration::from_secs(2));
        assert_eq!(backoff(first, 2), Duration::from_secs(4));
        assert_eq!(backoff(first, 4), Duration::from_secs(16));
        assert_eq!(backoff(first, 40), Duration::from_secs(3600));
    }
}
