//! Wire and stack micro-benchmarks: what one packet costs the proxy in user space.
//!
//! - `emit`: building a TCP or UDP packet (IPv4 or IPv6, 1460-byte payload) into a
//!   preallocated buffer with smoltcp's reprs, with checksums computed (`*_checksum`) or
//!   left to the kernel (`*_offload`: for TCP exactly what the proxy does with offload,
//!   smoltcp without the TCP checksum plus `offload::finish_tcp` and the virtio-net
//!   header).
//! - `parse`: reading the same packets: the proxy's own 4-tuple demux (`*_demux`, all the
//!   parsing it does per packet besides the virtio-net header and smoltcp's own), and
//!   smoltcp's checked parse with checksums verified (`*_verify`) or ignored
//!   (`*_no_verify`).
//! - `vnet`: the virtio-net header of a TCPv4 GSO super-packet, parsed and emitted.
//! - `stack`: one data round trip of an established flow through the proxy's own
//!   `TxPool` (TSO, like production), `StackDevice` and interface: the client's segment
//!   of N bytes in through smoltcp ingress, the socket drained, N bytes written back and
//!   smoltcp egress emitting them (one segment, or a GSO super-packet), per iteration.
//!   N is one MSS (1460 bytes over IPv4, 1440 over IPv6) or 65000 bytes (a 64 KiB
//!   super-packet, as a TUN with TSO delivers); throughput figures count N, the bytes
//!   moved each way. Demux and virtio-net header parsing, measured above, come on top.
//! - `dns`: the fake-IP resolver answering one A query, for a name in its table and
//!   for a new name that evicts another.
//!
//! Run with `cargo bench --bench wire` (filter with e.g. `cargo bench --bench wire --
//! stack`). `cargo test --release --bench wire` runs each benchmark once, as a test.

use std::hint::black_box;

use divan::counter::BytesCount;
use divan::{AllocProfiler, Bencher};
use smoltcp::phy::{Checksum, ChecksumCapabilities};
use smoltcp::wire::{
    IpAddress, IpEndpoint, IpProtocol, IpRepr, IpVersion, Ipv4Address, Ipv4Packet, Ipv4Repr,
    Ipv6Address, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
    UdpRepr,
};

/// Counts allocations in the timed loops: divan adds alloc rows to any benchmark that
/// allocates, and none should.
#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

/// Payload of the `emit` and `parse` packets: a full segment at a 1500-byte MTU.
const PAYLOAD: usize = 1460;
/// The TUN MTU the proxy runs with by default.
const MTU: usize = 1500;

#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// (client, server) of the flow.
    fn endpoints(self) -> (IpEndpoint, IpEndpoint) {
        match self {
            Family::V4 => (
                IpEndpoint::new(IpAddress::Ipv4(Ipv4Address::new(198, 18, 0, 1)), 40000),
                IpEndpoint::new(IpAddress::Ipv4(Ipv4Address::new(192, 0, 2, 80)), 443),
            ),
            Family::V6 => (
                IpEndpoint::new(
                    IpAddress::Ipv6(Ipv6Address::new(0xfd7a, 0x7072, 0x7879, 0, 0, 0, 0, 1)),
                    40000,
                ),
                IpEndpoint::new(
                    IpAddress::Ipv6(Ipv6Address::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 80)),
                    443,
                ),
            ),
        }
    }

    /// The MSS a client on a link with our MTU announces.
    fn mss(self) -> u16 {
        match self {
            Family::V4 => (MTU - 40) as u16,
            Family::V6 => (MTU - 60) as u16,
        }
    }
}

/// Recognisable, non-constant payload bytes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A TCP data segment (ACK|PSH) from `src` to `dst`, the headers and payload a sender
/// puts on the wire.
fn data_segment(src: IpEndpoint, dst: IpEndpoint, payload: &[u8]) -> TcpRepr<'_> {
    TcpRepr {
        src_port: src.port,
        dst_port: dst.port,
        control: TcpControl::Psh,
        seq_number: TcpSeqNumber(0x1234_5678),
        ack_number: Some(TcpSeqNumber(0x0765_4321)),
        window_len: 0xffff,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    }
}

fn ip_repr(src: IpEndpoint, dst: IpEndpoint, protocol: IpProtocol, len: usize) -> IpRepr {
    IpRepr::new(src.addr, dst.addr, protocol, len, 64)
}

/// Writes `ip` and `tcp` into the start of `buffer`.
fn emit_tcp(buffer: &mut [u8], ip: &IpRepr, tcp: &TcpRepr, caps: &ChecksumCapabilities) {
    ip.emit(&mut *buffer, caps);
    let mut segment = TcpPacket::new_unchecked(&mut buffer[ip.header_len()..]);
    tcp.emit(&mut segment, &ip.src_addr(), &ip.dst_addr(), caps);
}

/// Writes `ip` and `udp` carrying `payload` into the start of `buffer`.
fn emit_udp(
    buffer: &mut [u8],
    ip: &IpRepr,
    udp: &UdpRepr,
    payload: &[u8],
    caps: &ChecksumCapabilities,
) {
    ip.emit(&mut *buffer, caps);
    let mut datagram = UdpPacket::new_unchecked(&mut buffer[ip.header_len()..]);
    udp.emit(
        &mut datagram,
        &ip.src_addr(),
        &ip.dst_addr(),
        payload.len(),
        |data| data.copy_from_slice(payload),
        caps,
    );
}

/// A complete TCP packet from `src` to `dst` with valid checksums.
fn tcp_packet(src: IpEndpoint, dst: IpEndpoint, tcp: &TcpRepr) -> Vec<u8> {
    let ip = ip_repr(src, dst, IpProtocol::Tcp, tcp.buffer_len());
    let mut packet = vec![0u8; ip.buffer_len()];
    emit_tcp(&mut packet, &ip, tcp, &ChecksumCapabilities::default());
    packet
}

/// A complete UDP packet from `src` to `dst` with valid checksums.
fn udp_packet(src: IpEndpoint, dst: IpEndpoint, payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: src.port,
        dst_port: dst.port,
    };
    let ip = ip_repr(src, dst, IpProtocol::Udp, udp.header_len() + payload.len());
    let mut packet = vec![0u8; ip.buffer_len()];
    emit_udp(
        &mut packet,
        &ip,
        &udp,
        payload,
        &ChecksumCapabilities::default(),
    );
    packet
}

/// smoltcp's checked IP layer: the header repr and the L4 bytes.
fn ip_layer<'a>(packet: &'a [u8], caps: &ChecksumCapabilities) -> Option<(IpRepr, &'a [u8])> {
    match IpVersion::of_packet(packet).ok()? {
        IpVersion::Ipv4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            let repr = Ipv4Repr::parse(&ip, caps).ok()?;
            Some((IpRepr::Ipv4(repr), ip.payload()))
        }
        IpVersion::Ipv6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            let repr = Ipv6Repr::parse(&ip).ok()?;
            Some((IpRepr::Ipv6(repr), ip.payload()))
        }
    }
}

fn smoltcp_tcp<'a>(packet: &'a [u8], caps: &ChecksumCapabilities) -> Option<(IpRepr, TcpRepr<'a>)> {
    let (ip, segment) = ip_layer(packet, caps)?;
    let tcp = TcpPacket::new_checked(segment).ok()?;
    let repr = TcpRepr::parse(&tcp, &ip.src_addr(), &ip.dst_addr(), caps).ok()?;
    Some((ip, repr))
}

fn smoltcp_udp<'a>(
    packet: &'a [u8],
    caps: &ChecksumCapabilities,
) -> Option<(IpRepr, UdpRepr, &'a [u8])> {
    let (ip, datagram) = ip_layer(packet, caps)?;
    let udp = UdpPacket::new_checked(datagram).ok()?;
    let repr = UdpRepr::parse(&udp, &ip.src_addr(), &ip.dst_addr(), caps).ok()?;
    Some((ip, repr, udp.payload()))
}

/// Building packets. Both variants write the same headers and copy the same payload; they
/// differ only in who computes the L4 checksum.
mod emit {
    use super::*;
    use smoltcp::wire::checksum;
    use uringproxy::wire::offload;
    use uringproxy::wire::vnet;

    /// What the proxy's device tells smoltcp with checksum offload: the IPv4 header
    /// checksum is still ours (it is 20 bytes), the TCP one the kernel's.
    fn offload_caps() -> ChecksumCapabilities {
        let mut caps = ChecksumCapabilities::default();
        caps.ipv4 = Checksum::Tx;
        caps.tcp = Checksum::None;
        caps.udp = Checksum::None;
        caps
    }

    /// Benchmarks `emit` writing a packet into a buffer of `len` bytes. It runs once
    /// before, untimed: that faults the fresh buffer's pages in (a page fault in the
    /// first timed run throws divan's calibration off) and gives `check` its output.
    fn bench_emit(
        bencher: Bencher,
        len: usize,
        emit: impl Fn(&mut [u8]),
        check: impl FnOnce(&mut [u8]),
    ) {
        let mut buffer = vec![0u8; len];
        emit(&mut buffer);
        check(&mut buffer);
        bencher.bench_local(|| emit(black_box(&mut buffer)));
    }

    /// Finishes an offloaded packet (virtio-net header in front) as the kernel does:
    /// adds the L4 bytes to the partial checksum the header points at.
    fn complete_checksum(buffer: &mut [u8]) {
        let (header, _) = vnet::Header::parse(buffer).expect("virtio-net header");
        assert!(header.needs_csum);
        let packet = &mut buffer[vnet::LEN..];
        let start = usize::from(header.csum_start);
        let field = start + usize::from(header.csum_offset);
        let partial = u16::from_be_bytes([packet[field], packet[field + 1]]);
        packet[field..field + 2].fill(0);
        let sum = checksum::combine(&[partial, checksum::data(&packet[start..])]);
        packet[field..field + 2].copy_from_slice(&(!sum).to_be_bytes());
    }

    fn tcp(bencher: Bencher, family: Family, offloaded: bool) {
        let (client, server) = family.endpoints();
        let payload = pattern(PAYLOAD, 1);
        let tcp = data_segment(server, client, &payload);
        let ip = ip_repr(server, client, IpProtocol::Tcp, tcp.buffer_len());
        let check = |packet: &[u8]| {
            let parsed = smoltcp_tcp(packet, &ChecksumCapabilities::default());
            assert_eq!(parsed.expect("valid TCP packet").1, tcp);
        };
        if offloaded {
            let caps = offload_caps();
            let segment_size = Some(family.mss());
            // The TxPool's path for every TCP packet smoltcp sends with offload on.
            let emit = |buffer: &mut [u8]| {
                let (header, packet) = buffer.split_at_mut(vnet::LEN);
                emit_tcp(packet, black_box(&ip), black_box(&tcp), &caps);
                offload::finish_tcp(packet, black_box(segment_size)).emit(header);
            };
            bench_emit(bencher, vnet::LEN + ip.buffer_len(), emit, |buffer| {
                complete_checksum(buffer);
                check(&buffer[vnet::LEN..]);
            });
        } else {
            // Without offload the TUN has no virtio-net header at all.
            let caps = ChecksumCapabilities::default();
            let emit = |buffer: &mut [u8]| emit_tcp(buffer, black_box(&ip), black_box(&tcp), &caps);
            bench_emit(bencher, ip.buffer_len(), emit, |buffer| check(buffer));
        }
    }

    fn udp(bencher: Bencher, family: Family, offloaded: bool) {
        let (client, server) = family.endpoints();
        let payload = pattern(PAYLOAD, 2);
        let udp = UdpRepr {
            src_port: server.port,
            dst_port: client.port,
        };
        let udp_len = udp.header_len() + payload.len();
        let ip = ip_repr(server, client, IpProtocol::Udp, udp_len);
        let check = |packet: &[u8]| {
            let parsed = smoltcp_udp(packet, &ChecksumCapabilities::default());
            let (_, repr, data) = parsed.expect("valid UDP packet");
            assert_eq!((repr, data), (udp, payload.as_slice()));
        };
        if offloaded {
            // The proxy computes UDP checksums itself today (`wire::udp::reply`). This
            // is what handing them to the kernel would cost instead: the pseudo-header
            // sum in the checksum field and a virtio-net header asking for completion,
            // as `finish_tcp` does for TCP.
            let caps = offload_caps();
            let csum_start = ip.header_len() as u16;
            let emit = |buffer: &mut [u8]| {
                let (header, packet) = buffer.split_at_mut(vnet::LEN);
                let ip = black_box(&ip);
                emit_udp(packet, ip, black_box(&udp), black_box(&payload), &caps);
                let partial = checksum::pseudo_header(
                    &ip.src_addr(),
                    &ip.dst_addr(),
                    IpProtocol::Udp,
                    udp_len as u32,
                );
                UdpPacket::new_unchecked(&mut packet[ip.header_len()..]).set_checksum(partial);
                vnet::Header {
                    needs_csum: true,
                    gso: vnet::Gso::None,
                    ecn: false,
                    hdr_len: csum_start + 8,
                    gso_size: 0,
                    csum_start,
                    csum_offset: 6,
                }
                .emit(header);
            };
            bench_emit(bencher, vnet::LEN + ip.buffer_len(), emit, |buffer| {
                complete_checksum(buffer);
                check(&buffer[vnet::LEN..]);
            });
        } else {
            let caps = ChecksumCapabilities::default();
            let emit = |buffer: &mut [u8]| {
                emit_udp(
                    buffer,
                    black_box(&ip),
                    black_box(&udp),
                    black_box(&payload),
                    &caps,
                );
            };
            bench_emit(bencher, ip.buffer_len(), emit, |buffer| check(buffer));
        }
    }

    #[divan::bench]
    fn tcp_v4_checksum(bencher: Bencher) {
        tcp(bencher, Family::V4, false);
    }

    #[divan::bench]
    fn tcp_v4_offload(bencher: Bencher) {
        tcp(bencher, Family::V4, true);
    }

    #[divan::bench]
    fn tcp_v6_checksum(bencher: Bencher) {
        tcp(bencher, Family::V6, false);
    }

    #[divan::bench]
    fn tcp_v6_offload(bencher: Bencher) {
        tcp(bencher, Family::V6, true);
    }

    #[divan::bench]
    fn udp_v4_checksum(bencher: Bencher) {
        udp(bencher, Family::V4, false);
    }

    #[divan::bench]
    fn udp_v4_offload(bencher: Bencher) {
        udp(bencher, Family::V4, true);
    }

    #[divan::bench]
    fn udp_v6_checksum(bencher: Bencher) {
        udp(bencher, Family::V6, false);
    }

    #[divan::bench]
    fn udp_v6_offload(bencher: Bencher) {
        udp(bencher, Family::V6, true);
    }
}

/// Reading packets from the client, prebuilt with valid checksums.
mod parse {
    use super::*;
    use uringproxy::wire::{self, Parsed};

    fn tcp_input(family: Family) -> Vec<u8> {
        let (client, server) = family.endpoints();
        let payload = pattern(PAYLOAD, 3);
        let packet = tcp_packet(client, server, &data_segment(client, server, &payload));
        // Inputs must be what the benchmarks claim: valid, and seen as such.
        assert!(matches!(
            wire::parse(&packet),
            Parsed::Tcp { opens: false, .. }
        ));
        let verified = smoltcp_tcp(&packet, &ChecksumCapabilities::default());
        assert_eq!(verified.expect("valid TCP packet").1.payload, payload);
        packet
    }

    fn udp_input(family: Family) -> Vec<u8> {
        let (client, server) = family.endpoints();
        let packet = udp_packet(client, server, &pattern(PAYLOAD, 4));
        assert!(matches!(
            wire::parse(&packet),
            Parsed::Udp {
                payload_len: PAYLOAD,
                ..
            }
        ));
        let verified = smoltcp_udp(&packet, &ChecksumCapabilities::default());
        assert_eq!(verified.expect("valid UDP packet").2.len(), PAYLOAD);
        packet
    }

    fn demux(bencher: Bencher, packet: Vec<u8>) {
        bencher.bench_local(|| wire::parse(black_box(&packet)));
    }

    fn tcp(bencher: Bencher, family: Family, caps: ChecksumCapabilities) {
        let packet = tcp_input(family);
        bencher.bench_local(|| smoltcp_tcp(black_box(&packet), &caps));
    }

    fn udp(bencher: Bencher, family: Family, caps: ChecksumCapabilities) {
        let packet = udp_input(family);
        bencher.bench_local(|| smoltcp_udp(black_box(&packet), &caps));
    }

    #[divan::bench]
    fn tcp_v4_demux(bencher: Bencher) {
        demux(bencher, tcp_input(Family::V4));
    }

    #[divan::bench]
    fn tcp_v4_verify(bencher: Bencher) {
        tcp(bencher, Family::V4, ChecksumCapabilities::default());
    }

    #[divan::bench]
    fn tcp_v4_no_verify(bencher: Bencher) {
        tcp(bencher, Family::V4, ChecksumCapabilities::ignored());
    }

    #[divan::bench]
    fn tcp_v6_demux(bencher: Bencher) {
        demux(bencher, tcp_input(Family::V6));
    }

    #[divan::bench]
    fn tcp_v6_verify(bencher: Bencher) {
        tcp(bencher, Family::V6, ChecksumCapabilities::default());
    }

    #[divan::bench]
    fn tcp_v6_no_verify(bencher: Bencher) {
        tcp(bencher, Family::V6, ChecksumCapabilities::ignored());
    }

    #[divan::bench]
    fn udp_v4_demux(bencher: Bencher) {
        demux(bencher, udp_input(Family::V4));
    }

    #[divan::bench]
    fn udp_v4_verify(bencher: Bencher) {
        udp(bencher, Family::V4, ChecksumCapabilities::default());
    }

    #[divan::bench]
    fn udp_v4_no_verify(bencher: Bencher) {
        udp(bencher, Family::V4, ChecksumCapabilities::ignored());
    }

    #[divan::bench]
    fn udp_v6_demux(bencher: Bencher) {
        demux(bencher, udp_input(Family::V6));
    }

    #[divan::bench]
    fn udp_v6_verify(bencher: Bencher) {
        udp(bencher, Family::V6, ChecksumCapabilities::default());
    }

    #[divan::bench]
    fn udp_v6_no_verify(bencher: Bencher) {
        udp(bencher, Family::V6, ChecksumCapabilities::ignored());
    }
}

/// The virtio-net header in front of every TUN packet once offload is negotiated.
mod vnet {
    use super::*;
    use uringproxy::wire::vnet::{self, Gso, Header};

    /// What the kernel puts in front of a 64 KiB TCPv4 super-packet.
    const GSO_TCPV4: Header = Header {
        needs_csum: true,
        gso: Gso::TcpV4,
        ecn: false,
        hdr_len: 40,
        gso_size: 1460,
        csum_start: 20,
        csum_offset: 16,
    };

    #[divan::bench]
    fn parse_gso_tcpv4(bencher: Bencher) {
        let mut buffer = vec![0u8; vnet::LEN + 65040];
        GSO_TCPV4.emit(&mut buffer);
        assert_eq!(
            Header::parse(&buffer).map(|(header, _)| header),
            Ok(GSO_TCPV4)
        );
        bencher.bench_local(|| Header::parse(black_box(&buffer)));
    }

    #[divan::bench]
    fn emit_gso_tcpv4(bencher: Bencher) {
        let mut buffer = [0u8; vnet::LEN];
        bencher.bench_local(|| black_box(GSO_TCPV4).emit(black_box(&mut buffer)));
    }
}

/// One established flow through the proxy's smoltcp stack.
mod stack {
    use super::*;
    use smoltcp::iface::{PollResult, SocketHandle, SocketSet};
    use smoltcp::phy::Device;
    use smoltcp::socket::tcp::{self, State};
    use smoltcp::time::{Duration, Instant};
    use smoltcp::wire::IpListenEndpoint;
    use uringproxy::stack::device::FlowTx;
    use uringproxy::stack::window::WindowState;
    use uringproxy::stack::{Interfaces, StackDevice, TxPool};
    use uringproxy::wire::Parsed;
    use uringproxy::wire::{Offload, vnet};

    /// The proxy's default `--flow-buffer`: bytes of receive and of send buffer per flow.
    const FLOW_BUFFER: usize = 1 << 20;
    /// TUN write buffers; each iteration fills one.
    const TX_BUFFERS: u16 = 4;
    /// Window scale the client announces: its 16-bit window field then means 8 MiB, so
    /// only the proxy's congestion window limits a 64 KiB segment.
    const CLIENT_WINDOW_SHIFT: u8 = 7;
    /// Payload of the big segment: what fits a 64 KiB IPv4 packet, with room to spare.
    const SUPER: usize = 65000;

    /// The flow's client and the proxy's end of it, as seen on the TUN.
    struct Flow {
        ifaces: Interfaces,
        tx: TxPool,
        sockets: SocketSet<'static>,
        handle: SocketHandle,
        server: IpEndpoint,
        /// The flow's MSS, which the event loop hands the pool for IPv6 segmentation.
        segment_size: u16,
        /// What the proxy's segments told the client (learnt, no limit set).
        window: WindowState,
        /// smoltcp's clock, fixed: see `new`.
        now: Instant,
        /// Bytes moved each way per iteration.
        len: usize,
        /// The client's next data segment; sequence and ACK numbers are rewritten in
        /// place each iteration.
        segment: Vec<u8>,
        ip_header_len: usize,
        /// The client's next sequence number, and the proxy's next one (what the client
        /// acknowledges).
        client_seq: TcpSeqNumber,
        proxy_seq: TcpSeqNumber,
        /// Server bytes waiting for the socket, like the relay's staging buffer.
        staging: Vec<u8>,
        /// Indices of TUN write buffers filled by the current iteration.
        written: Vec<u16>,
        /// Length of the one TUN write each iteration makes, virtio-net header included.
        write_len: usize,
    }

    /// What the client reads from one TUN write of the proxy.
    struct Seen {
        header: vnet::Header,
        control: TcpControl,
        seq: TcpSeqNumber,
        ack: Option<TcpSeqNumber>,
        window_scale: Option<u8>,
        payload: Vec<u8>,
    }

    impl Seen {
        fn of(write: &[u8]) -> Seen {
            let (header, packet) = vnet::Header::parse(write).expect("virtio-net header");
            let (src, dst, segment): (IpAddress, IpAddress, &[u8]) =
                match IpVersion::of_packet(packet).expect("IP packet") {
                    IpVersion::Ipv4 => {
                        let ip = Ipv4Packet::new_checked(packet).expect("IPv4 packet");
                        (ip.src_addr().into(), ip.dst_addr().into(), ip.payload())
                    }
                    IpVersion::Ipv6 => {
                        let ip = Ipv6Packet::new_checked(packet).expect("IPv6 packet");
                        (ip.src_addr().into(), ip.dst_addr().into(), ip.payload())
                    }
                };
            let tcp = TcpPacket::new_checked(segment).expect("TCP segment");
            // The checksum is partial: the kernel would complete it.
            let repr = TcpRepr::parse(&tcp, &src, &dst, &ChecksumCapabilities::ignored())
                .expect("TCP header");
            Seen {
                header,
                control: repr.control,
                seq: repr.seq_number,
                ack: repr.ack_number,
                window_scale: repr.window_scale,
                payload: repr.payload.to_vec(),
            }
        }

        /// The proxy's sequence number after this segment.
        fn end(&self) -> TcpSeqNumber {
            self.seq + self.payload.len() + usize::from(self.control == TcpControl::Syn)
        }
    }

    /// A control segment from the client (no data).
    fn client_control(
        client: IpEndpoint,
        server: IpEndpoint,
        control: TcpControl,
        seq: TcpSeqNumber,
        ack: Option<TcpSeqNumber>,
        mss: Option<u16>,
    ) -> Vec<u8> {
        let syn = control == TcpControl::Syn;
        let tcp = TcpRepr {
            control,
            seq_number: seq,
            ack_number: ack,
            window_scale: syn.then_some(CLIENT_WINDOW_SHIFT),
            max_seg_size: mss,
            ..data_segment(client, server, &[])
        };
        tcp_packet(client, server, &tcp)
    }

    impl Flow {
        /// A flow in Established, set up like the event loop sets up its flows, then
        /// warmed up until every iteration moves `len` bytes each way.
        fn new(family: Family, len: usize) -> Flow {
            let (client, server) = family.endpoints();
            // smoltcp's clock stands still. Every segment either side sends is
            // acknowledged within the same iteration, so no retransmission timer has a
            // reason to fire, and the proxy's ACK rides on its data instead of waiting
            // for the delayed-ACK timer; a fixed clock also keeps the keep-alive and
            // idle timers (set as in production) from ever coming due.
            let now = Instant::from_secs(1);
            let mut tx = TxPool::new(TX_BUFFERS, MTU, Offload::Tso).expect("TUN write buffers");
            let ifaces = Interfaces::new(&mut tx, now, 0x5eed);
            // The client segments below are patched without fixing their checksum, which
            // is only right if the proxy does not verify them (it leaves that to the
            // kernel that built them).
            assert!(
                !StackDevice::for_interface(&mut tx, IpVersion::Ipv4)
                    .capabilities()
                    .checksum
                    .tcp
                    .rx(),
                "the proxy verifies TCP checksums: recompute them after patching"
            );

            // As `flow::tcp::Flow::new` does, except that the buffers are written now:
            // a fresh zeroed buffer (like the proxy's mmap) takes a page fault on the
            // first touch of each 4 KiB page, which would otherwise land in the timed
            // loop during its first pass through the rings and not after.
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0xa5u8; FLOW_BUFFER]),
                tcp::SocketBuffer::new(vec![0xa5u8; FLOW_BUFFER]),
            );
            socket.set_nagle_enabled(false);
            socket.set_keep_alive(Some(Duration::from_secs(60)));
            socket.set_timeout(Some(Duration::from_secs(180)));
            socket.pause_synack(true);
            socket
                .listen(IpListenEndpoint {
                    addr: Some(server.addr),
                    port: server.port,
                })
                .expect("listen");
            let mut sockets = SocketSet::new(Vec::with_capacity(1));
            let handle = sockets.add(socket);

            let mut flow = Flow {
                ifaces,
                tx,
                sockets,
                handle,
                server,
                segment_size: family.mss(),
                window: WindowState::default(),
                now,
                len,
                segment: Vec::new(),
                ip_header_len: 0,
                client_seq: TcpSeqNumber(0x1000_0000),
                proxy_seq: TcpSeqNumber(0),
                staging: pattern(len, 5),
                written: Vec::with_capacity(usize::from(TX_BUFFERS)),
                write_len: 0,
            };
            flow.handshake(client, family.mss());

            let ip = ip_repr(client, server, IpProtocol::Tcp, 0);
            flow.ip_header_len = ip.header_len();
            flow.write_len = vnet::LEN + ip.header_len() + 20 + len;
            let upload = pattern(len, 6);
            flow.segment = tcp_packet(client, server, &data_segment(client, server, &upload));
            flow.warm_up();
            flow.verify(&upload);
            flow
        }

        fn socket(&mut self) -> &mut tcp::Socket<'static> {
            self.sockets.get_mut::<tcp::Socket>(self.handle)
        }

        /// Hands one client packet to the proxy, as `Flow::on_segment` does.
        fn ingress(&mut self, packet: &[u8]) {
            let iface = self.ifaces.serving(&self.server.addr);
            let flow = FlowTx {
                ipv6_segment_size: self.segment_size,
                window_limit: None,
                window: &mut self.window,
            };
            let mut device = StackDevice::ingress(packet, &mut self.tx, Some(flow));
            iface.poll_ingress_single(self.now, &mut device, &mut self.sockets);
        }

        /// Runs the proxy's egress for the flow, as `Flow::poll` does, and
        /// completes the TUN writes it made, each passed to `each` first.
        fn egress(&mut self, mut each: impl FnMut(&[u8])) {
            let iface = self.ifaces.serving(&self.server.addr);
            let flow = FlowTx {
                ipv6_segment_size: self.segment_size,
                window_limit: None,
                window: &mut self.window,
            };
            let mut device = StackDevice::egress(&mut self.tx, flow);
            while iface.poll_egress(self.now, &mut device, &mut self.sockets) != PollResult::None {}
            self.tx.take_ready(|index, write| {
                write.region.with_mut(write.range, |bytes| each(bytes));
                self.written.push(index);
            });
            for index in self.written.drain(..) {
                self.tx.release(index);
            }
        }

        /// Copies of the TUN writes of one egress run (set-up only).
        fn egress_writes(&mut self) -> Vec<Seen> {
            let mut writes = Vec::new();
            self.egress(|write| writes.push(Seen::of(write)));
            writes
        }

        /// SYN with MSS and window scale, the proxy's SYN|ACK once the (pretend)
        /// outbound connect succeeded, ACK.
        fn handshake(&mut self, client: IpEndpoint, mss: u16) {
            let syn = client_control(
                client,
                self.server,
                TcpControl::Syn,
                self.client_seq,
                None,
                Some(mss),
            );
            assert!(matches!(
                uringproxy::wire::parse(&syn),
                Parsed::Tcp { opens: true, mss: Some(m), .. } if m == mss
            ));
            self.ingress(&syn);
            self.client_seq += 1;
            assert_eq!(self.socket().state(), State::SynReceived);
            assert!(self.egress_writes().is_empty(), "SYN|ACK must wait");
            // What `Relay::on_connected` does.
            self.socket().pause_synack(false);
            let writes = self.egress_writes();
            let [syn_ack] = writes.as_slice() else {
                panic!("{} writes instead of one SYN|ACK", writes.len());
            };
            assert_eq!(syn_ack.control, TcpControl::Syn);
            assert_eq!(syn_ack.ack, Some(self.client_seq));
            assert!(syn_ack.window_scale.is_some(), "window scaling refused");
            self.proxy_seq = syn_ack.end();
            let ack = client_control(
                client,
                self.server,
                TcpControl::None,
                self.client_seq,
                Some(self.proxy_seq),
                None,
            );
            self.ingress(&ack);
            assert_eq!(self.socket().state(), State::Established);
            assert!(self.egress_writes().is_empty());
        }

        /// The client's data in, the socket drained, the server's data out. Returns the
        /// bytes drained from the socket; `received` sees them, `sent` every TUN write.
        fn exchange(&mut self, mut received: impl FnMut(&[u8]), sent: impl FnMut(&[u8])) -> usize {
            let mut tcp = TcpPacket::new_unchecked(&mut self.segment[self.ip_header_len..]);
            tcp.set_seq_number(self.client_seq);
            tcp.set_ack_number(self.proxy_seq);
            self.client_seq += self.len;
            let segment = std::mem::take(&mut self.segment);
            self.ingress(&segment);
            self.segment = segment;

            let len = self.len;
            let socket = self.sockets.get_mut::<tcp::Socket>(self.handle);
            // The relay hands client bytes to io_uring straight from smoltcp's receive
            // buffer (the kernel's send copies them) and then only consumes them; a
            // wrapped ring takes two rounds.
            let mut drained = 0;
            while let Ok(n) = socket.recv(|data| {
                received(data);
                (data.len(), data.len())
            }) && n > 0
            {
                drained += n;
            }
            // Server bytes go from the staging buffer into the send buffer, which
            // holds only what is unacknowledged; the client acknowledged everything.
            let room = len - socket.send_queue();
            let written = socket.send_slice(&self.staging[..room]);
            assert_eq!(written, Ok(room), "send buffer full");
            self.egress(sent);
            drained
        }

        /// One iteration of the benchmark, in the steady state `warm_up` reaches: the
        /// proxy sends all it was given in one TUN write.
        fn step(&mut self, received: impl FnMut(&[u8]), mut sent: impl FnMut(&[u8])) {
            let (mut writes, mut bytes) = (0, 0);
            let drained = self.exchange(received, |write| {
                writes += 1;
                bytes += write.len();
                sent(write);
            });
            assert!(
                drained == self.len && writes == 1 && bytes == self.write_len,
                "iteration moved {drained} bytes in, {writes} writes of {bytes} bytes out"
            );
            self.proxy_seq += self.len;
        }

        /// Exchanges data until the proxy's congestion window lets it send all `len`
        /// bytes at once (smoltcp's CUBIC starts at 2 KiB and, in slow start, grows by
        /// one MSS per ACK).
        fn warm_up(&mut self) {
            for _ in 0..1000 {
                let mut writes = Vec::new();
                let drained = self.exchange(|_| {}, |write| writes.push(Seen::of(write)));
                assert_eq!(drained, self.len);
                let before = self.proxy_seq;
                for seen in &writes {
                    assert_eq!(seen.ack, Some(self.client_seq));
                    if seen.end() > self.proxy_seq {
                        self.proxy_seq = seen.end();
                    }
                }
                let sent = self.proxy_seq - before;
                if sent == self.len && self.socket().send_queue() == self.len {
                    return;
                }
            }
            panic!("the proxy never sent {} bytes at once", self.len);
        }

        /// Runs a few timed-loop iterations and checks what went through: the proxy
        /// acknowledges the client's bytes and sends the server's in one segment or,
        /// beyond one MSS, one GSO super-packet.
        fn verify(&mut self, upload: &[u8]) {
            for _ in 0..3 {
                let seq = self.proxy_seq;
                let mut received = Vec::new();
                let mut writes = Vec::new();
                self.step(
                    |data| received.extend_from_slice(data),
                    |write| writes.push(Seen::of(write)),
                );
                assert_eq!(received, upload);
                let seen = &writes[0];
                assert_eq!(seen.seq, seq);
                assert_eq!(seen.ack, Some(self.client_seq));
                assert_eq!(seen.payload, self.staging);
                assert!(seen.header.needs_csum);
                let expected_gso = match (self.len > usize::from(self.segment_size), self.server) {
                    (false, _) => vnet::Gso::None,
                    (
                        true,
                        IpEndpoint {
                            addr: IpAddress::Ipv4(_),
                            ..
                        },
                    ) => vnet::Gso::TcpV4,
                    (true, _) => vnet::Gso::TcpV6,
                };
                assert_eq!(seen.header.gso, expected_gso);
                if expected_gso != vnet::Gso::None {
                    assert_eq!(seen.header.gso_size, self.segment_size);
                }
            }
            assert_eq!(self.socket().state(), State::Established);
            assert_eq!(self.socket().recv_queue(), 0);
        }
    }

    fn round_trip(bencher: Bencher, family: Family, len: usize) {
        let mut flow = Flow::new(family, len);
        bencher
            .counter(BytesCount::new(len))
            .bench_local(|| flow.step(|_| {}, |_| {}));
        assert_eq!(flow.socket().state(), State::Established);
    }

    /// IPv4: one MSS (1460 bytes) and a 64 KiB super-packet each way.
    #[divan::bench(args = [1460, SUPER])]
    fn tcp_v4(bencher: Bencher, len: usize) {
        round_trip(bencher, Family::V4, len);
    }

    /// IPv6: one MSS (1440 bytes) and a 64 KiB super-packet each way.
    #[divan::bench(args = [1440, SUPER])]
    fn tcp_v6(bencher: Bencher, len: usize) {
        round_trip(bencher, Family::V6, len);
    }
}

/// The fake-IP resolver's answer to one A query (`Resolver::answer`, parse to reply,
/// into a 512-byte buffer): a name in the table (`a_cached`), a name never seen in a
/// full 65,534-entry table, each one evicting the least recently used (`a_new`), and
/// the parse alone (`parse`).
mod dns {
    use super::*;
    use smoltcp::time::Instant;
    use smoltcp::wire::{Ipv4Cidr, Ipv6Cidr};
    use uringproxy::flow::dns::{Answer, FakeConfig, Resolver};
    use uringproxy::wire::dns::{Query, TYPE_A, UDP_MAX};

    fn resolver() -> Resolver {
        Resolver::new(FakeConfig {
            v4: Ipv4Cidr::new(Ipv4Address::new(198, 18, 0, 0), 16),
            v6: Some(Ipv6Cidr::new(
                Ipv6Address::new(0xfd7a, 0x7072, 0x7879, 0xf4, 0, 0, 0, 0),
                64,
            )),
            exclude: Vec::new(),
            capacity: 65_536,
            forward: false,
        })
        .unwrap()
    }

    /// An A query for `name`, as a stub resolver sends it.
    fn query(name: &str) -> Vec<u8> {
        let mut out = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.extend_from_slice(&[0, 0, 1, 0, 1]);
        out
    }

    #[divan::bench]
    fn parse(bencher: Bencher) {
        let message = query("www.example.com");
        assert_eq!(Query::parse(&message).unwrap().qtype, TYPE_A);
        bencher.bench_local(|| Query::parse(black_box(&message)));
    }

    #[divan::bench]
    fn a_cached(bencher: Bencher) {
        let mut resolver = resolver();
        let message = query("www.example.com");
        let mut out = [0u8; UDP_MAX];
        let mut now = Instant::ZERO;
        assert!(matches!(
            resolver.answer(&message, now, &mut out),
            Answer::Reply(_)
        ));
        bencher.bench_local(|| {
            now += smoltcp::time::Duration::from_micros(1);
            resolver.answer(black_box(&message), now, &mut out)
        });
        assert_eq!(resolver.counters().table_size, 1);
    }

    #[divan::bench]
    fn a_new(bencher: Bencher) {
        let mut resolver = resolver();
        // More names than entries, so that every query past the first round evicts.
        let messages: Vec<Vec<u8>> = (0..100_000)
            .map(|i| query(&format!("host-{i}.example.com")))
            .collect();
        let mut out = [0u8; UDP_MAX];
        let mut now = Instant::ZERO;
        let mut next = 0;
        // Warm: the table full, the names after it all new.
        for message in &messages[..65_534] {
            now += smoltcp::time::Duration::from_millis(1);
            resolver.answer(message, now, &mut out);
        }
        next += 65_534;
        bencher.bench_local(|| {
            // Entries come back after 34,466 queries, long past MIN_IDLE at 1 ms each.
            now += smoltcp::time::Duration::from_millis(1);
            let message = &messages[next % messages.len()];
            next += 1;
            resolver.answer(black_box(message), now, &mut out)
        });
        let counters = resolver.counters();
        assert_eq!(counters.table_size, 65_534);
        assert_eq!(counters.answered, next as u64, "every query got an address");
    }
}
