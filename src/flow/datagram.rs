//! UDP and ping flows, without I/O: one per client/server pair (the event loop keeps
//! its outbound socket in `io`: a connected UDP socket, or a raw ICMP socket per ping),
//! idle timeouts, a bounded table that closes the longest-idle flow first, and what
//! becomes of what the server sends (replies, or the ICMP errors a direct client would
//! see). Idle order is kept per timeout, so expiry and eviction are O(1). Each ping flow
//! goes out with an echo identifier of its own towards its host.

use std::time::Duration;

use nix::errno::Errno;
use smoltcp::time::Instant;

use super::idents::Idents;
use super::lru::Lru;
use super::table::{Id, Table};
use crate::stack::{Claim, TxPool};
use crate::wire::icmp::{self, EchoReply, Quote, Reason};
use crate::wire::{FlowKey, udp};

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

    /// A completion of flow `id`'s receive: a server datagram, or the error the kernel
    /// turned an ICMP error from the path into; `more` says whether the receive stays
    /// armed. Replies and errors for the client go into `tx`.
    pub fn on_received(
        &mut self,
        id: Id,
        now: Instant,
        result: Result<&[u8], Errno>,
        more: bool,
        tx: &mut TxPool,
    ) -> Received {
        let Some(flow) = self.table.get_mut(id) else {
            return Received::Nothing;
        };
        if !more {
            flow.receiving = false;
        }
        if flow.closing {
            return if flow.receiving {
                Received::Nothing
            } else {
                Received::Close
            };
        }
        match result {
            Ok(datagram) => {
                flow.last_active = now;
                let class = flow.class;
                let emitted = match flow.kind {
                    Kind::Udp => {
                        Some(tx.emit(Claim::Egress, |buf| udp::reply(buf, flow.key, datagram)))
                    }
                    Kind::Echo => {
                        let (key, ident) = (flow.key, flow.echo_ident);
                        // Whose reply it is does not depend on the buffer: ask first, so a
                        // reply dropped for want of a buffer is counted as one.
                        if icmp::echo_reply(&mut [], key, ident, datagram) == EchoReply::NotOurs {
                            None
                        } else {
                            let written = tx.emit(Claim::Egress, |buf| {
                                match icmp::echo_reply(buf, key, ident, datagram) {
                                    EchoReply::Written(len) => Some(len),
                                    _ => None,
                                }
                            });
                            self.counters.echo_replies += u64::from(written);
                            Some(written)
                        }
                    }
                };
                match emitted {
                    Some(true) => {
                        let len = datagram.len() as u64;
                        self.counters.datagrams_down += 1;
                        self.counters.bytes_down += len;
                        flow.bytes_down += len;
                        if flow.kind == Kind::Echo {
                            self.counters.echo_bytes_down += len;
                        }
                    }
                    Some(false) => self.counters.reply_drops += 1,
                    // Not for this flow (another ping's reply, an ICMP error): ignored.
                    None => {}
                }
                self.idle[class as usize].touch(id.slot);
            }
            // Every provided buffer was in use: re-armed once they are recycled.
            Err(Errno::ENOBUFS) => {}
            Err(errno) => {
                // The flow stays, as a direct client's socket would, and keeps receiving.
                self.counters.recv_errors += 1;
                let reason = match errno {
                    Errno::ECONNREFUSED => Some(Reason::Port),
                    Errno::EHOSTUNREACH => Some(Reason::Host),
                    Errno::ENETUNREACH => Some(Reason::Network),
                    _ => None,
                };
                if let Some(reason) = reason
                    && flow.kind == Kind::Udp
                    && !tx.emit(Claim::Egress, |buf| {
                        icmp::unreachable(buf, &flow.last_quote, reason)
                    })
                {
                    self.counters.reply_drops += 1;
                }
            }
        }
        let flow = &self.table.get(id).expect("looked up above");
        if !flow.receiving && !flow.closing {
            Received::Rearm
        } else {
            Received::Nothing
        }
    }

    /// A completion of flow `id`'s receive that brought nothing for the client (the
    /// caller dropped its datagram): only whether to re-arm or close.
    pub fn on_dropped(&mut self, id: Id, more: bool) -> Received {
        let Some(flow) = self.table.get_mut(id) else {
            return Received::Nothing;
        };
        if !more {
            flow.receiving = false;
        }
        match (flow.receiving, flow.closing) {
            (false, true) => Received::Close,
            (false, false) => Received::Rearm,
            (true, _) => Received::Nothing,
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
mod tests {
    use super::*;
    use crate::wire::demux::tests::v4;
    use crate::wire::{Offload, Parsed, parse};

    fn limits(max_flows: usize) -> Limits {
        Limits {
            idle_timeout: Duration::from_secs(60),
            dns_timeout: Duration::from_secs(10),
            max_flows,
        }
    }

    fn key(client_port: u16, server_port: u16) -> FlowKey {
        FlowKey {
            client: v4([10, 0, 0, 1], client_port),
            server: v4([10, 0, 0, 2], server_port),
        }
    }

    fn at(secs: u64) -> Instant {
        Instant::from_secs(secs as i64)
    }

    /// The packets `tx` holds for the client, taken.
    fn ready(tx: &mut TxPool) -> Vec<Vec<u8>> {
        let mut packets = Vec::new();
        tx.take_ready(|_, slice| packets.push(slice.region.with_mut(slice.range, |b| b.to_vec())));
        packets
    }

    #[test]
    fn idle_flows_expire_after_their_own_timeout() {
        let mut flows: Flows<()> = Flows::new(limits(100));
        let web = flows.open(Kind::Udp, key(1000, 443), (), at(0)).unwrap();
        let dns = flows.open(Kind::Udp, key(1001, 53), (), at(0)).unwrap();
        let ping = flows.open(Kind::Echo, key(7, 0), (), at(0)).unwrap();
        assert_eq!(flows.next_expiry(), Some(at(10)), "DNS and ping go first");
        assert_eq!(flows.expired(at(9)), None);
        let mut gone = Vec::new();
        while let Some(id) = flows.expired(at(10)) {
            assert_eq!(flows.close(id), Closing::Now);
            flows.remove(id);
            gone.push(id);
        }
        gone.sort();
        let mut expected = vec![dns, ping];
        expected.sort();
        assert_eq!(gone, expected);
        // Traffic keeps a flow alive: a datagram at 50 s moves its expiry to 110 s.
        flows.on_datagram(web, at(50), None);
        assert_eq!(flows.expired(at(60)), None);
        assert_eq!(flows.next_expiry(), Some(at(110)));
        assert_eq!(flows.expired(at(110)), Some(web));
        assert_eq!(flows.counters.flows_expired, 3);
    }

    #[test]
    fn a_full_table_evicts_the_longest_idle_flow() {
        let mut flows: Flows<()> = Flows::new(limits(3));
        let a = flows.open(Kind::Udp, key(1, 443), (), at(1)).unwrap();
        let b = flows.open(Kind::Udp, key(2, 53), (), at(2)).unwrap();
        let c = flows.open(Kind::Echo, key(3, 0), (), at(3)).unwrap();
        assert_eq!(flows.evict_for_new(), Some(a));
        flows.on_datagram(a, at(4), None);
        assert_eq!(flows.evict_for_new(), Some(b), "a was used again");
        flows.close(b);
        assert_eq!(flows.evict_for_new(), None, "closing flows leave room");
        assert_eq!(
            flows.find(Kind::Udp, key(2, 53)),
            None,
            "its key is free again"
        );
        assert!(
            flows.get(b).is_some(),
            "but it is there until its socket is closed"
        );
        let _ = c;
        assert_eq!(flows.counters.flows_evicted, 2);
    }

    #[test]
    fn a_flow_with_a_receive_armed_is_closed_after_its_cancel() {
        let mut flows: Flows<()> = Flows::new(limits(8));
        let mut tx = TxPool::new(4, 1500, Offload::None).unwrap();
        let id = flows.open(Kind::Udp, key(1, 443), (), at(0)).unwrap();
        assert!(flows.arm_recv(id));
        assert!(!flows.arm_recv(id), "one receive at a time");
        assert_eq!(flows.close(id), Closing::Cancel);
        let last = flows.on_received(id, at(1), Err(Errno::ECANCELED), false, &mut tx);
        assert_eq!(last, Received::Close);
    }

    #[test]
    fn server_datagrams_become_replies_and_errors_become_icmp() {
        let mut flows: Flows<()> = Flows::new(limits(8));
        let mut tx = TxPool::new(4, 1500, Offload::None).unwrap();
        let k = key(5353, 53);
        let id = flows.open(Kind::Udp, k, (), at(0)).unwrap();
        let query = crate::wire::demux::tests::udp_packet(k.client, k.server, b"query");
        flows.on_datagram(id, at(0), Some(Quote::of(&query)));
        flows.arm_recv(id);
        let kept = flows.on_received(id, at(1), Ok(b"answer"), true, &mut tx);
        assert_eq!(kept, Received::Nothing, "the multishot receive stays armed");
        let refused = flows.on_received(id, at(2), Err(Errno::ECONNREFUSED), false, &mut tx);
        assert_eq!(refused, Received::Rearm);
        let packets = ready(&mut tx);
        assert_eq!(packets.len(), 2);
        let Parsed::Udp { key: back, .. } = parse(&packets[0]) else {
            panic!("the reply is not UDP");
        };
        assert_eq!((back.client, back.server), (k.server, k.client));
        let icmp = &packets[1][20..];
        assert_eq!(
            (icmp[0], icmp[1]),
            (3, 3),
            "port unreachable for the client"
        );
        assert_eq!(flows.counters.datagrams_down, 1);
        assert_eq!(flows.counters.recv_errors, 1);
        assert_eq!(flows.get(id).unwrap().bytes(), (0, 6), "the answer's bytes");
    }

    #[test]
    fn an_empty_server_datagram_becomes_an_empty_reply() {
        let mut flows: Flows<()> = Flows::new(limits(8));
        let mut tx = TxPool::new(4, 1500, Offload::None).unwrap();
        let k = key(4000, 7);
        let id = flows.open(Kind::Udp, k, (), at(0)).unwrap();
        flows.arm_recv(id);
        // A receive of 0 bytes ends the multishot receive: re-armed, not an error.
        let empty = flows.on_received(id, at(1), Ok(b""), false, &mut tx);
        assert_eq!(empty, Received::Rearm);
        let packets = ready(&mut tx);
        assert_eq!(packets.len(), 1);
        let Parsed::Udp {
            key: back,
            payload_len,
            ..
        } = parse(&packets[0])
        else {
            panic!("the reply is not UDP");
        };
        assert_eq!(
            (back.client, back.server, payload_len),
            (k.server, k.client, 0)
        );
        assert_eq!(
            (flows.counters.datagrams_down, flows.counters.recv_errors),
            (1, 0)
        );
    }

    /// What a ping flow's raw ICMPv6 socket reads: an echo reply with `ident`.
    fn echo_reply_v6(ident: u16, seq: u16) -> Vec<u8> {
        let mut reply = [0u8; 64];
        let len = icmp::echo_request(&mut reply, false, ident, seq, b"data");
        reply[0] = 129;
        reply[..len].to_vec()
    }

    /// The echo identifiers of the ICMPv6 packets `tx` holds for the client.
    fn client_idents(tx: &mut TxPool) -> Vec<u16> {
        ready(tx)
            .iter()
            .map(|packet| {
                let ip = smoltcp::wire::Ipv6Packet::new_checked(&packet[..]).unwrap();
                smoltcp::wire::Icmpv6Packet::new_checked(ip.payload())
                    .unwrap()
                    .echo_ident()
            })
            .collect()
    }

    #[test]
    fn pings_to_one_host_get_their_own_identifiers_and_replies() {
        use crate::wire::demux::tests::v6;
        let mut flows: Flows<()> = Flows::new(limits(8));
        let mut tx = TxPool::new(8, 1500, Offload::None).unwrap();
        let server = v6(2, 0);
        // Client identifiers for which the identifier once derived from the flow's
        // generation and the client's (generation * 0x9e37 ^ client ^ 0x8000) was the
        // same for the first two flows: 0x8001.
        let (first, second) = (1, 0x9e37 ^ 1);
        let ping = |flows: &mut Flows<()>, ident| {
            let key = FlowKey {
                client: v6(1, ident),
                server,
            };
            flows.open(Kind::Echo, key, (), at(0)).unwrap()
        };
        let a = ping(&mut flows, first);
        let b = ping(&mut flows, second);
        let (out_a, out_b) = (
            flows.get(a).unwrap().echo_ident(),
            flows.get(b).unwrap().echo_ident(),
        );
        assert_ne!(out_a, out_b, "one identifier for two pings to one host");
        assert!(![first, second].contains(&out_a) && ![first, second].contains(&out_b));
        // Each flow's socket reads both replies; each relays only its own, with its
        // client's identifier.
        for id in [a, b] {
            flows.arm_recv(id);
            for ident in [out_a, out_b] {
                flows.on_received(id, at(1), Ok(&echo_reply_v6(ident, 5)), true, &mut tx);
            }
        }
        assert_eq!(client_idents(&mut tx), vec![first, second]);
        assert_eq!(flows.counters.echo_replies, 2);
    }

    #[test]
    fn a_ping_is_refused_when_every_identifier_to_its_host_is_taken() {
        use crate::wire::demux::tests::v6;
        let mut flows: Flows<()> = Flows::new(limits(usize::MAX));
        let pair = |client, server| FlowKey { client, server };
        let key = |client| pair(v6(1, client), v6(2, 0));
        let mut opened = Vec::new();
        let mut outbound = std::collections::HashSet::new();
        let mut refused = 0;
        let (other, another) = (pair(v6(3, 7), v6(2, 0)), pair(v6(3, 8), v6(2, 0)));
        for client in 0..=u16::MAX {
            match flows.open(Kind::Echo, key(client), (), at(0)) {
                Ok(id) => opened.push(id),
                Err(()) => refused += 1,
            }
        }
        // An identifier left only to the client it must not go to goes to another.
        if opened.len() < 65536 {
            opened.push(flows.open(Kind::Echo, other, (), at(0)).unwrap());
        }
        for &id in &opened {
            outbound.insert(flows.get(id).unwrap().echo_ident());
        }
        assert_eq!(outbound.len(), 65536, "unique identifiers");
        assert_eq!(flows.open(Kind::Echo, another, (), at(0)), Err(()));
        assert_eq!(flows.counters.echo_no_ident, refused + 1);
        // Another host has its own; a closing flow gives its identifier back, once.
        let elsewhere = pair(v6(3, 8), v6(4, 0));
        assert!(flows.open(Kind::Echo, elsewhere, (), at(0)).is_ok());
        let gone = opened[0];
        let freed = flows.get(gone).unwrap().echo_ident();
        flows.close(gone);
        let id = flows.open(Kind::Echo, another, (), at(0)).unwrap();
        assert_eq!(flows.get(id).unwrap().echo_ident(), freed);
        flows.remove(gone);
        assert_eq!(flows.open(Kind::Echo, key(9), (), at(0)), Err(()));
    }

    #[test]
    fn ping_flows_are_counted_apart_and_flows_carry_their_bytes_and_age() {
        let mut flows: Flows<()> = Flows::new(limits(8));
        let udp = flows.open(Kind::Udp, key(1, 443), (), at(3)).unwrap();
        let ping = flows.open(Kind::Echo, key(7, 0), (), at(4)).unwrap();
        flows.relayed_up(udp, 2, 2800);
        flows.relayed_up(ping, 1, 64);
        assert_eq!(flows.counters.flows_opened, 2);
        assert_eq!(flows.counters.echo_flows_opened, 1);
        assert_eq!(
            (
                flows.counters.echo_datagrams_up,
                flows.counters.echo_bytes_up
            ),
            (1, 64)
        );
        let flow = flows.get(udp).unwrap();
        assert_eq!(
            (flow.bytes(), flow.opened(), flow.kind()),
            ((2800, 0), at(3), Kind::Udp)
        );
        assert_eq!(flows.open_by_kind(), (1, 1));
        flows.close(ping);
        assert_eq!(flows.open_by_kind(), (1, 0), "a closing flow is not open");
        assert!(flows.at_slot(ping.slot).unwrap().is_closing());
        assert!(flows.at_slot(flows.slot_end()).is_none());
    }
}
