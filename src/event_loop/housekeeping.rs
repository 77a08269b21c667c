//! Giving memory back after a peak: glibc keeps the heap freed by closed flows (each
//! flow's state and smoltcp socket, ~2.7 KiB) mapped, and 10,000 closed flows left RSS
//! 27 MiB above idle. Once enough flows have closed since the most that were open, the
//! flow table's key map is shrunk and the free heap returned, at most once a second.

use std::time::Duration;

use smoltcp::time::Instant;

use super::Proxy;
use crate::sys;

/// Flows closed since the peak that make a trim worth it.
const TRIM_AFTER_CLOSED_FLOWS: usize = 1024;
/// Shortest time between two trims.
const INTERVAL: Duration = Duration::from_secs(1);

pub struct Housekeeping {
    /// No trim before this.
    next: Instant,
    /// The last trim came in the middle of a mass closure: trim once more for what
    /// closes after it, so its tail is not kept.
    follow_up: bool,
}

impl Default for Housekeeping {
    fn default() -> Self {
        Housekeeping {
            next: Instant::ZERO,
            follow_up: false,
        }
    }
}

impl Housekeeping {
    fn trim_due(&self, closed: usize) -> bool {
        closed >= TRIM_AFTER_CLOSED_FLOWS || (self.follow_up && closed > 0)
    }

    /// When the loop must wake for a trim (none pending: `None`), so a pending trim
    /// does not wait for traffic that may never come.
    pub fn due(&self, closed: usize) -> Option<Instant> {
        self.trim_due(closed).then_some(self.next)
    }
}

impl Proxy {
    pub(super) fn housekeeping(&mut self, now: Instant) {
        let closed = self.tcp.closed_since_peak();
        let house = &mut self.housekeeping;
        if now < house.next || !house.trim_due(closed) {
            return;
        }
        house.next = now + INTERVAL.into();
        house.follow_up = closed >= TRIM_AFTER_CLOSED_FLOWS;
        self.tcp.table.shrink();
        sys::release_free_heap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_is_due_after_many_closures_and_once_more_after_them() {
        let mut house = Housekeeping::default();
        assert_eq!(house.due(10), None);
        assert_eq!(house.due(TRIM_AFTER_CLOSED_FLOWS), Some(Instant::ZERO));
        house.follow_up = true;
        assert_eq!(
            house.due(1),
            Some(Instant::ZERO),
            "the tail of a mass closure"
        );
        assert_eq!(house.due(0), None);
    }
}
