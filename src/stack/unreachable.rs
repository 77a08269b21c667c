//! ICMP destination-unreachable messages for clients, so a failed connect or send looks
//! to them as it would on the direct path (EHOSTUNREACH, ECONNREFUSED on UDP, ...).

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr,
    IpAddress, IpProtocol, IpVersion, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
};

use super::TxPool;

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
}

/// Why the destination could not be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Network,
    Host,
    Port,
}

/// Writes to the TUN an ICMP error from the quoted packet's destination back to its
/// source. False when the quote is unusable or no buffer is free.
pub fn emit(tx: &mut TxPool, quote: &Quote, reason: Reason) -> bool {
    let original = quote.bytes();
    let caps = ChecksumCapabilities::default();
    match original
        .first()
        .map(|b| IpVersion::of_packet(std::slice::from_ref(b)))
    {
        Some(Ok(IpVersion::Ipv4)) => {
            let Some((header, data)) = ipv4_quote(original) else {
                return false;
            };
            let icmp = Icmpv4Repr::DstUnreachable {
                reason: match reason {
                    Reason::Network => Icmpv4DstUnreachable::NetUnreachable,
                    Reason::Host => Icmpv4DstUnreachable::HostUnreachable,
                    Reason::Port => Icmpv4DstUnreachable::PortUnreachable,
                },
                header,
                data,
            };
            let back = (
                IpAddress::Ipv4(header.dst_addr),
                IpAddress::Ipv4(header.src_addr),
            );
            tx.emit_ip(back, IpProtocol::Icmp, icmp.buffer_len(), |message| {
                icmp.emit(&mut Icmpv4Packet::new_unchecked(message), &caps)
            })
        }
        Some(Ok(IpVersion::Ipv6)) => {
            let Some((header, data)) = ipv6_quote(original) else {
                return false;
            };
            let icmp = Icmpv6Repr::DstUnreachable {
                reason: match reason {
                    Reason::Network => Icmpv6DstUnreachable::NoRoute,
                    Reason::Host => Icmpv6DstUnreachable::AddrUnreachable,
                    Reason::Port => Icmpv6DstUnreachable::PortUnreachable,
                },
                header,
                data,
            };
            let (from, to) = (header.dst_addr, header.src_addr);
            tx.emit_ip(
                (from.into(), to.into()),
                IpProtocol::Icmpv6,
                icmp.buffer_len(),
                |message| icmp.emit(&from, &to, &mut Icmpv6Packet::new_unchecked(message), &caps),
            )
        }
        _ => false,
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
    use crate::stack::packet::tests::{tcp_packet, v4, v6};
    use crate::tun::Offload;
    use smoltcp::wire::TcpControl;

    fn emitted(quote: &Quote, reason: Reason) -> Vec<u8> {
        let mut tx = TxPool::new(1, 1500, Offload::None);
        assert!(emit(&mut tx, quote, reason));
        let mut out = Vec::new();
        tx.take_ready(|_, packet| out = packet.to_vec());
        out
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
        let mut tx = TxPool::new(4, 1500, Offload::None);
        for bytes in [&[][..], &[0x45; 10][..], &[0x60; 30][..], &[0x00; 68][..]] {
            assert!(!emit(&mut tx, &Quote::of(bytes), Reason::Host));
        }
    }
}
