//! What both backends' snapshot code shares: its errors, the saved disk given back to the
//! worker, the VMM's last words, and a time limit.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::{BackendError, BootSpec};
use crate::guest::console::wait_waiting;

pub(crate) fn io_error(what: &'static str) -> impl FnOnce(std::io::Error) -> BackendError {
    move |source| BackendError::Snapshot {
        what,
        source: Box::new(source),
    }
}

pub(crate) fn refused(what: &'static str, why: String) -> BackendError {
    BackendError::Snapshot {
        what,
        source: Box::new(std::io::Error::other(why)),
    }
}

/// Moves the saved guest's `disk` to `to`, given back first, when a jailed VMM had it
/// (`jailed`), to the owner of `to`'s folder (the worker, which made it).
pub(crate) fn keep_disk(disk: &Path, to: &Path, jailed: bool) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    if jailed {
        let folder = to.parent().unwrap_or(Path::new("."));
        let owner = std::fs::metadata(folder)?;
        std::os::unix::fs::chown(disk, Some(owner.uid()), Some(owner.gid()))?;
    }
    std::fs::rename(disk, to)
}

/// The last 4 KiB of what a VMM wrote to its stderr file `messages` (its error comes last).
pub(crate) async fn last_words(messages: &Path) -> String {
    use tokio::io::AsyncSeekExt as _;
    let mut said = Vec::new();
    if let Ok(mut file) = tokio::fs::File::open(messages).await {
        let _ = file.seek(std::io::SeekFrom::End(-4096)).await;
        let _ = file.take(4096).read_to_end(&mut said).await;
    }
    String::from_utf8_lossy(&said).into_owned()
}

/// `work`, given up with an error naming `what` after `limit` (`vmm` did not finish).
pub(crate) async fn within(
    vmm: &str,
    limit: Duration,
    what: &'static str,
    work: impl std::future::Future<Output = Result<(), BackendError>>,
) -> Result<(), BackendError> {
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(refused(
            what,
            format!("{vmm} did not finish within {limit:?}"),
        ))
    })
}

/// Refuses to restore `spec`'s guest with cache disks on `backend`.
pub(crate) fn no_cache_disks(spec: &BootSpec, backend: &'static str) -> Result<(), BackendError> {
    if spec.caches.is_empty() {
        return Ok(());
    }
    Err(BackendError::Unsupported {
        backend,
        why: "a guest restored from a snapshot has the disks it was saved with, no cache disk"
            .into(),
    })
}

/// Reads the template guest's `console` until its agent waits for a job; if it does not within
/// `timeout`, the error has the console's last 4 KiB and the VMM's last words (`messages`).
pub(crate) async fn wait_for_template<R: AsyncRead + Unpin>(
    console: &mut R,
    timeout: Duration,
    messages: &Path,
) -> Result<(), BackendError> {
    let mut seen = Vec::new();
    let mut sink = |data: &[u8]| {
        seen.extend_from_slice(data);
        let excess = seen.len().saturating_sub(4096);
        seen.drain(..excess);
    };
    let waited = wait_waiting(console, &mut sink, timeout).await;
    match waited {
        Ok(()) => Ok(()),
        Err(e) => Err(refused(
            "booting the template guest",
            format!(
                "{e}; its console ended with:\n{}\n{}",
                String::from_utf8_lossy(&seen),
                last_words(messages).await
            ),
        )),
    }
}
