//! `/api/schedules`: cron schedules that enqueue a manifest.

use crate::auth::Caller;
use crate::config::Scope;
use crate::db::now_ms;
use crate::error::AppResult;
use crate::routes::refusals::{ReadRefusals, SubmitRefusals};
use crate::schedules::{self, NewSchedule, ScheduleView, Source};
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use vmfarm_proto::api::ErrorBody;

/// `GET /api/schedules`
#[utoipa::path(
    get, path = "/api/schedules", tag = "schedules",
    operation_id = "list_schedules",
    responses(
        (status = 200, description = "The schedules within the caller's reach", body = Vec<ScheduleView>),
        ReadRefusals,
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> AppResult<Json<Vec<ScheduleView>>> {
    let reach = caller.require(Scope::Read)?.reach();
    Ok(Json(schedules::list(&state, &reach).await?))
}

/// `POST /api/schedules`: `{name, cron, timezone?, manifest}`.
#[utoipa::path(
    post, path = "/api/schedules", tag = "schedules", request_body = NewSchedule,
    operation_id = "create_schedule",
    responses(
        (status = 201, description = "The schedule, with its next run", body = ScheduleView),
        (status = 400, description = "A bad cron expression, time zone or manifest", body = ErrorBody),
        SubmitRefusals,
        (status = 409, description = "A schedule of that name exists", body = ErrorBody),
    ),
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(new): Json<NewSchedule>,
) -> AppResult<(StatusCode, Json<ScheduleView>)> {
    let api = caller.require(Scope::Submit)?;
    let reach = api.reach();
    schedules::save(&state, &new, Source::Ui, now_ms(), &api.submitter(), &reach).await?;
    Ok((
        StatusCode::CREATED,
        Json(schedules::get(&state, &new.name, &reach).await?),
    ))
}
