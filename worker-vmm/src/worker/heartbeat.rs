//! Keeps a job's lease alive and hears cancels: renews well before expiry; a `cancel: true`
//! answer or a lost lease is published on a watch channel the job's steps listen to.

use super::server_client::{LeaseHandle, ServerClient, ServerError};
use std::time::Duration;
use tokio::sync::watch;

/// Why the job must stop early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Cancelled,
    LeaseLost,
}

/// Renews the lease until dropped; `reason` turns `Some` (and `stopping` true) when the job must end.
pub struct Heartbeat {
    pub reason: watch::Receiver<Option<Stop>>,
    /// The same news as a flag, for steps that only need to know whether to stop.
    pub stopping: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    pub fn stopped(&self) -> Option<Stop> {
        *self.reason.borrow()
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long to wait before renewing a lease that lives `ttl_ms` more: a third of it, so that
/// two renewals may fail before it expires (at least 100 ms).
fn renew_after(ttl_ms: u64) -> Duration {
    Duration::from_millis((ttl_ms / 3).max(100))
}

/// Renews `lease`, which lives `ttl_ms` from now: each renewal is timed by the time to live the
/// server gave with the last answer, never by comparing clocks with it.
pub fn start(client: ServerClient, lease: LeaseHandle, ttl_ms: u64) -> Heartbeat {
    let (tx, rx) = watch::channel(None);
    let (flag_tx, flag_rx) = watch::channel(false);
    let publish = move |stop: Stop| {
        let _ = tx.send(Some(stop));
        let _ = flag_tx.send(true);
    };
    let task = tokio::spawn(async move {
        let mut every = renew_after(ttl_ms);
        loop {
            tokio::time::sleep(every).await;
            match client.heartbeat(&lease).await {
                Ok(answer) => {
                    every = renew_after(answer.ttl_ms);
                    if answer.cancel {
                        publish(Stop::Cancelled);
                    }
                }
                Err(ServerError::LeaseLost(why)) => {
                    tracing::warn!(lease = %lease.lease_id, "{why}");
                    publish(Stop::LeaseLost);
                    return;
                }
                Err(e) => {
                    // The server stayed away past the retry window: the lease has expired there.
                    tracing::warn!(lease = %lease.lease_id, error = %e, "heartbeat failed; giving the job up");
                    publish(Stop::LeaseLost);
                    return;
                }
            }
        }
    });
    Heartbeat {
        reason: rx,
        stopping: flag_rx,
        task,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every heartbeat with `ttl_ms` and an `expires_at` ten minutes ahead
    /// of this host's clock (as a server whose clock runs ten minutes ahead would); counts them.
    async fn skewed_server(ttl_ms: u64) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let Ok(n) = conn.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        if request.windows(4).any(|w| w == b"\r\n\r\n") {
                            request.clear();
                            seen.fetch_add(1, Ordering::SeqCst);
                            let ahead = super::super::log_shipper::now_ms() + 600_000;
                            let body = format!(
                                "{{\"expires_at\":{ahead},\"ttl_ms\":{ttl_ms},\"cancel\":false}}"
                            );
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if conn.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (url, count)
    }

    #[tokio::test]
    async fn test_renewals_follow_the_time_to_live_whatever_the_clocks_say() {
        let (url, count) = skewed_server(300).await;
        let client =
            ServerClient::new(&crate::config::ServerUrls::one(url.clone()), "token").unwrap();
        let lease = LeaseHandle {
            lease_id: "ab".into(),
            fence: 1,
        };
        let heartbeat = start(client, lease, 300);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // Every 100 ms: about ten. Timed by `expires_at` against this host's clock, the first
        // renewal would wait minutes, and the lease would be lost.
        let renewals = count.load(Ordering::SeqCst);
        assert!(renewals >= 5, "{renewals} renewals in 1.1 s");
        assert_eq!(heartbeat.stopped(), None);
    }

    #[test]
    fn test_a_renewal_comes_at_a_third_of_the_time_to_live() {
        assert_eq!(renew_after(30_000), Duration::from_secs(10));
        assert_eq!(renew_after(0), Duration::from_millis(100));
    }
}
