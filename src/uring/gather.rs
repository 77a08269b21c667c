//! Gathered TUN writes: headers from a region and a payload still in the provided
//! buffer it was received into, one packet without copying the payload.

use std::ops::Range;
use std::os::fd::BorrowedFd;

use io_uring::opcode;
use nix::libc;

use super::sendmsg::overlap;
use super::submit::fd_of;
use super::{Keep, Ring, Slice};

/// Bytes a gathered write needs for its iovec array (see `Ring::write_gathered`), at an
/// offset aligned to `IOVECS_ALIGN`.
pub const IOVECS_LEN: usize = 2 * std::mem::size_of::<libc::iovec>();
pub const IOVECS_ALIGN: usize = std::mem::align_of::<libc::iovec>();

/// Where a payload lies: `len` bytes at `start` of provided buffer `bid` of `group`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InBuffer {
    pub group: u16,
    pub bid: u16,
    pub start: u32,
    pub len: u32,
}

impl Ring {
    /// Keeps provided buffer `bid` of `group` (handed over by a completion) out of the
    /// ring for a gathered write of its bytes, whatever `recycle` is asked meanwhile.
    /// A buffer we do not have is left alone (a write of it is then refused).
    pub fn hold(&mut self, group: u16, bid: u16) {
        if let Some(buffers) = self.buf_ring_mut(group) {
            buffers.lend(bid);
        }
    }

    /// Gives back held buffer `bid` of `group` whose write was never queued.
    pub fn unhold(&mut self, group: u16, bid: u16) {
        if let Some(buffers) = self.buf_ring_mut(group) {
            buffers.end_lend(bid);
        }
    }

    /// Writes `header` then `payload` as one packet (one `writev`, for a TUN). The
    /// payload's provided buffer was held (`hold`) and is given back when this write
    /// completes; the iovec array is written into bytes `iovecs` of the header's region (`IOVECS_LEN`
    /// bytes at an `IOVECS_ALIGN`-aligned offset, used by no other operation in flight),
    /// which the ring keeps alive until then. False (nothing queued, the buffer still
    /// held) when `iovecs` or `header` is outside the region, misaligned or
    /// overlapping, or the payload is not in a held buffer.
    pub fn write_gathered(
        &mut self,
        fd: BorrowedFd<'_>,
        header: Slice,
        iovecs: Range<usize>,
        payload: InBuffer,
        token: u64,
    ) -> bool {
        if iovecs.len() < IOVECS_LEN || header.range.start > header.range.end {
            return false;
        }
        let region = &header.region;
        let (Some(head), Some(at)) = (region.ptr(&header.range), region.ptr(&iovecs)) else {
            return false;
        };
        if at.align_offset(IOVECS_ALIGN) != 0 || overlap(&header.range, &iovecs) {
            return false;
        }
        let (start, payload_len) = (payload.start as usize, payload.len as usize);
        let Some(buffers) = self.buf_ring(payload.group) else {
            return false;
        };
        let Some(data) = buffers.lent(payload.bid, start..start + payload_len) else {
            return false;
        };
        let at = at.cast::<libc::iovec>();
        // SAFETY: `at` points at IOVECS_LEN bytes inside the live mapping (checked
        // above), aligned for iovecs, apart from the header bytes, and no Rust reference
        // into them exists (Rust code reaches a region only through `with_mut`, which
        // does not run now). The kernel reads them (and the header and payload they
        // point at) until the write completes: the region is kept alive by the in-flight
        // entry, the payload's buffer by the hold, which only that completion ends
        // (`drain`), and `recycle` leaves alone meanwhile.
        unsafe {
            at.write(libc::iovec {
                iov_base: head.cast(),
                iov_len: header.range.len(),
            });
            at.add(1).write(libc::iovec {
                iov_base: data.cast_mut().cast(),
                iov_len: payload_len,
            });
        }
        let entry = opcode::Writev::new(fd_of(fd), at.cast_const(), 2).build();
        let keep = Keep::Gathered(header.region, payload.group, payload.bid);
        self.submit_watched(entry, token, keep);
        true
    }
}
