//! Memory the kernel reads and writes for in-flight operations: shared regions that the
//! ring keeps alive until each operation on them has completed, and state (a flow's
//! smoltcp buffers) that borrows such a region for as long as it lives.
//!
//! What the kernel does to a lent region: it sends bytes smoltcp holds (the unsent
//! data of its receive buffer, which nothing changes until the send completes) and
//! receives into the free window of smoltcp's send buffer, which smoltcp touches only
//! when we commit bytes there, after the receive has completed. Those writes happen
//! inside this thread's io_uring_enter (DEFER_TASKRUN), never while Rust code runs.
//! Rust's aliasing rules know nothing of writes beside a live `&mut` (the state's);
//! as with read(2) into a buffer a struct borrows, soundness rests on those bytes not
//! being accessed until the completion is seen, which the relay guarantees.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::ops::Range;
use std::rc::Rc;

use crate::sys::Mapping;

/// A block of memory, shared by its owner and by every in-flight operation that points
/// into it: the mapping goes away only when the last of them lets go, so a buffer can
/// never be freed under the kernel.
#[derive(Clone)]
pub struct Region(Rc<Inner>);

struct Inner {
    mapping: Mapping,
    /// Rust code holds a `&mut` into the region (`with_mut`, or a `Lent` for good).
    borrowed: Cell<bool>,
}

impl Region {
    /// `len` zeroed bytes, resident only once touched; `None` when memory (or the map
    /// count) is exhausted.
    pub fn new(len: usize) -> Option<Region> {
        Some(Region(Rc::new(Inner {
            mapping: Mapping::new(len)?,
            borrowed: Cell::new(false),
        })))
    }

    pub fn len(&self) -> usize {
        self.0.mapping.len()
    }

    /// Handles to this region alive (its owner's and in-flight operations').
    #[cfg(test)]
    pub fn holders(&self) -> usize {
        Rc::strong_count(&self.0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives the pages wholly inside `range` back to the kernel; they read as zero
    /// afterwards. For bytes nothing refers to any more (free buffers of a pool).
    pub fn discard(&self, range: Range<usize>) {
        self.0.mapping.discard(range);
    }

    /// Discards the free buffers `free` (indices of `size`-byte buffers) in runs of
    /// neighbours, so that buffers smaller than a page give their pages back too.
    pub fn discard_buffers(&self, free: impl IntoIterator<Item = u16>, size: usize) {
        let mut free: Vec<u16> = free.into_iter().collect();
        free.sort_unstable();
        let mut run: Option<Range<usize>> = None;
        for index in free {
            let start = usize::from(index) * size;
            run = match run {
                Some(r) if r.end == start => Some(r.start..start + size),
                Some(r) => {
                    self.discard(r);
                    Some(start..start + size)
                }
                None => Some(start..start + size),
            };
        }
        if let Some(r) = run {
            self.discard(r);
        }
    }

    /// Where `range` lies in memory, for the kernel; `None` when it is not inside.
    pub(super) fn ptr(&self, range: &Range<usize>) -> Option<*mut u8> {
        (range.start <= range.end && range.end <= self.len())
            // SAFETY: `range.start` is within the mapping (checked above).
            .then(|| unsafe { self.0.mapping.as_ptr().add(range.start) })
    }

    /// The offsets of `slice` in the region, if it lies inside it (an address
    /// comparison: for slices that borrow the region, as a `Lent` state's do).
    pub fn offset_of(&self, slice: &[u8]) -> Option<Range<usize>> {
        let base = self.0.mapping.as_ptr() as usize;
        let start = (slice.as_ptr() as usize).checked_sub(base)?;
        let range = start..start + slice.len();
        (range.end <= self.len()).then_some(range)
    }

    /// Runs `f` on bytes `range` of the region, to fill a buffer the ring will write
    /// or send. Panics if the range is outside the region or the region is already
    /// borrowed (nested, or lent for good): two `&mut` into it would alias.
    ///
    /// A range that an operation still in flight reads or writes (a pool handing out a
    /// buffer too early) means a garbled packet, not freed memory: the mapping stays.
    pub fn with_mut<R>(&self, range: Range<usize>, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let ptr = self.ptr(&range).expect("range outside the region");
        assert!(
            !self.0.borrowed.replace(true),
            "region borrowed twice at once"
        );
        // Cleared however `f` ends, a panic included.
        let _borrow = Borrow(&self.0.borrowed);
        // SAFETY: the range is inside the live mapping, and no other Rust reference into
        // the region exists (the flag): this `&mut` is unique for the call.
        f(unsafe { std::slice::from_raw_parts_mut(ptr, range.len()) })
    }

    /// Bytes `range`, read as the kernel would (tests and the fuzz targets in `fuzz/`
    /// stand in for the kernel; cargo-fuzz builds with `--cfg fuzzing`).
    #[cfg(any(test, fuzzing))]
    pub fn kernel_read(&self, range: Range<usize>) -> Vec<u8> {
        let ptr = self.ptr(&range).expect("range outside the region");
        // SAFETY: inside the live mapping; copied out at once, like a send would.
        unsafe { std::slice::from_raw_parts(ptr, range.len()) }.to_vec()
    }

    /// Writes `data` at `offset`, as a receive by the kernel would.
    #[cfg(any(test, fuzzing))]
    pub fn kernel_write(&self, offset: usize, data: &[u8]) {
        let ptr = self
            .ptr(&(offset..offset + data.len()))
            .expect("range outside the region");
        // SAFETY: inside the live mapping. Like the kernel, this writes bytes that Rust
        // code borrows but leaves alone until it is told of the write.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
    }
}

/// Clears a region's borrow flag when dropped.
struct Borrow<'a>(&'a Cell<bool>);

impl Drop for Borrow<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// A family of types that borrow memory for a lifetime: `Of<'m>` is the state whose
/// buffers live in the region for `'m`.
pub trait Family {
    type Of<'m>;
}

/// State that borrows a whole region for as long as it lives: a flow's smoltcp socket
/// buffers, into which the ring sends and receives. The state is built and used only
/// through closures generic over the borrow's lifetime, so no borrow of the region can
/// leave it; the region stays mapped until the state is gone and the ring is done.
pub struct Lent<F: Family> {
    /// Dropped by hand, before the region is released: it borrows the region.
    state: ManuallyDrop<F::Of<'static>>,
    region: Region,
}

impl<F: Family> Lent<F> {
    /// Builds the state from the region's bytes. Panics if the region is borrowed.
    pub fn new(region: Region, build: impl for<'m> FnOnce(&'m mut [u8]) -> F::Of<'m>) -> Self {
        assert!(
            !region.0.borrowed.replace(true),
            "region lent while borrowed"
        );
        // Cleared if `build` panics; forgotten once the state holds the borrow.
        let borrow = Borrow(&region.0.borrowed);
        let len = region.len();
        // SAFETY: the whole live mapping, and the only Rust reference into it (the flag
        // stays set until drop). `build` cannot keep the borrow anywhere but in the
        // state it returns (it works for every lifetime 'm, so nothing outside can
        // hold an 'm), and the state is dropped before the flag is cleared. The
        // lifetime is stretched to 'static only to store the state; it never leaves.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.0.mapping.as_ptr(), len) };
        let state = build(bytes);
        // SAFETY: the same type with a different lifetime parameter, so the same layout;
        // see above for why no borrow outlives the region.
        let state = unsafe { std::mem::transmute_copy(&ManuallyDrop::new(state)) };
        std::mem::forget(borrow);
        Lent { state, region }
    }

    /// The region the state borrows (for offsets and for the ring).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Drops the state and returns the region, to be lent again, if nothing else holds
    /// it (no operation in flight points into it).
    pub fn into_region(self) -> Option<Region> {
        let mut lent = ManuallyDrop::new(self);
        // SAFETY: dropped exactly once, here; `lent` is never dropped (ManuallyDrop).
        unsafe { ManuallyDrop::drop(&mut lent.state) };
        lent.region.0.borrowed.set(false);
        // SAFETY: moved out once; `lent` is not used again.
        let region = unsafe { std::ptr::read(&lent.region) };
        (Rc::strong_count(&region.0) == 1).then_some(region)
    }

    /// Runs `f` on the state. Generic over the lifetime, so `f` cannot let a borrow of
    /// the region escape (its result type cannot name `'m`).
    pub fn with<R>(&mut self, f: impl for<'m> FnOnce(&mut F::Of<'m>, &Region) -> R) -> R {
        let state: *mut F::Of<'static> = &mut *self.state;
        // SAFETY: only the lifetime parameter changes, shortened to one `f` cannot
        // outlive; `self` is borrowed mutably for the call.
        f(unsafe { &mut *state.cast::<F::Of<'_>>() }, &self.region)
    }

    /// Like `with`, for reading.
    pub fn get<R>(&self, f: impl for<'m> FnOnce(&F::Of<'m>) -> R) -> R {
        let state: *const F::Of<'static> = &*self.state;
        // SAFETY: as in `with`, shared.
        f(unsafe { &*state.cast::<F::Of<'_>>() })
    }
}

impl<F: Family> Drop for Lent<F> {
    fn drop(&mut self) {
        // SAFETY: dropped exactly once, here; nothing uses the state afterwards.
        unsafe { ManuallyDrop::drop(&mut self.state) };
        self.region.0.borrowed.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Halves;
    impl Family for Halves {
        type Of<'m> = (&'m mut [u8], &'m mut [u8]);
    }

    #[test]
    fn lent_state_borrows_the_region_and_offsets_name_its_bytes() {
        let region = Region::new(8192).unwrap();
        let mut lent: Lent<Halves> = Lent::new(region.clone(), |bytes| bytes.split_at_mut(4096));
        lent.with(|(a, b), region| {
            a[..3].copy_from_slice(b"abc");
            b[0] = 7;
            assert_eq!(region.offset_of(&a[..3]), Some(0..3));
            assert_eq!(region.offset_of(&b[..1]), Some(4096..4097));
            assert_eq!(region.offset_of(b"elsewhere"), None);
        });
        assert_eq!(region.kernel_read(0..3), b"abc");
        region.kernel_write(4097, b"xy");
        assert_eq!(lent.get(|(_, b)| b[..3].to_vec()), [7, b'x', b'y']);
    }

    #[test]
    fn a_lent_region_cannot_be_borrowed_again_until_the_state_is_gone() {
        let region = Region::new(4096).unwrap();
        let lent: Lent<Halves> = Lent::new(region.clone(), |bytes| bytes.split_at_mut(1));
        let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            region.with_mut(0..1, |_| ());
        }));
        assert!(again.is_err(), "borrowed while lent");
        drop(lent);
        region.with_mut(0..1, |byte| byte[0] = 1);
        assert_eq!(region.kernel_read(0..1), [1]);
    }

    #[test]
    fn a_panic_inside_a_borrow_does_not_leave_the_region_locked() {
        let region = Region::new(4096).unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            region.with_mut(0..8, |_| panic!("while borrowed"));
        }));
        assert!(panicked.is_err());
        region.with_mut(0..8, |bytes| bytes[0] = 9);
        assert_eq!(region.kernel_read(0..1), [9]);
    }

    #[test]
    fn ranges_outside_the_region_have_no_pointer() {
        let region = Region::new(100).unwrap();
        assert!(region.ptr(&(0..100)).is_some());
        assert!(region.ptr(&(99..101)).is_none());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 5..4;
        assert!(region.ptr(&backwards).is_none());
    }
}
