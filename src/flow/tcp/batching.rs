//! Receive batching for downloads: when a server sends in bulk, the outbound socket's
//! SO_RCVLOWAT is raised so that the kernel completes a receive once per batch of its
//! super-packets rather than once per super-packet (each completion is a wake-up of the
//! proxy, a TUN write and an ACK to the server), and lowered again as soon as the bulk
//! stops, so that a tail shorter than a batch, or an exchange of small messages, waits
//! at most `HOLD`. Decides only; the loop sets the socket option.

use smoltcp::time::{Duration, Instant};

/// A receive of at least this many bytes says the server sends in bulk: at line rate
/// each receive brings one 64 KiB GSO super-packet (65,160 bytes over IPv4) or more.
pub const BULK_RECV: usize = 32 * 1024;
/// Bulk receives in a row before batching starts, so that a single response of a few
/// hundred KiB is never held back.
pub const STREAK: u32 = 4;
/// The low-water mark while batching: a receive completes once this much is queued,
/// i.e. after two of the server's super-packets.
pub const BATCH: u32 = 96 * 1024;
/// While batching, how long after the last receive completed the next batch may take
/// before the mark goes back to one byte: the most a tail shorter than a batch (or the
/// first bytes after the server paused) waits. Two super-packets take 1.1 ms at 1 Gbit/s;
/// a server slower than a batch per `HOLD` is not batched for long (the receive after
/// the mark was lowered is short and ends the streak).
pub const HOLD: Duration = Duration::from_millis(2);

/// The batching state of one flow's outbound socket.
#[derive(Clone, Copy, Debug, Default)]
pub struct Batching {
    /// Bulk receives in a row.
    streak: u32,
    /// SO_RCVLOWAT is `BATCH` (else the default, one byte).
    raised: bool,
    /// A receive completed since the last poll, with this many bytes.
    received: Option<usize>,
    /// When the last receive completed (as of the poll after it).
    last: Option<Instant>,
}

impl Batching {
    /// A receive of server bytes completed with `bytes` (0: end of stream or an error).
    pub fn on_received(&mut self, bytes: usize) {
        self.received = Some(bytes);
    }

    /// The low-water mark to set on the socket now, if it changes; run after every
    /// receive completion and at `deadline`. `open`: the relay still receives (not
    /// connecting, not tearing down).
    pub fn poll(&mut self, now: Instant, open: bool) -> Option<u32> {
        if let Some(bytes) = self.received.take() {
            self.last = Some(now);
            self.streak = if bytes >= BULK_RECV {
                self.streak.saturating_add(1)
            } else {
                0
            };
        }
        let waited_long = self.last.is_none_or(|last| now - last >= HOLD);
        if waited_long {
            self.streak = 0;
        }
        let raise = open && self.streak >= STREAK;
        (raise != self.raised).then(|| {
            self.raised = raise;
            if raise { BATCH } else { 1 }
        })
    }

    /// When the mark must go back to one byte if no receive completes before.
    pub fn deadline(&self) -> Option<Instant> {
        self.last.filter(|_| self.raised).map(|last| last + HOLD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: usize = 65_160;

    fn at(micros: i64) -> Instant {
        Instant::from_micros(micros)
    }

    /// Feeds receives of `bytes` every `every_us` from `start_us`, polling after each;
    /// returns the marks set and the time of the last receive.
    fn receives(
        batching: &mut Batching,
        start_us: i64,
        count: usize,
        bytes: usize,
        every_us: i64,
    ) -> (Vec<u32>, i64) {
        let mut marks = Vec::new();
        let mut t = start_us;
        for i in 0..count {
            t = start_us + i as i64 * every_us;
            batching.on_received(bytes);
            marks.extend(batching.poll(at(t), true));
        }
        (marks, t)
    }

    #[test]
    fn a_download_at_line_rate_is_batched_after_a_streak() {
        let mut b = Batching::default();
        let (marks, _) = receives(&mut b, 0, STREAK as usize - 1, BIG, 530);
        assert!(marks.is_empty(), "no batching before the streak");
        let (marks, t) = receives(&mut b, 2_000, 10, BIG * 2, 1_060);
        assert_eq!(marks, [BATCH], "raised once and kept");
        assert_eq!(b.deadline(), Some(at(t) + HOLD));
    }

    #[test]
    fn a_short_response_is_never_held_back() {
        let mut b = Batching::default();
        // Small exchanges (rr, crr) and a response of three super-packets.
        let (marks, _) = receives(&mut b, 0, 100, 1, 60);
        assert!(marks.is_empty());
        let (marks, _) = receives(&mut b, 10_000, STREAK as usize - 1, BIG, 100);
        assert!(marks.is_empty());
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn a_pause_lowers_the_mark_at_the_deadline_and_not_before() {
        let mut b = Batching::default();
        let (marks, t) = receives(&mut b, 0, STREAK as usize, BIG, 530);
        assert_eq!(marks, [BATCH]);
        let deadline = b.deadline().expect("a deadline while raised");
        assert_eq!(deadline, at(t) + HOLD);
        // Polled early (another event of the flow): nothing changes.
        assert_eq!(b.poll(deadline - Duration::from_micros(1), true), None);
        // At the deadline the mark goes back, and the streak starts over.
        assert_eq!(b.poll(deadline, true), Some(1));
        assert_eq!(b.deadline(), None);
        let (marks, _) = receives(&mut b, 10_000, STREAK as usize - 1, BIG, 530);
        assert!(marks.is_empty(), "a new streak is needed");
    }

    #[test]
    fn a_short_receive_lowers_the_mark_at_once() {
        let mut b = Batching::default();
        receives(&mut b, 0, STREAK as usize, BIG, 530);
        b.on_received(1_000);
        assert_eq!(b.poll(at(3_000), true), Some(1));
        b.on_received(0);
        assert_eq!(b.poll(at(3_100), true), None, "already lowered");
    }

    #[test]
    fn a_slow_server_is_not_batched_for_long() {
        // 100 Mbit/s in big receives: raised, then the batch takes longer than HOLD;
        // the receive the lowering completes is short and ends the streak.
        let mut b = Batching::default();
        let (marks, t) = receives(&mut b, 0, STREAK as usize, BIG, 5_300);
        assert_eq!(marks, [BATCH]);
        assert_eq!(b.poll(at(t) + HOLD, true), Some(1));
        b.on_received(26_000);
        assert_eq!(b.poll(at(t) + HOLD + Duration::from_micros(10), true), None);
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn a_flow_that_stops_receiving_lowers_the_mark() {
        let mut b = Batching::default();
        receives(&mut b, 0, STREAK as usize, BIG, 530);
        assert_eq!(b.poll(at(2_000), false), Some(1));
    }
}
