//! Calls the server makes to others on a job's behalf, each a row of an outbox table (webhook
//! deliveries of `[[triggers]]`, commit statuses to a forge): tried when due, retried with
//! exponential backoff until answered 2xx or out of attempts (`[triggers]` config for both).
//! Rows live in the database, so a restart goes on with them; a row is claimed before its call,
//! so that replicas do not make it twice.

use crate::db::{Query, Row, now_ms};
use crate::error::{AppError, AppResult};
use crate::metrics::CallOutcome;
use crate::outbound::{OutboundError, Reach};
use crate::state::AppState;
use std::future::Future;
use std::time::Duration;

/// One outbox table: its name, the columns a call needs beyond `id, job_id, attempts,
/// next_attempt_at` (read from the row's 5th column on), and a condition on its rows (alias
/// `o`) that keeps a row waiting although it is due.
pub struct Outbox {
    pub table: &'static str,
    /// What its calls are, in the metrics: `webhook`, `commit_status`.
    pub kind: &'static str,
    pub columns: &'static str,
    pub wait_while: &'static str,
}

/// The wait before retry `n` (1 = the first retry): `first * 2^(n-1)`, at most an hour.
pub fn backoff(first: Duration, retry: u32) -> Duration {
    let factor = 2u32.saturating_pow(retry.saturating_sub(1).min(20));
    first.saturating_mul(factor).min(Duration::from_secs(3600))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Makes every call of `outbox` due at `now` with `send` (given the row; answering whether
/// it succeeded and what to show of the answer). Returns how many were tried.
pub async fn deliver_due<F, Fut>(
    state: &AppState,
    outbox: &Outbox,
    now: i64,
    mut send: F,
) -> AppResult<usize>
where
    F: FnMut(Row) -> Fut,
    Fut: Future<Output = AppResult<(bool, String)>>,
{
    let table = outbox.table;
    let due = state
        .db
        .read()
        .fetch_all(
            &format!(
                "SELECT o.id, o.job_id, o.attempts, o.next_attempt_at, {} FROM {table} o \
                 WHERE o.state = 'pending' AND o.next_attempt_at <= $1 AND NOT ({}) \
                 ORDER BY o.next_attempt_at, o.id LIMIT 32",
                outbox.columns, outbox.wait_while
            ),
            &[now.into()],
        )
        .await?;
    let config = &state.config.triggers;
    let mut tried = 0;
    for row in due {
        let (id, job_id) = (row.int(0)?, row.int(1)?);
        let (attempts, next_at) = (row.int(2)?, row.int(3)?);
        // Claim it (another replica may be calling too) until well after this try's timeout.
        let until = now.saturating_add(2 * ms(config.timeout.0));
        let claim = format!(
            "UPDATE {table} SET next_attempt_at = $1 WHERE id = $2 \
             AND state = 'pending' AND next_attempt_at = $3"
        );
        let claimed = state
            .db
            .write(move |tx| {
                Box::pin(async move {
                    tx.execute(&claim, &[until.into(), id.into(), next_at.into()])
                        .await
                })
            })
            .await
            .map_err(AppError::from)?;
        if claimed != 1 {
            continue;
        }
        tried += 1;
        let attempts = attempts + 1;
        // A call that could not even be made counts as a failed attempt, so that it cannot
        // hold its row (and the calls behind it) forever.
        let (ok, status) = match send(row).await {
            Ok(sent) => sent,
            Err(e) => {
                tracing::error!(job = job_id, table, error = %e, "an outbound call could not be made");
                (
                    false,
                    "could not be made: the server's error log says why".to_owned(),
                )
            }
        };
        let finished = now_ms();
        let (next_state, next_at, outcome) = if ok {
            ("delivered", finished, CallOutcome::Delivered)
        } else if attempts >= i64::from(config.max_attempts) {
            ("failed", finished, CallOutcome::Failed)
        } else {
            let retry = u32::try_from(attempts).unwrap_or(u32::MAX);
            (
                "pending",
                finished.saturating_add(ms(backoff(config.first_retry.0, retry))),
                CallOutcome::Retry,
            )
        };
        state.metrics.outbound_call(outbox.kind, outcome);
        tracing::info!(job = job_id, table, attempts, %status, "outbound call {next_state}");
        let record = format!(
            "UPDATE {table} SET state = $1, attempts = $2, last_status = $3, \
             next_attempt_at = $4, finished_at = $5 WHERE id = $6"
        );
        let finished_at = (next_state != "pending").then_some(finished);
        state
            .db
            .write(move |tx| {
                Box::pin(async move {
                    tx.execute(
                        &record,
                        &[
                            next_state.into(),
                            attempts.into(),
                            status.as_str().into(),
                            next_at.into(),
                            finished_at.into(),
                            id.into(),
                        ],
                    )
                    .await
                })
            })
            .await
            .map_err(AppError::from)?;
        state.events.job_changed(job_id);
    }
    Ok(tried)
}

/// Makes outbound calls through [`Reach`]'s checks: no private address unless the operator
/// allows it (`[triggers] allow_private`), no redirect followed.
pub struct Caller {
    reach: Reach,
    pub http: reqwest::Client,
    timeout: Duration,
}

impl Caller {
    pub fn new(config: &crate::config::Triggers) -> reqwest::Result<Caller> {
        let reach = Reach::new(config.allow_private.clone());
        Ok(Caller {
            http: reach.client(config.timeout.0)?,
            reach,
            timeout: config.timeout.0,
        })
    }

    /// Sends `request` (made with [`Caller::http`]) to `url`: whether it was answered 2xx,
    /// and what to show of the answer.
    pub async fn send(&self, url: &str, request: reqwest::RequestBuilder) -> (bool, String) {
        let checked = reqwest::Url::parse(url)
            .map_err(|e| e.to_string())
            .and_then(|u| self.reach.check_url(&u).map_err(|e| e.to_string()));
        if let Err(refused) = checked {
            return (false, format!("refused: {refused}"));
        }
        match request.send().await {
            Ok(r) if r.status().is_redirection() => {
                (false, format!("{}: redirects are not followed", r.status()))
            }
            Ok(r) => (r.status().is_success(), r.status().to_string()),
            Err(e) if e.is_timeout() => (
                false,
                format!(
                    "no answer in {}",
                    vmfarm_proto::units::format_duration(self.timeout)
                ),
            ),
            Err(e) if e.is_connect() => match refusal_in(&e) {
                Some(refused) => (false, format!("refused: {refused}")),
                None => (false, "cannot connect".to_owned()),
            },
            Err(_) => (false, "request failed".to_owned()),
        }
    }
}

/// The refusal of [`Reach`]'s resolver among the causes of a failed call, if it is one.
fn refusal_in(e: &reqwest::Error) -> Option<&OutboundError> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(refused) = c.downcast_ref::<OutboundError>() {
            return Some(refused);
        }
        cause = c.source();
    }
    None
}

/// After calls were queued and committed (a job ended, a push queued jobs): the outbox looks
/// for calls to make.
pub fn wake(state: &AppState) {
    state.events.triggers.notify_one();
}

/// Makes the outboxes' calls for as long as the server runs: at once when a job ends or is
/// pushed, and every half second for retries that come due.
pub async fn run(state: AppState) {
    let caller = match Caller::new(&state.config.triggers) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot make the outbound client: no webhook or status is sent");
            return;
        }
    };
    loop {
        let now = now_ms();
        if let Err(e) = crate::triggers::deliver_due(&state, &caller, now).await {
            tracing::error!(error = %e, "webhook delivery failed; trying again");
        }
        if let Err(e) = crate::commit_status::report_due(&state, &caller, now).await {
            tracing::error!(error = %e, "commit status report failed; trying again");
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
