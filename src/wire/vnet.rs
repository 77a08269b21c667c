//! The virtio-net header that prefixes every TUN packet once IFF_VNET_HDR is set: how the
//! kernel tells us about (and we ask it for) checksum completion and segmentation.

use std::fmt;

/// Size of `struct virtio_net_hdr` (without num_buffers), the TUN default.
pub const LEN: usize = 10;

/// `flags`: the L4 checksum is partial; the receiver completes it from `csum_start`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was already verified.
pub const F_DATA_VALID: u8 = 2;
/// `flags`: receive-segment-coalescing info (only meaningful with mergeable buffers).
pub const F_RSC_INFO: u8 = 4;

/// How much offload the TUN uses, from most to least: what its virtio-net header carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Offload {
    /// No virtio-net header at all (`--no-offload`).
    None,
    /// Virtio-net headers, but no offload: every packet complete and MTU-sized.
    Header,
    /// Checksums completed by the kernel (TUN_F_CSUM).
    Checksum,
    /// Plus TCP segmentation: 64 KiB super-packets each way (TUN_F_TSO4/6).
    Tso,
    /// Plus UDP segmentation (TUN_F_USO4/6, kernel 6.2+).
    Uso,
}

impl Offload {
    /// Parses a cap such as `tso` (from URINGPROXY_MAX_OFFLOAD, used by tests).
    pub fn parse(text: &str) -> Option<Offload> {
        [
            Offload::None,
            Offload::Header,
            Offload::Checksum,
            Offload::Tso,
            Offload::Uso,
        ]
        .into_iter()
        .find(|offload| offload.name() == text)
    }

    /// The short name `parse` takes (and status replies and metrics report).
    pub fn name(self) -> &'static str {
        match self {
            Offload::None => "none",
            Offload::Header => "header",
            Offload::Checksum => "csum",
            Offload::Tso => "tso",
            Offload::Uso => "uso",
        }
    }

    pub fn vnet_header(self) -> bool {
        self >= Offload::Header
    }

    pub fn checksum(self) -> bool {
        self >= Offload::Checksum
    }

    pub fn tso(self) -> bool {
        self >= Offload::Tso
    }

    /// Bytes in front of every packet on the TUN: the header, if there is one.
    pub fn header_len(self) -> usize {
        if self.vnet_header() { LEN } else { 0 }
    }
}

impl fmt::Display for Offload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Offload::None => "none (no virtio-net header)",
            Offload::Header => "none (virtio-net header only)",
            Offload::Checksum => "checksum",
            Offload::Tso => "checksum + TCP segmentation",
            Offload::Uso => "checksum + TCP and UDP segmentation",
        })
    }
}

/// Segmentation the packet carries or asks for (`gso_type`, without the ECN bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gso {
    None,
    TcpV4,
    TcpV6,
    /// UDP segmentation offload (USO).
    UdpL4,
}

const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

/// A decoded, validated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub needs_csum: bool,
    pub gso: Gso,
    /// Set with a TCP GSO type when the segments carry ECN CWR.
    pub ecn: bool,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// Why a header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Fewer than `LEN` bytes.
    Truncated,
    /// Flag bits we do not know.
    UnknownFlags,
    /// UFO (deprecated) or an unknown GSO type.
    UnknownGso,
    /// A GSO type with `gso_size` 0.
    ZeroGsoSize,
    /// `csum_start + csum_offset + 2` past the end of the packet.
    ChecksumOutOfBounds,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Truncated => "truncated virtio-net header",
            Error::UnknownFlags => "unknown virtio-net flags",
            Error::UnknownGso => "unknown GSO type",
            Error::ZeroGsoSize => "GSO type with gso_size 0",
            Error::ChecksumOutOfBounds => "checksum offsets outside the packet",
        })
    }
}

impl Header {
    /// A header asking for nothing: a complete packet with a valid checksum.
    pub const PLAIN: Header = Header {
        needs_csum: false,
        gso: Gso::None,
        ecn: false,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Splits `buf` into its header and the IP packet that follows, checking that the
    /// header is consistent with that packet.
    pub fn parse(buf: &[u8]) -> Result<(Header, &[u8]), Error> {
        if buf.len() < LEN {
            return Err(Error::Truncated);
        }
        let u16_at = |at: usize| u16::from_le_bytes([buf[at], buf[at + 1]]);
        let flags = buf[0];
        if flags & !(F_NEEDS_CSUM | F_DATA_VALID | F_RSC_INFO) != 0 {
            return Err(Error::UnknownFlags);
        }
        let gso = match buf[1] & !GSO_ECN {
            GSO_NONE => Gso::None,
            GSO_TCPV4 => Gso::TcpV4,
            GSO_TCPV6 => Gso::TcpV6,
            GSO_UDP_L4 => Gso::UdpL4,
            _ => return Err(Error::UnknownGso),
        };
        let header = Header {
            needs_csum: flags & F_NEEDS_CSUM != 0,
            gso,
            ecn: buf[1] & GSO_ECN != 0,
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        };
        let packet = &buf[LEN..];
        if header.gso != Gso::None && header.gso_size == 0 {
            return Err(Error::ZeroGsoSize);
        }
        if header.needs_csum
            && usize::from(header.csum_start) + usize::from(header.csum_offset) + 2 > packet.len()
        {
            return Err(Error::ChecksumOutOfBounds);
        }
        Ok((header, packet))
    }

    /// Writes the header into the first `LEN` bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) {
        let gso_type = match self.gso {
            Gso::None => GSO_NONE,
            Gso::TcpV4 => GSO_TCPV4,
            Gso::TcpV6 => GSO_TCPV6,
            Gso::UdpL4 => GSO_UDP_L4,
        } | if self.ecn { GSO_ECN } else { 0 };
        buf[0] = if self.needs_csum { F_NEEDS_CSUM } else { 0 };
        buf[1] = gso_type;
        buf[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        buf[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        buf[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        buf[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_packet(header: &Header, packet_len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; LEN + packet_len];
        header.emit(&mut buf);
        buf
    }

    #[test]
    fn round_trips_every_gso_type() {
        for (gso, ecn) in [
            (Gso::None, false),
            (Gso::TcpV4, false),
            (Gso::TcpV4, true),
            (Gso::TcpV6, false),
            (Gso::UdpL4, false),
        ] {
            let header = Header {
                needs_csum: true,
                gso,
                ecn,
                hdr_len: 52,
                gso_size: if gso == Gso::None { 0 } else { 1460 },
                csum_start: 20,
                csum_offset: 16,
            };
            let buf = with_packet(&header, 64_000);
            let (parsed, packet) = Header::parse(&buf).unwrap();
            assert_eq!(parsed, header);
            assert_eq!(packet.len(), 64_000);
        }
    }

    #[test]
    fn layout_matches_the_kernel_struct() {
        let header = Header {
            needs_csum: true,
            gso: Gso::TcpV6,
            ecn: false,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
        };
        let mut buf = [0u8; LEN];
        header.emit(&mut buf);
        assert_eq!(buf, [1, 4, 2, 1, 4, 3, 6, 5, 8, 7]);
    }

    #[test]
    fn plain_header_is_all_zero() {
        let mut buf = [0xffu8; LEN];
        Header::PLAIN.emit(&mut buf);
        assert_eq!(buf, [0; LEN]);
    }

    #[test]
    fn rejects_each_malformed_case() {
        for len in 0..LEN {
            assert_eq!(Header::parse(&vec![0; len]), Err(Error::Truncated));
        }
        let mut bad_flags = with_packet(&Header::PLAIN, 40);
        bad_flags[0] = 0x08;
        assert_eq!(Header::parse(&bad_flags), Err(Error::UnknownFlags));

        for gso_type in [2u8, 3, 6, 0x7f, 0x83] {
            let mut buf = with_packet(&Header::PLAIN, 40);
            buf[1] = gso_type;
            assert_eq!(
                Header::parse(&buf),
                Err(Error::UnknownGso),
                "type {gso_type}"
            );
        }

        let zero_size = Header {
            gso: Gso::TcpV4,
            ..Header::PLAIN
        };
        assert_eq!(
            Header::parse(&with_packet(&zero_size, 40)),
            Err(Error::ZeroGsoSize)
        );

        let csum = Header {
            needs_csum: true,
            csum_start: 20,
            csum_offset: 16,
            ..Header::PLAIN
        };
        assert!(Header::parse(&with_packet(&csum, 38)).is_ok());
        assert_eq!(
            Header::parse(&with_packet(&csum, 37)),
            Err(Error::ChecksumOutOfBounds)
        );
        let huge = Header {
            csum_start: u16::MAX,
            csum_offset: u16::MAX,
            ..csum
        };
        assert_eq!(
            Header::parse(&with_packet(&huge, 100)),
            Err(Error::ChecksumOutOfBounds)
        );
    }

    #[test]
    fn arbitrary_headers_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..50_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            let mut buf = [0u8; LEN + 8];
            buf[..8].copy_from_slice(&bytes);
            buf[8..16].copy_from_slice(&bytes);
            let len = (state % (LEN as u64 + 9)) as usize;
            let _ = Header::parse(&buf[..len]);
        }
    }
}
