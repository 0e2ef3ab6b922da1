//! A bounded cache of L2 tables, evicting the least recently used (QEMU's `l2_table_cache`).
//! Tables changed by writes are dirty until written back; the driver writes a dirty table
//! back (after the refcounts it depends on) before it is evicted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::offsets::HostOffset;

/// L2 tables by their host offset, decoded to native-endian entries. At most `capacity`.
pub(crate) struct L2Cache {
    capacity: usize,
    /// Increases with every use; the smallest live stamp is the least recently used.
    clock: u64,
    tables: HashMap<HostOffset, (u64, Arc<[u64]>)>,
    /// Tables changed since they were last written.
    dirty: BTreeSet<HostOffset>,
    /// Stamp -> table, for finding the least recently used.
    by_age: BTreeMap<u64, HostOffset>,
}

impl L2Cache {
    /// An empty cache of at most `capacity` tables (at least one).
    pub(crate) fn new(capacity: usize) -> L2Cache {
        L2Cache {
            capacity: capacity.max(1),
            clock: 0,
            tables: HashMap::new(),
            dirty: BTreeSet::new(),
            by_age: BTreeMap::new(),
        }
    }

    /// The table at `offset`, marked as just used.
    pub(crate) fn get(&mut self, offset: HostOffset) -> Option<Arc<[u64]>> {
        self.clock += 1;
        let (stamp, table) = self.tables.get_mut(&offset)?;
        self.by_age.remove(stamp);
        *stamp = self.clock;
        self.by_age.insert(self.clock, offset);
        Some(table.clone())
    }

    /// The table that the next insertion of a new table would evict, if it is dirty: the
    /// caller writes it back and marks it clean first.
    pub(crate) fn dirty_victim(&self, offset: HostOffset) -> Option<(HostOffset, Arc<[u64]>)> {
        if self.tables.len() < self.capacity || self.tables.contains_key(&offset) {
            return None;
        }
        let (_, oldest) = self.by_age.first_key_value()?;
        self.dirty.contains(oldest).then(|| (*oldest, self.tables[oldest].1.clone()))
    }

    /// The dirty tables.
    pub(crate) fn dirty(&self) -> Vec<(HostOffset, Arc<[u64]>)> {
        self.dirty.iter().map(|offset| (*offset, self.tables[offset].1.clone())).collect()
    }

    /// Records that the table at `offset` was written back.
    pub(crate) fn mark_clean(&mut self, offset: HostOffset) {
        self.dirty.remove(&offset);
    }

    /// The cached table at `offset`, to change in place, marked as just used and dirty until
    /// written. It is copied only if a reader still holds the old version.
    pub(crate) fn get_mut(&mut self, offset: HostOffset) -> Option<&mut [u64]> {
        self.get(offset)?;
        self.dirty.insert(offset);
        self.tables.get_mut(&offset).map(|(_, table)| Arc::make_mut(table))
    }

    /// Replaces (or adds) the table at `offset` with a changed one, dirty until written.
    pub(crate) fn update(&mut self, offset: HostOffset, table: Arc<[u64]>) {
        self.insert(offset, table);
        self.dirty.insert(offset);
    }

    /// Adds the table at `offset`, evicting the least recently used one when full (which
    /// must be clean: see [`L2Cache::dirty_victim`]).
    pub(crate) fn insert(&mut self, offset: HostOffset, table: Arc<[u64]>) {
        self.clock += 1;
        if let Some((stamp, _)) = self.tables.remove(&offset) {
            self.by_age.remove(&stamp);
        }
        if self.tables.len() >= self.capacity
            && let Some((_, oldest)) = self.by_age.pop_first()
        {
            self.tables.remove(&oldest);
            debug_assert!(!self.dirty.contains(&oldest), "qcow2: evicted a dirty L2 table");
            self.dirty.remove(&oldest);
        }
        self.tables.insert(offset, (self.clock, table));
        self.by_age.insert(self.clock, offset);
    }

    /// The number of cached tables.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut cache = L2Cache::new(2);
        let table = |n: u64| -> Arc<[u64]> { vec![n].into() };
        cache.insert(HostOffset(1), table(1));
        cache.insert(HostOffset(2), table(2));
        assert_eq!(cache.get(HostOffset(1)).unwrap()[0], 1);
        cache.insert(HostOffset(3), table(3));
        assert!(cache.get(HostOffset(2)).is_none());
        assert!(cache.get(HostOffset(1)).is_some());
        assert!(cache.get(HostOffset(3)).is_some());
        assert_eq!(cache.len(), 2);
        cache.insert(HostOffset(3), table(33));
        assert_eq!(cache.get(HostOffset(3)).unwrap()[0], 33);
        assert_eq!(cache.len(), 2);
    }
}
