//! The smoltcp `Device` for one poll call: at most one received packet in, transmitted
//! packets out into a fixed pool of buffers that become TUN writes.

use std::num::NonZeroUsize;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium, PacketMeta};
use smoltcp::time::Instant;
use smoltcp::wire::{IpAddress, IpProtocol, IpRepr, IpVersion};

use super::offload;
use crate::tun::{Offload, vnet};

/// Largest packet smoltcp may hand the TUN for segmentation: the IPv4 length limit.
pub const MAX_SEGMENTATION_PACKET: usize = 65535;

/// Transmit counters, by what the TUN is asked to do with each packet.
#[derive(Clone, Debug, Default)]
pub struct TxCounters {
    /// Packets handed to the kernel for TCP segmentation, and their bytes.
    pub segmented: u64,
    pub segmented_bytes: u64,
    /// Replies to ingress dropped because no buffer was free.
    pub dropped_replies: u64,
}

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
    mtu: usize,
    offload: Offload,
    /// Bytes in front of each packet: the virtio-net header, if negotiated.
    header_len: usize,
    /// MSS of the flow being polled, for IPv6 packets that need segmenting: smoltcp
    /// does not pass its segmentation metadata along for IPv6.
    ipv6_segment_size: u16,
    pub counters: TxCounters,
}

impl TxPool {
    /// `count` buffers, each big enough for the largest packet `offload` allows.
    pub fn new(count: u16, mtu: usize, offload: Offload) -> TxPool {
        let header_len = if offload.vnet_header() { vnet::LEN } else { 0 };
        let max_packet = if offload.tso() {
            MAX_SEGMENTATION_PACKET
        } else {
            mtu
        };
        let buf_size = header_len + max_packet;
        TxPool {
            buffers: (0..count)
                .map(|_| vec![0u8; buf_size].into_boxed_slice())
                .collect(),
            free: (0..count).rev().collect(),
            ready: Vec::with_capacity(usize::from(count)),
            scratch: vec![0u8; buf_size].into_boxed_slice(),
            exhausted: false,
            mtu,
            offload,
            header_len,
            ipv6_segment_size: 0,
            counters: TxCounters::default(),
        }
    }

    /// Buffers filled since the last call, as (index, length); the caller submits them.
    pub fn take_ready(&mut self, mut each: impl FnMut(u16, &[u8])) {
        for &(index, len) in &self.ready {
            each(index, &self.buffers[usize::from(index)][..len as usize]);
        }
        self.ready.clear();
    }

    /// The MSS our own MTU allows for IPv6 (40 bytes of IPv6, 20 of TCP header).
    fn ipv6_mss_limit(&self) -> u16 {
        u16::try_from(self.mtu.saturating_sub(60)).unwrap_or(u16::MAX)
    }

    /// Sets the MSS used to segment the IPv6 packets of the flow polled next.
    pub fn set_ipv6_segment_size(&mut self, mss: u16) {
        self.ipv6_segment_size = mss;
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

    /// Writes one packet of `len` bytes built by `f` (a complete IP packet with valid
    /// checksums) for the TUN. False, with nothing queued, when no free buffer holds it.
    pub fn emit(&mut self, len: usize, f: impl FnOnce(&mut [u8])) -> bool {
        let total = self.header_len + len;
        match self.free.last() {
            Some(&index) if total <= self.buffers[usize::from(index)].len() => {
                self.free.pop();
                let buffer = &mut self.buffers[usize::from(index)][..total];
                let (header, packet) = buffer.split_at_mut(self.header_len);
                f(packet);
                if self.offload.vnet_header() {
                    vnet::Header::PLAIN.emit(header);
                }
                self.ready.push((index, total as u32));
                true
            }
            _ => false,
        }
    }

    /// Writes one IP packet from `src` to `dst` whose `len`-byte `protocol` payload is
    /// built by `emit_payload` (with valid checksums). False when no buffer holds it.
    pub fn emit_ip(
        &mut self,
        (src, dst): (IpAddress, IpAddress),
        protocol: IpProtocol,
        len: usize,
        emit_payload: impl FnOnce(&mut [u8]),
    ) -> bool {
        let ip = IpRepr::new(src, dst, protocol, len, 64);
        self.emit(ip.buffer_len(), |buffer| {
            ip.emit(&mut *buffer, &ChecksumCapabilities::default());
            emit_payload(&mut buffer[ip.header_len()..]);
        })
    }

    fn fill<R>(&mut self, len: usize, meta: PacketMeta, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let total = self.header_len + len;
        let index = match self.free.pop() {
            Some(index) if total <= self.buffers[usize::from(index)].len() => index,
            other => {
                if let Some(index) = other {
                    self.free.push(index);
                }
                self.counters.dropped_replies += 1;
                let len = len.min(self.scratch.len() - self.header_len);
                return f(&mut self.scratch[self.header_len..self.header_len + len]);
            }
        };
        let ipv6_mss_limit = self.ipv6_mss_limit();
        let buffer = &mut self.buffers[usize::from(index)][..total];
        let (header, packet) = buffer.split_at_mut(self.header_len);
        let result = f(packet);
        if self.offload.vnet_header() {
            let vnet_header = if self.offload.checksum() {
                let segment_size = match packet.first().map(|byte| byte >> 4) {
                    Some(6) if self.offload.tso() => {
                        offload::clamp_syn_mss(packet, ipv6_mss_limit);
                        Some(self.ipv6_segment_size)
                    }
                    _ => meta.segmentation_offload_size.map(|size| size.get()),
                };
                offload::finish_tcp(packet, segment_size)
            } else {
                vnet::Header::PLAIN
            };
            if vnet_header.gso != vnet::Gso::None {
                self.counters.segmented += 1;
                self.counters.segmented_bytes += packet.len() as u64;
            }
            vnet_header.emit(header);
        }
        self.ready.push((index, total as u32));
        result
    }

    /// What an interface for `version` may assume. smoltcp 0.14 hands IPv4 packets above
    /// the MTU to the device for segmentation but drops IPv6 ones, so the IPv6 interface
    /// is given a 64 KiB MTU instead and the segment size comes from the flow (see
    /// `set_ipv6_segment_size`).
    fn capabilities(&self, version: IpVersion) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Packets read from the TUN were built by the local kernel; verifying their
        // checksums again only burns CPU (and with offload they are partial anyway).
        // What we send must carry valid ones, unless the kernel completes them.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = if self.offload.checksum() {
            Checksum::None
        } else {
            Checksum::Tx
        };
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        checksum.icmpv6 = Checksum::Tx;
        caps.checksum = checksum;
        if self.offload.tso() {
            let max = NonZeroUsize::new(MAX_SEGMENTATION_PACKET);
            match version {
                IpVersion::Ipv4 => caps.segmentation.tcpv4 = max,
                IpVersion::Ipv6 => {
                    caps.max_transmission_unit = MAX_SEGMENTATION_PACKET;
                    caps.segmentation.tcpv6 = max;
                }
            }
        }
        caps
    }
}

/// A device view for a single `poll_*` call.
pub struct StackDevice<'a> {
    rx: Option<&'a [u8]>,
    tx: &'a mut TxPool,
    /// Only read when an interface is created (smoltcp caches the capabilities).
    version: IpVersion,
}

impl<'a> StackDevice<'a> {
    /// For egress: nothing to receive.
    pub fn egress(tx: &'a mut TxPool) -> StackDevice<'a> {
        StackDevice {
            rx: None,
            tx,
            version: IpVersion::Ipv4,
        }
    }

    /// For ingress of one IP packet (without its virtio-net header).
    pub fn ingress(packet: &'a [u8], tx: &'a mut TxPool) -> StackDevice<'a> {
        StackDevice {
            rx: Some(packet),
            tx,
            version: IpVersion::Ipv4,
        }
    }

    /// For creating the interface that serves IP `version`.
    pub fn for_interface(tx: &'a mut TxPool, version: IpVersion) -> StackDevice<'a> {
        StackDevice {
            rx: None,
            tx,
            version,
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
        Some((RxToken { packet }, TxToken::new(self.tx)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.has_free() {
            Some(TxToken::new(self.tx))
        } else {
            self.tx.exhausted = true;
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.tx.capabilities(self.version)
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
    /// smoltcp sets the segment size here when the packet needs segmentation.
    meta: PacketMeta,
}

impl<'a> TxToken<'a> {
    fn new(pool: &'a mut TxPool) -> TxToken<'a> {
        TxToken {
            pool,
            meta: PacketMeta::default(),
        }
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.pool.fill(len, self.meta, f)
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        self.meta = meta;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_each_buffer_once_until_released() {
        let mut pool = TxPool::new(2, 64, Offload::None);
        let meta = PacketMeta::default();
        pool.fill(10, meta, |b| b.fill(1));
        pool.fill(20, meta, |b| b.fill(2));
        assert!(!pool.has_free());
        pool.fill(5, meta, |b| b.fill(3));
        assert_eq!(pool.counters.dropped_replies, 1);
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
        let mut pool = TxPool::new(1, 16, Offload::None);
        pool.fill(100, PacketMeta::default(), |b| assert_eq!(b.len(), 16));
        assert_eq!(pool.counters.dropped_replies, 1);
        assert!(pool.has_free());
    }

    #[test]
    fn emit_refuses_what_does_not_fit() {
        let mut pool = TxPool::new(1, 100, Offload::Header);
        assert!(!pool.emit(101, |_| panic!("must not be called")));
        assert!(pool.emit(100, |b| b.fill(7)));
        assert!(!pool.emit(10, |_| panic!("pool is empty")));
        let mut seen = Vec::new();
        pool.take_ready(|_, bytes| seen.push(bytes.to_vec()));
        assert_eq!(seen[0].len(), vnet::LEN + 100);
        assert!(seen[0][vnet::LEN..].iter().all(|&b| b == 7));
    }

    #[test]
    fn vnet_header_goes_in_front_of_each_packet() {
        let mut pool = TxPool::new(1, 1500, Offload::Header);
        pool.fill(40, PacketMeta::default(), |b| b.fill(0x45));
        let mut seen = Vec::new();
        pool.take_ready(|_, bytes| seen.push(bytes.to_vec()));
        assert_eq!(seen[0].len(), vnet::LEN + 40);
        assert_eq!(&seen[0][..vnet::LEN], &[0; vnet::LEN]);
    }

    #[test]
    fn offload_capabilities_follow_the_negotiated_level() {
        let v4 = IpVersion::Ipv4;
        let none = TxPool::new(1, 1500, Offload::None).capabilities(v4);
        assert!(none.checksum.tcp.tx());
        assert!(none.segmentation.tcpv4.is_none());
        let csum = TxPool::new(1, 1500, Offload::Checksum).capabilities(v4);
        assert!(!csum.checksum.tcp.tx());
        assert!(csum.segmentation.tcpv4.is_none());
        let tso = TxPool::new(1, 1500, Offload::Tso);
        let tso4 = tso.capabilities(v4);
        assert_eq!(
            tso4.segmentation.tcpv4.map(|n| n.get()),
            Some(MAX_SEGMENTATION_PACKET)
        );
        assert_eq!(tso4.max_transmission_unit, 1500);
        let tso6 = tso.capabilities(IpVersion::Ipv6);
        assert!(tso6.segmentation.tcpv6.is_some());
        assert_eq!(tso6.max_transmission_unit, MAX_SEGMENTATION_PACKET);
    }
}
