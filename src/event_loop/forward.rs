//! The loop's side of DNS queries forwarded to `--dns-server` over TCP through the
//! SOCKS5 upstream: their connections, scratch bytes and deadlines.

// Each exchange is one connection (`upstream::Forward` says what to send and receive);
// a bounded number run at once, and one past its deadline is failed. Replies go back to
// the client as UDP from the address it asked.

use std::net::SocketAddr;
use std::os::fd::AsFd;

use smoltcp::time::Instant;
use socket2::Socket;

use super::dns_tcp::{ConnId, Conns};
use super::outbound::{self, Purpose, Upstream};
use super::{MAX_TIMERS_PER_TURN, Proxy};
use crate::flow::Id;
use crate::flow::upstream::{FORWARD_SCRATCH, Forward, Target};
use crate::stack::{Claim, TxPool};
use crate::stats::DnsStats;
use crate::uring::{Op, Region, Ring, Token};
use crate::wire::socks5::Command;
use crate::wire::{FlowKey, dns, udp};

/// Forwarded queries in flight at most; more are dropped (counted), the client asks
/// again.
pub const MAX_FORWARDS: usize = 32;

/// One query on its way.
struct Exchange {
    socket: Socket,
    /// What the ring sends from and receives into.
    scratch: Region,
    forward: Forward,
    /// Where the reply goes.
    client: Client,
    generation: u32,
}

/// Who asked a forwarded query.
#[derive(Clone, Copy, Debug)]
pub enum Client {
    /// A UDP datagram of this flow (its server: the address asked), and the largest
    /// reply the client takes over UDP (512 bytes, or what its EDNS record says).
    Udp(FlowKey, u16),
    /// A DNS-over-TCP connection.
    Tcp(ConnId),
}

/// Forwarded queries.
pub struct Forwards {
    /// `--dns-server`.
    server: SocketAddr,
    slots: Vec<Option<Exchange>>,
    /// Exchanges whose connection is to be started, once the packet they came in is
    /// let go of.
    pending: Vec<usize>,
    generation: u32,
    /// Scratch of finished exchanges (nothing in flight on it), reused rather than a
    /// ~70 KiB mapping made and unmapped per query; at most `MAX_FORWARDS`, dropped when
    /// the loop goes quiet.
    spare: Vec<Region>,
}

impl Forwards {
    pub fn new(server: SocketAddr) -> Forwards {
        Forwards {
            server,
            slots: (0..MAX_FORWARDS).map(|_| None).collect(),
            pending: Vec::new(),
            generation: 0,
            spare: Vec::new(),
        }
    }

    /// The earliest deadline of an exchange.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .iter()
            .flatten()
            .map(|exchange| exchange.forward.deadline())
            .min()
    }

    /// Whether a query of DNS-over-TCP connection `conn` is being forwarded.
    pub fn serves(&self, conn: ConnId) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|exchange| matches!(exchange.client, Client::Tcp(c) if c == conn))
    }

    /// Takes `query` from `client` to forward through `upstream` (its
    /// socket bound to `interface`); its connect starts with `connect_pending`. Counted
    /// and dropped when every slot is taken or no socket can be had.
    pub fn start(
        &mut self,
        query: &[u8],
        client: Client,
        upstream: &Upstream,
        interface: &str,
        now: Instant,
        counters: &mut DnsStats,
    ) {
        let Some(slot) = self.slots.iter().position(Option::is_none) else {
            counters.forward_busy += 1;
            return;
        };
        let socket = outbound::socket(Purpose::Tcp, upstream.server.into(), interface);
        let scratch = self.spare.pop().or_else(|| Region::new(FORWARD_SCRATCH));
        let (Ok(socket), Some(scratch)) = (socket, scratch) else {
            counters.forward_failed += 1;
            return;
        };
        let handshake = upstream.handshake(Command::Connect, Target::Addr(self.server), now);
        let forward = scratch.with_mut(0..FORWARD_SCRATCH, |bytes| {
            Forward::new(handshake, query, bytes)
        });
        let Some(forward) = forward else {
            self.spare.push(scratch);
            counters.forward_failed += 1;
            return;
        };
        self.generation = self.generation.wrapping_add(1);
        self.slots[slot] = Some(Exchange {
            socket,
            scratch,
            forward,
            client,
            generation: self.generation,
        });
        self.pending.push(slot);
    }

    /// Starts the connects of the exchanges `start` took.
    pub fn connect_pending(&mut self, ring: &mut Ring, upstream: &Upstream) {
        for slot in self.pending.drain(..) {
            if let Some(exchange) = &self.slots[slot] {
                let token = token(Op::DnsConnect, slot, exchange.generation);
                let fd = exchange.socket.as_fd();
                ring.connect(fd, upstream.server, upstream.timeout, token);
            }
        }
    }

    /// The exchange of slot `id` if it is still the one the completion was for.
    fn get(&mut self, id: Id) -> Option<&mut Exchange> {
        self.slots
            .get_mut(id.slot as usize)?
            .as_mut()
            .filter(|exchange| exchange.generation & GENERATION == id.generation)
    }

    /// A completion of `op` for exchange `id`, with `result`.
    fn on_completion(&mut self, op: Op, id: Id, result: i32) -> bool {
        let Some(exchange) = self.get(id) else {
            return false;
        };
        let outcome = outbound::completion(result);
        let forward = &mut exchange.forward;
        match op {
            Op::DnsConnect => forward.on_connected(outcome.map(drop)),
            Op::DnsSend => forward.on_sent(outcome),
            _ => exchange.scratch.with_mut(0..FORWARD_SCRATCH, |bytes| {
                forward.on_received(bytes, outcome)
            }),
        }
        true
    }

    /// Carries out what the exchange in `slot` asks for next: I/O, or its end (the
    /// reply sent to the client, or the failure counted) and its connection closed.
    fn drive(&mut self, ring: &mut Ring, slot: usize, to: To<'_>) {
        let Some(exchange) = self.slots[slot].as_mut() else {
            return;
        };
        match exchange.forward.outcome() {
            Some(Ok(reply)) => match exchange.client {
                Client::Udp(client, limit) => {
                    // Longer than the client takes: cut to its question with TC set, and
                    // it asks again over TCP.
                    let sent = exchange.scratch.with_mut(reply, |reply| {
                        let len = dns::truncate(reply, usize::from(limit))?;
                        let reply = &reply[..len];
                        Some(
                            to.tx
                                .emit(Claim::Reply, |buf| udp::reply(buf, client, reply)),
                        )
                    });
                    match sent {
                        Some(true) => {}
                        Some(false) => to.counters.reply_drops += 1,
                        None => to.counters.forward_failed += 1,
                    }
                }
                Client::Tcp(conn) => {
                    exchange
                        .scratch
                        .with_mut(reply, |reply| to.conns.queue(conn, reply, to.counters));
                    to.conns.pump(ring, conn.slot);
                }
            },
            Some(Err(_)) => to.counters.forward_failed += 1,
            None => {
                let (forward, scratch) = (&mut exchange.forward, &exchange.scratch);
                let io = scratch.with_mut(0..FORWARD_SCRATCH, |bytes| forward.pump(bytes));
                let tokens =
                    [Op::DnsSend, Op::DnsRecv].map(|op| token(op, slot, exchange.generation));
                outbound::start_io(ring, exchange.socket.as_fd(), scratch, &io, tokens);
                return;
            }
        }
        // Done: what is still in flight is cancelled; the ring keeps the scratch bytes
        // until it completes.
        if let Some(exchange) = self.slots[slot].take() {
            if exchange.forward.inflight() > 0 {
                ring.cancel_fd(exchange.socket.as_fd());
            } else if self.spare.len() < MAX_FORWARDS {
                self.spare.push(exchange.scratch);
            }
            ring.close(exchange.socket.into());
        }
    }

    /// Lets go of the spare scratch (the loop is quiet).
    pub fn drop_spares(&mut self) {
        self.spare = Vec::new();
    }
}

/// Where replies go: the TUN for UDP clients, the connections of TCP ones; and the
/// counters.
pub struct To<'a> {
    pub tx: &'a mut TxPool,
    pub conns: &'a mut Conns,
    pub counters: &'a mut DnsStats,
}

/// The generation bits a token keeps.
const GENERATION: u32 = crate::uring::token::GENERATION_MASK;

fn token(op: Op, slot: usize, generation: u32) -> u64 {
    Token::new(op, generation, slot).encode()
}

impl Proxy {
    /// A completion of a forwarded query's connection.
    pub(super) fn on_forward_completion(&mut self, op: Op, id: Id, result: i32) {
        let Some(dns) = &mut self.dns else {
            return;
        };
        let Some(forwards) = &mut dns.forwards else {
            return;
        };
        if forwards.on_completion(op, id, result) {
            let to = To {
                tx: &mut self.stack.tx,
                conns: &mut dns.conns,
                counters: &mut dns.counters,
            };
            forwards.drive(&mut self.ring, id.slot as usize, to);
        }
    }

    /// Starts the connects of queries taken for forwarding, and fails those past
    /// their deadline.
    pub(super) fn service_forwards(&mut self, now: Instant) {
        let Some(dns) = &mut self.dns else {
            return;
        };
        let Some(forwards) = &mut dns.forwards else {
            return;
        };
        if let Some(upstream) = &self.udp.upstream {
            forwards.connect_pending(&mut self.ring, upstream);
        }
        for slot in 0..MAX_FORWARDS.min(MAX_TIMERS_PER_TURN) {
            let due = forwards.slots[slot]
                .as_mut()
                .filter(|exchange| exchange.forward.deadline() <= now);
            if let Some(exchange) = due {
                exchange.forward.expire(now);
                let to = To {
                    tx: &mut self.stack.tx,
                    conns: &mut dns.conns,
                    counters: &mut dns.counters,
                };
                forwards.drive(&mut self.ring, slot, to);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Socks5;
    use crate::wire::Offload;

    #[test]
    fn a_finished_exchange_leaves_its_scratch_for_the_next() {
        let mut ring = Ring::new().expect("io_uring");
        let socks5 = Socks5 {
            host: "127.0.0.1".into(),
            port: 9,
            credentials: None,
        };
        let upstream = Upstream::new(
            "127.0.0.1:9".parse().unwrap(),
            &socks5,
            Duration::from_secs(1),
        );
        let mut forwards = Forwards::new("127.0.0.1:53".parse().unwrap());
        let (mut tx, mut conns) = (
            TxPool::new(4, 1500, Offload::None).unwrap(),
            Conns::default(),
        );
        let mut counters = DnsStats::default();
        let query = [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 1];
        let client = Client::Tcp(ConnId {
            slot: 0,
            generation: 0,
        });
        for round in 0..3 {
            forwards.start(
                &query,
                client,
                &upstream,
                "lo",
                Instant::ZERO,
                &mut counters,
            );
            assert_eq!(forwards.spare.len(), 0, "round {round}: the spare is taken");
            let late = Instant::from_secs(10);
            forwards.slots[0].as_mut().unwrap().forward.expire(late);
            let to = To {
                tx: &mut tx,
                conns: &mut conns,
                counters: &mut counters,
            };
            forwards.drive(&mut ring, 0, to);
            assert!(forwards.slots[0].is_none());
            assert_eq!(forwards.spare.len(), 1, "round {round}: kept");
        }
        assert_eq!(counters.forward_failed, 3);
        forwards.drop_spares();
        assert!(forwards.spare.is_empty());
    }
}
