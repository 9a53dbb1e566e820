//! `vmfarm bench artifacts`: artifact uploads (as a worker sends them: `PUT` with the sha256 and
//! the lease's fence) and downloads (as users fetch them), over HTTP to a server on loopback in
//! this process, with the artifacts in an S3-compatible bucket (s3s-fs, a real S3 service, on
//! loopback over a folder of this host) beside the same with the server's own folder, in the same
//! run. Both stores end on the same disk, so what the figures compare is the path: the server
//! hashing and writing a file, against the server hashing and sending parts to an S3 service
//! that writes them.

use super::stats::per_second;
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use vmfarm_proto::wire::{FENCE_HEADER, LeaseRequest, LeaseResponse, SHA256_HEADER, WorkerImage};
use vmfarm_server::config::{ApiToken, S3Bucket, Scope, ServerConfig, WorkerToken};
use vmfarm_server::s3_test_server::S3TestServer;

/// Large artifacts, one after another: a build's images and archives.
const LARGE: usize = 256 << 20;
const LARGE_FILES: usize = 4;
/// Small artifacts, several at once: logs and reports.
const SMALL: usize = 64 << 10;
const SMALL_FILES: usize = 400;
const SMALL_AT_ONCE: usize = 8;

const WORKER_TOKEN: &str = "vmf_bench_worker";
const ADMIN_TOKEN: &str = "vmf_bench_admin";

pub async fn run() -> anyhow::Result<()> {
    println!(
        "vmfarm bench artifacts: {LARGE_FILES} artifacts of {} MiB one after another, then {SMALL_FILES} of {} KiB, {SMALL_AT_ONCE} at once; over HTTP on loopback",
        LARGE >> 20,
        SMALL >> 10
    );
    let dir = tempfile::tempdir()?;
    let s3 = S3TestServer::start(&dir.path().join("s3"))?;
    let large = bytes(LARGE, 1);
    let small = bytes(SMALL, 2);
    let folder = measure(&dir.path().join("folder"), None, &large, &small).await?;
    let bucket = measure(
        &dir.path().join("bucket"),
        Some(s3.bucket("bench")),
        &large,
        &small,
    )
    .await?;
    println!(
        "{:<44} {:>16} {:>16} {:>7}",
        "", "local folder", "S3 (s3s-fs)", "ratio"
    );
    let rows = [
        ("large uploads, MiB/s", folder.upload, bucket.upload),
        ("large downloads, MiB/s", folder.download, bucket.download),
        (
            "small uploads, files/s",
            folder.small_uploads,
            bucket.small_uploads,
        ),
        (
            "small downloads, files/s",
            folder.small_downloads,
            bucket.small_downloads,
        ),
    ];
    for (label, reference, s3) in rows {
        println!(
            "{label:<44} {reference:>16.1} {s3:>16.1} {:>7.2}",
            s3 / reference
        );
    }
    Ok(())
}

/// What one store did.
struct Figures {
    upload: f64,
    download: f64,
    small_uploads: f64,
    small_downloads: f64,
}

/// `len` bytes that do not compress (a xorshift stream from `seed`).
fn bytes(len: usize, seed: u64) -> bytes::Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

async fn measure(
    data_dir: &Path,
    s3: Option<S3Bucket>,
    large: &bytes::Bytes,
    small: &bytes::Bytes,
) -> anyhow::Result<Figures> {
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: data_dir.to_owned(),
        workers: vec![WorkerToken {
            name: "bench".into(),
            token: WORKER_TOKEN.into(),
        }],
        tokens: vec![ApiToken {
            name: "bench".into(),
            token: ADMIN_TOKEN.into(),
            scopes: vec![Scope::Admin],
            user: vmfarm_server::users::ADMIN.into(),
            max_priority: None,
        }],
        ..ServerConfig::default()
    };
    config.artifacts.s3 = s3;
    config.limits.max_artifact_size = vmfarm_proto::units::ByteSize(2 * LARGE as u64);
    config.limits.max_artifacts_per_job = vmfarm_proto::units::ByteSize(u64::MAX / 2);
    let running = vmfarm_server::serve::start(config).await?;
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    http.post(format!("{base}/api/jobs"))
        .bearer_auth(ADMIN_TOKEN)
        .body("image = \"bench\"\n[[tasks]]\nname = \"build\"\nscript = \"make\"\n")
        .send()
        .await?
        .error_for_status()?;
    let request = LeaseRequest {
        name: "bench".into(),
        images: vec![WorkerImage {
            name: "bench".into(),
            version: "1".into(),
        }],
        slots: 1,
        version: "bench".into(),
        cache: Default::default(),
        caches: Vec::new(),
    };
    let lease: LeaseResponse = http
        .post(format!("{base}/api/workers/lease"))
        .bearer_auth(WORKER_TOKEN)
        .json(&request)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let client = Client {
        http,
        base,
        job: lease.job.id.clone(),
        lease,
    };
    let (large, small) = (Artifact::new(large), Artifact::new(small));

    let started = Instant::now();
    for i in 0..LARGE_FILES {
        client.upload(&format!("large-{i}.bin"), &large).await?;
    }
    let upload = mib_per_second(LARGE * LARGE_FILES, started.elapsed());
    let started = Instant::now();
    for i in 0..LARGE_FILES {
        let got = client.download(&format!("large-{i}.bin")).await?;
        anyhow::ensure!(got == large.data, "large-{i}.bin came back changed");
    }
    let download = mib_per_second(LARGE * LARGE_FILES, started.elapsed());

    let names: Vec<String> = (0..SMALL_FILES)
        .map(|i| format!("reports/{i}.txt"))
        .collect();
    let started = Instant::now();
    at_once(&client, &names, |client, name| {
        let small = small.clone();
        async move { client.upload(&name, &small).await }
    })
    .await?;
    let small_uploads = per_second(SMALL_FILES, started.elapsed());
    let started = Instant::now();
    at_once(&client, &names, |client, name| {
        let small = small.clone();
        async move {
            let got = client.download(&name).await?;
            anyhow::ensure!(got == small.data, "{name} came back changed");
            Ok(())
        }
    })
    .await?;
    let small_downloads = per_second(SMALL_FILES, started.elapsed());
    Ok(Figures {
        upload,
        download,
        small_uploads,
        small_downloads,
    })
}

/// Runs `each` for every name, [`SMALL_AT_ONCE`] at a time.
async fn at_once<F, Fut>(client: &Client, names: &[String], each: F) -> anyhow::Result<()>
where
    F: Fn(Client, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for name in names {
        if set.len() == SMALL_AT_ONCE {
            set.join_next().await.context("a task")???;
        }
        set.spawn(each(client.clone(), name.clone()));
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    Ok(())
}

fn mib_per_second(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}

/// An artifact's bytes and their sha256, hashed once before the clock starts.
#[derive(Clone)]
struct Artifact {
    data: bytes::Bytes,
    sha256: String,
}

impl Artifact {
    fn new(data: &bytes::Bytes) -> Artifact {
        Artifact {
            data: data.clone(),
            sha256: hex::encode(Sha256::digest(data)),
        }
    }
}

/// A worker's lease and a user's token on one server.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    base: String,
    lease: LeaseResponse,
    job: String,
}

impl Client {
    async fn upload(&self, name: &str, artifact: &Artifact) -> anyhow::Result<()> {
        self.http
            .put(format!(
                "{}/api/leases/{}/artifacts/{name}",
                self.base, self.lease.lease_id
            ))
            .bearer_auth(WORKER_TOKEN)
            .header(FENCE_HEADER, self.lease.fence.to_string())
            .header(SHA256_HEADER, &artifact.sha256)
            .body(artifact.data.clone())
            .send()
            .await?
            .error_for_status()
            .with_context(|| format!("uploading {name}"))?;
        Ok(())
    }

    async fn download(&self, name: &str) -> anyhow::Result<bytes::Bytes> {
        Ok(self
            .http
            .get(format!(
                "{}/api/jobs/{}/artifacts/{name}",
                self.base, self.job
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?
            .error_for_status()
            .with_context(|| format!("downloading {name}"))?
            .bytes()
            .await?)
    }
}
