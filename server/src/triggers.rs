//! Triggers: when a job reaches its final state, each `[[triggers]]` of its manifest that fires
//! for that outcome gets a delivery: a POST of the job's JSON to its webhook, retried with
//! exponential backoff until it is answered 2xx or its attempts are used. Deliveries live in the
//! database, so a restart goes on with them, and the job page shows their status.

use crate::db::{DbFailure, Query, Row, WriteTx};
use crate::error::{AppError, AppResult};
use crate::outbox::{self, Caller, Outbox};
use crate::state::AppState;
use serde::Serialize;
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
/// end, or not at all. [`crate::outbox::wake`] the outbox once it has committed.
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

/// Webhook deliveries, in the outbox of [`crate::outbox`].
const OUTBOX: Outbox = Outbox {
    table: "trigger_deliveries",
    kind: "webhook",
    columns: "o.url",
    wait_while: "1 = 0",
};

/// Makes every webhook delivery that is due at `now`. Returns how many were tried.
pub async fn deliver_due(state: &AppState, caller: &Caller, now: i64) -> AppResult<usize> {
    outbox::deliver_due(state, &OUTBOX, now, |row| async move {
        let (job_id, url) = (row.int(1)?, row.text(4)?);
        let job = crate::job_views::get(&state.db, job_id, &crate::access::Reach::All).await?;
        let request = caller
            .http
            .post(&url)
            .header("X-Vmfarm-Event", "job.finished")
            .json(&job);
        Ok(caller.send(&url, request).await)
    })
    .await
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
        let caller = Caller::new(&app.state.config.triggers).unwrap();
        assert_eq!(
            deliver_due(&app.state, &caller, crate::db::now_ms())
                .await
                .unwrap(),
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
}
