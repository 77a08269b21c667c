//! DNS over TCP from clients (`--dns fake`): a TCP flow to port 53 is relayed to the
//! proxy's own end of a socket pair, where its queries are cut out of the stream
//! (`flow::dns::stream`) and answered like those over UDP.

// The flow is an ordinary relayed flow whose outbound socket is one end of a Unix stream
// pair, connected from the start: no socket leaves the host, and the relay (windows,
// FIN, RST) is the one every flow has. The other end is served here: one receive and
// one send in flight at most per connection, replies queued framed in its buffer.

use std::os::fd::AsFd;

use socket2::{Domain, Socket, Type};

use crate::flow::dns::stream::{self, Reassembler};
use crate::flow::upstream::MAX_QUERY;
use crate::stats::DnsStats;
use crate::uring::token::GENERATION_MASK;
use crate::uring::{Op, Region, Ring, Slice, Token};

/// Connections served at once; a flow to port 53 past it is refused (RST, counted).
pub const MAX_CONNS: usize = 64;
/// Where bytes from the flow are received, and where replies wait to be sent.
const RECV: usize = 4096;
const OUT: usize = 16 * 1024;
/// Complete queries the reassembler may hold (they are taken out at once).
const PIPELINED: usize = 4;

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
    /// `[0, RECV)` receives, `[RECV, RECV + OUT)` the replies queued.
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
}

/// Every connection, and the queries received and not yet answered.
pub struct Conns {
    slots: Vec<Option<Conn>>,
    generation: u32,
    /// Framed queries (2-byte length, then the message) and the connection each came
    /// on, in order; the buffers are reused.
    inbox: Vec<u8>,
    inbox_from: Vec<ConnId>,
}

impl Default for Conns {
    fn default() -> Conns {
        Conns {
            slots: (0..MAX_CONNS).map(|_| None).collect(),
            generation: 0,
            inbox: Vec::new(),
            inbox_from: Vec::new(),
        }
    }
}

impl Conns {
    /// A pair for a new flow: its end for the flow, ours served from now on (its first
    /// receive started). `None` when every slot is taken or no pair can be made.
    pub fn open(&mut self, ring: &mut Ring) -> Option<Socket> {
        let slot = self.slots.iter().position(Option::is_none)?;
        let (flow_end, ours) = Socket::pair(Domain::UNIX, Type::STREAM.cloexec(), None).ok()?;
        let region = Region::new(RECV + OUT)?;
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
        });
        self.pump(ring, slot);
        Some(flow_end)
    }

    fn get(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.slots
            .get_mut(id.slot)?
            .as_mut()
            .filter(|conn| conn.generation == id.generation)
    }

    /// A completion of `op` for connection `id`: a receive's queries go to the inbox
    /// (`take_query`), a send's bytes off the queue. The caller answers, then `pump`s.
    pub fn on_completion(&mut self, op: Op, id: ConnId, result: i32, counters: &mut DnsStats) {
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
            // What is left moves to the front, the replies queued since behind it.
            let queued = conn.queued;
            conn.region
                .with_mut(RECV..RECV + OUT, |out| out.copy_within(sent..queued, 0));
            conn.queued -= sent;
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
        if self.inbox_from.is_empty() {
            self.inbox.clear();
            return None;
        }
        let id = self.inbox_from.remove(0);
        let len = usize::from(u16::from_be_bytes([self.inbox[0], self.inbox[1]]));
        let n = len.min(out.len());
        out[..n].copy_from_slice(&self.inbox[stream::PREFIX..stream::PREFIX + n]);
        self.inbox.drain(..stream::PREFIX + len);
        Some((n, id))
    }

    /// Queues `reply` framed on connection `id`; one that does not fit ends the
    /// connection (its client is not reading its replies).
    pub fn queue(&mut self, id: ConnId, reply: &[u8], counters: &mut DnsStats) {
        let Some(conn) = self.get(id) else {
            return;
        };
        let at = conn.queued;
        let framed = conn.region.with_mut(RECV + at..RECV + OUT, |out| {
            if out.len() < stream::PREFIX + reply.len() {
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
