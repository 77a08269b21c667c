//! Control messages as the kernel lays them out after a `recvmsg`, read from plain bytes.

use nix::libc;

/// Bytes of a `cmsghdr` (length, level, type) before its data.
const HEADER: usize = size_of::<libc::cmsghdr>();
/// Control messages start at multiples of this (`CMSG_ALIGN`).
const ALIGN: usize = size_of::<usize>();

/// The segment size a UDP_GRO control message in `control` reports: the receive
/// coalesced datagrams of that many bytes each (the last may be shorter). `None`
/// when there is none (one datagram) or it makes no sense.
pub fn udp_gro_segment(control: &[u8]) -> Option<u16> {
    messages(control)
        .find(|&(level, kind, _)| level == libc::SOL_UDP && kind == libc::UDP_GRO)
        .and_then(|(_, _, data)| Some(i32::from_ne_bytes(data.get(..4)?.try_into().ok()?)))
        .and_then(|size| u16::try_from(size).ok())
        .filter(|&size| size > 0)
}

/// Each control message in `control`: its level, type and data. Stops at the first
/// whose length does not fit.
fn messages(control: &[u8]) -> impl Iterator<Item = (i32, i32, &[u8])> {
    let mut rest = control;
    std::iter::from_fn(move || {
        let header = rest.get(..HEADER)?;
        let len = usize::from_ne_bytes(header[..ALIGN].try_into().ok()?);
        let level = i32::from_ne_bytes(header[ALIGN..ALIGN + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(header[ALIGN + 4..ALIGN + 8].try_into().ok()?);
        let data = rest.get(HEADER..len)?;
        rest = rest.get(len.next_multiple_of(ALIGN)..).unwrap_or(&[]);
        Some((level, kind, data))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let mut bytes = (HEADER + data.len()).to_ne_bytes().to_vec();
        bytes.extend(level.to_ne_bytes());
        bytes.extend(kind.to_ne_bytes());
        bytes.extend(data);
        bytes.resize(bytes.len().next_multiple_of(ALIGN), 0);
        bytes
    }

    #[test]
    fn the_gro_segment_size_is_found_among_other_messages() {
        let gro = message(libc::SOL_UDP, libc::UDP_GRO, &1350i32.to_ne_bytes());
        assert_eq!(udp_gro_segment(&gro), Some(1350));
        let mut both = message(libc::SOL_IP, libc::IP_TTL, &64i32.to_ne_bytes());
        both.extend(&gro);
        assert_eq!(udp_gro_segment(&both), Some(1350));
        assert_eq!(udp_gro_segment(&[]), None, "no message: one datagram");
        let zero = message(libc::SOL_UDP, libc::UDP_GRO, &0i32.to_ne_bytes());
        assert_eq!(udp_gro_segment(&zero), None);
        let huge = message(libc::SOL_UDP, libc::UDP_GRO, &70_000i32.to_ne_bytes());
        assert_eq!(udp_gro_segment(&huge), None);
    }

    #[test]
    fn malformed_control_bytes_end_the_walk() {
        let gro = message(libc::SOL_UDP, libc::UDP_GRO, &1350i32.to_ne_bytes());
        for cut in 0..gro.len() - 4 {
            assert_eq!(udp_gro_segment(&gro[..cut]), None, "cut at {cut}");
        }
        let mut short = gro.clone();
        short[..ALIGN].copy_from_slice(&2usize.to_ne_bytes());
        assert_eq!(
            udp_gro_segment(&short),
            None,
            "a length inside its own header"
        );
        let mut long = gro;
        long[..ALIGN].copy_from_slice(&usize::MAX.to_ne_bytes());
        assert_eq!(udp_gro_segment(&long), None);
    }
}
