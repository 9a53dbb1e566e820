//! `/api/jobs` and `/api/groups`: what users submit and read.

use crate::auth::Caller;
use crate::config::Scope;
use crate::error::{AppError, AppResult};
use crate::job_views::{self, ListQuery, parse_id};
use crate::jobs;
use crate::routes::refusals::{ReadRefusals, SubmitRefusals};
use crate::state::AppState;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use vmfarm_proto::api::{ErrorBody, GroupView, JobList, JobView, SubmitResponse};

#[utoipa::path(
    post, path = "/api/jobs", tag = "jobs",
    request_body(content = String, content_type = "application/toml", description = "The job manifest (TOML)"),
    responses(
        (status = 201, description = "One job per image, in one group", body = SubmitResponse),
        (status = 400, description = "An invalid manifest (with line and column), or a [network] allow pattern outside the server's network policy", body = ErrorBody),
        SubmitRefusals,
        (status = 413, description = "The manifest is over the server's size limit", body = ErrorBody),
        (status = 429, description = "The user's queue is at the server's limit", body = ErrorBody),
    ),
)]
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

#[utoipa::path(
    get, path = "/api/jobs", tag = "jobs", params(ListQuery),
    operation_id = "list_jobs",
    responses(
        (status = 200, description = "A page of jobs, newest first", body = JobList),
        (status = 400, description = "A bad filter or limit", body = ErrorBody),
        ReadRefusals,
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> AppResult<Json<JobList>> {
    let reach = caller.require(Scope::Read)?.reach();
    Ok(Json(job_views::list(&state.db, &q, &reach).await?))
}

#[utoipa::path(
    get, path = "/api/jobs/{id}", tag = "jobs", params(("id" = String, Path, description = "The job's id")),
    operation_id = "get_job",
    responses(
        (status = 200, description = "The job and its tasks", body = JobView),
        ReadRefusals,
        (status = 404, description = "No such job within the caller's reach", body = ErrorBody),
    ),
)]
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

#[utoipa::path(
    post, path = "/api/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "Cancelled (a queued job at once; a running one at its worker's next heartbeat)", body = JobView),
        SubmitRefusals,
        (status = 404, description = "No such job within the caller's reach", body = ErrorBody),
        (status = 409, description = "The job has ended", body = ErrorBody),
    ),
)]
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
#[utoipa::path(
    post, path = "/api/jobs/{id}/rerun", tag = "jobs", params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 201, description = "The new job, linked to the one it reruns", body = SubmitResponse),
        (status = 400, description = "The manifest is no longer accepted (the server's network policy, the token's priority cap, a secret the user lacks)", body = ErrorBody),
        SubmitRefusals,
        (status = 404, description = "No such job within the caller's reach", body = ErrorBody),
        (status = 413, description = "The manifest is over the server's size limit", body = ErrorBody),
        (status = 429, description = "The user's queue is at the server's limit", body = ErrorBody),
    ),
)]
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

#[utoipa::path(
    get, path = "/api/groups/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The group's id")),
    responses(
        (status = 200, description = "The group and its jobs", body = GroupView),
        ReadRefusals,
        (status = 404, description = "No such group within the caller's reach", body = ErrorBody),
    ),
)]
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
