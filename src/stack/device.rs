//! The smoltcp `Device` for one poll call: at most one received packet in, transmitted
//! packets out into a fixed pool of buffers that become TUN writes.

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Fixed transmit buffers; each filled buffer becomes one TUN write, and returns to the
/// pool when that write completes. When the pool is empty smoltcp holds its data back.
pub struct TxPool {
    buffers: Vec<Box<[u8]>>,
    free: Vec<u16>,
    ready: Vec<(u16, u32)>,
    /// Where replies go when no buffer is free during ingress: written, then dropped.
    scratch: Box<[u8]>,
    /// Set when smoltcp asked for a buffer and none was free.
    exhausted: bool,
    pub dropped_replies: u64,
}

impl TxPool {
    pub fn new(count: u16, buf_size: usize) -> TxPool {
        TxPool {
            buffers: (0..count)
                .map(|_| vec![0u8; buf_size].into_boxed_slice())
                .collect(),
            free: (0..count).rev().collect(),
            ready: Vec::with_capacity(usize::from(count)),
            scratch: vec![0u8; buf_size].into_boxed_slice(),
            exhausted: false,
            dropped_replies: 0,
        }
    }

    /// Buffers filled since the last call, as (index, length); the caller submits them.
    pub fn take_ready(&mut self, mut each: impl FnMut(u16, &[u8])) {
        for &(index, len) in &self.ready {
            each(index, &self.buffers[usize::from(index)][..len as usize]);
        }
        self.ready.clear();
    }

    /// Returns buffer `index` after its write completed.
    pub fn release(&mut self, index: u16) {
        debug_assert!(!self.free.contains(&index));
        self.free.push(index);
    }

    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Whether smoltcp found the pool empty since the last call (and clears the flag).
    pub fn take_exhausted(&mut self) -> bool {
        std::mem::take(&mut self.exhausted)
    }

    fn fill<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        match self.free.pop() {
            Some(index) if len <= self.buffers[usize::from(index)].len() => {
                let result = f(&mut self.buffers[usize::from(index)][..len]);
                self.ready.push((index, len as u32));
                result
            }
            other => {
                if let Some(index) = other {
                    self.free.push(index);
                }
                self.dropped_replies += 1;
                let len = len.min(self.scratch.len());
                f(&mut self.scratch[..len])
            }
        }
    }
}

/// A device view for a single `poll_*` call.
pub struct StackDevice<'a> {
    rx: Option<&'a [u8]>,
    tx: &'a mut TxPool,
    mtu: usize,
}

impl<'a> StackDevice<'a> {
    /// For egress: nothing to receive.
    pub fn egress(tx: &'a mut TxPool, mtu: usize) -> StackDevice<'a> {
        StackDevice { rx: None, tx, mtu }
    }

    /// For ingress of one packet.
    pub fn ingress(packet: &'a [u8], tx: &'a mut TxPool, mtu: usize) -> StackDevice<'a> {
        StackDevice {
            rx: Some(packet),
            tx,
            mtu,
        }
    }
}

impl phy::Device for StackDevice<'_> {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let packet = self.rx.take()?;
        // A reply to an ingress packet (RST, challenge ACK) must never block ingress:
        // without a free buffer it is dropped (and counted), like a full NIC queue would.
        Some((RxToken { packet }, TxToken { pool: self.tx }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.has_free() {
            Some(TxToken { pool: self.tx })
        } else {
            self.tx.exhausted = true;
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Packets read from the TUN were built by the local kernel; verifying their
        // checksums again only burns CPU. What we send must carry valid ones.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        checksum.icmpv6 = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

pub struct RxToken<'a> {
    packet: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.packet)
    }
}

pub struct TxToken<'a> {
    pool: &'a mut TxPool,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.pool.fill(len, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_each_buffer_once_until_released() {
        let mut pool = TxPool::new(2, 64);
        pool.fill(10, |b| b.fill(1));
        pool.fill(20, |b| b.fill(2));
        assert!(!pool.has_free());
        pool.fill(5, |b| b.fill(3));
        assert_eq!(pool.dropped_replies, 1);
        let mut seen = Vec::new();
        pool.take_ready(|index, bytes| seen.push((index, bytes.len(), bytes[0])));
        assert_eq!(seen.len(), 2);
        assert_eq!((seen[0].1, seen[0].2), (10, 1));
        assert_eq!((seen[1].1, seen[1].2), (20, 2));
        pool.release(seen[0].0);
        assert!(pool.has_free());
    }

    #[test]
    fn oversized_request_goes_to_scratch_not_a_panic() {
        let mut pool = TxPool::new(1, 16);
        pool.fill(100, |b| assert_eq!(b.len(), 16));
        assert_eq!(pool.dropped_replies, 1);
        assert!(pool.has_free());
    }
}
