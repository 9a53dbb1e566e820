//! The server <-> worker payloads (CONTRACTS.md "Server <-> worker"). JSON over HTTP, with
//! `Authorization: Bearer <worker token>`; every lease-scoped call carries [`FENCE_HEADER`].

use crate::network::AddressRange;
use crate::state::{JobState, TaskState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Header carrying the lease's fencing token on every lease-scoped call.
pub const FENCE_HEADER: &str = "X-Vmfarm-Fence";
/// Header carrying the hex sha256 of an uploaded artifact.
pub const SHA256_HEADER: &str = "X-Vmfarm-Sha256";

/// One image a worker can run, at the version its jobs run (the one `vmfarm images build` built
/// or found installed last).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerImage {
    pub name: String,
    pub version: String,
}

/// A worker's proxy cache: its counters since the worker started, and its contents now. Each
/// lease request carries them, for the server's `/api/workers` (the worker's own `/metrics`
/// has them too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CacheStats {
    /// Cacheable requests answered from the cache.
    pub hits: u64,
    /// Cacheable requests that went to the origin.
    pub misses: u64,
    /// Bytes sent to guests from the cache.
    pub bytes_from_cache: u64,
    /// Bytes of cacheable answers fetched from origins.
    pub bytes_fetched: u64,
    /// Entries checked and kept.
    pub stored: u64,
    /// Entries given up: incomplete, too long, a hash that did not match, or a write that failed.
    pub discarded: u64,
    /// Entries removed to stay under the size cap.
    pub evicted: u64,
    /// Entries in the cache now.
    pub entries: u64,
    /// Their size, in bytes.
    pub size: u64,
}

/// `POST /api/workers/lease`: the worker names itself, its images and free slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseRequest {
    pub name: String,
    pub images: Vec<WorkerImage>,
    pub slots: u32,
    pub version: String,
    /// Its proxy cache's figures.
    #[serde(default)]
    pub cache: CacheStats,
    /// The cache disks it holds (`[[caches]]` of jobs it ran): the server leaves a job with
    /// caches a little while for a worker that holds them.
    #[serde(default)]
    pub caches: Vec<HeldCache>,
}

/// Most caches one lease request may name.
pub const MAX_HELD_CACHES: usize = 4096;

/// A cache disk a worker holds: `owner`'s cache `name` for jobs of `image`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeldCache {
    pub owner: String,
    pub image: String,
    pub name: String,
}

/// The job inside a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeasedJob {
    pub id: String,
    pub group_id: String,
    pub image: String,
    /// The user who submitted it: the owner of the caches it uses.
    #[serde(default)]
    pub owner: String,
    /// The manifest's TOML text, as submitted.
    pub manifest: String,
    /// 1 on the first try; each expired lease adds one.
    pub attempt: u32,
    /// How long the whole job may take, from the lease on, in milliseconds: the manifest's
    /// `timeout`, else the server's `limits.default_job_timeout`.
    pub timeout_ms: u64,
    /// For a job a push made: the pushed repository and commit, which the worker makes the
    /// manifest's first source ([`crate::Manifest::check_out`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub checkout: Option<crate::manifest::Checkout>,
}

/// The server's limits on what a job sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseLimits {
    /// Log bytes kept for the job.
    pub max_log_bytes: u64,
    /// Bytes of one artifact.
    pub max_artifact_bytes: u64,
    /// Bytes of all of the job's artifacts together.
    pub max_artifacts_total_bytes: u64,
}

/// `200` answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseResponse {
    pub lease_id: String,
    pub fence: u64,
    /// Unix time in milliseconds, by the server's clock.
    pub expires_at: i64,
    /// How long the lease lives from this answer on, in milliseconds: what a worker times its
    /// renewals by (its clock may differ from the server's).
    pub ttl_ms: u64,
    pub job: LeasedJob,
    /// What the server keeps of the job: the worker stops at these itself, with a message.
    pub limits: LeaseLimits,
    /// Secret name -> base64 of its value; only those the manifest names.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// What the operator grants the job's network beyond its manifest's `[network] allow`
    /// (which the worker reads from the manifest).
    #[serde(default)]
    pub network: NetworkGrant,
}

/// The operator's part of a job's network policy, handed in its lease (the server's
/// `[network]` config); the job's own allow-list is its manifest's, already checked against
/// the operator's `allow` at submit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetworkGrant {
    /// Non-public address ranges the job's connections may reach nonetheless (`allow_private`);
    /// every other non-public address is refused.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub allow_private: Vec<AddressRange>,
}

/// Answer to `POST /api/leases/{id}/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatResponse {
    /// Unix time in milliseconds, by the server's clock.
    pub expires_at: i64,
    /// How long the renewed lease lives from this answer on, in milliseconds.
    pub ttl_ms: u64,
    /// The job was cancelled: stop it and report `cancelled`.
    pub cancel: bool,
}

/// Which stream a log chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum LogStream {
    /// The guest's serial console.
    Console,
    /// A task's stdout and stderr.
    Task,
    /// What the farm itself says about the job (booting, fetching sources, ...).
    Farm,
}

/// One piece of a job's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogChunk {
    pub stream: LogStream,
    /// The task's name, for `stream = task`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Unix time in milliseconds when the bytes were read.
    pub ts_ms: i64,
    pub data: String,
}

/// `POST /api/leases/{id}/log`: `seq` grows by one per call; a repeated `seq` is acknowledged
/// and not stored again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogAppend {
    pub seq: u64,
    pub chunks: Vec<LogChunk>,
}

/// A task's move, inside a state update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskUpdate {
    pub name: String,
    pub state: TaskState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// `POST /api/leases/{id}/state`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StateUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_state: Option<JobState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskUpdate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use std::fmt::Debug;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) -> String {
        let json = serde_json::to_string(value).unwrap();
        let back: T = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, value);
        json
    }

    #[test]
    fn test_payloads_round_trip_with_contract_names() {
        let lease = LeaseResponse {
            lease_id: "l1".into(),
            fence: 7,
            expires_at: 1_700_000_000_000,
            ttl_ms: 30_000,
            limits: LeaseLimits {
                max_log_bytes: 1 << 26,
                max_artifact_bytes: 1 << 31,
                max_artifacts_total_bytes: 1 << 32,
            },
            job: LeasedJob {
                id: "j1".into(),
                group_id: "g1".into(),
                image: "debian-12".into(),
                owner: "alice".into(),
                manifest: "image = \"debian-12\"\n".into(),
                attempt: 1,
                timeout_ms: 1_200_000,
                checkout: Some(crate::manifest::Checkout {
                    url: "https://git.example.org/acme/app.git".into(),
                    commit: "0123456789abcdef0123456789abcdef01234567".into(),
                }),
            },
            secrets: BTreeMap::from([("deploy-key".into(), "c2VjcmV0".into())]),
            network: NetworkGrant {
                allow_private: vec!["127.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            },
        };
        let json = round_trip(&lease);
        for key in [
            "lease_id",
            "fence",
            "expires_at",
            "ttl_ms",
            "max_artifacts_total_bytes",
            "group_id",
            "manifest",
            "attempt",
            "timeout_ms",
            "secrets",
        ] {
            assert!(json.contains(&format!("\"{key}\"")), "{key} in {json}");
        }
        assert!(
            json.contains(r#""network":{"allow_private":["127.0.0.0/8","fd00::/8"]}"#),
            "{json}"
        );
        // A lease from a server that knows no network grants none.
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        old.as_object_mut().unwrap().remove("network");
        let old: LeaseResponse = serde_json::from_value(old).unwrap();
        assert_eq!(old.network, NetworkGrant::default());

        let request = LeaseRequest {
            name: "w1".into(),
            images: vec![WorkerImage {
                name: "tiny".into(),
                version: "20261122".into(),
            }],
            slots: 2,
            version: "0.1.0".into(),
            cache: CacheStats {
                hits: 3,
                bytes_from_cache: 1 << 20,
                ..CacheStats::default()
            },
            caches: vec![HeldCache {
                owner: "alice".into(),
                image: "tiny".into(),
                name: "pip".into(),
            }],
        };
        round_trip(&request);
        round_trip(&HeartbeatResponse {
            expires_at: 1,
            ttl_ms: 30_000,
            cancel: true,
        });

        let log = LogAppend {
            seq: 3,
            chunks: vec![
                LogChunk {
                    stream: LogStream::Task,
                    task: Some("build".into()),
                    ts_ms: 5,
                    data: "make: ok\n".into(),
                },
                LogChunk {
                    stream: LogStream::Console,
                    task: None,
                    ts_ms: 6,
                    data: "[    0.0] Linux\n".into(),
                },
            ],
        };
        let json = round_trip(&log);
        assert!(json.contains("\"stream\":\"console\""), "{json}");
        assert!(!json.contains("\"task\":null"), "{json}");

        let update = StateUpdate {
            job_state: Some(JobState::TimedOut),
            task: Some(TaskUpdate {
                name: "build".into(),
                state: TaskState::Failed,
                exit_code: Some(2),
            }),
            image_version: Some("1".into()),
            reason: Some("task build exited 2".into()),
        };
        let json = round_trip(&update);
        assert!(json.contains("\"job_state\":\"timed_out\""), "{json}");
        assert_eq!(round_trip(&StateUpdate::default()), "{}");
    }

    #[test]
    fn test_unknown_stream_is_refused() {
        let err = serde_json::from_str::<LogChunk>(r#"{"stream":"stdout","ts_ms":1,"data":""}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `stdout`"), "{err}");
    }
}
