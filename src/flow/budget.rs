//! The memory budget for flow buffers (`--memory-limit`). Each direction of a flow may
//! hold at most its allowance of bytes: the server's bytes waiting for the client (the
//! proxy stops receiving from the server beyond it) and the client's bytes waiting for
//! the server (the window advertised to the client is held to it). Allowances start
//! small and double for flows that keep filling and draining them, the way the kernel
//! autotunes its own buffers, while the budget has room; when it is tight, directions
//! that hold much less than their allowance and have gone quiet give the rest back.
//!
//! Allowances add up to two thirds of the limit (a ring buffer keeps more resident than
//! it holds). Half of that can be taken by any flow that fills its allowance; the other
//! half only by flows that move a lot of data. Flows that stop (a client that does not read,
//! a server that does not) keep what they hold, so this keeps them from filling the
//! whole budget and leaves room for the flows that are busy beside them.

use smoltcp::time::{Duration, Instant};

/// Bytes every direction may hold, budget or not: each flow can always make progress.
pub const FLOOR: usize = 16 * 1024;
/// Drained since its last growth, a direction counts as moving a lot of data.
const BUSY: usize = 1 << 20;
/// Nothing drained for this long, a direction counts as quiet. A busy one is looked at
/// many times between two of its peer's ACKs, so "nothing since the last look" would
/// shrink (and trim, and fault back in) the buffer of a bulk flow over and over.
pub const QUIET: Duration = Duration::from_millis(200);

/// The budget, and what the flows have of it.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget { limit, used: 0 }
    }

    /// Bytes charged to flows now.
    pub fn used(&self) -> usize {
        self.used
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether `more` bytes fit, for a direction that drained `drained` since it last
    /// grew.
    fn fits(&self, more: usize, drained: usize) -> bool {
        let ceiling = if drained >= BUSY {
            self.allowances()
        } else {
            self.allowances() / 2
        };
        self.used + more <= ceiling
    }

    fn tight(&self) -> bool {
        self.used > self.allowances() / 2
    }

    /// What the allowances may add up to: two thirds of the limit, since a buffer keeps
    /// up to one and a half times its allowance resident (`Allowance::take_trim`).
    fn allowances(&self) -> usize {
        self.limit / 3 * 2
    }

    /// The most the flows' buffers may have resident now.
    pub fn resident_bound(&self) -> usize {
        self.used / 2 * 3
    }
}

/// One direction of one flow.
#[derive(Clone, Copy, Debug)]
pub struct Allowance {
    /// When bytes last drained (or it was first looked at).
    active_at: Option<Instant>,
    allow: usize,
    /// The most it may grow to: the buffer's size.
    cap: usize,
    /// What is charged to the budget: the allowance, while the direction holds bytes or
    /// has grown past the floor; nothing for an idle direction at the floor.
    charged: usize,
    /// Bytes drained in total, when it last grew, and at the last update.
    drained: usize,
    drained_at_growth: usize,
    drained_at_update: usize,
    /// It held all of its allowance since it last grew (it needs more window).
    filled: bool,
    /// Bytes drained in total when the buffer's free space was last given back.
    drained_at_trim: usize,
    /// The allowance shrank since then.
    shrunk: bool,
}

impl Allowance {
    /// A new direction of a buffer of `cap` bytes.
    pub fn new(cap: usize) -> Allowance {
        Allowance {
            active_at: None,
            allow: FLOOR.min(cap),
            cap,
            charged: 0,
            drained: 0,
            drained_at_growth: 0,
            drained_at_update: 0,
            filled: false,
            drained_at_trim: 0,
            shrunk: false,
        }
    }

    /// Bytes this direction may hold.
    pub fn get(&self) -> usize {
        self.allow
    }

    /// `n` more bytes left the buffer (to the server, or acknowledged by the client).
    pub fn drained(&mut self, n: usize) {
        self.drained += n;
    }

    /// Brings the allowance up to date at `now` with `held`, the bytes the buffer holds
    /// now; `used_up`: the peer has sent all it was allowed to (held it all, or reached
    /// the end of the window: a fast reader on the other side keeps `held` low).
    pub fn update(&mut self, held: usize, used_up: bool, now: Instant, budget: &mut Budget) {
        if self.drained != self.drained_at_update {
            self.active_at = Some(now);
        }
        let active_at = *self.active_at.get_or_insert(now);
        if used_up || held >= self.allow {
            self.filled = true;
        }
        let since_growth = self.drained - self.drained_at_growth;
        if self.filled && since_growth >= self.allow && self.allow < self.cap {
            let grown = (2 * self.allow).min(self.cap);
            let more = grown - self.charged.max(self.allow);
            if budget.fits(more, since_growth) {
                self.allow = grown;
                self.filled = false;
                self.drained_at_growth = self.drained;
            }
        } else if budget.tight()
            && self.allow > FLOOR
            && held < self.allow / 4
            && now - active_at >= QUIET
        {
            // Quiet: give back what it does not use, keeping room to double what it
            // holds.
            self.allow = (2 * held).next_power_of_two().clamp(FLOOR, self.allow);
            self.filled = false;
            self.shrunk = true;
            self.drained_at_growth = self.drained;
        }
        self.drained_at_update = self.drained;
        let charge = if held > 0 || self.allow > FLOOR {
            self.allow
        } else {
            0
        };
        budget.used = budget.used + charge - self.charged;
        self.charged = charge;
    }

    /// Whether the buffer's free space should go back to the kernel now (and, if so,
    /// counts it as done). The buffer is a ring: bytes moving through it touch its
    /// pages one after the other until all of its capacity is resident, however little
    /// the allowance lets it hold at a time. So a direction whose allowance is below the
    /// capacity gives its free pages back each time half an allowance's worth has moved
    /// through, and when the allowance shrinks; what it keeps resident then stays within
    /// one and a half times its allowance, and one that stops moving costs only what it
    /// holds.
    pub fn take_trim(&mut self) -> bool {
        let moved = self.drained - self.drained_at_trim;
        let due = self.shrunk || (self.allow < self.cap && moved >= self.allow / 2);
        if due {
            self.drained_at_trim = self.drained;
            self.shrunk = false;
        }
        due
    }

    /// The flow ends: its charge goes back to the budget.
    pub fn release(&mut self, budget: &mut Budget) {
        budget.used -= self.charged;
        self.charged = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;
    const T0: Instant = Instant::ZERO;

    /// A direction that fills its allowance and drains it, `rounds` times.
    fn busy(allowance: &mut Allowance, budget: &mut Budget, rounds: usize) {
        for _ in 0..rounds {
            let allow = allowance.get();
            allowance.update(allow, false, T0, budget);
            allowance.drained(allow);
            allowance.update(0, false, T0, budget);
        }
    }

    #[test]
    fn a_busy_direction_doubles_up_to_its_buffer() {
        let mut budget = Budget::new(64 * MIB);
        let mut bulk = Allowance::new(MIB);
        assert_eq!(bulk.get(), FLOOR);
        let mut seen = Vec::new();
        for _ in 0..8 {
            busy(&mut bulk, &mut budget, 1);
            seen.push(bulk.get() / 1024);
        }
        assert_eq!(seen, [32, 64, 128, 256, 512, 1024, 1024, 1024]);
        assert_eq!(budget.used(), MIB);
        bulk.release(&mut budget);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn idle_directions_cost_nothing_and_stopped_ones_keep_the_floor() {
        let mut budget = Budget::new(64 * MIB);
        let mut idle = Allowance::new(MIB);
        idle.update(0, false, T0, &mut budget);
        assert_eq!(budget.used(), 0, "an idle direction is free");
        // A client that stopped reading: the buffer fills, nothing drains.
        let mut stalled = Allowance::new(MIB);
        for _ in 0..10 {
            stalled.update(FLOOR, false, T0, &mut budget);
        }
        assert_eq!(stalled.get(), FLOOR, "no growth without draining");
        assert_eq!(budget.used(), FLOOR);
    }

    #[test]
    fn slow_flows_fill_at_most_half_the_budget_and_busy_ones_the_rest() {
        // Allowances may add up to 4 MiB.
        let mut budget = Budget::new(6 * MIB);
        // Many flows that move a little (under BUSY) each, then stop.
        let mut slow: Vec<Allowance> = (0..64).map(|_| Allowance::new(MIB)).collect();
        for allowance in &mut slow {
            busy(allowance, &mut budget, 5);
            let allow = allowance.get();
            allowance.update(allow, false, T0, &mut budget);
        }
        // Their growth takes at most half; the floors they hold come on top.
        assert!(
            budget.used() <= 2 * MIB + 64 * FLOOR,
            "slow flows took {}",
            budget.used()
        );
        // A bulk flow beside them still gets its whole buffer.
        let mut bulk = Allowance::new(MIB);
        for _ in 0..32 {
            busy(&mut bulk, &mut budget, 1);
            bulk.drained(BUSY);
        }
        assert_eq!(bulk.get(), MIB);
        assert!(budget.used() <= budget.allowances());
    }

    #[test]
    fn when_tight_a_direction_gives_back_what_it_does_not_use() {
        let mut budget = Budget::new(2 * MIB);
        let mut bulk = Allowance::new(MIB);
        for _ in 0..16 {
            busy(&mut bulk, &mut budget, 1);
            bulk.drained(BUSY);
        }
        assert_eq!(bulk.get(), MIB);
        let mut other = Allowance::new(MIB);
        for _ in 0..3 {
            busy(&mut other, &mut budget, 1);
            other.drained(BUSY);
        }
        assert!(budget.tight(), "used {}", budget.used());
        // Between two ACKs a busy flow may hold little and drain nothing: it keeps its
        // allowance (shrinking would trim its buffer and fault it back in).
        bulk.update(20_000, false, T0, &mut budget);
        assert_eq!(bulk.get(), MIB, "it drained since the last look");
        let soon = T0 + QUIET - Duration::from_millis(1);
        bulk.update(20_000, false, soon, &mut budget);
        assert_eq!(bulk.get(), MIB, "not quiet yet");
        // Nothing drained for QUIET: it shrinks to twice what it holds.
        bulk.update(20_000, false, T0 + QUIET, &mut budget);
        assert_eq!(bulk.get(), 64 * 1024);
        assert!(!budget.tight() || budget.used() < 2 * MIB);
    }

    #[test]
    fn free_space_goes_back_after_an_allowance_has_moved_and_on_shrinking() {
        let mut budget = Budget::new(2 * MIB);
        let mut slow = Allowance::new(MIB);
        assert!(!slow.take_trim(), "nothing moved yet");
        slow.drained(FLOOR / 2 - 1);
        assert!(!slow.take_trim());
        slow.drained(1);
        assert!(slow.take_trim(), "half an allowance's worth moved through");
        assert!(!slow.take_trim(), "and it was counted");
        // At its whole buffer, a direction is charged for all of it: nothing to give.
        let mut bulk = Allowance::new(MIB);
        for _ in 0..16 {
            busy(&mut bulk, &mut budget, 1);
            bulk.drained(BUSY);
        }
        assert_eq!(bulk.get(), MIB);
        assert!(!bulk.take_trim());
        // Going quiet when the budget is tight, it shrinks, and then gives back.
        let mut other = Allowance::new(MIB);
        for _ in 0..3 {
            busy(&mut other, &mut budget, 1);
            other.drained(BUSY);
        }
        bulk.update(1000, false, T0, &mut budget);
        bulk.update(1000, false, T0 + QUIET, &mut budget);
        assert!(bulk.get() < MIB);
        assert!(bulk.take_trim());
    }
}
