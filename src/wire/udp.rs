//! UDP datagrams the proxy writes to clients: the server's replies.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpProtocol, UdpPacket, UdpRepr};

use super::FlowKey;

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
}
