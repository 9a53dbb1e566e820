//! What is not about one job: metrics, the API description, health, workers.

use crate::auth::Caller;
use crate::config::Scope;
use crate::db::Query;
use crate::error::AppResult;
use crate::job_views;
use crate::metrics::Figures;
use crate::state::AppState;
use crate::workers::{self, WorkerView};
use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

pub async fn metrics(State(state): State<AppState>) -> AppResult<impl IntoResponse> {
    let figures = Figures {
        by_state: job_views::jobs_by_state(&state.db).await?,
        queue_depth: job_views::queue_depth(&state.db).await?,
        proxy_caches: workers::list(&state.db)
            .await?
            .into_iter()
            .map(|w| (w.name, w.cache))
            .collect(),
    };
    let text = state.metrics.render(&figures);
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

#[cfg(test)]
mod tests {
    use crate::test_utils::{Database, TestApp, worker_token};
    use axum::body::Body;
    use axum::http::{Method, StatusCode};

    #[tokio::test]
    async fn test_metrics_show_each_workers_proxy_cache() {
        let app = TestApp::with_config(Database::Sqlite, |c| {
            c.leases.long_poll = vmfarm_proto::units::HumanDuration(std::time::Duration::ZERO);
        })
        .await;
        let request = serde_json::json!({
            "name": "w0", "images": [], "slots": 1, "version": "test",
            "cache": {"hits": 7, "misses": 2, "bytes_from_cache": 9000, "bytes_fetched": 1000,
                      "stored": 2, "discarded": 0, "evicted": 0, "entries": 2, "size": 10000},
        });
        let leased = app
            .call(
                Method::POST,
                "/api/workers/lease",
                Some(&worker_token("w0")),
                &[("content-type", "application/json".into())],
                Body::from(request.to_string()),
            )
            .await;
        assert_eq!(leased.status, StatusCode::NO_CONTENT);
        let metrics = app
            .call(Method::GET, "/metrics", None, &[], Body::empty())
            .await;
        let text = metrics.body.as_str().unwrap();
        for line in [
            "vmfarm_proxy_cache_hits_total{worker=\"w0\"} 7",
            "vmfarm_proxy_cache_served_bytes_total{worker=\"w0\"} 9000",
            "vmfarm_proxy_cache_fetched_bytes_total{worker=\"w0\"} 1000",
            "# TYPE vmfarm_proxy_cache_bytes gauge",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
    }
}
