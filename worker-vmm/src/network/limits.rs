//! The bounds of a job's network: connections at once, bytes in all, idle and connect timeouts;
//! and the two stream wrappers that count and enforce them: `Metered` on the guest's side of a
//! connection (counts every byte, notes activity) and `Gated` on the origin's side (stops moving
//! bytes once the job's budget is spent).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::NetworkConfig;

/// Largest request or response head (start line and headers) the proxy reads, in bytes.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Buffer of each direction of a tunnel, in bytes.
pub(super) const TUNNEL_BUFFER: usize = 64 * 1024;

/// A job's network limits (the worker config's `[network]` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkLimits {
    /// Connections from the guest open at once; more are answered with 503.
    pub max_connections: usize,
    /// Bytes through the proxy in all, both ways, cache hits included.
    pub max_bytes: u64,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Resolving a host and connecting to it, together.
    pub connect_timeout: Duration,
}

impl From<&NetworkConfig> for NetworkLimits {
    fn from(config: &NetworkConfig) -> Self {
        NetworkLimits {
            max_connections: usize::try_from(config.max_connections_per_job).unwrap_or(usize::MAX),
            max_bytes: config.max_bytes_per_job.0,
            idle_timeout: config.idle_timeout.0,
            connect_timeout: config.connect_timeout.0,
        }
    }
}

/// What the connections of one job share: their slots and their byte budget.
#[derive(Debug)]
pub(super) struct JobBudget {
    max_bytes: u64,
    used: AtomicU64,
    slots: Arc<Semaphore>,
    max_connections: usize,
}

impl JobBudget {
    pub(super) fn new(limits: &NetworkLimits) -> JobBudget {
        let max_connections = limits.max_connections.min(Semaphore::MAX_PERMITS);
        JobBudget {
            max_bytes: limits.max_bytes,
            used: AtomicU64::new(0),
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
        }
    }

    /// A connection slot, held for the connection's life; `None` when all are taken.
    pub(super) fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    pub(super) fn max_connections(&self) -> usize {
        self.max_connections
    }

    pub(super) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn add(&self, bytes: usize) {
        self.used.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Whether the job has moved all the bytes it may.
    pub(super) fn exhausted(&self) -> bool {
        self.used.load(Ordering::Relaxed) >= self.max_bytes
    }
}

/// One connection's traffic as the guest sees it, and when it last moved.
#[derive(Debug)]
pub(super) struct Traffic {
    start: Instant,
    from_guest: AtomicU64,
    to_guest: AtomicU64,
    /// Milliseconds from `start` to the last byte either way.
    last_active_ms: AtomicU64,
    /// Set when a `Gated` stream of this connection stopped at the job's byte limit.
    cut: AtomicBool,
    job: Arc<JobBudget>,
}

impl Traffic {
    pub(super) fn new(job: Arc<JobBudget>) -> Traffic {
        Traffic {
            start: Instant::now(),
            from_guest: AtomicU64::new(0),
            to_guest: AtomicU64::new(0),
            last_active_ms: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            job,
        }
    }

    fn moved(&self, counter: &AtomicU64, bytes: usize) {
        if bytes == 0 {
            return;
        }
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
        self.job.add(bytes);
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.store(now, Ordering::Relaxed);
    }

    pub(super) fn sent_by_guest(&self) -> u64 {
        self.from_guest.load(Ordering::Relaxed)
    }

    pub(super) fn received_by_guest(&self) -> u64 {
        self.to_guest.load(Ordering::Relaxed)
    }

    /// Whether the connection was cut at the job's byte limit.
    pub(super) fn was_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }

    pub(super) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Resolves once the connection has moved no byte for `timeout`.
    pub(super) async fn idle(&self, timeout: Duration) {
        loop {
            let idle = self.idle_for();
            if idle >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle).await;
        }
    }
}

/// The guest's side of a connection: every byte is counted in the connection's `Traffic` and
/// the job's budget.
pub(super) struct Metered<S> {
    inner: S,
    traffic: Arc<Traffic>,
}

impl<S> Metered<S> {
    pub(super) fn new(inner: S, traffic: Arc<Traffic>) -> Metered<S> {
        Metered { inner, traffic }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let traffic = &this.traffic;
            traffic.moved(&traffic.from_guest, buf.filled().len() - before);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            this.traffic.moved(&this.traffic.to_guest, n);
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            this.traffic.moved(&this.traffic.to_guest, n);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The error a `Gated` stream gives once the job's budget is spent.
#[derive(Debug, thiserror::Error)]
#[error("the job has used its network byte limit")]
pub(super) struct BudgetSpent;

/// The origin's side of a connection: it stops moving bytes once the job's budget is spent, which
/// ends the tunnel or the response that was under way (and marks the connection as cut).
pub(super) struct Gated<S> {
    inner: S,
    traffic: Arc<Traffic>,
}

impl<S> Gated<S> {
    pub(super) fn new(inner: S, traffic: Arc<Traffic>) -> Gated<S> {
        Gated { inner, traffic }
    }

    fn check(&self) -> io::Result<()> {
        if self.traffic.job.exhausted() {
            self.traffic.cut.store(true, Ordering::Relaxed);
            return Err(io::Error::other(BudgetSpent));
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(max_bytes: u64) -> NetworkLimits {
        NetworkLimits {
            max_connections: 2,
            max_bytes,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn test_limits_come_from_the_worker_config() {
        let config = crate::config::WorkerConfig::parse(
            "[network]\nmax_connections_per_job = 8\nmax_bytes_per_job = \"2GiB\"\nidle_timeout = \"1m\"\nconnect_timeout = \"5s\"\n",
        )
        .unwrap();
        assert_eq!(
            NetworkLimits::from(&config.network),
            NetworkLimits {
                max_connections: 8,
                max_bytes: 2 << 30,
                idle_timeout: Duration::from_secs(60),
                connect_timeout: Duration::from_secs(5),
            }
        );
    }

    #[tokio::test]
    async fn test_metered_counts_both_ways_into_the_job() {
        let job = Arc::new(JobBudget::new(&limits(1000)));
        let traffic = Arc::new(Traffic::new(job.clone()));
        let (near, mut far) = tokio::io::duplex(1024);
        let mut metered = Metered::new(near, traffic.clone());
        metered.write_all(b"hello").await.unwrap();
        far.write_all(b"good day").await.unwrap();
        let mut buf = [0; 8];
        metered.read_exact(&mut buf).await.unwrap();
        assert_eq!(
            (traffic.received_by_guest(), traffic.sent_by_guest()),
            (5, 8)
        );
        assert!(!job.exhausted());
        metered.write_all(&[0; 987]).await.unwrap();
        assert!(job.exhausted(), "1000 bytes of 1000 moved");
    }

    #[tokio::test]
    async fn test_gated_stops_once_the_budget_is_spent() {
        let job = Arc::new(JobBudget::new(&limits(4)));
        let traffic = Arc::new(Traffic::new(job.clone()));
        let (near, _far) = tokio::io::duplex(1024);
        let (origin, _origin_far) = tokio::io::duplex(1024);
        let mut gated = Gated::new(origin, traffic.clone());
        gated.write_all(b"ok").await.unwrap();
        assert!(!traffic.was_cut());
        Metered::new(near, traffic.clone())
            .write_all(b"12345")
            .await
            .unwrap();
        let err = gated.write_all(b"more").await.unwrap_err();
        assert!(
            err.get_ref().is_some_and(|e| e.is::<BudgetSpent>()),
            "{err}"
        );
        assert!(traffic.was_cut());
    }

    #[tokio::test]
    async fn test_slots_are_limited_and_come_back() {
        let job = JobBudget::new(&limits(1));
        let first = job.try_slot().unwrap();
        let _second = job.try_slot().unwrap();
        assert!(job.try_slot().is_none());
        drop(first);
        assert!(job.try_slot().is_some());
    }

    #[tokio::test]
    async fn test_idle_waits_for_quiet_since_the_last_byte() {
        let job = Arc::new(JobBudget::new(&limits(1000)));
        let traffic = Arc::new(Traffic::new(job));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (near, _far) = tokio::io::duplex(1024);
        Metered::new(near, traffic.clone())
            .write_all(b"x")
            .await
            .unwrap();
        let start = Instant::now();
        traffic.idle(Duration::from_millis(200)).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(190) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }
}
