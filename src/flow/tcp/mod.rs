//! One relayed TCP connection as a state machine that starts no I/O and makes no system
//! call. It owns the flow's smoltcp socket (the client side, whose buffers live in
//! memory the ring may read and write), the relay state and every lifecycle rule, takes
//! the time as an argument, is told outbound completions as typed results (an `IoError`
//! for a failed one), and returns the outbound I/O to start and the pages to give back as
//! `Action`s, plus the time it next needs to run.
//!
//! Packets towards the client it writes into TUN write buffers the loop lends it: it
//! polls the smoltcp interface (which holds no sockets) with its own socket set over
//! `stack::StackDevice`, whose tokens are the loop's free buffers, and writes its own
//! ACKs and ICMP errors through `TxPool::emit`; the loop submits what was filled. This
//! is the lent-buffer form of quinn-proto's `poll_transmit`, with smoltcp's `Device`
//! as the lending interface: moving the smoltcp calls out to the loop would hand it the
//! socket set and the window state between every ingress and egress call of every
//! packet, for the same writes into the same buffers. A buffer that cannot be had is
//! a state (`Next::starved`, an update still due), retried when one frees.
//!
//! Through a SOCKS5 upstream the outbound socket first carries the flow's handshake
//! (`flow::upstream`), its I/O returned as the same `Action`s on scratch bytes after the
//! two buffers; the relay opens only on a successful CONNECT reply.
//!
//! Call order, each time the flow has work: the `on_*` calls for what happened, then
//! `poll_relay` (the outbound send, receive and FIN forwarding), then `poll` (smoltcp
//! egress, lifecycle, teardown). The actions of each are carried out, in order, before
//! the next call.

pub mod admission;
mod lifecycle;
mod memory;
pub mod relay;
#[cfg(test)]
mod tests;
mod trim;

use std::ops::Range;
use std::time::Duration;

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::Instant;
use smoltcp::wire::{IpAddress, IpListenEndpoint};

use crate::flow::IoError;
use crate::flow::budget::Allowance;
use crate::flow::upstream::{self, Handshake};
use crate::stack::device::FlowTx;
use crate::stack::window::{self, Admission, WindowState};
use crate::stack::{Claim, StackDevice, TxPool};
use crate::uring::{Family, Lent, Region};
use crate::wire::FlowKey;
use crate::wire::icmp::Quote;
use relay::Relay;
pub use relay::{Failure, Phase, Teardown};

/// Packets one flow may emit per poll, so one bulk flow cannot starve the rest: a
/// quarter of the TUN write buffers with offload (2 MiB of 64 KiB super-packets), and as
/// fast as 256 in bulk (measured: the same Gbit/s and CPU per GB, one flow and four).
pub const EGRESS_BUDGET: usize = 32;
/// Idle time before the client is probed for liveness, and how long a silent client is
/// tolerated: a client that vanished without FIN or RST is detected in about three
/// minutes instead of never. (The outbound socket's keep-alive is set up alike.)
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const CLIENT_SILENCE_LIMIT: Duration = Duration::from_secs(180);
/// How long a server may leave bytes of a finished client unacknowledged.
pub const ORPHAN_TIMEOUT: Duration = Duration::from_secs(60);
/// smoltcp's own delayed-ACK time, where it is allowed one.
const ACK_DELAY: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(10);
/// How long into smoltcp's 10 s TIME-WAIT egress (ACKs) keeps running; past it egress
/// stops so smoltcp's close timer cannot clear bytes still owed to the server.
const TIME_WAIT_EGRESS: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(9);

/// Outbound I/O and bookkeeping the event loop carries out for a flow, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes of the flow's region to the server; report with `on_sent`.
    Send(Range<usize>),
    /// Receive server bytes into these bytes of the region; report with `on_received`.
    Recv(Range<usize>),
    /// shutdown(SHUT_WR) now, reported with `on_shutdown` before the next poll.
    Shutdown,
    /// TCP_USER_TIMEOUT: how long the server may leave sent bytes unacknowledged.
    UserTimeout(Duration),
    /// SO_LINGER 0: closing will send the server a RST.
    Linger0,
    /// Cancel every outbound operation in flight; each still completes.
    Cancel,
    /// Close the outbound socket.
    Close,
    /// These bytes of the flow's region hold nothing: their pages may go back to the
    /// kernel (madvise), whatever is in flight elsewhere in the region.
    Discard(Range<usize>),
    /// Nothing is in flight and nothing owed: remove the flow, counting its failure.
    Free(Option<Failure>),
}

/// Actions of one poll, without allocating: a poll yields at most one of each kind but
/// `Discard`, of which it yields at most five (two spans of the receive ring, three of
/// the send ring around a receive in flight).
#[derive(Debug, Default)]
pub struct Actions {
    items: [Option<Action>; 16],
    len: usize,
}

impl Actions {
    pub fn push(&mut self, action: Action) {
        self.items[self.len] = Some(action);
        self.len += 1;
    }

    /// The actions so far, in order, leaving the list empty.
    pub fn drain(&mut self) -> impl Iterator<Item = Action> + '_ {
        let len = std::mem::take(&mut self.len);
        self.items[..len].iter_mut().filter_map(Option::take)
    }
}

/// What the event loop should do with the flow after a poll.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Next {
    /// It has more to do this turn (its egress budget ran out, or a RST is still owed).
    pub again: bool,
    /// No TUN write buffer was free: poll it again once one is.
    pub starved: bool,
    /// Poll it again at this time at the latest (retransmission, delayed ACK, keep-alive).
    pub deadline: Option<Instant>,
}

/// Per-flow settings from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Bytes of each of the smoltcp receive and send buffers.
    pub buffer: usize,
    pub mtu: u32,
}

/// The flow's buffers: the smoltcp socket set, whose receive and send buffers are the
/// flow's region. The ring sends from the one and receives into the other directly.
/// After them, the scratch bytes of a SOCKS5 handshake (touched only through one).
pub struct Buffers;

impl Family for Buffers {
    type Of<'m> = Sockets<'m>;
}

pub struct Sockets<'m> {
    set: SocketSet<'m>,
    handle: SocketHandle,
    scratch: &'m mut [u8],
}

impl<'m> Sockets<'m> {
    fn socket(&mut self) -> &mut tcp::Socket<'m> {
        self.set.get_mut::<tcp::Socket>(self.handle)
    }

    fn state(&self) -> State {
        self.set.get::<tcp::Socket>(self.handle).state()
    }
}

/// One relayed TCP connection.
pub struct Flow {
    key: FlowKey,
    memory: Lent<Buffers>,
    relay: Relay,
    /// The SOCKS5 handshake with the upstream, until it has succeeded (a failed one
    /// stays until what it has in flight is done).
    upstream: Option<Handshake>,
    /// The client's SYN, quoted in the ICMP error if the server proves unreachable.
    syn: Quote,
    /// Largest TCP payload per packet towards the client (its MSS, capped by our MTU);
    /// the kernel segments bigger IPv6 writes to this.
    segment_size: u16,
    /// Bytes of each of its two ring buffers: the receive buffer first in the region,
    /// then the send buffer.
    buffer: usize,
    /// What our segments told the client (window, sequence numbers).
    window: WindowState,
    /// How much of the flow's memory each direction may hold: the client's bytes
    /// waiting for the server (`rx`) and the server's waiting for the client (`tx`).
    rx: Allowance,
    tx: Allowance,
    /// The client's sequence number of its first byte not yet passed to the server: its
    /// window may end no further than this plus `rx`'s allowance.
    client_next: u32,
    /// The client's first byte's sequence number: it went to the start of the receive
    /// buffer.
    client_first: u32,
    /// Server bytes the client has acknowledged so far.
    tx_acked: usize,
    /// The client's bytes reached the end of its window since the last account.
    rx_window_used: bool,
    teardown_started: bool,
    /// TCP_USER_TIMEOUT was asked for because the client finished with bytes owed.
    orphaned: bool,
    /// When smoltcp's socket entered TIME-WAIT.
    time_wait_since: Option<Instant>,
    /// Found no TUN write buffer; waits for one before it may be freed.
    starved: bool,
    /// Still counted as connecting by admission control.
    half_open: bool,
}

impl Flow {
    /// Bytes of memory a flow with these settings needs (`new`'s `region`).
    pub fn memory_needed(settings: Settings) -> usize {
        2 * settings.buffer + upstream::SCRATCH
    }

    /// A flow for the client's SYN `syn` (announcing `mss`): a listening socket that
    /// holds its SYN|ACK back until `on_connected`, with its buffers in `region`
    /// (`memory_needed` bytes; what is in them does not matter: smoltcp reads only what
    /// it wrote). The outbound connect must be started with it: to the server, or to
    /// the SOCKS5 upstream that `upstream` then asks for the server.
    pub fn new(
        key: FlowKey,
        mss: Option<u16>,
        syn: Quote,
        settings: Settings,
        region: Region,
        upstream: Option<Handshake>,
    ) -> Flow {
        let size = settings.buffer;
        debug_assert!(region.len() >= Self::memory_needed(settings));
        let listen = IpListenEndpoint {
            addr: Some(key.server.addr),
            port: key.server.port,
        };
        let memory = Lent::new(region, |bytes| {
            let (buffers, scratch) = bytes.split_at_mut(2 * size);
            let scratch = &mut scratch[..upstream::SCRATCH];
            let (rx, tx) = buffers.split_at_mut(size);
            let mut socket =
                tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
            // Nagle would delay small writes a second time: the client's kernel already
            // coalesced them.
            socket.set_nagle_enabled(false);
            socket.set_keep_alive(Some(KEEPALIVE_IDLE.into()));
            socket.set_timeout(Some(CLIENT_SILENCE_LIMIT.into()));
            socket.pause_synack(true);
            // Only fails for port 0, which the demultiplexer never lets through.
            let _ = socket.listen(listen);
            let mut set = SocketSet::new(Vec::with_capacity(1));
            let handle = set.add(socket);
            Sockets {
                set,
                handle,
                scratch,
            }
        });
        Flow {
            key,
            memory,
            relay: Relay::connecting(),
            upstream,
            syn,
            segment_size: segment_size(key.server.addr, mss, settings.mtu),
            buffer: size,
            window: WindowState::default(),
            rx: Allowance::new(size),
            tx: Allowance::new(size),
            // The SYN takes one sequence number.
            client_next: syn.tcp_seq().map_or(0, |isn| isn.wrapping_add(1)),
            client_first: syn.tcp_seq().map_or(0, |isn| isn.wrapping_add(1)),
            tx_acked: 0,
            rx_window_used: false,
            teardown_started: false,
            orphaned: false,
            time_wait_since: None,
            starved: false,
            half_open: true,
        }
    }

    pub fn key(&self) -> FlowKey {
        self.key
    }

    pub fn phase(&self) -> Phase {
        self.relay.phase()
    }

    /// The memory `Send` and `Recv` ranges are in.
    pub fn region(&self) -> &Region {
        self.memory.region()
    }

    /// Ends the flow, returning its memory for another flow if no operation still
    /// points into it.
    pub fn into_region(self) -> Option<Region> {
        self.memory.into_region()
    }

    /// A packet from the client. Returns `false` when it was dropped for carrying
    /// bytes beyond the window advertised to the client: smoltcp, which believes it
    /// advertised its whole free buffer, would take them into pages `trim` may give
    /// back. Unless it is a reset, the client is then told the current window (a
    /// zero-window probe is such a segment), as smoltcp would answer a segment beyond
    /// its own window.
    pub fn on_segment(
        &mut self,
        now: Instant,
        iface: &mut Interface,
        tx: &mut TxPool,
        packet: &[u8],
    ) -> bool {
        match self.window.admit(packet) {
            Admission::Pass => {}
            Admission::Drop => return false,
            Admission::DropAndAck => {
                // Everything up to the client's next byte is in the receive buffer (its
                // bytes beyond were never passed on), acknowledged or about to be.
                let held = self
                    .memory
                    .get(|sockets| sockets.set.get::<tcp::Socket>(sockets.handle).recv_queue());
                let ack = self.client_next.wrapping_add(held as u32);
                let (ends, limit) = ((self.key.server, self.key.client), self.window_limit());
                let state = &mut self.window;
                if !tx.emit(Claim::Reply, |buf| {
                    window::pure_ack(buf, ends, state, ack, limit)
                }) {
                    tx.counters.dropped_replies += 1;
                }
                return false;
            }
        }
        let edge = self.window.edge;
        let flow = device_flow(self.segment_size, self.window_limit(), &mut self.window);
        let held = self.memory.with(|sockets, _| {
            let mut device = StackDevice::ingress(packet, tx, Some(flow));
            iface.poll_ingress_single(now, &mut device, &mut sockets.set);
            sockets.set.get::<tcp::Socket>(sockets.handle).recv_queue()
        });
        // The client used its window up when its bytes reached the edge announced to it
        // (a fast server keeps what is held low, so that alone would not show it).
        let reached = self.client_next.wrapping_add(held as u32);
        self.rx_window_used |= edge.is_some_and(|edge| reached.wrapping_sub(edge) as i32 >= 0);
        true
    }

    pub fn on_connected(&mut self, result: Result<(), IoError>) {
        let relay = &mut self.relay;
        match &mut self.upstream {
            None => self
                .memory
                .with(|sockets, _| relay.on_connected(sockets.socket(), result)),
            Some(handshake) => {
                relay.on_upstream_connected();
                handshake.on_connected(result);
                self.settle_handshake();
            }
        }
    }

    /// A send finished; returns how many client bytes it passed to the server (none for
    /// the handshake's).
    pub fn on_sent(&mut self, result: Result<usize, IoError>) -> usize {
        if let Some(handshake) = self.upstream.as_mut().filter(|h| h.sending()) {
            handshake.on_sent(result);
            self.settle_handshake();
            return 0;
        }
        let relay = &mut self.relay;
        let passed = self
            .memory
            .with(|sockets, region| relay.on_sent(sockets.socket(), region, result));
        self.rx.drained(passed);
        self.client_next = self.client_next.wrapping_add(passed as u32);
        passed
    }

    /// A receive finished; returns how many server bytes it passed to smoltcp (none for
    /// the handshake's).
    pub fn on_received(&mut self, result: Result<usize, IoError>) -> usize {
        if let Some(handshake) = self.upstream.as_mut().filter(|h| h.receiving()) {
            self.memory
                .with(|sockets, _| handshake.on_received(sockets.scratch, result));
            self.settle_handshake();
            return 0;
        }
        let relay = &mut self.relay;
        let before = relay.committed();
        self.memory
            .with(|sockets, region| relay.on_received(sockets.socket(), region, result));
        self.relay.committed() - before
    }

    /// Hands the relay the upstream's answer once the handshake has one; a handshake
    /// that succeeded (with nothing in flight, then) is done with.
    fn settle_handshake(&mut self) {
        let Some(outcome) = self.upstream.as_ref().and_then(Handshake::outcome) else {
            return;
        };
        let relay = &mut self.relay;
        self.memory.with(|sockets, _| {
            relay.on_upstream_reply(sockets.socket(), outcome.map(drop));
        });
        if outcome.is_ok() {
            self.upstream = None;
        }
    }

    /// Outbound operations in flight, the handshake's included.
    fn inflight(&self) -> u32 {
        self.relay.inflight() + self.upstream.as_ref().map_or(0, Handshake::inflight)
    }

    pub fn on_shutdown(&mut self, result: Result<(), IoError>) {
        let relay = &mut self.relay;
        self.memory
            .with(|sockets, _| relay.on_shutdown(sockets.socket(), result));
    }

    /// A TUN write buffer has become free.
    pub fn on_tx_buffer(&mut self) {
        self.starved = false;
    }

    /// Moves what can move between the two sides; `actions` gets the outbound I/O to
    /// start now.
    pub fn poll_relay(&mut self, actions: &mut Actions) {
        if let Some(handshake) = &mut self.upstream {
            let io = self
                .memory
                .with(|sockets, _| handshake.pump(sockets.scratch));
            // The scratch bytes follow the two buffers in the region.
            let base = 2 * self.buffer;
            let at = |range: Range<usize>| base + range.start..base + range.end;
            if let Some(range) = io.recv {
                actions.push(Action::Recv(at(range)));
            }
            if let Some(range) = io.send {
                actions.push(Action::Send(at(range)));
            }
            return;
        }
        let (relay, allow) = (&mut self.relay, self.tx.get());
        let io = self.memory.with(|sockets, region| {
            let socket = sockets.socket();
            let room = allow.saturating_sub(socket.send_queue());
            relay.pump(socket, region, room)
        });
        if io.shutdown {
            actions.push(Action::Shutdown);
        }
        if let Some(range) = io.recv {
            actions.push(Action::Recv(range));
        }
        if let Some(range) = io.send {
            actions.push(Action::Send(range));
        }
    }

    /// The smoltcp state and relay state, for trace logs.
    pub fn describe(&self) -> String {
        format!(
            "{} {:?} {:?}",
            self.memory.get(|sockets| sockets.state()),
            self.relay,
            self.upstream
        )
    }
}

/// What the device needs to know of a flow to write its packets (a free function: the
/// flow's memory is borrowed alongside).
fn device_flow(segment_size: u16, window_limit: u32, window: &mut WindowState) -> FlowTx<'_> {
    FlowTx {
        ipv6_segment_size: segment_size,
        window_limit: Some(window_limit),
        window,
    }
}

/// The client's MSS (RFC 9293 defaults when it sent none), capped by what fits our MTU.
pub fn segment_size(server: IpAddress, client_mss: Option<u16>, mtu: u32) -> u16 {
    let (default_mss, headers) = match server {
        IpAddress::Ipv4(_) => (536, 40),
        IpAddress::Ipv6(_) => (1220, 60),
    };
    let ours = u16::try_from(mtu.saturating_sub(headers)).unwrap_or(u16::MAX);
    client_mss.unwrap_or(default_mss).clamp(1, ours)
}
