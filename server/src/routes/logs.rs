//! A job's log: whole or from an offset (text or JSON chunks), and live over Server-Sent Events.

use crate::access;
use crate::auth::Caller;
use crate::config::Scope;
use crate::error::{AppError, AppResult};
use crate::job_views::parse_id;
use crate::logs::{self, StoredChunk};
use crate::routes::refusals::ReadRefusals;
use crate::state::AppState;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use vmfarm_proto::api::ErrorBody;

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Byte offset to start from.
    #[serde(default)]
    pub from: i64,
    /// `text` (default) or `json` (chunks with stream, task and timestamp).
    pub format: Option<String>,
}

/// Largest answer of one `GET .../log` call; the rest is read with `from`.
const PAGE_BYTES: i64 = 4 * 1024 * 1024;

#[utoipa::path(
    get, path = "/api/jobs/{id}/log", tag = "jobs", params(("id" = String, Path, description = "The job's id"), LogQuery),
    operation_id = "get_log",
    responses(
        (status = 200, description = "The log from `from` on, at most 4 MiB (`X-Vmfarm-Log-Size` says its whole size): text, or with `format=json` its chunks (offset, stream, task, time, data)", content(
            (String = "text/plain"),
            (Vec<StoredChunk> = "application/json"),
        )),
        (status = 400, description = "A negative `from`, or a `format` other than text and json", body = ErrorBody),
        ReadRefusals,
        (status = 404, description = "No such job within the caller's reach", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> AppResult<Response> {
    let reach = caller.require(Scope::Read)?.reach();
    let job = parse_id(&id, "job")?;
    access::job(&state.db, &reach, job).await?;
    if q.from < 0 {
        return Err(AppError::BadRequest(
            "from must be a byte offset, 0 or more".into(),
        ));
    }
    let (size, _) = logs::progress(&state.db, job).await?;
    let chunks = logs::read(&state.db, job, q.from, PAGE_BYTES).await?;
    match q.format.as_deref() {
        None | Some("text") => {
            let text: String = chunks.iter().map(|c| c.data.as_str()).collect();
            Ok((
                [
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
                    (
                        header::HeaderName::from_static("x-vmfarm-log-size"),
                        size.to_string(),
                    ),
                ],
                text,
            )
                .into_response())
        }
        Some("json") => Ok((
            [(
                header::HeaderName::from_static("x-vmfarm-log-size"),
                size.to_string(),
            )],
            Json(chunks),
        )
            .into_response()),
        Some(other) => Err(AppError::BadRequest(format!(
            "format `{other}`: use text or json"
        ))),
    }
}

/// Sends what is there, then new chunks as they come, then an `end` event with the final state.
#[utoipa::path(
    get, path = "/api/jobs/{id}/log/stream", tag = "jobs", params(("id" = String, Path, description = "The job's id"), LogQuery),
    responses(
        (status = 200, description = "Server-Sent Events: `log` events with the log's chunks as they come, then `end` with the job's final state and log size", content_type = "text/event-stream", body = String),
        ReadRefusals,
        (status = 404, description = "No such job within the caller's reach", body = ErrorBody),
    ),
)]
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> AppResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let reach = caller.require(Scope::Read)?.reach();
    let job = parse_id(&id, "job")?;
    access::job(&state.db, &reach, job).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let mut events = state.events.job.subscribe();
    let mut cursor = q.from.max(0);
    tokio::spawn(async move {
        loop {
            let (size, job_state) = match logs::progress(&state.db, job).await {
                Ok(p) => p,
                Err(_) => return,
            };
            while cursor < size {
                let Ok(chunks) = logs::read(&state.db, job, cursor, 256 * 1024).await else {
                    return;
                };
                let Some(last) = chunks.last() else { break };
                cursor = last.offset + last.data.len() as i64;
                for chunk in chunks {
                    let Ok(event) = Event::default().event("log").json_data(&chunk) else {
                        continue;
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
            if job_state.is_terminal() {
                let data = serde_json::json!({ "state": job_state, "log_size": cursor });
                if let Ok(event) = Event::default().event("end").json_data(data) {
                    let _ = tx.send(event).await;
                }
                return;
            }
            // Wake on this job's news, or look again in a while (writes by other replicas).
            let wait = async {
                loop {
                    match events.recv().await {
                        Ok(changed) if changed == job => return,
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => return,
                        Err(RecvError::Closed) => std::future::pending::<()>().await,
                    }
                }
            };
            tokio::select! {
                _ = wait => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
