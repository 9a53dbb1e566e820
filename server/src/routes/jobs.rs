//! `/api/jobs` and `/api/groups`: what users submit and read.

use crate::auth::Caller;
use crate::config::Scope;
use crate::error::{AppError, AppResult};
use crate::job_views::{self, ListQuery, parse_id};
use crate::jobs;
use crate::state::AppState;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use vmfarm_proto::api::{GroupView, JobList, JobView, SubmitResponse};

pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> AppResult<(StatusCode, Json<SubmitResponse>)> {
    let submitter = caller.require(Scope::Submit)?.submitter();
    let limit = state.config.limits.max_manifest_size;
    let bytes = axum::body::to_bytes(body, usize::try_from(limit.0).unwrap_or(usize::MAX))
        .await
        .map_err(|_| {
            AppError::TooLarge(format!(
                "the manifest is over the server's limit of {limit}"
            ))
        })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        AppError::BadRequest(format!(
            "the manifest is not UTF-8 text (bad byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    let response = jobs::submit(&state, text, None, &submitter).await?;
    Ok((StatusCode::CREATED, Json(response)))
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> AppResult<Json<JobList>> {
    let reach = caller.require(Scope::Read)?.reach();
    Ok(Json(job_views::list(&state.db, &q, &reach).await?))
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<JobView>> {
    let reach = caller.require(Scope::Read)?.reach();
    Ok(Json(
        job_views::get(&state.db, parse_id(&id, "job")?, &reach).await?,
    ))
}

pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<JobView>> {
    let reach = caller.require(Scope::Submit)?.reach();
    Ok(Json(
        jobs::cancel(&state, parse_id(&id, "job")?, &reach).await?,
    ))
}

/// Queues job `id` again (its manifest, on its image, from the same push), linked to it.
pub async fn rerun(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<(StatusCode, Json<SubmitResponse>)> {
    let api = caller.require(Scope::Submit)?;
    let response = jobs::rerun(
        &state,
        parse_id(&id, "job")?,
        &api.reach(),
        &api.submitter(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(response)))
}

pub async fn group(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<GroupView>> {
    let reach = caller.require(Scope::Read)?.reach();
    Ok(Json(
        job_views::group(&state.db, parse_id(&id, "group")?, &reach).await?,
    ))
}
