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
use axum::routing::{get, put};
use std::sync::OnceLock;
use std::time::Instant;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vmfarm_proto::api::ErrorBody;

/// The request id header, read and answered.
const REQUEST_ID: &str = "x-request-id";

/// The longest request id a caller may give.
const MAX_REQUEST_ID: usize = 64;

/// The API's description: what the handlers' annotations do not say.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "vmfarm API",
        description = "Jobs, logs and artifacts for clients (bearer API tokens with scopes submit, \
            read, metrics, admin; each token acts for a user, and reaches that user's jobs, groups \
            and schedules, or everyone's when the user is an admin: another user's thing answers \
            404 like a missing one); leases for workers (bearer worker tokens). Errors are JSON \
            {error, manifest_errors?}."
    ),
    modifiers(&BearerTokens),
    security(("bearer" = [])),
    // Routes whose last segment takes the rest of the path (axum's `{*name}`): routed by hand in
    // [`api`], described here (OpenAPI has no such parameter; theirs is a plain `{name}`).
    paths(artifacts::download, leases::put_artifact, badge::badge),
    components(schemas(ErrorBody)),
)]
struct ApiDoc;

/// Every call but a few public ones carries a bearer token.
struct BearerTokens;

impl utoipa::Modify for BearerTokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The API: each annotated handler routed at the path its annotation gives (so the router and
/// the description cannot part), and the wildcard routes [`ApiDoc`] describes.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(jobs::submit, jobs::list))
        .routes(routes!(jobs::get))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::rerun))
        .routes(routes!(ssh::open))
        .routes(routes!(ssh::poll, ssh::gone))
        .routes(routes!(ssh::attach))
        .routes(routes!(logs::get))
        .routes(routes!(logs::stream))
        .routes(routes!(artifacts::list))
        .route("/api/jobs/{id}/artifacts/{*name}", get(artifacts::download))
        .routes(routes!(jobs::group))
        .routes(routes!(pushes::create))
        .routes(routes!(pushes::get))
        .route("/badge/{*path}", get(badge::badge))
        .routes(routes!(hooks::take))
        .routes(routes!(meta::workers))
        .routes(routes!(leases::lease))
        .routes(routes!(leases::heartbeat))
        .routes(routes!(leases::log))
        .routes(routes!(leases::update_state))
        .route(
            "/api/leases/{id}/artifacts/{*name}",
            put(leases::put_artifact),
        )
        .routes(routes!(schedules::list, schedules::create))
        .routes(routes!(meta::openapi))
        .routes(routes!(meta::metrics))
        .routes(routes!(meta::health))
}

/// The API's OpenAPI description (JSON), made once.
pub fn openapi_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let (_, description) = api().split_for_parts();
        description
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    })
}

pub fn app(state: AppState) -> Router {
    let (api, _) = api().split_for_parts();
    api.merge(crate::web::routes())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{Database, TestApp};
    use axum::body::Body;
    use axum::http::{Method, StatusCode};
    use std::collections::{BTreeMap, BTreeSet};

    /// The paths a router routes, from its debug form (axum keeps no other list of them).
    fn routed_paths(router: &impl std::fmt::Debug) -> BTreeSet<String> {
        let debug = format!("{router:?}");
        let paths: BTreeSet<String> = debug
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with('/'))
            .map(str::to_owned)
            .collect();
        assert!(
            !paths.is_empty(),
            "no path in the router's debug form: {debug}"
        );
        paths
    }

    /// A route's path as OpenAPI writes it: `{*rest}` is a plain `{rest}` there.
    fn described(path: &str) -> String {
        path.replace("{*", "{")
    }

    /// `path` with each parameter given a value.
    fn concrete(path: &str) -> String {
        let mut out = String::new();
        let mut in_param = false;
        for c in path.chars() {
            match c {
                '{' => in_param = true,
                '}' => {
                    in_param = false;
                    out.push('1');
                }
                _ if !in_param => out.push(c),
                _ => {}
            }
        }
        out
    }

    #[tokio::test]
    async fn test_every_route_is_described_with_its_methods() {
        let app = TestApp::new(Database::Sqlite).await;
        let spec: serde_json::Value = serde_json::from_str(openapi_json()).unwrap();
        let described_paths = spec["paths"].as_object().unwrap();
        let pages = routed_paths(&crate::web::routes());
        // The whole router, as the server serves it (a route added outside `api` counts too).
        let api_paths: Vec<String> = routed_paths(&super::app(app.state.clone()))
            .into_iter()
            .filter(|p| !pages.contains(p))
            .collect();
        assert!(api_paths.len() >= 26, "{api_paths:?}");
        let mut missing = BTreeMap::new();
        for path in &api_paths {
            let operations = described_paths.get(&described(path));
            for method in [
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::PATCH,
            ] {
                let answer = app
                    .call(method.clone(), &concrete(path), None, &[], Body::empty())
                    .await;
                let routed = answer.status != StatusCode::METHOD_NOT_ALLOWED;
                let key = method.as_str().to_ascii_lowercase();
                let in_spec = operations.is_some_and(|o| o.get(&key).is_some());
                if routed != in_spec {
                    missing.insert(format!("{method} {path}"), (routed, in_spec));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "(routed, described) differ for: {missing:#?}"
        );
        // And nothing is described that is not routed.
        let routed: BTreeSet<String> = api_paths.iter().map(|p| described(p)).collect();
        let extra: Vec<&String> = described_paths
            .keys()
            .filter(|p| !routed.contains(*p))
            .collect();
        assert!(extra.is_empty(), "described but not routed: {extra:?}");
        // Operation ids are unique (clients generated from the description name methods by them).
        let mut ids = BTreeSet::new();
        for (path, operations) in described_paths {
            for (method, operation) in operations.as_object().unwrap() {
                let id = operation["operationId"].as_str().unwrap_or_default();
                assert!(
                    ids.insert(id.to_owned()),
                    "{method} {path}: operationId `{id}` again"
                );
            }
        }
        // Every operation says what its bodies are.
        for name in [
            "JobView",
            "LeaseResponse",
            "ErrorBody",
            "StateUpdate",
            "WorkerView",
        ] {
            assert!(spec["components"]["schemas"][name].is_object(), "{name}");
        }
    }
}
