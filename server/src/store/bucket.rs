//! Artifacts as objects in an S3-compatible bucket (`[artifacts.s3]`), which every server replica
//! reaches: keys `<prefix><job>/<attempt>/<name>`. An upload of up to one part is hashed in
//! memory and put whole; a larger one goes up as a multipart upload while it is hashed, at most
//! [`PARTS_IN_FLIGHT`] parts at a time, and is completed only once its size and sha256 check
//! out; otherwise it is aborted. Either way the object appears whole or not at all.

use super::{Checked, Place, Span, StoreResult};
use crate::config::S3Bucket;
use crate::error::{AppError, AppResult};
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload, WriteMultipart};
use std::collections::HashSet;
use std::sync::Arc;

/// The size of a multipart upload's parts (S3 wants at least 5 MiB but for the last, and at most
/// 10 000 parts: artifacts up to 80 GB).
const PART: usize = 8 << 20;
/// Parts of one upload sent at once; with the part being filled, an upload holds at most
/// `(PARTS_IN_FLIGHT + 1) * PART` bytes of memory.
const PARTS_IN_FLIGHT: usize = 2;

#[derive(Clone)]
pub struct Bucket {
    objects: Arc<dyn ObjectStore>,
    /// What the logs and errors call it (`s3://bucket/prefix` at the endpoint).
    pub name: String,
}

impl Bucket {
    /// A client of the bucket `config` names; it must take a write and a delete before the server
    /// starts, so that a wrong name, endpoint or key is said at once.
    pub async fn open(config: &S3Bucket) -> Result<Bucket, object_store::Error> {
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_allow_http(config.allow_http);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
        }
        let s3 = builder.build()?;
        let objects: Arc<dyn ObjectStore> = match config.prefix.trim_matches('/') {
            "" => Arc::new(s3),
            prefix => Arc::new(object_store::prefix::PrefixStore::new(s3, prefix)),
        };
        let bucket = Bucket {
            objects,
            name: config.describe(),
        };
        let probe = Key::from(format!(
            ".vmfarm-probe/{}",
            crate::random::random_hex(8).map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?
        ));
        bucket.objects.put(&probe, PutPayload::new()).await?;
        bucket.objects.delete(&probe).await?;
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
        let mut first = Vec::new();
        let mut first_size = 0;
        while first_size < PART {
            match body.next().await? {
                Some(piece) => {
                    first_size += piece.len();
                    first.push(piece);
                }
                None => {
                    let size = body.finish()?;
                    let payload = PutPayload::from_iter(first);
                    self.objects
                        .put(&key, payload)
                        .await
                        .map_err(AppError::internal)?;
                    return Ok(size);
                }
            }
        }
        let upload = self
            .objects
            .put_multipart(&key)
            .await
            .map_err(AppError::internal)?;
        let mut parts = WriteMultipart::new_with_chunk_size(upload, PART);
        let sent = async {
            for piece in first {
                parts.put(piece);
            }
            while let Some(piece) = body.next().await? {
                parts
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(AppError::internal)?;
                parts.put(piece);
            }
            body.finish()
        }
        .await;
        match sent {
            Ok(size) => {
                parts.finish().await.map_err(AppError::internal)?;
                Ok(size)
            }
            Err(e) => {
                if let Err(abort) = parts.abort().await {
                    tracing::warn!(bucket = %self.name, key = %key, error = %abort,
                        "an upload that failed was not aborted: the bucket's lifecycle rule for incomplete multipart uploads removes its parts");
                }
                Err(e)
            }
        }
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
        let got = self.objects.get_opts(&Self::key(place), options).await?;
        Ok(Box::pin(got.into_stream().map_err(std::io::Error::other)))
    }

    pub async fn remove(&self, place: &Place) -> StoreResult<()> {
        match self.objects.delete(&Self::key(place)).await {
            Err(e) if !matches!(e, object_store::Error::NotFound { .. }) => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub async fn job_ids(&self) -> StoreResult<Vec<i64>> {
        let listed = self.objects.list_with_delimiter(None).await?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|prefix| prefix.filename()?.parse().ok())
            .collect())
    }

    /// The keys of every object of `job` (`attempt`: of that attempt only).
    async fn keys(&self, job: i64, attempt: Option<i64>) -> StoreResult<Vec<Key>> {
        Ok(self
            .objects
            .list(Some(&Self::folder(job, attempt)))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await?)
    }

    async fn remove_keys(&self, keys: Vec<Key>) -> StoreResult<usize> {
        let count = keys.len();
        let keys = futures_util::stream::iter(keys.into_iter().map(Ok)).boxed();
        self.objects
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
