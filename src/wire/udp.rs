//! UDP datagrams the proxy writes to clients (the server's replies), and the datagrams a
//! client's UDP packet carries (several in a segmentation super-packet).

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpProtocol, UdpPacket, UdpRepr};

use super::FlowKey;

/// Largest UDP payload relayed (the IPv4 limit): send slots and receives are sized to
/// it, and a longer datagram (IPv6 allows 20 bytes more) is dropped, never cut.
pub const MAX_DATAGRAM: usize = 65507;
/// Bytes of IP and UDP header in front of a datagram's payload (no IP options).
pub const fn headers_len(ipv6: bool) -> usize {
    if ipv6 { 40 + 8 } else { 20 + 8 }
}

/// Writes into `buf` the server's `payload` as an IP packet carrying a UDP datagram from
/// the server of flow `key` to its client; returns its length, `None` if it does not fit.
pub fn reply(buf: &mut [u8], key: FlowKey, payload: &[u8]) -> Option<usize> {
    let udp = UdpRepr {
        src_port: key.server.port,
        dst_port: key.client.port,
    };
    // Replies are few and small next to TCP bulk data: the checksum is computed here
    // rather than left to the kernel.
    let caps = ChecksumCapabilities::default();
    let len = udp.header_len() + payload.len();
    super::emit_ip(
        buf,
        (key.server.addr, key.client.addr),
        IpProtocol::Udp,
        len,
        |datagram| {
            udp.emit(
                &mut UdpPacket::new_unchecked(datagram),
                &key.server.addr,
                &key.client.addr,
                payload.len(),
                |data| data.copy_from_slice(payload),
                &caps,
            );
        },
    )
}

/// The datagrams in `payload`, a UDP packet's data read from the TUN or a socket: with
/// segmentation offload (USO, GRO) `segment_size` bytes each, back to back (the last may
/// be shorter), else the whole payload. An empty payload is one empty datagram. None is
/// cut to fit `max`: a datagram longer than that (an IPv6 one of up to 65,527 bytes)
/// cannot be relayed whole, and cutting it would change its boundary, so there are then
/// none (dropped); so too for a segment size of 0, which no valid packet carries.
pub fn datagrams(
    payload: &[u8],
    segment_size: Option<u16>,
    max: usize,
) -> impl Iterator<Item = &[u8]> {
    let size = segment_size.map_or(payload.len(), usize::from);
    let whole = size <= max && (size > 0 || payload.is_empty());
    // `chunks` of nothing yields nothing.
    payload
        .chunks(size.max(1))
        .chain(payload.is_empty().then_some(payload))
        .filter(move |_| whole)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::demux::tests::{v4, v6};
    use crate::wire::{Parsed, parse};

    #[test]
    fn replies_parse_back_as_the_flow_reversed() {
        for (client, server) in [
            (v4([10, 0, 0, 1], 5353), v4([10, 0, 0, 2], 53)),
            (v6(1, 5353), v6(2, 53)),
        ] {
            let key = FlowKey { client, server };
            let mut buf = [0u8; 1500];
            let len = reply(&mut buf, key, b"answer").unwrap();
            let Parsed::Udp {
                key: back,
                payload_start,
                payload_len,
            } = parse(&buf[..len])
            else {
                panic!("not UDP");
            };
            assert_eq!((back.client, back.server), (server, client));
            assert_eq!(&buf[payload_start..payload_start + payload_len], b"answer");
            assert_eq!(reply(&mut buf[..len - 1], key, b"answer"), None);
        }
    }

    #[test]
    fn a_super_packet_splits_into_its_datagrams() {
        let payload = pattern(1000);
        let parts: Vec<&[u8]> = datagrams(&payload, Some(300), 65507).collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [300, 300, 300, 100]
        );
        assert_eq!(parts.concat(), payload);
        let whole: Vec<&[u8]> = datagrams(&payload, None, 65507).collect();
        assert_eq!(whole, [&payload[..]]);
        let too_long: Vec<&[u8]> = datagrams(&payload, None, 600).collect();
        assert!(too_long.is_empty(), "a datagram is never cut to fit");
        let segments_too_long: Vec<&[u8]> = datagrams(&payload, Some(700), 600).collect();
        assert!(segments_too_long.is_empty());
        assert_eq!(
            datagrams(&payload, Some(0), 600).count(),
            0,
            "no segment size 0"
        );
        let empty: Vec<&[u8]> = datagrams(&[], Some(300), 65507).collect();
        assert_eq!(empty, [&[][..]], "an empty datagram is relayed too");
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| i as u8).collect()
    }
}
