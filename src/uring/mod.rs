//! The one io_uring ring every I/O of the proxy goes through. Its submitters are typed
//! and safe: whatever an operation points into (a region, the provided buffers, a
//! connect's address) is kept alive by the ring until the kernel has completed it, and
//! the ring is drained before any of it is freed.
#![allow(unsafe_code)]

mod buf_ring;
pub mod features;
pub mod memory;
pub mod token;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use nix::libc;
use slab::Slab;
use socket2::SockAddr;

use buf_ring::BufRing;
pub use features::{Features, KernelVersion};
pub use memory::{Family, Lent, Region};
pub use token::{Op, Token};

/// Submission queue entries: enough for a full turn of TUN writes plus flow operations;
/// when it fills we submit early rather than queue without bound.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries: 16x the SQ so bursts of multishot reads never overflow it.
const CQ_ENTRIES: u32 = 16384;
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

    /// Registers `count` (a power of two) provided buffers of `size` bytes as `group`,
    /// for multishot and buffer-selecting reads and receives. A group is registered once.
    pub fn provide_buffers(&mut self, group: u16, count: u16, size: usize) -> io::Result<()> {
        let slot = usize::from(group);
        if self.buf_rings.get(slot).is_some_and(Option::is_some) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let buffers = BufRing::new(&self.ring, group, count, size)?;
        if self.buf_rings.len() <= slot {
            self.buf_rings.resize_with(slot + 1, || None);
        }
        self.buf_rings[slot] = Some(buffers);
        Ok(())
    }

    /// The first `len` bytes of provided buffer `bid` of `group`, as the completion that
    /// handed it over left them; `None` for a buffer the kernel owns or none at all.
    pub fn buffer(&self, group: u16, bid: u16, len: usize) -> Option<&[u8]> {
        self.buf_ring(group)?.packet(bid, len)
    }

    /// Hands provided buffer `bid` back to the kernel (visible after `publish`).
    pub fn recycle(&mut self, group: u16, bid: u16) {
        if let Some(buffers) = self.buf_ring_mut(group) {
            buffers.give_back(bid);
        }
    }

    /// The kernel found no buffer of `group` (ENOBUFS): let more of them circulate.
    pub fn more_buffers(&mut self, group: u16) {
        if let Some(buffers) = self.buf_ring_mut(group) {
            buffers.grow();
        }
    }

    /// Idle: fewer buffers circulate and the pages of the others go back to the kernel.
    pub fn shrink_buffers(&mut self) {
        for buffers in self.buf_rings.iter_mut().flatten() {
            buffers.shrink();
        }
    }

    fn buf_ring_mut(&mut self, group: u16) -> Option<&mut BufRing> {
        self.buf_rings.get_mut(usize::from(group))?.as_mut()
    }

    /// Makes recycled buffers of `group` visible to the kernel.
    pub fn publish(&self, group: u16) {
        if let Some(buffers) = self.buf_ring(group) {
            buffers.publish();
        }
    }

    /// Buffers of `group` circulating now, and registered in all.
    pub fn buffer_use(&self, group: u16) -> (u16, u16) {
        self.buf_ring(group)
            .map_or((0, 0), |buffers| (buffers.circulating(), buffers.count()))
    }

    /// Size of each provided buffer of `group`.
    pub fn buffer_size(&self, group: u16) -> usize {
        self.buf_ring(group).map_or(0, BufRing::buf_size)
    }

    fn buf_ring(&self, group: u16) -> Option<&BufRing> {
        self.buf_rings.get(usize::from(group))?.as_ref()
    }

    /// A multishot read into the provided buffers of `group`: one completion per packet
    /// until it ends (ENOBUFS, an error, a cancel).
    pub fn read_multishot(&mut self, fd: BorrowedFd<'_>, group: u16, token: u64) {
        let entry = opcode::ReadMulti::new(fd_of(fd), 0, group).build();
        self.submit_picking(entry, token, group);
    }

    /// `count` single reads into buffers the kernel picks from `group`, each issued
    /// once the one before it has completed (hard links: whatever its result), so only
    /// one of them ever waits for the file.
    pub fn read_chain(&mut self, fd: BorrowedFd<'_>, group: u16, count: u16, token: u64) {
        let len = u32::try_from(self.buffer_size(group)).unwrap_or(u32::MAX);
        let mut chain = std::mem::take(&mut self.chain);
        chain.clear();
        for i in 0..count {
            let flags = if i + 1 < count {
                squeue::Flags::BUFFER_SELECT | squeue::Flags::IO_HARDLINK
            } else {
                squeue::Flags::BUFFER_SELECT
            };
            let entry = opcode::Read::new(fd_of(fd), std::ptr::null_mut(), len)
                .buf_group(group)
                .build()
                .flags(flags);
            let index = self.inflight.insert(Pending {
                token,
                keep: Keep::Nothing,
                group: Some(group),
            });
            chain.push(entry.user_data(index as u64 + 1));
        }
        // SAFETY: the reads point only into provided buffers, which the ring owns.
        unsafe { self.push(&chain) };
        self.chain = chain;
    }

    /// A multishot receive into the provided buffers of `group`.
    pub fn recv_multishot(&mut self, fd: BorrowedFd<'_>, group: u16, token: u64) {
        let entry = opcode::RecvMulti::new(fd_of(fd), group).build();
        self.submit_picking(entry, token, group);
    }

    /// Accepts connections on listening socket `fd` until cancelled or an error ends
    /// it: each completion with a result of 0 or more carries one, for `take_accepted`.
    pub fn accept_multishot(&mut self, fd: BorrowedFd<'_>, token: u64) {
        let entry = opcode::AcceptMulti::new(fd_of(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build();
        self.submit_watched(entry, token, Keep::Accept);
    }

    /// The connection an accept's `completion` carries, to own from now on.
    pub fn take_accepted(&mut self, completion: &Completion) -> Option<OwnedFd> {
        let at = self
            .accepted
            .iter()
            .position(|fd| fd.as_raw_fd() == completion.result)?;
        Some(self.accepted.swap_remove(at))
    }

    /// Completes (with -ETIME) once `after` has passed.
    pub fn timeout(&mut self, after: Duration, token: u64) {
        let spec = Box::new(types::Timespec::from(after));
        let entry = opcode::Timeout::new(&*spec).build();
        self.submit_watched(entry, token, Keep::Timeout(spec));
    }

    /// Writes `buf` (one packet, for a TUN).
    pub fn write(&mut self, fd: BorrowedFd<'_>, buf: Slice, token: u64) {
        let (ptr, len) = bounds(&buf);
        let entry = opcode::Write::new(fd_of(fd), ptr, len).build();
        self.submit_watched(entry, token, Keep::Region(buf.region));
    }

    /// Reads into `buf`.
    pub fn read(&mut self, fd: BorrowedFd<'_>, buf: Slice, token: u64) {
        let (ptr, len) = bounds(&buf);
        let entry = opcode::Read::new(fd_of(fd), ptr, len).build();
        self.submit_watched(entry, token, Keep::Region(buf.region));
    }

    /// Sends `buf` on a socket (never raising SIGPIPE).
    pub fn send(&mut self, fd: BorrowedFd<'_>, buf: Slice, token: u64) {
        let (ptr, len) = bounds(&buf);
        let entry = opcode::Send::new(fd_of(fd), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        self.submit_watched(entry, token, Keep::Region(buf.region));
    }

    /// Receives into `buf` from a socket.
    pub fn recv(&mut self, fd: BorrowedFd<'_>, buf: Slice, token: u64) {
        let (ptr, len) = bounds(&buf);
        let entry = opcode::Recv::new(fd_of(fd), ptr, len).build();
        self.submit_watched(entry, token, Keep::Region(buf.region));
    }

    /// Connects a socket to `addr`, giving up (ECANCELED) after `timeout`.
    pub fn connect(&mut self, fd: BorrowedFd<'_>, addr: SocketAddr, timeout: Duration, token: u64) {
        let args = Box::new((SockAddr::from(addr), types::Timespec::from(timeout)));
        let connect = opcode::Connect::new(fd_of(fd), args.0.as_ptr().cast(), args.0.len())
            .build()
            .flags(squeue::Flags::IO_LINK);
        let timeout = opcode::LinkTimeout::new(&args.1)
            .build()
            .user_data(UNWATCHED);
        let index = self.inflight.insert(Pending {
            token,
            keep: Keep::Connect(args),
            group: None,
        });
        let connect = connect.user_data(index as u64 + 1);
        // SAFETY: the address and the timespec live in the in-flight table until the
        // connect completes (the timeout is read when the chain is submitted).
        unsafe { self.push(&[connect, timeout]) };
    }

    /// Cancels every operation in flight on `fd`; each completes with ECANCELED.
    pub fn cancel_fd(&mut self, fd: BorrowedFd<'_>) {
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(fd_of(fd)).all())
            .build()
            .user_data(UNWATCHED);
        // SAFETY: a cancel points at no memory.
        unsafe { self.push(&[entry]) };
    }

    /// Closes `fd` on the ring (no completion is reported).
    pub fn close(&mut self, fd: OwnedFd) {
        let entry = opcode::Close::new(types::Fd(fd.into_raw_fd()))
            .build()
            .user_data(UNWATCHED);
        // SAFETY: a close points at no memory; the fd is owned by nobody now.
        unsafe { self.push(&[entry]) };
    }

    /// Records a watched operation and queues it.
    fn submit_watched(&mut self, entry: squeue::Entry, token: u64, keep: Keep) {
        self.submit_pending_entry(
            entry,
            Pending {
                token,
                keep,
                group: None,
            },
        );
    }

    /// Like `submit_watched`, for an operation that picks buffers of `group`: each
    /// completion carrying one hands it over (see `buffer`).
    fn submit_picking(&mut self, entry: squeue::Entry, token: u64, group: u16) {
        self.submit_pending_entry(
            entry,
            Pending {
                token,
                keep: Keep::Nothing,
                group: Some(group),
            },
        );
    }

    fn submit_pending_entry(&mut self, entry: squeue::Entry, pending: Pending) {
        let index = self.inflight.insert(pending);
        let entry = entry.user_data(index as u64 + 1);
        // SAFETY: every buffer the entry points into is kept alive by its in-flight
        // entry (`keep`) or is a provided buffer owned by the ring, until the kernel
        // reports the operation complete.
        unsafe { self.push(&[entry]) };
    }

    /// Queues `entries` back to back (a linked chain is never split across submits).
    /// When the kernel cannot take more yet, they wait in a backlog.
    ///
    /// # Safety
    /// Every buffer, address and timespec an entry points to must stay valid and unmoved
    /// until its completion has been reaped (the kernel may read or write it until then).
    unsafe fn push(&mut self, entries: &[squeue::Entry]) {
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
            if !cqueue::more(flags) {
                self.inflight.remove(index);
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

/// Pointer and length of a slice of a region; a range outside the region becomes an
/// empty buffer at its start rather than a pointer past it.
fn bounds(buf: &Slice) -> (*mut u8, u32) {
    match buf.region.ptr(&buf.range) {
        Some(ptr) => (ptr, u32::try_from(buf.range.len()).unwrap_or(u32::MAX)),
        None => (buf.region.ptr(&(0..0)).unwrap_or(std::ptr::null_mut()), 0),
    }
}

fn fd_of(fd: BorrowedFd<'_>) -> types::Fd {
    types::Fd(fd.as_raw_fd() as RawFd)
}

/// Errors from io_uring_enter that only mean "not now": a timeout, a signal, or a
/// completion backlog that the next drain clears.
fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
    )
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::net::UnixDatagram;

    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().expect("pipe")
    }

    fn completions(ring: &mut Ring, want: usize) -> Vec<Completion> {
        let mut all = Vec::new();
        let mut batch = Vec::new();
        for _ in 0..100 {
            if all.len() >= want {
                break;
            }
            ring.submit_and_wait(Some(Duration::from_millis(10)))
                .expect("io_uring_enter");
            ring.drain(&mut batch, 64);
            all.extend_from_slice(&batch);
        }
        all
    }

    #[test]
    fn a_region_outlives_its_owner_until_the_read_into_it_completes() {
        let mut ring = Ring::new().expect("io_uring");
        let (reader, writer) = pipe();
        let region = Region::new(4096).unwrap();
        let buf = Slice {
            region: region.clone(),
            range: 100..200,
        };
        ring.read(reader.as_fd(), buf, 7);
        let _ = ring.submit_and_wait(Some(Duration::ZERO));
        assert_eq!(region.holders(), 2, "the pending read holds the region");
        let watch = region.clone();
        drop(region);
        nix::unistd::write(&writer, b"hello").expect("write the pipe");
        let done = completions(&mut ring, 1);
        assert_eq!((done[0].token, done[0].result), (7, 5));
        assert_eq!(watch.kernel_read(100..105), b"hello");
        assert_eq!(watch.holders(), 1, "let go once complete");
    }

    #[test]
    fn a_multishot_receive_hands_over_each_buffer_once() {
        let mut ring = Ring::new().expect("io_uring");
        ring.provide_buffers(3, 4, 256).unwrap();
        assert!(
            ring.provide_buffers(3, 4, 256).is_err(),
            "a group is registered once"
        );
        let (ours, peer) = UnixDatagram::pair().expect("socketpair");
        ring.recv_multishot(ours.as_fd(), 3, 9);
        let _ = ring.submit_and_wait(Some(Duration::ZERO));
        peer.send(b"one").unwrap();
        peer.send(b"two").unwrap();
        let done = completions(&mut ring, 2);
        assert_eq!(done.len(), 2);
        for (completion, expected) in done.iter().zip([&b"one"[..], b"two"]) {
            assert!(completion.more(), "still armed");
            let bid = completion.buffer_id().expect("a provided buffer");
            let len = completion.result as usize;
            assert_eq!(ring.buffer(3, bid, len), Some(expected));
        }
        assert_eq!(
            ring.inflight.len(),
            1,
            "one entry while the receive stays armed"
        );
        let first = done[0].buffer_id().unwrap();
        ring.recycle(3, first);
        assert_eq!(ring.buffer(3, first, 3), None, "the kernel's again");
        ring.recycle(3, first); // twice: ignored, never two ring entries for one buffer
        ring.recycle(3, 400); // not a buffer at all
        assert_eq!(ring.buffer(3, 400, 1), None);
        assert!(ring.cancel_all(Duration::from_secs(1)));
        assert!(ring.inflight.is_empty());
    }

    #[test]
    fn a_chain_of_reads_takes_what_is_queued_and_is_cancelled_quickly() {
        let mut ring = Ring::new().expect("io_uring");
        ring.provide_buffers(2, 16, 64).unwrap();
        let (reader, writer) = pipe();
        ring.read_chain(reader.as_fd(), 2, 16, 5);
        for byte in [b"a", b"b", b"c"] {
            nix::unistd::write(&writer, byte).expect("write the pipe");
            let done = completions(&mut ring, 1);
            assert_eq!(done.len(), 1, "one read at a time takes each write");
            let bid = done[0].buffer_id().unwrap();
            assert_eq!(ring.buffer(2, bid, 1), Some(&byte[..]));
            ring.recycle(2, bid);
            ring.publish(2);
        }
        assert_eq!(ring.inflight.len(), 13);
        let started = Instant::now();
        assert!(ring.cancel_all(Duration::from_secs(1)));
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "each cancelled read started the next: {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_multishot_accept_hands_over_each_connection_once() {
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        let dir = std::env::temp_dir().join(format!("uring-accept-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let listener = UnixListener::bind(&dir).unwrap();
        let mut first = UnixStream::connect(&dir).unwrap();
        let mut second = UnixStream::connect(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let mut ring = Ring::new().expect("io_uring");
        // Both are waiting: the accept takes them as it is submitted.
        ring.accept_multishot(listener.as_fd(), 11);
        ring.submit_and_wait(Some(Duration::from_secs(1))).unwrap();
        let mut done = Vec::new();
        ring.drain(&mut done, 16);
        assert_eq!(done.len(), 2, "{done:?}");
        assert!(done.iter().all(|c| c.token == 11 && c.more()), "{done:?}");
        // The first is claimed and works; the second is not, and is closed.
        let owned = ring.take_accepted(&done[0]).expect("an fd");
        assert!(ring.take_accepted(&done[0]).is_none(), "handed over once");
        let mut server = UnixStream::from(owned);
        first.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        ring.drain(&mut Vec::new(), 16);
        let mut rest = Vec::new();
        assert_eq!(
            second.read_to_end(&mut rest).unwrap(),
            0,
            "unclaimed: closed"
        );
        ring.timeout(Duration::from_millis(1), 12);
        let done = completions(&mut ring, 1);
        assert_eq!((done[0].token, done[0].result), (12, -libc::ETIME));
        assert!(ring.take_accepted(&done[0]).is_none(), "not an accept's");
        assert!(ring.cancel_all(Duration::from_secs(1)));
    }

    #[test]
    fn cancel_all_ends_every_pending_operation() {
        let mut ring = Ring::new().expect("io_uring");
        let pipes: Vec<_> = (0..4).map(|_| pipe()).collect();
        let region = Region::new(4096).unwrap();
        for (i, (reader, _)) in pipes.iter().enumerate() {
            let buf = Slice {
                region: region.clone(),
                range: i * 16..i * 16 + 16,
            };
            ring.read(reader.as_fd(), buf, i as u64);
        }
        let _ = ring.submit_and_wait(Some(Duration::ZERO));
        assert_eq!(ring.inflight.len(), 4);
        assert!(ring.cancel_all(Duration::from_secs(1)));
        assert!(ring.inflight.is_empty());
        assert_eq!(
            region.holders(),
            1,
            "no operation holds the memory any more"
        );
    }
}
