//! A generational arena: a `Vec` with a free list whose keys go stale when their entry is
//! removed, so that a late reference to a reused place finds nothing instead of the newcomer.
//! No key is ever issued twice: a place that has used all its generations is retired.

/// Names one entry of an [`Arena`]; stale once that entry is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    /// The key as one number (for heaps and messages).
    pub(crate) fn to_bits(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    /// The key that [`Key::to_bits`] turned into `bits`.
    pub(crate) fn from_bits(bits: u64) -> Key {
        Key { index: bits as u32, generation: (bits >> 32) as u32 }
    }
}

enum Place<T> {
    Occupied { generation: u32, value: T },
    Free { generation: u32, next_free: Option<u32> },
}

/// Entries of type `T` under stable, generation-checked keys.
pub(crate) struct Arena<T> {
    places: Vec<Place<T>>,
    first_free: Option<u32>,
    len: usize,
}

impl<T> Default for Arena<T> {
    fn default() -> Self {
        Arena { places: Vec::new(), first_free: None, len: 0 }
    }
}

impl<T> Arena<T> {
    /// Stores `value` and returns its key.
    pub(crate) fn insert(&mut self, value: T) -> Key {
        self.len += 1;
        match self.first_free {
            Some(index) => {
                let place = &mut self.places[index as usize];
                let Place::Free { generation, next_free } = *place else {
                    unreachable!("the free list names only free places")
                };
                self.first_free = next_free;
                // No overflow: a place that used the last generation is retired (`remove`).
                let generation = generation + 1;
                *place = Place::Occupied { generation, value };
                Key { index, generation }
            }
            None => {
                let index = u32::try_from(self.places.len()).expect("more than 2^32 entries");
                self.places.push(Place::Occupied { generation: 0, value });
                Key { index, generation: 0 }
            }
        }
    }

    /// The entry under `key`, unless it was removed.
    pub(crate) fn get(&self, key: Key) -> Option<&T> {
        match self.places.get(key.index as usize)? {
            Place::Occupied { generation, value } if *generation == key.generation => Some(value),
            _ => None,
        }
    }

    /// The entry under `key`, mutably, unless it was removed.
    pub(crate) fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        match self.places.get_mut(key.index as usize)? {
            Place::Occupied { generation, value } if *generation == key.generation => Some(value),
            _ => None,
        }
    }

    /// Removes and returns the entry under `key`, unless it was removed already.
    pub(crate) fn remove(&mut self, key: Key) -> Option<T> {
        self.get(key)?;
        let place = &mut self.places[key.index as usize];
        // A place whose generations are used up is retired, never reused: a wrapped generation
        // would make old keys of that place name the newcomer (a stale waker would wake an
        // unrelated wait). That costs one place per 2^32 entries it held.
        let retire = key.generation == u32::MAX;
        let next_free = if retire { None } else { self.first_free };
        let free = Place::Free { generation: key.generation, next_free };
        let Place::Occupied { value, .. } = std::mem::replace(place, free) else {
            unreachable!("checked above")
        };
        if !retire {
            self.first_free = Some(key.index);
        }
        self.len -= 1;
        Some(value)
    }

    /// The number of entries.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The keys and entries, mutably, in place order.
    fn entries_mut(&mut self) -> impl Iterator<Item = (Key, &mut T)> {
        self.places.iter_mut().enumerate().filter_map(|(index, place)| match place {
            Place::Occupied { generation, value } => {
                // No overflow: `insert` checks that every index fits in a `u32`.
                Some((Key { index: index as u32, generation: *generation }, value))
            }
            Place::Free { .. } => None,
        })
    }

    /// The keys of the entries for which `f` (which may change them) returns true.
    pub(crate) fn keys_where(&mut self, mut f: impl FnMut(&mut T) -> bool) -> Vec<Key> {
        self.entries_mut().filter_map(|(key, value)| f(value).then_some(key)).collect()
    }

    /// How many entries `f` returns true for.
    pub(crate) fn count_where(&self, mut f: impl FnMut(&T) -> bool) -> usize {
        self.places
            .iter()
            .filter(|place| matches!(place, Place::Occupied { value, .. } if f(value)))
            .count()
    }

    /// Removes and returns the entries for which `f` returns true.
    pub(crate) fn remove_where(&mut self, mut f: impl FnMut(&T) -> bool) -> Vec<T> {
        let keys = self.keys_where(|value| f(value));
        keys.into_iter().filter_map(|key| self.remove(key)).collect()
    }
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_removed_key_stays_stale_after_its_place_is_reused() {
        let mut arena = Arena::default();
        let a = arena.insert("a");
        let b = arena.insert("b");
        assert_eq!(arena.remove(a), Some("a"));
        assert_eq!(arena.remove(a), None);
        let c = arena.insert("c");
        assert_eq!(arena.get(a), None, "the place was reused, the old key is stale");
        assert_eq!(arena.get(c), Some(&"c"));
        assert_eq!(arena.get(b), Some(&"b"));
        assert_eq!(arena.len(), 2);
        *arena.get_mut(b).unwrap() = "B";
        assert_eq!(arena.remove(b), Some("B"));
        assert_eq!(arena.len(), 1);
    }

    #[test]
    fn a_key_stays_stale_when_its_place_has_used_every_generation() {
        let mut arena = Arena::default();
        let first = arena.insert("first");
        arena.remove(first);
        // Stand in for 2^32 - 1 more insert/remove rounds on this place (a hot coroutine
        // waits again and again in the same place): the place has reached the last generation.
        arena.places[first.index as usize] =
            Place::Free { generation: u32::MAX - 1, next_free: None };
        let last = arena.insert("last");
        assert_eq!(last.generation, u32::MAX);
        arena.remove(last);
        let next = arena.insert("next");
        assert_ne!(next, first, "a key was issued twice");
        assert_eq!(arena.get(first), None, "a stale key names a newer entry");
        assert_eq!(arena.get(next), Some(&"next"));
    }
}
