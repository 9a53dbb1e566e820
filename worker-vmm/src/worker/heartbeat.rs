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

pub fn start(client: ServerClient, lease: LeaseHandle, expires_at_ms: i64) -> Heartbeat {
    let (tx, rx) = watch::channel(None);
    let (flag_tx, flag_rx) = watch::channel(false);
    let publish = move |stop: Stop| {
        let _ = tx.send(Some(stop));
        let _ = flag_tx.send(true);
    };
    let ttl_ms = (expires_at_ms - super::log_shipper::now_ms()).max(3000);
    let every = Duration::from_millis(u64::try_from(ttl_ms / 3).unwrap_or(1000));
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match client.heartbeat(&lease).await {
                Ok(answer) if answer.cancel => publish(Stop::Cancelled),
                Ok(_) => {}
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
