//! The worker side: lease (long poll), heartbeat, log, state, artifact upload. Every route
//! but the lease itself speaks for a lease ([`LeaseCall`]) and is fenced.

use crate::auth::Caller;
use crate::error::{AppError, AppResult};
use crate::fence::{LeaseCall, live_job};
use crate::leases::{take, update};
use crate::logs::{self, AppendAck};
use crate::state::AppState;
use crate::store;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::time::Duration;
use tokio::time::Instant;
use vmfarm_proto::api::ArtifactView;
use vmfarm_proto::wire::{HeartbeatResponse, LeaseRequest, LogAppend, SHA256_HEADER, StateUpdate};

/// How often a long-polling worker looks again even without a wake-up (other replicas).
const POLL: Duration = Duration::from_millis(500);

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

pub async fn heartbeat(
    State(state): State<AppState>,
    call: LeaseCall,
) -> AppResult<Json<HeartbeatResponse>> {
    Ok(Json(update::heartbeat(&state, &call).await?))
}

pub async fn log(
    State(state): State<AppState>,
    call: LeaseCall,
    Json(append): Json<LogAppend>,
) -> AppResult<Json<AppendAck>> {
    Ok(Json(logs::append(&state, &call, &append).await?))
}

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
