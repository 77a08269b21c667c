//! The outbound sockets flows are re-originated on, all bound to the outbound interface
//! so they leave through `-i` even when policy routing would send their destination
//! back into the TUN, and the SOCKS5 upstream they may be re-originated through.

use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::rc::Rc;

use nix::errno::Errno;
use nix::sys::socket::setsockopt;
use nix::sys::socket::sockopt::{RcvBufForce, UdpGroSegment};
use smoltcp::wire::{IpAddress, IpEndpoint};
use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};

use crate::config::Socks5;
use crate::flow::IoError;
use crate::flow::datagram::Kind;
use crate::flow::tcp::KEEPALIVE_IDLE;
use crate::flow::upstream::{Association, Handshake, Io, Target};
use crate::uring::{Region, Ring, Slice};
use crate::wire::socks5::{Command, Credentials};

/// Probes of a silent server: every 20 s after a minute idle, given up after six, so a
/// server that vanished without FIN or RST is found in about three minutes.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);
const KEEPALIVE_PROBES: u32 = 6;
/// Receive buffer of a UDP flow's socket: bursts from the server wait there while the
/// loop is busy. The default (net.core.rmem_default, 208 KiB, about 90 datagrams of
/// 1400 bytes) overflowed at 1 Gbit/s, losing 3-30% of a download (kernel memory, used
/// only while datagrams wait).
const UDP_RECV_BUFFER: usize = 2 << 20;

/// The SOCKS5 proxy flows are relayed through (`--upstream`).
pub struct Upstream {
    pub server: SocketAddr,
    /// Shared by every handshake.
    credentials: Option<Rc<Credentials>>,
    /// How long a connect and handshake may take together.
    pub timeout: std::time::Duration,
}

impl Upstream {
    /// The upstream `socks5` names, at `server` (its host looked up at start-up).
    pub fn new(server: SocketAddr, socks5: &Socks5, timeout: std::time::Duration) -> Upstream {
        Upstream {
            server,
            credentials: socks5.credentials.clone().map(Rc::new),
            timeout,
        }
    }

    /// The handshake of a connection to the upstream started at `now`, for `command` to
    /// `target`.
    pub fn handshake(
        &self,
        command: Command,
        target: Target,
        now: smoltcp::time::Instant,
    ) -> Handshake {
        Handshake::new(
            command,
            target,
            self.credentials.clone(),
            now + self.timeout.into(),
        )
    }

    /// The association of a UDP flow through the upstream, started at `now`.
    pub fn association(&self, now: smoltcp::time::Instant) -> Association {
        Association::new(
            self.server,
            self.credentials.clone(),
            now + self.timeout.into(),
        )
    }
}

/// Starts on `fd` (a connection to the upstream) the handshake I/O `io` asks for, from
/// and into `scratch`; the tokens say whose completions they are.
pub fn start_io(
    ring: &mut Ring,
    fd: BorrowedFd<'_>,
    scratch: &Region,
    io: &Io,
    [send, recv]: [u64; 2],
) {
    let slice = |range: &Range<usize>| Slice {
        region: scratch.clone(),
        range: range.clone(),
    };
    if let Some(range) = &io.send {
        ring.send(fd, slice(range), send);
    }
    if let Some(range) = &io.recv {
        ring.recv(fd, slice(range), recv);
    }
}

/// What a socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Tcp,
    /// A UDP socket, or a raw ICMP socket for pings.
    Datagram(Kind),
}

/// A socket for `purpose` towards `server`, bound to `interface`. A TCP socket is left
/// unconnected (the ring connects it); a datagram socket is connected, so only the
/// server's datagrams come back on it. Pings use raw ICMP sockets: unprivileged ping
/// sockets are disabled by default (net.ipv4.ping_group_range); raw sockets need
/// CAP_NET_RAW (binding to the interface needs none since Linux 5.7).
pub fn socket(purpose: Purpose, server: IpEndpoint, interface: &str) -> std::io::Result<Socket> {
    let (domain, icmp) = match server.addr {
        IpAddress::Ipv4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddress::Ipv6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let socket = match purpose {
        Purpose::Tcp => Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?,
        Purpose::Datagram(Kind::Udp) => {
            Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?
        }
        Purpose::Datagram(Kind::Echo) => Socket::new(domain, Type::RAW.cloexec(), Some(icmp))?,
    };
    socket.bind_device(Some(interface.as_bytes()))?;
    match purpose {
        Purpose::Tcp => {
            socket.set_tcp_nodelay(true)?;
            socket.set_tcp_keepalive(
                &TcpKeepalive::new()
                    .with_time(KEEPALIVE_IDLE)
                    .with_interval(KEEPALIVE_INTERVAL)
                    .with_retries(KEEPALIVE_PROBES),
            )?;
        }
        Purpose::Datagram(kind) => {
            if kind == Kind::Udp {
                // Above net.core.rmem_max only with CAP_NET_ADMIN, which is kept.
                setsockopt(&socket, RcvBufForce, &UDP_RECV_BUFFER)
                    .or_else(|_| socket.set_recv_buffer_size(UDP_RECV_BUFFER))?;
                // Server datagrams come coalesced, many to a receive (Linux 5.0+), each
                // receive saying their size: written to the TUN as one super-packet with
                // USO, else split again. Without it (refused) they come one by one.
                let _ = setsockopt(&socket, UdpGroSegment, &true);
            }
            let port = if kind == Kind::Udp { server.port } else { 0 };
            socket.connect(&SockAddr::from(SocketAddr::new(server.addr.into(), port)))?;
        }
    }
    Ok(socket)
}

/// A completion's `result` on an outbound TCP socket (a count, or -errno) as its flow is
/// told it.
pub fn completion(result: i32) -> Result<usize, IoError> {
    if result < 0 {
        Err(io_error(Errno::from_raw(-result)))
    } else {
        Ok(result as usize)
    }
}

/// What an error of a system call on an outbound TCP socket is to its flow.
pub fn io_error_of(error: std::io::Error) -> IoError {
    io_error(Errno::from_raw(
        error.raw_os_error().unwrap_or(nix::libc::EIO),
    ))
}

/// What the kernel's error on an outbound TCP socket is to its flow: the causes some flow
/// tells apart, the rest as `Other`.
fn io_error(errno: Errno) -> IoError {
    match errno {
        Errno::ECONNREFUSED => IoError::Refused,
        Errno::EHOSTUNREACH => IoError::HostUnreachable,
        Errno::ENETUNREACH => IoError::NetUnreachable,
        // ETIME is an io_uring timer's expiry.
        Errno::ETIMEDOUT | Errno::ETIME => IoError::TimedOut,
        Errno::ECANCELED => IoError::Cancelled,
        _ => IoError::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_errors_reach_flows_as_the_causes_they_tell_apart() {
        let cases = [
            (Errno::ECONNREFUSED, IoError::Refused),
            (Errno::EHOSTUNREACH, IoError::HostUnreachable),
            (Errno::ENETUNREACH, IoError::NetUnreachable),
            (Errno::ETIMEDOUT, IoError::TimedOut),
            (Errno::ETIME, IoError::TimedOut),
            (Errno::ECANCELED, IoError::Cancelled),
            // Told apart by no flow.
            (Errno::ECONNRESET, IoError::Other),
            (Errno::EPIPE, IoError::Other),
            (Errno::EBADF, IoError::Other),
        ];
        for (errno, error) in cases {
            assert_eq!(completion(-(errno as i32)), Err(error), "{errno}");
            let io = std::io::Error::from_raw_os_error(errno as i32);
            assert_eq!(io_error_of(io), error, "{errno} from a system call");
        }
        assert_eq!(
            completion(-4095),
            Err(IoError::Other),
            "an errno unknown to nix"
        );
        assert_eq!(completion(0), Ok(0), "end of stream");
        assert_eq!(completion(1 << 16), Ok(1 << 16));
        let no_errno = std::io::Error::other("no errno");
        assert_eq!(io_error_of(no_errno), IoError::Other);
    }
}
