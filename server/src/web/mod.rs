//! The web UI: server-rendered pages (templates and assets from `web/`, embedded in the binary),
//! a login with a session cookie, and a CSRF token on every form.

mod pages;
pub mod session;
mod throttle;

use crate::error::AppError;
use crate::state::AppState;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{TimeZone, Utc};
use minijinja::Environment;
use std::sync::OnceLock;

pub use session::WebUser;

/// The UI's routes (all outside `/api`).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(pages::dashboard))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/submit", get(pages::submit_page).post(pages::submit))
        .route("/history", get(pages::history))
        .route("/jobs/{id}", get(pages::job))
        .route("/jobs/{id}/cancel", post(pages::cancel))
        .route("/jobs/{id}/resubmit", post(pages::resubmit))
        .route("/jobs/{id}/log/stream", get(pages::log_stream))
        .route("/jobs/{id}/artifacts/{*name}", get(pages::artifact))
        .route("/groups/{id}", get(pages::group))
        .route("/pushes/{id}", get(pages::push))
        .route(
            "/schedules",
            get(pages::schedules).post(pages::create_schedule),
        )
        .route("/schedules/{name}", get(pages::schedule))
        .route("/static/app.js", get(app_js))
        .route("/static/style.css", get(style_css))
}

async fn app_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../../web/static/app.js"),
    )
}

async fn style_css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../../web/static/style.css"),
    )
}

const TEMPLATES: &[(&str, &str)] = &[
    (
        "base.html",
        include_str!("../../../web/templates/base.html"),
    ),
    (
        "login.html",
        include_str!("../../../web/templates/login.html"),
    ),
    (
        "dashboard.html",
        include_str!("../../../web/templates/dashboard.html"),
    ),
    (
        "submit.html",
        include_str!("../../../web/templates/submit.html"),
    ),
    ("job.html", include_str!("../../../web/templates/job.html")),
    (
        "group.html",
        include_str!("../../../web/templates/group.html"),
    ),
    (
        "push.html",
        include_str!("../../../web/templates/push.html"),
    ),
    (
        "history.html",
        include_str!("../../../web/templates/history.html"),
    ),
    (
        "schedules.html",
        include_str!("../../../web/templates/schedules.html"),
    ),
    (
        "schedule.html",
        include_str!("../../../web/templates/schedule.html"),
    ),
    (
        "error.html",
        include_str!("../../../web/templates/error.html"),
    ),
];

/// `2026-11-22 03:00:05 UTC`, or an empty string.
fn time_filter(ms: Option<i64>) -> String {
    ms.and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// `1h 2m 3s` between two times, or an empty string.
fn duration_filter(from: Option<i64>, to: Option<i64>) -> String {
    let (Some(from), Some(to)) = (from, to) else {
        return String::new();
    };
    let secs = (to - from).max(0) / 1000;
    let millis = (to - from).max(0) % 1000;
    match secs {
        0..60 if secs < 10 => format!("{secs}.{:01}s", millis / 100),
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        _ => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
    }
}

fn bytes_filter(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", n as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", n as f64 / 1_073_741_824.0),
    }
}

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        for (name, source) in TEMPLATES {
            if let Err(e) = env.add_template(name, source) {
                // The templates are part of the binary: a broken one is a build mistake that
                // the web tests catch; the page using it answers with an error.
                tracing::error!(template = name, error = %e, "invalid template");
            }
        }
        env.add_filter("time", time_filter);
        env.add_filter("duration", duration_filter);
        env.add_filter("bytes", bytes_filter);
        env
    })
}

/// Renders a page.
pub fn render(name: &str, ctx: minijinja::Value) -> Result<Html<String>, WebError> {
    env()
        .get_template(name)
        .and_then(|t| t.render(ctx))
        .map(Html)
        .map_err(|e| WebError(AppError::internal(e)))
}

/// A failed page: the API error's status and message, as HTML.
#[derive(Debug)]
pub struct WebError(pub AppError);

impl From<AppError> for WebError {
    fn from(e: AppError) -> Self {
        WebError(e)
    }
}

impl From<crate::db::DbFailure> for WebError {
    fn from(e: crate::db::DbFailure) -> Self {
        WebError(e.into())
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let message = self.0.to_string();
        // The API's answer carries the status (and logs an internal cause).
        let status = self.0.into_response().status();
        let page = env()
            .get_template("error.html")
            .and_then(|t| {
                t.render(minijinja::context! { status => status.as_u16(), message => message })
            })
            .unwrap_or_else(|_| format!("{status}: {message}"));
        (status, Html(page)).into_response()
    }
}

pub type WebResult<T> = Result<T, WebError>;

/// A `303 See Other` to `to` (after a form).
pub fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response()
}
