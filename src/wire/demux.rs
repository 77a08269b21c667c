//! Classifies a raw IP packet from the TUN and extracts the 4-tuple that names its flow.

use std::net::SocketAddr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpEndpoint, IpProtocol, IpVersion, Ipv4Packet, Ipv6Packet, TcpPacket, TcpRepr,
    UdpPacket,
};

/// The 4-tuple of a TCP or UDP flow as the client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: IpEndpoint,
    pub server: IpEndpoint,
}

impl FlowKey {
    /// The client's address and port, as the kernel's sockets name them.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::new(self.client.addr.into(), self.client.port)
    }

    /// The server's address and port, as the kernel's sockets name them.
    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::new(self.server.addr.into(), self.server.port)
    }
}

/// What a packet read from the TUN is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A TCP segment; `opens` is set for a SYN without ACK (a new connection), with the
    /// MSS the client announced in it, if any.
    Tcp {
        key: FlowKey,
        opens: bool,
        mss: Option<u16>,
    },
    /// A UDP datagram; its data is `payload_len` bytes at `payload_start` of the packet.
    Udp {
        key: FlowKey,
        payload_start: usize,
        payload_len: usize,
    },
    /// An ICMP or ICMPv6 echo request; the key's client port is its identifier and the
    /// server port 0. Its data is `data_len` bytes at `data_start` of the packet.
    Echo {
        key: FlowKey,
        seq: u16,
        data_start: usize,
        data_len: usize,
    },
    /// A fragment of an IPv4 datagram (not reassembled: dropped and counted).
    Fragment,
    /// A well-formed packet of a protocol we do not relay (yet).
    Unsupported,
    /// Too short, wrong version, lengths that do not add up.
    Malformed,
}

/// Parses just enough of `packet` to route it: bounds-checked, never panics.
pub fn parse(packet: &[u8]) -> Parsed {
    // `IpVersion::of_packet` indexes the first byte unchecked.
    if packet.is_empty() {
        return Parsed::Malformed;
    }
    match IpVersion::of_packet(packet) {
        Ok(IpVersion::Ipv4) => parse_ipv4(packet),
        Ok(IpVersion::Ipv6) => parse_ipv6(packet),
        _ => Parsed::Malformed,
    }
}

fn parse_ipv4(packet: &[u8]) -> Parsed {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return Parsed::Malformed;
    };
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Parsed::Fragment;
    }
    let (src, dst) = (
        IpAddress::Ipv4(ip.src_addr()),
        IpAddress::Ipv4(ip.dst_addr()),
    );
    let header_len = usize::from(ip.header_len());
    match ip.next_header() {
        IpProtocol::Tcp => parse_tcp(src, dst, ip.payload()),
        IpProtocol::Udp => parse_udp(src, dst, ip.payload(), header_len),
        IpProtocol::Icmp => parse_echo(src, dst, ip.payload(), header_len, ECHO_REQUEST_V4),
        _ => Parsed::Unsupported,
    }
}

fn parse_ipv6(packet: &[u8]) -> Parsed {
    let Ok(ip) = Ipv6Packet::new_checked(packet) else {
        return Parsed::Malformed;
    };
    // Extension headers (fragments, hop-by-hop options) are not produced by the kernel's
    // own TCP or UDP; anything else directly after the fixed header is not ours.
    let (src, dst) = (
        IpAddress::Ipv6(ip.src_addr()),
        IpAddress::Ipv6(ip.dst_addr()),
    );
    match ip.next_header() {
        IpProtocol::Tcp => parse_tcp(src, dst, ip.payload()),
        IpProtocol::Udp => parse_udp(src, dst, ip.payload(), ip.header_len()),
        IpProtocol::Icmpv6 => parse_echo(src, dst, ip.payload(), ip.header_len(), ECHO_REQUEST_V6),
        IpProtocol::Ipv6Frag => Parsed::Fragment,
        _ => Parsed::Unsupported,
    }
}

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REQUEST_V6: u8 = 128;

/// An echo request of type `request_type` at `offset` of the IP packet; any other ICMP
/// message (errors, neighbour discovery, MLD) is not relayed.
fn parse_echo(
    src: IpAddress,
    dst: IpAddress,
    message: &[u8],
    offset: usize,
    request_type: u8,
) -> Parsed {
    const HEADER: usize = 8;
    if message.len() < HEADER {
        return Parsed::Malformed;
    }
    if message[0] != request_type || message[1] != 0 {
        return Parsed::Unsupported;
    }
    let ident = u16::from_be_bytes([message[4], message[5]]);
    Parsed::Echo {
        key: FlowKey {
            client: IpEndpoint::new(src, ident),
            server: IpEndpoint::new(dst, 0),
        },
        seq: u16::from_be_bytes([message[6], message[7]]),
        data_start: offset + HEADER,
        data_len: message.len() - HEADER,
    }
}

/// `offset` is where `datagram` starts in the IP packet.
fn parse_udp(src: IpAddress, dst: IpAddress, datagram: &[u8], offset: usize) -> Parsed {
    let Ok(udp) = UdpPacket::new_checked(datagram) else {
        return Parsed::Malformed;
    };
    if udp.src_port() == 0 || udp.dst_port() == 0 {
        return Parsed::Malformed;
    }
    const HEADER: usize = 8;
    Parsed::Udp {
        key: FlowKey {
            client: IpEndpoint::new(src, udp.src_port()),
            server: IpEndpoint::new(dst, udp.dst_port()),
        },
        payload_start: offset + HEADER,
        payload_len: usize::from(udp.len()) - HEADER,
    }
}

fn parse_tcp(src: IpAddress, dst: IpAddress, segment: &[u8]) -> Parsed {
    let Ok(tcp) = TcpPacket::new_checked(segment) else {
        return Parsed::Malformed;
    };
    if tcp.src_port() == 0 || tcp.dst_port() == 0 {
        return Parsed::Malformed;
    }
    let opens = tcp.syn() && !tcp.ack() && !tcp.rst();
    // Options are parsed only for the one SYN that opens a flow.
    let mss = if opens {
        TcpRepr::parse(&tcp, &src, &dst, &ChecksumCapabilities::ignored())
            .ok()
            .and_then(|repr| repr.max_seg_size)
    } else {
        None
    };
    Parsed::Tcp {
        key: FlowKey {
            client: IpEndpoint::new(src, tcp.src_port()),
            server: IpEndpoint::new(dst, tcp.dst_port()),
        },
        opens,
        mss,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use smoltcp::wire::{
        IpRepr, Ipv4Address, Ipv6Address, TcpControl, TcpRepr, TcpSeqNumber, UdpRepr,
    };

    /// Builds a TCP segment in an IPv4 or IPv6 packet, the way the kernel would send it.
    pub(crate) fn tcp_packet(
        src: IpEndpoint,
        dst: IpEndpoint,
        control: TcpControl,
        ack: bool,
    ) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: src.port,
            dst_port: dst.port,
            control,
            seq_number: TcpSeqNumber(1000),
            ack_number: ack.then_some(TcpSeqNumber(1)),
            window_len: 64240,
            window_scale: None,
            max_seg_size: (control == TcpControl::Syn).then_some(1460),
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        let caps = ChecksumCapabilities::default();
        let ip = IpRepr::new(src.addr, dst.addr, IpProtocol::Tcp, tcp.buffer_len(), 64);
        let mut buf = vec![0u8; ip.buffer_len()];
        ip.emit(&mut buf[..], &caps);
        let mut segment = TcpPacket::new_unchecked(&mut buf[ip.header_len()..]);
        tcp.emit(&mut segment, &src.addr, &dst.addr, &caps);
        buf
    }

    pub(crate) fn v4(a: [u8; 4], port: u16) -> IpEndpoint {
        IpEndpoint::new(IpAddress::Ipv4(Ipv4Address::from(a)), port)
    }

    pub(crate) fn v6(last: u16, port: u16) -> IpEndpoint {
        IpEndpoint::new(
            IpAddress::Ipv6(Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, last)),
            port,
        )
    }

    #[test]
    fn syn_opens_a_flow_with_its_4_tuple() {
        for (client, server) in [
            (v4([10, 0, 0, 1], 40000), v4([10, 0, 0, 2], 80)),
            (v6(1, 40000), v6(2, 443)),
        ] {
            let syn = tcp_packet(client, server, TcpControl::Syn, false);
            assert_eq!(
                parse(&syn),
                Parsed::Tcp {
                    key: FlowKey { client, server },
                    opens: true,
                    mss: Some(1460),
                }
            );
            let ack = tcp_packet(client, server, TcpControl::None, true);
            assert_eq!(
                parse(&ack),
                Parsed::Tcp {
                    key: FlowKey { client, server },
                    opens: false,
                    mss: None,
                }
            );
        }
    }

    #[test]
    fn syn_ack_does_not_open() {
        let packet = tcp_packet(
            v4([1, 1, 1, 1], 1),
            v4([2, 2, 2, 2], 2),
            TcpControl::Syn,
            true,
        );
        assert!(matches!(parse(&packet), Parsed::Tcp { opens: false, .. }));
    }

    #[test]
    fn every_truncation_is_malformed_not_a_panic() {
        let syn = tcp_packet(
            v4([10, 0, 0, 1], 40000),
            v4([10, 0, 0, 2], 80),
            TcpControl::Syn,
            false,
        );
        for len in 0..syn.len() {
            assert_eq!(
                parse(&syn[..len]),
                Parsed::Malformed,
                "prefix of {len} bytes"
            );
        }
        let syn6 = tcp_packet(v6(1, 1), v6(2, 2), TcpControl::Syn, false);
        for len in 0..syn6.len() {
            assert_eq!(
                parse(&syn6[..len]),
                Parsed::Malformed,
                "prefix of {len} bytes"
            );
        }
    }

    /// A UDP datagram carrying `payload`, as the kernel would send it.
    pub(crate) fn udp_packet(src: IpEndpoint, dst: IpEndpoint, payload: &[u8]) -> Vec<u8> {
        let udp = UdpRepr {
            src_port: src.port,
            dst_port: dst.port,
        };
        let caps = ChecksumCapabilities::default();
        let ip = IpRepr::new(
            src.addr,
            dst.addr,
            IpProtocol::Udp,
            udp.header_len() + payload.len(),
            64,
        );
        let mut buf = vec![0u8; ip.buffer_len()];
        ip.emit(&mut buf[..], &caps);
        let mut datagram = UdpPacket::new_unchecked(&mut buf[ip.header_len()..]);
        udp.emit(
            &mut datagram,
            &src.addr,
            &dst.addr,
            payload.len(),
            |b| b.copy_from_slice(payload),
            &caps,
        );
        buf
    }

    #[test]
    fn udp_datagrams_give_their_flow_and_payload() {
        for (client, server) in [
            (v4([10, 0, 0, 1], 5353), v4([10, 0, 0, 2], 53)),
            (v6(1, 5353), v6(2, 53)),
        ] {
            let packet = udp_packet(client, server, b"query");
            let Parsed::Udp {
                key,
                payload_start,
                payload_len,
            } = parse(&packet)
            else {
                panic!("not UDP: {:?}", parse(&packet));
            };
            assert_eq!(key, FlowKey { client, server });
            assert_eq!(
                &packet[payload_start..payload_start + payload_len],
                b"query"
            );
            for len in 0..packet.len() {
                assert_eq!(
                    parse(&packet[..len]),
                    Parsed::Malformed,
                    "prefix of {len} bytes"
                );
            }
        }
    }

    /// An echo request (ICMP or ICMPv6 by family) with `ident`, `seq` and `data`.
    fn echo_packet(src: IpEndpoint, dst: IpEndpoint, ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let (protocol, kind) = match src.addr {
            IpAddress::Ipv4(_) => (IpProtocol::Icmp, 8),
            IpAddress::Ipv6(_) => (IpProtocol::Icmpv6, 128),
        };
        let ip = IpRepr::new(src.addr, dst.addr, protocol, 8 + data.len(), 64);
        let mut buf = vec![0u8; ip.buffer_len()];
        ip.emit(&mut buf[..], &ChecksumCapabilities::default());
        let icmp = &mut buf[ip.header_len()..];
        icmp[0] = kind;
        icmp[4..6].copy_from_slice(&ident.to_be_bytes());
        icmp[6..8].copy_from_slice(&seq.to_be_bytes());
        icmp[8..].copy_from_slice(data);
        buf
    }

    #[test]
    fn echo_requests_give_identifier_sequence_and_data() {
        for (client, server) in [
            (v4([10, 0, 0, 1], 0), v4([10, 0, 0, 2], 0)),
            (v6(1, 0), v6(2, 0)),
        ] {
            let packet = echo_packet(client, server, 0x4242, 7, b"abcdefgh");
            let Parsed::Echo {
                key,
                seq,
                data_start,
                data_len,
            } = parse(&packet)
            else {
                panic!("not an echo request: {:?}", parse(&packet));
            };
            assert_eq!(key.client, IpEndpoint::new(client.addr, 0x4242));
            assert_eq!(key.server, IpEndpoint::new(server.addr, 0));
            assert_eq!(seq, 7);
            assert_eq!(&packet[data_start..data_start + data_len], b"abcdefgh");
            let header_end = packet.len() - 8 - 8;
            for len in header_end..header_end + 8 {
                assert_eq!(
                    parse(&packet[..len]),
                    Parsed::Malformed,
                    "prefix of {len} bytes"
                );
            }
            let mut reply = packet.clone();
            reply[header_end] = if client.addr.version() == IpVersion::Ipv4 {
                0
            } else {
                129
            };
            assert_eq!(
                parse(&reply),
                Parsed::Unsupported,
                "echo replies are not relayed"
            );
        }
    }

    #[test]
    fn other_protocols_and_fragments_are_not_relayed() {
        let mut packet = tcp_packet(
            v4([10, 0, 0, 1], 1),
            v4([10, 0, 0, 2], 2),
            TcpControl::Syn,
            false,
        );
        packet[9] = 47; // GRE
        assert_eq!(parse(&packet), Parsed::Unsupported);
        let mut fragment = tcp_packet(
            v4([10, 0, 0, 1], 1),
            v4([10, 0, 0, 2], 2),
            TcpControl::Syn,
            false,
        );
        fragment[6] = 0x20; // more fragments
        assert_eq!(parse(&fragment), Parsed::Fragment);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = [0u8; 128];
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 128) as usize;
            for (i, byte) in buf.iter_mut().enumerate() {
                *byte = (state >> (i % 8 * 8)) as u8 ^ i as u8;
            }
            buf[0] = if state & 1 == 0 { 0x45 } else { 0x60 };
            let _ = parse(&buf[..len]);
        }
    }
}
