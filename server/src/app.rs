//! The router: every route of the API, and the middleware that times them.

use crate::routes::{artifacts, badge, hooks, jobs, leases, logs, meta, pushes, schedules, ssh};
use crate::state::AppState;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use std::time::Instant;

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/api/jobs", post(jobs::submit).get(jobs::list))
        .route("/api/jobs/{id}", get(jobs::get))
        .route("/api/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/jobs/{id}/rerun", post(jobs::rerun))
        .route("/api/jobs/{id}/ssh", get(ssh::open))
        .route(
            "/api/leases/{id}/tunnels",
            post(ssh::poll).delete(ssh::gone),
        )
        .route("/api/leases/{id}/tunnels/{tunnel}", get(ssh::attach))
        .route("/api/jobs/{id}/log", get(logs::get))
        .route("/api/jobs/{id}/log/stream", get(logs::stream))
        .route("/api/jobs/{id}/artifacts", get(artifacts::list))
        .route("/api/jobs/{id}/artifacts/{*name}", get(artifacts::download))
        .route("/api/groups/{id}", get(jobs::group))
        .route("/api/pushes", post(pushes::create))
        .route("/api/pushes/{id}", get(pushes::get))
        .route("/badge/{*path}", get(badge::badge))
        .route("/api/hooks/{forge}", post(hooks::take))
        .route("/api/workers", get(meta::workers))
        .route("/api/workers/lease", post(leases::lease))
        .route("/api/leases/{id}/heartbeat", post(leases::heartbeat))
        .route("/api/leases/{id}/log", post(leases::log))
        .route("/api/leases/{id}/state", post(leases::update_state))
        .route(
            "/api/leases/{id}/artifacts/{*name}",
            put(leases::put_artifact),
        )
        .route(
            "/api/schedules",
            get(schedules::list).post(schedules::create),
        )
        .route("/api/openapi.json", get(meta::openapi))
        .route("/metrics", get(meta::metrics))
        .route("/healthz", get(meta::health))
        .merge(crate::web::routes())
        .layer(middleware::from_fn_with_state(state.clone(), time_request))
        .with_state(state)
}

async fn time_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .http_request(&route, response.status().as_u16(), started.elapsed());
    response
}
