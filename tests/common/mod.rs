//! Shared fixtures of the end-to-end tests: a real `vmfarm server` process, a real PostgreSQL,
//! and an HTTP client speaking as an admin or as a worker.
#![allow(dead_code)] // Each test binary uses its own part of these fixtures.

/// Runs each named async scenario `fn(Backend)` once per database, as tests `NAME::sqlite` and
/// `NAME::postgres`. (Not every test binary has such scenarios.)
#[allow(unused_macros)]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name(super::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name(super::Backend::Postgres).await
            }
        }
    )*};
}

pub mod farm;
pub mod postgres;
pub mod worker;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const READER_TOKEN: &str = "test-reader-token";
pub const WORKER_TOKENS: usize = 32;

pub fn worker_token(i: usize) -> String {
    format!("test-worker-token-{i}")
}

pub fn worker_name(i: usize) -> String {
    format!("w{i}")
}

/// Which database a test server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A `vmfarm server` child process on a loopback port, with its data dir.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub database_url: String,
    child: Option<Child>,
    config: PathBuf,
}

impl TestServer {
    pub fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, "")
    }

    /// Starts a server; `extra` is appended to its config file.
    pub fn start_with(backend: Backend, extra: &str) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let database_url = match backend {
            Backend::Sqlite => format!("sqlite://{}/vmfarm.db", dir.path().display()),
            Backend::Postgres => postgres::fresh_database(),
        };
        // A fixed port, so that a restarted server is where its workers left it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\ndatabase_url = \"{database_url}\"\n\
             [[tokens]]\nname = \"admin\"\ntoken = \"{ADMIN_TOKEN}\"\nscopes = [\"admin\"]\n\
             [[tokens]]\nname = \"reader\"\ntoken = \"{READER_TOKEN}\"\nscopes = [\"read\"]\n",
            dir.path().display()
        );
        for i in 0..WORKER_TOKENS {
            config.push_str(&format!(
                "[[workers]]\nname = \"{}\"\ntoken = \"{}\"\n",
                worker_name(i),
                worker_token(i)
            ));
        }
        // `extra` is whole TOML sections (e.g. `[leases]`), so it can follow the tables above.
        config.push_str(extra);
        let path = dir.path().join("server.toml");
        std::fs::write(&path, config).unwrap();
        let mut server = TestServer {
            dir,
            url: String::new(),
            database_url,
            child: None,
            config: path,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmfarm"))
            .args(["server", "--config"])
            .arg(&self.config)
            .env("VMFARM_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vmfarm server");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().expect("server printed nothing").unwrap();
        let url = first
            .strip_prefix("vmfarm server listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_owned();
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        self.url = url;
        self.child = Some(child);
    }

    /// A second server process on the same database and data folder (its secret key and
    /// artifacts), listening on a port of its own: another replica of the same farm.
    pub fn replica(&self) -> TestServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = std::fs::read_to_string(&self.config).unwrap();
        let listen = config.lines().next().unwrap();
        assert!(listen.starts_with("listen = "), "{listen}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(
            &path,
            config.replacen(listen, &format!("listen = \"127.0.0.1:{port}\""), 1),
        )
        .unwrap();
        let mut replica = TestServer {
            dir,
            url: String::new(),
            database_url: self.database_url.clone(),
            child: None,
            config: path,
        };
        replica.spawn();
        replica
    }

    /// `kill -9`, then start again on the same data and port.
    pub fn crash_and_restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stores secret `name` with `value` through `vmfarm server secret set`; returns what it printed.
    pub fn set_secret(&self, name: &str, value: &[u8]) -> String {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vmfarm"))
            .args(["server", "--config"])
            .arg(self.data_dir().join("server.toml"))
            .args(["secret", "set", name, "--user", "admin", "--value-stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(value).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "vmfarm server secret set {name}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new API token of `user` with `scopes` (`submit,read`), through `vmfarm server token create`.
    pub fn create_token(&self, name: &str, user: &str, scopes: &str) -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmfarm"))
            .args(["server", "--config"])
            .arg(self.data_dir().join("server.toml"))
            .args([
                "token", "create", "--name", name, "--user", user, "--scopes", scopes,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vmfarm server token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn client(&self, token: &str) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: self.url.clone(),
            token: token.to_owned(),
        }
    }

    pub fn admin(&self) -> Api {
        self.client(ADMIN_TOKEN)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A thin HTTP client with a bearer token.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Api {
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(30))
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.get_ok(path).await.json().await.unwrap()
    }

    /// The body of GET `path`; panics unless it succeeds.
    pub async fn get_bytes(&self, path: &str) -> Vec<u8> {
        self.get_ok(path).await.bytes().await.unwrap().to_vec()
    }

    /// The body of GET `path` as text; panics unless it succeeds.
    pub async fn get_text(&self, path: &str) -> String {
        self.get_ok(path).await.text().await.unwrap()
    }

    pub async fn get_ok(&self, path: &str) -> reqwest::Response {
        let r = self.req(reqwest::Method::GET, path).send().await.unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r
    }

    /// Submits a manifest; panics unless it is accepted.
    pub async fn submit(&self, manifest: &str) -> vmfarm_proto::api::SubmitResponse {
        let r = self
            .req(reqwest::Method::POST, "/api/jobs")
            .body(manifest.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        r.json().await.unwrap()
    }
}

/// A minimal valid manifest for `image` with the given tasks.
pub fn manifest(image: &str, tasks: &[&str]) -> String {
    let mut text = format!("image = \"{image}\"\n");
    for t in tasks {
        text.push_str(&format!(
            "[[tasks]]\nname = \"{t}\"\nscript = \"echo {t}\"\n"
        ));
    }
    text
}

/// Waits until job `id` is as `ok` says (`what`, for the message), for at most `limit`.
pub async fn wait_for(
    api: &Api,
    id: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
    limit: std::time::Duration,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let job = api.get_json(&format!("/api/jobs/{id}")).await;
        if ok(&job) {
            return job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} never got {what}: {job}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Waits until job `id`'s first task runs.
pub async fn wait_task_running(api: &Api, id: &str) -> serde_json::Value {
    let running = |j: &serde_json::Value| j["tasks"][0]["state"] == "running";
    wait_for(
        api,
        id,
        "its first task running",
        running,
        std::time::Duration::from_secs(300),
    )
    .await
}

/// Waits until job `id` is in `state`.
pub async fn wait_state(api: &Api, id: &str, state: &str) -> serde_json::Value {
    wait_for(
        api,
        id,
        state,
        |j| j["state"] == state,
        std::time::Duration::from_secs(300),
    )
    .await
}

/// Waits until job `id` has ended, in whatever state.
pub async fn wait_ended(api: &Api, id: &str) -> serde_json::Value {
    let ended = |j: &serde_json::Value| {
        ["succeeded", "failed", "timed_out", "cancelled", "error"]
            .contains(&j["state"].as_str().unwrap_or(""))
    };
    wait_for(
        api,
        id,
        "to an end",
        ended,
        std::time::Duration::from_secs(300),
    )
    .await
}

/// Job `id`'s whole log as text (read page by page).
pub async fn log_of(api: &Api, id: &str) -> String {
    let mut log = String::new();
    loop {
        let page = api
            .req(
                reqwest::Method::GET,
                &format!("/api/jobs/{id}/log?from={}", log.len()),
            )
            .send()
            .await
            .unwrap();
        let size: usize = page.headers()["x-vmfarm-log-size"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let text = page.text().await.unwrap();
        log.push_str(&text);
        if log.len() >= size || text.is_empty() {
            return log;
        }
    }
}

/// Logs in to the web UI with the admin token (`http` must not follow redirects); returns the
/// `cookie` header of the session.
pub async fn token_session(http: &reqwest::Client, server_url: &str) -> String {
    let form = http
        .get(format!("{server_url}/login"))
        .send()
        .await
        .unwrap();
    let login_cookie = cookie_of(&form, "vmfarm_login");
    let html = form.text().await.unwrap();
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the login form has a CSRF token")
        .to_owned();
    let done = http
        .post(format!("{server_url}/login"))
        .header("cookie", format!("vmfarm_login={login_cookie}"))
        .form(&[("user", ""), ("password", ADMIN_TOKEN), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 303, "{}", done.text().await.unwrap());
    format!("vmfarm_session={}", cookie_of(&done, "vmfarm_session"))
}

pub fn cookie_of(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no {name} cookie"))
        .to_owned()
}
