//! `/api/pushes`: what a git server's post-receive hook reports (`vmfarm hook post-receive`),
//! and what each push built.

use crate::auth::Caller;
use crate::config::Scope;
use crate::error::{AppError, AppResult};
use crate::job_views::parse_id;
use crate::pushes::{self, Push};
use crate::routes::refusals::{ReadRefusals, SubmitRefusals};
use crate::state::AppState;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use vmfarm_proto::api::{ErrorBody, PushAnswer, PushRequest, PushView};

/// A ref moved: builds it when the repository's config says so (`201`), else says why not
/// (`200` with `ignored`). The caller must reach the repository's owner (the owner or an
/// admin); another's repository answers like a missing one.
#[utoipa::path(
    post, path = "/api/pushes", tag = "pushes", request_body = PushRequest,
    operation_id = "create_push",
    responses(
        (status = 200, description = "Why the push built nothing (a ref that does not build, a deleted ref)", body = PushAnswer),
        (status = 201, description = "What the push built: a group per manifest file of the commit", body = PushAnswer),
        (status = 400, description = "A bad ref or commit", body = ErrorBody),
        SubmitRefusals,
        (status = 404, description = "No such repository in the server's config", body = ErrorBody),
        (status = 409, description = "The repository's owner is not a user of the server", body = ErrorBody),
        (status = 502, description = "The commit's manifests could not be fetched from the repository", body = ErrorBody),
    ),
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(request): Json<PushRequest>,
) -> AppResult<(StatusCode, Json<PushAnswer>)> {
    let api = caller.require(Scope::Submit)?;
    let reach = api.reach();
    let repository = pushes::repository(&state, &request.repository)
        .filter(|r| reach.covers(&r.owner))
        .ok_or_else(|| {
            AppError::NotFound(format!(
                "no repository `{}`: the server's [[repositories]] names the ones it builds",
                request.repository
            ))
        })?;
    let push = Push {
        repository,
        git_ref: request.git_ref,
        commit: request.after,
        via: "hook",
        delivery: None,
        max_priority: api.max_priority,
    };
    Ok(pushes::answer(pushes::build(&state, push).await?))
}

#[utoipa::path(
    get, path = "/api/pushes/{id}", tag = "pushes",
    operation_id = "get_push",
    params(("id" = String, Path, description = "The push's id")),
    responses(
        (status = 200, description = "The push and each manifest file's group or errors", body = PushView),
        ReadRefusals,
        (status = 404, description = "No such push within the caller's reach", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<PushView>> {
    let reach = caller.require(Scope::Read)?.reach();
    Ok(Json(
        pushes::get(&state.db, parse_id(&id, "push")?, &reach).await?,
    ))
}
