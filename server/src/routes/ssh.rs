//! `vmfarm ssh`: the user's end (`GET /api/jobs/{id}/ssh`) and the worker's (`POST
//! /api/leases/{id}/tunnels`, `GET /api/leases/{id}/tunnels/{tunnel}`), joined by
//! [`crate::tunnels`]. Only the job's owner or an admin (with `submit`) may open a session; each
//! is written in the job's log (who, when, how long).

use crate::auth::Caller;
use crate::config::Scope;
use crate::error::{AppError, AppResult};
use crate::fence::{LeaseCall, live_job};
use crate::job_views::parse_id;
use crate::routes::refusals::{LeaseRefusals, SubmitRefusals};
use crate::state::AppState;
use crate::tunnels::Stream;
use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use vmfarm_proto::JobState;
use vmfarm_proto::api::ErrorBody;
use vmfarm_proto::tunnel::{Frame, PROTOCOL};

/// How long a session asked for waits for the worker's end.
const WORKER_ANSWER: Duration = Duration::from_secs(30);

/// How long a worker's poll waits for a session to be asked for.
const POLL: Duration = Duration::from_secs(20);

/// Refuses a request that is not an upgrade to [`PROTOCOL`].
fn check_upgrade(headers: &HeaderMap) -> AppResult<()> {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if upgrade.eq_ignore_ascii_case(PROTOCOL) {
        Ok(())
    } else {
        Err(AppError::BadRequest(format!(
            "send `Connection: upgrade` and `Upgrade: {PROTOCOL}` (what `vmfarm ssh` does)"
        )))
    }
}

fn switching() -> Response {
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static(PROTOCOL)),
        ],
    )
        .into_response()
}

/// The user's end: checks who asks and that the job's guest is up (running, or kept after a
/// failure while its worker still polls), then asks the worker for a session.
#[utoipa::path(
    get, path = "/api/jobs/{id}/ssh", tag = "jobs", params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 101, description = "An SSH session into the job's guest, over the upgraded connection (`vmfarm ssh`)"),
        SubmitRefusals,
        (status = 404, description = "No such job within the caller's reach", body = ErrorBody),
        (status = 400, description = "Not an upgrade to the session protocol", body = ErrorBody),
        (status = 409, description = "The job has no guest now (not yet running, or ended and not kept)", body = ErrorBody),
        (status = 429, description = "Too many sessions wait for the job's worker", body = ErrorBody),
    ),
)]
pub async fn open(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    mut request: Request,
) -> AppResult<Response> {
    let api = caller.require(Scope::Submit)?;
    let id = parse_id(&id, "job")?;
    let job = crate::job_views::get(&state.db, id, &api.reach()).await?;
    let up = match job.state {
        JobState::Running => true,
        s if s.is_terminal() => state.tunnels.reachable(id),
        _ => false,
    };
    if !up {
        return Err(AppError::Conflict(match job.state {
            s if s.is_terminal() => format!(
                "job {id} has ended ({s}) and its guest is gone: a failed job's guest is kept \
                 for the worker's `guest.keep_failed` (or the manifest's `keep_failed`)"
            ),
            s => format!("job {id} is {s}: its guest is not up yet; try when it is running"),
        }));
    }
    check_upgrade(request.headers())?;
    let upgrade = hyper::upgrade::on(&mut request);
    let tunnel = crate::random::random_hex(8).map_err(AppError::internal)?;
    let worker_end = state.tunnels.ask(id, tunnel.clone()).ok_or_else(|| {
        AppError::TooMany(format!(
            "{} sessions to job {id} are waiting for its worker already: try again in a moment",
            crate::tunnels::MAX_WAITING
        ))
    })?;
    let user = api.user.clone();
    tokio::spawn(async move {
        let Ok(user_end) = upgrade.await else {
            state.tunnels.forget(id, &tunnel);
            return;
        };
        let mut user_end = TokioIo::new(user_end);
        let worker_end = match tokio::time::timeout(WORKER_ANSWER, worker_end).await {
            Ok(Ok(worker_end)) => worker_end,
            _ => {
                state.tunnels.forget(id, &tunnel);
                let why = format!(
                    "the worker running job {id} did not open the session within {} s",
                    WORKER_ANSWER.as_secs()
                );
                let _ = user_end.write_all(&Frame::Failed(why).encode()).await;
                return;
            }
        };
        join(&state, id, &user, user_end, worker_end).await;
    });
    Ok(switching())
}

/// Joins the two ends until either closes, with a line in the job's log at each end.
async fn join(
    state: &AppState,
    job: i64,
    user: &str,
    mut user_end: Stream,
    mut worker_end: Stream,
) {
    farm_line(state, job, format!("ssh: {user} opened a session")).await;
    let opened = Instant::now();
    let _ = tokio::io::copy_bidirectional(&mut user_end, &mut worker_end).await;
    let took =
        vmfarm_proto::units::format_duration(Duration::from_secs(opened.elapsed().as_secs()));
    farm_line(
        state,
        job,
        format!("ssh: {user}'s session closed after {took}"),
    )
    .await;
}

async fn farm_line(state: &AppState, job: i64, line: String) {
    let written = state
        .db
        .write(move |tx| {
            Box::pin(async move { crate::logs::append_farm_line(tx, job, &line).await })
        })
        .await;
    match written {
        Ok(()) => state.events.job_changed(job),
        Err(e) => {
            tracing::warn!(job, error = %e, "cannot write an ssh session's line in the job's log")
        }
    }
}

/// The worker's poll: the sessions asked of its lease's job, after up to 20 s.
#[utoipa::path(
    post, path = "/api/leases/{id}/tunnels", tag = "workers", params(("id" = String, Path, description = "The lease's id"),
        ("X-Vmfarm-Fence" = u64, Header, description = "The lease's fence, as the lease gave it")),
    responses(
        (status = 200, description = "The SSH sessions waiting for the worker (long poll)", body = Object),
        LeaseRefusals,
    ),
)]
pub async fn poll(
    State(state): State<AppState>,
    call: LeaseCall,
) -> AppResult<Json<serde_json::Value>> {
    let job = live_job(&mut state.db.read(), &call).await?;
    let tunnels = state.tunnels.poll(job.id, POLL).await;
    Ok(Json(serde_json::json!({ "tunnels": tunnels })))
}

/// The worker let its lease's job's guest go: no more sessions.
#[utoipa::path(
    delete, path = "/api/leases/{id}/tunnels", tag = "workers", params(("id" = String, Path, description = "The lease's id"),
        ("X-Vmfarm-Fence" = u64, Header, description = "The lease's fence, as the lease gave it")),
    responses(
        (status = 204, description = "The job's guest is gone: waiting sessions are refused"),
        LeaseRefusals,
    ),
)]
pub async fn gone(State(state): State<AppState>, call: LeaseCall) -> AppResult<StatusCode> {
    let job = live_job(&mut state.db.read(), &call).await?;
    state.tunnels.gone(job.id);
    Ok(StatusCode::NO_CONTENT)
}

/// The worker's end of session `tunnel` of its lease's job.
#[utoipa::path(
    get, path = "/api/leases/{id}/tunnels/{tunnel}", tag = "workers",
    params(("id" = String, Path, description = "The lease's id"),
        ("X-Vmfarm-Fence" = u64, Header, description = "The lease's fence, as the lease gave it"), ("tunnel" = String, Path, description = "The session's id, from the poll")),
    responses(
        (status = 101, description = "The session's bytes, over the upgraded connection"),
        (status = 401, description = "No worker token", body = ErrorBody),
        (status = 400, description = "No fence, or not an upgrade to the session protocol", body = ErrorBody),
        (status = 403, description = "An API token, or another worker's lease", body = ErrorBody),
        (status = 404, description = "No such lease, or no such session waits for the job", body = ErrorBody),
        (status = 409, description = "The lease is not live (expired, or taken again: a newer fence)", body = ErrorBody),
    ),
)]
pub async fn attach(
    State(state): State<AppState>,
    call: LeaseCall,
    Path((_, tunnel)): Path<(String, String)>,
    mut request: Request,
) -> AppResult<Response> {
    let job = live_job(&mut state.db.read(), &call).await?;
    check_upgrade(request.headers())?;
    let to_user = state.tunnels.take(job.id, &tunnel).ok_or_else(|| {
        AppError::NotFound(format!("no session `{tunnel}` waits for job {}", job.id))
    })?;
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Ok(worker_end) = upgrade.await {
            let _ = to_user.send(TokioIo::new(worker_end));
        }
    });
    Ok(switching())
}
