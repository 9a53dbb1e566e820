//! Logging in to the web UI: users (argon2 hashes, from the config or `vmfarm server user add`)
//! or an API token, a session cookie (HttpOnly, SameSite=Strict, Secure), and CSRF tokens.

use super::{WebError, WebResult, render, see_other, throttle};
use crate::auth::{ApiCaller, Caller, hash_token, lookup, parse_scopes, scope_name};
use crate::config::{Scope, ServerConfig};
use crate::db::{Db, Query, now_ms};
use crate::error::AppError;
use crate::state::AppState;
use crate::users;
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::Form;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

const SESSION_COOKIE: &str = "vmfarm_session";
const LOGIN_COOKIE: &str = "vmfarm_login";

/// Who is logged in, and the CSRF token their forms must carry.
#[derive(Debug, Clone)]
pub struct WebUser {
    /// What the page header shows: the user, or `token NAME` for a token login.
    pub name: String,
    pub csrf: String,
    /// The same rights as an API caller: its user, admin flag, scopes and priority cap.
    pub api: ApiCaller,
}

impl WebUser {
    pub fn caller(&self) -> Caller {
        Caller::Api(self.api.clone())
    }

    /// Refuses a form whose CSRF token is not this session's.
    pub fn check_csrf(&self, sent: &str) -> WebResult<()> {
        if constant_time_eq(sent.as_bytes(), self.csrf.as_bytes()) {
            Ok(())
        } else {
            Err(WebError(AppError::Forbidden(
                "this form has expired or did not come from this site: reload the page and try again"
                    .into(),
            )))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(state: &AppState, name: &str, value: &str, max_age_secs: u64) -> String {
    let secure = if state.config.web.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}")
}

/// Pages that need a login send the browser to `/login` instead.
pub struct LoginRedirect;

impl IntoResponse for LoginRedirect {
    fn into_response(self) -> Response {
        see_other("/login")
    }
}

impl FromRequestParts<AppState> for WebUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let Some(id) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(LoginRedirect.into_response());
        };
        match live_session(&state.db, &state.config, id).await {
            Ok(Some(user)) => Ok(user),
            Ok(None) => Err(LoginRedirect.into_response()),
            Err(e) => Err(WebError(AppError::from(e)).into_response()),
        }
    }
}

/// The user of session `id` (its cookie), if the session is live: not expired, and the token
/// it was opened with (if any) not revoked since.
async fn live_session(
    db: &Db,
    config: &ServerConfig,
    id: &str,
) -> Result<Option<WebUser>, crate::db::DbFailure> {
    let row = db
        .read()
        .fetch_optional(
            "SELECT s.user_name, s.csrf, s.scopes, t.name, t.max_priority, u.admin \
             FROM web_sessions s LEFT JOIN tokens t ON t.hash = s.token_hash \
             LEFT JOIN users u ON u.name = s.user_name \
             WHERE s.hash = $1 AND s.expires_at > $2 AND (s.token_hash IS NULL OR t.hash IS NOT NULL)",
            &[hash_token(id).as_str().into(), now_ms().into()],
        )
        .await?;
    row.map(|row| {
        let user = row.text(0)?;
        let token = row.opt_text(3)?;
        Ok(WebUser {
            name: match &token {
                Some(token) => format!("token {token}"),
                None => user.clone(),
            },
            csrf: row.text(1)?,
            api: ApiCaller {
                name: token.unwrap_or_else(|| user.clone()),
                admin: users::is_admin(config, &user, row.opt_int(5)?),
                scopes: parse_scopes(&row.text(2)?),
                max_priority: row.opt_int(4)?,
                user,
            },
        })
    })
    .transpose()
}

/// An argon2id hash of `password` in PHC form.
pub fn hash_password(password: &str) -> Result<String, AppError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(AppError::internal)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AppError::internal(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AppError::internal(e.to_string()))
}

/// Whether `password` matches `hash`; with no hash (no such user, or one who cannot log in with
/// a password), a hash of nothing is checked all the same, so that the answer takes as long.
fn password_matches(password: &str, hash: Option<&str>) -> bool {
    static NOBODY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    match hash {
        Some(hash) => verify_password(password, hash),
        None => {
            let nobody = NOBODY.get_or_init(|| hash_password("").unwrap_or_default());
            verify_password(password, nobody);
            false
        }
    }
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

#[derive(Debug, serde::Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    user: String,
    password: String,
    csrf: String,
}

fn login_form(state: &AppState, error: Option<&str>, user: &str) -> WebResult<Response> {
    let token = crate::random::random_hex(16).map_err(AppError::internal)?;
    let page = render(
        "login.html",
        minijinja::context! { csrf => token, error => error, user => user },
    )?;
    Ok((
        [(
            header::SET_COOKIE,
            set_cookie(state, LOGIN_COOKIE, &token, 3600),
        )],
        page,
    )
        .into_response())
}

pub async fn login_page(State(state): State<AppState>) -> WebResult<Response> {
    login_form(&state, None, "")
}

/// A login that checks out: the session's user, its scopes, and the token it used (if any).
struct Login {
    user: String,
    scopes: String,
    token_hash: Option<String>,
}

/// Who a name and password (or, with no name, an API token) are.
async fn authenticate(state: &AppState, form: &LoginForm) -> WebResult<Option<Login>> {
    let user = form.user.trim();
    if user.is_empty() {
        let hash = hash_token(form.password.trim());
        return match lookup(&state.db, &state.config, &hash).await? {
            // A monitoring system's token scrapes /metrics and opens no session.
            Some(Caller::Api(api)) if api.scopes.iter().any(|s| *s != Scope::Metrics) => {
                Ok(Some(Login {
                    user: api.user,
                    scopes: api
                        .scopes
                        .iter()
                        .map(|s| scope_name(*s))
                        .collect::<Vec<_>>()
                        .join(","),
                    token_hash: Some(hash),
                }))
            }
            _ => Ok(None),
        };
    }
    let hash = users::find(&state.db, &state.config, user)
        .await?
        .and_then(|known| known.password_hash);
    // People may submit, read and manage schedules; token logins keep their token's scopes.
    let scopes = [Scope::Submit, Scope::Read].map(scope_name).join(",");
    Ok(
        password_matches(&form.password, hash.as_deref()).then(|| Login {
            user: user.to_owned(),
            scopes,
            token_hash: None,
        }),
    )
}

pub async fn login(
    State(state): State<AppState>,
    peer: throttle::Peer,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> WebResult<Response> {
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !constant_time_eq(expected.as_bytes(), form.csrf.as_bytes()) {
        return login_form(
            &state,
            Some("The login form expired: please try again."),
            &form.user,
        );
    }
    let keys = throttle::Keys::new(form.user.trim(), peer.0);
    let attempt = throttle::attempt(&state.db, &state.config.web, &keys, now_ms()).await?;
    let delay_on_failure = match attempt {
        throttle::Attempt::Allowed { delay_on_failure } => delay_on_failure,
        throttle::Attempt::Locked { until } => {
            let minutes = (until - now_ms()).max(0).div_euclid(60_000) + 1;
            let message = format!(
                "Too many failed logins for this user or from this address: try again in {minutes} minute{}.",
                if minutes == 1 { "" } else { "s" }
            );
            let mut page = login_form(&state, Some(&message), &form.user)?;
            *page.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            return Ok(page);
        }
    };
    let Some(login) = authenticate(&state, &form).await? else {
        tokio::time::sleep(delay_on_failure).await;
        tracing::info!(user = %form.user.trim(), "failed web login");
        return login_form(
            &state,
            Some("Unknown user name or wrong password (or token)."),
            &form.user,
        );
    };
    throttle::succeeded(&state.db, &keys).await?;
    let id = crate::random::random_hex(32).map_err(AppError::internal)?;
    let csrf = crate::random::random_hex(16).map_err(AppError::internal)?;
    let ttl = state.config.web.session_ttl.0;
    let now = now_ms();
    let expires = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
    let name = login.user.clone();
    let session = (hash_token(&id), login, csrf);
    state
        .db
        .write(move |tx| {
            Box::pin(async move {
                let (hash, login, csrf) = &session;
                tx.execute(
                    "DELETE FROM web_sessions WHERE expires_at < $1",
                    &[now.into()],
                )
                .await?;
                tx.execute(
                    "INSERT INTO web_sessions (hash, user_name, scopes, csrf, created_at, \
                     expires_at, token_hash) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        hash.into(),
                        (&login.user).into(),
                        (&login.scopes).into(),
                        csrf.into(),
                        now.into(),
                        expires.into(),
                        login.token_hash.as_deref().into(),
                    ],
                )
                .await
            })
        })
        .await?;
    tracing::info!(user = %name, "web login");
    let mut response = see_other("/");
    let headers = response.headers_mut();
    for value in [
        set_cookie(&state, SESSION_COOKIE, &id, ttl.as_secs()),
        set_cookie(&state, LOGIN_COOKIE, "", 0),
    ] {
        if let Ok(v) = value.parse() {
            headers.append(header::SET_COOKIE, v);
        }
    }
    Ok(response)
}

#[derive(Debug, serde::Deserialize)]
pub struct CsrfForm {
    pub csrf: String,
}

pub async fn logout(
    State(state): State<AppState>,
    user: WebUser,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> WebResult<Response> {
    user.check_csrf(&form.csrf)?;
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        state
            .db
            .execute(
                "DELETE FROM web_sessions WHERE hash = $1",
                &[hash_token(id).as_str().into()],
            )
            .await?;
    }
    let mut response = see_other("/login");
    if let Ok(v) = set_cookie(&state, SESSION_COOKIE, "", 0).parse() {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{Database, TestApp, on_both_databases};
    use axum::body::Body;
    use axum::extract::connect_info::MockConnectInfo;
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};
    use tower::ServiceExt;

    #[tokio::test]
    async fn test_a_metrics_token_opens_no_session() {
        let app = TestApp::new(Database::Sqlite).await;
        let form = |token: &str| LoginForm {
            user: String::new(),
            password: token.into(),
            csrf: String::new(),
        };
        let scraper = authenticate(&app.state, &form(crate::test_utils::SCRAPER)).await;
        assert!(scraper.unwrap().is_none());
        let reader = authenticate(&app.state, &form(crate::test_utils::READER)).await;
        assert_eq!(reader.unwrap().unwrap().scopes, "read");
    }

    on_both_databases!(
        test_failed_logins_are_slowed_then_refused_per_user_and_address,
        test_logins_sent_at_once_cannot_pass_the_limit,
    );

    async fn test_logins_sent_at_once_cannot_pass_the_limit(db: Database) {
        let app = TestApp::with_config(db, |c| c.web.failed_logins_before_lock = 4).await;
        let attempts = (0..12u8).map(|i| {
            let app = &app;
            async move { log_in(app, [10, 1, 0, i], "alice", "guess").await.0 }
        });
        let answers = futures_util::future::join_all(attempts).await;
        let checked = answers.iter().filter(|s| **s == StatusCode::OK).count();
        let refused = answers
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count();
        assert_eq!(
            (checked, refused),
            (4, 8),
            "only 4 passwords are checked, however many come at once: {answers:?}"
        );
    }

    /// Posts the login form from `addr`; the status and the page's error line.
    async fn log_in(
        app: &TestApp,
        addr: [u8; 4],
        user: &str,
        password: &str,
    ) -> (StatusCode, String) {
        let router = crate::app::app(app.state.clone())
            .layer(MockConnectInfo(SocketAddr::from((addr, 40000))));
        let request = axum::http::Request::post("/login")
            .header("content-type", "application/x-www-form-urlencoded")
            .header("cookie", "vmfarm_login=c5rf")
            .body(Body::from(format!(
                "user={user}&password={password}&csrf=c5rf"
            )))
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let page = String::from_utf8_lossy(&body).into_owned();
        let error = page
            .split("id=\"login-error\">")
            .nth(1)
            .and_then(|rest| rest.split('<').next())
            .unwrap_or("")
            .to_owned();
        (status, error)
    }

    async fn test_failed_logins_are_slowed_then_refused_per_user_and_address(db: Database) {
        let hash = hash_password("right-password").unwrap();
        let app = TestApp::with_config(db, |c| {
            c.web.failed_logins_before_lock = 4;
            c.users = ["alice", "bob", "carol"]
                .map(|name| crate::config::User {
                    name: name.into(),
                    password_hash: hash.clone(),
                    admin: false,
                })
                .to_vec();
        })
        .await;
        let (here, elsewhere, third) = ([10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 3]);
        let wrong = "Unknown user name or wrong password (or token).";
        let mut took = Vec::new();
        for _ in 0..4 {
            let started = Instant::now();
            assert_eq!(
                log_in(&app, here, "alice", "wrong").await,
                (StatusCode::OK, wrong.into())
            );
            took.push(started.elapsed());
        }
        assert!(
            took[3] >= took[0] + Duration::from_millis(1500),
            "the 3rd and 4th failures are held back 1 s and 2 s: {took:?}"
        );
        let locked =
            "Too many failed logins for this user or from this address: try again in 15 minutes.";
        let refused = log_in(&app, here, "alice", "right-password").await;
        assert_eq!(
            refused,
            (StatusCode::TOO_MANY_REQUESTS, locked.into()),
            "even the right password"
        );
        assert_eq!(
            log_in(&app, elsewhere, "alice", "right-password").await.0,
            StatusCode::TOO_MANY_REQUESTS,
            "the user is locked from any address"
        );
        assert_eq!(
            log_in(&app, here, "bob", "right-password").await.0,
            StatusCode::TOO_MANY_REQUESTS,
            "and the address for any user"
        );
        assert_eq!(
            log_in(&app, third, "carol", "right-password").await,
            (StatusCode::SEE_OTHER, String::new()),
            "others log in"
        );

        // What a request sends does not size what is written: a name that cannot be a user's
        // is not counted under itself (its address is).
        let long = "x".repeat(5000);
        assert_eq!(log_in(&app, [10, 0, 0, 9], &long, "pw").await.1, wrong);
        let oversized = app
            .state
            .db
            .read()
            .fetch_optional(
                "SELECT COUNT(*) FROM login_failures WHERE LENGTH(key) > 80",
                &[],
            )
            .await
            .unwrap()
            .unwrap()
            .int(0)
            .unwrap();
        assert_eq!(oversized, 0);

        // A failed login for a user that does not exist costs a password check all the same.
        // (Each from an address of its own, and at most two per user: none is held back.)
        let started = Instant::now();
        log_in(&app, [10, 0, 0, 4], "carol", "wrong").await;
        let known = started.elapsed();
        log_in(&app, [10, 0, 0, 5], "nobody", "wrong").await;
        let started = Instant::now();
        assert_eq!(
            log_in(&app, [10, 0, 0, 6], "nobody", "wrong").await.1,
            wrong
        );
        let unknown = started.elapsed();
        assert!(
            unknown * 2 >= known,
            "an unknown user's failure ({unknown:?}) answers about as slowly as a known one's ({known:?})"
        );
    }

    #[test]
    fn test_password_hashes_verify() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn test_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "a=1; vmfarm_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, LOGIN_COOKIE), None);
    }
}
