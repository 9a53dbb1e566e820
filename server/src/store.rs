//! The artifact store: a directory, one folder per job, files at their artifact paths.
//! An upload streams to a temporary file while it is hashed; only a complete file whose size
//! and sha256 check out is renamed into place and recorded.

use crate::db::{Db, now_ms};
use crate::error::{AppError, AppResult};
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;
use vmfarm_proto::api::ArtifactView;
use vmfarm_proto::names::check_artifact_path;

#[derive(Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

impl ArtifactStore {
    pub fn new(root: PathBuf) -> Self {
        ArtifactStore { root }
    }

    /// Where artifact `name` of `job` lives; `name` is checked to stay in the job's folder.
    pub fn path(&self, job: i64, name: &str) -> AppResult<PathBuf> {
        check_artifact_path(name).map_err(|e| {
            AppError::BadRequest(format!("artifact name `{}` {e}", name.escape_debug()))
        })?;
        Ok(self.root.join(job.to_string()).join(name))
    }

    /// Streams `body` into the store, checking `max` bytes and the announced sha256.
    pub async fn put<S, E>(
        &self,
        db: &Db,
        job: i64,
        name: &str,
        sha256: &str,
        max: u64,
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
        let dest = self.path(job, name)?;
        let job_dir = self.root.join(job.to_string());
        let parent = dest.parent().unwrap_or(&job_dir).to_owned();
        tokio::fs::create_dir_all(&parent).await?;
        let tmp = job_dir.join(format!(
            ".upload-{}",
            crate::random::random_hex(8).map_err(AppError::internal)?
        ));
        let result = write_checked(&tmp, &mut body, max, &wanted).await;
        let size = match result {
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
        let (row_name, row_sha) = (name.to_owned(), wanted.clone());
        let row_size = i64::try_from(size).unwrap_or(i64::MAX);
        db.write(move |tx| {
            Box::pin(async move {
                let key = [job.into(), (&row_name).into()];
                tx.execute("DELETE FROM artifacts WHERE job_id = $1 AND name = $2", &key)
                    .await?;
                tx.execute(
                    "INSERT INTO artifacts (job_id, name, size, sha256, created_at) VALUES ($1, $2, $3, $4, $5)",
                    &[key[0], key[1], row_size.into(), (&row_sha).into(), now_ms().into()],
                )
                .await?;
                Ok::<_, AppError>(())
            })
        })
        .await?;
        Ok(ArtifactView {
            name: name.to_owned(),
            size,
            sha256: wanted,
        })
    }
}

async fn write_checked<S, E>(tmp: &Path, body: &mut S, max: u64, wanted: &str) -> AppResult<u64>
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
        if size > max {
            return Err(AppError::TooLarge(format!(
                "the artifact is over the server's limit of {} bytes",
                max
            )));
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

pub async fn list(db: &Db, job: i64) -> AppResult<Vec<ArtifactView>> {
    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT name, size, sha256 FROM artifacts WHERE job_id = $1 ORDER BY name")
            .bind(job)
            .fetch_all(&db.pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(name, size, sha256)| ArtifactView {
            name,
            size: u64::try_from(size).unwrap_or(0),
            sha256,
        })
        .collect())
}

pub async fn find(db: &Db, job: i64, name: &str) -> AppResult<ArtifactView> {
    let row: Option<(i64, String)> =
        sqlx::query_as("SELECT size, sha256 FROM artifacts WHERE job_id = $1 AND name = $2")
            .bind(job)
            .bind(name)
            .fetch_optional(&db.pool)
            .await?;
    let (size, sha256) =
        row.ok_or_else(|| AppError::NotFound(format!("job {job} has no artifact `{name}`")))?;
    Ok(ArtifactView {
        name: name.to_owned(),
        size: u64::try_from(size).unwrap_or(0),
        sha256,
    })
}
