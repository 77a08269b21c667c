//! Segmented sends: one `sendmsg` whose UDP_SEGMENT control message has the kernel cut a
//! buffer into equal datagrams (the last may be shorter).

use std::ops::Range;
use std::os::fd::BorrowedFd;

use io_uring::opcode;
use nix::libc;

use super::submit::fd_of;
use super::{Keep, Ring, Slice};

/// `SOL_UDP` level, `UDP_SEGMENT` option (linux/udp.h).
pub const SOL_UDP: libc::c_int = 17;
pub const UDP_SEGMENT: libc::c_int = 103;

/// Control space of one UDP_SEGMENT message: a cmsghdr (16 bytes) and its u16, padded
/// to 8 bytes (CMSG_SPACE(2) = 24).
const CONTROL_WORDS: usize = 3;

/// What the kernel reads for a segmented send: the message header, its one iovec and
/// its control message, side by side in the region whose bytes are sent.
#[repr(C)]
struct Message {
    header: libc::msghdr,
    iov: libc::iovec,
    control: [u64; CONTROL_WORDS],
}

/// Bytes a segmented send needs for its message header (see `Ring::send_segmented`),
/// at an offset aligned to `MESSAGE_ALIGN`.
pub const MESSAGE_LEN: usize = std::mem::size_of::<Message>();
pub const MESSAGE_ALIGN: usize = std::mem::align_of::<Message>();

impl Ring {
    /// Sends `buf` on a connected UDP socket as datagrams of `segment` bytes each (the
    /// last may be shorter) in one `sendmsg`. The message header is written into bytes
    /// `message` of the same region (`MESSAGE_LEN` bytes at a `MESSAGE_ALIGN`-aligned
    /// offset, used by no other operation in flight), so the region the ring keeps alive
    /// until the completion holds everything the kernel reads. False (nothing queued) when
    /// `message` or `buf` is outside the region or misaligned.
    pub fn send_segmented(
        &mut self,
        fd: BorrowedFd<'_>,
        buf: Slice,
        message: Range<usize>,
        segment: u16,
        token: u64,
    ) -> bool {
        if message.len() < MESSAGE_LEN || buf.range.start > buf.range.end {
            return false;
        }
        let (Some(data), Some(at)) = (buf.region.ptr(&buf.range), buf.region.ptr(&message)) else {
            return false;
        };
        if at.align_offset(MESSAGE_ALIGN) != 0 || overlap(&buf.range, &message) {
            return false;
        }
        let at = at.cast::<Message>();
        // SAFETY: `at` points at MESSAGE_LEN bytes inside the live mapping (checked
        // above), aligned for a Message, apart from the bytes sent, and no Rust
        // reference into them exists (Rust code reaches a region only through
        // `with_mut`, which does not run now). The kernel reads the message until the
        // send completes; the region is kept alive by the in-flight entry until then.
        unsafe {
            // All zero first: msg_name, msg_flags and the control padding stay so.
            std::ptr::write_bytes(at, 0, 1);
            let iov = std::ptr::addr_of_mut!((*at).iov);
            (*iov).iov_base = data.cast();
            (*iov).iov_len = buf.range.len();
            let control = std::ptr::addr_of_mut!((*at).control).cast::<libc::cmsghdr>();
            (*control).cmsg_len = libc::CMSG_LEN(2) as _;
            (*control).cmsg_level = SOL_UDP;
            (*control).cmsg_type = UDP_SEGMENT;
            libc::CMSG_DATA(control)
                .cast::<u16>()
                .write_unaligned(segment);
            let header = std::ptr::addr_of_mut!((*at).header);
            (*header).msg_iov = iov;
            (*header).msg_iovlen = 1;
            (*header).msg_control = control.cast();
            (*header).msg_controllen = libc::CMSG_SPACE(2) as _;
        }
        let header = at.cast::<libc::msghdr>().cast_const();
        let entry = opcode::SendMsg::new(fd_of(fd), header)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        self.submit_watched(entry, token, Keep::Region(buf.region));
        true
    }
}

pub(super) fn overlap(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}
