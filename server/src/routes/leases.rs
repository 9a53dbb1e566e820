//! The worker side: lease (long poll), heartbeat, log, state, artifact upload.

use crate::auth::Caller;
use crate::error::{AppError, AppResult};
use crate::leases::{self, LeaseRef, live_job};
use crate::logs::{self, AppendAck};
use crate::state::AppState;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::time::Duration;
use tokio::time::Instant;
use vmfarm_proto::api::ArtifactView;
use vmfarm_proto::wire::{
    FENCE_HEADER, HeartbeatResponse, LeaseRequest, LogAppend, SHA256_HEADER, StateUpdate,
};

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
        if let Some(lease) = leases::try_lease(&state, &worker, &req).await? {
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

fn lease_ref(id: String, headers: &HeaderMap) -> AppResult<LeaseRef> {
    let fence = headers
        .get(FENCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .ok_or_else(|| {
            AppError::BadRequest(format!(
                "send the lease's fence in the {FENCE_HEADER} header"
            ))
        })?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AppError::NotFound(format!(
            "no lease `{}`",
            id.escape_debug()
        )));
    }
    Ok(LeaseRef {
        lease_id: id,
        fence,
    })
}

pub async fn heartbeat(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> AppResult<Json<HeartbeatResponse>> {
    let worker = caller.worker()?;
    let lease = lease_ref(id, &headers)?;
    Ok(Json(leases::heartbeat(&state, worker, &lease).await?))
}

pub async fn log(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(append): Json<LogAppend>,
) -> AppResult<Json<AppendAck>> {
    let worker = caller.worker()?;
    let lease = lease_ref(id, &headers)?;
    Ok(Json(logs::append(&state, worker, &lease, &append).await?))
}

pub async fn update_state(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(update): Json<StateUpdate>,
) -> AppResult<StatusCode> {
    let worker = caller.worker()?;
    let lease = lease_ref(id, &headers)?;
    leases::update_state(&state, worker, &lease, &update).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn put_artifact(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> AppResult<(StatusCode, Json<ArtifactView>)> {
    let worker = caller.worker()?;
    let lease = lease_ref(id, &headers)?;
    let sha256 = headers
        .get(SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            AppError::BadRequest(format!(
                "send the artifact's sha256 in the {SHA256_HEADER} header"
            ))
        })?
        .to_owned();
    state.store.path(0, &name)?;
    let (job_id, _) = live_job(&state, worker, &lease).await?;
    let max = state.config.limits.max_artifact_size.0;
    let view = state
        .store
        .put(
            &state.db,
            job_id,
            &name,
            &sha256,
            max,
            body.into_data_stream(),
        )
        .await?;
    state.events.job_changed(job_id);
    Ok((StatusCode::CREATED, Json(view)))
}
