//! TCP segments inside IP packets, pure: where the segment lies, its options (read
//! through smoltcp's `TcpOption`), a window rewritten with its checksum patched, and
//! pure ACKs built from scratch.

use std::ops::Range;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpEndpoint, IpProtocol, IpVersion, Ipv4Packet, Ipv6Packet, TcpControl, TcpOption,
    TcpPacket, TcpRepr, TcpSeqNumber,
};

/// A TCP segment's place in an IP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: IpAddress,
    pub dst: IpAddress,
    /// From the end of the IP header to the end of the packet the IP header states
    /// (bytes after it are not the packet's; a packet cut short is no segment).
    pub range: Range<usize>,
}

/// The TCP segment of `packet` (an IP packet), if it carries one.
pub fn segment(packet: &[u8]) -> Option<Segment> {
    match IpVersion::of_packet(packet.get(..1)?).ok()? {
        IpVersion::Ipv4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            let total = usize::from(ip.total_len());
            (ip.next_header() == IpProtocol::Tcp).then(|| Segment {
                src: IpAddress::Ipv4(ip.src_addr()),
                dst: IpAddress::Ipv4(ip.dst_addr()),
                range: usize::from(ip.header_len())..total,
            })
        }
        IpVersion::Ipv6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            let end = ip.header_len() + usize::from(ip.payload_len());
            (ip.next_header() == IpProtocol::Tcp).then(|| Segment {
                src: IpAddress::Ipv6(ip.src_addr()),
                dst: IpAddress::Ipv6(ip.dst_addr()),
                range: ip.header_len()..end,
            })
        }
    }
}

/// The TCP segment of `packet` to read, if it is a well-formed one.
pub fn packet(packet: &[u8]) -> Option<TcpPacket<&[u8]>> {
    TcpPacket::new_checked(packet.get(segment(packet)?.range)?).ok()
}

/// The TCP segment of `packet` to change, if it is a well-formed one.
pub fn packet_mut(packet: &mut [u8]) -> Option<TcpPacket<&mut [u8]>> {
    let range = segment(packet)?.range;
    TcpPacket::new_checked(packet.get_mut(range)?).ok()
}

/// The options in `options` (a TCP header's after its first 20 bytes), each with its
/// offset there, up to the end-of-list option or the first malformed one.
pub fn options(mut options: &[u8]) -> impl Iterator<Item = (usize, TcpOption<'_>)> {
    let len = options.len();
    std::iter::from_fn(move || {
        let at = len - options.len();
        let (rest, option) = TcpOption::parse(options).ok()?;
        options = rest;
        (option != TcpOption::EndOfList).then_some((at, option))
    })
}

/// `a` is after `b` in sequence space.
pub fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Sets the window field of `tcp` to `window`; with `checksummed` (the segment carries
/// its full checksum) updates the checksum for it (RFC 1624: HC' = ~(~HC + ~m + m')),
/// without summing the whole segment again.
pub fn set_window(tcp: &mut TcpPacket<&mut [u8]>, window: u16, checksummed: bool) {
    let old = tcp.window_len();
    tcp.set_window_len(window);
    if checksummed {
        let sum = u32::from(!tcp.checksum()) + u32::from(!old) + u32::from(window);
        let folded = (sum & 0xffff) + (sum >> 16);
        let folded = (folded & 0xffff) + (folded >> 16);
        tcp.set_checksum(!(folded as u16));
    }
}

/// Writes into `buf` a pure ACK from `from` to `to` with these sequence and
/// acknowledgement numbers and window field, its checksums complete; returns its length,
/// or `None` (nothing written) when `buf` cannot hold it.
pub fn pure_ack(
    buf: &mut [u8],
    (from, to): (IpEndpoint, IpEndpoint),
    seq: u32,
    ack: u32,
    window: u16,
) -> Option<usize> {
    let repr = TcpRepr {
        src_port: from.port,
        dst_port: to.port,
        control: TcpControl::None,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: Some(TcpSeqNumber(ack as i32)),
        window_len: window,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    let caps = ChecksumCapabilities::default();
    super::emit_ip(
        buf,
        (from.addr, to.addr),
        IpProtocol::Tcp,
        repr.header_len(),
        |segment| {
            repr.emit(
                &mut TcpPacket::new_unchecked(segment),
                &from.addr,
                &to.addr,
                &caps,
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::demux::tests::{tcp_packet, v4, v6};

    #[test]
    fn the_segment_ends_where_the_ip_header_says() {
        for (from, to) in [
            (v4([10, 0, 0, 1], 5000), v4([10, 0, 0, 2], 80)),
            (v6(1, 5000), v6(2, 80)),
        ] {
            let mut packet = tcp_packet(from, to, TcpControl::Syn, true);
            let found = segment(&packet).expect("a segment");
            assert_eq!((found.src, found.dst), (from.addr, to.addr));
            assert_eq!(found.range.end, packet.len());
            // Bytes after the IP packet (a buffer longer than it) are not the segment's.
            packet.extend_from_slice(&[0xee; 7]);
            assert_eq!(segment(&packet).unwrap().range, found.range);
            // A stated length past the bytes there are: truncated, not a segment.
            assert_eq!(segment(&packet[..packet.len() - 10]), None);
        }
        let mut udp = tcp_packet(
            v4([1, 1, 1, 1], 1),
            v4([2, 2, 2, 2], 2),
            TcpControl::None,
            true,
        );
        udp[9] = 17;
        assert_eq!(segment(&udp), None);
        for len in 0..40 {
            assert!(packet(&vec![0x45; len]).is_none());
        }
    }

    #[test]
    fn options_stop_at_the_end_of_the_list_or_a_malformed_one() {
        // NOP, MSS 1460, window scale 7, end of list, then what must not be read.
        let bytes = [1, 2, 4, 0x05, 0xb4, 3, 3, 7, 0, 2, 4, 0, 1];
        let found: Vec<_> = options(&bytes).collect();
        assert_eq!(
            found,
            [
                (0, TcpOption::NoOperation),
                (1, TcpOption::MaxSegmentSize(1460)),
                (5, TcpOption::WindowScale(7)),
            ]
        );
        // A length running past the header, and a length under two.
        assert_eq!(options(&[2, 6, 0, 0]).count(), 0);
        assert_eq!(options(&[1, 9, 1, 1]).count(), 1);
    }

    #[test]
    fn a_patched_window_keeps_the_checksum_valid() {
        let (from, to) = (v4([10, 0, 0, 2], 80), v4([10, 0, 0, 1], 5000));
        let mut buf = [0u8; 64];
        let len = pure_ack(&mut buf, (from, to), 7, 1000, 4000).expect("an ACK");
        let packet = &mut buf[..len];
        set_window(&mut packet_mut(packet).unwrap(), 123, true);
        let tcp = self::packet(packet).unwrap();
        assert_eq!((tcp.seq_number().0, tcp.ack_number().0), (7, 1000));
        assert_eq!(tcp.window_len(), 123);
        assert!(tcp.verify_checksum(&from.addr, &to.addr));
        assert!(after(1, u32::MAX) && !after(5, 5) && !after(4, 5));
    }
}
