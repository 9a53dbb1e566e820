//! Triggers: when a job reaches its final state, each `[[triggers]]` of its manifest that fires
//! for that outcome gets a delivery: a POST of the job's JSON to its webhook, retried with
//! exponential backoff until it is answered 2xx or its attempts are used. Deliveries live in the
//! database, so a restart goes on with them, and the job page shows their status.

use crate::db::{DbFailure, Query, Row, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use crate::outbound::{OutboundError, Reach};
use crate::state::AppState;
use serde::Serialize;
use std::time::Duration;
use vmfarm_proto::JobState;
use vmfarm_proto::api::JobView;
use vmfarm_proto::manifest::Trigger;
use vmfarm_proto::units::HumanDuration;

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
pub async fn deliver_due(state: &AppState, reach: &Deliverer, now: i64) -> AppResult<usize> {
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
        let job = crate::job_views::get(&state.db, job_id, &crate::access::Reach::All).await?;
        let attempts = attempts + 1;
        let (ok, status) = reach.post(&url, &job, config.timeout).await;
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

/// Makes webhook POSTs through [`Reach`]'s checks.
pub struct Deliverer {
    reach: Reach,
    http: reqwest::Client,
}

impl Deliverer {
    pub fn new(config: &crate::config::Triggers) -> reqwest::Result<Deliverer> {
        let reach = Reach::new(config.allow_private.clone());
        Ok(Deliverer {
            http: reach.client(config.timeout.0)?,
            reach,
        })
    }

    /// POSTs `job` to `url`: whether it was answered 2xx, and what to show of the answer.
    async fn post(&self, url: &str, job: &JobView, timeout: HumanDuration) -> (bool, String) {
        let checked = reqwest::Url::parse(url)
            .map_err(|e| e.to_string())
            .and_then(|u| self.reach.check_url(&u).map_err(|e| e.to_string()));
        if let Err(refused) = checked {
            return (false, format!("refused: {refused}"));
        }
        let outcome = self
            .http
            .post(url)
            .header("X-Vmfarm-Event", "job.finished")
            .json(job)
            .send()
            .await;
        match outcome {
            Ok(r) if r.status().is_redirection() => {
                (false, format!("{}: redirects are not followed", r.status()))
            }
            Ok(r) => (r.status().is_success(), r.status().to_string()),
            Err(e) if e.is_timeout() => (false, format!("no answer in {timeout}")),
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

/// Delivers webhooks for as long as the server runs: at once when a job ends, and every
/// half second for retries that come due.
pub async fn run(state: AppState) {
    let deliverer = match Deliverer::new(&state.config.triggers) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "cannot make the webhook client: no webhook is delivered");
            return;
        }
    };
    loop {
        if let Err(e) = deliver_due(&state, &deliverer, now_ms()).await {
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
    use crate::test_utils::{ADMIN, Database, TestApp};
    use axum::http::Method;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A webhook receiver on loopback answering `status` (with a `Location` elsewhere);
    /// its URL and how many calls it got.
    async fn receiver(status: u16) -> (String, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let app = axum::Router::new().fallback(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    [("location", "http://127.0.0.1:9/elsewhere")],
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://HOST:{port}/hook"), calls)
    }

    /// Ends a job whose failure trigger calls `url`, delivers, and says what the delivery shows.
    async fn deliver_to(app: &TestApp, url: &str) -> DeliveryView {
        let manifest = format!(
            "image = \"a\"\n[[tasks]]\nname = \"x\"\nscript = \"true\"\n\
             [[triggers]]\non = \"failure\"\nwebhook = \"{url}\"\n"
        );
        let id = app.submit(&manifest).await[0];
        let cancel = format!("/api/jobs/{id}/cancel");
        app.call(
            Method::POST,
            &cancel,
            Some(ADMIN),
            &[],
            axum::body::Body::empty(),
        )
        .await;
        let deliverer = Deliverer::new(&app.state.config.triggers).unwrap();
        assert_eq!(
            deliver_due(&app.state, &deliverer, now_ms()).await.unwrap(),
            1
        );
        for_job(&app.state, id).await.unwrap().remove(0)
    }

    #[tokio::test]
    async fn test_webhooks_reach_only_public_addresses_unless_allowed() {
        let (url, calls) = receiver(200).await;
        let app = TestApp::new(Database::Sqlite).await;
        for host in ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"] {
            let delivery = deliver_to(&app, &url.replace("HOST", host)).await;
            let status = delivery.last_status.unwrap_or_default();
            assert!(
                status.starts_with("refused: ") && status.contains("is loopback"),
                "{host}: {status}"
            );
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "nothing reached the receiver"
        );
        let allowed = TestApp::with_config(Database::Sqlite, |c| {
            c.triggers.allow_private = vec!["127.0.0.0/8".parse().unwrap()];
        })
        .await;
        let delivery = deliver_to(&allowed, &url.replace("HOST", "localhost")).await;
        assert_eq!(delivery.state, "delivered", "{delivery:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn test_webhooks_follow_no_redirect() {
        let (url, calls) = receiver(302).await;
        let app = TestApp::with_config(Database::Sqlite, |c| {
            c.triggers.allow_private = vec!["127.0.0.0/8".parse().unwrap()];
        })
        .await;
        let delivery = deliver_to(&app, &url.replace("HOST", "127.0.0.1")).await;
        assert_eq!(
            delivery.last_status.as_deref(),
            Some("302 Found: redirects are not followed")
        );
        assert_eq!(delivery.state, "pending", "it is tried again later");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn test_backoff_doubles_and_is_capped() {
        let first = Duration::from_secs(2);
        assert_eq!(backoff(first, 1), Duration::from_secs(2));
        assert_eq!(backoff(first, 2), Duration::from_secs(4));
        assert_eq!(backoff(first, 4), Duration::from_secs(16));
        assert_eq!(backoff(first, 40), Duration::from_secs(3600));
    }
}
