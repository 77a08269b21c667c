//! A UDP flow's SOCKS5 association without I/O: its handshake, held datagrams and headers.

// One association per UDP flow: its TCP control connection carries the handshake (UDP
// ASSOCIATE) and then stays open for the association's life, its closing ending the flow;
// the client datagrams are held until the relay's address is known; each datagram to the
// relay starts with the SOCKS5 UDP header, and only whole datagrams from the flow's server
// come back. The event loop owns the control connection, its scratch bytes and the
// datagram socket, and carries out the `Step`s.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::rc::Rc;

use smoltcp::time::Instant;

use super::{Counters, Handshake, Io};
use crate::flow::datagram::{self, Kind, RecvError};
use crate::flow::{Id, IoError};
use crate::stack::{Claim, TxPool};
use crate::wire::icmp::{self, Quote, Reason};
use crate::wire::socks5::{self, Bound, Command, Credentials, UdpError};

/// Client datagrams held per flow while its association is set up (a DNS query and its
/// retries; a burst beyond it is dropped, counted).
const HELD: usize = 4;
/// Where the control connection is watched for its end (in its scratch bytes), once the
/// handshake is done.
pub const WATCH: Range<usize> = 0..64;

/// What the event loop is to do for an association next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing until the next completion or deadline.
    Wait,
    /// Start this I/O on the control connection.
    Io(Io),
    /// Close the flow: the association failed or ended (counted).
    Close,
    /// The relay is known: open the flow's socket to it, watch the control connection (a
    /// receive into `WATCH`), and send what is held.
    Open(SocketAddr),
}

/// A UDP flow's association.
pub struct Association {
    handshake: Handshake,
    /// The upstream's address, which a relay given as "unspecified" is at.
    upstream: SocketAddr,
    /// Send slots (and lengths) of client datagrams waiting for the relay's address.
    held: [(u16, usize); HELD],
    held_len: usize,
    /// The relay is known and the control connection watched.
    watching: bool,
    /// The upstream closed the control connection (or sent on it) after the handshake.
    ended: bool,
    /// `Step::Close` was given.
    closed: bool,
}

impl Association {
    /// An association through the upstream at `upstream`, whose handshake must be done by
    /// `deadline`; it starts once its control connection is made.
    pub fn new(
        upstream: SocketAddr,
        credentials: Option<Rc<Credentials>>,
        deadline: Instant,
    ) -> Association {
        // The address our datagrams will come from is not known yet (the relay's family
        // decides the socket's): all zeros, as RFC 1928 says.
        let unknown = match upstream {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let target = SocketAddr::new(unknown, 0);
        Association {
            handshake: Handshake::new(Command::UdpAssociate, target, credentials, deadline),
            upstream,
            held: [(0, 0); HELD],
            held_len: 0,
            watching: false,
            ended: false,
            closed: false,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.handshake.deadline()
    }

    /// The handshake is still under way.
    pub fn is_pending(&self) -> bool {
        self.handshake.outcome().is_none()
    }

    /// The control connection was made, or not.
    pub fn on_connected(&mut self, result: Result<(), IoError>) {
        self.handshake.on_connected(result);
    }

    /// A send on the control connection finished.
    pub fn on_sent(&mut self, result: Result<usize, IoError>) {
        self.handshake.on_sent(result);
    }

    /// A receive on the control connection finished (`scratch`: its bytes): part of the
    /// handshake's reply, or the end of the watch, when the upstream closed the connection
    /// or sent on it (RFC 1928 has no use for that): the association is over.
    pub fn on_received(
        &mut self,
        scratch: &[u8],
        result: Result<usize, IoError>,
        counters: &mut Counters,
    ) {
        if self.handshake.receiving() {
            self.handshake.on_received(scratch, result);
        } else if self.watching && !self.ended {
            self.ended = true;
            counters.associations_ended += 1;
        }
    }

    /// At `now` past the deadline an unfinished handshake fails.
    pub fn expire(&mut self, now: Instant) {
        self.handshake.expire(now);
    }

    /// What to do next; the handshake's requests are written into `scratch` (its
    /// `SCRATCH` bytes), a failure is counted in `counters`.
    pub fn poll(&mut self, scratch: &mut [u8], counters: &mut Counters) -> Step {
        if self.closed {
            return Step::Wait;
        }
        let step = match self.handshake.outcome() {
            None => Step::Io(self.handshake.pump(scratch)),
            Some(Err(fault)) => {
                counters.count(fault);
                Step::Close
            }
            Some(Ok(_)) if self.ended => Step::Close,
            Some(Ok(Bound::Addr(relay))) if !self.watching => {
                self.watching = true;
                // "Wherever you reached me": the upstream's own address.
                let ip = match relay.ip().is_unspecified() {
                    true => self.upstream.ip(),
                    false => relay.ip(),
                };
                Step::Open(SocketAddr::new(ip, relay.port()))
            }
            // Waiting for the end; the handshake refuses a relay given by name.
            Some(Ok(_)) => Step::Wait,
        };
        self.closed = step == Step::Close;
        step
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
}

/// Whether a client's datagram of `kind` (the IP packet `request`) is refused through the
/// upstream: pings are, as ICMP cannot go through SOCKS5 and going around the upstream
/// would leak them. The client is told at once, the answer to the request just read (like
/// smoltcp's RST to a SYN: one per packet from the TUN, so it may take the reserve).
pub fn refuses(
    kind: Kind,
    request: &[u8],
    tx: &mut TxPool,
    counters: &mut Counters,
    flows: &mut datagram::Counters,
) -> bool {
    if kind != Kind::Echo {
        return false;
    }
    counters.echo_refused += 1;
    let quote = Quote::of(request);
    let reply = |buf: &mut [u8]| icmp::unreachable(buf, &quote, Reason::Prohibited);
    if !tx.emit(Claim::Reply, reply) {
        flows.reply_drops += 1;
    }
    true
}

/// Where datagrams for `server` (by `name`, if it has one) go through the relay: the
/// header's length, or `None` if
/// `payload` bytes would not fit in one datagram of at most `max` with it (dropped,
/// counted in `counters`).
pub fn header_len(
    server: SocketAddr,
    name: Option<&str>,
    payload: usize,
    max: usize,
    counters: &mut Counters,
) -> Option<usize> {
    let header = match name {
        Some(name) => socks5::udp_header_name_len(name.as_bytes()),
        None => socks5::udp_header_len(&server),
    };
    let fits = header + payload <= max;
    counters.udp_too_big += u64::from(!fits);
    fits.then_some(header)
}

/// What a receive from the relay (`result`: its bytes, and their UDP_GRO segment size
/// when it coalesced several datagrams) is for a flow to `server`: its bytes, with
/// `ranges` filled with the payloads of the server's whole datagrams in it, each
/// relay's header off (others dropped, counted in `counters`: `ranges` may end empty).
pub fn from_relay<'d>(
    result: Result<(&'d [u8], Option<u16>), RecvError>,
    server: SocketAddr,
    by_name: bool,
    ranges: &mut Vec<Range<usize>>,
    counters: &mut Counters,
) -> Result<&'d [u8], RecvError> {
    let (bytes, segment_size) = result.map_err(relay_error)?;
    datagram::split(bytes, segment_size, ranges);
    ranges.retain_mut(|range| {
        let Some(payload) = strip(&bytes[range.clone()], server, by_name, counters) else {
            return false;
        };
        range.start = range.end - payload.len();
        true
    });
    Ok(bytes)
}

/// The payload of datagram `datagram` from the relay if it is one from `server`, else
/// `None` (dropped, counted in `counters`).
fn strip<'d>(
    datagram: &'d [u8],
    server: SocketAddr,
    by_name: bool,
    counters: &mut Counters,
) -> Option<&'d [u8]> {
    // A server asked for by name answers from an address only the upstream knows.
    let from_server = |source: SocketAddr| {
        (by_name || source.ip().to_canonical() == server.ip()) && source.port() == server.port()
    };
    match socks5::udp_datagram(datagram) {
        Ok((source, start)) if from_server(source) => Some(&datagram[start..]),
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

/// What a failed receive from the relay is for the flow: errors come from the path to the
/// relay, not from the server, so the client is not told of them as ICMP errors (a lack of
/// buffers keeps its meaning).
fn relay_error(error: RecvError) -> RecvError {
    match error {
        RecvError::NoBuffers => RecvError::NoBuffers,
        _ => RecvError::Other,
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

    /// Flow `id`'s association must be set up by `at`. Deadlines of flows closed (or set
    /// up) before them stay queued until they come due: with many short flows (a DNS
    /// query each) and a long --connect-timeout they would pile up, so once they outnumber
    /// the `flows` twice only those still `pending` are kept.
    pub fn push(&mut self, at: Instant, id: Id, flows: usize, pending: impl Fn(Id) -> bool) {
        if self.0.len() >= 2 * flows.max(MIN_COMPACTED) {
            self.0.retain(|&(_, id)| pending(id));
        }
        self.0.push_back((at, id));
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

#[cfg(test)]
mod tests;
