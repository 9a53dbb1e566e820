//! What handlers take from a request before they run: who calls ([`Caller`], from the bearer
//! token), and for the worker's lease-scoped routes, which lease they speak for ([`LeaseCall`]).

use crate::auth::{Caller, hash_token, lookup};
use crate::error::AppError;
use crate::fence::LeaseCall;
use crate::state::AppState;
use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use vmfarm_proto::wire::FENCE_HEADER;

impl FromRequestParts<AppState> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(AppError::Unauthorized)?;
        let token = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AppError::Unauthorized)?;
        lookup(&state.db, &state.config, &hash_token(token))
            .await?
            .ok_or(AppError::Unauthorized)
    }
}

/// A worker's call under one of its leases: the worker (from its token), the lease (the `{id}`
/// of the route) and its fence (the [`FENCE_HEADER`] header). Whether the lease is live is
/// checked by the write itself, in its transaction ([`crate::fence::live_job`]).
impl FromRequestParts<AppState> for LeaseCall {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let worker = Caller::from_request_parts(parts, state)
            .await?
            .worker()?
            .to_owned();
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| AppError::BadRequest(e.body_text()))?;
        let id = params
            .iter()
            .find_map(|(name, value)| (name == "id").then(|| value.to_owned()))
            .ok_or_else(|| AppError::internal("a lease route without an {id}"))?;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AppError::NotFound(format!(
                "no lease `{}`",
                id.escape_debug()
            )));
        }
        let fence = parts
            .headers
            .get(FENCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                AppError::BadRequest(format!(
                    "send the lease's fence in the {FENCE_HEADER} header"
                ))
            })?;
        Ok(LeaseCall {
            worker,
            lease_id: id,
            fence,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::test_utils::{ADMIN, Database, READER, TestApp, on_both_databases, worker_token};
    use axum::body::Body;
    use axum::http::{Method, StatusCode};
    use serde_json::json;
    use vmfarm_proto::JobState;
    use vmfarm_proto::wire::FENCE_HEADER;

    on_both_databases!(
        test_lease_calls_are_refused_with_the_reason,
        test_a_heartbeat_renews_until_the_lease_expires,
        test_log_appends_are_stored_once_in_order,
        test_tokens_and_scopes_are_enforced,
    );

    const ONE_TASK: &str = "image = \"a\"\n[[tasks]]\nname = \"x\"\nscript = \"true\"\n";

    async fn test_lease_calls_are_refused_with_the_reason(db: Database) {
        let app = TestApp::new(db).await;
        app.submit(ONE_TASK).await;
        let lease = app.lease("w0", "a").await;
        let heartbeat = |token: String, id: String, fence: Option<String>| {
            let app = &app;
            async move {
                let headers: Vec<(&str, String)> =
                    fence.map(|f| (FENCE_HEADER, f)).into_iter().collect();
                app.call(
                    Method::POST,
                    &format!("/api/leases/{id}/heartbeat"),
                    Some(&token),
                    &headers,
                    Body::empty(),
                )
                .await
            }
        };
        let w0 = worker_token("w0");
        let id = lease.lease_id.clone();
        let fence = lease.fence.to_string();
        let cases = [
            (
                heartbeat(w0.clone(), id.clone(), None).await,
                StatusCode::BAD_REQUEST,
                "send the lease's fence in the X-Vmfarm-Fence header",
            ),
            (
                heartbeat(w0.clone(), "not-hex".into(), Some(fence.clone())).await,
                StatusCode::NOT_FOUND,
                "no lease `not-hex`",
            ),
            (
                heartbeat(w0.clone(), id.clone(), Some("x".into())).await,
                StatusCode::BAD_REQUEST,
                "X-Vmfarm-Fence",
            ),
            (
                heartbeat(w0.clone(), id.clone(), Some((lease.fence + 1).to_string())).await,
                StatusCode::CONFLICT,
                "stale fence",
            ),
            (
                heartbeat(worker_token("w1"), id.clone(), Some(fence.clone())).await,
                StatusCode::FORBIDDEN,
                "belongs to another worker",
            ),
            (
                heartbeat(ADMIN.into(), id.clone(), Some(fence.clone())).await,
                StatusCode::FORBIDDEN,
                "this call is for workers",
            ),
            (
                heartbeat("nobody".into(), id.clone(), Some(fence.clone())).await,
                StatusCode::UNAUTHORIZED,
                "missing or unknown token",
            ),
            (
                heartbeat(w0.clone(), "abcdef".into(), Some(fence.clone())).await,
                StatusCode::CONFLICT,
                "is not live",
            ),
        ];
        for (answer, status, message) in cases {
            assert_eq!(answer.status, status, "{:?}", answer.body);
            assert!(
                answer.error().contains(message),
                "{message}: {:?}",
                answer.body
            );
        }
        // An ended job's lease renews no more, and says why.
        app.start("w0", &lease).await;
        app.move_job("w0", &lease, JobState::Succeeded).await;
        let answer = heartbeat(w0, id, Some(fence)).await;
        assert_eq!(answer.status, StatusCode::CONFLICT);
        assert!(
            answer.error().contains("has already ended (succeeded)"),
            "{:?}",
            answer.body
        );
    }

    async fn test_a_heartbeat_renews_until_the_lease_expires(db: Database) {
        let app = TestApp::new(db).await;
        let id = app.submit(ONE_TASK).await[0];
        let lease = app.lease("w0", "a").await;
        let first = app.lease_post("w0", &lease, "heartbeat", &json!({})).await;
        assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
        assert_eq!(first.body["cancel"], false);
        assert!(first.body["expires_at"].as_i64().unwrap() >= lease.expires_at);
        app.expire(id).await;
        let late = app.lease_post("w0", &lease, "heartbeat", &json!({})).await;
        assert_eq!(late.status, StatusCode::CONFLICT);
        assert!(late.error().contains("has expired"), "{:?}", late.body);
        // An expired lease's writes are refused even before the reaper has run.
        let update = vmfarm_proto::wire::StateUpdate {
            job_state: Some(JobState::Booting),
            ..Default::default()
        };
        assert_eq!(
            app.report("w0", &lease, &update).await.status,
            StatusCode::CONFLICT
        );
        assert_eq!(app.job(id).await["state"], "leased");
    }

    async fn test_log_appends_are_stored_once_in_order(db: Database) {
        let app = TestApp::new(db).await;
        let id = app.submit(ONE_TASK).await[0];
        let lease = app.lease("w0", "a").await;
        let append = |seq: u64, data: &str| json!({"seq": seq, "chunks": [{"stream": "farm", "ts_ms": 1, "data": data}]});
        let first = app
            .lease_post("w0", &lease, "log", &append(1, "one\n"))
            .await;
        assert_eq!(first.body, json!({"seq": 1, "stored": true, "log_size": 4}));
        let repeat = app
            .lease_post("w0", &lease, "log", &append(1, "one\n"))
            .await;
        assert_eq!(
            repeat.body,
            json!({"seq": 1, "stored": false, "log_size": 4})
        );
        let skip = app
            .lease_post("w0", &lease, "log", &append(3, "three\n"))
            .await;
        assert_eq!(skip.status, StatusCode::CONFLICT);
        assert!(
            skip.error().contains("the next one expected is 2"),
            "{:?}",
            skip.body
        );
        let zero = app
            .lease_post("w0", &lease, "log", &append(0, "zero\n"))
            .await;
        assert_eq!(zero.status, StatusCode::BAD_REQUEST);
        assert_eq!(app.log(id).await, "one\n");
    }

    async fn test_tokens_and_scopes_are_enforced(db: Database) {
        let app = TestApp::new(db).await;
        let submit = |token: String| {
            let app = &app;
            async move {
                app.call(
                    Method::POST,
                    "/api/jobs",
                    Some(&token),
                    &[],
                    Body::from(ONE_TASK),
                )
                .await
            }
        };
        let by_reader = submit(READER.into()).await;
        assert_eq!(by_reader.status, StatusCode::FORBIDDEN);
        assert!(
            by_reader.error().contains("lacks the `submit` scope"),
            "{:?}",
            by_reader.body
        );
        let by_worker = submit(worker_token("w0")).await;
        assert_eq!(by_worker.status, StatusCode::FORBIDDEN);
        assert!(
            by_worker.error().contains("use an API token"),
            "{:?}",
            by_worker.body
        );
        let anonymous = app
            .call(Method::GET, "/api/jobs", None, &[], Body::empty())
            .await;
        assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
        assert_eq!(app.get("/api/jobs", READER).await.status, StatusCode::OK);
        assert_eq!(submit(ADMIN.into()).await.status, StatusCode::CREATED);
    }
}
