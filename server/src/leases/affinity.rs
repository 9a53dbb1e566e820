//! Cache affinity: a queued job with `[[caches]]` is left, for at most [`WAIT`] after it was
//! queued, to a worker that holds all of them, when one is asking for work and the worker
//! asking now lacks one. Workers name the caches they hold in each lease request; the server
//! keeps the last of each in memory (a replica knows the workers that ask it).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmfarm_proto::names::{NameKind, check_name};
use vmfarm_proto::wire::{HeldCache, LeaseRequest};

/// How long a job with caches may wait for a worker that holds them.
pub const WAIT: Duration = Duration::from_secs(30);

/// A worker that asked for work this recently has a free slot (a worker asks only with one,
/// and a long-polling worker asks again and again).
const ASKING: Duration = Duration::from_secs(5);

/// Most queued jobs with caches looked at by one lease.
pub const LOOKED_AT: usize = 64;

/// What each worker said in its last lease request.
#[derive(Debug, Default)]
pub struct Holders(Mutex<HashMap<String, Holder>>);

#[derive(Debug)]
struct Holder {
    /// When it last asked for work with a free slot; `None` once it took its last.
    asked: Option<Instant>,
    images: HashSet<String>,
    caches: HashSet<HeldCache>,
}

/// A queued job with caches, as the lease reads it.
#[derive(Debug)]
pub struct QueuedWithCaches {
    pub owner: String,
    pub image: String,
    /// Its caches' names, space-separated.
    pub caches: String,
}

impl QueuedWithCaches {
    fn held(&self) -> impl Iterator<Item = HeldCache> + '_ {
        self.caches.split_whitespace().map(|name| HeldCache {
            owner: self.owner.clone(),
            image: self.image.clone(),
            name: name.to_owned(),
        })
    }
}

impl Holders {
    /// Notes what `req`'s worker holds, asking now. A cache no job could name (a folder the
    /// worker has that the server's rules refuse) is left out: it can match no job.
    pub fn record(&self, req: &LeaseRequest, now: Instant) {
        let holder = Holder {
            asked: Some(now),
            images: req.images.iter().map(|i| i.name.clone()).collect(),
            caches: req.caches.iter().filter(|c| nameable(c)).cloned().collect(),
        };
        self.lock().insert(req.name.clone(), holder);
    }

    /// `worker` took a job with its last free slot: it is not waited for until it asks again.
    pub fn busy(&self, worker: &str) {
        if let Some(holder) = self.lock().get_mut(worker) {
            holder.asked = None;
        }
    }

    /// Whether another worker than `asking` holds a cache and asked for work lately: else no
    /// job need wait, and the lease looks at none.
    pub fn others_hold_caches(&self, asking: &str, now: Instant) -> bool {
        self.lock().iter().any(|(name, holder)| {
            name != asking && !holder.caches.is_empty() && asking_lately(holder, now)
        })
    }

    /// Whether `job` is left to another worker: `asking` lacks one of its caches, and another
    /// worker that runs its image, holds them all and asked for work lately could take it.
    pub fn leave_to_another(&self, asking: &str, job: &QueuedWithCaches, now: Instant) -> bool {
        let holders = self.lock();
        let holds_all = |holder: &Holder| job.held().all(|c| holder.caches.contains(&c));
        if holders.get(asking).is_some_and(holds_all) {
            return false;
        }
        holders.iter().any(|(name, holder)| {
            name != asking
                && asking_lately(holder, now)
                && holder.images.contains(&job.image)
                && holds_all(holder)
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Holder>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn asking_lately(holder: &Holder, now: Instant) -> bool {
    holder.asked.is_some_and(|asked| now - asked < ASKING)
}

/// Whether a job could name `cache`: its owner, image and name pass the server's rules.
fn nameable(cache: &HeldCache) -> bool {
    crate::users::check_name(&cache.owner).is_ok()
        && check_name(NameKind::Image, &cache.image).is_ok()
        && check_name(NameKind::Cache, &cache.name).is_ok()
}

/// The queued jobs of images `$2`... with caches, queued since `$1` (ms), oldest first.
pub fn waiting_sql(images: usize) -> String {
    let images: Vec<String> = (0..images).map(|i| format!("${}", i + 2)).collect();
    format!(
        "SELECT id, owner, image, caches FROM jobs WHERE state = 'queued' AND caches <> '' \
         AND created_at > $1 AND image IN ({}) ORDER BY created_at LIMIT {LOOKED_AT}",
        images.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmfarm_proto::wire::WorkerImage;

    fn request(name: &str, caches: &[(&str, &str, &str)]) -> LeaseRequest {
        LeaseRequest {
            name: name.into(),
            images: vec![WorkerImage {
                name: "tiny".into(),
                version: "1".into(),
            }],
            slots: 1,
            version: "test".into(),
            cache: Default::default(),
            caches: caches
                .iter()
                .map(|(owner, image, name)| HeldCache {
                    owner: (*owner).into(),
                    image: (*image).into(),
                    name: (*name).into(),
                })
                .collect(),
        }
    }

    fn job(owner: &str, caches: &str) -> QueuedWithCaches {
        QueuedWithCaches {
            owner: owner.into(),
            image: "tiny".into(),
            caches: caches.into(),
        }
    }

    #[test]
    fn test_a_job_waits_only_for_a_worker_that_holds_all_its_caches_and_asks() {
        let holders = Holders::default();
        let now = Instant::now();
        holders.record(
            &request("w1", &[("alice", "tiny", "pip"), ("alice", "tiny", "cc")]),
            now,
        );
        holders.record(&request("w2", &[]), now);
        assert!(holders.others_hold_caches("w2", now));
        assert!(!holders.others_hold_caches("w1", now), "only w1 holds any");
        assert!(holders.leave_to_another("w2", &job("alice", "pip cc"), now));
        assert!(
            !holders.leave_to_another("w1", &job("alice", "pip cc"), now),
            "w1 takes it"
        );
        assert!(
            !holders.leave_to_another("w2", &job("alice", "pip other"), now),
            "nobody holds all: the first to ask takes it"
        );
        assert!(
            !holders.leave_to_another("w2", &job("bob", "pip"), now),
            "caches are per owner"
        );
        let later = now + ASKING;
        assert!(
            !holders.leave_to_another("w2", &job("alice", "pip"), later),
            "a holder that stopped asking is busy: the job does not wait for it"
        );
        assert!(!holders.others_hold_caches("w2", later));
        holders.record(&request("w1", &[("alice", "tiny", "pip")]), now);
        holders.busy("w1");
        assert!(
            !holders.leave_to_another("w2", &job("alice", "pip"), now),
            "a holder that took its last free slot is not waited for"
        );
        holders.record(
            &request(
                "w1",
                &[("alice", "tiny", "Bad Name"), ("al ice", "tiny", "pip")],
            ),
            now,
        );
        assert!(
            !holders.others_hold_caches("w2", now),
            "names no job could give are left out"
        );
    }
}
