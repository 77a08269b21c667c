//! ICMP messages the proxy writes itself: destination-unreachable errors for clients, so a
//! failed connect or send looks to them as it would on the direct path (EHOSTUNREACH,
//! ECONNREFUSED on UDP, ...), and echo requests and replies for relayed pings.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr,
    IpAddress, IpProtocol, IpVersion, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
};

use super::FlowKey;

/// Bytes of a client packet quoted in an ICMP error: the longest IPv4 header plus the
/// 8 bytes of transport header that identify the socket.
pub const QUOTE_LEN: usize = 68;

/// The start of a client packet, kept to quote it in an ICMP error later.
#[derive(Clone, Copy, Debug)]
pub struct Quote {
    bytes: [u8; QUOTE_LEN],
    len: u8,
}

impl Quote {
    pub fn of(packet: &[u8]) -> Quote {
        let len = packet.len().min(QUOTE_LEN);
        let mut bytes = [0; QUOTE_LEN];
        bytes[..len].copy_from_slice(&packet[..len]);
        Quote {
            bytes,
            len: len as u8,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The sequence number of the quoted TCP segment (of a SYN: the client's initial
    /// one), if the quote reaches it.
    pub fn tcp_seq(&self) -> Option<u32> {
        let bytes = self.bytes();
        let header = match bytes.first()? >> 4 {
            4 => usize::from(bytes[0] & 0x0f) * 4,
            6 => 40,
            _ => return None,
        };
        let seq = bytes.get(header + 4..header + 8)?;
        Some(u32::from_be_bytes(seq.try_into().ok()?))
    }
}

/// Why the destination could not be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Network,
    Host,
    Port,
    /// Administratively prohibited: the proxy will not relay it.
    Prohibited,
}

/// Writes into `buf` an IP packet carrying an ICMP error from the quoted packet's
/// destination back to its source; returns its length. `None` when the quote is
/// unusable or `buf` too small.
pub fn unreachable(buf: &mut [u8], quote: &Quote, reason: Reason) -> Option<usize> {
    let original = quote.bytes();
    let caps = ChecksumCapabilities::default();
    match IpVersion::of_packet(original.get(..1)?).ok()? {
        IpVersion::Ipv4 => {
            let (header, data) = ipv4_quote(original)?;
            let icmp = Icmpv4Repr::DstUnreachable {
                reason: match reason {
                    Reason::Network => Icmpv4DstUnreachable::NetUnreachable,
                    Reason::Host => Icmpv4DstUnreachable::HostUnreachable,
                    Reason::Port => Icmpv4DstUnreachable::PortUnreachable,
                    Reason::Prohibited => Icmpv4DstUnreachable::CommProhibited,
                },
                header,
                data,
            };
            let back = (
                IpAddress::Ipv4(header.dst_addr),
                IpAddress::Ipv4(header.src_addr),
            );
            super::emit_ip(buf, back, IpProtocol::Icmp, icmp.buffer_len(), |message| {
                icmp.emit(&mut Icmpv4Packet::new_unchecked(message), &caps)
            })
        }
        IpVersion::Ipv6 => {
            let (header, data) = ipv6_quote(original)?;
            let icmp = Icmpv6Repr::DstUnreachable {
                reason: match reason {
                    Reason::Network => Icmpv6DstUnreachable::NoRoute,
                    Reason::Host => Icmpv6DstUnreachable::AddrUnreachable,
                    Reason::Port => Icmpv6DstUnreachable::PortUnreachable,
                    Reason::Prohibited => Icmpv6DstUnreachable::AdminProhibit,
                },
                header,
                data,
            };
            let (from, to) = (header.dst_addr, header.src_addr);
            super::emit_ip(
                buf,
                (from.into(), to.into()),
                IpProtocol::Icmpv6,
                icmp.buffer_len(),
                |message| icmp.emit(&from, &to, &mut Icmpv6Packet::new_unchecked(message), &caps),
            )
        }
    }
}

/// Bytes of an ICMP echo header (type, code, checksum, identifier, sequence).
const ECHO_HEADER: usize = 8;

/// Writes an echo request into `buf`, returning its length (data beyond `buf` is cut).
/// ICMPv4 needs our checksum; the kernel fills in ICMPv6 checksums of raw sockets itself.
pub fn echo_request(buf: &mut [u8], ipv4: bool, ident: u16, seq: u16, data: &[u8]) -> usize {
    if buf.len() < ECHO_HEADER {
        return 0;
    }
    let len = (ECHO_HEADER + data.len()).min(buf.len());
    let data = &data[..len - ECHO_HEADER];
    buf[0] = if ipv4 { 8 } else { 128 };
    buf[1] = 0;
    buf[2..4].copy_from_slice(&[0, 0]);
    buf[4..6].copy_from_slice(&ident.to_be_bytes());
    buf[6..8].copy_from_slice(&seq.to_be_bytes());
    buf[ECHO_HEADER..len].copy_from_slice(data);
    if ipv4 {
        let sum = !smoltcp::wire::checksum::data(&buf[..len]);
        buf[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    len
}

/// What became of an echo reply read from a flow's raw socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EchoReply {
    /// Written to the buffer as a reply from the pinged host to the client: its length.
    Written(usize),
    /// The flow's reply, but the buffer cannot hold it.
    TooBig,
    /// Not this flow's echo reply (another ping's, an ICMP error): ignored.
    NotOurs,
}

/// Writes into `buf` the echo reply found in `received` (from the raw socket of flow
/// `key`, whose requests went out with identifier `outbound_ident`) as an IP packet from
/// the pinged host to the client, with the client's own identifier.
pub fn echo_reply(buf: &mut [u8], key: FlowKey, outbound_ident: u16, received: &[u8]) -> EchoReply {
    let written = |len: Option<usize>| len.map_or(EchoReply::TooBig, EchoReply::Written);
    let caps = ChecksumCapabilities::default();
    let ignored = ChecksumCapabilities::ignored();
    let ident = key.client.port;
    let back = (key.server.addr, key.client.addr);
    match back {
        (IpAddress::Ipv4(_), IpAddress::Ipv4(_)) => {
            // IPv4 raw sockets deliver the IP header too.
            let Some(icmp) = Ipv4Packet::new_checked(received)
                .ok()
                .and_then(|ip| Icmpv4Packet::new_checked(ip.payload()).ok())
            else {
                return EchoReply::NotOurs;
            };
            let Ok(Icmpv4Repr::EchoReply {
                ident: got,
                seq_no,
                data,
            }) = Icmpv4Repr::parse(&icmp, &ignored)
            else {
                return EchoReply::NotOurs;
            };
            if got != outbound_ident {
                return EchoReply::NotOurs;
            }
            let repr = Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data,
            };
            written(super::emit_ip(
                buf,
                back,
                IpProtocol::Icmp,
                repr.buffer_len(),
                |message| repr.emit(&mut Icmpv4Packet::new_unchecked(message), &caps),
            ))
        }
        (IpAddress::Ipv6(server), IpAddress::Ipv6(client)) => {
            let Some(icmp) = Icmpv6Packet::new_checked(received).ok() else {
                return EchoReply::NotOurs;
            };
            let Ok(Icmpv6Repr::EchoReply {
                ident: got,
                seq_no,
                data,
            }) = Icmpv6Repr::parse(&server, &client, &icmp, &ignored)
            else {
                return EchoReply::NotOurs;
            };
            if got != outbound_ident {
                return EchoReply::NotOurs;
            }
            let repr = Icmpv6Repr::EchoReply {
                ident,
                seq_no,
                data,
            };
            written(super::emit_ip(
                buf,
                back,
                IpProtocol::Icmpv6,
                repr.buffer_len(),
                |message| {
                    repr.emit(
                        &server,
                        &client,
                        &mut Icmpv6Packet::new_unchecked(message),
                        &caps,
                    )
                },
            ))
        }
        _ => EchoReply::NotOurs,
    }
}

/// The IPv4 header of a (truncated) quoted packet and the 8 bytes after it.
fn ipv4_quote(original: &[u8]) -> Option<(Ipv4Repr, &[u8])> {
    if original.len() < 20 {
        return None;
    }
    let packet = Ipv4Packet::new_unchecked(original);
    let header_len = usize::from(packet.header_len());
    let total_len = usize::from(packet.total_len());
    if header_len < 20 || total_len < header_len || original.len() < header_len + 8 {
        return None;
    }
    let header = Ipv4Repr {
        src_addr: packet.src_addr(),
        dst_addr: packet.dst_addr(),
        next_header: packet.next_header(),
        payload_len: total_len - header_len,
        hop_limit: packet.hop_limit(),
    };
    Some((header, &original[header_len..header_len + 8]))
}

/// The IPv6 header of a (truncated) quoted packet and the 8 bytes after it.
fn ipv6_quote(original: &[u8]) -> Option<(Ipv6Repr, &[u8])> {
    const HEADER: usize = 40;
    if original.len() < HEADER + 8 {
        return None;
    }
    let packet = Ipv6Packet::new_unchecked(original);
    let header = Ipv6Repr {
        src_addr: packet.src_addr(),
        dst_addr: packet.dst_addr(),
        next_header: packet.next_header(),
        payload_len: usize::from(packet.payload_len()),
        hop_limit: packet.hop_limit(),
    };
    Some((header, &original[HEADER..HEADER + 8]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::demux::tests::{tcp_packet, v4, v6};
    use smoltcp::wire::TcpControl;

    fn emitted(quote: &Quote, reason: Reason) -> Vec<u8> {
        let mut buf = vec![0u8; 1500];
        let len = unreachable(&mut buf, quote, reason).expect("an ICMP error");
        buf.truncate(len);
        buf
    }

    #[test]
    fn host_unreachable_quotes_the_syn_back_to_its_sender() {
        let (client, server) = (v4([10, 0, 0, 1], 40000), v4([10, 0, 0, 9], 80));
        let syn = tcp_packet(client, server, TcpControl::Syn, false);
        let out = emitted(&Quote::of(&syn), Reason::Host);
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        assert_eq!(IpAddress::Ipv4(ip.src_addr()), server.addr);
        assert_eq!(IpAddress::Ipv4(ip.dst_addr()), client.addr);
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        // smoltcp's own parser insists the quoted packet be complete, so check by hand:
        // type 3 (destination unreachable), code 1 (host), then the SYN's first 28 bytes.
        assert_eq!((ip.payload()[0], ip.payload()[1]), (3, 1));
        assert_eq!(&ip.payload()[8..], &syn[..28]);
    }

    #[test]
    fn ipv6_port_unreachable_is_valid() {
        let (client, server) = (v6(1, 5353), v6(2, 53));
        let packet = tcp_packet(client, server, TcpControl::Syn, false);
        let out = emitted(&Quote::of(&packet), Reason::Port);
        let ip = Ipv6Packet::new_checked(&out[..]).unwrap();
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        let repr = Icmpv6Repr::parse(
            &ip.src_addr(),
            &ip.dst_addr(),
            &icmp,
            &ChecksumCapabilities::default(),
        )
        .unwrap();
        assert!(matches!(
            repr,
            Icmpv6Repr::DstUnreachable {
                reason: Icmpv6DstUnreachable::PortUnreachable,
                ..
            }
        ));
    }

    #[test]
    fn short_or_garbage_quotes_are_refused() {
        let mut buf = [0u8; 1500];
        for bytes in [&[][..], &[0x45; 10][..], &[0x60; 30][..], &[0x00; 68][..]] {
            assert_eq!(unreachable(&mut buf, &Quote::of(bytes), Reason::Host), None);
        }
        let syn = tcp_packet(
            v4([10, 0, 0, 1], 1),
            v4([10, 0, 0, 2], 2),
            TcpControl::Syn,
            false,
        );
        let mut small = [0u8; 40];
        assert_eq!(
            unreachable(&mut small, &Quote::of(&syn), Reason::Host),
            None,
            "a buffer too small is refused, not overrun"
        );
    }

    #[test]
    fn echo_request_has_a_valid_icmpv4_checksum() {
        let mut buffer = [0u8; 64];
        let len = echo_request(&mut buffer, true, 0x1234, 7, b"ping data");
        let packet = Icmpv4Packet::new_checked(&buffer[..len]).unwrap();
        assert!(packet.verify_checksum());
        let repr = Icmpv4Repr::parse(&packet, &ChecksumCapabilities::default()).unwrap();
        assert_eq!(
            repr,
            Icmpv4Repr::EchoRequest {
                ident: 0x1234,
                seq_no: 7,
                data: b"ping data"
            }
        );
        assert_eq!(echo_request(&mut buffer[..4], true, 1, 1, b"x"), 0);
    }

    #[test]
    fn echo_replies_are_ours_only_with_our_identifier() {
        let (client, server) = (v6(1, 0x4242), v6(2, 0));
        let key = FlowKey { client, server };
        let mut request = [0u8; 64];
        let len = echo_request(&mut request, false, 0x9999, 3, b"abc");
        let mut reply = request[..len].to_vec();
        reply[0] = 129; // echo reply
        let (s, c) = match (server.addr, client.addr) {
            (IpAddress::Ipv6(s), IpAddress::Ipv6(c)) => (s, c),
            _ => unreachable!(),
        };
        let mut packet = Icmpv6Packet::new_unchecked(&mut reply[..]);
        packet.fill_checksum(&s, &c);
        let mut buf = [0u8; 1500];
        let EchoReply::Written(out) = echo_reply(&mut buf, key, 0x9999, &reply) else {
            panic!("our reply was not written");
        };
        let ip = Ipv6Packet::new_checked(&buf[..out]).unwrap();
        assert_eq!(IpAddress::Ipv6(ip.dst_addr()), client.addr);
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(icmp.echo_ident(), 0x4242, "the client's identifier again");
        assert_eq!(
            echo_reply(&mut buf, key, 0x1111, &reply),
            EchoReply::NotOurs
        );
        assert_eq!(
            echo_reply(&mut buf[..50], key, 0x9999, &reply),
            EchoReply::TooBig
        );
        assert_eq!(
            echo_reply(&mut buf, key, 0x9999, &reply[..3]),
            EchoReply::NotOurs
        );
    }
}
