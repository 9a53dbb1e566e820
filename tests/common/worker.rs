//! A simulated worker speaking the server<->worker contract, for the server's tests.

use super::{Api, TestServer, worker_name, worker_token};
use reqwest::{Method, StatusCode};
use vmfarm_proto::wire::{
    FENCE_HEADER, LeaseRequest, LeaseResponse, LogAppend, LogChunk, LogStream, SHA256_HEADER,
    StateUpdate, TaskUpdate, WorkerImage,
};
use vmfarm_proto::{JobState, TaskState};

pub struct FakeWorker {
    pub name: String,
    pub api: Api,
}

impl FakeWorker {
    pub fn new(server: &TestServer, i: usize) -> FakeWorker {
        FakeWorker {
            name: worker_name(i),
            api: server.client(&worker_token(i)),
        }
    }

    /// Asks for a job for `images`; `None` on 204.
    pub async fn lease(&self, images: &[&str]) -> Option<LeaseResponse> {
        let req = LeaseRequest {
            name: self.name.clone(),
            images: images
                .iter()
                .map(|i| WorkerImage {
                    name: (*i).into(),
                    version: "1".into(),
                })
                .collect(),
            slots: 1,
            version: "test".into(),
            cache: Default::default(),
            caches: Vec::new(),
        };
        let r = self
            .api
            .req(Method::POST, "/api/workers/lease")
            .json(&req)
            .send()
            .await
            .unwrap();
        match r.status() {
            StatusCode::NO_CONTENT => None,
            StatusCode::OK => Some(r.json().await.unwrap()),
            other => panic!("lease: {other}: {}", r.text().await.unwrap()),
        }
    }

    fn scoped(
        &self,
        method: Method,
        lease: &LeaseResponse,
        what: &str,
        fence: u64,
    ) -> reqwest::RequestBuilder {
        self.api
            .req(method, &format!("/api/leases/{}/{what}", lease.lease_id))
            .header(FENCE_HEADER, fence.to_string())
    }

    pub async fn heartbeat(&self, lease: &LeaseResponse) -> reqwest::Response {
        self.heartbeat_fenced(lease, lease.fence).await
    }

    pub async fn heartbeat_fenced(&self, lease: &LeaseResponse, fence: u64) -> reqwest::Response {
        self.scoped(Method::POST, lease, "heartbeat", fence)
            .send()
            .await
            .unwrap()
    }

    pub async fn log(&self, lease: &LeaseResponse, seq: u64, text: &str) -> reqwest::Response {
        let body = LogAppend {
            seq,
            chunks: vec![LogChunk {
                stream: LogStream::Task,
                task: Some("build".into()),
                ts_ms: 1,
                data: text.into(),
            }],
        };
        self.scoped(Method::POST, lease, "log", lease.fence)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn state(&self, lease: &LeaseResponse, update: &StateUpdate) -> reqwest::Response {
        self.scoped(Method::POST, lease, "state", lease.fence)
            .json(update)
            .send()
            .await
            .unwrap()
    }

    pub async fn job_state(&self, lease: &LeaseResponse, state: JobState) -> reqwest::Response {
        self.state(
            lease,
            &StateUpdate {
                job_state: Some(state),
                ..StateUpdate::default()
            },
        )
        .await
    }

    pub async fn task_state(
        &self,
        lease: &LeaseResponse,
        task: &str,
        state: TaskState,
        exit_code: Option<i32>,
    ) -> reqwest::Response {
        self.state(
            lease,
            &StateUpdate {
                task: Some(TaskUpdate {
                    name: task.into(),
                    state,
                    exit_code,
                }),
                ..StateUpdate::default()
            },
        )
        .await
    }

    /// Walks a leased job to running.
    pub async fn start(&self, lease: &LeaseResponse) {
        for s in [JobState::Booting, JobState::Running] {
            let r = self.job_state(lease, s).await;
            assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
        }
    }

    pub async fn put_artifact(
        &self,
        lease: &LeaseResponse,
        name: &str,
        body: Vec<u8>,
        sha256: &str,
    ) -> reqwest::Response {
        self.scoped(
            Method::PUT,
            lease,
            &format!("artifacts/{name}"),
            lease.fence,
        )
        .header(SHA256_HEADER, sha256)
        .body(body)
        .send()
        .await
        .unwrap()
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
