//! How long, and for how many completions, the loop waits on the ring: while a download
//! runs in bulk, a lone completion (typically the client's ACK read from the TUN) does
//! not wake the proxy on its own; it is handled with the next one (the download's next
//! receive), or after at most `MAX_HOLD`. Otherwise every completion wakes it at once.

use std::time::Duration;

use smoltcp::time::Instant;

/// A receive of at least this many server bytes says a download runs in bulk (at line
/// rate a receive brings one or two 64 KiB super-packets).
pub const BULK_RECV: usize = 32 * 1024;
/// How long after the last bulk receive the loop still waits for two completions: one
/// batch of a download at 1 Gbit/s arrives about every millisecond.
pub const BULK_SPAN: Duration = Duration::from_millis(2);
/// The longest a lone completion waits for a second one: what a packet of another flow
/// (or the client's ACK) may be delayed while a download runs.
pub const MAX_HOLD: Duration = Duration::from_millis(1);

/// The loop's waiting policy; fed every server receive, asked before every wait.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wait {
    last_bulk: Option<Instant>,
}

impl Wait {
    /// A receive of server bytes completed with `bytes` at `now`.
    pub fn on_received(&mut self, now: Instant, bytes: usize) {
        if bytes >= BULK_RECV {
            self.last_bulk = Some(now);
        }
    }

    /// Completions to wait for, and the longest wait (`None`: no limit), given the
    /// loop's own `timeout` (until its next deadline; zero with work queued).
    pub fn plan(&self, now: Instant, timeout: Option<Duration>) -> (u32, Option<Duration>) {
        let bulk = self
            .last_bulk
            .is_some_and(|at| Duration::from_micros((now - at).total_micros()) < BULK_SPAN);
        match timeout {
            Some(Duration::ZERO) => (1, timeout),
            _ if bulk => (2, Some(timeout.map_or(MAX_HOLD, |t| t.min(MAX_HOLD)))),
            _ => (1, timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(micros: i64) -> Instant {
        Instant::from_micros(micros)
    }

    #[test]
    fn without_a_download_every_completion_wakes_the_loop() {
        let mut wait = Wait::default();
        assert_eq!(wait.plan(at(0), None), (1, None));
        // Small receives (request/response) never change that.
        for t in 0..100 {
            wait.on_received(at(t * 50), 100);
        }
        let timeout = Some(Duration::from_millis(200));
        assert_eq!(wait.plan(at(5_000), timeout), (1, timeout));
    }

    #[test]
    fn during_a_download_a_lone_completion_waits_for_a_second_briefly() {
        let mut wait = Wait::default();
        wait.on_received(at(1_000), 130_320);
        assert_eq!(wait.plan(at(1_010), None), (2, Some(MAX_HOLD)));
        // A nearer deadline of the loop's still counts.
        let near = Some(Duration::from_micros(300));
        assert_eq!(wait.plan(at(1_010), near), (2, near));
        // Work queued: no waiting at all.
        let zero = Some(Duration::ZERO);
        assert_eq!(wait.plan(at(1_010), zero), (1, zero));
    }

    #[test]
    fn the_hold_ends_when_the_download_does() {
        let mut wait = Wait::default();
        wait.on_received(at(0), 65_160);
        let span = BULK_SPAN.as_micros() as i64;
        assert_eq!(wait.plan(at(span - 1), None).0, 2);
        assert_eq!(wait.plan(at(span), None), (1, None));
        // A small receive after the bulk does not extend it.
        wait.on_received(at(span - 10), 10);
        assert_eq!(wait.plan(at(span), None), (1, None));
    }
}
