//! Giving memory back. After a peak: glibc keeps the heap freed by closed flows (each
//! flow's state and smoltcp socket, ~2.7 KiB) mapped, and 10,000 closed flows left RSS
//! 27 MiB above idle; once enough flows have closed since the most that were open, the
//! flow table's key map is shrunk and the free heap returned, at most once a second.
//! After a load: once nothing has happened for a few seconds, the buffer pools (TUN
//! reads and writes, UDP receives and sends) give the pages of their free buffers back,
//! so the megabytes a burst touched do not stay resident.

use std::time::Duration;

use smoltcp::time::Instant;

use super::Proxy;
use crate::sys;

/// Flows closed since the peak that make a trim worth it.
const TRIM_AFTER_CLOSED_FLOWS: usize = 1024;
/// Shortest time between two trims.
const INTERVAL: Duration = Duration::from_secs(1);
/// Quiet for this long, the buffer pools give their free pages back.
const IDLE_AFTER: Duration = Duration::from_secs(5);

pub struct Housekeeping {
    /// No trim before this.
    next: Instant,
    /// The last trim came in the middle of a mass closure: trim once more for what
    /// closes after it, so its tail is not kept.
    follow_up: bool,
    /// When the last turn with completions ran.
    last_busy: Instant,
    /// The pools have given their pages back since then.
    pools_released: bool,
}

impl Default for Housekeeping {
    fn default() -> Self {
        Housekeeping {
            next: Instant::ZERO,
            follow_up: false,
            last_busy: Instant::ZERO,
            pools_released: false,
        }
    }
}

impl Housekeeping {
    fn trim_due(&self, closed: usize) -> bool {
        closed >= TRIM_AFTER_CLOSED_FLOWS || (self.follow_up && closed > 0)
    }

    /// When the loop must wake for a trim or the idle release (neither pending: `None`),
    /// so neither waits for traffic that may never come.
    pub fn due(&self, closed: usize) -> Option<Instant> {
        let trim = self.trim_due(closed).then_some(self.next);
        let release = (!self.pools_released).then(|| self.last_busy + IDLE_AFTER.into());
        trim.into_iter().chain(release).min()
    }

    /// A turn handled completions at `now`.
    pub fn busy(&mut self, now: Instant) {
        self.last_busy = now;
        self.pools_released = false;
    }
}

impl Proxy {
    pub(super) fn housekeeping(&mut self, now: Instant) {
        let closed = self.tcp.closed_since_peak();
        let house = &mut self.housekeeping;
        if !house.pools_released && now >= house.last_busy + IDLE_AFTER.into() {
            house.pools_released = true;
            self.ring.shrink_buffers();
            self.stack.tx.discard_free();
            self.udp.discard_free_slots();
            self.tcp.drop_spares();
            if let Some(forwards) = self.dns.as_mut().and_then(|dns| dns.forwards.as_mut()) {
                forwards.drop_spares();
            }
        }
        if closed == 0 {
            house.follow_up = false;
        }
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
        let mut house = Housekeeping {
            pools_released: true,
            ..Housekeeping::default()
        };
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

    #[test]
    fn the_pools_are_released_once_after_a_quiet_spell() {
        let mut house = Housekeeping::default();
        house.busy(Instant::from_secs(100));
        assert_eq!(house.due(0), Some(Instant::from_secs(105)));
        house.pools_released = true;
        assert_eq!(house.due(0), None, "once until the next busy turn");
        house.busy(Instant::from_secs(200));
        assert_eq!(house.due(0), Some(Instant::from_secs(205)));
    }
}
