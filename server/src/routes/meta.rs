//! What is not about one job: metrics, the API description, health, workers.

use crate::auth::Caller;
use crate::config::Scope;
use crate::db::Query;
use crate::error::AppResult;
use crate::job_views;
use crate::state::AppState;
use crate::workers::{self, WorkerView};
use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

pub async fn metrics(State(state): State<AppState>) -> AppResult<impl IntoResponse> {
    let by_state = job_views::jobs_by_state(&state.db).await?;
    let depth = job_views::queue_depth(&state.db).await?;
    let text = state.metrics.render(&by_state, &depth);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
}

pub async fn health(State(state): State<AppState>) -> AppResult<&'static str> {
    state.db.read().fetch_all("SELECT 1", &[]).await?;
    Ok("ok\n")
}

pub async fn workers(
    State(state): State<AppState>,
    caller: Caller,
) -> AppResult<Json<Vec<WorkerView>>> {
    caller.require(Scope::Read)?;
    Ok(Json(workers::list(&state.db).await?))
}
