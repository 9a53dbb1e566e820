//! `/api/schedules`: cron schedules that enqueue a manifest.

use crate::auth::Caller;
use crate::config::Scope;
use crate::db::now_ms;
use crate::error::AppResult;
use crate::schedules::{self, NewSchedule, ScheduleView, Source};
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

/// `GET /api/schedules`
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> AppResult<Json<Vec<ScheduleView>>> {
    let reach = caller.require(Scope::Read)?.reach();
    Ok(Json(schedules::list(&state, &reach).await?))
}

/// `POST /api/schedules`: `{name, cron, timezone?, manifest}`.
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
