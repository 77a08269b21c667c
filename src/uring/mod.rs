//! The one io_uring ring every I/O of the proxy goes through. Its submitters are typed
//! and safe: whatever an operation points into (a region, the provided buffers, a
//! connect's address) is kept alive by the ring until the kernel has completed it, and
//! the ring is drained before any of it is freed.
#![allow(unsafe_code)]

mod buf_ring;
pub mod features;
mod gather;
pub mod memory;
mod provided;
mod reap;
mod sendmsg;
mod submit;
pub mod token;

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::os::fd::OwnedFd;

use io_uring::{IoUring, cqueue, squeue, types};
use nix::libc;
use slab::Slab;
use socket2::SockAddr;

use buf_ring::BufRing;
pub use features::{Features, KernelVersion};
pub use gather::{IOVECS_ALIGN, IOVECS_LEN, InBuffer};
pub use memory::Region;
pub(crate) use memory::{Family, Lent};
pub use provided::Message;
pub use sendmsg::{MESSAGE_ALIGN, MESSAGE_LEN, SOL_UDP, UDP_SEGMENT};
pub use token::{Op, Token};

/// Submission queue entries: enough for a full turn of TUN writes plus flow operations;
/// when it fills we submit early rather than queue without bound.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries: 16x the SQ so bursts of multishot reads never overflow it.
const CQ_ENTRIES: u32 = 16384;
/// Bytes of control messages each `recvmsg_multishot` buffer has room for: a UDP_GRO
/// segment size takes 24 (one cmsghdr and an int, aligned).
pub const RECVMSG_CONTROL: usize = 64;
/// Bytes a `recvmsg_multishot` buffer holds in front of its datagram: the kernel's
/// `io_uring_recvmsg_out` header, then the control messages.
pub const RECVMSG_OVERHEAD: usize = 16 + RECVMSG_CONTROL;

/// `user_data` of operations whose completion nobody waits for (cancels, closes, link
/// timeouts); every other operation's is its index in the in-flight table plus one.
const UNWATCHED: u64 = 0;

/// A completion copied out of the CQ, so the ring can be borrowed again while it is
/// handled. `token` is what the operation was submitted with.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub token: u64,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// Whether a multishot operation stays armed after this completion.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The provided buffer this completion filled, if any.
    pub fn buffer_id(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// Bytes `range` of a region, for an operation to read or write.
#[derive(Clone)]
pub struct Slice {
    pub region: Region,
    pub range: Range<usize>,
}

/// An operation in flight: the caller's token, what must outlive the operation, and
/// the provided buffer group it picks from, if any.
struct Pending {
    token: u64,
    keep: Keep,
    group: Option<u16>,
}

// The variants' contents are never read: they are held so they drop only when the
// operation has completed.
#[allow(dead_code)]
enum Keep {
    /// Points at no memory of ours, or only at the provided buffers the ring owns.
    Nothing,
    Region(Region),
    /// A connect's address and its linked timeout's timespec.
    Connect(Box<(SockAddr, types::Timespec)>),
    /// A timeout's timespec.
    Timeout(Box<types::Timespec>),
    /// Points at no memory; each successful completion is a new file descriptor.
    Accept,
    /// A multishot recvmsg's header (the kernel may read it at any re-issue).
    Msghdr(Box<libc::msghdr>),
    /// A gathered write's region (header and iovecs), and the provided buffer (group,
    /// id) lent for its payload, given back when it completes.
    Gathered(Region, u16, u16),
}

/// The ring, set up for one thread that submits and reaps everything itself.
pub struct Ring {
    ring: IoUring,
    /// Entries that found the SQ full while the kernel refused to take more (EBUSY:
    /// completions must be reaped first). Kept in order, flushed on the next submit;
    /// `groups` holds the length of each chain so links are never split.
    backlog: VecDeque<squeue::Entry>,
    groups: VecDeque<usize>,
    inflight: Slab<Pending>,
    /// Provided buffer rings, by group id.
    buf_rings: Vec<Option<BufRing>>,
    /// Entries of a chain being queued (kept to reuse its memory).
    chain: Vec<squeue::Entry>,
    /// Connections accepted by the completions last drained, until `take_accepted`
    /// claims them; those left unclaimed are closed at the next drain.
    accepted: Vec<OwnedFd>,
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
            inflight: Slab::new(),
            buf_rings: Vec::new(),
            chain: Vec::new(),
            accepted: Vec::new(),
        })
    }

    /// What this ring's kernel offers, capped as `cap` asks (see `Features::probe`).
    pub fn probe(&self, cap: Option<KernelVersion>) -> Result<Features, features::Unsupported> {
        Features::probe(&self.ring, cap)
    }
}

#[cfg(test)]
mod tests;
