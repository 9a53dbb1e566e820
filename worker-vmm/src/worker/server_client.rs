//! The worker's side of the server<->worker contract: lease, heartbeat, log, state, artifacts.
//! Writes are retried through server restarts; a 409 means the lease is gone and is final.

use reqwest::{Method, StatusCode};
use std::path::Path;
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

#[derive(Clone)]
pub struct ServerClient {
    http: reqwest::Client,
    base: String,
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
    pub fn new(base: &str, token: &str) -> Result<ServerClient, reqwest::Error> {
        Ok(ServerClient {
            http: reqwest::Client::builder()
                .user_agent(concat!("vmfarm-worker/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(5))
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
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
            match make().send().await {
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
