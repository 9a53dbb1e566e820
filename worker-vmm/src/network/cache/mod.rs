//! The worker's cache of package files that never change once published: Debian's `pool/` files
//! and `by-hash` indexes, fetched over plain http (https is tunnelled, never cached).
//!
//! Layout: `<dir>/entries/<sha256 of "host:port/path">` and `<dir>/tmp/`. A miss streams to the
//! guest while it is written to a file of its own in `tmp/`; the file is renamed into `entries/`
//! only once it is complete and checked (its length against Content-Length; for `by-hash/SHA256`
//! and `SHA512` paths, its hash against the one in the path). So a worker killed mid-download
//! leaves at most a temp file, which the next `open` removes; concurrent misses of one file each
//! write their own temp file and the last rename wins. Past the size cap, the least recently used
//! entries are removed. One directory belongs to one worker process.
//!
//! `rules.rs` says what may be cached, `fill.rs` writes a miss on its way to the guest,
//! `index.rs` keeps the entries in order of use.

mod fill;
mod index;
mod rules;

use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;
use tokio_util::io::ReaderStream;
use vmfarm_proto::wire::CacheStats;

use super::body::{BoxError, ProxyBody};
use super::policy::Target;
use fill::Filler;
use index::Index;
use rules::{CacheKey, is_hex};

/// Chunk size of a hit's body.
const READ_CHUNK: usize = 64 * 1024;

/// A handle on the worker's cache; clones share it.
#[derive(Clone)]
pub struct ProxyCache {
    inner: Arc<CacheInner>,
}

struct CacheInner {
    entries: PathBuf,
    tmp: PathBuf,
    max_size: u64,
    index: Mutex<Index>,
    counters: Counters,
    next_tmp: AtomicU64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    bytes_from_cache: AtomicU64,
    bytes_fetched: AtomicU64,
    stored: AtomicU64,
    discarded: AtomicU64,
    evicted: AtomicU64,
}

/// Why the cache directory could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("the proxy cache cannot {action} {}", path.display())]
pub struct CacheError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl ProxyCache {
    /// Opens (creating it if needed) the cache in `dir`, removes the temp files a killed worker
    /// left, indexes the entries (least recently used by modification time) and trims them to
    /// `max_size` bytes. `max_size` 0 keeps nothing.
    pub async fn open(dir: &Path, max_size: u64) -> Result<ProxyCache, CacheError> {
        let owned = dir.to_owned();
        tokio::task::spawn_blocking(move || open_blocking(&owned, max_size))
            .await
            .map_err(|e| CacheError {
                action: "open",
                path: dir.to_owned(),
                source: io::Error::other(e),
            })?
    }

    /// Counters and contents now.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let index = self.inner.lock();
        CacheStats {
            hits: load(&c.hits),
            misses: load(&c.misses),
            bytes_from_cache: load(&c.bytes_from_cache),
            bytes_fetched: load(&c.bytes_fetched),
            stored: load(&c.stored),
            discarded: load(&c.discarded),
            evicted: load(&c.evicted),
            entries: index.entries.len() as u64,
            size: index.total,
        }
    }

    /// The key of `request` to `target` if its answer may be cached.
    pub(super) fn key_for<B>(&self, target: &Target, request: &Request<B>) -> Option<CacheKey> {
        rules::key_for(target, request)
    }

    /// The entry of `key`, if the cache has it; counts a hit or a miss.
    pub(super) async fn lookup(&self, key: &CacheKey) -> Option<Hit> {
        let counters = &self.inner.counters;
        let Some(len) = self.inner.lock().touch(&key.id) else {
            counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let path = self.inner.entries.join(&key.id);
        let opened = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path)?;
            // The modification time orders entries by use when the cache is opened again.
            if let Err(e) = file.set_modified(SystemTime::now()) {
                tracing::debug!(path = %path.display(), error = %e, "cache entry's time not updated");
            }
            Ok::<_, io::Error>(file)
        })
        .await;
        let error = match opened {
            Ok(Ok(file)) => {
                counters.hits.fetch_add(1, Ordering::Relaxed);
                return Some(Hit {
                    file: tokio::fs::File::from_std(file),
                    len,
                    cache: self.inner.clone(),
                });
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(entry = %key.id, %error, "cache entry unreadable; fetching it again");
        self.inner.lock().remove(&key.id);
        counters.misses.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// A writer of the answer `response` to a request of `key`, if that answer may be kept.
    pub(super) async fn fill(
        &self,
        key: CacheKey,
        response: &hyper::http::response::Parts,
    ) -> Option<Filler> {
        fill::start(&self.inner, key, response).await
    }
}

impl CacheInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a complete entry and evicts past the cap.
    async fn keep(&self, id: &str, size: u64) {
        let evicted = {
            let mut index = self.lock();
            index.insert(id, size);
            index.evict_to(self.max_size)
        };
        self.counters.stored.fetch_add(1, Ordering::Relaxed);
        for id in evicted {
            self.counters.evicted.fetch_add(1, Ordering::Relaxed);
            let path = self.entries.join(&id);
            if let Err(e) = tokio::fs::remove_file(&path).await
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "evicted cache entry not removed");
            }
        }
    }
}

fn open_blocking(dir: &Path, max_size: u64) -> Result<ProxyCache, CacheError> {
    let fail = |action, path: &Path| {
        let path = path.to_owned();
        move |source| CacheError {
            action,
            path,
            source,
        }
    };
    let entries = dir.join("entries");
    let tmp = dir.join("tmp");
    for sub in [&entries, &tmp] {
        std::fs::create_dir_all(sub).map_err(fail("create", sub))?;
    }
    for leftover in std::fs::read_dir(&tmp).map_err(fail("read", &tmp))? {
        let path = leftover.map_err(fail("read", &tmp))?.path();
        std::fs::remove_file(&path).map_err(fail("remove the leftover", &path))?;
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&entries).map_err(fail("read", &entries))? {
        let entry = entry.map_err(fail("read", &entries))?;
        let name = entry.file_name();
        let Some(id) = name.to_str().filter(|id| is_hex(id, 64)) else {
            tracing::warn!(path = %entry.path().display(), "not a cache entry; left alone");
            continue;
        };
        let meta = entry.metadata().map_err(fail("read", &entry.path()))?;
        if meta.is_file() {
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((used, id.to_owned(), meta.len()));
        }
    }
    found.sort();
    let mut index = Index::default();
    for (_, id, size) in found {
        index.insert(&id, size);
    }
    for id in index.evict_to(max_size) {
        let path = entries.join(id);
        std::fs::remove_file(&path).map_err(fail("remove", &path))?;
    }
    Ok(ProxyCache {
        inner: Arc::new(CacheInner {
            entries,
            tmp,
            max_size,
            index: Mutex::new(index),
            counters: Counters::default(),
            next_tmp: AtomicU64::new(0),
        }),
    })
}

/// A cached file, open for reading.
pub(super) struct Hit {
    file: tokio::fs::File,
    len: u64,
    cache: Arc<CacheInner>,
}

impl Hit {
    /// The answer to the guest: 200 with the file, streamed; `served` counts its bytes.
    pub(super) fn into_response(self, served: Arc<AtomicU64>) -> Response<ProxyBody> {
        let cache = self.cache;
        let chunks = ReaderStream::with_capacity(self.file, READ_CHUNK).map(move |chunk| {
            let chunk = chunk?;
            let len = chunk.len() as u64;
            cache
                .counters
                .bytes_from_cache
                .fetch_add(len, Ordering::Relaxed);
            served.fetch_add(len, Ordering::Relaxed);
            Ok::<_, BoxError>(Frame::data(chunk))
        });
        let mut response = Response::new(StreamBody::new(chunks).boxed_unsync());
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(self.len));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(
            HeaderName::from_static("x-vmfarm-cache"),
            HeaderValue::from_static("hit"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::test_utils::{INDEX, Job, Origin, by_hash_path, limits, pattern};
    use hyper::StatusCode;
    use sha2::{Digest, Sha256};

    const LOOPBACK: &str = "127.0.0.0/8";

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn pattern_bytes(len: usize) -> Vec<u8> {
        pattern(len).flat_map(|c| c.to_vec()).collect()
    }

    #[tokio::test]
    async fn test_a_second_get_of_a_pool_file_is_a_hit_with_the_same_bytes() {
        let origin = Origin::start().await;
        let target = format!("localhost:{}", origin.port());
        let job = Job::new(&[&target], &[LOOPBACK]).await;
        let path = "/debian/pool/main/h/hello/300000_hello_2.10-3_amd64.deb";
        let first = job.get(&origin.url(path)).await;
        assert_eq!(first.status, StatusCode::OK);
        assert!(!first.is_hit());
        assert!(first.body == pattern_bytes(300_000));
        let second = job.get(&origin.url(path)).await;
        assert_eq!(second.status, StatusCode::OK);
        assert!(second.is_hit());
        assert!(second.body == first.body);
        assert_eq!(second.headers["content-length"], "300000");
        assert_eq!(origin.requests_for(path), 1);
        let stats = job.cache.stats();
        assert_eq!(
            (stats.hits, stats.misses, stats.stored, stats.discarded),
            (1, 1, 1, 0)
        );
        assert_eq!(
            (stats.bytes_fetched, stats.bytes_from_cache),
            (300_000, 300_000)
        );
        assert_eq!((stats.entries, stats.size), (1, 300_000));
        let lines = job.log.lines();
        let ends: Vec<&String> = lines.iter().filter(|l| l.starts_with("network ")).collect();
        assert_eq!(ends.len(), 2, "{lines:#?}");
        assert!(
            ends[0].contains(": 1 request, none from the cache; "),
            "{}",
            ends[0]
        );
        assert!(
            ends[1].contains(": 1 request, 1 from the cache (293.0 KiB); "),
            "{}",
            ends[1]
        );
    }

    #[tokio::test]
    async fn test_a_truncated_answer_leaves_no_entry() {
        let origin = Origin::start().await;
        let job = Job::new(&[&format!("localhost:{}", origin.port())], &[LOOPBACK]).await;
        let path = "/debian/pool/main/t/trunc/200000_trunc_1.0_amd64.deb";
        let answer = job.get(&origin.url(path)).await;
        assert!(
            answer.failed,
            "the guest must see the answer fail: {answer:?}"
        );
        assert_eq!(answer.body.len(), 100_000);
        let stats = job.cache.stats();
        assert_eq!((stats.entries, stats.stored, stats.discarded), (0, 0, 1));
        assert!(files_in(&job.dir.join("entries")).is_empty());
        assert!(files_in(&job.dir.join("tmp")).is_empty());
        let again = job.get(&origin.url(path)).await;
        assert!(!again.is_hit());
        assert_eq!(origin.requests_for(path), 2);
    }

    /// Set in the worker process of the test below: the cache directory it uses.
    const KILLED_WORKER_CACHE: &str = "VMFARM_TEST_KILLED_WORKER_CACHE";
    /// Set with it: the origin's port.
    const KILLED_WORKER_ORIGIN: &str = "VMFARM_TEST_KILLED_WORKER_ORIGIN";
    const STALLED: &str = "/debian/pool/main/s/stall/3000000_stall_1.0_amd64.deb";

    #[tokio::test]
    async fn test_a_worker_killed_mid_download_leaves_no_entry_a_later_job_reads() {
        if let Ok(dir) = std::env::var(KILLED_WORKER_CACHE) {
            // The worker that is killed: it downloads a file that stops at its half.
            let port: u16 = std::env::var(KILLED_WORKER_ORIGIN)
                .unwrap()
                .parse()
                .unwrap();
            let target = format!("localhost:{port}");
            let job = Job::at(Path::new(&dir), &[&target], &[LOOPBACK], limits(), 1 << 30).await;
            let answer = job.get(&format!("http://{target}{STALLED}")).await;
            panic!("the stalled download ended: {answer:?}");
        }
        let origin = Origin::start().await;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        let name = "test_a_worker_killed_mid_download_leaves_no_entry_a_later_job_reads";
        let test = format!("{}::{name}", module_path!().split_once("::").unwrap().1);
        let mut worker = std::process::Command::new(std::env::current_exe().unwrap())
            .args([test.as_str(), "--exact", "--nocapture"])
            .env(KILLED_WORKER_CACHE, &dir)
            .env(KILLED_WORKER_ORIGIN, origin.port().to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Killed (SIGKILL) once half of the file is in its temporary entry.
        let half = 1_500_000;
        let started = std::time::Instant::now();
        loop {
            let written: u64 = std::fs::read_dir(dir.join("tmp"))
                .into_iter()
                .flatten()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum();
            if written >= half {
                break;
            }
            assert!(
                worker.try_wait().unwrap().is_none(),
                "the worker ended before it was killed"
            );
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the worker wrote {written} bytes of its temporary entry in 60 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        worker.kill().unwrap();
        worker.wait().unwrap();
        assert_eq!(files_in(&dir.join("tmp")).len(), 1);

        // The next worker on that cache: no entry, the file fetched again, whole.
        let target = format!("localhost:{}", origin.port());
        let job = Job::at(&dir, &[&target], &[LOOPBACK], limits(), 1 << 30).await;
        assert!(files_in(&dir.join("tmp")).is_empty());
        assert!(files_in(&dir.join("entries")).is_empty());
        assert_eq!(job.cache.stats().entries, 0);
        let fetched = job.get(&origin.url(STALLED)).await;
        assert!(!fetched.is_hit());
        assert!(fetched.body == pattern_bytes(3_000_000));
        let hit = job.get(&origin.url(STALLED)).await;
        assert!(hit.is_hit());
        assert!(hit.body == fetched.body);
        assert_eq!(origin.requests_for(STALLED), 2);
    }

    #[tokio::test]
    async fn test_by_hash_entries_are_kept_only_when_their_hash_matches() {
        let origin = Origin::start().await;
        let job = Job::new(&[&format!("localhost:{}", origin.port())], &[LOOPBACK]).await;
        let wrong = by_hash_path(&hex::encode(Sha256::digest(b"something else")));
        let answer = job.get(&origin.url(&wrong)).await;
        assert_eq!(
            (answer.status, answer.body.as_slice()),
            (StatusCode::OK, INDEX)
        );
        let stats = job.cache.stats();
        assert_eq!((stats.entries, stats.discarded), (0, 1));
        assert!(!job.get(&origin.url(&wrong)).await.is_hit());

        let right = by_hash_path(&hex::encode(Sha256::digest(INDEX)));
        assert!(!job.get(&origin.url(&right)).await.is_hit());
        let hit = job.get(&origin.url(&right)).await;
        assert!(hit.is_hit());
        assert_eq!(hit.body, INDEX);
        assert_eq!(job.cache.stats().entries, 1);
    }

    #[tokio::test]
    async fn test_eviction_keeps_the_cache_under_its_cap_least_recently_used_first() {
        let origin = Origin::start().await;
        let limits = super::super::test_utils::limits();
        let job = Job::with(
            &[&format!("localhost:{}", origin.port())],
            &[LOOPBACK],
            limits,
            250_000,
        )
        .await;
        let file = |name: &str| format!("/debian/pool/main/e/evict/100000_{name}.deb");
        let (a, b, c) = (file("a"), file("b"), file("c"));
        for path in [&a, &b] {
            assert!(!job.get(&origin.url(path)).await.is_hit());
        }
        assert!(
            job.get(&origin.url(&a)).await.is_hit(),
            "a is now the most recently used"
        );
        assert!(!job.get(&origin.url(&c)).await.is_hit());
        let stats = job.cache.stats();
        assert_eq!((stats.entries, stats.size, stats.evicted), (2, 200_000, 1));
        assert_eq!(files_in(&job.dir.join("entries")).len(), 2);
        assert!(job.get(&origin.url(&a)).await.is_hit());
        assert!(job.get(&origin.url(&c)).await.is_hit());
        assert!(
            !job.get(&origin.url(&b)).await.is_hit(),
            "b was the least recently used"
        );

        // Larger than the whole cache: served, never kept.
        let big = "/debian/pool/main/b/big/300000_big.deb";
        assert_eq!(job.get(&origin.url(big)).await.body.len(), 300_000);
        assert!(!job.get(&origin.url(big)).await.is_hit());
        assert!(job.cache.stats().size <= 250_000);
    }

    #[tokio::test]
    async fn test_no_store_answers_and_range_requests_go_around_the_cache() {
        let origin = Origin::start().await;
        let job = Job::new(&[&format!("localhost:{}", origin.port())], &[LOOPBACK]).await;
        let nostore = "/debian/pool/main/n/nostore/1000_x.deb";
        for _ in 0..2 {
            assert!(!job.get(&origin.url(nostore)).await.is_hit());
        }
        let path = "/debian/pool/main/r/range/1000_x.deb";
        assert!(!job.get(&origin.url(path)).await.is_hit());
        let ranged = job
            .send(
                Request::get(origin.url(path))
                    .header("range", "bytes=0-9")
                    .body(http_body_util::Empty::new())
                    .unwrap(),
            )
            .await;
        assert!(!ranged.is_hit());
        assert_eq!(origin.requests_for(nostore), 2);
        assert_eq!(origin.requests_for(path), 2);
        assert_eq!(job.cache.stats().entries, 1);
    }

    #[tokio::test]
    async fn test_concurrent_misses_of_one_file_make_one_good_entry() {
        let origin = Origin::start().await;
        let job = Job::new(&[&format!("localhost:{}", origin.port())], &[LOOPBACK]).await;
        let url = origin.url("/debian/pool/main/c/conc/2000000_conc.deb");
        let answers = futures_util::future::join_all((0..4).map(|_| job.get(&url))).await;
        let want = pattern_bytes(2_000_000);
        for answer in &answers {
            assert!(answer.body == want);
        }
        let hit = job.get(&url).await;
        assert!(hit.is_hit());
        assert!(hit.body == want);
        let stats = job.cache.stats();
        assert_eq!((stats.entries, stats.size), (1, 2_000_000));
        assert_eq!(files_in(&job.dir.join("entries")).len(), 1);
        assert!(files_in(&job.dir.join("tmp")).is_empty());
    }

    #[tokio::test]
    async fn test_open_removes_a_dead_workers_temp_files_and_finds_the_entries() {
        let dir = tempfile::tempdir().unwrap();
        let entries = dir.path().join("entries");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&entries).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        let (old, new) = ("1".repeat(64), "2".repeat(64));
        std::fs::write(entries.join(&old), vec![0; 1000]).unwrap();
        let aged = SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(entries.join(&old))
            .unwrap()
            .set_modified(aged)
            .unwrap();
        std::fs::write(entries.join(&new), vec![0; 2000]).unwrap();
        std::fs::write(tmp.join(format!("{new}.4242.0")), b"half an entry").unwrap();
        std::fs::write(entries.join("README"), b"not an entry").unwrap();

        let cache = ProxyCache::open(dir.path(), 1 << 20).await.unwrap();
        assert!(files_in(&tmp).is_empty());
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.size), (2, 3000));
        drop(cache);

        // A smaller cap at the next start trims the least recently used.
        let cache = ProxyCache::open(dir.path(), 2500).await.unwrap();
        assert_eq!((cache.stats().entries, cache.stats().size), (1, 2000));
        assert_eq!(files_in(&entries), [new, "README".to_owned()]);
    }

    #[tokio::test]
    async fn test_an_entry_that_vanished_is_fetched_again() {
        let origin = Origin::start().await;
        let job = Job::new(&[&format!("localhost:{}", origin.port())], &[LOOPBACK]).await;
        let path = "/debian/pool/main/v/vanish/5000_v.deb";
        assert!(!job.get(&origin.url(path)).await.is_hit());
        for name in files_in(&job.dir.join("entries")) {
            std::fs::remove_file(job.dir.join("entries").join(name)).unwrap();
        }
        let again = job.get(&origin.url(path)).await;
        assert!(!again.is_hit());
        assert!(again.body == pattern_bytes(5000));
        assert!(job.get(&origin.url(path)).await.is_hit());
    }
}
