//! DNS over TCP from clients (`--dns fake`): a TCP flow to port 53 is relayed to the
//! proxy's own end of a socket pair, where its queries are cut out of the stream
//! (`flow::dns::stream`) and answered like those over UDP.

// The flow is an ordinary relayed flow whose outbound socket is one end of a Unix stream
// pair, connected from the start: no socket leaves the host, and the relay (windows,
// FIN, RST) is the one every flow has. The other end is served here: one receive and
// one send in flight at most per connection, replies queued framed in its buffer.

use std::os::fd::AsFd;

use smoltcp::time::{Duration, Instant};
use socket2::{Domain, Socket, Type};

use crate::flow::dns::stream::{self, Reassembler};
use crate::flow::upstream::MAX_QUERY;
use crate::stats::DnsStats;
use crate::uring::token::GENERATION_MASK;
use crate::uring::{Op, Region, Ring, Slice, Token};

/// Connections served at once; past it the least recently active idle one is closed for
/// the new flow (RFC 7766 6.2.3), and only with none idle is the flow refused (RST).
pub const MAX_CONNS: usize = 64;
/// Where bytes from the flow are received.
const RECV: usize = 4096;
/// Replies queued unsent past this end the connection (its client is not reading them).
const OUT: usize = 16 * 1024;
/// Where replies wait to be sent: room for one of the largest a forward returns (2 +
/// 65,535 bytes) behind less than `OUT` queued, so a single reply always fits. Mapped,
/// not touched: only a large reply makes its pages resident, and they are given back once
/// it is sent.
const OUT_AREA: usize = OUT + stream::PREFIX + u16::MAX as usize;
/// Complete queries the reassembler may hold (they are taken out at once).
const PIPELINED: usize = 4;
/// A connection with nothing queued, sent or forwarded for this long is closed (RFC 7766
/// 6.2.3 suggests seconds): a forgotten connection does not hold its slot (and the flow
/// its buffers) until a new one needs the slot.
pub const IDLE: Duration = Duration::from_secs(10);

/// A connection, by slot and generation (a completion for a slot since reused is not
/// its).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnId {
    pub slot: usize,
    pub generation: u32,
}

/// The proxy's end of one flow's pair.
struct Conn {
    socket: Socket,
    /// `[0, RECV)` receives, `[RECV, RECV + OUT_AREA)` the replies queued.
    region: Region,
    reassembler: Reassembler,
    /// Bytes queued, and of them in the send in flight.
    queued: usize,
    sending: usize,
    receiving: bool,
    /// The flow ended its side, broke the framing or let replies pile up: closed once
    /// nothing is in flight.
    ended: bool,
    generation: u32,
    /// When a query last came in or a reply last went out.
    active: Instant,
}

/// Every connection, and the queries received and not yet answered.
pub struct Conns {
    slots: Vec<Option<Conn>>,
    generation: u32,
    /// Framed queries (2-byte length, then the message) and the connection each came
    /// on, in order; the buffers are reused. Taken from the front by moving a cursor
    /// (bytes and queries taken), so a read of many queries costs linear time.
    inbox: Vec<u8>,
    inbox_from: Vec<ConnId>,
    taken: (usize, usize),
}

impl Default for Conns {
    fn default() -> Conns {
        Conns {
            slots: (0..MAX_CONNS).map(|_| None).collect(),
            generation: 0,
            inbox: Vec::new(),
            inbox_from: Vec::new(),
            taken: (0, 0),
        }
    }
}

impl Conns {
    /// A pair for a new flow: its end for the flow, ours served from now on (its first
    /// receive started). With every slot taken, the least recently active idle
    /// connection (nothing queued or sent, no query `forwarding`) is closed to make room
    /// (counted). `None` when every connection is busy or no pair can be made.
    pub fn open(
        &mut self,
        ring: &mut Ring,
        now: Instant,
        forwarding: impl Fn(ConnId) -> bool,
        counters: &mut DnsStats,
    ) -> Option<Socket> {
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(slot) => slot,
            None => {
                let slot = least_recent(self.slots.iter().enumerate().map(|(slot, conn)| {
                    let conn = conn.as_ref()?;
                    let id = ConnId {
                        slot,
                        generation: conn.generation,
                    };
                    let idle = !conn.ended && conn.queued == 0 && !forwarding(id);
                    idle.then_some(conn.active)
                }))?;
                self.evict(ring, slot);
                counters.tcp_evicted += 1;
                slot
            }
        };
        let (flow_end, ours) = Socket::pair(Domain::UNIX, Type::STREAM.cloexec(), None).ok()?;
        let region = Region::new(RECV + OUT_AREA)?;
        self.generation = self.generation.wrapping_add(1) & GENERATION_MASK;
        self.slots[slot] = Some(Conn {
            socket: ours,
            region,
            reassembler: Reassembler::new(MAX_QUERY, PIPELINED),
            queued: 0,
            sending: 0,
            receiving: false,
            ended: false,
            generation: self.generation,
            active: now,
        });
        self.pump(ring, slot);
        Some(flow_end)
    }

    /// Closes the connection in `slot` now and frees the slot: its receive (nothing else
    /// is in flight on an idle one) is cancelled, and its completion, of an older
    /// generation, is not taken for the slot's next connection. The ring keeps the bytes
    /// it receives into until then.
    fn evict(&mut self, ring: &mut Ring, slot: usize) {
        if let Some(conn) = self.slots[slot].take() {
            if conn.receiving {
                ring.cancel_fd(conn.socket.as_fd());
            }
            ring.close(conn.socket.into());
        }
    }

    fn get(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.slots
            .get_mut(id.slot)?
            .as_mut()
            .filter(|conn| conn.generation == id.generation)
    }

    /// A completion of `op` for connection `id`: a receive's queries go to the inbox
    /// (`take_query`), a send's bytes off the queue. The caller answers, then `pump`s.
    pub fn on_completion(
        &mut self,
        op: Op,
        id: ConnId,
        result: i32,
        now: Instant,
        counters: &mut DnsStats,
    ) {
        let Some(conn) = self
            .slots
            .get_mut(id.slot)
            .and_then(Option::as_mut)
            .filter(|conn| conn.generation == id.generation)
        else {
            return;
        };
        if op == Op::DnsTcpSend {
            let sent = usize::try_from(result).unwrap_or(0).min(conn.sending);
            conn.sending = 0;
            if sent == 0 {
                conn.ended = true;
                return;
            }
            conn.active = now;
            // What is left moves to the front, the replies queued since behind it.
            let queued = conn.queued;
            conn.region.with_mut(RECV..RECV + OUT_AREA, |out| {
                out.copy_within(sent..queued, 0)
            });
            conn.queued -= sent;
            if conn.queued == 0 && queued > OUT {
                // The pages only a large reply touched go back until the next one.
                conn.region.discard(RECV + OUT..RECV + OUT_AREA);
            }
            return;
        }
        conn.receiving = false;
        let len = match usize::try_from(result) {
            Ok(len) if len > 0 => len,
            _ => {
                conn.ended = true;
                return;
            }
        };
        conn.active = now;
        let (inbox, from) = (&mut self.inbox, &mut self.inbox_from);
        let (reassembler, region) = (&mut conn.reassembler, &conn.region);
        let mut taken = 0;
        while taken < len {
            match region.with_mut(taken..len, |bytes| reassembler.push(bytes)) {
                Ok(0) | Err(_) => {
                    counters.tcp_malformed += 1;
                    conn.ended = true;
                    return;
                }
                Ok(n) => taken += n,
            }
            // Taken out at once, so the reassembler always has room for the next.
            while let Some(message) = reassembler.message() {
                inbox.extend_from_slice(&(message.len() as u16).to_be_bytes());
                inbox.extend_from_slice(message);
                from.push(id);
            }
        }
    }

    /// The next query received, copied into `out`: its length and connection.
    pub fn take_query(&mut self, out: &mut [u8]) -> Option<(usize, ConnId)> {
        let (at, query) = self.taken;
        let Some(&id) = self.inbox_from.get(query) else {
            self.inbox.clear();
            self.inbox_from.clear();
            self.taken = (0, 0);
            return None;
        };
        let len = usize::from(u16::from_be_bytes([self.inbox[at], self.inbox[at + 1]]));
        let n = len.min(out.len());
        let start = at + stream::PREFIX;
        out[..n].copy_from_slice(&self.inbox[start..start + n]);
        self.taken = (start + len, query + 1);
        Some((n, id))
    }

    /// Queues `reply` framed on connection `id`; with `OUT` bytes or more queued already
    /// the connection ends instead (its client is not reading its replies).
    pub fn queue(&mut self, id: ConnId, reply: &[u8], counters: &mut DnsStats) {
        let Some(conn) = self.get(id) else {
            return;
        };
        let at = conn.queued;
        let framed = conn.region.with_mut(RECV + at..RECV + OUT_AREA, |out| {
            if at >= OUT || out.len() < stream::PREFIX + reply.len() {
                return None;
            }
            out[stream::PREFIX..stream::PREFIX + reply.len()].copy_from_slice(reply);
            stream::frame(out, reply.len())
        });
        match framed {
            Some(len) => conn.queued += len,
            None => {
                counters.tcp_overflow += 1;
                conn.ended = true;
            }
        }
    }

    /// When the next connection falls idle, if one may.
    pub fn next_idle(&self) -> Option<Instant> {
        self.slots
            .iter()
            .flatten()
            .filter(|conn| !conn.ended && conn.queued == 0)
            .map(|conn| conn.active + IDLE)
            .min()
    }

    /// Closes the connections idle since `IDLE` before `now`: nothing queued or being
    /// sent, and no query of theirs still forwarded (`forwarding`).
    pub fn close_idle(
        &mut self,
        ring: &mut Ring,
        now: Instant,
        forwarding: impl Fn(ConnId) -> bool,
    ) {
        for slot in 0..self.slots.len() {
            let Some(conn) = self.slots[slot].as_mut() else {
                continue;
            };
            let id = ConnId {
                slot,
                generation: conn.generation,
            };
            if conn.ended || conn.queued > 0 || now < conn.active + IDLE {
                continue;
            }
            if forwarding(id) {
                // Its reply comes or the forward fails by its deadline; idle counts
                // from then.
                conn.active = now;
                continue;
            }
            conn.ended = true;
            self.pump(ring, slot);
        }
    }

    /// Starts what connection `slot` can do now (its receive, the send of its queue),
    /// or closes it once it ended and has nothing in flight.
    pub fn pump(&mut self, ring: &mut Ring, slot: usize) {
        let Some(conn) = self.slots[slot].as_mut() else {
            return;
        };
        if conn.ended {
            if !conn.receiving && conn.sending == 0 {
                if let Some(conn) = self.slots[slot].take() {
                    ring.close(conn.socket.into());
                }
            } else if conn.receiving {
                // The receive would wait for the flow forever: cancelled.
                ring.cancel_fd(conn.socket.as_fd());
            }
            return;
        }
        let token = |op| Token::new(op, conn.generation, slot).encode();
        let slice = |range| Slice {
            region: conn.region.clone(),
            range,
        };
        // No more queries taken while replies pile up: the flow's window does the rest.
        if !conn.receiving && conn.queued < OUT / 2 {
            conn.receiving = true;
            ring.recv(conn.socket.as_fd(), slice(0..RECV), token(Op::DnsTcpRecv));
        }
        if conn.sending == 0 && conn.queued > 0 {
            conn.sending = conn.queued;
            let out = RECV..RECV + conn.queued;
            ring.send(conn.socket.as_fd(), slice(out), token(Op::DnsTcpSend));
        }
    }
}

/// Of the slots that say when their connection was last active (`None`: not to be
/// closed), the one active longest ago; the lowest slot of equals.
fn least_recent(slots: impl Iterator<Item = Option<Instant>>) -> Option<usize> {
    slots
        .enumerate()
        .filter_map(|(slot, active)| Some((active?, slot)))
        .min()
        .map(|(_, slot)| slot)
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read};

    use super::*;
    use crate::uring::token::Token;

    /// Carries out the ring's completions for `conns` at `now`, a few rounds.
    fn run(ring: &mut Ring, conns: &mut Conns, now: Instant) {
        let mut counters = DnsStats::default();
        let mut batch = Vec::new();
        for _ in 0..20 {
            ring.submit_and_wait(Some(std::time::Duration::from_millis(5)))
                .expect("io_uring_enter");
            ring.drain(&mut batch, 64);
            for done in batch.drain(..) {
                let Some(token) = Token::decode(done.token) else {
                    continue;
                };
                if let Op::DnsTcpRecv | Op::DnsTcpSend = token.op {
                    let id = ConnId {
                        slot: token.key as usize,
                        generation: token.generation,
                    };
                    conns.on_completion(token.op, id, done.result, now, &mut counters);
                    conns.pump(ring, id.slot);
                }
            }
        }
    }

    /// Whether the flow's end of the pair reads end of stream (its peer closed).
    fn closed(flow_end: &mut Socket) -> bool {
        flow_end.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        match flow_end.read(&mut byte) {
            Ok(0) => true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            other => panic!("unexpected read: {other:?}"),
        }
    }

    /// A ring and connections with one connection opened at `now`, and the flow's end
    /// of it.
    fn one_connection(now: Instant) -> (Ring, Conns, DnsStats, Socket) {
        let mut ring = Ring::new().expect("io_uring");
        let mut conns = Conns::default();
        let mut counters = DnsStats::default();
        let flow_end = conns
            .open(&mut ring, now, |_| false, &mut counters)
            .unwrap();
        (ring, conns, counters, flow_end)
    }

    #[test]
    fn an_idle_connection_is_closed_after_the_idle_time() {
        let start = Instant::from_secs(100);
        let (mut ring, mut conns, _, mut flow_end) = one_connection(start);
        run(&mut ring, &mut conns, start);
        assert_eq!(conns.next_idle(), Some(start + IDLE));
        let before = start + IDLE - Duration::from_millis(1);
        conns.close_idle(&mut ring, before, |_| false);
        run(&mut ring, &mut conns, before);
        assert!(!closed(&mut flow_end), "not idle long enough yet");
        let forwarded = start + IDLE;
        conns.close_idle(&mut ring, forwarded, |_| true);
        run(&mut ring, &mut conns, forwarded);
        assert!(!closed(&mut flow_end), "a query is still being forwarded");
        let idle = forwarded + IDLE;
        conns.close_idle(&mut ring, idle, |_| false);
        run(&mut ring, &mut conns, idle);
        assert!(closed(&mut flow_end));
        assert!(conns.slots.iter().all(Option::is_none), "its slot is free");
    }

    /// Reads `len` bytes from the flow's end, carrying out the ring meanwhile.
    fn receive(ring: &mut Ring, conns: &mut Conns, flow_end: &mut Socket, len: usize) -> Vec<u8> {
        flow_end.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        for _ in 0..100 {
            run(ring, conns, Instant::ZERO);
            loop {
                match flow_end.read(&mut buf) {
                    Ok(0) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
            if got.len() >= len {
                break;
            }
        }
        got
    }

    #[test]
    fn a_reply_of_the_largest_size_is_delivered_whole() {
        let (mut ring, mut conns, mut counters, mut flow_end) = one_connection(Instant::ZERO);
        let id = ConnId {
            slot: 0,
            generation: conns.generation,
        };
        for len in [20_000, usize::from(u16::MAX), 100] {
            let reply: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            conns.queue(id, &reply, &mut counters);
            conns.pump(&mut ring, id.slot);
            let got = receive(&mut ring, &mut conns, &mut flow_end, 2 + len);
            assert_eq!(got.len(), 2 + len, "a reply of {len} bytes");
            assert_eq!(&got[..2], &(len as u16).to_be_bytes());
            assert!(got[2..] == reply[..], "the bytes of {len}");
        }
        assert_eq!(counters.tcp_overflow, 0);
    }

    #[test]
    fn pipelined_queries_are_taken_in_order_and_the_inbox_reused() {
        use std::io::Write;
        let (mut ring, mut conns, _, mut flow_end) = one_connection(Instant::ZERO);
        let mut out = [0u8; 64];
        for round in 0..2u8 {
            let mut stream = Vec::new();
            for len in 1..=3u8 {
                stream.extend_from_slice(&[0, len]);
                stream.extend(std::iter::repeat_n(round * 10 + len, usize::from(len)));
            }
            flow_end.write_all(&stream).unwrap();
            run(&mut ring, &mut conns, Instant::ZERO);
            for len in 1..=3u8 {
                let (n, id) = conns.take_query(&mut out).expect("a query");
                assert_eq!(id.slot, 0);
                assert_eq!(&out[..n], &vec![round * 10 + len; usize::from(len)][..]);
            }
            assert!(conns.take_query(&mut out).is_none());
            assert!(conns.inbox.is_empty() && conns.inbox_from.is_empty());
        }
    }

    #[test]
    fn the_connection_active_longest_ago_is_chosen_among_those_that_may_close() {
        let at = Instant::from_secs;
        assert_eq!(least_recent([None, None].into_iter()), None, "none idle");
        let slots = [Some(at(5)), None, Some(at(3)), Some(at(4)), Some(at(3))];
        assert_eq!(
            least_recent(slots.into_iter()),
            Some(2),
            "oldest, lowest slot"
        );
        let slots = [None, Some(at(9)), None];
        assert_eq!(
            least_recent(slots.into_iter()),
            Some(1),
            "the only idle one"
        );
    }

    #[test]
    fn when_every_slot_is_taken_the_idle_connection_active_longest_ago_makes_room() {
        let mut ring = Ring::new().expect("io_uring");
        let mut conns = Conns::default();
        let mut counters = DnsStats::default();
        let not_forwarding = |_: ConnId| false;
        // Slot i opened at second 100 + i: slot 0 is the oldest.
        let mut flow_ends: Vec<Socket> = (0..MAX_CONNS)
            .map(|i| {
                let now = Instant::from_secs(100 + i as i64);
                conns
                    .open(&mut ring, now, not_forwarding, &mut counters)
                    .unwrap()
            })
            .collect();
        let now = Instant::from_secs(100 + MAX_CONNS as i64);
        run(&mut ring, &mut conns, now);
        // Slot 0 has a query forwarded, slot 1 a reply queued: busy. Slot 2 goes.
        let id = |conns: &Conns, slot: usize| ConnId {
            slot,
            generation: conns.slots[slot].as_ref().unwrap().generation,
        };
        let (forwarded, queued) = (id(&conns, 0), id(&conns, 1));
        conns.slots[1].as_mut().unwrap().queued = 1;
        let forwarding = |conn: ConnId| conn == forwarded;
        let new_end = conns.open(&mut ring, now, forwarding, &mut counters);
        assert!(new_end.is_some(), "admitted");
        assert_eq!(counters.tcp_evicted, 1);
        run(&mut ring, &mut conns, now);
        assert!(closed(&mut flow_ends[2]), "the oldest idle one is closed");
        for slot in [0, 1, 3, MAX_CONNS - 1] {
            assert!(!closed(&mut flow_ends[slot]), "slot {slot} stays");
        }
        // The evicted one's cancelled receive did not end its successor in the slot.
        let successor = conns.slots[2].as_ref().unwrap();
        assert!(!successor.ended && successor.receiving);
        assert_eq!(id(&conns, 1), queued);
        // With every connection busy, a new one is refused and none closed.
        for conn in conns.slots.iter_mut().flatten() {
            conn.queued = 1;
        }
        assert!(
            conns
                .open(&mut ring, now, forwarding, &mut counters)
                .is_none()
        );
        assert_eq!(counters.tcp_evicted, 1);
        drop(new_end);
    }
}
