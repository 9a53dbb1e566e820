//! Artifacts as files in a folder of the server (the embedded default): one folder per job and
//! attempt, files at their artifact paths (`<job>/<attempt>/<name>`; files stored before
//! attempts had folders are directly under `<job>/`). An upload streams to a temporary file (in
//! `.uploads/`) while it is hashed; only a complete file whose size and sha256 check out is
//! renamed into place, its folder synced.

use super::{Checked, Place, Span, StoreResult};
use crate::error::{AppError, AppResult};
use futures_util::Stream;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// How long an upload may go unwritten before a starting server takes it for one a stopped
/// server left half-received.
pub const STALE_UPLOAD: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Clone)]
pub struct Folder {
    root: PathBuf,
}

impl Folder {
    /// The folder at `root`, made private, without the uploads a stopped server left.
    pub fn open(root: PathBuf) -> std::io::Result<Folder> {
        crate::files::private_dir(&root)?;
        let folder = Folder { root };
        folder.remove_partial_uploads()?;
        Ok(folder)
    }

    /// The folder of `job`'s attempt (`None`: files stored before attempts had folders).
    fn folder(&self, job: i64, attempt: Option<i64>) -> PathBuf {
        let dir = self.root.join(job.to_string());
        match attempt {
            Some(attempt) => dir.join(attempt.to_string()),
            None => dir,
        }
    }

    fn file(&self, place: &Place) -> PathBuf {
        self.folder(place.job, place.attempt).join(&place.name)
    }

    /// The folder of uploads still being received (job folders are numbers: no clash).
    fn uploads(&self) -> PathBuf {
        self.root.join(".uploads")
    }

    /// Removes the uploads that a stopped server left half-received: those not written for
    /// [`STALE_UPLOAD`] (replicas sharing the folder may be receiving the newer ones).
    fn remove_partial_uploads(&self) -> std::io::Result<()> {
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

    pub async fn receive<S, E>(&self, place: &Place, body: &mut Checked<S>) -> AppResult<u64>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let dest = self.file(place);
        let folder = self.folder(place.job, place.attempt);
        let parent = dest.parent().unwrap_or(&folder).to_owned();
        tokio::fs::create_dir_all(&parent).await?;
        tokio::fs::create_dir_all(self.uploads()).await?;
        let tmp = self
            .uploads()
            .join(crate::random::random_hex(8).map_err(AppError::internal)?);
        let size = match write_checked(&tmp, body).await {
            Ok(size) => size,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        if tokio::fs::metadata(&dest).await.is_ok_and(|m| m.is_dir()) {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(AppError::Conflict(format!(
                "artifact `{}` is a folder of other artifacts",
                place.name
            )));
        }
        tokio::fs::rename(&tmp, &dest).await?;
        tokio::task::spawn_blocking(move || crate::files::sync_dir(&parent))
            .await
            .map_err(AppError::internal)??;
        Ok(size)
    }

    pub async fn read(&self, place: &Place, span: Span) -> StoreResult<super::ByteStream> {
        let mut file = tokio::fs::File::open(self.file(place)).await?;
        Ok(match span {
            Span::Whole => Box::pin(tokio_util::io::ReaderStream::new(file)),
            Span::Part { start, end } => {
                file.seek(std::io::SeekFrom::Start(start)).await?;
                let part = file.take(end - start + 1);
                Box::pin(tokio_util::io::ReaderStream::new(part))
            }
        })
    }

    pub async fn remove(&self, place: &Place) -> StoreResult<()> {
        Ok(remove_file(&self.file(place)).await?)
    }

    pub async fn job_ids(&self) -> StoreResult<Vec<i64>> {
        let mut out = Vec::new();
        let mut entries = tokio::fs::read_dir(&self.root).await?;
        while let Some(entry) = entries.next_entry().await? {
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i64>().ok())
            {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Removes every file of `job` (`attempt`: of that attempt only), then its folders; how many
    /// files went.
    pub async fn remove_all(&self, job: i64, attempt: Option<i64>) -> StoreResult<usize> {
        let folder = self.folder(job, attempt);
        let files = files_under(folder.clone()).await?;
        for file in &files {
            remove_file(file).await?;
        }
        match tokio::fs::remove_dir_all(&folder).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(files.len()),
        }
    }

    /// Removes the files of `job` that are none of `known`; how many went.
    pub async fn keep_only(&self, job: i64, known: &HashSet<Place>) -> StoreResult<usize> {
        let root = self.folder(job, None);
        let known: HashSet<PathBuf> = known.iter().map(|place| self.file(place)).collect();
        let mut removed = 0;
        for file in files_under(root).await? {
            if !known.contains(&file) {
                remove_file(&file).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Removes the file at `path`; gone already is fine.
async fn remove_file(path: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every file under `root` (none when it does not exist).
async fn files_under(root: PathBuf) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(dir) = todo.pop() {
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            entries => entries?,
        };
        while let Some(entry) = entries.next_entry().await? {
            match entry.file_type().await?.is_dir() {
                true => todo.push(entry.path()),
                false => out.push(entry.path()),
            }
        }
    }
    Ok(out)
}

async fn write_checked<S, E>(tmp: &Path, body: &mut Checked<S>) -> AppResult<u64>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut file = tokio::fs::File::create(tmp).await?;
    while let Some(piece) = body.next().await? {
        file.write_all(&piece).await?;
    }
    file.sync_all().await?;
    body.finish()
}
