//! What is not about one job: metrics, the API description, health, workers.

use crate::auth::Caller;
use crate::config::Scope;
use crate::error::AppResult;
use crate::metrics;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;

pub async fn metrics(State(state): State<AppState>) -> AppResult<impl IntoResponse> {
    let text = metrics::render(&state).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
}

pub async fn health(State(state): State<AppState>) -> AppResult<&'static str> {
    sqlx::query("SELECT 1").execute(&state.db.pool).await?;
    Ok("ok\n")
}

/// A worker as the dashboard shows it.
#[derive(Debug, Serialize)]
pub struct WorkerView {
    pub name: String,
    pub last_seen: i64,
    pub slots: i64,
    pub images: serde_json::Value,
    pub version: String,
}

pub async fn workers(
    State(state): State<AppState>,
    caller: Caller,
) -> AppResult<Json<Vec<WorkerView>>> {
    caller.require(Scope::Read)?;
    let rows: Vec<(String, i64, i64, String, String)> =
        sqlx::query_as("SELECT name, last_seen, slots, images, version FROM workers ORDER BY name")
            .fetch_all(&state.db.pool)
            .await?;
    Ok(Json(
        rows.into_iter()
            .map(|(name, last_seen, slots, images, version)| WorkerView {
                name,
                last_seen,
                slots,
                images: serde_json::from_str(&images).unwrap_or(serde_json::Value::Null),
                version,
            })
            .collect(),
    ))
}
