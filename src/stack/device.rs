//! The smoltcp `Device` for one poll call: at most one received packet in, transmitted
//! packets out into a fixed pool of buffers that become TUN writes.

use std::num::NonZeroUsize;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium, PacketMeta};
use smoltcp::time::Instant;
use smoltcp::wire::IpVersion;

use super::gather;
use super::window::{self, WindowState};
use crate::uring::{InBuffer, Region, Slice};
use crate::wire::{Offload, offload, uso, vnet};

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
    /// Window updates of smoltcp's that a flow's window limit made duplicate ACKs.
    pub hidden_window_updates: u64,
}

/// What a packet `TxPool::emit` queues is, which decides whether it may take the
/// buffers kept for replies to ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The one reply to the packet just read from the TUN, like smoltcp's ACKs and RSTs
    /// to ingress: it may take the reserve, and is dropped without a buffer.
    Reply,
    /// Anything else (a server's datagram, an ICMP error about the outbound side, a
    /// flow's window update): it leaves the reserve, so it can never starve the ACKs
    /// of the client's data.
    Egress,
}

/// What the device must know of the flow whose packets smoltcp writes during one call,
/// lent by the flow for that call.
#[derive(Debug)]
pub struct FlowTx<'a> {
    /// MSS for segmenting IPv6 packets: smoltcp does not pass its segmentation
    /// metadata along for IPv6.
    pub ipv6_segment_size: u16,
    /// The client's sequence number up to which it may send (its first byte not yet
    /// passed on plus the flow's memory allowance); `None` leaves smoltcp's window.
    pub window_limit: Option<u32>,
    /// What the flow's segments told the client so far, brought up to date.
    pub window: &'a mut WindowState,
}

impl FlowTx<'_> {
    /// The same, for a shorter call.
    fn reborrow(&mut self) -> FlowTx<'_> {
        FlowTx {
            ipv6_segment_size: self.ipv6_segment_size,
            window_limit: self.window_limit,
            window: &mut *self.window,
        }
    }
}

/// A packet queued for the TUN, in the order queued.
#[derive(Clone, Copy, Debug)]
enum Ready {
    /// Pool buffer `index`, holding a whole packet of `len` bytes.
    Packet { index: u16, len: u32 },
    /// Header slot `slot`'s `len` bytes, then `payload` where it was received.
    Gathered {
        slot: u16,
        len: u32,
        payload: InBuffer,
    },
}

/// One TUN write to submit (see `TxPool::take_writes`).
pub enum Write {
    /// Pool buffer `index`, holding the whole packet.
    Packet(u16, Slice),
    /// Header slot `slot`'s headers, then `payload`: one packet, written with the
    /// slot's iovec array (bytes `iovecs` of the headers' region).
    Gathered {
        slot: u16,
        headers: Slice,
        iovecs: std::ops::Range<usize>,
        payload: InBuffer,
    },
}

/// Fixed transmit buffers, in one region the ring writes from; each filled buffer
/// becomes one TUN write, and returns to the pool when that write completes. When the
/// pool is empty smoltcp holds its data back. Beside them, slots for the headers of
/// packets whose payload is written from where it was received (`emit_gathered`).
pub struct TxPool {
    region: Region,
    buf_size: usize,
    free: Vec<u16>,
    ready: Vec<Ready>,
    gathered: gather::Slots,
    /// Where the payload of the packet `emit_gathered` queued since `take_gathered`
    /// lies: it must stay there until the write completes.
    gathered_since: Option<InBuffer>,
    /// Where replies go when no buffer is free during ingress: written, then dropped.
    scratch: Box<[u8]>,
    /// Set when smoltcp asked for a buffer and none was free.
    exhausted: bool,
    /// Buffers only replies to ingress may take.
    reserve: usize,
    mtu: usize,
    offload: Offload,
    /// Bytes in front of each packet: the virtio-net header, if negotiated.
    header_len: usize,
    pub counters: TxCounters,
}

impl TxPool {
    /// `count` buffers, each big enough for the largest packet `offload` allows; `None`
    /// when their memory cannot be had.
    pub fn new(count: u16, mtu: usize, offload: Offload) -> Option<TxPool> {
        let header_len = offload.header_len();
        let max_packet = if offload.tso() {
            MAX_SEGMENTATION_PACKET
        } else {
            mtu
        };
        let buf_size = header_len + max_packet;
        Some(TxPool {
            region: Region::new(usize::from(count) * buf_size)?,
            buf_size,
            free: (0..count).rev().collect(),
            ready: Vec::with_capacity(usize::from(count) + usize::from(gather::SLOTS)),
            gathered: gather::Slots::new()?,
            gathered_since: None,
            scratch: vec![0u8; buf_size].into_boxed_slice(),
            exhausted: false,
            reserve: usize::from(count / 8),
            mtu,
            offload,
            header_len,
            counters: TxCounters::default(),
        })
    }

    /// Where buffer `index` lies in the region.
    fn range(&self, index: u16) -> std::ops::Range<usize> {
        let start = usize::from(index) * self.buf_size;
        start..start + self.buf_size
    }

    /// Packets queued since the last call, in order; the caller submits them and
    /// `release`s each pool buffer (`release_gathered` each header slot) once its write
    /// has completed. `each` returns false for a write it could not queue: a gathered
    /// one's slot is free again at once.
    pub fn take_writes(&mut self, mut each: impl FnMut(Write) -> bool) {
        for &ready in &self.ready {
            let queued = each(match ready {
                Ready::Packet { index, len } => {
                    let start = self.range(index).start;
                    let packet = Slice {
                        region: self.region.clone(),
                        range: start..start + len as usize,
                    };
                    Write::Packet(index, packet)
                }
                Ready::Gathered { slot, len, payload } => {
                    let (headers, iovecs) = self.gathered.write(slot, len);
                    Write::Gathered {
                        slot,
                        headers,
                        iovecs,
                        payload,
                    }
                }
            });
            if let (false, Ready::Gathered { slot, .. }) = (queued, ready) {
                self.gathered.release(slot);
            }
        }
        self.ready.clear();
    }

    /// The pool buffers filled since the last call, as (index, the packet's bytes), for
    /// callers that queue no gathered packets (tests, benchmarks): one would be dropped.
    pub fn take_ready(&mut self, mut each: impl FnMut(u16, Slice)) {
        self.take_writes(|write| match write {
            Write::Packet(index, packet) => {
                each(index, packet);
                true
            }
            Write::Gathered { .. } => false,
        });
    }

    /// The MSS our own MTU allows for IPv6 (40 bytes of IPv6, 20 of TCP header).
    fn ipv6_mss_limit(&self) -> u16 {
        u16::try_from(self.mtu.saturating_sub(60)).unwrap_or(u16::MAX)
    }

    /// Returns buffer `index` after its write completed.
    pub fn release(&mut self, index: u16) {
        debug_assert!(!self.free.contains(&index));
        if usize::from(index) * self.buf_size < self.region.len() {
            self.free.push(index);
        }
    }

    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Returns header slot `slot` after its gathered write completed.
    pub fn release_gathered(&mut self, slot: u16) {
        self.gathered.release(slot);
    }

    /// Buffers holding a packet (queued or being written), and buffers in the pool.
    pub fn buffer_use(&self) -> (usize, usize) {
        let count = self.region.len() / self.buf_size;
        (count - self.free.len(), count)
    }

    /// Whether egress may take a buffer: the last eighth of the pool is kept for
    /// replies to ingress (the ACKs of the client's data), which are dropped without
    /// one, while egress only waits for the next turn (or, from `emit`, is a datagram
    /// that may be lost anyway).
    fn has_free_for_egress(&self) -> bool {
        self.free.len() > self.reserve
    }

    /// Gives the pages of every free buffer back to the kernel (idle: nothing is queued).
    /// The free list is a stack, so under light load only its top few get touched again.
    pub fn discard_free(&mut self) {
        self.region
            .discard_buffers(self.free.iter().copied(), self.buf_size);
    }

    /// Whether smoltcp found the pool empty since the last call (and clears the flag).
    pub fn take_exhausted(&mut self) -> bool {
        std::mem::take(&mut self.exhausted)
    }

    /// Queues one packet for the TUN that `build` writes (a complete IP packet with valid
    /// checksums) into a free buffer, returning its length, or `None` when it does not
    /// fit. False, with nothing queued, when there is no free buffer `claim` may take or
    /// it did not fit.
    pub fn emit(&mut self, claim: Claim, build: impl FnOnce(&mut [u8]) -> Option<usize>) -> bool {
        self.emit_with_header(claim, |packet| {
            build(packet).map(|len| (len, vnet::Header::PLAIN))
        })
    }

    /// What a UDP super-packet may hold, if the TUN takes them (USO negotiated).
    pub fn uso_limits(&self) -> Option<uso::Limits> {
        (self.offload >= Offload::Uso).then(|| uso::Limits {
            mtu: self.mtu,
            max_packet: self.buf_size - self.header_len,
        })
    }

    /// Like `emit`, for a packet that `build` says what to ask of the TUN for in its
    /// virtio-net header (a UDP super-packet to split); the header is left out on a TUN
    /// without one, which is never asked for more than `Header::PLAIN`.
    pub fn emit_with_header(
        &mut self,
        claim: Claim,
        build: impl FnOnce(&mut [u8]) -> Option<(usize, vnet::Header)>,
    ) -> bool {
        if claim == Claim::Egress && !self.has_free_for_egress() {
            return false;
        }
        let Some(&index) = self.free.last() else {
            return false;
        };
        let (header_len, vnet_header) = (self.header_len, self.offload.vnet_header());
        let built = self.region.with_mut(self.range(index), |buffer| {
            let (header, packet) = buffer.split_at_mut(header_len);
            let (len, vnet) = build(packet).filter(|&(len, _)| len <= packet.len())?;
            if vnet_header {
                vnet.emit(header);
            }
            Some(len)
        });
        let Some(len) = built else {
            return false;
        };
        self.free.pop();
        let len = (self.header_len + len) as u32;
        self.ready.push(Ready::Packet { index, len });
        true
    }

    /// Queues one packet for the TUN whose headers `build` writes (returning their
    /// length and what to ask of the TUN in the virtio-net header, as for
    /// `emit_with_header`) and whose payload the write takes from `payload`, where it
    /// was received: no copy. False, with nothing queued, when every header slot is in
    /// use (each holds a receive buffer until its write completes) or the headers did
    /// not fit: the caller copies the payload instead.
    pub fn emit_gathered(
        &mut self,
        payload: InBuffer,
        build: impl FnOnce(&mut [u8]) -> Option<(usize, vnet::Header)>,
    ) -> bool {
        let (header_len, vnet_header) = (self.header_len, self.offload.vnet_header());
        let filled = self.gathered.fill(|buf| {
            let (header, packet) = buf.split_at_mut_checked(header_len)?;
            let (len, vnet) = build(packet)?;
            if vnet_header {
                vnet.emit(header);
            }
            Some(header_len + len)
        });
        let Some((slot, len)) = filled else {
            return false;
        };
        self.ready.push(Ready::Gathered { slot, len, payload });
        self.gathered_since = Some(payload);
        true
    }

    /// The receive buffer of the packet `emit_gathered` queued since the last call, if
    /// any (cleared): the caller keeps it until the packet is written.
    pub fn take_gathered(&mut self) -> Option<InBuffer> {
        std::mem::take(&mut self.gathered_since)
    }

    /// Hands smoltcp a free buffer for a `len`-byte packet, then shapes what it wrote for
    /// `flow` (none: a reply for no flow) and adds the virtio-net header.
    fn fill<R>(
        &mut self,
        len: usize,
        meta: PacketMeta,
        flow: Option<FlowTx>,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        let total = self.header_len + len;
        let index = match self.free.pop() {
            Some(index) if total <= self.buf_size => index,
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
        let (level, header_len) = (self.offload, self.header_len);
        let start = self.range(index).start;
        let counters = &mut self.counters;
        let ipv6_segment_size = flow.as_ref().map(|flow| flow.ipv6_segment_size);
        let (result, kept) = self.region.with_mut(start..start + total, |buffer| {
            let (header, packet) = buffer.split_at_mut(header_len);
            let result = f(packet);
            // Before the checksum is finished: with offload, it is left to the kernel;
            // without, smoltcp computed it and the window's change is patched in.
            if let Some(flow) = flow {
                let verdict =
                    window::shape(packet, flow.window, flow.window_limit, !level.checksum());
                if verdict == window::Verdict::Drop {
                    return (result, false);
                }
            }
            if level.vnet_header() {
                let vnet_header = if level.checksum() {
                    let segment_size = match packet.first().map(|byte| byte >> 4) {
                        Some(6) if level.tso() => {
                            offload::clamp_syn_mss(packet, ipv6_mss_limit);
                            ipv6_segment_size
                        }
                        _ => meta.segmentation_offload_size.map(|size| size.get()),
                    };
                    offload::finish_tcp(packet, segment_size)
                } else {
                    vnet::Header::PLAIN
                };
                if vnet_header.gso != vnet::Gso::None {
                    counters.segmented += 1;
                    counters.segmented_bytes += packet.len() as u64;
                }
                vnet_header.emit(header);
            }
            (result, true)
        });
        if kept {
            let len = total as u32;
            self.ready.push(Ready::Packet { index, len });
        } else {
            self.free.push(index);
            self.counters.hidden_window_updates += 1;
        }
        result
    }

    /// What an interface for `version` may assume. smoltcp 0.14 hands IPv4 packets above
    /// the MTU to the device for segmentation but drops IPv6 ones, so the IPv6 interface
    /// is given a 64 KiB MTU instead and the segment size comes from the flow (see
    /// `FlowTx::ipv6_segment_size`).
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
    /// The flow whose socket smoltcp is polling, if any.
    flow: Option<FlowTx<'a>>,
    /// Only read when an interface is created (smoltcp caches the capabilities).
    version: IpVersion,
}

impl<'a> StackDevice<'a> {
    /// Whether a smoltcp egress pass may start: only with a buffer for its packet (else
    /// the pool is marked exhausted, so the flow waits for one). smoltcp asks for the
    /// buffer after it has moved the socket on: a fast retransmit it decided on is
    /// forgotten and the retransmission timer stays stopped when the packet finds
    /// none, so lost bytes wait for the client's next duplicate ACKs (a keep-alive's,
    /// a minute later, whose garbage byte lands on the sequence number of a byte
    /// still unacknowledged).
    pub fn egress_ready(&mut self) -> bool {
        let ready = self.tx.has_free_for_egress();
        self.tx.exhausted |= !ready;
        ready
    }

    /// For egress of `flow`: nothing to receive.
    pub fn egress(tx: &'a mut TxPool, flow: FlowTx<'a>) -> StackDevice<'a> {
        StackDevice {
            rx: None,
            tx,
            flow: Some(flow),
            version: IpVersion::Ipv4,
        }
    }

    /// For ingress of one IP packet (without its virtio-net header) for `flow` (none:
    /// a packet of no flow, to be answered).
    pub fn ingress(
        packet: &'a [u8],
        tx: &'a mut TxPool,
        flow: Option<FlowTx<'a>>,
    ) -> StackDevice<'a> {
        StackDevice {
            rx: Some(packet),
            tx,
            flow,
            version: IpVersion::Ipv4,
        }
    }

    /// For creating the interface that serves IP `version`.
    pub fn for_interface(tx: &'a mut TxPool, version: IpVersion) -> StackDevice<'a> {
        StackDevice {
            rx: None,
            tx,
            flow: None,
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
        let flow = self.flow.as_mut().map(FlowTx::reborrow);
        Some((RxToken { packet }, TxToken::new(self.tx, flow)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.has_free_for_egress() {
            let flow = self.flow.as_mut().map(FlowTx::reborrow);
            Some(TxToken::new(self.tx, flow))
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
    flow: Option<FlowTx<'a>>,
    /// smoltcp sets the segment size here when the packet needs segmentation.
    meta: PacketMeta,
}

impl<'a> TxToken<'a> {
    fn new(pool: &'a mut TxPool, flow: Option<FlowTx<'a>>) -> TxToken<'a> {
        TxToken {
            pool,
            flow,
            meta: PacketMeta::default(),
        }
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.pool.fill(len, self.meta, self.flow, f)
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
        let mut pool = TxPool::new(2, 64, Offload::None).unwrap();
        let meta = PacketMeta::default();
        pool.fill(10, meta, None, |b| b.fill(1));
        pool.fill(20, meta, None, |b| b.fill(2));
        assert!(!pool.has_free());
        pool.fill(5, meta, None, |b| b.fill(3));
        assert_eq!(pool.counters.dropped_replies, 1);
        let mut seen = Vec::new();
        pool.take_ready(|index, slice| {
            let bytes = slice.region.kernel_read(slice.range);
            seen.push((index, bytes.len(), bytes[0]))
        });
        assert_eq!(seen.len(), 2);
        assert_eq!((seen[0].1, seen[0].2), (10, 1));
        assert_eq!((seen[1].1, seen[1].2), (20, 2));
        pool.release(seen[0].0);
        assert!(pool.has_free());
    }

    #[test]
    fn oversized_request_goes_to_scratch_not_a_panic() {
        let mut pool = TxPool::new(1, 16, Offload::None).unwrap();
        pool.fill(100, PacketMeta::default(), None, |b| {
            assert_eq!(b.len(), 16)
        });
        assert_eq!(pool.counters.dropped_replies, 1);
        assert!(pool.has_free());
    }

    #[test]
    fn emit_refuses_what_does_not_fit() {
        let mut pool = TxPool::new(1, 100, Offload::Header).unwrap();
        let reply = Claim::Reply;
        assert!(!pool.emit(reply, |_| Some(101)), "longer than the buffer");
        assert!(!pool.emit(reply, |_| None), "the builder gave up");
        assert!(pool.emit(reply, |b| {
            b[..100].fill(7);
            Some(100)
        }));
        assert!(!pool.emit(reply, |_| panic!("pool is empty")));
        let mut seen = Vec::new();
        pool.take_ready(|_, slice| seen.push(slice.region.kernel_read(slice.range)));
        assert_eq!(seen[0].len(), vnet::LEN + 100);
        assert!(seen[0][vnet::LEN..].iter().all(|&b| b == 7));
    }

    #[test]
    fn emitted_egress_leaves_the_reserve_to_replies_to_ingress() {
        // Eight buffers: one is kept for replies.
        let mut pool = TxPool::new(8, 100, Offload::None).unwrap();
        let mut emitted = 0;
        while emitted < 8 && pool.emit(Claim::Egress, |_| Some(40)) {
            emitted += 1;
        }
        assert_eq!(emitted, 7, "egress stops short of the reserve");
        // The ACK of an ingress packet (smoltcp's reply token) still finds a buffer.
        pool.fill(40, PacketMeta::default(), None, |b| b.fill(0x45));
        assert_eq!(pool.counters.dropped_replies, 0);
        assert!(!pool.has_free());
        assert!(!pool.emit(Claim::Reply, |_| Some(40)), "nothing left");
        // A reply emitted by the loop may take the reserve too.
        let mut pool = TxPool::new(8, 100, Offload::None).unwrap();
        while pool.emit(Claim::Egress, |_| Some(40)) {}
        assert!(pool.emit(Claim::Reply, |_| Some(40)));
        assert!(!pool.has_free());
    }

    #[test]
    fn vnet_header_goes_in_front_of_each_packet() {
        let mut pool = TxPool::new(1, 1500, Offload::Header).unwrap();
        pool.fill(40, PacketMeta::default(), None, |b| b.fill(0x45));
        let mut seen = Vec::new();
        pool.take_ready(|_, slice| seen.push(slice.region.kernel_read(slice.range)));
        assert_eq!(seen[0].len(), vnet::LEN + 40);
        assert_eq!(&seen[0][..vnet::LEN], &[0; vnet::LEN]);
    }

    #[test]
    fn offload_capabilities_follow_the_negotiated_level() {
        let v4 = IpVersion::Ipv4;
        let none = TxPool::new(1, 1500, Offload::None)
            .unwrap()
            .capabilities(v4);
        assert!(none.checksum.tcp.tx());
        assert!(none.segmentation.tcpv4.is_none());
        let csum = TxPool::new(1, 1500, Offload::Checksum)
            .unwrap()
            .capabilities(v4);
        assert!(!csum.checksum.tcp.tx());
        assert!(csum.segmentation.tcpv4.is_none());
        let tso = TxPool::new(1, 1500, Offload::Tso).unwrap();
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
