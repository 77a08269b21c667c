//! The ring's provided buffer groups: registered once, lent, handed back, grown, shrunk.

use std::io;

use io_uring::types;

use super::Ring;
use super::buf_ring::BufRing;

/// A datagram a multishot `recvmsg` delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub payload: &'a [u8],
    /// Its control messages (see `sys::cmsg`).
    pub control: &'a [u8],
    /// It was longer than the buffer (`payload` is only its start), or its control
    /// messages were (a segment size may be missing): either way not to be relayed.
    pub truncated: bool,
}

impl Ring {
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

    /// What a `recvmsg_multishot` completion of `len` bytes left in provided buffer `bid`
    /// of `group`; `None` for a buffer the kernel owns or one that holds no message.
    pub fn message(&self, group: u16, bid: u16, len: usize) -> Option<Message<'_>> {
        let buffer = self.buffer(group, bid, len)?;
        let out = types::RecvMsgOut::parse(buffer, &super::submit::recvmsg_template()).ok()?;
        // Its slices borrow the parser, not the buffer: taken again from the buffer,
        // laid out as the template asks (no name, then the control field).
        let control_start = super::RECVMSG_OVERHEAD - super::RECVMSG_CONTROL;
        let control = control_start..control_start + out.control_data().len();
        let payload = super::RECVMSG_OVERHEAD..super::RECVMSG_OVERHEAD + out.payload_data().len();
        Some(Message {
            payload: buffer.get(payload)?,
            control: buffer.get(control)?,
            truncated: out.is_payload_truncated() || out.is_control_data_truncated(),
        })
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

    pub(super) fn buf_ring_mut(&mut self, group: u16) -> Option<&mut BufRing> {
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

    pub(super) fn buf_ring(&self, group: u16) -> Option<&BufRing> {
        self.buf_rings.get(usize::from(group))?.as_ref()
    }
}
