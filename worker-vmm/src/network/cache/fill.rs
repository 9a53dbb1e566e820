//! A cacheable miss: the answer streams to the guest while each chunk is first written to a temp
//! file of its own; once complete, the file is checked (length, and the hash a by-hash path
//! names) and renamed into place before the last chunk goes to the guest. A temp file not kept is
//! removed when it is dropped.

use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use sha2::{Digest, Sha256, Sha512};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;

use super::CacheInner;
use super::rules::{CacheKey, Verify, storable_length};
use crate::network::body::{BoxError, ProxyBody};

/// A writer of the answer `response` to a request of `key`, if that answer may be kept.
pub(super) async fn start(
    cache: &Arc<CacheInner>,
    key: CacheKey,
    response: &hyper::http::response::Parts,
) -> Option<Filler> {
    let expected = storable_length(response)?;
    if expected > cache.max_size {
        return None;
    }
    let n = cache.next_tmp.fetch_add(1, Ordering::Relaxed);
    let path = cache
        .tmp
        .join(format!("{}.{}.{n}", key.id, std::process::id()));
    let file = match tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .await
    {
        Ok(file) => file,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cache entry not written");
            return None;
        }
    };
    let hasher = match key.verify {
        Verify::Length => Hasher::None,
        Verify::Sha256(_) => Hasher::Sha256(Sha256::new()),
        Verify::Sha512(_) => Hasher::Sha512(Sha512::new()),
    };
    Some(Filler {
        entry: TempEntry {
            file,
            path,
            key,
            hasher,
            expected,
            received: 0,
            kept: false,
            cache: cache.clone(),
        },
    })
}

/// Writes an answer into the cache while it streams to the guest.
pub(in crate::network) struct Filler {
    entry: TempEntry,
}

impl Filler {
    /// `origin` as it goes to the guest, each chunk written to the entry first.
    pub(in crate::network) fn body(self, origin: ProxyBody) -> ProxyBody {
        Fill {
            origin,
            cache: self.entry.cache.clone(),
            state: FillState::Reading(Some(self.entry)),
        }
        .boxed_unsync()
    }
}

enum Hasher {
    None,
    Sha256(Sha256),
    Sha512(Sha512),
}

/// A cache entry being written; removed when dropped before it is kept.
struct TempEntry {
    file: tokio::fs::File,
    path: PathBuf,
    key: CacheKey,
    hasher: Hasher,
    expected: u64,
    received: u64,
    kept: bool,
    cache: Arc<CacheInner>,
}

/// Why a complete entry was not kept.
#[derive(Debug, thiserror::Error)]
enum CommitError {
    #[error("writing it failed")]
    Write(#[source] io::Error),
    #[error("its content does not match the hash in its path")]
    Hash,
}

impl TempEntry {
    /// Takes `chunk` into the hash; false when the answer is longer than announced.
    fn take(&mut self, chunk: &Bytes) -> bool {
        self.received += chunk.len() as u64;
        if self.received > self.expected {
            return false;
        }
        match &mut self.hasher {
            Hasher::None => {}
            Hasher::Sha256(h) => h.update(chunk),
            Hasher::Sha512(h) => h.update(chunk),
        }
        true
    }

    fn complete(&self) -> bool {
        self.received == self.expected
    }

    /// Checks the complete entry and renames it into place.
    async fn commit(mut self) {
        match self.finish().await {
            Ok(()) => {
                self.kept = true;
                let cache = self.cache.clone();
                cache.keep(&self.key.id, self.expected).await;
            }
            Err(e) => {
                tracing::warn!(entry = %self.key.id, error = %e, "cache entry not kept");
            }
        }
    }

    async fn finish(&mut self) -> Result<(), CommitError> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await.map_err(CommitError::Write)?;
        self.file.sync_data().await.map_err(CommitError::Write)?;
        let matches = match (
            std::mem::replace(&mut self.hasher, Hasher::None),
            self.key.verify,
        ) {
            (Hasher::None, Verify::Length) => true,
            (Hasher::Sha256(h), Verify::Sha256(want)) => h.finalize()[..] == want[..],
            (Hasher::Sha512(h), Verify::Sha512(want)) => h.finalize()[..] == want[..],
            _ => false,
        };
        if !matches {
            return Err(CommitError::Hash);
        }
        let place = self.cache.entries.join(&self.key.id);
        tokio::fs::rename(&self.path, &place)
            .await
            .map_err(CommitError::Write)
    }
}

impl Drop for TempEntry {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        self.cache
            .counters
            .discarded
            .fetch_add(1, Ordering::Relaxed);
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cache temp file not removed");
        }
    }
}

enum FillState {
    /// Reading the origin; the entry while the answer is still being kept.
    Reading(Option<TempEntry>),
    /// Writing `chunk[written..]` to the entry before `chunk` goes to the guest.
    Writing(TempEntry, Bytes, usize),
    /// The entry is complete: checking and keeping it before the last `chunk` goes to the guest,
    /// so that a guest that has the whole answer finds it in the cache.
    Committing(Pin<Box<dyn Future<Output = ()> + Send>>, Bytes),
    Finished,
}

/// The body of a cacheable miss.
struct Fill {
    origin: ProxyBody,
    cache: Arc<CacheInner>,
    state: FillState,
}

impl Body for Fill {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match std::mem::replace(&mut this.state, FillState::Finished) {
                FillState::Reading(entry) => {
                    let frame = match Pin::new(&mut this.origin).poll_frame(cx) {
                        Poll::Pending => {
                            this.state = FillState::Reading(entry);
                            return Poll::Pending;
                        }
                        // The origin failed or ended: an entry still open is incomplete and
                        // dropped (removed) here.
                        Poll::Ready(None) => return Poll::Ready(None),
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                        Poll::Ready(Some(Ok(frame))) => frame,
                    };
                    let chunk = match frame.into_data() {
                        Ok(chunk) => chunk,
                        Err(trailers) => {
                            this.state = FillState::Reading(entry);
                            return Poll::Ready(Some(Ok(trailers)));
                        }
                    };
                    this.cache
                        .counters
                        .bytes_fetched
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    // An answer longer than announced is not kept (its entry is dropped here).
                    if let Some(mut entry) = entry
                        && entry.take(&chunk)
                    {
                        this.state = FillState::Writing(entry, chunk, 0);
                        continue;
                    }
                    this.state = FillState::Reading(None);
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                FillState::Writing(mut entry, chunk, written) => {
                    match Pin::new(&mut entry.file).poll_write(cx, &chunk[written..]) {
                        Poll::Pending => {
                            this.state = FillState::Writing(entry, chunk, written);
                            return Poll::Pending;
                        }
                        Poll::Ready(Ok(n)) if n > 0 => {
                            let written = written + n;
                            if written < chunk.len() {
                                this.state = FillState::Writing(entry, chunk, written);
                            } else if entry.complete() {
                                this.state = FillState::Committing(Box::pin(entry.commit()), chunk);
                            } else {
                                this.state = FillState::Reading(Some(entry));
                                return Poll::Ready(Some(Ok(Frame::data(chunk))));
                            }
                        }
                        failed => {
                            let error = match failed {
                                Poll::Ready(Err(e)) => e,
                                _ => io::Error::from(io::ErrorKind::WriteZero),
                            };
                            tracing::warn!(entry = %entry.key.id, %error, "cache entry not written");
                            this.state = FillState::Reading(None);
                            return Poll::Ready(Some(Ok(Frame::data(chunk))));
                        }
                    }
                }
                FillState::Committing(mut commit, chunk) => match commit.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.state = FillState::Committing(commit, chunk);
                        return Poll::Pending;
                    }
                    Poll::Ready(()) => {
                        this.state = FillState::Reading(None);
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                },
                FillState::Finished => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            FillState::Reading(_) => self.origin.is_end_stream(),
            FillState::Writing(..) | FillState::Committing(..) => false,
            FillState::Finished => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            FillState::Reading(_) => self.origin.size_hint(),
            _ => SizeHint::default(),
        }
    }
}
