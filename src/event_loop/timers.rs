//! Flow deadlines (retransmission, delayed ACK, keep-alive), in one heap. A flow keeps
//! the time of its live entry; superseded entries are skipped when they come up and
//! pruned when they pile up.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use smoltcp::time::Instant;

use crate::flow::Id;

#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, Id)>>,
}

impl Timers {
    /// Arms flow `id` for `at`, unless its live entry (`armed`) is due no later: that
    /// one fires, the flow runs and re-arms with its real deadline.
    pub fn schedule(&mut self, armed: &mut Option<Instant>, id: Id, at: Instant) {
        if armed.is_some_and(|current| current <= at) {
            return;
        }
        *armed = Some(at);
        self.heap.push(Reverse((at, id)));
    }

    /// When the earliest entry is due.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The next entry due by `now`, live or not (the caller checks it against the
    /// flow's `armed`).
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, Id)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(entry)| entry),
            _ => None,
        }
    }

    /// Drops superseded entries once they outnumber the live flows well.
    pub fn compact(&mut self, flows: usize, is_live: impl Fn(Id, Instant) -> bool) {
        if self.heap.len() > 2 * flows + 4096 {
            self.heap.retain(|Reverse((at, id))| is_live(*id, *at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(slot: u32) -> Id {
        Id {
            slot,
            generation: 1,
        }
    }

    #[test]
    fn the_earliest_deadline_wins_and_comes_up_in_order() {
        let mut timers = Timers::default();
        let (mut a, mut b) = (None, None);
        timers.schedule(&mut a, id(1), Instant::from_millis(30));
        timers.schedule(&mut a, id(1), Instant::from_millis(50));
        assert_eq!(a, Some(Instant::from_millis(30)), "a later deadline waits");
        timers.schedule(&mut a, id(1), Instant::from_millis(10));
        timers.schedule(&mut b, id(2), Instant::from_millis(20));
        assert_eq!(timers.next(), Some(Instant::from_millis(10)));
        let now = Instant::from_millis(25);
        let due: Vec<_> = std::iter::from_fn(|| timers.pop_due(now)).collect();
        assert_eq!(
            due,
            [
                (Instant::from_millis(10), id(1)),
                (Instant::from_millis(20), id(2))
            ]
        );
        assert_eq!(
            timers.next(),
            Some(Instant::from_millis(30)),
            "superseded, still queued"
        );
    }

    #[test]
    fn compaction_keeps_only_live_entries() {
        let mut timers = Timers::default();
        for at in 0..5000 {
            let mut armed = None;
            timers.schedule(&mut armed, id(at), Instant::from_millis(i64::from(at)));
        }
        timers.compact(1, |id, _| id.slot == 7);
        assert_eq!(timers.heap.len(), 1);
    }
}
