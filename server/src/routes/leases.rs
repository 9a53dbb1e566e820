//! The worker side: lease (long poll), heartbeat, log, state, artifact upload. Every route
//! but the lease itself speaks for a lease ([`LeaseCall`]) and is fenced.

use crate::auth::Caller;
use crate::error::{AppError, AppResult};
use crate::fence::{LeaseCall, live_job};
use crate::leases::{take, update};
use crate::logs::{self, AppendAck};
use crate::routes::refusals::LeaseRefusals;
use crate::state::AppState;
use crate::store;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::time::Duration;
use tokio::time::Instant;
use vmfarm_proto::api::{ArtifactView, ErrorBody};
use vmfarm_proto::wire::{
    HeartbeatResponse, LeaseRequest, LeaseResponse, LogAppend, SHA256_HEADER, StateUpdate,
};

/// How often a long-polling worker looks again even without a wake-up (other replicas).
const POLL: Duration = Duration::from_millis(500);

#[utoipa::path(
    post, path = "/api/workers/lease", tag = "workers", request_body = LeaseRequest,
    responses(
        (status = 200, description = "A job, leased to the worker", body = LeaseResponse),
        (status = 204, description = "No job for the worker's images within the long poll"),
        (status = 400, description = "A bad request", body = ErrorBody),
        (status = 401, description = "No worker token", body = ErrorBody),
        (status = 403, description = "An API token: this call is for workers", body = ErrorBody),
    ),
)]
pub async fn lease(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<LeaseRequest>,
) -> AppResult<Response> {
    let worker = caller.worker()?.to_owned();
    let deadline = Instant::now() + state.config.leases.long_poll.0;
    loop {
        let notified = state.events.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(lease) = take::try_lease(&state, &worker, &req).await? {
            return Ok(Json(lease).into_response());
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let wait = (deadline - now).min(POLL);
        let _ = tokio::time::timeout(wait, notified).await;
    }
}

#[utoipa::path(
    post, path = "/api/leases/{id}/heartbeat", tag = "workers", params(("id" = String, Path, description = "The lease's id"),
        ("X-Vmfarm-Fence" = u64, Header, description = "The lease's fence, as the lease gave it")),
    responses(
        (status = 200, description = "The lease, renewed; whether the job was cancelled", body = HeartbeatResponse),
        LeaseRefusals,
    ),
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    call: LeaseCall,
) -> AppResult<Json<HeartbeatResponse>> {
    Ok(Json(update::heartbeat(&state, &call).await?))
}

#[utoipa::path(
    post, path = "/api/leases/{id}/log", tag = "workers", params(("id" = String, Path, description = "The lease's id"),
        ("X-Vmfarm-Fence" = u64, Header, description = "The lease's fence, as the lease gave it")), request_body = LogAppend,
    responses(
        (status = 200, description = "Stored, or acknowledged as a retry of a stored `seq`", body = AppendAck),
        (status = 400, description = "Too many chunks, or a chunk too large", body = ErrorBody),
        (status = 401, description = "No worker token", body = ErrorBody),
        (status = 400, description = "No fence, or not a number", body = ErrorBody),
        (status = 403, description = "An API token, or another worker's lease", body = ErrorBody),
        (status = 404, description = "No such lease", body = ErrorBody),
        (status = 409, description = "The lease is not live, or `seq` skips ahead", body = ErrorBody),
        (status = 413, description = "The log is at the server's size limit", body = ErrorBody),
    ),
)]
pub async fn log(
    State(state): State<AppState>,
    call: LeaseCall,
    Json(append): Json<LogAppend>,
) -> AppResult<Json<AppendAck>> {
    Ok(Json(logs::append(&state, &call, &append).await?))
}

#[utoipa::path(
    post, path = "/api/leases/{id}/state", tag = "workers", params(("id" = String, Path, description = "The lease's id"),
        ("X-Vmfarm-Fence" = u64, Header, description = "The lease's fence, as the lease gave it")), request_body = StateUpdate,
    responses(
        (status = 204, description = "Applied (or a repeat of a move already made)"),
        (status = 400, description = "A bad update", body = ErrorBody),
        (status = 401, description = "No worker token", body = ErrorBody),
        (status = 400, description = "No fence, or not a number", body = ErrorBody),
        (status = 403, description = "An API token, or another worker's lease", body = ErrorBody),
        (status = 404, description = "No such lease", body = ErrorBody),
        (status = 409, description = "The lease is not live, or a move the state cannot make", body = ErrorBody),
    ),
)]
pub async fn update_state(
    State(state): State<AppState>,
    call: LeaseCall,
    Json(update): Json<StateUpdate>,
) -> AppResult<StatusCode> {
    update::update_state(&state, &call, &update).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Receives an artifact of the lease's job. It counts only if the lease is still live once the
/// file is in: a lease lost during the upload leaves nothing behind.
#[utoipa::path(
    put, path = "/api/leases/{id}/artifacts/{name}", tag = "workers",
    params(("id" = String, Path, description = "The lease's id"),
        ("X-Vmfarm-Fence" = u64, Header, description = "The lease's fence, as the lease gave it"), ("name" = String, Path, description = "The artifact's path")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The file; `X-Vmfarm-Sha256` is its hash"),
    responses(
        (status = 201, description = "Stored", body = ArtifactView),
        (status = 400, description = "A bad name, or a hash that does not match", body = ErrorBody),
        LeaseRefusals,
        (status = 413, description = "Over the artifact or per-job size limit", body = ErrorBody),
    ),
)]
pub async fn put_artifact(
    State(state): State<AppState>,
    call: LeaseCall,
    Path((_, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> AppResult<(StatusCode, Json<ArtifactView>)> {
    let sha256 = headers
        .get(SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            AppError::BadRequest(format!(
                "send the artifact's sha256 in the {SHA256_HEADER} header"
            ))
        })?
        .to_owned();
    store::check_name(&name)?;
    let job = live_job(&mut state.db.read(), &call).await?;
    let used = store::used_by_others(&mut state.db.read(), job.id, job.attempt, &name).await?;
    let room = store::Room::new(&state.config.limits, used);
    let view = state
        .store
        .receive(
            job.id,
            job.attempt,
            &name,
            &sha256,
            room,
            body.into_data_stream(),
        )
        .await?;
    let limits = state.config.limits.clone();
    let row = view.clone();
    let recorded = state
        .db
        .write(move |tx| {
            Box::pin(async move {
                let live = live_job(tx, &call).await?;
                if live.attempt != job.attempt {
                    return Err(crate::fence::refusal(tx, &call).await);
                }
                // Uploads in parallel may have used the room meanwhile.
                let used = store::used_by_others(tx, job.id, job.attempt, &row.name).await?;
                let room = store::Room::new(&limits, used);
                if row.size > room.bytes {
                    return Err(room.refusal());
                }
                store::record(tx, job.id, job.attempt, &row).await
            })
        })
        .await;
    if let Err(e) = recorded {
        if let Err(removing) = state.store.discard(job.id, job.attempt, &name).await {
            tracing::warn!(job = job.id, error = %removing, "cannot remove a refused artifact");
        }
        return Err(e);
    }
    state.events.job_changed(job.id);
    Ok((StatusCode::CREATED, Json(view)))
}
