//! What is not about one job: metrics, the API description, health, workers.

use crate::auth::Caller;
use crate::config::Scope;
use crate::db::Query;
use crate::error::AppResult;
use crate::job_views;
use crate::metrics::{self, Figures};
use crate::routes::refusals::ReadRefusals;
use crate::state::AppState;
use crate::workers::{self, WorkerView};
use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use vmfarm_proto::api::ErrorBody;

/// `/metrics`: for callers with the `metrics` (or `admin`) scope, or anyone when
/// `[metrics] open`.
#[utoipa::path(
    get, path = "/metrics", tag = "meta",
    responses(
        (status = 200, description = "Prometheus metrics (OpenMetrics text)", content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "No token (unless `[metrics] open`)", body = ErrorBody),
        (status = 403, description = "The token lacks the `metrics` scope", body = ErrorBody),
    ),
)]
pub async fn metrics(
    State(state): State<AppState>,
    mut parts: Parts,
) -> AppResult<impl IntoResponse> {
    if !state.config.metrics.open {
        Caller::from_request_parts(&mut parts, &state)
            .await?
            .require(Scope::Metrics)?;
    }
    let figures = Figures {
        by_state: job_views::jobs_by_state(&state.db).await?,
        queue_depth: job_views::queue_depth(&state.db).await?,
    };
    let text = state.metrics.render(figures);
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text))
}

#[utoipa::path(
    get, path = "/api/openapi.json", tag = "meta",
    responses((status = 200, description = "This description", body = Object)),
    security(()),
)]
pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::app::openapi_json(),
    )
}

#[utoipa::path(
    get, path = "/healthz", tag = "meta",
    responses(
        (status = 200, description = "The server and its database answer", content_type = "text/plain", body = String),
        (status = 500, description = "The database does not answer", body = ErrorBody),
    ),
    security(()),
)]
pub async fn health(State(state): State<AppState>) -> AppResult<&'static str> {
    state.db.read().fetch_all("SELECT 1", &[]).await?;
    Ok("ok\n")
}

#[utoipa::path(
    get, path = "/api/workers", tag = "workers",
    responses(
        (status = 200, description = "The workers as they last called in", body = Vec<WorkerView>),
        ReadRefusals,
    ),
)]
pub async fn workers(
    State(state): State<AppState>,
    caller: Caller,
) -> AppResult<Json<Vec<WorkerView>>> {
    caller.require(Scope::Read)?;
    Ok(Json(workers::list(&state.db).await?))
}

#[cfg(test)]
mod tests {
    use crate::test_utils::{Database, READER, SCRAPER, TestApp};
    use axum::body::Body;
    use axum::http::{Method, StatusCode};

    async fn server(open: bool) -> TestApp {
        TestApp::with_config(Database::Sqlite, |c| c.metrics.open = open).await
    }

    #[tokio::test]
    async fn test_metrics_need_a_metrics_token_unless_open() {
        let app = server(false).await;
        let scrape = |token: Option<&'static str>| {
            let app = &app;
            async move {
                app.call(Method::GET, "/metrics", token, &[], Body::empty())
                    .await
            }
        };
        assert_eq!(scrape(None).await.status, StatusCode::UNAUTHORIZED);
        let reader = scrape(Some(READER)).await;
        assert_eq!(reader.status, StatusCode::FORBIDDEN);
        assert!(
            reader.error().contains("`metrics` scope"),
            "{}",
            reader.error()
        );
        let scraped = scrape(Some(SCRAPER)).await;
        assert_eq!(scraped.status, StatusCode::OK);
        let text = scraped.body.as_str().unwrap();
        assert!(text.contains("vmfarm_jobs{state=\"queued\"} 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        // The metrics token reaches nothing else.
        let jobs = app
            .call(Method::GET, "/api/jobs", Some(SCRAPER), &[], Body::empty())
            .await;
        assert_eq!(jobs.status, StatusCode::FORBIDDEN);

        let open = server(true).await;
        let anyone = open
            .call(Method::GET, "/metrics", None, &[], Body::empty())
            .await;
        assert_eq!(anyone.status, StatusCode::OK);
    }
}
