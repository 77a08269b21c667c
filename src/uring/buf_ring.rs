//! A provided-buffer ring: packet buffers the kernel picks from for multishot reads and
//! receives. Owned by the `Ring`, which unregisters (and frees) it only once idle.
//!
//! Only some of the buffers circulate: the kernel takes them in ring order, so the fewer
//! there are, the warmer they stay in the cache and the less memory is resident. The
//! set doubles when the kernel ran out (ENOBUFS) and shrinks again when idle, the pages
//! of the buffers set aside given back to the kernel.
#![allow(unsafe_code)]

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::{IoUring, Submitter};

use crate::sys::Mapping;

/// Buffers that circulate to begin with (and after an idle shrink).
const INITIAL_CIRCULATING: u16 = 32;

/// Buffers registered with the kernel under one group id. The kernel consumes entries
/// from the head; we return each buffer (at the tail) once its packet is processed.
pub struct BufRing {
    entries: *mut BufRingEntry,
    layout: Layout,
    count: u16,
    buf_size: usize,
    /// Written by the kernel through the addresses in the ring entries; Rust only ever
    /// reads buffers a completion has handed over (`ours`).
    storage: Mapping,
    tail: u16,
    group: u16,
    /// Buffers a completion has handed to us and we have not given back (a bitset).
    ours: Vec<u64>,
    /// Of those, buffers an operation in flight reads (a gathered write): not given
    /// back until it completes, whoever asks (a bitset).
    lent: Vec<u64>,
    /// Buffers neither in the ring nor ours, set aside while fewer circulate.
    parked: Vec<u16>,
    /// How many buffers to keep in circulation (in the ring or ours).
    circulating: u16,
}

impl BufRing {
    /// Maps `count` (a power of two) buffers of `buf_size` bytes, registers them and puts
    /// the first of them in the ring.
    pub fn new(ring: &IoUring, group: u16, count: u16, buf_size: usize) -> io::Result<BufRing> {
        assert!(
            count.is_power_of_two(),
            "buffer ring size must be a power of two"
        );
        let layout = Layout::from_size_align(usize::from(count) * size_of::<BufRingEntry>(), 4096)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let storage = Mapping::new(usize::from(count) * buf_size)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: the layout has non-zero size; zeroed memory is a valid (empty) ring.
        let entries = unsafe { alloc_zeroed(layout) }.cast::<BufRingEntry>();
        if entries.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let circulating = INITIAL_CIRCULATING.min(count);
        let mut ring_buf = BufRing {
            entries,
            layout,
            count,
            buf_size,
            storage,
            tail: 0,
            group,
            ours: vec![0; usize::from(count).div_ceil(64)],
            lent: vec![0; usize::from(count).div_ceil(64)],
            parked: (circulating..count).rev().collect(),
            circulating,
        };
        register(&ring.submitter(), &ring_buf)?;
        for bid in 0..circulating {
            ring_buf.push(bid);
        }
        ring_buf.publish();
        Ok(ring_buf)
    }

    /// Buffers registered.
    pub fn count(&self) -> u16 {
        self.count
    }

    /// Buffers in circulation (in the ring or handed to us).
    pub fn circulating(&self) -> u16 {
        self.circulating
    }

    /// Bytes in each buffer: the most one read can deliver.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    fn is_ours(&self, bid: u16) -> bool {
        bid < self.count && self.ours[usize::from(bid / 64)] & (1 << (bid % 64)) != 0
    }

    fn set_ours(&mut self, bid: u16, ours: bool) {
        set_bit(&mut self.ours, bid, ours);
    }

    fn is_lent(&self, bid: u16) -> bool {
        bid < self.count && self.lent[usize::from(bid / 64)] & (1 << (bid % 64)) != 0
    }

    /// Keeps buffer `bid` (ours) out of the ring for an operation that is to read it
    /// (`lent`): `give_back` leaves it alone until `end_lend`. A buffer not ours is
    /// left alone.
    pub fn lend(&mut self, bid: u16) {
        if self.is_ours(bid) {
            set_bit(&mut self.lent, bid, true);
        }
    }

    /// Where bytes `range` of lent buffer `bid` are, for the operation it is lent to;
    /// `None` for a buffer not lent or a range past its end.
    pub fn lent(&self, bid: u16, range: std::ops::Range<usize>) -> Option<*const u8> {
        if !self.is_lent(bid) || range.start > range.end || range.end > self.buf_size {
            return None;
        }
        let start = usize::from(bid) * self.buf_size + range.start;
        // SAFETY: inside the mapping (`range` is inside buffer `bid`, checked above).
        Some(unsafe { self.storage.as_ptr().add(start) }.cast_const())
    }

    /// The operation that read lent buffer `bid` has completed (or none will): it goes
    /// back.
    pub fn end_lend(&mut self, bid: u16) {
        if self.is_lent(bid) {
            set_bit(&mut self.lent, bid, false);
            self.give_back(bid);
        }
    }

    /// A completion handed buffer `bid` over: the kernel is done with it until it is
    /// given back. False for a buffer that cannot be handed over (out of range, or
    /// already ours).
    pub fn take(&mut self, bid: u16) -> bool {
        if bid >= self.count || self.is_ours(bid) {
            return false;
        }
        self.set_ours(bid, true);
        true
    }

    /// The first `len` bytes of buffer `bid`, as a completion filled it in; `None` for a
    /// buffer that is not ours (the kernel may be writing it) or a length past its end.
    pub fn packet(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if !self.is_ours(bid) || len > self.buf_size {
            return None;
        }
        let start = usize::from(bid) * self.buf_size;
        // SAFETY: inside the mapping; the buffer is ours, so the kernel does not write it
        // until it is given back, which needs `&mut self` and so ends this borrow.
        Some(unsafe { std::slice::from_raw_parts(self.storage.as_ptr().add(start), len) })
    }

    /// Gives buffer `bid` back: into the ring (visible after `publish`), or set aside
    /// while fewer buffers circulate. Buffers not ours are left alone: handing the
    /// kernel one twice would let it write into a buffer still being read; so are lent
    /// ones, which go back when the operation reading them completes (`end_lend`).
    pub fn give_back(&mut self, bid: u16) {
        if !self.is_ours(bid) || self.is_lent(bid) {
            return;
        }
        self.set_ours(bid, false);
        // Every buffer is in the ring, ours or parked; this one is in none right now.
        let circulating_without_it = usize::from(self.count) - self.parked.len() - 1;
        if circulating_without_it >= usize::from(self.circulating) {
            self.parked.push(bid);
        } else {
            self.push(bid);
        }
    }

    /// The kernel ran out of buffers: let twice as many circulate.
    pub fn grow(&mut self) {
        let target = self.circulating.saturating_mul(2).min(self.count);
        while usize::from(self.circulating) < usize::from(target) {
            let Some(bid) = self.parked.pop() else {
                break;
            };
            self.push(bid);
            self.circulating += 1;
        }
        self.circulating = target;
    }

    /// Idle: back to the initial number of circulating buffers (the others are set aside
    /// as they come back), and the pages of every buffer not ours returned to the
    /// kernel. Those in the ring stay there; the kernel writes into them again when a
    /// packet comes, on this thread (DEFER_TASKRUN), so never while this runs.
    pub fn shrink(&mut self) {
        self.circulating = INITIAL_CIRCULATING.min(self.count);
        // In runs of neighbours: buffers smaller than a page give their pages back too.
        let mut run_start = None;
        for bid in 0..=self.count {
            let free = bid < self.count && !self.is_ours(bid);
            match (free, run_start) {
                (true, None) => run_start = Some(bid),
                (false, Some(start)) => {
                    let size = self.buf_size;
                    self.storage
                        .discard(usize::from(start) * size..usize::from(bid) * size);
                    run_start = None;
                }
                _ => {}
            }
        }
    }

    /// Puts buffer `bid` in the ring at the tail.
    fn push(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.count - 1));
        let addr = self.storage.as_ptr() as u64 + (usize::from(bid) * self.buf_size) as u64;
        // SAFETY: `slot` < count, inside the allocation; the kernel only reads entries
        // between head and the published tail, and this slot is past the tail: at most
        // `count` buffers are ever in the ring, each once (`ours` and `parked` keep
        // every buffer in exactly one place).
        let entry = unsafe { &mut *self.entries.add(slot) };
        entry.set_addr(addr);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers given back visible to the kernel.
    pub fn publish(&self) {
        // SAFETY: the tail field lives inside the first entry of our live allocation;
        // the kernel reads it concurrently, hence the atomic release store.
        let tail = unsafe { &*(BufRingEntry::tail(self.entries).cast::<AtomicU16>()) };
        tail.store(self.tail, Ordering::Release);
    }
}

fn set_bit(bits: &mut [u64], bid: u16, on: bool) {
    let (word, bit) = (usize::from(bid / 64), 1u64 << (bid % 64));
    if on {
        bits[word] |= bit;
    } else {
        bits[word] &= !bit;
    }
}

fn register(submitter: &Submitter<'_>, ring_buf: &BufRing) -> io::Result<()> {
    // SAFETY: the entry array stays allocated until `drop`, and the `Ring` that owns
    // this BufRing drops it only after every operation using it has completed and it
    // has been unregistered (or never, if the ring could not be drained).
    unsafe {
        submitter.register_buf_ring_with_flags(
            ring_buf.entries as u64,
            ring_buf.count,
            ring_buf.group,
            0,
        )
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { dealloc(self.entries.cast(), self.layout) };
    }
}
