//! The flow table: flows in a slab, named by slot and generation (so a completion or
//! timer meant for a flow that has since ended, and whose slot was reused, is told
//! apart), and found by their key.

use std::collections::HashMap;
use std::hash::Hash;

use slab::Slab;

use crate::uring::token::GENERATION_MASK;

/// A flow's name: its slot and the generation it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id {
    pub slot: u32,
    pub generation: u32,
}

struct Entry<K, T> {
    generation: u32,
    key: K,
    value: T,
}

/// Flows by id and by key.
pub struct Table<K, T> {
    slots: Slab<Entry<K, T>>,
    by_key: HashMap<K, u32>,
    next_generation: u32,
    /// Most flows at once since the last `shrink`.
    high_water: usize,
}

impl<K: Copy + Eq + Hash, T> Default for Table<K, T> {
    fn default() -> Self {
        Table {
            slots: Slab::new(),
            by_key: HashMap::new(),
            next_generation: 0,
            high_water: 0,
        }
    }
}

impl<K: Copy + Eq + Hash, T> Table<K, T> {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Adds a flow for `key`, which must not have one; its id names it from now on.
    pub fn insert(&mut self, key: K, value: T) -> Id {
        let generation = self.next_generation & GENERATION_MASK;
        self.next_generation = generation.wrapping_add(1);
        let slot = self.slots.insert(Entry {
            generation,
            key,
            value,
        }) as u32;
        let replaced = self.by_key.insert(key, slot);
        debug_assert!(replaced.is_none(), "two flows for one key");
        self.high_water = self.high_water.max(self.slots.len());
        Id { slot, generation }
    }

    /// The flow with `key`, if any.
    pub fn find(&self, key: &K) -> Option<Id> {
        let &slot = self.by_key.get(key)?;
        let entry = &self.slots[slot as usize];
        Some(Id {
            slot,
            generation: entry.generation,
        })
    }

    /// Stops `id` from being found by its key (it stays until removed): a new flow may
    /// then take the key while the old one winds down.
    pub fn forget_key(&mut self, id: Id) {
        if let Some(entry) = self.entry(id)
            && self.by_key.get(&entry.key) == Some(&id.slot)
        {
            let key = entry.key;
            self.by_key.remove(&key);
        }
    }

    /// No flow is in a slot at or past this (for walking the slots a slice at a time).
    pub fn slot_end(&self) -> u32 {
        self.slots.capacity() as u32
    }

    /// The id of the flow in `slot`, if there is one.
    pub fn id_at(&self, slot: u32) -> Option<Id> {
        let entry = self.slots.get(slot as usize)?;
        Some(Id {
            slot,
            generation: entry.generation,
        })
    }

    fn entry(&self, id: Id) -> Option<&Entry<K, T>> {
        self.slots
            .get(id.slot as usize)
            .filter(|entry| entry.generation == id.generation)
    }

    pub fn get(&self, id: Id) -> Option<&T> {
        self.entry(id).map(|entry| &entry.value)
    }

    pub fn get_mut(&mut self, id: Id) -> Option<&mut T> {
        self.slots
            .get_mut(id.slot as usize)
            .filter(|entry| entry.generation == id.generation)
            .map(|entry| &mut entry.value)
    }

    pub fn remove(&mut self, id: Id) -> Option<T> {
        self.entry(id)?;
        let entry = self.slots.remove(id.slot as usize);
        if self.by_key.get(&entry.key) == Some(&id.slot) {
            self.by_key.remove(&entry.key);
        }
        Some(entry.value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (Id, &T)> {
        self.slots.iter().map(|(slot, entry)| {
            (
                Id {
                    slot: slot as u32,
                    generation: entry.generation,
                },
                &entry.value,
            )
        })
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Id, &mut T)> {
        self.slots.iter_mut().map(|(slot, entry)| {
            (
                Id {
                    slot: slot as u32,
                    generation: entry.generation,
                },
                &mut entry.value,
            )
        })
    }

    /// Flows closed since the most that were open (since the last `shrink`).
    pub fn closed_since_peak(&self) -> usize {
        self.high_water - self.slots.len()
    }

    /// Gives spare room back after a peak (the key map's, and the slab's past its last
    /// flow), and starts a new peak.
    pub fn shrink(&mut self) {
        self.by_key.shrink_to_fit();
        self.slots.shrink_to_fit();
        self.high_water = self.slots.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_slot_does_not_answer_to_the_old_id() {
        let mut table: Table<u16, &str> = Table::default();
        let first = table.insert(1, "first");
        assert_eq!(table.find(&1), Some(first));
        assert_eq!(table.remove(first), Some("first"));
        let second = table.insert(2, "second");
        assert_eq!(second.slot, first.slot, "the slot is reused");
        assert_eq!(table.get(first), None, "but not by the old id");
        assert_eq!(table.get(second), Some(&"second"));
        assert_eq!(table.find(&1), None);
        assert_eq!(table.remove(first), None);
    }

    #[test]
    fn generations_wrap_at_24_bits() {
        let mut table: Table<u32, ()> = Table {
            next_generation: GENERATION_MASK,
            ..Table::default()
        };
        let last = table.insert(1, ());
        let wrapped = table.insert(2, ());
        assert_eq!(last.generation, GENERATION_MASK);
        assert_eq!(wrapped.generation, 0);
    }

    #[test]
    fn a_forgotten_key_can_be_taken_by_a_new_flow() {
        let mut table: Table<u8, u8> = Table::default();
        let old = table.insert(7, 1);
        table.forget_key(old);
        assert_eq!(table.find(&7), None);
        let new = table.insert(7, 2);
        assert_eq!(table.find(&7), Some(new));
        table.remove(old);
        assert_eq!(
            table.find(&7),
            Some(new),
            "removing the old one keeps the new key"
        );
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn the_peak_is_tracked_until_shrunk() {
        let mut table: Table<u32, ()> = Table::default();
        let ids: Vec<Id> = (0..10).map(|k| table.insert(k, ())).collect();
        for id in &ids[..7] {
            table.remove(*id);
        }
        assert_eq!(table.closed_since_peak(), 7);
        table.shrink();
        assert_eq!(table.closed_since_peak(), 0);
    }
}
