//! The loop's side of UDP flows through a SOCKS5 upstream: one association per flow,
//! whose TCP control connection carries the handshake (UDP ASSOCIATE) and then stays
//! open for the association's life, its closing ending the flow; the client datagrams
//! held until the relay's address is known; and the SOCKS5 UDP header put on what goes
//! to the relay and taken off what comes back.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;

use nix::errno::Errno;
use smoltcp::time::Instant;
use socket2::Socket;

use super::Proxy;
use super::datagrams::{Datagrams, Outbound};
use super::outbound::{self, Purpose, Upstream};
use crate::flow::Id;
use crate::flow::datagram::Kind;
use crate::flow::upstream::{Counters, Handshake, SCRATCH};
use crate::uring::{Op, Region, Ring, Slice, Token};
use crate::wire::socks5::{self, Bound, Command, UdpError};

/// Client datagrams held per flow while its association is set up (a DNS query and its
/// retries; a burst beyond it is dropped, counted).
const HELD: usize = 4;
/// Where the control connection is watched for its end, once the handshake is done.
const WATCH: std::ops::Range<usize> = 0..64;

/// A UDP flow's association.
pub struct Association {
    /// The control connection; `None` once closed.
    control: Option<Socket>,
    /// The handshake's bytes, which the ring sends from and receives into.
    scratch: Region,
    handshake: Handshake,
    /// Send slots (and lengths) of client datagrams waiting for the relay's address.
    held: [(u16, usize); HELD],
    held_len: usize,
    /// A receive on the finished control connection is in flight.
    watching: bool,
}

impl Association {
    /// Starts an association through `upstream`: the control connection's socket, bound
    /// to `interface`, to be connected on the ring.
    fn open(upstream: &Upstream, interface: &str, now: Instant) -> std::io::Result<Association> {
        let control = outbound::socket(Purpose::Tcp, upstream.server.into(), interface)?;
        let scratch = Region::new(SCRATCH).ok_or(std::io::ErrorKind::OutOfMemory)?;
        // The address our datagrams will come from is not known yet (the relay's family
        // decides the socket's): all zeros, as RFC 1928 says.
        let unknown = match upstream.server {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let target = SocketAddr::new(unknown, 0);
        Ok(Association {
            control: Some(control),
            scratch,
            handshake: upstream.handshake(Command::UdpAssociate, target, now),
            held: [(0, 0); HELD],
            held_len: 0,
            watching: false,
        })
    }

    /// Holds a filled send slot for when the relay is known; false when full.
    pub fn hold(&mut self, slot: u16, len: usize) -> bool {
        if self.held_len == HELD {
            return false;
        }
        self.held[self.held_len] = (slot, len);
        self.held_len += 1;
        true
    }

    /// The held slots, leaving none held.
    pub fn take_held(&mut self) -> impl Iterator<Item = (u16, usize)> + '_ {
        let len = std::mem::take(&mut self.held_len);
        self.held[..len].iter().copied()
    }

    /// Closes the control connection (which ends the association for the upstream),
    /// cancelling what it has in flight.
    pub fn close(&mut self, ring: &mut Ring) {
        if let Some(control) = self.control.take() {
            ring.cancel_fd(control.as_fd());
            ring.close(control.into());
        }
    }
}

/// Where datagrams for `server` go through the relay: the header's length, or `None` if
/// `payload` bytes would not fit in one datagram with it.
pub fn header_len(server: SocketAddr, payload: usize, max: usize) -> Option<usize> {
    let header = socks5::udp_header_len(&server);
    (header + payload <= max).then_some(header)
}

/// The payload of datagram `datagram` from the relay if it is one from `server`, else
/// `None` (dropped, counted in `counters`).
pub fn strip<'d>(
    datagram: &'d [u8],
    server: SocketAddr,
    counters: &mut Counters,
) -> Option<&'d [u8]> {
    match socks5::udp_datagram(datagram) {
        Ok((source, start))
            if source.ip().to_canonical() == server.ip() && source.port() == server.port() =>
        {
            Some(&datagram[start..])
        }
        Err(UdpError::Fragment) => {
            counters.udp_fragments += 1;
            None
        }
        Ok(_) | Err(UdpError::Malformed) => {
            counters.udp_malformed += 1;
            None
        }
    }
}

/// The queue of association deadlines is not compacted below this length.
const MIN_COMPACTED: usize = 64;

/// Associations whose handshake must be done by a deadline, in the order they started
/// (all take the same time, so also in deadline order).
#[derive(Default)]
pub struct Deadlines(VecDeque<(Instant, Id)>);

impl Deadlines {
    pub fn next(&self) -> Option<Instant> {
        self.0.front().map(|&(at, _)| at)
    }

    /// Once the queue holds twice as many entries as there are `flows`, keeps only
    /// those still `pending`.
    fn compact(&mut self, flows: usize, pending: impl Fn(Id) -> bool) {
        if self.0.len() >= 2 * flows.max(MIN_COMPACTED) {
            self.0.retain(|&(_, id)| pending(id));
        }
    }

    /// A flow whose deadline has come by `now`, if any.
    pub fn pop_due(&mut self, now: Instant) -> Option<Id> {
        let &(at, id) = self.0.front()?;
        (at <= now).then(|| {
            self.0.pop_front();
            id
        })
    }
}

fn token(op: Op, id: Id) -> u64 {
    Token::new(op, id.generation, id.slot as usize).encode()
}

impl Datagrams {
    /// Flow `id`'s association, if it has one.
    pub(super) fn association(&mut self, id: Id) -> Option<&mut Association> {
        self.flows.get_mut(id)?.io.association.as_deref_mut()
    }

    /// The outbound side of a new UDP flow through `upstream`: an association whose
    /// control connection is started on the ring for flow `id` (the flow is opened with
    /// it and the deadline recorded by the caller's `associated`).
    pub(super) fn associate(
        upstream: &Upstream,
        interface: &str,
        now: Instant,
    ) -> std::io::Result<Outbound> {
        Ok(Outbound {
            socket: None,
            association: Some(Box::new(Association::open(upstream, interface, now)?)),
        })
    }

    /// Flow `id` was opened with an association: its connect starts now.
    pub(super) fn associated(&mut self, ring: &mut Ring, id: Id) {
        let Some(upstream) = &self.upstream else {
            return;
        };
        // Deadlines of flows closed (or set up) before them stay queued until they come
        // due: with many short flows (a DNS query each) and a long --connect-timeout
        // they would pile up, so they are dropped once they outnumber the flows twice.
        let flows = &self.flows;
        self.deadlines.compact(flows.len(), |id| {
            flows
                .get(id)
                .and_then(|flow| flow.io.association.as_ref())
                .is_some_and(|association| association.handshake.outcome().is_none())
        });
        let Some(association) = self
            .flows
            .get(id)
            .and_then(|flow| flow.io.association.as_ref())
        else {
            return;
        };
        if let Some(control) = &association.control {
            let token = token(Op::AssociationConnect, id);
            ring.connect(control.as_fd(), upstream.server, upstream.timeout, token);
            self.deadlines
                .0
                .push_back((association.handshake.deadline(), id));
        }
    }
}

impl Proxy {
    /// A completion on flow `id`'s control connection.
    pub(super) fn on_association_completion(&mut self, op: Op, id: Id, result: i32) {
        let outcome = if result < 0 {
            Err(Errno::from_raw(-result))
        } else {
            Ok(result as usize)
        };
        let Some(association) = self
            .udp
            .association(id)
            .filter(|association| association.control.is_some())
        else {
            return;
        };
        let handshake = &mut association.handshake;
        match op {
            Op::AssociationConnect => handshake.on_connected(outcome.map(drop)),
            Op::AssociationSend => handshake.on_sent(outcome),
            _ if handshake.receiving() => association
                .scratch
                .with_mut(0..SCRATCH, |bytes| handshake.on_received(bytes, outcome)),
            _ => {
                // The watch on the finished connection: the upstream closed it (or sent
                // on it, which RFC 1928 has no use for). The association is over.
                association.watching = false;
                self.stats.upstream.associations_ended += 1;
                self.udp.close(&mut self.ring, id);
                return;
            }
        }
        self.drive_association(id);
    }

    /// Closes associating flows whose handshake is past its deadline.
    pub(super) fn expire_associations(&mut self, now: Instant) {
        for _ in 0..super::MAX_TIMERS_PER_TURN {
            let Some(id) = self.udp.deadlines.pop_due(now) else {
                break;
            };
            if let Some(association) = self.udp.association(id) {
                association.handshake.expire(now);
                self.drive_association(id);
            }
        }
    }

    /// Starts what flow `id`'s handshake asks for next, or acts on its end: a failed one
    /// closes the flow, a finished one opens the socket to the relay, sends what was
    /// held and starts watching the control connection.
    fn drive_association(&mut self, id: Id) {
        let udp = &mut self.udp;
        let Some(association) = udp
            .flows
            .get_mut(id)
            .and_then(|flow| flow.io.association.as_mut())
        else {
            return;
        };
        let Some(control) = &association.control else {
            return;
        };
        let relay = match association.handshake.outcome() {
            None => {
                let (handshake, scratch) = (&mut association.handshake, &association.scratch);
                let io = scratch.with_mut(0..SCRATCH, |bytes| handshake.pump(bytes));
                let slice = |range| Slice {
                    region: scratch.clone(),
                    range,
                };
                if let Some(range) = io.recv {
                    let token = token(Op::AssociationRecv, id);
                    self.ring.recv(control.as_fd(), slice(range), token);
                }
                if let Some(range) = io.send {
                    let token = token(Op::AssociationSend, id);
                    self.ring.send(control.as_fd(), slice(range), token);
                }
                return;
            }
            Some(Err(fault)) => {
                self.stats.upstream.count(fault);
                udp.close(&mut self.ring, id);
                return;
            }
            Some(Ok(Bound::Addr(relay))) if relay.ip().is_unspecified() => {
                // "Wherever you reached me": the upstream's own address.
                let upstream = udp.upstream.as_ref().map_or(relay, |u| u.server);
                SocketAddr::new(upstream.ip(), relay.port())
            }
            Some(Ok(Bound::Addr(relay))) => relay,
            // The handshake refuses a relay given by name.
            Some(Ok(Bound::Domain)) => return,
        };
        if association.watching {
            return;
        }
        association.watching = true;
        let watch = Slice {
            region: association.scratch.clone(),
            range: WATCH,
        };
        self.ring
            .recv(control.as_fd(), watch, token(Op::AssociationRecv, id));
        let purpose = Purpose::Datagram(Kind::Udp);
        let socket = match outbound::socket(purpose, relay.into(), &udp.interface) {
            Ok(socket) => socket,
            Err(_) => {
                udp.flows.counters.socket_errors += 1;
                udp.close(&mut self.ring, id);
                return;
            }
        };
        if let Some(flow) = udp.flows.get_mut(id) {
            flow.io.socket = Some(socket);
        }
        self.stats.upstream.associations += 1;
        udp.send_held(&mut self.ring, id);
        udp.arm_recv(&mut self.ring, id);
    }
}

/// What the kernel said of a receive from the relay, for the flow: errors come from the
/// path to the relay, not from the server, so the client is not told of them as ICMP
/// errors (ENOBUFS keeps its meaning: no buffer was free).
pub fn relay_error(errno: Errno) -> Errno {
    match errno {
        Errno::ENOBUFS => Errno::ENOBUFS,
        _ => Errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_of_gone_flows_do_not_pile_up() {
        let mut deadlines = Deadlines::default();
        let id = |slot| Id {
            slot,
            generation: 0,
        };
        // Many short flows, each closed at once.
        for slot in 0..10_000 {
            deadlines.compact(1, |_| false);
            deadlines
                .0
                .push_back((Instant::from_millis(i64::from(slot)), id(slot)));
            assert!(
                deadlines.0.len() <= 2 * MIN_COMPACTED,
                "{}",
                deadlines.0.len()
            );
        }
        // Pending ones are kept, in order.
        deadlines.0.clear();
        for slot in 0..200 {
            deadlines
                .0
                .push_back((Instant::from_millis(i64::from(slot)), id(slot)));
        }
        deadlines.compact(10, |id| id.slot % 2 == 0);
        assert_eq!(deadlines.0.len(), 100);
        assert_eq!(deadlines.pop_due(Instant::from_millis(1)), Some(id(0)));
        assert_eq!(deadlines.pop_due(Instant::from_millis(1)), None);
        assert_eq!(deadlines.next(), Some(Instant::from_millis(2)));
    }

    #[test]
    fn only_whole_datagrams_from_the_flows_server_are_relayed() {
        let server: SocketAddr = "192.0.2.53:53".parse().unwrap();
        let mut counters = Counters::default();
        let mut datagram = [0u8; 64];
        let n = socks5::udp_header(&mut datagram, server);
        datagram[n..n + 4].copy_from_slice(b"answ");
        assert_eq!(
            strip(&datagram[..n + 4], server, &mut counters),
            Some(&b"answ"[..])
        );
        let other: SocketAddr = "192.0.2.54:53".parse().unwrap();
        assert_eq!(strip(&datagram[..n + 4], other, &mut counters), None);
        datagram[2] = 1;
        assert_eq!(strip(&datagram[..n + 4], server, &mut counters), None);
        datagram[2] = 0;
        assert_eq!(strip(&datagram[..n - 1], server, &mut counters), None);
        assert_eq!(
            (counters.udp_fragments, counters.udp_malformed),
            (1, 2),
            "one fragment; one from elsewhere, one too short"
        );
        // A source the relay gives as an IPv4-mapped IPv6 address is the same server.
        let mapped: SocketAddr = "[::ffff:192.0.2.53]:53".parse().unwrap();
        let n = socks5::udp_header(&mut datagram, mapped);
        assert!(strip(&datagram[..n], server, &mut counters).is_some());
    }

    #[test]
    fn datagrams_too_big_for_the_header_are_refused() {
        let v4: SocketAddr = "192.0.2.1:9".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
        assert_eq!(header_len(v4, 100, 65507), Some(10));
        assert_eq!(header_len(v6, 100, 65507), Some(22));
        assert_eq!(header_len(v4, 65497, 65507), Some(10));
        assert_eq!(header_len(v4, 65498, 65507), None);
    }
}
