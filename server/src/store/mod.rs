//! The artifact store: files in a folder of the server ([`folder`], the embedded default) or
//! objects in an S3-compatible bucket that every replica reaches ([`bucket`]). Either way an
//! upload is hashed while it streams in and lands only whole, with the announced size and
//! sha256; it counts once its row is recorded ([`record`]) under a live lease.

mod bucket;
mod folder;

use crate::config::ServerConfig;
use crate::db::{Db, Query, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::pin::Pin;
use vmfarm_proto::api::ArtifactView;
use vmfarm_proto::names::check_artifact_path;

pub use folder::STALE_UPLOAD;

#[derive(Clone)]
pub enum ArtifactStore {
    Folder(folder::Folder),
    Bucket(bucket::Bucket),
}

/// Where one artifact is: its job, attempt (`None`: stored before attempts had folders) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Place {
    pub job: i64,
    pub attempt: Option<i64>,
    pub name: String,
}

impl Place {
    /// Artifact `name` of `job`'s `attempt`; `name` is checked to stay in its folder.
    fn of_attempt(job: i64, attempt: i64, name: &str) -> AppResult<Place> {
        check_name(name)?;
        Ok(Place {
            job,
            attempt: Some(attempt),
            name: name.to_owned(),
        })
    }
}

/// What of a file to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Whole,
    /// Bytes `start..=end`.
    Part {
        start: u64,
        end: u64,
    },
}

pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static>>;

/// A failure of the store itself (its disk, or the bucket's service).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The folder's disk, or a bucket's answer that stalled.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Bucket(#[from] object_store::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError::internal(e)
    }
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the artifacts folder {0}: {1}")]
    Folder(std::path::PathBuf, std::io::Error),
    #[error("cannot use the artifact bucket {0} (a test write and delete): {1}")]
    Bucket(String, object_store::Error),
    #[error("limits.max_artifact_size is {0} bytes: an artifact bucket takes at most {max} bytes per object; lower the limit to that", max = bucket::MAX_OBJECT)]
    TooLargeForBucket(u64),
}

/// Checks an artifact's name: it must stay in its job's folder.
pub fn check_name(name: &str) -> AppResult<()> {
    check_artifact_path(name)
        .map_err(|e| AppError::BadRequest(format!("artifact name `{}` {e}", name.escape_debug())))
}

impl ArtifactStore {
    /// The store `config` says: its `[artifacts.s3]` bucket, else `<data_dir>/artifacts`.
    pub async fn open(config: &ServerConfig) -> Result<ArtifactStore, OpenError> {
        match &config.artifacts.s3 {
            Some(s3) => {
                let largest = config.limits.max_artifact_size.0;
                if largest > bucket::MAX_OBJECT {
                    return Err(OpenError::TooLargeForBucket(largest));
                }
                bucket::Bucket::open(s3)
                    .await
                    .map(ArtifactStore::Bucket)
                    .map_err(|e| OpenError::Bucket(s3.describe(), e))
            }
            None => {
                let root = config.data_dir.join("artifacts");
                folder::Folder::open(root.clone())
                    .map(ArtifactStore::Folder)
                    .map_err(|e| OpenError::Folder(root, e))
            }
        }
    }

    /// Streams `body` into the place of artifact `name` of `job`'s `attempt`, checking it is at
    /// most `room` bytes and has the announced sha256. The caller then [`record`]s it, or
    /// [`Self::discard`]s it.
    pub async fn receive<S, E>(
        &self,
        job: i64,
        attempt: i64,
        name: &str,
        sha256: &str,
        room: Room,
        body: S,
    ) -> AppResult<ArtifactView>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let wanted = sha256.to_ascii_lowercase();
        if wanted.len() != 64 || !wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AppError::BadRequest(
                "X-Vmfarm-Sha256 must be 64 hex digits".into(),
            ));
        }
        let place = Place::of_attempt(job, attempt, name)?;
        let mut body = Checked::new(body, room, &wanted);
        let size = match self {
            ArtifactStore::Folder(folder) => folder.receive(&place, &mut body).await?,
            ArtifactStore::Bucket(bucket) => bucket.receive(&place, &mut body).await?,
        };
        Ok(ArtifactView {
            name: place.name,
            size,
            sha256: wanted,
        })
    }

    /// The bytes of the artifact at `place` (`span` of them).
    pub async fn read(&self, place: &Place, span: Span) -> StoreResult<ByteStream> {
        match self {
            ArtifactStore::Folder(folder) => folder.read(place, span).await,
            ArtifactStore::Bucket(bucket) => bucket.read(place, span).await,
        }
    }

    /// Removes a received artifact whose row was refused.
    pub async fn discard(&self, job: i64, attempt: i64, name: &str) -> AppResult<()> {
        let place = Place::of_attempt(job, attempt, name)?;
        match self {
            ArtifactStore::Folder(folder) => folder.remove(&place).await?,
            ArtifactStore::Bucket(bucket) => bucket.remove(&place).await?,
        }
        Ok(())
    }

    /// The ids of the jobs that have files in the store, in order.
    pub async fn job_ids(&self) -> StoreResult<Vec<i64>> {
        let mut ids = match self {
            ArtifactStore::Folder(folder) => folder.job_ids().await?,
            ArtifactStore::Bucket(bucket) => bucket.job_ids().await?,
        };
        ids.sort_unstable();
        Ok(ids)
    }

    /// Removes every file of `job` (gone already is fine); how many went.
    pub async fn remove_job(&self, job: i64) -> StoreResult<usize> {
        match self {
            ArtifactStore::Folder(folder) => folder.remove_all(job, None).await,
            ArtifactStore::Bucket(bucket) => bucket.remove_all(job, None).await,
        }
    }

    /// Removes every file of `job`'s `attempt` (a lost attempt's, once its rows are gone).
    pub async fn remove_attempt(&self, job: i64, attempt: i64) -> StoreResult<usize> {
        match self {
            ArtifactStore::Folder(folder) => folder.remove_all(job, Some(attempt)).await,
            ArtifactStore::Bucket(bucket) => bucket.remove_all(job, Some(attempt)).await,
        }
    }

    /// Removes the files of `job` that are none of `known`; how many went.
    pub async fn keep_only(&self, job: i64, known: &HashSet<Place>) -> StoreResult<usize> {
        match self {
            ArtifactStore::Folder(folder) => folder.keep_only(job, known).await,
            ArtifactStore::Bucket(bucket) => bucket.keep_only(job, known).await,
        }
    }
}

/// How long a transfer may move no bytes before it is given up: an upload (a worker sends a
/// file of its disk: a stall is a broken connection, which would otherwise hold the upload's
/// turn), or a bucket's answer to a download (a service that stopped answering).
const IDLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// An upload's body as it streams in: held to its room, hashed, and checked at its end.
pub struct Checked<S> {
    body: S,
    room: Room,
    hasher: Sha256,
    size: u64,
    wanted: String,
}

impl<S, E> Checked<S>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    fn new(body: S, room: Room, wanted: &str) -> Self {
        Checked {
            body,
            room,
            hasher: Sha256::new(),
            size: 0,
            wanted: wanted.to_owned(),
        }
    }

    /// The next piece of the body; an error when it broke off, stalled for [`IDLE_LIMIT`], or
    /// went past its room.
    pub async fn next(&mut self) -> AppResult<Option<bytes::Bytes>> {
        let next = tokio::time::timeout(IDLE_LIMIT, self.body.next()).await;
        let Some(piece) = next.map_err(|_| {
            AppError::BadRequest(format!(
                "the upload stalled: no bytes came for {} s",
                IDLE_LIMIT.as_secs()
            ))
        })?
        else {
            return Ok(None);
        };
        let piece =
            piece.map_err(|e| AppError::BadRequest(format!("the upload broke off: {e}")))?;
        self.size += piece.len() as u64;
        if self.size > self.room.bytes {
            return Err(self.room.refusal());
        }
        self.hasher.update(&piece);
        Ok(Some(piece))
    }

    /// Once the body has ended: its size, if it hashes to the announced sha256.
    pub fn finish(&mut self) -> AppResult<u64> {
        let got = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if got != self.wanted {
            return Err(AppError::BadRequest(format!(
                "sha256 mismatch: the body hashes to {got}, the header says {}",
                self.wanted
            )));
        }
        Ok(self.size)
    }
}

/// How many bytes an artifact may have: the server's limit for one, or what is left of its
/// job's total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub bytes: u64,
    /// Whether the job's total, not the limit for one artifact, is what binds.
    pub by_total: bool,
}

impl Room {
    /// The room for an artifact of a job whose other artifacts hold `used` bytes.
    pub fn new(limits: &crate::config::Limits, used: u64) -> Room {
        let one = limits.max_artifact_size.0;
        let left = limits.max_artifacts_per_job.0.saturating_sub(used);
        Room {
            bytes: one.min(left),
            by_total: left < one,
        }
    }

    pub fn refusal(self) -> AppError {
        AppError::TooLarge(if self.by_total {
            format!(
                "the artifact is over what is left of the job's artifact limit: {} bytes",
                self.bytes
            )
        } else {
            format!(
                "the artifact is over the server's limit of {} bytes",
                self.bytes
            )
        })
    }
}

/// Bytes held by the artifacts of `job`'s `attempt` other than `name`.
pub async fn used_by_others(
    q: &mut impl Query,
    job: i64,
    attempt: i64,
    name: &str,
) -> AppResult<u64> {
    let row = q
        .fetch_optional(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM artifacts \
             WHERE job_id = $1 AND attempt = $2 AND name <> $3",
            &[job.into(), attempt.into(), name.into()],
        )
        .await?;
    Ok(row.map_or(Ok(0), |r| r.int(0))?.try_into().unwrap_or(0))
}

/// Records a received artifact of `job`'s `attempt`, replacing one of the same name.
pub async fn record(
    tx: &mut WriteTx,
    job: i64,
    attempt: i64,
    artifact: &ArtifactView,
) -> AppResult<()> {
    let key = [job.into(), (&artifact.name).into()];
    tx.execute(
        "DELETE FROM artifacts WHERE job_id = $1 AND name = $2",
        &key,
    )
    .await?;
    tx.execute(
        "INSERT INTO artifacts (job_id, name, size, sha256, created_at, attempt) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            key[0],
            key[1],
            i64::try_from(artifact.size).unwrap_or(i64::MAX).into(),
            (&artifact.sha256).into(),
            now_ms().into(),
            attempt.into(),
        ],
    )
    .await?;
    Ok(())
}

pub async fn list(db: &Db, job: i64) -> AppResult<Vec<ArtifactView>> {
    let rows = db
        .read()
        .fetch_all(
            "SELECT a.name, a.size, a.sha256 FROM artifacts a JOIN jobs j ON j.id = a.job_id \
             WHERE a.job_id = $1 AND j.expired_at IS NULL ORDER BY a.name",
            &[job.into()],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(ArtifactView {
                name: row.text(0)?,
                size: u64::try_from(row.int(1)?).unwrap_or(0),
                sha256: row.text(2)?,
            })
        })
        .collect()
}

/// Artifact `name` of `job`, and where it is stored.
pub async fn find(db: &Db, job: i64, name: &str) -> AppResult<(ArtifactView, Place)> {
    check_name(name)?;
    let row = db
        .read()
        .fetch_optional(
            "SELECT a.size, a.sha256, a.attempt FROM artifacts a JOIN jobs j ON j.id = a.job_id \
             WHERE a.job_id = $1 AND a.name = $2 AND j.expired_at IS NULL",
            &[job.into(), name.into()],
        )
        .await?
        .ok_or_else(|| AppError::NotFound(format!("job {job} has no artifact `{name}`")))?;
    let view = ArtifactView {
        name: name.to_owned(),
        size: u64::try_from(row.int(0)?).unwrap_or(0),
        sha256: row.text(1)?,
    };
    let place = Place {
        job,
        attempt: row.opt_int(2)?,
        name: name.to_owned(),
    };
    Ok((view, place))
}

#[cfg(test)]
mod tests {
    use crate::s3_test_server::S3TestServer;
    use crate::test_utils::{ADMIN, Database, TestApp, on_both_databases};
    use axum::body::Body;
    use axum::http::{Method, StatusCode};
    use vmfarm_proto::units::ByteSize;

    on_both_databases!(test_artifacts_are_held_to_their_limits);

    async fn test_artifacts_are_held_to_their_limits(db: Database) {
        let app = TestApp::with_config(db, |c| {
            c.limits.max_artifact_size = ByteSize(100);
            c.limits.max_artifacts_per_job = ByteSize(150);
        })
        .await;
        let id = app
            .submit("image = \"a\"\n[[tasks]]\nname = \"x\"\nscript = \"true\"\n")
            .await[0];
        let lease = app.lease("w0", "a").await;
        let one = app.upload("w0", &lease, "big", &[1; 101]).await;
        assert_eq!(one.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            one.error().contains("the server's limit of 100 bytes"),
            "{:?}",
            one.body
        );
        assert_eq!(
            app.upload("w0", &lease, "a", &[1; 100]).await.status,
            StatusCode::CREATED
        );
        let total = app.upload("w0", &lease, "b", &[2; 60]).await;
        assert_eq!(total.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            total
                .error()
                .contains("left of the job's artifact limit: 50 bytes"),
            "{:?}",
            total.body
        );
        assert_eq!(
            app.upload("w0", &lease, "b", &[2; 50]).await.status,
            StatusCode::CREATED
        );
        // Replacing an artifact counts its new size, not both.
        assert_eq!(
            app.upload("w0", &lease, "a", &[3; 90]).await.status,
            StatusCode::CREATED
        );
        let list = app
            .get(&format!("/api/jobs/{id}/artifacts"), ADMIN)
            .await
            .body;
        let sizes: Vec<_> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["name"].clone(), a["size"].clone()))
            .collect();
        assert_eq!(sizes, [("a".into(), 90.into()), ("b".into(), 50.into())]);
        assert!(
            std::fs::read_dir(app.dir.path().join("artifacts/.uploads"))
                .unwrap()
                .next()
                .is_none(),
            "no upload is left half-way"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn test_an_upload_that_stalls_is_given_up() {
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from("a"))]);
        let body = Box::pin(futures_util::StreamExt::chain(
            first,
            futures_util::stream::pending(),
        ));
        let room = super::Room {
            bytes: 10,
            by_total: false,
        };
        let mut checked = super::Checked::new(body, room, "");
        assert_eq!(checked.next().await.unwrap().unwrap(), "a");
        let stalled = checked.next().await.unwrap_err();
        assert!(
            stalled.to_string().contains("no bytes came for 60 s"),
            "{stalled}"
        );
    }

    /// Text of `len` bytes that differs along its length.
    fn text(len: usize) -> Vec<u8> {
        (0..len).map(|i| b'a' + (i * 7 % 26) as u8).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_artifacts_in_a_bucket_land_whole_or_not_at_all() {
        let root = tempfile::tempdir().unwrap();
        let s3 = S3TestServer::start(root.path()).expect("s3s-fs starts");
        let app = TestApp::with_config(Database::Sqlite, |c| {
            c.artifacts.s3 = Some(s3.bucket("farm1"));
            c.limits.max_artifact_size = ByteSize(16 << 20);
        })
        .await;
        let id = app
            .submit("image = \"a\"\n[[tasks]]\nname = \"x\"\nscript = \"true\"\n")
            .await[0];
        let lease = app.lease("w0", "a").await;
        // One put, a multipart upload of two parts, and a name S3 keys encode.
        let (small, big) = (text(100), text(12 << 20));
        let odd = "odd name#%~.txt";
        let uploads = [
            ("out/small.txt", "out/small.txt", &small),
            ("big.txt", "big.txt", &big),
            ("odd%20name%23%25~.txt", odd, &small),
        ];
        for (in_url, name, data) in uploads {
            let answer = app.upload("w0", &lease, in_url, data).await;
            assert_eq!(
                answer.status,
                StatusCode::CREATED,
                "{name}: {:?}",
                answer.body
            );
            assert_eq!(answer.body["name"], name);
        }
        let object = |name: &str| s3.bucket_dir.join(format!("farm1/{id}/1/{name}"));
        assert_eq!(std::fs::read(object("big.txt")).unwrap(), big);
        assert_eq!(std::fs::read(object("out/small.txt")).unwrap(), small);
        // A body that does not hash as announced, small or in parts, or that goes past the
        // limit after a part was sent, leaves nothing: no object, no parts.
        let other = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"something else"));
        for data in [&small, &big] {
            let answer = app
                .upload_claiming("w0", &lease, "bad.txt", data, &other)
                .await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST);
            assert!(
                answer.error().contains("sha256 mismatch"),
                "{:?}",
                answer.body
            );
        }
        let over = app.upload("w0", &lease, "bad.txt", &text(20 << 20)).await;
        assert_eq!(
            over.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{:?}",
            over.body
        );
        assert!(!object("bad.txt").exists());
        let left: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with(".upload"))
            .collect();
        assert!(left.is_empty(), "multipart uploads left: {left:?}");
        // Downloads, whole and in part.
        let url = format!("/api/jobs/{id}/artifacts/big.txt");
        let whole = app.get(&url, ADMIN).await;
        assert_eq!(whole.status, StatusCode::OK);
        assert_eq!(whole.body.as_str().unwrap().as_bytes(), big);
        let range = [("range", "bytes=10000000-10000009".to_owned())];
        let part = app
            .call(Method::GET, &url, Some(ADMIN), &range, Body::empty())
            .await;
        assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            part.body.as_str().unwrap().as_bytes(),
            &big[10_000_000..10_000_010]
        );
        let odd_back = app
            .get(
                &format!("/api/jobs/{id}/artifacts/odd%20name%23%25~.txt"),
                ADMIN,
            )
            .await;
        assert_eq!(odd_back.body.as_str().unwrap().as_bytes(), small);
        // What retention keeps stays; the rest goes from the bucket.
        let place = |name: &str| super::Place {
            job: id,
            attempt: Some(1),
            name: name.to_owned(),
        };
        let known = [place("big.txt"), place(odd)].into_iter().collect();
        assert_eq!(app.state.store.keep_only(id, &known).await.unwrap(), 1);
        assert!(!object("out/small.txt").exists() && object("big.txt").exists());
        assert_eq!(app.state.store.job_ids().await.unwrap(), [id]);
        assert_eq!(app.state.store.remove_attempt(id, 1).await.unwrap(), 2);
        assert!(!object("big.txt").exists());
        assert!(app.state.store.job_ids().await.unwrap().is_empty());
    }
}
