//! The router: every route of the API, and the middleware around them: a request id for each
//! request (the caller's `x-request-id` when it is short and plain, else a new one, echoed in
//! the answer), and the access log and the request metrics.

use crate::routes::{artifacts, badge, hooks, jobs, leases, logs, meta, pushes, schedules, ssh};
use crate::state::AppState;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use std::time::Instant;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};

/// The request id header, read and answered.
const REQUEST_ID: &str = "x-request-id";

/// The longest request id a caller may give.
const MAX_REQUEST_ID: usize = 64;

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
        // The last layer added is the outermost: a caller's id is checked, then kept or made,
        // then echoed, and the access log sees it.
        .layer(middleware::from_fn_with_state(state.clone(), time_request))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(NewRequestId))
        .layer(middleware::from_fn(plain_request_id))
        .with_state(state)
}

/// Makes a request id: 16 hex digits from the system's random source.
#[derive(Debug, Clone, Copy)]
struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let id = crate::random::random_hex(8).ok()?;
        HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

/// Whether a caller's request id may be kept: at most 64 letters, digits, `-`, `_` and `.`.
fn plain(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
}

/// Drops a caller's request id that is not [`plain`], so that a new one is made: what goes
/// into the log stays short and plain.
async fn plain_request_id(mut request: Request, next: Next) -> Response {
    let given = request.headers().get_all(REQUEST_ID);
    let keep = given.iter().count() == 1 && given.iter().all(|v| plain(v.as_bytes()));
    if !keep {
        request.headers_mut().remove(REQUEST_ID);
    }
    next.run(request).await
}

/// Counts and times each request by route and status, and writes its line of the access log
/// (`vmfarm::access`: request id, method, path, route, status, duration): at info, but for the
/// workers' own calls (leases, log appends, heartbeats: several a second per job), at debug.
async fn time_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let took = started.elapsed();
    let status = response.status().as_u16();
    state
        .metrics
        .http_request(method.as_str(), &route, status, took);
    let duration_ms = took.as_secs_f64() * 1000.0;
    macro_rules! access {
        ($level:ident) => {
            tracing::$level!(
                target: "vmfarm::access",
                request_id = %id, method = %method, path = %path, route = %route, status,
                duration_ms, "request"
            )
        };
    }
    if route.starts_with("/api/leases/") || route == "/api/workers/lease" {
        access!(debug);
    } else {
        access!(info);
    }
    response
}
