//! Packet formats, pure: parsing what the TUN delivers and building what the proxy
//! writes, into and out of plain byte slices. No I/O, no state; smoltcp's `wire` does
//! the field-level work.

pub mod cidr;
pub mod demux;
pub mod dns;
pub mod icmp;
pub mod offload;
pub mod socks5;
pub mod tcp;
pub mod udp;
pub mod uso;
pub mod vnet;

pub use cidr::Cidr;
pub use demux::{FlowKey, Parsed, parse};
pub use vnet::Offload;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpAddress, IpProtocol, IpRepr};

/// Writes into `buf` an IP packet from `src` to `dst` (valid header checksum, hop limit
/// 64) whose `len`-byte `protocol` payload `emit_payload` builds; returns its length, or
/// `None` (nothing written) when `buf` cannot hold it.
pub fn emit_ip(
    buf: &mut [u8],
    (src, dst): (IpAddress, IpAddress),
    protocol: IpProtocol,
    len: usize,
    emit_payload: impl FnOnce(&mut [u8]),
) -> Option<usize> {
    let ip = IpRepr::new(src, dst, protocol, len, 64);
    let total = ip.buffer_len();
    let packet = buf.get_mut(..total)?;
    ip.emit(&mut *packet, &ChecksumCapabilities::default());
    emit_payload(&mut packet[ip.header_len()..]);
    Some(total)
}
