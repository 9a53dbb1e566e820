//! The server in-process for its own tests: the router of [`crate::app::app`] called with
//! `oneshot` on a fresh database (a temporary SQLite file, or a new database on the test
//! PostgreSQL server of `VMFARM_TEST_POSTGRES`), with an admin, a reader (the admin user's, read only), two users (alice and bob) and two workers.

use crate::app::app;
use crate::auth::{ApiCaller, Caller, TokenSource, store_token};
use crate::config::{Scope, ServerConfig};
use crate::db::{Db, SqliteSync, now_ms};
use crate::secrets::SecretKey;
use crate::state::AppState;
use crate::store::ArtifactStore;
use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tower::ServiceExt;
use vmfarm_proto::wire::{FENCE_HEADER, LeaseResponse, SHA256_HEADER, StateUpdate, TaskUpdate};
use vmfarm_proto::{JobState, TaskState};

pub const ADMIN: &str = "admin-token";
/// The built-in admin user's token with the `read` scope only.
pub const READER: &str = "reader-token";
/// A monitoring system's token: the `metrics` scope only.
pub const SCRAPER: &str = "scraper-token";
/// Tokens (submit and read) of two users who are not admins.
pub const ALICE: &str = "alice-token";
pub const BOB: &str = "bob-token";
pub const WORKERS: [&str; 2] = ["w0", "w1"];

pub fn worker_token(worker: &str) -> String {
    format!("{worker}-token")
}

/// Runs each named async scenario `fn(Database)` once per database, as tests `NAME::sqlite`
/// and `NAME::postgres`.
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::test_utils::Database::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::test_utils::Database::Postgres).await
            }
        }
    )*};
}
pub(crate) use on_both_databases;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    Sqlite,
    Postgres,
}

/// An answer: its status and its body as JSON (`Null` when empty, a string when not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The error message of a refusal.
    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }
}

pub struct TestApp {
    pub state: AppState,
    router: Router,
    pub dir: tempfile::TempDir,
}

impl TestApp {
    pub async fn new(database: Database) -> TestApp {
        Self::with_config(database, |_| {}).await
    }

    /// A server whose config `adjust` changes first.
    pub async fn with_config(
        database: Database,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> TestApp {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = fresh_database_url(database, dir.path()).await;
        Self::on(dir, url, adjust).await
    }

    /// A server on the database at `url` (which may hold data already), its files in `dir`.
    pub async fn on(
        dir: tempfile::TempDir,
        url: String,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> TestApp {
        let mut config = ServerConfig {
            data_dir: dir.path().to_owned(),
            database_url: url.clone(),
            ..ServerConfig::default()
        };
        adjust(&mut config);
        let db = Db::open(&url, SqliteSync::default())
            .await
            .expect("the test database opens");
        let api = |name: &str, user: &str, scopes: Vec<Scope>| {
            Caller::Api(ApiCaller {
                name: name.into(),
                user: user.into(),
                admin: false,
                scopes,
                max_priority: None,
            })
        };
        let callers = [
            (ADMIN.to_owned(), api("admin", "admin", vec![Scope::Admin])),
            (READER.to_owned(), api("reader", "admin", vec![Scope::Read])),
            (
                SCRAPER.to_owned(),
                api("prometheus", "admin", vec![Scope::Metrics]),
            ),
            (
                ALICE.to_owned(),
                api("alice", "alice", vec![Scope::Submit, Scope::Read]),
            ),
            (
                BOB.to_owned(),
                api("bob", "bob", vec![Scope::Submit, Scope::Read]),
            ),
        ]
        .into_iter()
        .chain(WORKERS.map(|w| (worker_token(w), Caller::Worker { name: w.into() })));
        for (token, caller) in callers {
            store_token(&db, &token, &caller, TokenSource::Cli)
                .await
                .expect("a test token is stored");
        }
        let key = SecretKey::load(dir.path(), true).expect("a secret key");
        let store = ArtifactStore::open(&config)
            .await
            .expect("the test artifact store opens");
        let state = AppState::new(db, config, store, key);
        TestApp {
            router: app(state.clone()),
            state,
            dir,
        }
    }

    /// Calls the router with `token` (if any), `headers`, and `body`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, String)],
        body: Body,
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(body).expect("a valid request"))
            .await
            .expect("the router answers");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("the body is read");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, Some(token), &[], Body::empty())
            .await
    }

    /// POSTs `json` as a worker under `lease` (with its fence).
    pub async fn lease_post(
        &self,
        worker: &str,
        lease: &LeaseResponse,
        route: &str,
        json: &Value,
    ) -> Answer {
        self.call(
            Method::POST,
            &format!("/api/leases/{}/{route}", lease.lease_id),
            Some(&worker_token(worker)),
            &[
                (FENCE_HEADER, lease.fence.to_string()),
                ("content-type", "application/json".into()),
            ],
            Body::from(json.to_string()),
        )
        .await
    }

    /// Submits `manifest` as the admin; the ids of its jobs.
    pub async fn submit(&self, manifest: &str) -> Vec<i64> {
        self.submit_as(ADMIN, manifest).await
    }

    /// POSTs `body` to `path` with `token`.
    pub async fn post(&self, path: &str, token: &str, body: impl Into<String>) -> Answer {
        self.call(
            Method::POST,
            path,
            Some(token),
            &[("content-type", "application/json".into())],
            Body::from(body.into()),
        )
        .await
    }

    /// Submits `manifest` with `token`, which must be accepted; the ids of its jobs.
    pub async fn submit_as(&self, token: &str, manifest: &str) -> Vec<i64> {
        let answer = self.post("/api/jobs", token, manifest).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
        answer.body["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| {
                j["id"]
                    .as_str()
                    .and_then(|id| id.parse().ok())
                    .expect("an id")
            })
            .collect()
    }

    /// A lease for `worker` on image `image`, which must have queued work.
    pub async fn lease(&self, worker: &str, image: &str) -> LeaseResponse {
        let request = serde_json::json!({
            "name": worker, "images": [{"name": image, "version": "v1"}], "slots": 1, "version": "test",
        });
        let answer = self
            .call(
                Method::POST,
                "/api/workers/lease",
                Some(&worker_token(worker)),
                &[("content-type", "application/json".into())],
                Body::from(request.to_string()),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        serde_json::from_value(answer.body).expect("a lease")
    }

    /// Reports `update` under `lease`; the answer's status.
    pub async fn report(
        &self,
        worker: &str,
        lease: &LeaseResponse,
        update: &StateUpdate,
    ) -> Answer {
        let json = serde_json::to_value(update).expect("an update");
        self.lease_post(worker, lease, "state", &json).await
    }

    /// Moves the job of `lease` to `state`; asserts it was accepted.
    pub async fn move_job(&self, worker: &str, lease: &LeaseResponse, state: JobState) {
        let update = StateUpdate {
            job_state: Some(state),
            ..StateUpdate::default()
        };
        let answer = self.report(worker, lease, &update).await;
        assert_eq!(answer.status, StatusCode::NO_CONTENT, "{:?}", answer.body);
    }

    /// Moves the job of `lease` through `booting` to `running`.
    pub async fn start(&self, worker: &str, lease: &LeaseResponse) {
        self.move_job(worker, lease, JobState::Booting).await;
        self.move_job(worker, lease, JobState::Running).await;
    }

    /// Moves task `name` of the job of `lease` to `state`; asserts it was accepted.
    pub async fn move_task(
        &self,
        worker: &str,
        lease: &LeaseResponse,
        name: &str,
        state: TaskState,
        exit_code: Option<i32>,
    ) {
        let update = StateUpdate {
            task: Some(TaskUpdate {
                name: name.into(),
                state,
                exit_code,
            }),
            ..StateUpdate::default()
        };
        let answer = self.report(worker, lease, &update).await;
        assert_eq!(answer.status, StatusCode::NO_CONTENT, "{:?}", answer.body);
    }

    /// Uploads `data` as artifact `name` under `lease`.
    pub async fn upload(
        &self,
        worker: &str,
        lease: &LeaseResponse,
        name: &str,
        data: &[u8],
    ) -> Answer {
        let sha256 = hex::encode(Sha256::digest(data));
        self.upload_claiming(worker, lease, name, data, &sha256)
            .await
    }

    /// Uploads `data` as artifact `name`, saying its sha256 is `sha256`.
    pub async fn upload_claiming(
        &self,
        worker: &str,
        lease: &LeaseResponse,
        name: &str,
        data: &[u8],
        sha256: &str,
    ) -> Answer {
        self.call(
            Method::PUT,
            &format!("/api/leases/{}/artifacts/{name}", lease.lease_id),
            Some(&worker_token(worker)),
            &[
                (FENCE_HEADER, lease.fence.to_string()),
                (SHA256_HEADER, sha256.to_owned()),
            ],
            Body::from(data.to_vec()),
        )
        .await
    }

    /// Job `id` as the API shows it.
    pub async fn job(&self, id: i64) -> Value {
        let answer = self.get(&format!("/api/jobs/{id}"), ADMIN).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        answer.body
    }

    /// Job `id`'s whole log as text.
    pub async fn log(&self, id: i64) -> String {
        let answer = self.get(&format!("/api/jobs/{id}/log"), ADMIN).await;
        assert_eq!(answer.status, StatusCode::OK);
        answer.body.as_str().map(str::to_owned).unwrap_or_default()
    }

    /// Makes job `id`'s lease expire now, as if its worker had stopped renewing it long ago.
    pub async fn expire(&self, id: i64) {
        self.state
            .db
            .execute(
                "UPDATE jobs SET lease_expires_at = $1 WHERE id = $2",
                &[(now_ms() - 1).into(), id.into()],
            )
            .await
            .expect("the lease is made to expire");
    }
}

/// The URL of a new, empty database: a file in `dir`, or one on the test PostgreSQL server.
pub async fn fresh_database_url(database: Database, dir: &std::path::Path) -> String {
    match database {
        Database::Sqlite => format!("sqlite://{}/vmfarm.db", dir.display()),
        Database::Postgres => fresh_postgres_database().await,
    }
}

/// A new, empty database on the test PostgreSQL server; its URL.
async fn fresh_postgres_database() -> String {
    use sqlx::Connection;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let base = std::env::var("VMFARM_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "VMFARM_TEST_POSTGRES is not set: run the tests with scripts/test.sh, or start a server with \
             `eval $(bash scripts/test-postgres.sh start)`"
        )
    });
    sqlx::any::install_default_drivers();
    let name = format!(
        "vmfarm_unit_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        now_ms()
    );
    let mut conn = sqlx::AnyConnection::connect(&base)
        .await
        .expect("the test PostgreSQL server answers");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("a test database is created");
    let (prefix, _) = base.rsplit_once('/').expect("a postgres URL ends with /DB");
    format!("{prefix}/{name}")
}

/// Runs git in `dir` as a test user, which must succeed; its output, trimmed.
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
