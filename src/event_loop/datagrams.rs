//! The loop's side of UDP and ping flows: sockets, send slots, receives, associations.

// Client datagrams are copied into send slots, and the multishot receives (into provided
// buffers shared by all flows) bring the server's datagrams back; flows that went idle
// are closed. Through a SOCKS5 upstream, each UDP flow has an association (its control
// connection is `association`'s), whose steps are carried out here.

use std::os::fd::AsFd;
use std::rc::Rc;

use smoltcp::time::Instant;
use socket2::Socket;

mod recv;
mod send;

use super::association::Association;
use super::outbound::{self, Purpose, Upstream};
use super::tun_io::{self, Frame};
use super::{MAX_TIMERS_PER_TURN, Proxy};
use crate::error::Error;
use crate::flow::Id;
use crate::flow::datagram::coalesce::{self, Batch};
use crate::flow::datagram::{Closing, Flows, Kind, Limits};
use crate::flow::upstream::{self, Deadlines, Step};
use crate::sys;
use crate::uring::{Op, Region, Ring, Token};
use crate::wire::icmp::{self, Quote};
use crate::wire::udp::MAX_DATAGRAM;
use crate::wire::{Parsed, socks5, udp};
use smoltcp::wire::IpAddress;

/// Size of each receive buffer: the kernel's header and control messages, then a
/// datagram, or several coalesced (UDP_GRO) up to 64 KiB.
const RECV_BUFFER: usize = crate::uring::RECVMSG_OVERHEAD + (64 << 10);
/// Buffers the kernel picks from for the flows' multishot receives, shared by all flows.
const RECV_BUFFERS: u16 = 256;
/// Buffer group of those buffers (the TUN reads use group 0).
pub const RECV_GROUP: u16 = 1;
/// Client datagrams waiting for their send to complete, across all flows. A send
/// completes at the next submit unless its socket buffer is full, so this many lets a
/// full turn of TUN reads without offload (512 packets) be in flight at once: with 256,
/// a burst of 1,000 new flows lost a quarter of its datagrams. Bursts beyond it (sends
/// of the previous turn still pending, USO super-packets split into many datagrams) are
/// dropped and counted (`udp-no-send-slot`). Slot pages are touched only when used.
pub const SEND_SLOTS: u16 = 512;

/// The outbound side of a datagram flow.
pub struct Outbound {
    /// The UDP (or raw ICMP) socket; through an upstream, made once the relay is known.
    pub socket: Option<Socket>,
    /// The SOCKS5 association of a UDP flow through an upstream.
    pub association: Option<Box<Association>>,
    /// The send slot gathering this turn's client datagrams, and what it holds.
    pub batch: Option<(u16, Batch)>,
    /// The socket may send segmented (until the kernel refuses it once).
    pub segmenting: bool,
    /// The socket is IPv6 (its segment limits are IPv6's): the server's family, or the
    /// relay's through an upstream, which may differ.
    pub ipv6: bool,
    /// The name a flow to a fake address goes to (`--dns fake`), its table entry held.
    pub name: Option<Rc<str>>,
}

impl Outbound {
    fn new(
        socket: Option<Socket>,
        association: Option<Box<Association>>,
        name: Option<Rc<str>>,
    ) -> Outbound {
        Outbound {
            socket,
            association,
            batch: None,
            segmenting: true,
            ipv6: false,
            name,
        }
    }
}

pub struct Datagrams {
    pub flows: Flows<Outbound>,
    slots: Region,
    free_slots: Vec<u16>,
    /// Slots filled for the datagram being handled, and their lengths, before their
    /// sends are submitted (kept to reuse its memory).
    filled: Vec<(u16, usize)>,
    /// Each slot's sends in flight.
    sending: Vec<send::Sending>,
    /// Flows that gathered client datagrams this turn.
    batched: Vec<Id>,
    /// Gathered sends of flows to submit, in order, before anything else of theirs.
    ready: Vec<(Id, u16, Batch)>,
    /// What one send may carry towards IPv4 and IPv6 servers.
    limits: [coalesce::Limits; 2],
    pub(super) interface: String,
    /// The SOCKS5 proxy UDP flows are associated through; `None`: direct.
    pub(super) upstream: Option<Upstream>,
    /// When the handshakes of associations being set up must be done.
    pub(super) deadlines: Deadlines,
    /// Client datagrams dropped for want of room among those held for associations
    /// being set up (copied to the counters when printed).
    pub not_held: u64,
    /// Fake addresses whose flows ended, for the loop to release their names.
    pub released: Vec<std::net::IpAddr>,
    /// Where the datagrams of the receive being handled lie (kept to reuse its memory).
    batch: Vec<std::ops::Range<usize>>,
}

impl Datagrams {
    pub fn new(
        limits: Limits,
        interface: String,
        upstream: Option<Upstream>,
        ring: &mut Ring,
    ) -> Result<Datagrams, Error> {
        ring.provide_buffers(RECV_GROUP, RECV_BUFFERS, RECV_BUFFER)
            .map_err(|err| Error::from_buffer_ring("register UDP receive buffers", err))?;
        let slots = Region::new(send::REGION_LEN).ok_or_else(|| {
            Error::Io(
                "allocate UDP send slots",
                std::io::ErrorKind::OutOfMemory.into(),
            )
        })?;
        Ok(Datagrams {
            flows: Flows::new(limits),
            slots,
            free_slots: (0..SEND_SLOTS).rev().collect(),
            filled: Vec::new(),
            sending: vec![send::Sending::IDLE; usize::from(SEND_SLOTS)],
            batched: Vec::new(),
            ready: Vec::new(),
            limits: send::probe(&interface),
            interface,
            upstream,
            deadlines: Deadlines::default(),
            not_held: 0,
            released: Vec::new(),
            batch: Vec::new(),
        })
    }

    /// When the next flow will be idle past its timeout, or an association past its
    /// deadline.
    pub fn next_expiry(&self) -> Option<Instant> {
        [self.flows.next_expiry(), self.deadlines.next()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Server datagrams the kernel dropped for full socket buffers, closed flows' and
    /// open ones'.
    pub fn socket_drops(&self) -> u64 {
        let open: u64 = self
            .flows
            .iter()
            .filter_map(|flow| flow.io.socket.as_ref())
            .map(socket_drops)
            .sum();
        self.flows.counters.socket_drops + open
    }

    /// Idle: the pages of the free send slots go back to the kernel.
    pub fn discard_free_slots(&mut self) {
        self.slots
            .discard_buffers(self.free_slots.iter().copied(), MAX_DATAGRAM);
    }

    /// Copies what `build` writes into a free send slot (it returns the length). False
    /// when every slot is in flight (the datagram is dropped, counted).
    fn fill(&mut self, build: impl FnOnce(&mut [u8]) -> usize) -> bool {
        let Some(slot) = self.free_slots.pop() else {
            self.flows.counters.no_send_slot += 1;
            return false;
        };
        let start = usize::from(slot) * MAX_DATAGRAM;
        let len = self
            .slots
            .with_mut(start..start + MAX_DATAGRAM, build)
            .min(MAX_DATAGRAM);
        self.filled.push((slot, len));
        true
    }

    /// Starts closing flow `id`: cancels its receive first if one is armed. Its
    /// association ends at once (its control connection's memory is the ring's to keep
    /// until its operations are done), the datagrams it held are dropped.
    pub(super) fn close(&mut self, ring: &mut Ring, id: Id) {
        self.flush_flow(ring, id);
        if let Some(association) = self.association(id) {
            association.close(ring);
            let held: Vec<u16> = association.flow.take_held().map(|(slot, _)| slot).collect();
            self.free_slots.extend(held);
        }
        match self.flows.close(id) {
            Closing::Cancel => {
                if let Some(socket) = self.flows.get(id).and_then(|flow| flow.io.socket.as_ref()) {
                    ring.cancel_fd(socket.as_fd());
                }
            }
            Closing::Now => self.finish_close(ring, id),
        }
    }

    /// Closes flow `id`'s socket and forgets the flow (its sends use slots, not its
    /// memory, so they need not be waited for).
    pub(super) fn finish_close(&mut self, ring: &mut Ring, id: Id) {
        if let Some(mut flow) = self.flows.remove(id) {
            if let Some((slot, _)) = flow.io.batch.take() {
                self.free_slots.push(slot);
            }
            if flow.io.name.is_some() {
                self.released.push(flow.key().server_addr().ip());
            }
            if let Some(socket) = flow.io.socket.take() {
                self.flows.counters.socket_drops += socket_drops(&socket);
                ring.close(socket.into());
            }
            if let Some(association) = &mut flow.io.association {
                association.close(ring);
            }
        }
    }

    /// Flow `id`'s association, if it has one.
    fn association(&mut self, id: Id) -> Option<&mut Association> {
        self.flows.get_mut(id)?.io.association.as_deref_mut()
    }

    /// Flow `id` was opened with an association: its control connection is connected, and
    /// its deadline recorded.
    fn associated(&mut self, ring: &mut Ring, id: Id) {
        let Some(upstream) = &self.upstream else {
            return;
        };
        let flows = &self.flows;
        let Some(association) = flows.get(id).and_then(|flow| flow.io.association.as_ref()) else {
            return;
        };
        association.connect(ring, upstream, id);
        let pending = |id| {
            flows
                .get(id)
                .and_then(|flow| flow.io.association.as_ref())
                .is_some_and(|association| association.flow.is_pending())
        };
        let deadline = association.flow.deadline();
        self.deadlines.push(deadline, id, flows.len(), pending);
    }

    /// Arms flow `id`'s multishot receive if it needs one (and has its socket).
    pub(super) fn arm_recv(&mut self, ring: &mut Ring, id: Id) {
        let has_socket =
            |flows: &Flows<Outbound>| flows.get(id).is_some_and(|flow| flow.io.socket.is_some());
        if has_socket(&self.flows)
            && self.flows.arm_recv(id)
            && let Some(socket) = self.flows.get(id).and_then(|flow| flow.io.socket.as_ref())
        {
            let token = Token::new(Op::UdpRecv, id.generation, id.slot as usize).encode();
            ring.recvmsg_multishot(socket.as_fd(), RECV_GROUP, token);
        }
    }

    /// Sends the datagrams flow `id` holds (or just filled) on its socket; without one
    /// (its association is being set up) holds them, dropping what does not fit.
    pub(super) fn send_held(&mut self, ring: &mut Ring, id: Id) {
        let Some(flow) = self.flows.get_mut(id) else {
            for (slot, _) in self.filled.drain(..) {
                self.free_slots.push(slot);
            }
            return;
        };
        if let Some(association) = &mut flow.io.association {
            self.filled.splice(0..0, association.flow.take_held());
        }
        let mut filled = std::mem::take(&mut self.filled);
        for (slot, len) in filled.drain(..) {
            let Some(flow) = self.flows.get_mut(id) else {
                self.free_slots.push(slot);
                continue;
            };
            let held = match (&flow.io.socket, &mut flow.io.association) {
                (Some(_), _) => {
                    self.submit(ring, id, slot, Batch::new(len, &coalesce::Limits::SINGLE));
                    continue;
                }
                (None, Some(association)) => association.flow.hold(slot, len),
                (None, None) => false,
            };
            if !held {
                self.free_slots.push(slot);
                self.not_held += 1;
            }
        }
        self.filled = filled;
    }
}

impl Proxy {
    /// A UDP datagram or echo request from a client (`parsed` is its demultiplexing).
    pub(super) fn on_datagram(&mut self, frame: &Frame, parsed: Parsed) {
        let now = self.now();
        let (kind, key) = match parsed {
            Parsed::Udp { key, .. } => (Kind::Udp, key),
            Parsed::Echo { key, .. } => (Kind::Echo, key),
            _ => return,
        };
        if self.answered_query(frame, &parsed, now) {
            return;
        }
        let (tx, counters) = (&mut self.stack.tx, &mut self.stats.upstream);
        if self.udp.upstream.is_some()
            && upstream::refuses(
                kind,
                self.ring
                    .buffer(tun_io::READ_GROUP, frame.bid, frame.len)
                    .map_or(&[][..], |buffer| &buffer[frame.ip_start..]),
                tx,
                counters,
                &mut self.udp.flows.counters,
            )
        {
            return;
        }
        let id = match self.udp.flows.find(kind, key) {
            Some(id) => id,
            None => {
                // Before any flow is evicted for it or a socket made.
                if self.udp.flows.refuses(kind, key) {
                    return;
                }
                // A fake destination goes by its name, held while the flow lives.
                let server_ip = key.server_addr().ip();
                let Ok(name) = self.hold_name(server_ip) else {
                    return self.refuse_unmapped(frame);
                };
                let udp = &mut self.udp;
                if let Some(evicted) = udp.flows.evict_for_new() {
                    udp.close(&mut self.ring, evicted);
                }
                let io = match &udp.upstream {
                    Some(upstream) => Association::open(upstream, &udp.interface, now)
                        .map(|association| Outbound::new(None, Some(Box::new(association)), name)),
                    None => outbound::socket(Purpose::Datagram(kind), key.server, &udp.interface)
                        .map(|socket| Outbound {
                            ipv6: matches!(key.server.addr, IpAddress::Ipv6(_)),
                            ..Outbound::new(Some(socket), None, None)
                        }),
                };
                let Ok(io) = io else {
                    udp.flows.counters.socket_errors += 1;
                    return self.release_name(server_ip);
                };
                // Refused (counted) with its socket closed here: a ping flow finds every
                // echo identifier towards its server taken.
                let Ok(id) = udp.flows.open(kind, key, io, now) else {
                    return self.release_name(server_ip);
                };
                udp.associated(&mut self.ring, id);
                id
            }
        };
        let udp = &mut self.udp;
        let Some(packet) = self
            .ring
            .buffer(tun_io::READ_GROUP, frame.bid, frame.len)
            .map(|buffer| &buffer[frame.ip_start..])
        else {
            return;
        };
        match parsed {
            Parsed::Udp {
                payload_start,
                payload_len,
                ..
            } => {
                udp.flows.on_datagram(id, now, Some(Quote::of(packet)));
                let payload = &packet[payload_start..payload_start + payload_len];
                let parts = udp::datagrams(payload, frame.udp_segment, MAX_DATAGRAM);
                let server = key.server_addr();
                let name = udp.flows.get(id).and_then(|flow| flow.io.name.clone());
                for part in parts {
                    // Through an upstream, each datagram starts with the SOCKS5 header.
                    let counters = &mut self.stats.upstream;
                    let header = match &udp.upstream {
                        None => 0,
                        Some(_) => match upstream::header_len(
                            server,
                            name.as_deref(),
                            part.len(),
                            MAX_DATAGRAM,
                            counters,
                        ) {
                            Some(header) => header,
                            None => continue,
                        },
                    };
                    let len = header + part.len();
                    let copied = udp.gather(id, len, |buffer| {
                        match (header, name.as_deref()) {
                            (0, _) => {}
                            (_, Some(name)) => {
                                socks5::udp_header_name(buffer, name.as_bytes(), server.port());
                            }
                            (_, None) => {
                                socks5::udp_header(buffer, server);
                            }
                        }
                        buffer[header..len].copy_from_slice(part);
                        len
                    });
                    if !copied {
                        break;
                    }
                }
            }
            Parsed::Echo {
                seq,
                data_start,
                data_len,
                ..
            } => {
                udp.flows.on_datagram(id, now, None);
                let ident = udp.flows.get(id).map_or(0, |flow| flow.echo_ident());
                let ipv4 = matches!(key.server.addr, IpAddress::Ipv4(_));
                let data = &packet[data_start..data_start + data_len];
                udp.flows.counters.echo_requests += 1;
                udp.fill(|buffer| icmp::echo_request(buffer, ipv4, ident, seq, data));
            }
            _ => {}
        }
        udp.submit_ready(&mut self.ring);
        udp.send_held(&mut self.ring, id);
        udp.arm_recv(&mut self.ring, id);
    }

    /// A completion on flow `id`'s control connection.
    pub(super) fn on_association_completion(&mut self, op: Op, id: Id, result: i32) {
        let Some(association) = self.udp.association(id).filter(|a| a.is_open()) else {
            return;
        };
        association.on_completion(op, result, &mut self.stats.upstream);
        self.drive_association(id);
    }

    /// Fails the handshakes of associations past their deadline.
    fn expire_associations(&mut self, now: Instant) {
        for _ in 0..MAX_TIMERS_PER_TURN {
            let Some(id) = self.udp.deadlines.pop_due(now) else {
                break;
            };
            if let Some(association) = self.udp.association(id) {
                association.flow.expire(now);
                self.drive_association(id);
            }
        }
    }

    /// Carries out what flow `id`'s association asks for next: I/O on its control
    /// connection, closing the flow, or opening its socket to the relay and sending what
    /// was held.
    fn drive_association(&mut self, id: Id) {
        let udp = &mut self.udp;
        let Some(association) = udp.association(id) else {
            return;
        };
        let relay = match association.drive(&mut self.ring, id, &mut self.stats.upstream) {
            Step::Wait | Step::Io(_) => return,
            Step::Close => return udp.close(&mut self.ring, id),
            Step::Open(relay) => relay,
        };
        let purpose = Purpose::Datagram(Kind::Udp);
        let socket = match outbound::socket(purpose, relay.into(), &udp.interface) {
            Ok(socket) => socket,
            Err(_) => {
                udp.flows.counters.socket_errors += 1;
                return udp.close(&mut self.ring, id);
            }
        };
        if let Some(flow) = udp.flows.get_mut(id) {
            flow.io.socket = Some(socket);
            flow.io.ipv6 = relay.is_ipv6();
        }
        self.stats.upstream.associations += 1;
        udp.send_held(&mut self.ring, id);
        udp.arm_recv(&mut self.ring, id);
    }

    /// Closes datagram flows idle past their timeout, and associations not set up by
    /// their deadline.
    pub(super) fn expire_datagrams(&mut self, now: Instant) {
        let mut released = std::mem::take(&mut self.udp.released);
        for addr in released.drain(..) {
            self.release_name(addr);
        }
        self.udp.released = released;
        self.expire_associations(now);
        for _ in 0..MAX_TIMERS_PER_TURN {
            let Some(id) = self.udp.flows.expired(now) else {
                break;
            };
            self.udp.close(&mut self.ring, id);
        }
    }
}

/// What the kernel dropped for `socket` (0 if it cannot say).
fn socket_drops(socket: &Socket) -> u64 {
    sys::socket_drops(socket.as_fd()).map_or(0, u64::from)
}
