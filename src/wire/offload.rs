//! Turns a packet smoltcp just emitted into what the TUN expects with offload on: the
//! virtio-net header describing it, and the partial (pseudo-header) TCP checksum that the
//! kernel completes.

use smoltcp::wire::checksum;
use smoltcp::wire::{IpAddress, IpProtocol, TcpOption, TcpPacket};

use super::tcp;
use super::vnet::{self, Gso};

/// Offset of the checksum field in a TCP header.
const TCP_CHECKSUM_OFFSET: u16 = 16;

/// Largest segment (payload) that keeps its PSH flag: a jumbo frame's. Bigger ones
/// only exist with a TUN MTU far above any real link's, so they reach a local Linux
/// socket, for which PSH is no delivery signal.
const PUSH_KEPT_UP_TO: usize = 9000;

/// Completes `packet` for a TUN that finishes checksums, and asks the kernel to segment it
/// when its payload exceeds `segment_size` (the flow's MSS). Returns the header to send in
/// front of it. Anything but a well-formed TCP packet gets a plain header, unchanged.
pub fn finish_tcp(packet: &mut [u8], segment_size: Option<u16>) -> vnet::Header {
    let Some(tcp::Segment { src, dst, range }) = tcp::segment(packet) else {
        return vnet::Header::PLAIN;
    };
    let (ip_len, l4_len) = (range.start, range.len());
    let Ok(mut segment) = TcpPacket::new_checked(&mut packet[range]) else {
        return vnet::Header::PLAIN;
    };
    // The kernel adds the segment's own bytes to this and folds it (per segment when it
    // segments, adjusting the length).
    segment.set_checksum(checksum::pseudo_header(
        &src,
        &dst,
        IpProtocol::Tcp,
        l4_len as u32,
    ));
    let tcp_header_len = usize::from(segment.header_len());
    let payload_len = l4_len.saturating_sub(tcp_header_len);
    let segment_size = segment_size.filter(|&size| size > 0 && payload_len > usize::from(size));
    // Linux (4720852ed9af, 6.6 and stable backports) answers a segment of its full
    // receive MSS that carries PSH with an ACK as soon as the reader drains it. smoltcp
    // sets PSH whenever its buffer empties, at line rate on every segment, so a client
    // behind a 64 KiB TUN MTU ACKed each; without PSH it ACKs every second, as it does a
    // tap peer's (measured at 1 Gbit/s: 15.2 -> 7.8 ACKs/MB). The receiver measures a
    // super-packet by its segment size, and drains a whole one at once.
    let measured = segment_size.map_or(payload_len, usize::from);
    if measured > PUSH_KEPT_UP_TO {
        segment.set_psh(false);
    }
    let gso = match (segment_size, src) {
        (Some(_), IpAddress::Ipv4(_)) => Gso::TcpV4,
        (Some(_), IpAddress::Ipv6(_)) => Gso::TcpV6,
        (None, _) => Gso::None,
    };
    vnet::Header {
        needs_csum: true,
        gso,
        ecn: false,
        hdr_len: (ip_len + tcp_header_len) as u16,
        gso_size: segment_size.unwrap_or(0),
        csum_start: ip_len as u16,
        csum_offset: TCP_CHECKSUM_OFFSET,
    }
}

/// Lowers the MSS option of a SYN in `packet` to at most `max`. The IPv6 interface runs
/// with a 64 KiB MTU (see `TxPool::capabilities`), so smoltcp would offer clients that
/// much; a client whose own link MTU is larger than ours would then send segments our
/// side cannot carry. Call before the checksum is finished.
pub fn clamp_syn_mss(packet: &mut [u8], max: u16) {
    let Some(mut segment) = tcp::packet_mut(packet) else {
        return;
    };
    if !segment.syn() {
        return;
    }
    let options = segment.options_mut();
    let found = tcp::options(options).find_map(|(at, option)| match option {
        TcpOption::MaxSegmentSize(mss) => Some((at, mss)),
        _ => None,
    });
    if let Some((at, mss)) = found {
        // The option's kind and length, then its value.
        options[at + 2..at + 4].copy_from_slice(&mss.min(max).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::demux::tests::{tcp_packet, v4, v6};
    use smoltcp::wire::{Ipv4Packet, Ipv6Packet, TcpControl};

    /// Completing the partial checksum the way the kernel does must give a valid packet.
    fn complete(packet: &mut [u8], header: &vnet::Header) {
        let start = usize::from(header.csum_start);
        let field = start + usize::from(header.csum_offset);
        let partial = u16::from_be_bytes([packet[field], packet[field + 1]]);
        packet[field..field + 2].copy_from_slice(&[0, 0]);
        let sum = checksum::combine(&[partial, checksum::data(&packet[start..])]);
        packet[field..field + 2].copy_from_slice(&(!sum).to_be_bytes());
    }

    #[test]
    fn partial_checksum_completes_to_a_valid_one() {
        for (client, server) in [
            (v4([10, 0, 0, 1], 5000), v4([10, 0, 0, 2], 80)),
            (v6(1, 5000), v6(2, 80)),
        ] {
            let mut packet = tcp_packet(server, client, TcpControl::Psh, true);
            let header = finish_tcp(&mut packet, None);
            assert!(header.needs_csum);
            assert_eq!(header.gso, Gso::None);
            complete(&mut packet, &header);
            let ip_len = usize::from(header.csum_start);
            let tcp = TcpPacket::new_checked(&packet[ip_len..]).unwrap();
            assert!(tcp.verify_checksum(&server.addr, &client.addr));
        }
    }

    /// `packet` with `extra` payload bytes appended (lengths in the IP header fixed up).
    fn with_payload(mut packet: Vec<u8>, extra: usize) -> Vec<u8> {
        packet.resize(packet.len() + extra, 0xab);
        let len = packet.len();
        if packet[0] >> 4 == 4 {
            let mut ip = Ipv4Packet::new_unchecked(&mut packet);
            ip.set_total_len(len as u16);
            ip.fill_checksum();
        } else {
            Ipv6Packet::new_unchecked(&mut packet).set_payload_len((len - 40) as u16);
        }
        packet
    }

    #[test]
    fn only_payloads_above_the_segment_size_are_segmented() {
        let base = tcp_packet(
            v4([1, 1, 1, 1], 1),
            v4([2, 2, 2, 2], 2),
            TcpControl::None,
            true,
        );
        let mut small = with_payload(base.clone(), 1000);
        assert_eq!(finish_tcp(&mut small, Some(1000)).gso, Gso::None);
        let mut big = with_payload(base, 1001);
        assert_eq!(finish_tcp(&mut big, Some(1000)).gso, Gso::TcpV4);
    }

    /// Segments above a jumbo frame's payload (only a local socket behind a TUN with a
    /// 64 KiB MTU can receive them), whole or as a super-packet's segment size, go
    /// without PSH, so the client's delayed ACK covers two of them; smaller ones keep it.
    #[test]
    fn push_is_cleared_only_on_segments_above_a_jumbo_frame() {
        for (client, server) in [
            (v4([10, 0, 0, 1], 5000), v4([10, 0, 0, 2], 80)),
            (v6(1, 5000), v6(2, 80)),
        ] {
            let base = tcp_packet(server, client, TcpControl::Psh, true);
            let ip_len = if server.addr.version() == smoltcp::wire::IpVersion::Ipv4 {
                20
            } else {
                40
            };
            let psh = |packet: &[u8]| TcpPacket::new_checked(&packet[ip_len..]).unwrap().psh();
            for (payload, segment_size, kept) in [
                (65_160, Some(65_480), false),
                (65_160, None, false),
                (65_495, Some(65_480), false),
                (9_001, Some(65_480), false),
                (9_000, Some(65_480), true),
                (1_448, Some(1_448), true),
                (65_160, Some(1_448), true),
            ] {
                let mut packet = with_payload(base.clone(), payload);
                let header = finish_tcp(&mut packet, segment_size);
                assert_eq!(psh(&packet), kept, "{payload} bytes, MSS {segment_size:?}");
                complete(&mut packet, &header);
                let tcp = TcpPacket::new_checked(&packet[ip_len..]).unwrap();
                assert!(tcp.verify_checksum(&server.addr, &client.addr));
            }
        }
    }

    #[test]
    fn segment_size_selects_the_gso_type_of_the_family() {
        let packet4 = tcp_packet(
            v4([1, 1, 1, 1], 1),
            v4([2, 2, 2, 2], 2),
            TcpControl::None,
            true,
        );
        let mut packet4 = with_payload(packet4, 5000);
        let header = finish_tcp(&mut packet4, Some(1460));
        assert_eq!(
            (
                header.gso,
                header.gso_size,
                header.csum_start,
                header.hdr_len
            ),
            (Gso::TcpV4, 1460, 20, 40)
        );
        let packet6 = tcp_packet(v6(1, 1), v6(2, 2), TcpControl::None, true);
        let mut packet6 = with_payload(packet6, 5000);
        let header = finish_tcp(&mut packet6, Some(1440));
        assert_eq!(
            (
                header.gso,
                header.gso_size,
                header.csum_start,
                header.hdr_len
            ),
            (Gso::TcpV6, 1440, 40, 60)
        );
    }

    #[test]
    fn syn_mss_is_clamped_and_other_packets_untouched() {
        let mut syn = tcp_packet(v6(2, 80), v6(1, 5000), TcpControl::Syn, true);
        clamp_syn_mss(&mut syn, 1440);
        let tcp = TcpPacket::new_checked(&syn[40..]).unwrap();
        let repr = smoltcp::wire::TcpRepr::parse(
            &tcp,
            &v6(2, 80).addr,
            &v6(1, 5000).addr,
            &smoltcp::phy::ChecksumCapabilities::ignored(),
        )
        .unwrap();
        assert_eq!(repr.max_seg_size, Some(1440));
        let mut ack = tcp_packet(v6(2, 80), v6(1, 5000), TcpControl::None, true);
        let before = ack.clone();
        clamp_syn_mss(&mut ack, 100);
        assert_eq!(ack, before);
        for len in 0..syn.len() {
            let mut prefix = syn[..len].to_vec();
            clamp_syn_mss(&mut prefix, 1);
        }
    }

    #[test]
    fn non_tcp_and_garbage_get_a_plain_header() {
        let mut udp = tcp_packet(
            v4([1, 1, 1, 1], 1),
            v4([2, 2, 2, 2], 2),
            TcpControl::None,
            true,
        );
        udp[9] = 17;
        assert_eq!(finish_tcp(&mut udp, None), vnet::Header::PLAIN);
        for len in 0..40 {
            let mut garbage = vec![0x45u8; len];
            assert_eq!(finish_tcp(&mut garbage, Some(1000)), vnet::Header::PLAIN);
        }
    }
}
