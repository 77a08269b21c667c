//! UDP super-packets for the TUN (USO): a flow's server datagrams of one size in one
//! write, which the kernel splits back into those datagrams for the client.

// A super-packet is one IP packet whose UDP payload is the datagrams back to back; its
// virtio-net header (VIRTIO_NET_HDR_GSO_UDP_L4, gso_size = the datagrams' size) has the
// kernel cut it every `gso_size` bytes, giving each piece its own IP and UDP header,
// lengths and checksum (the last piece may be shorter). Only what came as equal
// datagrams is put together, so the client sees exactly the datagrams the server sent.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpAddress, IpProtocol, IpRepr, UdpPacket, checksum};

use super::FlowKey;
use super::vnet::{self, Gso};

/// Most datagrams in one super-packet: what kernels before 6.x segment (UDP_MAX_SEGMENTS)
/// and what one UDP_GRO receive coalesces.
pub const MAX_SEGMENTS: usize = 64;
/// Bytes of a UDP header.
const UDP_HEADER: usize = 8;
/// Offset of the checksum field in a UDP header.
const UDP_CHECKSUM_OFFSET: u16 = 6;
/// The IP length fields' limit (IPv4 total length, IPv6 payload length).
const MAX_IP_LEN: usize = 65535;

/// What one super-packet may hold on this TUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Each datagram's own packet must fit the TUN's MTU, as it would written alone.
    pub mtu: usize,
    /// The largest packet one TUN write carries (a transmit buffer).
    pub max_packet: usize,
}

/// Bytes of IP and UDP header in front of each datagram of a flow to `addr`'s family.
pub fn header_len(addr: IpAddress) -> usize {
    super::udp::headers_len(matches!(addr, IpAddress::Ipv6(_)))
}

/// The segment size of a super-packet carrying datagrams of `lens` (in order) to a
/// client at `addr`, or `None` when they must be written one by one: fewer than two,
/// more than `MAX_SEGMENTS`, not all of the first's size but for a shorter (non-empty)
/// last, each alone above the MTU, or all together above one write.
pub fn segment_size(
    mut lens: impl Iterator<Item = usize>,
    addr: IpAddress,
    limits: Limits,
) -> Option<u16> {
    let header = header_len(addr);
    let first = lens.next()?;
    if first == 0 || header + first > limits.mtu {
        return None;
    }
    let (mut count, mut total, mut last) = (1, first, first);
    for len in lens {
        if last != first || len == 0 || len > first {
            return None;
        }
        count += 1;
        total += len;
        last = len;
    }
    let fits = header + total <= limits.max_packet.min(MAX_IP_LEN);
    let count_ok = (2..=MAX_SEGMENTS).contains(&count);
    (fits && count_ok).then(|| u16::try_from(first).ok())?
}

/// Writes into `buf` the super-packet carrying `datagrams` (of `segment_size` bytes
/// each, as `segment_size` found) from the server of flow `key` to its client; returns
/// its length and the virtio-net header that asks the kernel to split it, or `None` if
/// it does not fit.
pub fn reply<'d>(
    buf: &mut [u8],
    key: FlowKey,
    datagrams: impl Iterator<Item = &'d [u8]> + Clone,
    segment_size: u16,
) -> Option<(usize, vnet::Header)> {
    let payload: usize = datagrams.clone().map(<[u8]>::len).sum();
    let (len, header) = headers(buf, key, payload, segment_size)?;
    let mut at = len;
    for datagram in datagrams {
        buf.get_mut(at..at + datagram.len())?
            .copy_from_slice(datagram);
        at += datagram.len();
    }
    Some((at, header))
}

/// Writes into `buf` the IP and UDP headers of a super-packet whose `payload` bytes
/// (datagrams of `segment_size` bytes, as `segment_size` found) are to follow them,
/// from the server of flow `key` to its client: for a write that gathers the payload
/// from where it was received. Returns their length and the virtio-net header, or
/// `None` if they do not fit `buf` or the packet would pass the IP length limit. The
/// UDP checksum holds the pseudo-header sum: the kernel completes each datagram's.
pub fn headers(
    buf: &mut [u8],
    key: FlowKey,
    payload: usize,
    segment_size: u16,
) -> Option<(usize, vnet::Header)> {
    let udp_len = UDP_HEADER + payload;
    let (src, dst) = (key.server.addr, key.client.addr);
    let ip = IpRepr::new(src, dst, IpProtocol::Udp, udp_len, 64);
    let ip_len = ip.header_len();
    if ip_len + udp_len > MAX_IP_LEN {
        return None;
    }
    let header = buf.get_mut(..ip_len + UDP_HEADER)?;
    // Only the IP header's own bytes are written and summed: the payload is not here.
    ip.emit(&mut *header, &ChecksumCapabilities::default());
    let mut packet = UdpPacket::new_unchecked(&mut header[ip_len..]);
    packet.set_src_port(key.server.port);
    packet.set_dst_port(key.client.port);
    packet.set_len(udp_len as u16);
    packet.set_checksum(checksum::pseudo_header(
        &src,
        &dst,
        IpProtocol::Udp,
        udp_len as u32,
    ));
    let vnet = vnet::Header {
        needs_csum: true,
        gso: Gso::UdpL4,
        ecn: false,
        hdr_len: (ip_len + UDP_HEADER) as u16,
        gso_size: segment_size,
        csum_start: ip_len as u16,
        csum_offset: UDP_CHECKSUM_OFFSET,
    };
    Some((ip_len + UDP_HEADER, vnet))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::demux::tests::{v4, v6};
    use crate::wire::udp;
    use smoltcp::wire::{Ipv4Packet, Ipv6Packet};

    const LIMITS: Limits = Limits {
        mtu: 1500,
        max_packet: 65535,
    };
    const V4: IpAddress = IpAddress::v4(10, 0, 0, 1);

    fn ipv6() -> IpAddress {
        v6(1, 1).addr
    }

    #[test]
    fn only_equal_datagrams_with_a_shorter_last_are_put_together() {
        let size = |lens: &[usize]| segment_size(lens.iter().copied(), V4, LIMITS);
        assert_eq!(size(&[1350; 44]), Some(1350));
        assert_eq!(size(&[1350, 1350, 7]), Some(1350), "a shorter last");
        assert_eq!(size(&[1350]), None, "one datagram is written as it is");
        assert_eq!(size(&[]), None);
        assert_eq!(size(&[1350, 7, 7]), None, "a shorter one not last");
        assert_eq!(size(&[7, 1350]), None, "a longer one after");
        assert_eq!(size(&[1350, 0]), None, "an empty datagram");
        assert_eq!(size(&[0, 0]), None);
        assert_eq!(size(&[1472, 1472]), Some(1472), "each fills the MTU");
        assert_eq!(size(&[1473, 1473]), None, "each alone above the MTU");
        assert_eq!(size(&[100; MAX_SEGMENTS]), Some(100));
        assert_eq!(size(&[100; MAX_SEGMENTS + 1]), None);
        let v6 = |lens: &[usize]| segment_size(lens.iter().copied(), ipv6(), LIMITS);
        assert_eq!(v6(&[1452, 1452]), Some(1452));
        assert_eq!(v6(&[1453, 1453]), None, "20 more header bytes in IPv6");
        let jumbo = Limits {
            mtu: 65535,
            max_packet: 65535,
        };
        let big = |lens: &[usize]| segment_size(lens.iter().copied(), V4, jumbo);
        assert_eq!(big(&[32_000, 32_000]), Some(32_000));
        assert_eq!(big(&[32_000, 32_000, 3_000]), None, "above 64 KiB together");
        let small_buffers = Limits {
            mtu: 1500,
            max_packet: 3000,
        };
        let sized = segment_size([1400, 1400, 200].into_iter(), V4, small_buffers);
        assert_eq!(sized, None, "above one transmit buffer");
    }

    /// Splits `packet` the way the kernel does for its virtio-net `header`: each piece
    /// a plain packet with its own lengths and completed checksums.
    fn segment(packet: &[u8], header: &vnet::Header) -> Vec<Vec<u8>> {
        let hdr_len = usize::from(header.hdr_len);
        let ip_len = usize::from(header.csum_start);
        packet[hdr_len..]
            .chunks(usize::from(header.gso_size))
            .map(|payload| {
                let mut piece = packet[..hdr_len].to_vec();
                piece.extend(payload);
                let udp_len = UDP_HEADER + payload.len();
                if packet[0] >> 4 == 4 {
                    let mut ip = Ipv4Packet::new_unchecked(&mut piece);
                    ip.set_total_len((ip_len + udp_len) as u16);
                    ip.fill_checksum();
                } else {
                    Ipv6Packet::new_unchecked(&mut piece).set_payload_len(udp_len as u16);
                }
                // The kernel swaps the length in the pseudo-header sum, then sums the
                // piece from csum_start with that in the checksum field.
                let mut udp = UdpPacket::new_unchecked(&mut piece[ip_len..]);
                let (old_len, new_len) = (udp.len(), udp_len as u16);
                let partial = checksum::combine(&[udp.checksum(), !old_len, new_len]);
                udp.set_len(new_len);
                udp.set_checksum(partial);
                let sum = !checksum::data(&piece[ip_len..]);
                let sum = if sum == 0 { 0xffff } else { sum };
                UdpPacket::new_unchecked(&mut piece[ip_len..]).set_checksum(sum);
                piece
            })
            .collect()
    }

    #[test]
    fn a_super_packet_splits_into_the_replies_written_one_by_one() {
        for (client, server) in [
            (v4([10, 0, 0, 1], 5000), v4([10, 0, 0, 2], 443)),
            (v6(1, 5000), v6(2, 443)),
        ] {
            let key = FlowKey { client, server };
            let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
            let datagrams: Vec<&[u8]> = data.chunks(1200).collect();
            let lens = datagrams.iter().map(|d| d.len());
            let size = segment_size(lens, client.addr, LIMITS).expect("equal datagrams");
            let mut buf = vec![0u8; 65535];
            let (len, header) = reply(&mut buf, key, datagrams.iter().copied(), size).unwrap();
            assert_eq!(header.gso, Gso::UdpL4);
            assert_eq!(header.gso_size, 1200);
            assert_eq!(usize::from(header.hdr_len), header_len(client.addr));
            assert_eq!(header.csum_offset, 6);
            assert_eq!(len, header_len(client.addr) + 3000);
            let pieces = segment(&buf[..len], &header);
            assert_eq!(pieces.len(), 3);
            for (piece, datagram) in pieces.iter().zip(&datagrams) {
                let mut alone = vec![0u8; 1500];
                let alone_len = udp::reply(&mut alone, key, datagram).unwrap();
                assert_eq!(piece, &alone[..alone_len]);
            }
            let mut gathered = vec![0u8; 64];
            let (head, gathered_header) = headers(&mut gathered, key, 3000, size).unwrap();
            assert_eq!(gathered_header, header);
            gathered.truncate(head);
            gathered.extend(&data);
            assert_eq!(
                gathered,
                buf[..len],
                "headers, then the payload where it lies"
            );
            let too_small = &mut [0u8; 64][..head - 1];
            assert_eq!(headers(too_small, key, 3000, size), None);
            let above_ip_limit = MAX_IP_LEN - head + UDP_HEADER + 1;
            assert_eq!(headers(&mut [0u8; 64], key, above_ip_limit, size), None);
            let mut short = vec![0u8; len - 1];
            assert_eq!(
                reply(&mut short, key, datagrams.iter().copied(), size),
                None
            );
        }
    }
}
