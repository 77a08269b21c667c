//! The one io_uring ring every I/O of the proxy goes through, and its tokens and buffers.
#![allow(unsafe_code)]

pub mod buf_ring;
pub mod features;
pub mod token;

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use io_uring::{IoUring, cqueue, squeue, types};
use nix::libc;

pub use buf_ring::BufRing;
pub use features::{Features, KernelVersion};
pub use token::{Op, Token};

/// Submission queue entries: enough for a full turn of TUN writes plus flow operations;
/// when it fills we submit early rather than queue without bound.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries: 16x the SQ so bursts of multishot reads never overflow it.
const CQ_ENTRIES: u32 = 16384;

/// A completion copied out of the CQ, so the ring can be borrowed again while it is handled.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

/// The ring, set up for one thread that submits and reaps everything itself.
pub struct Ring {
    ring: IoUring,
    /// Entries that found the SQ full while the kernel refused to take more (EBUSY:
    /// completions must be reaped first). Kept in order, flushed on the next submit;
    /// `groups` holds the length of each chain so links are never split.
    backlog: VecDeque<squeue::Entry>,
    groups: VecDeque<usize>,
}

impl Ring {
    pub fn new() -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_submit_all()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)?;
        Ok(Ring {
            ring,
            backlog: VecDeque::new(),
            groups: VecDeque::new(),
        })
    }

    pub fn inner(&self) -> &IoUring {
        &self.ring
    }

    /// Queues `entries` back to back (a linked chain is never split across submits).
    /// Never fails: when the kernel cannot take more yet, they wait in a backlog.
    ///
    /// # Safety
    /// Every buffer, address and timespec an entry points to must stay valid and unmoved
    /// until its completion has been reaped (the kernel may read or write it until then).
    pub unsafe fn push(&mut self, entries: &[squeue::Entry]) {
        if self.backlog.is_empty() && self.free_slots() < entries.len() {
            self.submit_pending();
        }
        if self.backlog.is_empty() && self.free_slots() >= entries.len() {
            let mut sq = self.ring.submission();
            // SAFETY: the caller guarantees the buffers outlive the operations, and we
            // just checked there is room for all of them.
            let pushed = unsafe { sq.push_multiple(entries) };
            debug_assert!(pushed.is_ok());
            return;
        }
        self.backlog.extend(entries.iter().cloned());
        self.groups.push_back(entries.len());
    }

    fn free_slots(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    /// Submits queued entries without waiting; EBUSY (completion backlog) leaves them
    /// queued until the next wait has reaped completions.
    fn submit_pending(&mut self) {
        let _ = self.ring.submit();
    }

    /// Moves backlogged chains into the SQ while they fit.
    fn flush_backlog(&mut self) {
        while let Some(&len) = self.groups.front() {
            if self.free_slots() < len {
                self.submit_pending();
                if self.free_slots() < len {
                    return;
                }
            }
            let chain: Vec<squeue::Entry> = self.backlog.drain(..len).collect();
            let mut sq = self.ring.submission();
            // SAFETY: these entries were handed to `push` under its contract; there is
            // room for the whole chain.
            let pushed = unsafe { sq.push_multiple(&chain) };
            debug_assert!(pushed.is_ok());
            self.groups.pop_front();
        }
    }

    /// Submits everything queued and waits for at least one completion or `timeout`.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.flush_backlog();
        let result = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(timeout) => {
                let ts = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(err) if is_transient(&err) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Moves up to `max` completions into `out` (cleared first).
    pub fn drain(&mut self, out: &mut Vec<Completion>, max: usize) {
        out.clear();
        for cqe in self.ring.completion().take(max) {
            out.push(Completion {
                user_data: cqe.user_data(),
                result: cqe.result(),
                flags: cqe.flags(),
            });
        }
    }
}

/// Errors from io_uring_enter that only mean "not now": a timeout, a signal, or a
/// completion backlog that the next drain clears.
fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
    )
}

/// Whether a multishot operation stays armed after this completion.
pub fn more(flags: u32) -> bool {
    cqueue::more(flags)
}

/// The provided buffer a completion used, if any.
pub fn buffer_id(flags: u32) -> Option<u16> {
    cqueue::buffer_select(flags)
}
