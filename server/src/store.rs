//! The artifact store: a directory, one folder per job and attempt, files at their artifact
//! paths (`<job>/<attempt>/<name>`; files stored before attempts had folders are directly under
//! `<job>/`). An upload streams to a temporary file (in `.uploads/`, emptied at start) while it
//! is hashed; only a complete file whose size and sha256 check out is renamed into place (its
//! folder synced), and it counts once its row is recorded ([`record`]) under a live lease.

use crate::db::{Db, Query, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;
use vmfarm_proto::api::ArtifactView;
use vmfarm_proto::names::check_artifact_path;

/// How long an upload may go unwritten before a starting server takes it for one a stopped
/// server left half-received.
pub const STALE_UPLOAD: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

/// Checks an artifact's name: it must stay in its job's folder.
pub fn check_name(name: &str) -> AppResult<()> {
    check_artifact_path(name)
        .map_err(|e| AppError::BadRequest(format!("artifact name `{}` {e}", name.escape_debug())))
}

impl ArtifactStore {
    pub fn new(root: PathBuf) -> Self {
        ArtifactStore { root }
    }

    /// The folder of `job`'s attempt (`None`: files stored before attempts had folders).
    fn folder(&self, job: i64, attempt: Option<i64>) -> PathBuf {
        let dir = self.root.join(job.to_string());
        match attempt {
            Some(attempt) => dir.join(attempt.to_string()),
            None => dir,
        }
    }

    /// Where artifact `name` of `job`'s `attempt` lives; `name` is checked to stay in its folder.
    fn file(&self, job: i64, attempt: Option<i64>, name: &str) -> AppResult<PathBuf> {
        check_name(name)?;
        Ok(self.folder(job, attempt).join(name))
    }

    /// Streams `body` into the place of artifact `name` of `job`'s `attempt`, checking it is at
    /// most `room` bytes and has the announced sha256. The caller then [`record`]s it, or [`Self::discard`]s it.
    pub async fn receive<S, E>(
        &self,
        job: i64,
        attempt: i64,
        name: &str,
        sha256: &str,
        room: Room,
        mut body: S,
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
        let dest = self.file(job, Some(attempt), name)?;
        let folder = self.folder(job, Some(attempt));
        let parent = dest.parent().unwrap_or(&folder).to_owned();
        tokio::fs::create_dir_all(&parent).await?;
        tokio::fs::create_dir_all(self.uploads()).await?;
        let tmp = self
            .uploads()
            .join(crate::random::random_hex(8).map_err(AppError::internal)?);
        let size = match write_checked(&tmp, &mut body, room, &wanted).await {
            Ok(size) => size,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        if tokio::fs::metadata(&dest).await.is_ok_and(|m| m.is_dir()) {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(AppError::Conflict(format!(
                "artifact `{name}` is a folder of other artifacts"
            )));
        }
        tokio::fs::rename(&tmp, &dest).await?;
        tokio::task::spawn_blocking(move || crate::files::sync_dir(&parent))
            .await
            .map_err(AppError::internal)??;
        Ok(ArtifactView {
            name: name.to_owned(),
            size,
            sha256: wanted,
        })
    }

    /// The folder of uploads still being received (job folders are numbers: no clash).
    fn uploads(&self) -> PathBuf {
        self.root.join(".uploads")
    }

    /// Removes the uploads that a stopped server left half-received: those not written for
    /// [`STALE_UPLOAD`] (replicas sharing the folder may be receiving the newer ones).
    pub fn remove_partial_uploads(&self) -> std::io::Result<()> {
        let dir = self.uploads();
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let idle = entry.metadata()?.modified()?.elapsed().unwrap_or_default();
            if idle < STALE_UPLOAD {
                continue;
            }
            let path = entry.path();
            match entry.file_type()?.is_dir() {
                true => std::fs::remove_dir_all(&path)?,
                false => std::fs::remove_file(&path)?,
            }
        }
        Ok(())
    }

    /// Removes a received artifact whose row was refused.
    pub async fn discard(&self, job: i64, attempt: i64, name: &str) -> AppResult<()> {
        tokio::fs::remove_file(self.file(job, Some(attempt), name)?).await?;
        Ok(())
    }

    /// The ids of the jobs that have a folder.
    pub fn job_folders(&self) -> std::io::Result<Vec<i64>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i64>().ok())
            {
                out.push(id);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Every file in `job`'s folder, by its path there (`<attempt>/<name>`, or `<name>` for
    /// files stored before attempts had folders).
    pub fn files_of(&self, job: i64) -> std::io::Result<Vec<String>> {
        let root = self.folder(job, None);
        let mut out = Vec::new();
        let mut todo = vec![root.clone()];
        while let Some(dir) = todo.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    todo.push(path);
                } else if let Ok(rel) = path.strip_prefix(&root) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes `job`'s folder and everything in it (gone already is fine).
    pub fn remove_job(&self, job: i64) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.folder(job, None)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes the file at `path` in `job`'s folder (as [`Self::files_of`] names it).
    pub fn remove_file_of(&self, job: i64, path: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.folder(job, None).join(path)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes every file of `job`'s `attempt` (a lost attempt's, once its rows are gone).
    pub async fn remove_attempt(&self, job: i64, attempt: i64) -> std::io::Result<()> {
        match tokio::fs::remove_dir_all(self.folder(job, Some(attempt))).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

async fn write_checked<S, E>(tmp: &Path, body: &mut S, room: Room, wanted: &str) -> AppResult<u64>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut file = tokio::fs::File::create(tmp).await?;
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    while let Some(piece) = body.next().await {
        let piece =
            piece.map_err(|e| AppError::BadRequest(format!("the upload broke off: {e}")))?;
        size += piece.len() as u64;
        if size > room.bytes {
            return Err(room.refusal());
        }
        hasher.update(&piece);
        file.write_all(&piece).await?;
    }
    file.sync_all().await?;
    let got = hex::encode(hasher.finalize());
    if got != wanted {
        return Err(AppError::BadRequest(format!(
            "sha256 mismatch: the body hashes to {got}, the header says {wanted}"
        )));
    }
    Ok(size)
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

/// Artifact `name` of `job`, and where its file is.
pub async fn find(
    db: &Db,
    store: &ArtifactStore,
    job: i64,
    name: &str,
) -> AppResult<(ArtifactView, PathBuf)> {
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
    Ok((view, store.file(job, row.opt_int(2)?, name)?))
}

#[cfg(test)]
mod tests {
    use crate::test_utils::{ADMIN, Database, TestApp, on_both_databases};
    use axum::http::StatusCode;
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
}
