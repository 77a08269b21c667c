//! The TUN device: created and configured in-process (name, addresses, MTU, queue length,
//! link up), with checksum and segmentation offload negotiated through virtio-net headers.

use std::fs::OpenOptions;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use log::warn;
use nix::libc;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpAddress, IpEndpoint, IpProtocol, IpRepr, TcpPacket};
use socket2::{Domain, Socket, Type};

use crate::error::Error;
use crate::sys::{self, netlink};
use crate::wire::{Cidr, FlowKey, Offload, offload, uso, vnet};

/// Packets the kernel may queue for us to read. The default (500) overflows while the
/// proxy is busy with a burst, and a dropped window update from a client costs a
/// zero-window-probe backoff of seconds; 4096 MTU packets are ~10 MB at most.
const TX_QUEUE_LEN: u32 = 4096;

/// What TUN to create.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub addrs: Vec<Cidr>,
    pub mtu: u32,
    /// The most offload to negotiate; probing steps down from here.
    pub offload_cap: Offload,
}

/// TUNSETOFFLOAD flags asking for `offload`.
fn tun_flags(offload: Offload) -> libc::c_uint {
    match offload {
        Offload::None | Offload::Header => 0,
        Offload::Checksum => libc::TUN_F_CSUM,
        Offload::Tso => libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6,
        Offload::Uso => tun_flags(Offload::Tso) | libc::TUN_F_USO4 | libc::TUN_F_USO6,
    }
}

/// The next level to try when the kernel refuses `offload`.
fn lower(offload: Offload) -> Offload {
    match offload {
        Offload::Uso => Offload::Tso,
        Offload::Tso => Offload::Checksum,
        Offload::Checksum => Offload::Header,
        Offload::Header | Offload::None => Offload::None,
    }
}

/// An open TUN device. The kernel removes the (non-persistent) interface when it closes.
pub struct Tun {
    fd: OwnedFd,
    name: String,
    offload: Offload,
}

impl Tun {
    /// Creates the TUN of `spec`, negotiates offload up to its cap, assigns its
    /// addresses and MTU, and brings it up.
    pub fn create(spec: &Spec) -> Result<Tun, Error> {
        // Refuse to attach to an interface someone else made: we would then configure
        // and, on exit, tear down state we do not own.
        if sys::interface_index(&spec.name).is_some() {
            return Err(Error::TunExists(spec.name.clone()));
        }
        let mut offload = spec.offload_cap;
        let fd = open_tun()?;
        let fd =
            match sys::tun_set_iff(fd.as_raw_fd(), &spec.name, iff_flags(offload.vnet_header())) {
                Ok(()) => fd,
                // EINVAL is the kernel refusing either the headers or the name: only the
                // same name without headers (on a fresh fd) tells which.
                Err(err) if offload.vnet_header() && err.raw_os_error() == Some(libc::EINVAL) => {
                    drop(fd);
                    let fd = open_tun()?;
                    sys::tun_set_iff(fd.as_raw_fd(), &spec.name, iff_flags(false))
                        .map_err(|err| set_iff_error(&spec.name, err))?;
                    warn!("the kernel refuses virtio-net headers on the TUN ({err}); no offload");
                    offload = Offload::None;
                    fd
                }
                Err(err) => return Err(set_iff_error(&spec.name, err)),
            };
        while offload.vnet_header() {
            match sys::tun_set_offload(fd.as_raw_fd(), tun_flags(offload)) {
                Ok(()) => break,
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => offload = lower(offload),
                Err(err) => {
                    return Err(Error::from_io("negotiate TUN offload (TUNSETOFFLOAD)", err));
                }
            }
        }
        let mut tun = Tun {
            fd,
            name: spec.name.clone(),
            offload,
        };
        tun.configure(spec)?;
        if tun.offload.tso() && !tun.accepts_gso_writes(spec, gso_probe) {
            warn!(
                "the kernel refuses segmentation-offload writes to the TUN; using checksum offload only"
            );
            sys::tun_set_offload(tun.fd.as_raw_fd(), tun_flags(Offload::Checksum))
                .map_err(|err| Error::from_io("negotiate TUN offload (TUNSETOFFLOAD)", err))?;
            tun.offload = Offload::Checksum;
        }
        if tun.offload == Offload::Uso && !tun.accepts_gso_writes(spec, uso_probe) {
            warn!(
                "the kernel refuses UDP segmentation-offload writes to the TUN; using TCP segmentation only"
            );
            sys::tun_set_offload(tun.fd.as_raw_fd(), tun_flags(Offload::Tso))
                .map_err(|err| Error::from_io("negotiate TUN offload (TUNSETOFFLOAD)", err))?;
            tun.offload = Offload::Tso;
        }
        Ok(tun)
    }

    fn configure(&self, spec: &Spec) -> Result<(), Error> {
        let ctl4 = Socket::new(Domain::IPV4, Type::DGRAM, None)
            .map_err(|err| Error::Io("open control socket", err))?;
        sys::set_mtu(&ctl4, &self.name, spec.mtu)
            .map_err(|err| Error::from_io("set the TUN MTU", err))?;
        sys::set_tx_queue_len(&ctl4, &self.name, TX_QUEUE_LEN)
            .map_err(|err| Error::from_io("set the TUN queue length", err))?;
        let index = sys::interface_index(&self.name)
            .ok_or_else(|| Error::Io("look up the new TUN", io::ErrorKind::NotFound.into()))?;
        // Through rtnetlink, like `ip addr add`: SIOCSIFADDR would replace the IPv4
        // address for each one after the first.
        let mut netlink =
            netlink::Socket::open().map_err(|err| Error::Io("open an rtnetlink socket", err))?;
        for &cidr in &spec.addrs {
            let what = match cidr.addr {
                IpAddr::V4(_) => "assign a TUN IPv4 address",
                IpAddr::V6(_) => "assign a TUN IPv6 address",
            };
            netlink
                .add_address(index, cidr)
                .map_err(|err| Error::from_io(what, err))?;
        }
        sys::set_up(&ctl4, &self.name).map_err(|err| Error::from_io("bring the TUN up", err))
    }

    /// Some kernels (e.g. 6.6.44, 6.10.3) reject GSO writes with EINVAL. Find out with a
    /// two-segment packet (`probe`: TCP, or UDP for USO) per configured family from the
    /// loopback address to ours: the kernel validates the virtio-net header in
    /// write(2), then drops the packet (a loopback source on another device is a
    /// martian for IPv4 and refused by ip6_rcv for IPv6), so nothing is delivered or
    /// answered.
    fn accepts_gso_writes(&self, spec: &Spec, probe: fn(IpAddress, IpAddress) -> Vec<u8>) -> bool {
        spec.addrs.iter().all(|cidr| {
            let (from, to) = match cidr.addr {
                IpAddr::V4(addr) => (IpAddress::v4(127, 0, 0, 1), IpAddress::Ipv4(addr)),
                IpAddr::V6(addr) => (IpAddress::v6(0, 0, 0, 0, 0, 0, 0, 1), IpAddress::Ipv6(addr)),
            };
            match sys::write_packet(self.fd.as_raw_fd(), &probe(from, to)) {
                Err(err) => err.raw_os_error() != Some(libc::EINVAL),
                // Anything else says nothing about GSO; let the data path find out.
                Ok(_) => true,
            }
        })
    }

    /// Whether the interface still exists: its deletion detaches our fd. Should the
    /// kernel not answer, the TUN is taken to be there (reads and writes still tell).
    pub fn attached(&self) -> bool {
        sys::tun_attached(self.fd.as_raw_fd()).unwrap_or(true)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn offload(&self) -> Offload {
        self.offload
    }
}

/// TUNSETIFF flags: a TUN without packet information, with virtio-net headers if
/// `vnet_header`.
fn iff_flags(vnet_header: bool) -> libc::c_int {
    let flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if vnet_header {
        flags | libc::IFF_VNET_HDR
    } else {
        flags
    }
}

/// A failed TUNSETIFF. EINVAL without headers can only be about the name (the config
/// checks the kernel's rules, but the kernel has the last word).
fn set_iff_error(name: &str, err: io::Error) -> Error {
    if err.raw_os_error() == Some(libc::EINVAL) {
        return Error::Usage(format!(
            "--tun '{name}': the kernel refuses this interface name ({err})"
        ));
    }
    Error::from_io("create the TUN device (TUNSETIFF)", err)
}

fn open_tun() -> Result<OwnedFd, Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        // Non-blocking: io_uring then tries TUN reads and writes inline and waits by
        // polling on any kernel (it trusts O_NONBLOCK files to honour nowait), rather
        // than parking them on worker threads where the driver does not advertise
        // FMODE_NOWAIT itself.
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|err| match err.kind() {
            io::ErrorKind::PermissionDenied => Error::NotPermitted("open /dev/net/tun"),
            _ => Error::NoTun(err),
        })?;
    Ok(OwnedFd::from(file))
}

/// A virtio-net header plus a TCP packet of two 100-byte segments from `from` to `to`,
/// with the partial checksum a segmentation request carries.
fn gso_probe(from: IpAddress, to: IpAddress) -> Vec<u8> {
    const SEGMENT: u16 = 100;
    const TCP_HEADER: usize = 20;
    let payload = 2 * usize::from(SEGMENT);
    let ip = IpRepr::new(from, to, IpProtocol::Tcp, TCP_HEADER + payload, 64);
    let mut buf = vec![0u8; vnet::LEN + ip.buffer_len()];
    let (header, packet) = buf.split_at_mut(vnet::LEN);
    ip.emit(&mut *packet, &ChecksumCapabilities::default());
    let ip_len = ip.header_len();
    let mut tcp = TcpPacket::new_unchecked(&mut packet[ip_len..]);
    tcp.set_src_port(9);
    tcp.set_dst_port(9);
    tcp.set_header_len(TCP_HEADER as u8);
    tcp.set_ack(true);
    tcp.set_window_len(1024);
    let vnet_header = offload::finish_tcp(packet, Some(SEGMENT));
    vnet_header.emit(header);
    buf
}

/// A virtio-net header plus a UDP super-packet of two 100-byte datagrams from `from` to
/// `to`, as the proxy writes them with USO.
fn uso_probe(from: IpAddress, to: IpAddress) -> Vec<u8> {
    let key = FlowKey {
        client: IpEndpoint::new(to, 9),
        server: IpEndpoint::new(from, 9),
    };
    let datagram = [0u8; 100];
    let mut buf = vec![0u8; vnet::LEN + 2 * datagram.len() + 48];
    let (header, packet) = buf.split_at_mut(vnet::LEN);
    let datagrams = [&datagram[..], &datagram[..]];
    let (len, vnet_header) =
        uso::reply(packet, key, datagrams.into_iter(), 100).expect("the probe fits its buffer");
    vnet_header.emit(header);
    buf.truncate(vnet::LEN + len);
    buf
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_steps_down_to_no_header() {
        let mut level = Offload::Uso;
        let mut seen = vec![level];
        while level != Offload::None {
            level = lower(level);
            seen.push(level);
        }
        assert_eq!(
            seen,
            [
                Offload::Uso,
                Offload::Tso,
                Offload::Checksum,
                Offload::Header,
                Offload::None
            ]
        );
        assert_eq!(tun_flags(Offload::Tso), 0x07);
        assert_eq!(tun_flags(Offload::Uso), 0x67);
        assert_eq!(tun_flags(Offload::Header), 0);
    }

    #[test]
    fn gso_probes_are_valid_two_segment_packets() {
        for (from, to) in [
            (IpAddress::v4(127, 0, 0, 1), IpAddress::v4(198, 18, 0, 1)),
            (
                IpAddress::v6(0, 0, 0, 0, 0, 0, 0, 1),
                IpAddress::v6(0xfd7a, 0, 0, 0, 0, 0, 0, 1),
            ),
        ] {
            for (probe, udp) in [(gso_probe(from, to), false), (uso_probe(from, to), true)] {
                let (header, packet) = vnet::Header::parse(&probe).unwrap();
                assert!(header.needs_csum);
                assert_ne!(header.gso, vnet::Gso::None);
                assert_eq!(header.gso == vnet::Gso::UdpL4, udp);
                let payload = packet.len() - usize::from(header.hdr_len);
                assert_eq!(payload, 2 * usize::from(header.gso_size));
                let parsed = crate::wire::parse(packet);
                if udp {
                    assert!(matches!(parsed, crate::wire::Parsed::Udp { .. }));
                } else {
                    assert!(matches!(parsed, crate::wire::Parsed::Tcp { .. }));
                }
            }
        }
    }
}
