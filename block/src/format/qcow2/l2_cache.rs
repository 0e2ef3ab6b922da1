//! A bounded cache of L2 tables, evicting the least recently used (QEMU's `l2_table_cache`).
//! Tables changed by writes are dirty until written back; the driver writes a dirty table
//! back (after the refcounts it depends on) before it is evicted.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::offsets::HostOffset;

/// A cached table and its neighbours in the order of use.
struct Slot {
    offset: HostOffset,
    table: Arc<[u64]>,
    /// The slot used just before this one; `None` for the least recently used.
    older: Option<usize>,
    /// The slot used just after this one; `None` for the most recently used.
    newer: Option<usize>,
}

/// L2 tables by their host offset, decoded to native-endian entries. At most `capacity`.
///
/// The order of use is a list linked through the slots, so that a hit moves its table to the
/// front without allocating or rebalancing anything, and the least recently used table is
/// at the other end.
pub(crate) struct L2Cache {
    capacity: usize,
    /// The slot of each cached table.
    slot_of: HashMap<HostOffset, usize>,
    /// The cached tables, in no order (a slot is reused when its table is evicted).
    slots: Vec<Slot>,
    /// The least recently used slot, `None` when empty.
    oldest: Option<usize>,
    /// The most recently used slot, `None` when empty.
    newest: Option<usize>,
    /// Tables changed since they were last written.
    dirty: BTreeSet<HostOffset>,
}

impl L2Cache {
    /// An empty cache of at most `capacity` tables (at least one).
    pub(crate) fn new(capacity: usize) -> L2Cache {
        L2Cache {
            capacity: capacity.max(1),
            slot_of: HashMap::new(),
            slots: Vec::new(),
            oldest: None,
            newest: None,
            dirty: BTreeSet::new(),
        }
    }

    /// The table at `offset`, marked as just used.
    pub(crate) fn get(&mut self, offset: HostOffset) -> Option<Arc<[u64]>> {
        let slot = *self.slot_of.get(&offset)?;
        self.mark_used(slot);
        Some(self.slots[slot].table.clone())
    }

    /// The table that the next insertion of a new table would evict, if it is dirty: the
    /// caller writes it back and marks it clean first.
    pub(crate) fn dirty_victim(&self, offset: HostOffset) -> Option<(HostOffset, Arc<[u64]>)> {
        if self.slot_of.len() < self.capacity || self.slot_of.contains_key(&offset) {
            return None;
        }
        let oldest = &self.slots[self.oldest?];
        self.dirty.contains(&oldest.offset).then(|| (oldest.offset, oldest.table.clone()))
    }

    /// The dirty tables.
    pub(crate) fn dirty(&self) -> Vec<(HostOffset, Arc<[u64]>)> {
        self.dirty
            .iter()
            .map(|offset| (*offset, self.slots[self.slot_of[offset]].table.clone()))
            .collect()
    }

    /// Records that the table at `offset` was written back.
    pub(crate) fn mark_clean(&mut self, offset: HostOffset) {
        self.dirty.remove(&offset);
    }

    /// The cached table at `offset`, to change in place, marked as just used and dirty until
    /// written. It is copied only if a reader still holds the old version.
    pub(crate) fn get_mut(&mut self, offset: HostOffset) -> Option<&mut [u64]> {
        let slot = *self.slot_of.get(&offset)?;
        self.mark_used(slot);
        self.dirty.insert(offset);
        Some(Arc::make_mut(&mut self.slots[slot].table))
    }

    /// Adds the table at `offset` (replacing the cached one, if any) as just used, evicting
    /// the least recently used one when full (which must be clean: see
    /// [`L2Cache::dirty_victim`]).
    pub(crate) fn insert(&mut self, offset: HostOffset, table: Arc<[u64]>) {
        if let Some(&slot) = self.slot_of.get(&offset) {
            self.slots[slot].table = table;
            self.mark_used(slot);
            return;
        }
        let fresh = Slot { offset, table, older: None, newer: None };
        let slot = match self.oldest {
            Some(oldest) if self.slot_of.len() >= self.capacity => {
                self.unlink(oldest);
                let evicted = self.slots[oldest].offset;
                self.slot_of.remove(&evicted);
                debug_assert!(!self.dirty.contains(&evicted), "qcow2: evicted a dirty L2 table");
                self.dirty.remove(&evicted);
                self.slots[oldest] = fresh;
                oldest
            }
            _ => {
                self.slots.push(fresh);
                self.slots.len() - 1
            }
        };
        self.slot_of.insert(offset, slot);
        self.push_newest(slot);
    }

    /// Moves `slot` to the most recently used end of the list.
    fn mark_used(&mut self, slot: usize) {
        if self.newest != Some(slot) {
            self.unlink(slot);
            self.push_newest(slot);
        }
    }

    /// Takes `slot` out of the list (its own links are left for the caller to set).
    fn unlink(&mut self, slot: usize) {
        let (older, newer) = (self.slots[slot].older, self.slots[slot].newer);
        match older {
            Some(older) => self.slots[older].newer = newer,
            None => self.oldest = newer,
        }
        match newer {
            Some(newer) => self.slots[newer].older = older,
            None => self.newest = older,
        }
    }

    /// Links `slot`, which is in no list, in as the most recently used.
    fn push_newest(&mut self, slot: usize) {
        self.slots[slot].older = self.newest;
        self.slots[slot].newer = None;
        match self.newest {
            Some(newest) => self.slots[newest].newer = Some(slot),
            None => self.oldest = Some(slot),
        }
        self.newest = Some(slot);
    }

    /// The number of cached tables.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slot_of.len()
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

    #[test]
    fn keeps_the_order_of_use_of_a_plain_list() {
        // A list of offsets, most recently used last, is the model; gets, inserts and
        // changes in a fixed pseudo-random order must leave the same tables cached.
        let mut cache = L2Cache::new(5);
        let mut model: Vec<u64> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for step in 0..2000u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let offset = seed % 9;
            let cached = model.iter().position(|&o| o == offset);
            match seed >> 60 {
                0..=7 => assert_eq!(cache.get(HostOffset(offset)).is_some(), cached.is_some()),
                8..=9 => {
                    let changed = cache.get_mut(HostOffset(offset)).map(|t| t[0] = step);
                    assert_eq!(changed.is_some(), cached.is_some());
                    cache.mark_clean(HostOffset(offset));
                }
                _ => {
                    cache.insert(HostOffset(offset), vec![step].into());
                    if cached.is_none() && model.len() == 5 {
                        model.remove(0);
                    }
                }
            }
            if let Some(at) = model.iter().position(|&o| o == offset) {
                model.remove(at);
                model.push(offset);
            } else if seed >> 60 >= 10 {
                model.push(offset);
            }
            for o in 0..9 {
                assert_eq!(cache.slot_of.contains_key(&HostOffset(o)), model.contains(&o));
            }
            let oldest = cache.oldest.map(|slot| cache.slots[slot].offset.0);
            assert_eq!(oldest, model.first().copied(), "step {step}");
        }
    }
}
