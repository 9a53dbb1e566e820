//! `vmfarm ssh` sessions through the server ([`vmfarm_proto::tunnel`]): a user asks for a
//! session to a job's guest; the job's worker, which long-polls for them (it only ever makes
//! outbound connections), opens its own upgraded connection for it; the server joins the two.
//! This registry is in the server's memory: the user and the worker must reach the same server
//! process (with replicas, route `/api/jobs/*/ssh` and `/api/leases/*/tunnels*` to one).

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};

/// One end of a session: an upgraded HTTP connection.
pub type Stream = TokioIo<Upgraded>;

/// Sessions of one job that may wait for its worker at once.
pub const MAX_WAITING: usize = 8;

/// How long a job's guest counts as reachable after its worker's last poll.
pub const POLLED_WITHIN: Duration = Duration::from_secs(45);

#[derive(Default)]
pub struct Tunnels {
    jobs: Mutex<HashMap<i64, JobTunnels>>,
}

#[derive(Default)]
struct JobTunnels {
    /// Sessions asked for and not yet taken by the worker: where the worker's end goes.
    waiting: HashMap<String, oneshot::Sender<Stream>>,
    /// Those already told to the worker.
    told: HashSet<String>,
    asked: Arc<Notify>,
    /// The worker's last poll: its guest is there.
    polled: Option<Instant>,
}

impl Tunnels {
    fn with<T>(&self, job: i64, f: impl FnOnce(&mut JobTunnels) -> T) -> T {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        // Forget the jobs nobody asks of and no worker polls for any more.
        jobs.retain(|_, t| {
            !t.waiting.is_empty() || t.polled.is_some_and(|p| p.elapsed() < POLLED_WITHIN)
        });
        f(jobs.entry(job).or_default())
    }

    /// Asks for a session to `job`'s guest: where the worker's end arrives; `None` when
    /// [`MAX_WAITING`] sessions of the job wait already.
    pub fn ask(&self, job: i64, id: String) -> Option<oneshot::Receiver<Stream>> {
        let (send, receive) = oneshot::channel();
        self.with(job, |t| {
            if t.waiting.len() >= MAX_WAITING {
                return None;
            }
            t.waiting.insert(id, send);
            t.asked.notify_one();
            Some(receive)
        })
    }

    /// Drops a session that was asked for and never taken.
    pub fn forget(&self, job: i64, id: &str) {
        self.with(job, |t| {
            t.waiting.remove(id);
            t.told.remove(id);
        });
    }

    /// The worker's poll: waits up to `wait` for sessions asked of `job`, and returns those it
    /// was not told of yet.
    pub async fn poll(&self, job: i64, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        loop {
            let (new, asked) = self.with(job, |t| {
                t.polled = Some(Instant::now());
                let new: Vec<String> = t
                    .waiting
                    .keys()
                    .filter(|id| !t.told.contains(*id))
                    .cloned()
                    .collect();
                t.told.extend(new.iter().cloned());
                (new, t.asked.clone())
            });
            let left = deadline.saturating_duration_since(Instant::now());
            if !new.is_empty() || left.is_zero() {
                return new;
            }
            let _ = tokio::time::timeout(left, asked.notified()).await;
        }
    }

    /// Where the worker's end of session `id` of `job` goes, once.
    pub fn take(&self, job: i64, id: &str) -> Option<oneshot::Sender<Stream>> {
        self.with(job, |t| {
            t.told.remove(id);
            t.waiting.remove(id)
        })
    }

    /// The worker let `job`'s guest go: no session reaches it any more, and those waiting end.
    pub fn gone(&self, job: i64) {
        self.with(job, |t| {
            t.polled = None;
            t.waiting.clear();
            t.told.clear();
        });
    }

    /// Whether `job`'s worker polled lately: its guest is still there to be reached.
    pub fn reachable(&self, job: i64) -> bool {
        self.with(job, |t| {
            t.polled.is_some_and(|p| p.elapsed() < POLLED_WITHIN)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_a_jobs_sessions_wait_for_its_worker_up_to_a_limit_and_are_told_once() {
        let tunnels = Tunnels::default();
        let waiting: Vec<_> = (0..MAX_WAITING)
            .map(|i| tunnels.ask(7, format!("s{i}")).expect("room for it"))
            .collect();
        assert!(tunnels.ask(7, "one too many".into()).is_none());
        assert!(tunnels.ask(8, "another job's".into()).is_some());
        let told = tunnels.poll(7, Duration::from_millis(10)).await;
        assert_eq!(told.len(), MAX_WAITING);
        assert!(
            tunnels.poll(7, Duration::from_millis(10)).await.is_empty(),
            "told once"
        );
        assert!(tunnels.reachable(7), "its worker polled");
        assert!(tunnels.take(7, "s0").is_some());
        assert!(tunnels.take(7, "s0").is_none(), "taken once");
        tunnels.gone(7);
        assert!(!tunnels.reachable(7));
        drop(waiting);
    }
}
