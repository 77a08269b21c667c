//! The typed submitters, and the queue that takes their entries to the kernel.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::{opcode, squeue, types};
use nix::libc;
use socket2::SockAddr;

use super::{Keep, Pending, Ring, Slice, UNWATCHED};

impl Ring {
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

    /// A multishot `recvmsg` into the provided buffers of `group`: each completion's
    /// buffer holds the kernel's header, `RECVMSG_CONTROL` bytes of control messages
    /// and the datagram (see `Ring::message`), so that a UDP_GRO segment size comes
    /// with every coalesced datagram. An empty datagram ends it (its completion says
    /// so), as it ends a multishot `recv`.
    pub fn recvmsg_multishot(&mut self, fd: BorrowedFd<'_>, group: u16, token: u64) {
        let msghdr = Box::new(recvmsg_template());
        let entry = opcode::RecvMsgMulti::new(fd_of(fd), &*msghdr, group).build();
        self.submit_pending_entry(
            entry,
            Pending {
                token,
                keep: Keep::Msghdr(msghdr),
                group: Some(group),
            },
        );
    }

    /// Accepts connections on listening socket `fd` until cancelled or an error ends
    /// it: each completion with a result of 0 or more carries one, for `take_accepted`.
    pub fn accept_multishot(&mut self, fd: BorrowedFd<'_>, token: u64) {
        let entry = opcode::AcceptMulti::new(fd_of(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build();
        self.submit_watched(entry, token, Keep::Accept);
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
    pub(super) fn submit_watched(&mut self, entry: squeue::Entry, token: u64, keep: Keep) {
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
    pub(super) unsafe fn push(&mut self, entries: &[squeue::Entry]) {
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
        self.enter(1, timeout)
    }

    /// Submits everything queued and lets the kernel finish what it can at once, up to
    /// `completions`, without sleeping. This is for a chain of reads over packets
    /// already queued: the kernel issues each link from task work once the one before
    /// it completed, and a wait for one completion returns after the first link or two,
    /// so the chain would take one or two packets a turn; asked for more, the kernel
    /// runs the chain on until a read finds nothing (it then waits for the file) or
    /// `completions` are there.
    pub fn submit_and_run(&mut self, completions: u32) -> io::Result<()> {
        self.enter(completions as usize, Some(Duration::ZERO))
    }

    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        self.flush_backlog();
        let result = match timeout {
            None => self.ring.submit_and_wait(want),
            Some(timeout) => {
                let ts = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(err) if is_transient(&err) => Ok(()),
            Err(err) => Err(err),
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

/// What a multishot `recvmsg` is given: no name (the sockets are connected) and room for
/// `RECVMSG_CONTROL` bytes of control messages; the kernel reads only those two lengths.
pub(super) fn recvmsg_template() -> libc::msghdr {
    // SAFETY: msghdr is plain data (lengths, flags, pointers), for which all zeroes
    // (null pointers) is a valid value.
    let mut msghdr: libc::msghdr = unsafe { std::mem::zeroed() };
    msghdr.msg_controllen = super::RECVMSG_CONTROL as _;
    msghdr
}

pub(super) fn fd_of(fd: BorrowedFd<'_>) -> types::Fd {
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
