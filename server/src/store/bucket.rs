//! Artifacts as objects in an S3-compatible bucket (`[artifacts.s3]`), which every server replica
//! reaches: keys `<prefix>/<job>/<attempt>/<name>`. An upload of up to one part is hashed in
//! memory and put whole; a larger one goes up as a multipart upload while it is hashed, at most
//! [`PARTS_IN_FLIGHT`] parts at a time, and is completed only once its size and sha256 check
//! out; otherwise (or when the request is dropped) it is aborted. Either way the object appears
//! whole or not at all.

use super::{Checked, IDLE_LIMIT, Place, Span, StoreResult};
use crate::config::S3Bucket;
use crate::error::{AppError, AppResult};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::{ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectStore, PutPayload};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The size of a multipart upload's parts (S3 wants at least 5 MiB but for the last).
const PART: usize = 8 << 20;
/// The largest artifact a bucket takes in parts of [`PART`] (S3 takes at most 10 000 parts).
pub const MAX_OBJECT: u64 = PART as u64 * 10_000;
/// S3's longest key, in bytes.
const MAX_KEY: usize = 1024;
/// Parts of one upload sent at once; with a full part waiting its turn and the part being
/// filled, an upload holds at most `(PARTS_IN_FLIGHT + 2) * PART` bytes of memory.
const PARTS_IN_FLIGHT: usize = 2;
/// Uploads received at once; more wait their turn (they would otherwise each hold their parts
/// in memory): at most 8 * 32 MiB.
const UPLOADS_AT_ONCE: usize = 8;

#[derive(Clone)]
pub struct Bucket {
    /// For uploads and deletes: each request within the client's time limit (30 s).
    writes: Arc<dyn ObjectStore>,
    /// For downloads, which last as long as the user's connection takes to read them.
    reads: Arc<dyn ObjectStore>,
    uploads: Arc<Semaphore>,
    /// The keys' prefix, without slashes at its ends.
    prefix: String,
    /// What the logs and errors call it (`s3://bucket/prefix at endpoint`).
    pub name: String,
}

impl Bucket {
    /// A client of the bucket `config` names; it must take a write and a delete before the server
    /// starts, so that a wrong name, endpoint or key is said at once.
    pub async fn open(config: &S3Bucket) -> Result<Bucket, object_store::Error> {
        let writes = client(config, ClientOptions::new())?;
        let reads = client(config, ClientOptions::new().with_timeout_disabled())?;
        let bucket = Bucket {
            writes,
            reads,
            uploads: Arc::new(Semaphore::new(UPLOADS_AT_ONCE)),
            prefix: config.prefix.trim_matches('/').to_owned(),
            name: config.describe(),
        };
        let probe = Key::from(format!(
            ".vmfarm-probe/{}",
            crate::random::random_hex(8).map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?
        ));
        bucket.writes.put(&probe, PutPayload::new()).await?;
        bucket.writes.delete(&probe).await?;
        Ok(bucket)
    }

    fn key(place: &Place) -> Key {
        let job = place.job.to_string();
        let attempt = place.attempt.map(|a| a.to_string());
        let parts = std::iter::once(job.as_str())
            .chain(attempt.as_deref())
            .chain(place.name.split('/'));
        Key::from_iter(parts)
    }

    fn folder(job: i64, attempt: Option<i64>) -> Key {
        let job = Key::from(job.to_string());
        match attempt {
            Some(attempt) => job.child(attempt.to_string()),
            None => job,
        }
    }

    pub async fn receive<S, E>(&self, place: &Place, body: &mut Checked<S>) -> AppResult<u64>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let key = Self::key(place);
        let full_key = self.prefix.len() + 1 + key.as_ref().len();
        if full_key > MAX_KEY {
            return Err(AppError::BadRequest(format!(
                "artifact name `{}` is too long for the artifact bucket: its key would be \
                 {full_key} bytes, S3 takes at most {MAX_KEY}",
                place.name
            )));
        }
        let _turn = self.uploads.acquire().await.map_err(AppError::internal)?;
        let mut cutter = Cutter::new();
        let mut pending: Option<Pending> = None;
        let received = async {
            while let Some(piece) = body.next().await? {
                for part in cutter.take(&piece) {
                    let upload = match &mut pending {
                        Some(upload) => upload,
                        None => pending.insert(self.start(&key).await?),
                    };
                    upload.send(part).await?;
                }
            }
            let size = body.finish()?;
            let rest = cutter.rest();
            match &mut pending {
                None => {
                    let payload = PutPayload::from(rest);
                    self.writes
                        .put(&key, payload)
                        .await
                        .map_err(AppError::internal)?;
                }
                Some(upload) => {
                    if !rest.is_empty() {
                        upload.send(rest).await?;
                    }
                    upload.complete().await?;
                }
            }
            Ok(size)
        }
        .await;
        if received.is_err()
            && let Some(upload) = &mut pending
        {
            upload.abort().await;
        }
        received
    }

    /// Starts a multipart upload to `key`.
    async fn start(&self, key: &Key) -> AppResult<Pending> {
        let upload = self
            .writes
            .put_multipart(key)
            .await
            .map_err(AppError::internal)?;
        Ok(Pending {
            upload: Some(upload),
            sending: tokio::task::JoinSet::new(),
            key: key.clone(),
            bucket: self.name.clone(),
        })
    }

    pub async fn read(&self, place: &Place, span: Span) -> StoreResult<super::ByteStream> {
        let range = match span {
            Span::Whole => None,
            Span::Part { start, end } => Some(GetRange::Bounded(start..end + 1)),
        };
        let options = GetOptions {
            range,
            ..GetOptions::default()
        };
        let key = Self::key(place);
        let asked = self.reads.get_opts(&key, options);
        let got = tokio::time::timeout(IDLE_LIMIT, asked)
            .await
            .map_err(|_| stalled())??;
        Ok(Box::pin(idle_limited(got.into_stream())))
    }

    pub async fn remove(&self, place: &Place) -> StoreResult<()> {
        match self.writes.delete(&Self::key(place)).await {
            Err(e) if !matches!(e, object_store::Error::NotFound { .. }) => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub async fn job_ids(&self) -> StoreResult<Vec<i64>> {
        let listed = self.writes.list_with_delimiter(None).await?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|prefix| prefix.filename()?.parse().ok())
            .collect())
    }

    /// The keys of every object of `job` (`attempt`: of that attempt only).
    async fn keys(&self, job: i64, attempt: Option<i64>) -> StoreResult<Vec<Key>> {
        Ok(self
            .writes
            .list(Some(&Self::folder(job, attempt)))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await?)
    }

    async fn remove_keys(&self, keys: Vec<Key>) -> StoreResult<usize> {
        let count = keys.len();
        let keys = futures_util::stream::iter(keys.into_iter().map(Ok)).boxed();
        self.writes
            .delete_stream(keys)
            .try_for_each(|_| async { Ok(()) })
            .await?;
        Ok(count)
    }

    /// Removes every object of `job` (`attempt`: of that attempt only); how many went.
    pub async fn remove_all(&self, job: i64, attempt: Option<i64>) -> StoreResult<usize> {
        let keys = self.keys(job, attempt).await?;
        self.remove_keys(keys).await
    }

    /// Removes the objects of `job` that are none of `known`; how many went.
    pub async fn keep_only(&self, job: i64, known: &HashSet<Place>) -> StoreResult<usize> {
        let known: HashSet<Key> = known.iter().map(Self::key).collect();
        let mut keys = self.keys(job, None).await?;
        keys.retain(|key| !known.contains(key));
        self.remove_keys(keys).await
    }
}

/// A client of `config`'s bucket, under its prefix. Credentials: the config's, else
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`, else a web identity
/// (`AWS_WEB_IDENTITY_TOKEN_FILE`, `AWS_ROLE_ARN`) or a container's role
/// (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`), else the host's instance role; no other `AWS_*`
/// variable changes what the config says.
fn client(
    config: &S3Bucket,
    options: ClientOptions,
) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&config.bucket)
        .with_region(&config.region)
        .with_client_options(options.with_allow_http(config.allow_http));
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let credentials = match (&config.access_key_id, &config.secret_access_key) {
        (Some(id), Some(secret)) => Some((id.clone(), secret.clone(), None)),
        _ => from_env("AWS_ACCESS_KEY_ID")
            .zip(from_env("AWS_SECRET_ACCESS_KEY"))
            .map(|(id, secret)| (id, secret, from_env("AWS_SESSION_TOKEN"))),
    };
    if let Some(uri) = from_env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
        builder = builder.with_config(AmazonS3ConfigKey::ContainerCredentialsRelativeUri, uri);
    }
    if let Some((id, secret, token)) = credentials {
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(secret);
        if let Some(token) = token {
            builder = builder.with_token(token);
        }
    }
    let s3: AmazonS3 = builder.build()?;
    Ok(Arc::new(object_store::prefix::PrefixStore::new(
        s3,
        config.prefix.trim_matches('/'),
    )))
}

/// A bucket that stopped answering a download (the reads' client has no time limit of its own:
/// a download lasts as long as its reader takes).
fn stalled() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "the artifact bucket sent nothing for {} s",
            IDLE_LIMIT.as_secs()
        ),
    )
}

/// `bytes`, ended with an error when the bucket sends nothing for [`IDLE_LIMIT`] once asked for
/// more (a reader that does not ask is not timed).
fn idle_limited(
    bytes: futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures_util::stream::unfold(Some(bytes), |bytes| async move {
        let mut bytes = bytes?;
        match tokio::time::timeout(IDLE_LIMIT, bytes.next()).await {
            Ok(Some(piece)) => Some((piece.map_err(std::io::Error::other), Some(bytes))),
            Ok(None) => None,
            Err(_) => Some((Err(stalled()), None)),
        }
    })
}

/// The body cut into parts of exactly [`PART`] bytes, each its own allocation: the pieces are
/// copied in (a piece may hold on to a much larger read buffer).
struct Cutter {
    filling: Vec<u8>,
}

impl Cutter {
    fn new() -> Cutter {
        // Pages a small upload does not touch cost nothing.
        Cutter {
            filling: Vec::with_capacity(PART),
        }
    }

    /// Takes `piece` in; the parts it filled.
    fn take(&mut self, mut piece: &[u8]) -> Vec<Bytes> {
        let mut full = Vec::new();
        while !piece.is_empty() {
            let n = piece.len().min(PART - self.filling.len());
            self.filling.extend_from_slice(&piece[..n]);
            piece = &piece[n..];
            if self.filling.len() == PART {
                let part = std::mem::replace(&mut self.filling, Vec::with_capacity(PART));
                full.push(Bytes::from(part));
            }
        }
        full
    }

    /// What is left once the body has ended: the last part, or the whole of a small body.
    fn rest(self) -> Bytes {
        Bytes::from(self.filling)
    }
}

/// A multipart upload not yet completed, and its parts being sent: aborted, once those have
/// ended, on a failure or when dropped (the request went away).
struct Pending {
    /// `None` once completed or aborted.
    upload: Option<Box<dyn MultipartUpload>>,
    sending: JoinSet<object_store::Result<()>>,
    key: Key,
    bucket: String,
}

impl Pending {
    /// Sends `part` once fewer than [`PARTS_IN_FLIGHT`] are on their way.
    async fn send(&mut self, part: Bytes) -> AppResult<()> {
        while self.sending.len() >= PARTS_IN_FLIGHT {
            part_sent(self.sending.join_next().await)?;
        }
        let upload = self
            .upload
            .as_mut()
            .expect("parts are sent only before the upload is completed or aborted");
        let sent = upload.put_part(PutPayload::from(part));
        self.sending.spawn(sent);
        Ok(())
    }

    /// Completes the upload once every part is in: dropped after this, it aborts nothing.
    async fn complete(&mut self) -> AppResult<()> {
        while !self.sending.is_empty() {
            part_sent(self.sending.join_next().await)?;
        }
        if let Some(upload) = self.upload.as_mut() {
            upload.complete().await.map_err(AppError::internal)?;
        }
        self.upload = None;
        Ok(())
    }

    async fn abort(&mut self) {
        if let Some(upload) = self.upload.take() {
            abort(
                upload,
                std::mem::take(&mut self.sending),
                &self.bucket,
                &self.key,
            )
            .await;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let (Some(upload), Ok(runtime)) =
            (self.upload.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let sending = std::mem::take(&mut self.sending);
        let (bucket, key) = (self.bucket.clone(), self.key.clone());
        runtime.spawn(async move { abort(upload, sending, &bucket, &key).await });
    }
}

/// Lets the parts on their way end (a part the service is still taking may outlive an abort
/// sent before it), then aborts the upload.
async fn abort(
    mut upload: Box<dyn MultipartUpload>,
    mut sending: JoinSet<object_store::Result<()>>,
    bucket: &str,
    key: &Key,
) {
    while sending.join_next().await.is_some() {}
    if let Err(e) = upload.abort().await {
        tracing::warn!(%bucket, %key, error = %e,
            "a failed upload was not aborted: the bucket's lifecycle rule for incomplete multipart uploads removes its parts");
    }
}

fn part_sent(
    joined: Option<Result<object_store::Result<()>, tokio::task::JoinError>>,
) -> AppResult<()> {
    match joined {
        Some(Ok(sent)) => sent.map_err(AppError::internal),
        Some(Err(e)) => Err(AppError::internal(e)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn test_a_download_the_bucket_stops_sending_ends_in_an_error() {
        let first = futures_util::stream::iter([Ok(Bytes::from("a"))]);
        let stalls = first.chain(futures_util::stream::pending()).boxed();
        let mut read = Box::pin(idle_limited(stalls));
        assert_eq!(read.next().await.unwrap().unwrap(), "a");
        let stalled = read.next().await.unwrap().unwrap_err();
        assert_eq!(stalled.kind(), std::io::ErrorKind::TimedOut);
        assert!(read.next().await.is_none(), "it ends after the error");
    }

    #[test]
    fn test_parts_are_cut_exactly_whatever_the_pieces() {
        let mut cutter = Cutter::new();
        let mut parts = Vec::new();
        // Pieces of sizes that straddle the parts' boundaries.
        for (i, size) in [1, PART - 2, 3, 2 * PART + 5, 7].into_iter().enumerate() {
            parts.extend(cutter.take(&vec![i as u8; size]));
        }
        let rest = cutter.rest();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.len() == PART));
        let total: usize = [1, PART - 2, 3, 2 * PART + 5, 7].iter().sum();
        assert_eq!(rest.len(), total - 3 * PART);
        // The bytes keep their order across the cuts.
        assert_eq!(parts[0][0], 0);
        assert_eq!(parts[0][PART - 1], 2);
        assert_eq!(parts[1][0], 2);
        assert_eq!((parts[1][1], parts[1][2]), (2, 3));
        assert_eq!(*rest.last().unwrap(), 4);
    }
}
