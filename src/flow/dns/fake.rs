//! The fake-IP table: names and the addresses handed out for them, one IPv4 and one
//! IPv6 address per name, bounded, with O(1) lookups both ways and no allocation once
//! every entry has been used.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{Ipv4Cidr, Ipv6Cidr};

use crate::flow::lru::Lru;
use crate::wire::dns::MAX_TEXT;

/// How long an entry stays unused before it can go to another name: an address handed
/// out with a TTL of 1 s is connected to right after the answer, and a client that
/// caches a little longer than the TTL still finds its name.
pub const MIN_IDLE: Duration = Duration::from_secs(2);
/// No entry in the index; no slot of the long-name pool.
const EMPTY: u32 = u32::MAX;
/// Bytes of a name kept in its entry's own slot of the arena: nearly every name in use
/// is shorter, and a slot sized for the longest (253 bytes) would quadruple the table.
const SHORT: usize = 64;
/// Entries per slot of the pool that holds longer names.
const LONG_SHARE: usize = 16;

/// One name and its two addresses (given by its slot number).
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// When it was last answered.
    used: Instant,
    /// The name's hash, to find its place in the index and skip most comparisons.
    hash: u32,
    /// Live flows to one of its addresses: while any, the entry is not reused.
    holds: u32,
    /// Bytes of its name.
    len: u8,
    /// Its slot in the long-name pool if its name is longer than `SHORT`, else `EMPTY`.
    long: u32,
}

/// What a table counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Names in the table.
    pub size: u64,
    /// Entries given to another name.
    pub evictions: u64,
    /// New names refused because every entry was held or recently used.
    pub full: u64,
}

/// Names mapped to fake addresses: slot `i` stands for the `i`-th usable host address
/// of the IPv4 range and the address at the same offset in the IPv6 range, so both
/// lookups by address are arithmetic; lookups by name go through an open-addressing
/// index keyed with SipHash (names come from clients, and web pages choose names).
pub struct FakeTable {
    /// The ranges' first addresses.
    v4: u32,
    v6: u128,
    v4_prefix: u8,
    v6_prefix: u8,
    /// Host offsets (in the IPv4 range's host space) never handed out, ascending.
    excluded: Vec<u32>,
    /// Offsets of the IPv4 range: the network and broadcast-like offsets are skipped.
    span: u32,
    capacity: u32,
    entries: Vec<Entry>,
    /// The names' text, `SHORT` bytes per slot: zero pages until written, so what is
    /// resident grows with the entries used.
    names: Vec<u8>,
    /// Longer names, `MAX_TEXT` bytes per slot, one slot per `LONG_SHARE` entries, and
    /// the slots free. When none is, a long name takes the place of the least recently
    /// used long name: long names (some chosen by web pages) cannot crowd out the rest.
    long_names: Vec<u8>,
    long_free: Vec<u32>,
    /// Entries no flow holds with a name in the pool, least recently used first.
    long_lru: Lru,
    /// Slots by name hash, linear probing, at most half full.
    index: Vec<u32>,
    /// Entries no flow holds, least recently used first.
    lru: Lru,
    hasher: RandomState,
    counters: Counters,
}

impl FakeTable {
    /// A table handing out addresses of `v4` and `v6` (networks; host bits ignored) but
    /// never `exclude`d ones (say the TUN's own), for at most `capacity` names (fewer if
    /// the IPv4 range has fewer usable addresses). Fails on a range too small to use or
    /// an IPv6 range smaller than the IPv4 one.
    pub fn new(
        v4: Ipv4Cidr,
        v6: Ipv6Cidr,
        exclude: &[IpAddr],
        capacity: usize,
    ) -> Result<FakeTable, String> {
        if v4.prefix_len() > 30 {
            return Err(format!("fake range {v4} holds no usable address"));
        }
        let v4_bits = 32 - u32::from(v4.prefix_len());
        if 128 - u32::from(v6.prefix_len()) < v4_bits {
            return Err(format!("fake range {v6} is smaller than {v4}"));
        }
        let v4_base = u32::from(v4.address()) & mask32(v4.prefix_len());
        let v6_base = u128::from(v6.address()) & mask128(v6.prefix_len());
        // A /0 would overflow u32; nobody hands out 4 billion names.
        let span = 1u32.checked_shl(v4_bits).unwrap_or(u32::MAX);
        let mut excluded: Vec<u32> = exclude
            .iter()
            .filter_map(|addr| match addr {
                IpAddr::V4(a) => u32::from(*a).checked_sub(v4_base),
                IpAddr::V6(a) => u32::try_from(u128::from(*a).checked_sub(v6_base)?).ok(),
            })
            .filter(|&offset| offset > 0 && offset < span - 1)
            .collect();
        excluded.sort_unstable();
        excluded.dedup();
        let usable = span - 2 - excluded.len() as u32;
        let capacity = u32::try_from(capacity).unwrap_or(u32::MAX).min(usable);
        if capacity == 0 {
            return Err(format!("fake range {v4} leaves no address to hand out"));
        }
        let slots = capacity as usize;
        let long_slots = (slots / LONG_SHARE).max(1) as u32;
        Ok(FakeTable {
            v4: v4_base,
            v6: v6_base,
            v4_prefix: v4.prefix_len(),
            v6_prefix: v6.prefix_len(),
            excluded,
            span,
            capacity,
            entries: Vec::with_capacity(slots),
            names: vec![0; slots * SHORT],
            long_names: vec![0; long_slots as usize * MAX_TEXT],
            long_free: (0..long_slots).rev().collect(),
            long_lru: Lru::default(),
            index: vec![EMPTY; (2 * slots).next_power_of_two()],
            lru: Lru::default(),
            hasher: RandomState::new(),
            counters: Counters::default(),
        })
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    pub fn counters(&self) -> Counters {
        Counters {
            size: self.entries.len() as u64,
            ..self.counters
        }
    }

    /// The slot of `name` (lower-case dotted text), given a slot if it has none yet
    /// (the least recently used one no flow holds and unused for `MIN_IDLE`); `None`
    /// when no slot can be given, or `name` is empty or longer than a name can be. The
    /// entry counts as used at `now`.
    pub fn lookup(&mut self, name: &str, now: Instant) -> Option<Slot> {
        if name.is_empty() || name.len() > MAX_TEXT {
            return None;
        }
        let hash = self.hash(name);
        let slot = match self.find(name, hash) {
            Some(slot) => slot,
            None => self.insert(name, hash, now)?,
        };
        let entry = &mut self.entries[slot as usize];
        entry.used = now;
        if entry.holds == 0 {
            self.touch(slot);
        }
        Some(Slot(slot))
    }

    /// The IPv4 address of `slot`.
    pub fn v4(&self, slot: Slot) -> Ipv4Addr {
        Ipv4Addr::from(self.v4 + self.offset(slot.0))
    }

    /// The IPv6 address of `slot`.
    pub fn v6(&self, slot: Slot) -> Ipv6Addr {
        Ipv6Addr::from(self.v6 + u128::from(self.offset(slot.0)))
    }

    /// Whether `addr` lies in one of the fake ranges, mapped or not.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => u32::from(a) & mask32(self.v4_prefix) == self.v4,
            IpAddr::V6(a) => u128::from(a) & mask128(self.v6_prefix) == self.v6,
        }
    }

    /// The name `addr` was handed out for.
    pub fn name_of(&self, addr: IpAddr) -> Option<&str> {
        std::str::from_utf8(self.name_at(self.slot_of(addr)?)).ok()
    }

    /// A live flow to `addr` starts: its entry is not reused until `release`. False
    /// (nothing held) if `addr` has no name.
    pub fn hold(&mut self, addr: IpAddr) -> bool {
        let Some(slot) = self.slot_of(addr) else {
            return false;
        };
        let entry = &mut self.entries[slot as usize];
        entry.holds += 1;
        if entry.holds == 1 {
            self.lru.remove(slot);
            self.long_lru.remove(slot);
        }
        true
    }

    /// A flow that `hold` counted ends. Its entry goes to the back of the reuse order:
    /// the name was in use until now.
    pub fn release(&mut self, addr: IpAddr) {
        let Some(slot) = self.slot_of(addr) else {
            return;
        };
        let entry = &mut self.entries[slot as usize];
        if entry.holds == 0 {
            return;
        }
        entry.holds -= 1;
        if entry.holds == 0 {
            self.touch(slot);
        }
    }

    fn hash(&self, name: &str) -> u32 {
        // The low bits pick the index position; any 32 of SipHash's 64 are as good.
        self.hasher.hash_one(name.as_bytes()) as u32
    }

    fn mask(&self) -> usize {
        self.index.len() - 1
    }

    /// Makes `slot`, which no flow holds, the most recently used.
    fn touch(&mut self, slot: u32) {
        self.lru.touch(slot);
        if self.entries[slot as usize].long != EMPTY {
            self.long_lru.touch(slot);
        }
    }

    fn name_at(&self, slot: u32) -> &[u8] {
        let entry = &self.entries[slot as usize];
        let (arena, start) = match entry.long {
            EMPTY => (&self.names, slot as usize * SHORT),
            long => (&self.long_names, long as usize * MAX_TEXT),
        };
        &arena[start..start + usize::from(entry.len)]
    }

    fn find(&self, name: &str, hash: u32) -> Option<u32> {
        let mut at = hash as usize & self.mask();
        loop {
            let slot = self.index[at];
            if slot == EMPTY {
                return None;
            }
            if self.entries[slot as usize].hash == hash && self.name_at(slot) == name.as_bytes() {
                return Some(slot);
            }
            at = (at + 1) & self.mask();
        }
    }

    /// Gives `name` a slot: a long name the oldest reusable long name's if the pool is
    /// full; else a never used slot while there are, else the oldest reusable.
    fn insert(&mut self, name: &str, hash: u32, now: Instant) -> Option<u32> {
        let long = name.len() > SHORT;
        let slot = if long && self.long_free.is_empty() {
            self.reuse(self.long_lru.oldest(), now)?
        } else if self.entries.len() < self.capacity as usize {
            self.entries.push(Entry {
                used: now,
                hash,
                holds: 0,
                len: 0,
                long: EMPTY,
            });
            (self.entries.len() - 1) as u32
        } else {
            self.reuse(self.lru.oldest(), now)?
        };
        let (long, arena, start) = if long {
            // There is one: free before, or freed by the entry reused.
            let long = self.long_free.pop()?;
            (long, &mut self.long_names, long as usize * MAX_TEXT)
        } else {
            (EMPTY, &mut self.names, slot as usize * SHORT)
        };
        arena[start..start + name.len()].copy_from_slice(name.as_bytes());
        self.entries[slot as usize] = Entry {
            used: now,
            hash,
            holds: 0,
            len: name.len() as u8,
            long,
        };
        let mut at = hash as usize & self.mask();
        while self.index[at] != EMPTY {
            at = (at + 1) & self.mask();
        }
        self.index[at] = slot;
        Some(slot)
    }

    /// Takes the entry `oldest` (the least recently used of a list) from its name if it
    /// has been unused for `MIN_IDLE`; counts a refusal if not.
    fn reuse(&mut self, oldest: Option<u32>, now: Instant) -> Option<u32> {
        let Some(slot) = oldest.filter(|&slot| now - self.entries[slot as usize].used >= MIN_IDLE)
        else {
            self.counters.full += 1;
            return None;
        };
        self.unindex(slot);
        self.lru.remove(slot);
        self.long_lru.remove(slot);
        let entry = &mut self.entries[slot as usize];
        if entry.long != EMPTY {
            self.long_free.push(entry.long);
        }
        // Unmapped until its new name is in.
        entry.len = 0;
        entry.long = EMPTY;
        self.counters.evictions += 1;
        Some(slot)
    }

    /// Takes `slot` out of the index, shifting back the entries after it that probed
    /// past its position (no tombstones: lookups never slow down with churn).
    fn unindex(&mut self, slot: u32) {
        let mask = self.mask();
        let mut hole = self.entries[slot as usize].hash as usize & mask;
        while self.index[hole] != slot {
            hole = (hole + 1) & mask;
        }
        let mut at = hole;
        loop {
            at = (at + 1) & mask;
            let moved = self.index[at];
            if moved == EMPTY {
                break;
            }
            let home = self.entries[moved as usize].hash as usize & mask;
            // The entry at `at` may fill the hole unless its home lies cyclically in
            // (hole, at]: then it would sit before its home and never be found.
            let stays = if hole <= at {
                hole < home && home <= at
            } else {
                hole < home || home <= at
            };
            if !stays {
                self.index[hole] = moved;
                hole = at;
            }
        }
        self.index[hole] = EMPTY;
    }

    /// The host offset of `slot`: offsets from 1 up, stepping over excluded ones.
    fn offset(&self, slot: u32) -> u32 {
        let mut offset = slot + 1;
        for &excluded in &self.excluded {
            if excluded <= offset {
                offset += 1;
            }
        }
        offset
    }

    /// The slot holding a name that `addr` stands for.
    fn slot_of(&self, addr: IpAddr) -> Option<u32> {
        if !self.contains(addr) {
            return None;
        }
        let offset = match addr {
            IpAddr::V4(a) => u32::from(a) - self.v4,
            IpAddr::V6(a) => u32::try_from(u128::from(a) - self.v6).ok()?,
        };
        if offset == 0 || offset >= self.span - 1 || self.excluded.binary_search(&offset).is_ok() {
            return None;
        }
        let below = self.excluded.partition_point(|&e| e < offset) as u32;
        let slot = offset - 1 - below;
        let entry = self.entries.get(slot as usize)?;
        (entry.len > 0).then_some(slot)
    }
}

/// An entry of the table, as `lookup` returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot(u32);

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

#[cfg(test)]
mod tests;
