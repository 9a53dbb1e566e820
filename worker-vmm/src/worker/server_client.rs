//! The worker's side of the server<->worker contract: lease, heartbeat, log, state, artifacts.
//! Writes are retried through server restarts; a 409 means the lease is gone and is final.

use crate::config::ServerUrls;
use reqwest::{Method, StatusCode};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::io::ReaderStream;
use vmfarm_proto::names::encode_artifact_path;
use vmfarm_proto::wire::{
    FENCE_HEADER, HeartbeatResponse, LeaseRequest, LeaseResponse, LogAppend, SHA256_HEADER,
    StateUpdate,
};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the lease is gone (expired or superseded): {0}")]
    LeaseLost(String),
    #[error("the server refused the worker's token ({0}): check the worker's token")]
    Unauthorized(StatusCode),
    #[error("the server refused the request ({status}): {message}")]
    Refused { status: StatusCode, message: String },
    #[error("the server did not answer for {0:?}")]
    Unreachable(Duration, #[source] reqwest::Error),
    #[error("reading {path}")]
    Local {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// How long a write keeps retrying while the server is down before the job gives up.
pub const RETRY_FOR: Duration = Duration::from_secs(90);

/// The worker's client of the server, or of a farm's replicas: calls go to the replica in
/// use, and move on to the next one (for every job of the worker) when it does not answer.
#[derive(Clone)]
pub struct ServerClient {
    http: reqwest::Client,
    bases: Arc<[String]>,
    /// The replica in use: an index into `bases`, counting up (modulo its length).
    current: Arc<AtomicUsize>,
    token: String,
}

/// The lease a job's writes speak for.
#[derive(Debug, Clone)]
pub struct LeaseHandle {
    pub lease_id: String,
    pub fence: u64,
}

impl LeaseHandle {
    pub fn of(lease: &vmfarm_proto::wire::LeaseResponse) -> LeaseHandle {
        LeaseHandle {
            lease_id: lease.lease_id.clone(),
            fence: lease.fence,
        }
    }
}

impl ServerClient {
    /// A client of the server, or of the replicas, at `server`.
    pub fn new(server: &ServerUrls, token: &str) -> Result<ServerClient, reqwest::Error> {
        let bases: Vec<String> = server
            .urls()
            .iter()
            .map(|b| b.trim_end_matches('/').to_owned())
            .collect();
        Ok(ServerClient {
            http: reqwest::Client::builder()
                .user_agent(concat!("vmfarm-worker/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(5))
                .build()?,
            bases: bases.into(),
            current: Arc::default(),
            token: token.to_owned(),
        })
    }

    /// The replica in use, as its count (for [`ServerClient::move_on`]) and URL.
    fn in_use(&self) -> (usize, &str) {
        let at = self.current.load(Ordering::Relaxed);
        (at, &self.bases[at % self.bases.len()])
    }

    /// The replica counted `at` did not answer: the next one is used from now on (once, however
    /// many calls found it down at the same time).
    fn move_on(&self, at: usize) {
        if self.bases.len() < 2 {
            return;
        }
        let moved = self.current.compare_exchange(
            at,
            at.wrapping_add(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if moved.is_ok() {
            let len = self.bases.len();
            tracing::warn!(
                from = %self.bases[at % len],
                to = %self.bases[at.wrapping_add(1) % len],
                "the server does not answer; moving on to the next replica"
            );
        }
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let (_, base) = self.in_use();
        self.http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&self.token)
    }

    fn scoped(&self, method: Method, lease: &LeaseHandle, what: &str) -> reqwest::RequestBuilder {
        self.req(method, &format!("/api/leases/{}/{what}", lease.lease_id))
            .header(FENCE_HEADER, lease.fence.to_string())
    }

    /// Sends `make()`'s request until the server answers (not 5xx), for up to [`RETRY_FOR`].
    async fn send(
        &self,
        what: &str,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ServerError> {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let give_up = started.elapsed() >= RETRY_FOR;
            let (at, _) = self.in_use();
            let sent = make().send().await;
            if !matches!(&sent, Ok(r) if !r.status().is_server_error()) {
                self.move_on(at);
            }
            match sent {
                Ok(r) if give_up || !r.status().is_server_error() => return check(r).await,
                Err(e) if give_up => return Err(ServerError::Unreachable(RETRY_FOR, e)),
                Ok(r) => {
                    tracing::debug!(what, status = %r.status(), "server error; retrying in {pause:?}")
                }
                Err(e) => {
                    tracing::debug!(what, error = %e, "server unreachable; retrying in {pause:?}")
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Long-polls (about 20 s) for `vmfarm ssh` sessions asked of the lease's job: their ids.
    pub async fn ssh_sessions(&self, lease: &LeaseHandle) -> Result<Vec<String>, ServerError> {
        #[derive(serde::Deserialize)]
        struct Asked {
            tunnels: Vec<String>,
        }
        let response = self
            .send("ssh sessions", || {
                self.scoped(Method::POST, lease, "tunnels")
                    .timeout(Duration::from_secs(40))
            })
            .await?;
        let asked: Asked = response
            .json()
            .await
            .map_err(|e| refused(StatusCode::OK, e.to_string()))?;
        Ok(asked.tunnels)
    }

    /// Tells the server the job's guest is gone: no more sessions (once, not retried).
    pub async fn ssh_gone(&self, lease: &LeaseHandle) -> Result<(), ServerError> {
        let response = self
            .scoped(Method::DELETE, lease, "tunnels")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| ServerError::Unreachable(Duration::from_secs(5), e))?;
        check(response).await.map(|_| ())
    }

    /// Opens the worker's end of session `id`: an upgraded connection to the server.
    pub async fn ssh_session(
        &self,
        lease: &LeaseHandle,
        id: &str,
    ) -> Result<reqwest::Upgraded, ServerError> {
        let response = self
            .scoped(Method::GET, lease, &format!("tunnels/{id}"))
            .header("connection", "upgrade")
            .header("upgrade", vmfarm_proto::tunnel::PROTOCOL)
            .send()
            .await
            .map_err(|e| ServerError::Unreachable(Duration::from_secs(5), e))?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(check(response).await.err().unwrap_or_else(|| {
                refused(StatusCode::OK, "the server did not switch protocols".into())
            }));
        }
        response
            .upgrade()
            .await
            .map_err(|e| refused(StatusCode::SWITCHING_PROTOCOLS, e.to_string()))
    }

    /// Long-polls for a job; `None` when there was none.
    pub async fn lease(
        &self,
        request: &LeaseRequest,
    ) -> Result<Option<LeaseResponse>, ServerError> {
        let response = self
            .send("lease", || {
                self.req(Method::POST, "/api/workers/lease")
                    .json(request)
                    .timeout(Duration::from_secs(120))
            })
            .await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        response
            .json()
            .await
            .map(Some)
            .map_err(|e| refused(StatusCode::OK, e.to_string()))
    }

    pub async fn heartbeat(&self, lease: &LeaseHandle) -> Result<HeartbeatResponse, ServerError> {
        let response = self
            .send("heartbeat", || {
                self.scoped(Method::POST, lease, "heartbeat")
                    .timeout(Duration::from_secs(10))
            })
            .await?;
        response
            .json()
            .await
            .map_err(|e| refused(StatusCode::OK, e.to_string()))
    }

    pub async fn log(&self, lease: &LeaseHandle, append: &LogAppend) -> Result<(), ServerError> {
        self.send("log", || {
            self.scoped(Method::POST, lease, "log")
                .json(append)
                .timeout(Duration::from_secs(30))
        })
        .await
        .map(drop)
    }

    pub async fn state(
        &self,
        lease: &LeaseHandle,
        update: &StateUpdate,
    ) -> Result<(), ServerError> {
        self.send("state", || {
            self.scoped(Method::POST, lease, "state")
                .json(update)
                .timeout(Duration::from_secs(30))
        })
        .await
        .map(drop)
    }

    /// Streams the file at `path` up as artifact `name`.
    pub async fn upload_artifact(
        &self,
        lease: &LeaseHandle,
        name: &str,
        path: &Path,
        sha256: &str,
    ) -> Result<(), ServerError> {
        let route = format!("artifacts/{}", encode_artifact_path(name));
        let started = tokio::time::Instant::now();
        loop {
            let (at, _) = self.in_use();
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|source| ServerError::Local {
                    path: path.display().to_string(),
                    source,
                })?;
            let body = reqwest::Body::wrap_stream(ReaderStream::new(file));
            let sent = self
                .scoped(Method::PUT, lease, &route)
                .header(SHA256_HEADER, sha256)
                .body(body)
                .send()
                .await;
            match sent {
                Ok(r) if !r.status().is_server_error() => return check(r).await.map(drop),
                Ok(_) | Err(_) if started.elapsed() < RETRY_FOR => {
                    self.move_on(at);
                    tokio::time::sleep(Duration::from_secs(1)).await
                }
                Ok(r) => return check(r).await.map(drop),
                Err(e) => return Err(ServerError::Unreachable(RETRY_FOR, e)),
            }
        }
    }
}

fn refused(status: StatusCode, message: String) -> ServerError {
    ServerError::Refused { status, message }
}

async fn check(response: reqwest::Response) -> Result<reqwest::Response, ServerError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<vmfarm_proto::api::ErrorBody>(&text)
        .map(|b| b.error)
        .unwrap_or(text);
    Err(match status {
        StatusCode::CONFLICT => ServerError::LeaseLost(message),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ServerError::Unauthorized(status),
        _ => refused(status, message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_calls_move_on_to_the_replica_that_answers() {
        // A replica that is down: a port nothing listens on any more.
        let down = {
            let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", gone.local_addr().unwrap())
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = format!("http://{}", listener.local_addr().unwrap());
        let answer = serde_json::json!({"expires_at": 1, "ttl_ms": 1000, "cancel": false});
        let app = axum::Router::new().route(
            "/api/leases/{id}/heartbeat",
            axum::routing::post(move || async move { axum::Json(answer) }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let replicas = ServerUrls::replicas(vec![down, up.clone()]).unwrap();
        let client = ServerClient::new(&replicas, "t").unwrap();
        let lease = LeaseHandle {
            lease_id: "ab".into(),
            fence: 1,
        };
        assert!(!client.heartbeat(&lease).await.unwrap().cancel);
        assert_eq!(client.in_use().1, up);
        // Its clones (the other jobs) use it too, from their first call.
        let other = client.clone();
        assert_eq!(other.in_use().1, up);
        other.heartbeat(&lease).await.unwrap();
        assert_eq!(client.in_use().1, up);
    }
}
