//! The vCPUs and memory the running guests share (the worker's slots).

use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub struct Budget {
    total: (u32, u64),
    used: Mutex<(u32, u64)>,
    freed: Notify,
}

/// A share of the budget, given back when dropped.
pub struct Share {
    budget: Arc<Budget>,
    size: (u32, u64),
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Ok(mut used) = self.budget.used.lock() {
            used.0 -= self.size.0;
            used.1 -= self.size.1;
        }
        self.budget.freed.notify_waiters();
    }
}

impl Budget {
    pub fn new(cpus: u32, memory_mib: u64) -> Budget {
        Budget {
            total: (cpus, memory_mib),
            used: Mutex::new((0, 0)),
            freed: Notify::new(),
        }
    }

    /// The vCPUs and memory (MiB) in all, and those taken now.
    pub fn sizes(&self) -> ((u32, u64), (u32, u64)) {
        let used = self.used.lock().map(|u| *u).unwrap_or(self.total);
        (self.total, used)
    }

    /// Whether a job of `size` could ever run here.
    pub fn fits_at_all(&self, size: (u32, u64)) -> bool {
        size.0 <= self.total.0 && size.1 <= self.total.1
    }

    /// How many jobs of `size` fit in what is free now.
    pub fn free_slots(&self, size: (u32, u64)) -> u32 {
        let (_, used) = self.sizes();
        let cpus = (self.total.0 - used.0) / size.0.max(1);
        let mem = (self.total.1 - used.1) / size.1.max(1);
        cpus.min(u32::try_from(mem).unwrap_or(u32::MAX))
    }

    fn try_take(&self, size: (u32, u64)) -> bool {
        let Ok(mut used) = self.used.lock() else {
            return false;
        };
        if used.0 + size.0 <= self.total.0 && used.1 + size.1 <= self.total.1 {
            used.0 += size.0;
            used.1 += size.1;
            return true;
        }
        false
    }

    /// Waits until `size` is free and takes it. The caller checked `fits_at_all`.
    pub async fn take(self: &Arc<Self>, size: (u32, u64)) -> Share {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_take(size) {
                return Share {
                    budget: self.clone(),
                    size,
                };
            }
            freed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_shares_wait_for_each_other() {
        let budget = Arc::new(Budget::new(2, 2048));
        assert_eq!(budget.free_slots((1, 1024)), 2);
        let a = budget.take((1, 1024)).await;
        let b = budget.take((1, 1024)).await;
        assert_eq!(budget.free_slots((1, 1024)), 0);
        assert!(!budget.fits_at_all((3, 10)));
        let waiter = async { budget.take((2, 2048)).await };
        tokio::pin!(waiter);
        assert!(futures_util::poll!(&mut waiter).is_pending());
        drop(a);
        assert!(futures_util::poll!(&mut waiter).is_pending());
        drop(b);
        let _whole = waiter.await;
        assert_eq!(budget.free_slots((1, 1)), 0);
    }
}
