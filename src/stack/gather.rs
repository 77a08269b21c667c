//! Header slots for gathered TUN writes: the headers of a packet whose payload the
//! write takes from the receive buffer it arrived in, and the write's iovec array.

use std::ops::Range;

use crate::uring::{IOVECS_ALIGN, IOVECS_LEN, Region, Slice};

/// Gathered writes in flight at once: each holds one of the receive buffers every
/// datagram flow shares (256) until it completes, so at most a quarter of them are
/// held; with every slot taken, payloads are copied as before.
pub const SLOTS: u16 = 64;
/// Bytes of one slot: the iovec array, then room for the largest headers (a 12-byte
/// virtio-net header, 40 of IPv6, 8 of UDP).
const SLOT_LEN: usize = 128;
/// Where the headers start in a slot (after the iovecs, aligned for them).
const HEADERS_AT: usize = IOVECS_LEN.next_multiple_of(IOVECS_ALIGN);

/// Fixed slots in one region the ring writes from, each free again once its write
/// completes.
pub struct Slots {
    region: Region,
    free: Vec<u16>,
}

impl Slots {
    /// `None` when their memory cannot be had.
    pub fn new() -> Option<Slots> {
        Some(Slots {
            region: Region::new(usize::from(SLOTS) * SLOT_LEN)?,
            free: (0..SLOTS).rev().collect(),
        })
    }

    /// Fills a free slot's headers with what `build` writes (returning their length),
    /// and takes it; `None` with none free or nothing written.
    pub fn fill(&mut self, build: impl FnOnce(&mut [u8]) -> Option<usize>) -> Option<(u16, u32)> {
        let &slot = self.free.last()?;
        let headers = self.headers(slot, SLOT_LEN - HEADERS_AT);
        let len = self
            .region
            .with_mut(headers, build)
            .filter(|&len| len <= SLOT_LEN - HEADERS_AT)?;
        self.free.pop();
        Some((slot, len as u32))
    }

    /// Slot `slot`'s `len` header bytes, and where its iovec array goes.
    pub fn write(&self, slot: u16, len: u32) -> (Slice, Range<usize>) {
        let start = usize::from(slot) * SLOT_LEN;
        let headers = Slice {
            region: self.region.clone(),
            range: self.headers(slot, len as usize),
        };
        (headers, start..start + IOVECS_LEN)
    }

    fn headers(&self, slot: u16, len: usize) -> Range<usize> {
        let start = usize::from(slot) * SLOT_LEN + HEADERS_AT;
        start..start + len
    }

    /// Slot `slot`'s write completed (or was never submitted).
    pub fn release(&mut self, slot: u16) {
        if slot < SLOTS && !self.free.contains(&slot) {
            self.free.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_slot_is_taken_once_until_released() {
        let mut slots = Slots::new().unwrap();
        let mut taken = Vec::new();
        while let Some((slot, len)) = slots.fill(|buf| {
            buf[..3].copy_from_slice(&[1, 2, 3]);
            Some(3)
        }) {
            assert_eq!(len, 3);
            taken.push(slot);
        }
        assert_eq!(taken.len(), usize::from(SLOTS), "bounded: then none");
        let (headers, iovecs) = slots.write(taken[5], 3);
        assert_eq!(headers.region.kernel_read(headers.range.clone()), [1, 2, 3]);
        assert!(
            iovecs.end <= headers.range.start,
            "the iovecs before the headers"
        );
        assert_eq!(iovecs.start % IOVECS_ALIGN, 0);
        slots.release(taken[5]);
        slots.release(taken[5]);
        slots.release(SLOTS);
        assert_eq!(
            slots.free,
            [taken[5]],
            "released once, and only a real slot"
        );
        assert_eq!(slots.fill(|_| None), None, "nothing written: nothing taken");
        assert_eq!(
            slots.fill(|_| Some(SLOT_LEN)),
            None,
            "more than a slot holds"
        );
        assert_eq!(slots.fill(|_| Some(1)), Some((taken[5], 1)));
    }
}
