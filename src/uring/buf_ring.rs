//! A provided-buffer ring: packet buffers the kernel picks from for multishot reads and
//! receives. Owned by the `Ring`, which unregisters it (and frees it) only once idle.
#![allow(unsafe_code)]

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::{IoUring, Submitter};

/// Buffers registered with the kernel under one group id. The kernel consumes entries
/// from the head; we return each buffer (at the tail) once its packet is processed.
pub struct BufRing {
    entries: *mut BufRingEntry,
    layout: Layout,
    count: u16,
    buf_size: usize,
    storage: Box<[u8]>,
    tail: u16,
    group: u16,
}

impl BufRing {
    /// Allocates `count` (a power of two) buffers of `buf_size` bytes and registers them.
    pub fn new(ring: &IoUring, group: u16, count: u16, buf_size: usize) -> io::Result<BufRing> {
        assert!(
            count.is_power_of_two(),
            "buffer ring size must be a power of two"
        );
        let layout = Layout::from_size_align(usize::from(count) * size_of::<BufRingEntry>(), 4096)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has non-zero size; zeroed memory is a valid (empty) ring.
        let entries = unsafe { alloc_zeroed(layout) }.cast::<BufRingEntry>();
        if entries.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut ring_buf = BufRing {
            entries,
            layout,
            count,
            buf_size,
            storage: vec![0u8; usize::from(count) * buf_size].into_boxed_slice(),
            tail: 0,
            group,
        };
        register(&ring.submitter(), &ring_buf)?;
        for bid in 0..count {
            ring_buf.recycle(bid);
        }
        ring_buf.publish();
        Ok(ring_buf)
    }

    /// Bytes in each buffer: the most one read can deliver.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// The first `len` bytes of buffer `bid`, as filled in by a completed read.
    pub fn packet(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= self.count || len > self.buf_size {
            return None;
        }
        let start = usize::from(bid) * self.buf_size;
        Some(&self.storage[start..start + len])
    }

    /// Hands buffer `bid` back to the kernel (visible after `publish`).
    pub fn recycle(&mut self, bid: u16) {
        debug_assert!(bid < self.count);
        let slot = usize::from(self.tail & (self.count - 1));
        let addr = self.storage[usize::from(bid) * self.buf_size..].as_ptr() as u64;
        // SAFETY: `slot` < count, inside the allocation; the kernel only reads entries
        // between head and the published tail, and this slot is past the tail.
        let entry = unsafe { &mut *self.entries.add(slot) };
        entry.set_addr(addr);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes recycled buffers visible to the kernel.
    pub fn publish(&self) {
        // SAFETY: the tail field lives inside the first entry of our live allocation;
        // the kernel reads it concurrently, hence the atomic release store.
        let tail = unsafe { &*(BufRingEntry::tail(self.entries).cast::<AtomicU16>()) };
        tail.store(self.tail, Ordering::Release);
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
