//! A least-recently-used order over table slots: an intrusive doubly linked list, so
//! touching, removing and finding the longest idle are all O(1).

/// No slot: the end of the list.
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Link {
    prev: u32,
    next: u32,
    linked: bool,
}

const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
    linked: false,
};

/// Slots from least to most recently used.
#[derive(Debug)]
pub struct Lru {
    links: Vec<Link>,
    head: u32,
    tail: u32,
    len: usize,
}

impl Default for Lru {
    fn default() -> Self {
        Lru {
            links: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

impl Lru {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The least recently used slot.
    pub fn oldest(&self) -> Option<u32> {
        (self.head != NIL).then_some(self.head)
    }

    /// Makes `slot` the most recently used, adding it if it is not in the list.
    pub fn touch(&mut self, slot: u32) {
        self.remove(slot);
        let index = slot as usize;
        if self.links.len() <= index {
            self.links.resize(index + 1, UNLINKED);
        }
        self.links[index] = Link {
            prev: self.tail,
            next: NIL,
            linked: true,
        };
        match self.tail {
            NIL => self.head = slot,
            tail => self.links[tail as usize].next = slot,
        }
        self.tail = slot;
        self.len += 1;
    }

    /// Takes `slot` out of the list (nothing happens if it is not in it).
    pub fn remove(&mut self, slot: u32) {
        let Some(link) = self.links.get(slot as usize).copied().filter(|l| l.linked) else {
            return;
        };
        match link.prev {
            NIL => self.head = link.next,
            prev => self.links[prev as usize].next = link.next,
        }
        match link.next {
            NIL => self.tail = link.prev,
            next => self.links[next as usize].prev = link.prev,
        }
        self.links[slot as usize] = UNLINKED;
        self.len -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(lru: &Lru) -> Vec<u32> {
        let mut out = Vec::new();
        let mut at = lru.head;
        while at != NIL {
            out.push(at);
            at = lru.links[at as usize].next;
        }
        out
    }

    #[test]
    fn touching_moves_a_slot_to_the_back() {
        let mut lru = Lru::default();
        for slot in [3, 0, 7] {
            lru.touch(slot);
        }
        assert_eq!(order(&lru), [3, 0, 7]);
        lru.touch(3);
        assert_eq!(order(&lru), [0, 7, 3]);
        assert_eq!(lru.oldest(), Some(0));
        lru.remove(7);
        assert_eq!(order(&lru), [0, 3]);
        lru.remove(7);
        lru.remove(100);
        assert_eq!(lru.len(), 2);
        lru.remove(0);
        lru.remove(3);
        assert_eq!(lru.oldest(), None);
        assert!(lru.is_empty());
        lru.touch(5);
        assert_eq!(order(&lru), [5]);
    }

    #[test]
    fn matches_a_model_under_random_operations() {
        let mut lru = Lru::default();
        let mut model: Vec<u32> = Vec::new();
        let mut state = 0x243f_6a88_85a3_08d3u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let slot = (state % 64) as u32;
            if state & 0x100 == 0 {
                lru.touch(slot);
                model.retain(|&s| s != slot);
                model.push(slot);
            } else {
                lru.remove(slot);
                model.retain(|&s| s != slot);
            }
            assert_eq!(lru.oldest(), model.first().copied());
            assert_eq!(lru.len(), model.len());
        }
        assert_eq!(order(&lru), model);
    }
}
