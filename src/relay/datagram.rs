//! Datagram relay for UDP and ICMP echo: one connected outbound socket per flow (a UDP
//! socket per client/server pair, a raw ICMP socket per ping), datagrams copied both
//! ways through the ring, idle timeouts, and a bounded table that evicts the
//! longest-idle flow first. It submits its own I/O, so it touches ring memory.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use slab::Slab;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet,
    UdpPacket, UdpRepr,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::stack::unreachable::{self, Quote, Reason};
use crate::stack::{FlowKey, TxPool};
use crate::sys::Mapping;
use crate::uring::{BufRing, Op, Ring, Token, token::GENERATION_MASK};
use nix::libc;

/// Largest UDP payload (IPv4 limit), the size of each receive and send buffer.
const MAX_DATAGRAM: usize = 65507;
/// Buffers the kernel picks from for the flows' multishot receives, shared by all flows.
const RECV_BUFFERS: u16 = 256;
/// Buffer group id of those buffers (the TUN reads use group 0).
const RECV_GROUP: u16 = 1;
/// Datagrams from clients waiting for their send to complete, across all flows. A send
/// completes at the next submit unless its socket buffer is full, so this many lets a
/// full turn of TUN reads without offload (512 packets) be in flight at once: with 256,
/// a burst of 1,000 new flows lost a quarter of its datagrams. Bursts beyond it (sends
/// of the previous turn still pending, USO super-packets split into many datagrams) are
/// dropped and counted (`udp-no-send-slot`). Slot pages are touched only when used.
pub const SEND_SLOTS: u16 = 512;

/// Idle timeout of ping flows: `ping` sends one request a second.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of an ICMP echo header (type, code, checksum, identifier, sequence).
const ECHO_HEADER: usize = 8;

/// What a flow relays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Udp,
    /// ICMP or ICMPv6 echo; the flow key's client port is the echo identifier.
    Echo,
}

/// One datagram from a client.
#[derive(Clone, Copy, Debug)]
pub enum Datagram<'a> {
    /// A UDP payload; a UDP segmentation super-packet from the TUN carries several
    /// datagrams of `segment_size` bytes back to back.
    Udp {
        payload: &'a [u8],
        segment_size: Option<u16>,
        /// The datagram's start, for an ICMP error if the server's port is closed.
        quote: Quote,
    },
    /// An echo request with its sequence number and data.
    Echo { seq: u16, data: &'a [u8] },
}

/// Limits of the datagram relay.
#[derive(Clone, Debug)]
pub struct Limits {
    pub idle_timeout: Duration,
    /// Idle timeout of flows to port 53: a DNS exchange is one query and its answer.
    pub dns_timeout: Duration,
    pub max_flows: usize,
}

impl Limits {
    /// How long a flow of `kind` to `server_port` may stay idle.
    pub fn idle_timeout(&self, kind: Kind, server_port: u16) -> Duration {
        match (kind, server_port) {
            (Kind::Echo, _) => ECHO_TIMEOUT,
            (Kind::Udp, 53) => self.dns_timeout,
            (Kind::Udp, _) => self.idle_timeout,
        }
    }
}

/// What the UDP relay did and dropped.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub flows_opened: u64,
    pub flows_expired: u64,
    pub flows_evicted: u64,
    pub socket_errors: u64,
    pub datagrams_up: u64,
    pub bytes_up: u64,
    pub datagrams_down: u64,
    pub bytes_down: u64,
    /// Client datagrams dropped because every send slot was in flight.
    pub no_send_slot: u64,
    /// Server datagrams dropped because no TUN write buffer could hold them.
    pub reply_drops: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
    pub echo_requests: u64,
    pub echo_replies: u64,
}

struct Flow {
    kind: Kind,
    key: FlowKey,
    /// The start of the client's latest datagram, quoted in ICMP errors.
    last_quote: Quote,
    /// Echo identifier on the outbound side. It differs from the client's: a local ping
    /// (raw or ping socket) would otherwise also take the reply meant for the proxy
    /// and count it twice.
    echo_ident: u16,
    generation: u32,
    /// `None` once its close has been submitted.
    socket: Option<Socket>,
    last_active: Instant,
    /// A multishot receive is armed.
    receiving: bool,
    closing: bool,
}

/// Send buffers shared by all flows: a client datagram is copied into a free slot,
/// which returns when its send completes.
struct SendSlots {
    memory: Mapping,
    free: Vec<u16>,
}

impl SendSlots {
    fn slot(&mut self, index: u16) -> &mut [u8] {
        // SAFETY: the slice is used only until this function's caller returns, and the
        // mapping lives as long as `self`.
        let all = unsafe { self.memory.as_static_mut() };
        let start = usize::from(index) * MAX_DATAGRAM;
        &mut all[start..start + MAX_DATAGRAM]
    }
}

/// All UDP and ping flows.
pub struct DatagramRelay {
    /// Server datagrams land here (multishot receives with provided buffers).
    recv_buffers: BufRing,
    flows: Slab<Flow>,
    by_key: HashMap<(Kind, FlowKey), usize>,
    slots: SendSlots,
    limits: Limits,
    interface: String,
    next_generation: u32,
    pub counters: Counters,
}

impl DatagramRelay {
    pub fn new(ring: &Ring, limits: Limits, interface: String) -> std::io::Result<DatagramRelay> {
        let no_memory = || std::io::Error::from(std::io::ErrorKind::OutOfMemory);
        Ok(DatagramRelay {
            recv_buffers: BufRing::new(ring.inner(), RECV_GROUP, RECV_BUFFERS, MAX_DATAGRAM)?,
            flows: Slab::new(),
            by_key: HashMap::new(),
            slots: SendSlots {
                memory: Mapping::new(usize::from(SEND_SLOTS) * MAX_DATAGRAM)
                    .ok_or_else(no_memory)?,
                free: (0..SEND_SLOTS).rev().collect(),
            },
            limits,
            interface,
            next_generation: 0,
            counters: Counters::default(),
        })
    }

    pub fn active(&self) -> usize {
        self.flows.len()
    }

    /// Relays a datagram from a client of flow `key`.
    pub fn on_datagram(
        &mut self,
        ring: &mut Ring,
        key: FlowKey,
        datagram: Datagram<'_>,
        now: Instant,
    ) {
        let kind = match datagram {
            Datagram::Udp { .. } => Kind::Udp,
            Datagram::Echo { .. } => Kind::Echo,
        };
        let Some(slot) = self.flow_for(ring, kind, key, now) else {
            return;
        };
        let flow = &mut self.flows[slot];
        flow.last_active = now;
        let fd = types::Fd(flow.socket.as_ref().map_or(-1, |s| s.as_raw_fd()));
        match datagram {
            Datagram::Udp {
                payload,
                segment_size,
                quote,
            } => {
                self.flows[slot].last_quote = quote;
                let chunk = segment_size.map_or(payload.len(), usize::from).max(1);
                for part in payload.chunks(chunk.min(MAX_DATAGRAM)) {
                    self.send(ring, fd, |buffer| {
                        buffer[..part.len()].copy_from_slice(part);
                        part.len()
                    });
                }
            }
            Datagram::Echo { seq, data } => {
                let ident = flow.echo_ident;
                let ipv4 = matches!(key.server.addr, IpAddress::Ipv4(_));
                self.counters.echo_requests += 1;
                self.send(ring, fd, |buffer| {
                    echo_request(buffer, ipv4, ident, seq, data)
                });
            }
        }
        if needs_recv(&self.flows[slot]) {
            self.arm_recv(ring, slot);
        }
    }

    /// Sends what `build` writes into a free send slot (it returns the length).
    fn send(&mut self, ring: &mut Ring, fd: types::Fd, build: impl FnOnce(&mut [u8]) -> usize) {
        let Some(index) = self.slots.free.pop() else {
            self.counters.no_send_slot += 1;
            return;
        };
        let buffer = self.slots.slot(index);
        let len = build(buffer).min(MAX_DATAGRAM);
        let send = opcode::Send::new(fd, buffer.as_ptr(), len as u32)
            .build()
            .user_data(Token::new(Op::UdpSend, 0, usize::from(index)).encode());
        // SAFETY: the slot stays out of the free list, untouched, until this send's
        // completion returns it (`on_sent`); the mapping lives as long as `self`.
        unsafe { ring.push(&[send]) };
        self.counters.datagrams_up += 1;
        self.counters.bytes_up += len as u64;
    }

    /// The flow for `key`, opened (evicting the longest-idle one if full) if new.
    fn flow_for(
        &mut self,
        ring: &mut Ring,
        kind: Kind,
        key: FlowKey,
        now: Instant,
    ) -> Option<usize> {
        if let Some(&slot) = self.by_key.get(&(kind, key)) {
            return Some(slot);
        }
        if self.by_key.len() >= self.limits.max_flows {
            let oldest = self
                .flows
                .iter()
                .filter(|(_, flow)| !flow.closing)
                .min_by_key(|(_, flow)| flow.last_active)
                .map(|(slot, _)| slot)?;
            self.counters.flows_evicted += 1;
            self.close(ring, oldest);
        }
        let socket = match outbound_socket(kind, key, &self.interface) {
            Ok(socket) => socket,
            Err(_) => {
                self.counters.socket_errors += 1;
                return None;
            }
        };
        let generation = self.next_generation & GENERATION_MASK;
        self.next_generation = generation.wrapping_add(1);
        let slot = self.flows.insert(Flow {
            kind,
            key,
            last_quote: Quote::of(&[]),
            // Spread over the identifier space, never the client's own.
            echo_ident: (generation as u16).wrapping_mul(0x9e37) ^ key.client.port ^ 0x8000,
            generation,
            socket: Some(socket),
            last_active: now,
            receiving: false,
            closing: false,
        });
        self.by_key.insert((kind, key), slot);
        self.counters.flows_opened += 1;
        Some(slot)
    }

    fn arm_recv(&mut self, ring: &mut Ring, slot: usize) {
        let flow = &mut self.flows[slot];
        let Some(socket) = &flow.socket else {
            return;
        };
        let recv = opcode::RecvMulti::new(types::Fd(socket.as_raw_fd()), RECV_GROUP)
            .build()
            .user_data(Token::new(Op::UdpRecv, flow.generation, slot).encode());
        // SAFETY: the receive writes only into buffers of the registered ring, which
        // lives as long as `self`.
        unsafe { ring.push(&[recv]) };
        flow.receiving = true;
    }

    /// A client datagram's send finished.
    pub fn on_sent(&mut self, index: u32, result: i32) {
        if let Ok(index) = u16::try_from(index)
            && index < SEND_SLOTS
        {
            self.slots.free.push(index);
        }
        if result < 0 {
            self.counters.send_errors += 1;
        }
    }

    /// A server datagram (or an error) arrived for flow `token.key`, in provided buffer
    /// `buffer_id` if any; `more` says whether the multishot receive stays armed.
    pub fn on_received(
        &mut self,
        ring: &mut Ring,
        tx: &mut TxPool,
        token: Token,
        completion: (i32, Option<u16>, bool),
    ) {
        let (result, buffer_id, more) = completion;
        self.handle_received(ring, tx, token, result, buffer_id, more);
        if let Some(bid) = buffer_id {
            self.recv_buffers.recycle(bid);
            self.recv_buffers.publish();
        }
    }

    fn handle_received(
        &mut self,
        ring: &mut Ring,
        tx: &mut TxPool,
        token: Token,
        result: i32,
        buffer_id: Option<u16>,
        more: bool,
    ) {
        let slot = token.key as usize;
        let Some(flow) = self.flows.get_mut(slot) else {
            return;
        };
        if flow.generation != token.generation {
            return;
        }
        if !more {
            flow.receiving = false;
        }
        if flow.closing {
            if !flow.receiving {
                self.finish_close(ring, slot);
            }
            return;
        }
        match (result, buffer_id) {
            (n, Some(bid)) if n >= 0 => {
                flow.last_active = Instant::now();
                let Some(received) = self.recv_buffers.packet(bid, n as usize) else {
                    return;
                };
                let emitted = match flow.kind {
                    Kind::Udp => Some(emit_udp_reply(tx, flow.key, received)),
                    Kind::Echo => {
                        let reply = emit_echo_reply(tx, flow.key, flow.echo_ident, received);
                        if reply == Some(true) {
                            self.counters.echo_replies += 1;
                        }
                        reply
                    }
                };
                match emitted {
                    Some(true) => {
                        self.counters.datagrams_down += 1;
                        self.counters.bytes_down += received.len() as u64;
                    }
                    Some(false) => self.counters.reply_drops += 1,
                    // Not for this flow (another ping's reply, an ICMP error): ignored.
                    None => {}
                }
            }
            // Every provided buffer was in use: re-armed below, once they are recycled.
            (n, _) if n == -libc::ENOBUFS => {}
            (n, _) => {
                // The kernel turned an ICMP error from the path into this errno; pass
                // the same error on to the client. The flow stays, as a direct client's
                // socket would, and keeps receiving.
                self.counters.recv_errors += 1;
                let reason = match -n {
                    libc::ECONNREFUSED => Some(Reason::Port),
                    libc::EHOSTUNREACH => Some(Reason::Host),
                    libc::ENETUNREACH => Some(Reason::Network),
                    _ => None,
                };
                if let Some(reason) = reason
                    && flow.kind == Kind::Udp
                    && !unreachable::emit(tx, &flow.last_quote, reason)
                {
                    self.counters.reply_drops += 1;
                }
            }
        }
        if needs_recv(&self.flows[slot]) {
            self.arm_recv(ring, slot);
        }
    }

    /// Closes flows idle past their timeout.
    pub fn expire(&mut self, ring: &mut Ring, now: Instant) {
        let expired: Vec<usize> = self
            .flows
            .iter()
            .filter(|(_, flow)| {
                !flow.closing
                    && now.duration_since(flow.last_active)
                        >= self.limits.idle_timeout(flow.kind, flow.key.server.port)
            })
            .map(|(slot, _)| slot)
            .collect();
        for slot in expired {
            self.counters.flows_expired += 1;
            self.close(ring, slot);
        }
    }

    /// Stops a flow: cancels its receive, then closes the socket once nothing is in
    /// flight (send slots hold no flow memory, so they need not be waited for).
    fn close(&mut self, ring: &mut Ring, slot: usize) {
        let flow = &mut self.flows[slot];
        flow.closing = true;
        self.by_key.remove(&(flow.kind, flow.key));
        if flow.receiving {
            if let Some(socket) = &flow.socket {
                let cancel = opcode::AsyncCancel2::new(
                    types::CancelBuilder::fd(types::Fd(socket.as_raw_fd())).all(),
                )
                .build()
                .user_data(Token::new(Op::Ignore, 0, 0).encode());
                // SAFETY: a cancel points at no memory.
                unsafe { ring.push(&[cancel]) };
            }
        } else {
            self.finish_close(ring, slot);
        }
    }

    fn finish_close(&mut self, ring: &mut Ring, slot: usize) {
        let flow = self.flows.remove(slot);
        if let Some(socket) = flow.socket {
            let close = opcode::Close::new(types::Fd(socket.into_raw_fd()))
                .build()
                .user_data(Token::new(Op::Ignore, 0, 0).encode());
            // SAFETY: a close points at no memory; the fd is owned by nobody now.
            unsafe { ring.push(&[close]) };
        }
    }
}

fn needs_recv(flow: &Flow) -> bool {
    !flow.receiving && !flow.closing
}

/// A socket bound to the outbound interface and connected to the server, so only the
/// server's datagrams come back on it: UDP, or raw ICMP for pings (unprivileged ping
/// sockets are disabled by default, net.ipv4.ping_group_range; raw sockets need the
/// CAP_NET_RAW we hold for SO_BINDTODEVICE anyway).
fn outbound_socket(kind: Kind, key: FlowKey, interface: &str) -> std::io::Result<Socket> {
    let (domain, icmp) = match key.server.addr {
        IpAddress::Ipv4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddress::Ipv6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let socket = match kind {
        Kind::Udp => Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?,
        Kind::Echo => Socket::new(domain, Type::RAW.cloexec(), Some(icmp))?,
    };
    socket.bind_device(Some(interface.as_bytes()))?;
    let port = if kind == Kind::Udp {
        key.server.port
    } else {
        0
    };
    let server = SocketAddr::new(key.server.addr.into(), port);
    socket.connect(&SockAddr::from(server))?;
    Ok(socket)
}

/// Writes an echo request into `buffer`, returning its length. ICMPv4 needs our checksum;
/// the kernel fills in ICMPv6 checksums of raw sockets itself.
fn echo_request(buffer: &mut [u8], ipv4: bool, ident: u16, seq: u16, data: &[u8]) -> usize {
    let len = (ECHO_HEADER + data.len()).min(buffer.len());
    let data = &data[..len - ECHO_HEADER];
    buffer[0] = if ipv4 { 8 } else { 128 };
    buffer[1] = 0;
    buffer[2..4].copy_from_slice(&[0, 0]);
    buffer[4..6].copy_from_slice(&ident.to_be_bytes());
    buffer[6..8].copy_from_slice(&seq.to_be_bytes());
    buffer[ECHO_HEADER..len].copy_from_slice(data);
    if ipv4 {
        let sum = !smoltcp::wire::checksum::data(&buffer[..len]);
        buffer[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    len
}

/// Writes the echo reply found in `received` (from the raw socket of flow `key`, sent
/// with identifier `outbound_ident`) to the TUN as a reply from the pinged host, with the
/// client's identifier. `None` when it is not this flow's echo reply; `Some(false)` when
/// no buffer could hold it.
fn emit_echo_reply(
    tx: &mut TxPool,
    key: FlowKey,
    outbound_ident: u16,
    received: &[u8],
) -> Option<bool> {
    let caps = ChecksumCapabilities::default();
    let ident = key.client.port;
    let ignored = ChecksumCapabilities::ignored();
    match (key.server.addr, key.client.addr) {
        (IpAddress::Ipv4(_), IpAddress::Ipv4(_)) => {
            // IPv4 raw sockets deliver the IP header too.
            let ip = Ipv4Packet::new_checked(received).ok()?;
            let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
            let Icmpv4Repr::EchoReply {
                ident: got,
                seq_no,
                data,
            } = Icmpv4Repr::parse(&icmp, &ignored).ok()?
            else {
                return None;
            };
            let repr = Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data,
            };
            (got == outbound_ident).then(|| {
                tx.emit_ip(
                    from_server(key),
                    IpProtocol::Icmp,
                    repr.buffer_len(),
                    |message| repr.emit(&mut Icmpv4Packet::new_unchecked(message), &caps),
                )
            })
        }
        (IpAddress::Ipv6(server), IpAddress::Ipv6(client)) => {
            let icmp = Icmpv6Packet::new_checked(received).ok()?;
            let Icmpv6Repr::EchoReply {
                ident: got,
                seq_no,
                data,
            } = Icmpv6Repr::parse(&server, &client, &icmp, &ignored).ok()?
            else {
                return None;
            };
            let repr = Icmpv6Repr::EchoReply {
                ident,
                seq_no,
                data,
            };
            (got == outbound_ident).then(|| {
                tx.emit_ip(
                    from_server(key),
                    IpProtocol::Icmpv6,
                    repr.buffer_len(),
                    |message| {
                        repr.emit(
                            &server,
                            &client,
                            &mut Icmpv6Packet::new_unchecked(message),
                            &caps,
                        )
                    },
                )
            })
        }
        _ => None,
    }
}

/// Source and destination of a packet from the server of flow `key` to its client.
fn from_server(key: FlowKey) -> (IpAddress, IpAddress) {
    (key.server.addr, key.client.addr)
}

/// Writes the server's `payload` to the TUN as a datagram from the server to the client.
/// False when no buffer can hold it.
fn emit_udp_reply(tx: &mut TxPool, key: FlowKey, payload: &[u8]) -> bool {
    let udp = UdpRepr {
        src_port: key.server.port,
        dst_port: key.client.port,
    };
    // Replies are few and small next to TCP bulk data: the checksum is computed here
    // rather than through the offload path.
    let caps = ChecksumCapabilities::default();
    let len = udp.header_len() + payload.len();
    tx.emit_ip(from_server(key), IpProtocol::Udp, len, |datagram| {
        udp.emit(
            &mut UdpPacket::new_unchecked(datagram),
            &key.server.addr,
            &key.client.addr,
            payload.len(),
            |data| data.copy_from_slice(payload),
            &caps,
        );
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_flows_time_out_sooner() {
        let limits = Limits {
            idle_timeout: Duration::from_secs(60),
            dns_timeout: Duration::from_secs(10),
            max_flows: 8,
        };
        assert_eq!(limits.idle_timeout(Kind::Udp, 53), Duration::from_secs(10));
        assert_eq!(limits.idle_timeout(Kind::Udp, 443), Duration::from_secs(60));
        assert_eq!(limits.idle_timeout(Kind::Echo, 0), ECHO_TIMEOUT);
    }

    #[test]
    fn echo_request_has_a_valid_icmpv4_checksum() {
        let mut buffer = [0u8; 64];
        let len = echo_request(&mut buffer, true, 0x1234, 7, b"ping data");
        let packet = Icmpv4Packet::new_checked(&buffer[..len]).unwrap();
        assert!(packet.verify_checksum());
        let repr = Icmpv4Repr::parse(&packet, &ChecksumCapabilities::default()).unwrap();
        assert_eq!(
            repr,
            Icmpv4Repr::EchoRequest {
                ident: 0x1234,
                seq_no: 7,
                data: b"ping data"
            }
        );
    }
}
