//! The cache's entries in order of use, for least-recently-used eviction.

use std::collections::{BTreeMap, HashMap};

/// The entries in use order: `used` is a logical clock, larger is more recent.
#[derive(Default)]
pub(super) struct Index {
    pub(super) entries: HashMap<String, Slot>,
    by_use: BTreeMap<u64, String>,
    pub(super) total: u64,
    clock: u64,
}

pub(super) struct Slot {
    size: u64,
    used: u64,
}

impl Index {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The entry's size, marking it used now.
    pub(super) fn touch(&mut self, id: &str) -> Option<u64> {
        let used = self.tick();
        let slot = self.entries.get_mut(id)?;
        self.by_use.remove(&slot.used);
        slot.used = used;
        self.by_use.insert(used, id.to_owned());
        Some(slot.size)
    }

    pub(super) fn insert(&mut self, id: &str, size: u64) {
        self.remove(id);
        let used = self.tick();
        self.entries.insert(id.to_owned(), Slot { size, used });
        self.by_use.insert(used, id.to_owned());
        self.total += size;
    }

    pub(super) fn remove(&mut self, id: &str) {
        if let Some(old) = self.entries.remove(id) {
            self.by_use.remove(&old.used);
            self.total -= old.size;
        }
    }

    /// Removes the least recently used entries until the total fits `max`; returns their ids.
    pub(super) fn evict_to(&mut self, max: u64) -> Vec<String> {
        let mut evicted = Vec::new();
        while self.total > max {
            let Some((_, id)) = self.by_use.pop_first() else {
                break;
            };
            if let Some(slot) = self.entries.remove(&id) {
                self.total -= slot.size;
            }
            evicted.push(id);
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_eviction_takes_the_least_recently_used_first() {
        let mut index = Index::default();
        index.insert("a", 10);
        index.insert("b", 10);
        index.insert("c", 10);
        assert_eq!(index.touch("a"), Some(10));
        assert_eq!(index.touch("x"), None);
        index.insert("b", 15);
        assert_eq!(index.total, 35);
        assert_eq!(index.evict_to(25), ["c"]);
        assert_eq!(index.evict_to(0), ["a", "b"]);
        assert_eq!((index.total, index.entries.len()), (0, 0));
    }
}
