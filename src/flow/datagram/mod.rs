//! UDP and ping flows without I/O: the flow table, idle timeouts, eviction, echo identifiers.

// One flow per client/server pair (the event loop keeps its outbound socket in `io`: a
// connected UDP socket, or a raw ICMP socket per ping), idle timeouts, a bounded table that
// closes the longest-idle flow first, and what becomes of what the server sends (replies,
// or the ICMP errors a direct client would see: `receive`). Idle order is kept per
// timeout, so expiry and eviction are O(1). Each ping flow goes out with an echo
// identifier of its own towards its host.

mod arrival;
pub mod coalesce;
mod receive;

pub use arrival::{Arrival, split};

use std::time::Duration;

use smoltcp::time::Instant;

use super::idents::Idents;
use super::lru::Lru;
use super::table::{Id, Table};
use crate::wire::FlowKey;
use crate::wire::icmp::{Quote, Reason};

/// Idle timeout of ping flows: `ping` sends one request a second.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

/// What a flow relays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Udp,
    /// ICMP or ICMPv6 echo; the flow key's client port is the echo identifier.
    Echo,
}

/// Limits of the datagram relay.
#[derive(Clone, Debug)]
pub struct Limits {
    pub idle_timeout: Duration,
    /// Idle timeout of flows to port 53: a DNS exchange is one query and its answer.
    pub dns_timeout: Duration,
    pub max_flows: usize,
}

/// The timeouts flows are kept in idle order by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Udp,
    Dns,
    Echo,
}

const CLASSES: [Class; 3] = [Class::Udp, Class::Dns, Class::Echo];

impl Class {
    fn of(kind: Kind, key: &FlowKey) -> Class {
        match (kind, key.server.port) {
            (Kind::Echo, _) => Class::Echo,
            (Kind::Udp, 53) => Class::Dns,
            (Kind::Udp, _) => Class::Udp,
        }
    }
}

impl Limits {
    fn timeout(&self, class: Class) -> Duration {
        match class {
            Class::Echo => ECHO_TIMEOUT,
            Class::Dns => self.dns_timeout,
            Class::Udp => self.idle_timeout,
        }
    }
}

/// What the datagram relay did and dropped.
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
    /// Sends carrying more than one client datagram (UDP_SEGMENT), and the datagrams in
    /// them.
    pub super_sends_up: u64,
    pub super_send_segments_up: u64,
    /// Segmented sends the kernel refused (EIO: an egress device without checksum
    /// offload, on older kernels; EMSGSIZE: a path MTU below the segment size): their
    /// datagrams went again one by one, and the socket sends no more segmented.
    pub gso_fallbacks: u64,
    /// Server datagrams dropped because no TUN write buffer could hold them.
    pub reply_drops: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
    /// Server datagrams the kernel dropped because a flow's socket buffer was full.
    pub socket_drops: u64,
    pub echo_requests: u64,
    pub echo_replies: u64,
    /// The share of ping flows in the counts above (which count UDP and ping together).
    pub echo_flows_opened: u64,
    pub echo_datagrams_up: u64,
    pub echo_bytes_up: u64,
    pub echo_bytes_down: u64,
    /// New ping flows refused because every echo identifier towards their host was
    /// taken by other ping flows.
    pub echo_no_ident: u64,
    /// Receives that brought several server datagrams at once (UDP_GRO), and those of
    /// them written to the TUN one datagram at a time (no USO, or unequal datagrams).
    pub coalesced_receives: u64,
    pub per_datagram_fallbacks: u64,
    /// UDP super-packets written to the TUN for the kernel to split (USO), and the
    /// server datagrams in them (also counted in `datagrams_down`).
    pub super_packets_down: u64,
    pub super_packet_datagrams_down: u64,
    /// Of those super-packets, the ones written from the receive buffer, not copied.
    pub gathered_down: u64,
}

/// One flow; `io` is the event loop's (its socket), the rest is ours.
pub struct Flow<S> {
    pub io: S,
    kind: Kind,
    class: Class,
    key: FlowKey,
    /// The start of the client's latest datagram, quoted in ICMP errors.
    last_quote: Quote,
    /// Echo identifier on the outbound side (0 for UDP), unique towards the server (see
    /// `Idents`).
    echo_ident: u16,
    last_active: Instant,
    opened: Instant,
    /// Bytes relayed each way (UDP payloads, ICMP messages).
    bytes_up: u64,
    bytes_down: u64,
    /// A multishot receive is armed.
    receiving: bool,
    closing: bool,
}

impl<S> Flow<S> {
    pub fn echo_ident(&self) -> u16 {
        self.echo_ident
    }

    pub fn key(&self) -> FlowKey {
        self.key
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn opened(&self) -> Instant {
        self.opened
    }

    /// When a datagram last went either way.
    pub fn last_active(&self) -> Instant {
        self.last_active
    }

    /// Bytes relayed up (client to server) and down.
    pub fn bytes(&self) -> (u64, u64) {
        (self.bytes_up, self.bytes_down)
    }

    pub fn is_closing(&self) -> bool {
        self.closing
    }
}

/// Why a receive on a flow's socket brought no datagram, as far as the flow cares (the
/// event loop tells it so from the kernel's error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvError {
    /// Every provided buffer was in use: the receive is re-armed once they are recycled,
    /// and nothing is counted.
    NoBuffers,
    /// The kernel turned an ICMP error from the path into an error of the socket's: the
    /// client of a UDP flow is told, as a direct client would be.
    Unreachable(Reason),
    /// Anything else (a cancelled receive, an error on the path to a SOCKS5 relay).
    Other,
}

/// What to do with a flow after a server datagram (or error) arrived for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// Keep it as it is.
    Nothing,
    /// Its multishot receive ended: arm another.
    Rearm,
    /// It was closing and its receive has ended: close its socket, remove it.
    Close,
}

/// How to close a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closing {
    /// Cancel its receive first; the receive's last completion says `Received::Close`.
    Cancel,
    /// Nothing in flight: close its socket and remove it now.
    Now,
}

/// All UDP and ping flows.
pub struct Flows<S> {
    table: Table<(Kind, FlowKey), Flow<S>>,
    /// Open (not closing) flows from longest to most recently idle, one list per class.
    idle: [Lru; 3],
    /// The echo identifiers of open ping flows.
    idents: Idents,
    limits: Limits,
    pub counters: Counters,
}

impl<S> Flows<S> {
    pub fn new(limits: Limits) -> Flows<S> {
        Flows {
            table: Table::default(),
            idle: Default::default(),
            idents: Idents::default(),
            limits,
            counters: Counters::default(),
        }
    }

    /// Flows, closing ones included.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn find(&self, kind: Kind, key: FlowKey) -> Option<Id> {
        self.table.find(&(kind, key))
    }

    pub fn get(&self, id: Id) -> Option<&Flow<S>> {
        self.table.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Flow<S>> {
        self.table.iter().map(|(_, flow)| flow)
    }

    pub fn get_mut(&mut self, id: Id) -> Option<&mut Flow<S>> {
        self.table.get_mut(id)
    }

    /// The flow in `slot`, if any (for walking the table a slice at a time).
    pub fn at_slot(&self, slot: u32) -> Option<&Flow<S>> {
        self.table.get(self.table.id_at(slot)?)
    }

    /// No flow is in a slot at or past this.
    pub fn slot_end(&self) -> u32 {
        self.table.slot_end()
    }

    /// Open (not closing) UDP flows and ping flows.
    pub fn open_by_kind(&self) -> (usize, usize) {
        let echo = self.idle[Class::Echo as usize].len();
        (self.open_flows() - echo, echo)
    }

    fn lru(&mut self, class: Class) -> &mut Lru {
        &mut self.idle[class as usize]
    }

    fn open_flows(&self) -> usize {
        self.idle.iter().map(Lru::len).sum()
    }

    /// When the table is full, the longest idle flow, which the caller must close to
    /// make room for a new one (counted as evicted).
    pub fn evict_for_new(&mut self) -> Option<Id> {
        if self.open_flows() < self.limits.max_flows {
            return None;
        }
        let oldest = self
            .idle
            .iter()
            .filter_map(Lru::oldest)
            .filter_map(|slot| self.id_of(slot))
            .min_by_key(|&id| self.table.get(id).map(|flow| flow.last_active))?;
        self.counters.flows_evicted += 1;
        Some(oldest)
    }

    fn id_of(&self, slot: u32) -> Option<Id> {
        self.table.id_at(slot)
    }

    /// Whether a new flow of `kind` for `key` would be refused (counted): a ping flow
    /// when every echo identifier towards its server is taken. Asked before a flow is
    /// evicted or a socket made to make room for it.
    pub fn refuses(&mut self, kind: Kind, key: FlowKey) -> bool {
        let refused = kind == Kind::Echo && self.idents.exhausted(key.server.addr, key.client.port);
        self.counters.echo_no_ident += u64::from(refused);
        refused
    }

    /// A new flow of `kind` for `key`, whose outbound socket is `io`. A ping flow is
    /// refused (counted, `io` given back) when every echo identifier towards its server
    /// is taken.
    pub fn open(&mut self, kind: Kind, key: FlowKey, io: S, now: Instant) -> Result<Id, S> {
        let echo_ident = match kind {
            Kind::Udp => 0,
            Kind::Echo => {
                let host = key.server.addr;
                match self.idents.free(host, key.client.port) {
                    Some(ident) if self.idents.take(host, ident, key.client.port) => ident,
                    _ => {
                        self.counters.echo_no_ident += 1;
                        return Err(io);
                    }
                }
            }
        };
        let class = Class::of(kind, &key);
        let id = self.table.insert(
            (kind, key),
            Flow {
                io,
                kind,
                class,
                key,
                last_quote: Quote::of(&[]),
                echo_ident,
                last_active: now,
                opened: now,
                bytes_up: 0,
                bytes_down: 0,
                receiving: false,
                closing: false,
            },
        );
        self.lru(class).touch(id.slot);
        self.counters.flows_opened += 1;
        if kind == Kind::Echo {
            self.counters.echo_flows_opened += 1;
        }
        Ok(id)
    }

    /// `datagrams` of clients (more than one for a segmentation super-packet, or held
    /// ones), `bytes` of payload together, went out on flow `id`'s socket.
    pub fn relayed_up(&mut self, id: Id, datagrams: usize, bytes: usize) {
        let Some(flow) = self.table.get_mut(id) else {
            return;
        };
        self.counters.datagrams_up += datagrams as u64;
        self.counters.bytes_up += bytes as u64;
        flow.bytes_up += bytes as u64;
        if flow.kind == Kind::Echo {
            self.counters.echo_datagrams_up += datagrams as u64;
            self.counters.echo_bytes_up += bytes as u64;
        }
    }

    /// A client datagram for flow `id` (its start in `quote`, for ICMP errors).
    pub fn on_datagram(&mut self, id: Id, now: Instant, quote: Option<Quote>) {
        let Some(flow) = self.table.get_mut(id) else {
            return;
        };
        flow.last_active = now;
        if let Some(quote) = quote {
            flow.last_quote = quote;
        }
        let class = flow.class;
        self.lru(class).touch(id.slot);
    }

    /// Whether flow `id` needs a receive armed; if so it counts as armed from now on.
    pub fn arm_recv(&mut self, id: Id) -> bool {
        match self.table.get_mut(id) {
            Some(flow) if !flow.receiving && !flow.closing => {
                flow.receiving = true;
                true
            }
            _ => false,
        }
    }

    /// Starts closing flow `id`: it no longer takes datagrams (a new flow may take its
    /// key) and leaves the idle order.
    pub fn close(&mut self, id: Id) -> Closing {
        let Some(flow) = self.table.get_mut(id) else {
            return Closing::Now;
        };
        let was_closing = std::mem::replace(&mut flow.closing, true);
        let (class, receiving) = (flow.class, flow.receiving);
        // A closing flow relays nothing: a new ping may have its identifier.
        if flow.kind == Kind::Echo && !was_closing {
            self.idents
                .release(flow.key.server.addr, flow.echo_ident, flow.key.client.port);
        }
        self.table.forget_key(id);
        self.lru(class).remove(id.slot);
        if receiving {
            Closing::Cancel
        } else {
            Closing::Now
        }
    }

    pub fn remove(&mut self, id: Id) -> Option<Flow<S>> {
        let flow = self.table.remove(id)?;
        self.idle[flow.class as usize].remove(id.slot);
        if flow.kind == Kind::Echo && !flow.closing {
            self.idents
                .release(flow.key.server.addr, flow.echo_ident, flow.key.client.port);
        }
        Some(flow)
    }

    /// A flow idle past its timeout at `now`, if any (counted as expired; the caller
    /// closes it).
    pub fn expired(&mut self, now: Instant) -> Option<Id> {
        for class in CLASSES {
            let timeout = self.limits.timeout(class).into();
            let Some(id) = self.idle[class as usize]
                .oldest()
                .and_then(|slot| self.id_of(slot))
            else {
                continue;
            };
            if self
                .table
                .get(id)
                .is_some_and(|flow| now - flow.last_active >= timeout)
            {
                self.counters.flows_expired += 1;
                return Some(id);
            }
        }
        None
    }

    /// When the next flow will be idle past its timeout.
    pub fn next_expiry(&self) -> Option<Instant> {
        CLASSES
            .iter()
            .filter_map(|&class| {
                let slot = self.idle[class as usize].oldest()?;
                let id = self.id_of(slot)?;
                let flow = self.table.get(id)?;
                Some(flow.last_active + self.limits.timeout(class).into())
            })
            .min()
    }
}

#[cfg(test)]
mod tests;
