//! `/api/pushes`: what a git server's post-receive hook reports (`vmfarm hook post-receive`),
//! and what each push built.

use crate::auth::Caller;
use crate::config::Scope;
use crate::error::{AppError, AppResult};
use crate::job_views::parse_id;
use crate::pushes::{self, Push};
use crate::state::AppState;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use vmfarm_proto::api::{PushAnswer, PushRequest, PushView};

/// A ref moved: builds it when the repository's config says so (`201`), else says why not
/// (`200` with `ignored`). The caller must reach the repository's owner (the owner or an
/// admin); another's repository answers like a missing one.
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
