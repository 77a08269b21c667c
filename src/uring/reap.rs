//! Completions handed out with their tokens, accepted connections claimed, a final cancel.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, types};

use super::{Completion, Keep, Ring, UNWATCHED};

impl Ring {
    /// The connection an accept's `completion` carries, to own from now on.
    pub fn take_accepted(&mut self, completion: &Completion) -> Option<OwnedFd> {
        let at = self
            .accepted
            .iter()
            .position(|fd| fd.as_raw_fd() == completion.result)?;
        Some(self.accepted.swap_remove(at))
    }

    /// Moves up to `max` completions into `out` (cleared first). An operation that is
    /// done for good (no more completions to come) lets go of its memory here.
    pub fn drain(&mut self, out: &mut Vec<Completion>, max: usize) {
        out.clear();
        self.accepted.clear();
        for cqe in self.ring.completion().take(max) {
            let (user_data, flags) = (cqe.user_data(), cqe.flags());
            if user_data == UNWATCHED {
                continue;
            }
            let index = (user_data - 1) as usize;
            let Some(pending) = self.inflight.get(index) else {
                continue;
            };
            let (token, group) = (pending.token, pending.group);
            if matches!(pending.keep, Keep::Accept) && cqe.result() >= 0 {
                // SAFETY: a successful accept's result is a file descriptor the kernel
                // has just created for us; nothing else owns it.
                self.accepted
                    .push(unsafe { OwnedFd::from_raw_fd(cqe.result()) });
            }
            if let (Some(group), Some(bid)) = (group, cqueue::buffer_select(flags))
                && let Some(Some(buffers)) = self.buf_rings.get_mut(usize::from(group))
            {
                buffers.take(bid);
            }
            if !cqueue::more(flags)
                && let Keep::Gathered(_, group, bid) = self.inflight.remove(index).keep
                && let Some(Some(buffers)) = self.buf_rings.get_mut(usize::from(group))
            {
                buffers.end_lend(bid);
            }
            out.push(Completion {
                token,
                result: cqe.result(),
                flags,
            });
        }
    }

    /// Cancels everything in flight and reaps completions until nothing is left or
    /// `limit` has passed; true when the ring is idle. Only then may the files those
    /// operations use be closed knowing the kernel holds no reference to them.
    pub fn cancel_all(&mut self, limit: Duration) -> bool {
        // Entries the kernel never saw can simply be forgotten (a backlogged close's fd
        // is closed by the process exit).
        for entry in self.backlog.drain(..) {
            let user_data = entry.get_user_data();
            if user_data != UNWATCHED {
                self.inflight.try_remove((user_data - 1) as usize);
            }
        }
        self.groups.clear();
        let deadline = Instant::now() + limit;
        let mut completions = Vec::new();
        while !self.inflight.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Every round: an operation may not have been cancellable at once, and a
            // cancelled read of a hard-linked chain lets the next one start.
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(UNWATCHED);
            // SAFETY: a cancel points at no memory.
            unsafe { self.push(&[cancel]) };
            let wait = (deadline - now).min(Duration::from_millis(5));
            if self.submit_and_wait(Some(wait)).is_err() {
                return false;
            }
            self.drain(&mut completions, usize::MAX);
        }
        true
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if !self.inflight.is_empty() && !self.cancel_all(Duration::from_secs(1)) {
            // The kernel may still write into what these operations point at: leaking
            // it is the only safe choice left.
            std::mem::forget(std::mem::take(&mut self.inflight));
            std::mem::forget(std::mem::take(&mut self.buf_rings));
            return;
        }
        for (group, buffers) in self.buf_rings.iter().enumerate() {
            if buffers.is_some() {
                let _ = self.ring.submitter().unregister_buf_ring(group as u16);
            }
        }
    }
}
