//! The in-process proxy on a simulated clock, driven by arbitrary operations: a smoltcp
//! client talks to a TCP flow (the flow core, the proxy's interfaces and transmit pool)
//! over a network that drops, duplicates and reorders, a simulated server plays the
//! outbound socket, UDP datagrams (USO super-packets among them) and pings go to the
//! datagram flows and are answered, and arbitrary packets are injected. Every packet
//! from the client is dispatched as the event loop does it (virtio-net header, demux).
//!
//! Checked: no panic; the flow's I/O protocol (one send and one receive at most, none
//! after close, freed with nothing in flight and its budget given back); bytes arrive
//! intact and in order both ways; every datagram reply and echo reply counted as sent
//! reaches its client unchanged; and once the network is clean, a transfer finishes and
//! the flow closes within bounded simulated time (lost wake-ups, stuck windows).
//!
//! The event loop itself (io_uring, TUN, sockets) is not reachable here; what it does
//! with packets and completions is played by this harness, as `flow::tcp::tests` does.
#![no_main]

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use libfuzzer_sys::arbitrary::{Result as Arb, Unstructured};
use libfuzzer_sys::fuzz_target;
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpEndpoint, IpProtocol, IpRepr,
    Ipv4Packet, Ipv6Address, Ipv6Packet, UdpPacket, UdpRepr,
};
use uringproxy::flow::budget::Budget;
use uringproxy::flow::datagram::{
    self, Arrival, Closing, Flows, Kind, Limits, Received, RecvError,
};
use uringproxy::flow::tcp::{Action, Actions, Flow, Next, Phase, Settings};
use uringproxy::flow::{Id, IoError};
use uringproxy::stack::client::{self, QueueDevice};
use uringproxy::stack::{Stack, TxPool};
use uringproxy::uring::Region;
use uringproxy::wire::icmp::{Quote, Reason};
use uringproxy::wire::{self, FlowKey, Offload, Parsed, udp, vnet};

const CLIENT_PORT: u16 = 40000;
/// Largest UDP payload the event loop relays per datagram.
/// Simulated time, and turns, a clean network has to finish a transfer and a close.
const SETTLE_LIMIT: Duration = Duration::from_secs(900);
const SETTLE_TURNS: usize = 50_000;
/// The most each side sends in one run: enough for windows to fill and grow, little
/// enough to keep runs short.
const STREAM_LIMIT: usize = 512 * 1024;
/// The longest a held TUN write stays uncompleted: the kernel completes them late, never
/// not at all. Held through a long pause, they would starve the flow of buffers for
/// minutes: no data and no keep-alive could reach the idle client, and the flow's first
/// egress after `CLIENT_SILENCE_LIMIT` (3 min) of client silence resets it.
const HOLD_LIMIT: Duration = Duration::from_secs(10);
/// The loop's bound on an outbound connect (`--connect-timeout`'s default): the ring's
/// linked timeout cancels it then. Left pending for minutes, the client's SYN-ACK would
/// leave with its silence allowance nearly spent.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(mut h) = Harness::new(&mut u) else {
        return;
    };
    for _ in 0..2000 {
        if u.is_empty() || h.op(&mut u).is_err() {
            break;
        }
    }
    h.settle();
});

/// Bytes `offset..offset + len` of the stream a side sends (`seed` tells the sides apart).
fn stream(seed: u8, offset: usize, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    fill(&mut bytes, seed, offset);
    bytes
}

fn fill(buf: &mut [u8], seed: u8, offset: usize) {
    for (i, byte) in (offset..).zip(buf) {
        *byte = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8;
    }
}

/// A completion the simulated kernel has produced and not yet delivered.
#[derive(Debug)]
enum Done {
    Connect(Result<(), IoError>),
    Sent(Result<usize, IoError>),
    Received(Result<usize, IoError>),
}

/// The simulated server behind the outbound socket.
#[derive(Default)]
struct Server {
    /// Bytes it means to send, and has sent (into the flow's receives).
    planned: usize,
    sent: usize,
    eof: bool,
    reset: bool,
    /// It stops reading: sends stay in flight.
    stalled: bool,
    received: Vec<u8>,
}

/// A datagram flow as the loop sees it.
struct Datagram {
    kind: Kind,
    key: FlowKey,
    armed: bool,
}

struct Harness {
    now: Instant,
    v6: bool,
    mtu: usize,
    offload: Offload,
    client_iface: Interface,
    client_dev: QueueDevice,
    client_sockets: SocketSet<'static>,
    client: SocketHandle,
    /// Client bytes it means to send, and has put into its socket.
    client_planned: usize,
    client_written: usize,
    client_got: Vec<u8>,
    client_closed: bool,
    client_aborted: bool,
    stack: Stack,
    settings: Settings,
    budget: Budget,
    flow: Option<Flow>,
    flows_made: usize,
    /// What the flow's last poll asked for, and whether something woke it since.
    next: Next,
    woken: bool,
    connect_pending: bool,
    /// When the pending connect was submitted.
    connect_since: Instant,
    connected: Option<Result<(), IoError>>,
    send: Option<Range<usize>>,
    recv: Option<Range<usize>>,
    done: Vec<Done>,
    closed: bool,
    send_errors: bool,
    server: Server,
    /// Packets on the wire each way (the down ones only TCP: the client's).
    up: VecDeque<Vec<u8>>,
    down: VecDeque<Vec<u8>>,
    /// TUN writes not completed yet, while `hold_writes` is set (at most `HOLD_LIMIT`),
    /// with when each was submitted.
    held: VecDeque<(u16, Instant)>,
    hold_writes: bool,
    /// Injected packets may have put bytes into the flow, or acknowledged some: the
    /// streams are no longer checked.
    tainted: bool,
    datagrams: Flows<()>,
    dgram: HashMap<Id, Datagram>,
    /// Replies counted as sent, per client (key reversed), not yet seen on the TUN.
    replies: HashMap<FlowKey, VecDeque<Vec<u8>>>,
    icmp_errors: usize,
    last_up: Vec<u8>,
}

impl Harness {
    fn new(u: &mut Unstructured) -> Arb<Harness> {
        let v6 = u.arbitrary::<bool>()?;
        let mtu = *u.choose(&[1500, 9000, 65535])?;
        let offload = *u.choose(&[
            Offload::None,
            Offload::Header,
            Offload::Checksum,
            Offload::Tso,
            Offload::Uso,
        ])?;
        let buffers = u.int_in_range(2..=16)?;
        // At the floor: every allowance stays at its minimum.
        let budget = Budget::new(if u.arbitrary()? { 0 } else { 1 << 30 });
        let buffer = *u.choose(&[16 * 1024, 64 * 1024, 256 * 1024])?;
        let max_flows = u.int_in_range(1..=6)?;
        let now = Instant::from_millis(1);
        let tx = TxPool::new(buffers, mtu, offload).expect("transmit buffers");
        let stack = Stack::new(tx, now, 7);
        let mut client_dev = QueueDevice::new(mtu, true);
        let mut client_iface = client::interface(&mut client_dev, v6, now);
        let mut client_sockets = SocketSet::new(Vec::new());
        let client = client_sockets.add(tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; 64 * 1024]),
            tcp::SocketBuffer::new(vec![0u8; 64 * 1024]),
        ));
        let server = server_endpoint(v6, 80);
        let cx = client_iface.context();
        client_sockets
            .get_mut::<tcp::Socket>(client)
            .connect(cx, server, CLIENT_PORT)
            .unwrap();
        Ok(Harness {
            now,
            v6,
            mtu,
            offload,
            client_iface,
            client_dev,
            client_sockets,
            client,
            client_planned: 0,
            client_written: 0,
            client_got: Vec::new(),
            client_closed: false,
            client_aborted: false,
            stack,
            settings: Settings {
                buffer,
                mtu: mtu as u32,
            },
            budget,
            flow: None,
            flows_made: 0,
            next: Next::default(),
            woken: false,
            connect_pending: false,
            connect_since: Instant::ZERO,
            connected: None,
            send: None,
            recv: None,
            done: Vec::new(),
            closed: false,
            send_errors: false,
            server: Server::default(),
            up: VecDeque::new(),
            down: VecDeque::new(),
            held: VecDeque::new(),
            hold_writes: false,
            tainted: false,
            datagrams: Flows::new(Limits {
                idle_timeout: std::time::Duration::from_secs(60),
                dns_timeout: std::time::Duration::from_secs(10),
                max_flows,
            }),
            dgram: HashMap::new(),
            replies: HashMap::new(),
            icmp_errors: 0,
            last_up: Vec::new(),
        })
    }

    fn client(&mut self) -> &mut tcp::Socket<'static> {
        self.client_sockets.get_mut::<tcp::Socket>(self.client)
    }

    /// One operation chosen by the fuzzer.
    fn op(&mut self, u: &mut Unstructured) -> Arb<()> {
        match u.int_in_range(0..=19u8)? {
            0..=3 => {
                let faults = u.arbitrary::<u8>()?;
                let long = u.int_in_range(0..=9u8)? == 9;
                let ms = if long {
                    u.int_in_range(1_000..=200_000u64)?
                } else {
                    u.int_in_range(0..=200u64)?
                };
                let serve = u.arbitrary::<u16>()?;
                if long {
                    // Now and then a long pause (retransmissions, keep-alives, expiry),
                    // with timers firing on time as the loop's would.
                    self.turn(faults, serve, Duration::ZERO);
                    self.wait(Duration::from_millis(ms));
                } else {
                    self.turn(faults, serve, Duration::from_millis(ms));
                }
            }
            4 => {
                let more = usize::from(u.arbitrary::<u16>()?);
                self.client_planned = (self.client_planned + more).min(STREAM_LIMIT);
                self.client_write();
            }
            5 => self.client_read(),
            6 => {
                self.client().close();
                self.client_closed = true;
            }
            7 => {
                self.client().abort();
                self.client_aborted = true;
            }
            8 => {
                let more = usize::from(u.arbitrary::<u16>()?) * 4;
                self.server.planned = (self.server.planned + more).min(STREAM_LIMIT);
            }
            9 => match u.int_in_range(0..=3u8)? {
                0 => self.server.eof = true,
                1 => self.server.reset = true,
                2 => self.server.stalled = !self.server.stalled,
                _ => self.hold_writes = !self.hold_writes,
            },
            10 => {
                if self.connect_pending && self.connected.is_none() {
                    let result = *u.choose(&[
                        Ok(()),
                        Ok(()),
                        Err(IoError::Refused),
                        Err(IoError::HostUnreachable),
                        Err(IoError::NetUnreachable),
                        Err(IoError::TimedOut),
                    ])?;
                    self.connected = Some(result);
                    self.done.push(Done::Connect(result));
                }
            }
            11 => self.inject(u)?,
            12 => self.inject_mutated(u)?,
            13 => self.client_datagram(u)?,
            14 => self.client_echo(u)?,
            15 => self.server_datagram(u)?,
            16 => self.server_error(u)?,
            17 => self.expire(),
            18 => {
                if let Some(flow) = &mut self.flow
                    && flow.evict()
                {
                    self.woken = true;
                }
            }
            _ => self.run_flow(),
        }
        Ok(())
    }

    /// Puts what the client planned into its socket, as far as it has room.
    fn client_write(&mut self) {
        let (offset, planned) = (self.client_written, self.client_planned);
        let client = self.client_sockets.get_mut::<tcp::Socket>(self.client);
        if offset < planned && client.can_send() {
            let written = client.send(|buf| {
                let n = buf.len().min(planned - offset);
                fill(&mut buf[..n], 1, offset);
                (n, n)
            });
            self.client_written += written.unwrap_or(0);
        }
    }

    /// The client reads all it has; it must be the server's stream, in order.
    fn client_read(&mut self) {
        let mut got = std::mem::take(&mut self.client_got);
        let before = got.len();
        let client = self.client();
        while client.can_recv() {
            client
                .recv(|data| {
                    got.extend_from_slice(data);
                    (data.len(), ())
                })
                .unwrap();
        }
        if !self.tainted {
            assert!(
                got.len() <= self.server.sent,
                "the client got more than was sent"
            );
            let new = &got[before..];
            assert!(
                new == stream(2, before, new.len()),
                "the client got other bytes"
            );
        }
        self.client_got = got;
    }

    /// One turn: the client runs, its packets reach the proxy, the server and the
    /// kernel work, the flow runs if the loop would run it, the proxy's packets go out,
    /// and time moves on. `faults` drop, duplicate or reorder packets each way.
    fn turn(&mut self, faults: u8, serve: u16, tick: Duration) {
        self.client_write();
        self.client_iface
            .poll(self.now, &mut self.client_dev, &mut self.client_sockets);
        self.up.extend(self.client_dev.sent.drain(..));
        disturb(&mut self.up, faults);
        while let Some(packet) = self.up.pop_front() {
            self.last_up.clone_from(&packet);
            let framed = self.framed(&packet, vnet::Header::PLAIN);
            self.dispatch(&framed);
        }
        self.serve(usize::from(serve).max(1));
        if self.connect_pending
            && self.connected.is_none()
            && self.now - self.connect_since >= CONNECT_LIMIT
        {
            self.connected = Some(Err(IoError::Cancelled));
            self.done.push(Done::Connect(Err(IoError::Cancelled)));
        }
        self.deliver(faults & 0x40 != 0);
        let due = self.next.again || self.next.deadline.is_some_and(|at| at <= self.now);
        if self.woken || due {
            self.run_flow();
        }
        self.flush_tx();
        disturb(&mut self.down, faults >> 3);
        self.client_dev.inbox.extend(self.down.drain(..));
        self.client_read();
        self.now += tick;
    }

    /// `packet` as read from the TUN: after a virtio-net header if there is one.
    fn framed(&self, packet: &[u8], header: vnet::Header) -> Vec<u8> {
        let mut framed = vec![0u8; self.offload.header_len()];
        if self.offload.vnet_header() {
            header.emit(&mut framed);
        }
        framed.extend_from_slice(packet);
        framed
    }

    /// A TUN read, handled as the event loop does: header, demux, then the flow.
    fn dispatch(&mut self, framed: &[u8]) {
        let (packet, udp_segment) = if self.offload.vnet_header() {
            match vnet::Header::parse(framed) {
                Ok((header, packet)) => (
                    packet,
                    (header.gso == vnet::Gso::UdpL4).then_some(header.gso_size),
                ),
                Err(_) => return,
            }
        } else {
            (framed, None)
        };
        match wire::parse(packet) {
            Parsed::Tcp { key, opens, mss } => self.tcp_segment(packet, key, opens, mss),
            parsed @ (Parsed::Udp { .. } | Parsed::Echo { .. }) => {
                self.datagram(packet, parsed, udp_segment);
            }
            Parsed::Fragment | Parsed::Unsupported | Parsed::Malformed => {}
        }
    }

    fn tcp_segment(&mut self, packet: &[u8], key: FlowKey, opens: bool, mss: Option<u16>) {
        let now = self.now;
        if self.flow.is_none() && opens && self.flows_made < 4 {
            let region = Region::new(Flow::memory_needed(self.settings)).expect("memory");
            self.flow = Some(Flow::new(
                key,
                mss,
                Quote::of(packet),
                self.settings,
                region,
                None,
            ));
            self.flows_made += 1;
            self.connect_pending = true;
            self.connect_since = now;
            self.connected = None;
            self.closed = false;
            self.next = Next::default();
        }
        let iface = self.stack.ifaces.serving(&key.server.addr);
        match &mut self.flow {
            Some(flow) if flow.key() == key => {
                flow.on_segment(now, iface, &mut self.stack.tx, packet);
                self.woken = true;
            }
            _ => self.stack.reject(now, &key.server.addr, packet),
        }
    }

    /// The simulated server takes sent bytes (`chunk` at most) unless it stalls, and
    /// fills the receive with its stream, or ends it.
    fn serve(&mut self, chunk: usize) {
        let Some(flow) = &self.flow else {
            return;
        };
        let region = flow.region().clone();
        if !self.server.stalled
            && let Some(range) = self.send.take()
        {
            let n = range.len().min(chunk);
            let bytes = region.kernel_read(range.start..range.start + n);
            if !self.tainted {
                let at = self.server.received.len();
                assert!(bytes == stream(1, at, n), "the server got other bytes");
            }
            self.server.received.extend_from_slice(&bytes);
            self.done.push(Done::Sent(Ok(n)));
        }
        if let Some(range) = self.recv.clone() {
            let available = self.server.planned - self.server.sent;
            if available > 0 {
                let n = range.len().min(available).min(chunk);
                region.kernel_write(range.start, &stream(2, self.server.sent, n));
                self.server.sent += n;
                self.done.push(Done::Received(Ok(n)));
                self.recv = None;
            } else if self.server.reset {
                self.done.push(Done::Received(Err(IoError::Other)));
                self.recv = None;
            } else if self.server.eof {
                self.done.push(Done::Received(Ok(0)));
                self.recv = None;
            }
        }
    }

    /// Hands the flow its completions, in order or reversed.
    fn deliver(&mut self, reversed: bool) {
        let mut batch: Vec<Done> = self.done.drain(..).collect();
        if reversed {
            batch.reverse();
        }
        let Some(flow) = &mut self.flow else {
            assert!(batch.is_empty(), "completions without a flow");
            return;
        };
        self.woken |= !batch.is_empty();
        for done in batch {
            match done {
                Done::Connect(result) => {
                    self.connect_pending = false;
                    flow.on_connected(result);
                }
                Done::Sent(result) => {
                    self.send_errors |= result.is_err();
                    flow.on_sent(result);
                }
                Done::Received(result) => {
                    flow.on_received(result);
                }
            }
        }
    }

    /// The flow's two polls, their actions carried out as the loop would.
    fn run_flow(&mut self) {
        self.woken = false;
        let Some(flow) = &mut self.flow else {
            return;
        };
        let mut actions = Actions::default();
        flow.poll_relay(&mut actions);
        let relay: Vec<Action> = actions.drain().collect();
        for action in relay {
            self.carry_out(action);
        }
        let Some(flow) = &mut self.flow else {
            return;
        };
        let iface = self.stack.ifaces.serving(&flow.key().server.addr);
        self.next = flow.poll(
            self.now,
            iface,
            &mut self.stack.tx,
            &mut self.budget,
            &mut actions,
        );
        let lifecycle: Vec<Action> = actions.drain().collect();
        for action in lifecycle {
            self.carry_out(action);
        }
    }

    fn carry_out(&mut self, action: Action) {
        let flow = self.flow.as_mut().expect("an action without a flow");
        let size = flow.region().len();
        match action {
            Action::Send(range) => {
                assert!(!self.closed, "send after close");
                assert!(self.send.is_none(), "two sends in flight");
                assert!(!range.is_empty() && range.end <= size, "send {range:?}");
                self.send = Some(range);
            }
            Action::Recv(range) => {
                assert!(!self.closed, "receive after close");
                assert!(self.recv.is_none(), "two receives in flight");
                assert!(!range.is_empty() && range.end <= size, "receive {range:?}");
                self.recv = Some(range);
            }
            Action::Shutdown => {
                assert!(!self.closed, "shutdown after close");
                flow.on_shutdown(Ok(()));
                self.woken = true;
            }
            Action::Cancel => {
                if self.send.take().is_some() {
                    self.done.push(Done::Sent(Err(IoError::Cancelled)));
                }
                if self.recv.take().is_some() {
                    self.done.push(Done::Received(Err(IoError::Cancelled)));
                }
            }
            Action::Close => self.closed = true,
            Action::Free(_) => {
                assert!(self.closed, "freed before its socket was closed");
                let in_flight = self.done.len()
                    + usize::from(self.send.is_some())
                    + usize::from(self.recv.is_some())
                    + usize::from(self.connect_pending);
                assert_eq!(in_flight, 0, "freed with operations in flight");
                let mut flow = self.flow.take().unwrap();
                flow.release(&mut self.budget);
                assert_eq!(self.budget.used(), 0, "the flow's share came back");
                assert!(flow.into_region().is_some(), "its memory is still held");
                self.next = Next::default();
            }
            Action::UserTimeout(_) | Action::Linger0 => {}
            Action::Discard(range) => {
                // Never pages an operation in flight reads or writes.
                assert!(range.end <= size, "discard {range:?}");
                for busy in [&self.send, &self.recv].into_iter().flatten() {
                    let apart = range.end <= busy.start || busy.end <= range.start;
                    assert!(apart, "discard {range:?} under {busy:?}");
                }
                flow.region().discard(range);
            }
        }
    }

    /// Submits the packets the pool filled: TCP to the client, the rest checked here.
    /// Their buffers come back at once unless writes are held, and after `HOLD_LIMIT` if
    /// they are.
    fn flush_tx(&mut self) {
        let mut written = Vec::new();
        self.stack.tx.take_ready(|index, slice| {
            written.push((index, slice.region.with_mut(slice.range, |b| b.to_vec())));
        });
        for (index, framed) in written {
            let (packet, segment_size) = if self.offload.vnet_header() {
                let (header, packet) = vnet::Header::parse(&framed).expect("our own vnet header");
                let uso = header.gso == vnet::Gso::UdpL4;
                (packet.to_vec(), uso.then_some(header.gso_size))
            } else {
                (framed, None)
            };
            self.check_sent(packet, segment_size);
            self.held.push_back((index, self.now));
        }
        // Submitted in order, so the oldest come back first.
        while let Some(&(index, at)) = self.held.front() {
            if self.hold_writes && self.now - at < HOLD_LIMIT {
                break;
            }
            self.held.pop_front();
            self.stack.tx.release(index);
            // The loop wakes the flows that found no buffer when one comes back.
            if self.next.starved
                && let Some(flow) = &mut self.flow
            {
                flow.on_tx_buffer();
                self.woken = true;
            }
        }
    }

    /// A packet the proxy wrote to the TUN (a UDP super-packet of datagrams of
    /// `segment_size` bytes, the kernel to split it).
    fn check_sent(&mut self, packet: Vec<u8>, segment_size: Option<u16>) {
        let (protocol, payload_at) = match packet[0] >> 4 {
            4 => {
                let ip = Ipv4Packet::new_checked(&packet[..]).expect("a valid IPv4 packet");
                assert!(ip.verify_checksum(), "IPv4 header checksum");
                (ip.next_header(), usize::from(ip.header_len()))
            }
            6 => {
                let ip = Ipv6Packet::new_checked(&packet[..]).expect("a valid IPv6 packet");
                (ip.next_header(), 40)
            }
            version => panic!("IP version {version} written"),
        };
        match protocol {
            IpProtocol::Tcp => self.down.push_back(packet),
            IpProtocol::Udp => {
                let Parsed::Udp {
                    key,
                    payload_start,
                    payload_len,
                } = wire::parse(&packet)
                else {
                    panic!("a UDP reply that does not parse");
                };
                let payload = &packet[payload_start..payload_start + payload_len];
                let datagrams: Vec<&[u8]> = match segment_size {
                    Some(size) => payload.chunks(usize::from(size)).collect(),
                    None => vec![payload],
                };
                for datagram in datagrams {
                    let expected = self.replies.get_mut(&key).and_then(VecDeque::pop_front);
                    assert_eq!(expected.as_deref(), Some(datagram), "an unexpected reply");
                }
            }
            IpProtocol::Icmp | IpProtocol::Icmpv6 => {
                let message = &packet[payload_at..];
                match message[0] {
                    // Echo replies.
                    0 | 129 => {
                        let (src, dst) = addresses(&packet);
                        let ident = u16::from_be_bytes([message[4], message[5]]);
                        let key = FlowKey {
                            client: IpEndpoint::new(src, 0),
                            server: IpEndpoint::new(dst, ident),
                        };
                        let expected = self.replies.get_mut(&key).and_then(VecDeque::pop_front);
                        assert_eq!(expected.as_deref(), Some(&message[8..]), "an echo reply");
                    }
                    // Destination unreachable: a datagram flow's (quoting UDP), or a TCP
                    // flow's whose server proved unreachable.
                    3 | 1 => {
                        let quoted = &message[8..];
                        let protocol = if quoted[0] >> 4 == 4 {
                            quoted[9]
                        } else {
                            quoted[6]
                        };
                        if protocol == u8::from(IpProtocol::Udp) {
                            assert!(self.icmp_errors > 0, "an ICMP error for no failure");
                            self.icmp_errors -= 1;
                        }
                    }
                    other => panic!("ICMP type {other} written"),
                }
            }
            other => panic!("{other} written"),
        }
    }

    /// An arbitrary packet from the TUN (its virtio-net header too).
    fn inject(&mut self, u: &mut Unstructured) -> Arb<()> {
        let len = u.int_in_range(0..=300usize)?;
        let packet = u.bytes(len.min(u.len()))?.to_vec();
        self.taint_if_ours(&packet[self.offload.header_len().min(packet.len())..]);
        self.dispatch(&packet);
        Ok(())
    }

    /// The client's last packet with a few bytes changed, sent again.
    fn inject_mutated(&mut self, u: &mut Unstructured) -> Arb<()> {
        let mut packet = self.last_up.clone();
        if packet.is_empty() {
            return Ok(());
        }
        for _ in 0..u.int_in_range(1..=4u8)? {
            let at = u.choose_index(packet.len())?;
            packet[at] ^= u.arbitrary::<u8>()?;
        }
        if u.arbitrary::<bool>()? {
            packet.truncate(u.choose_index(packet.len())? + 1);
        }
        self.taint_if_ours(&packet);
        let framed = self.framed(&packet, vnet::Header::PLAIN);
        self.dispatch(&framed);
        Ok(())
    }

    fn taint_if_ours(&mut self, packet: &[u8]) {
        if matches!(wire::parse(packet), Parsed::Tcp { .. }) {
            self.tainted = true;
        }
    }

    /// A UDP datagram from the client, with segmentation offload a super-packet of
    /// several.
    fn client_datagram(&mut self, u: &mut Unstructured) -> Arb<()> {
        let port = *u.choose(&[53, 443, 5353])?;
        let len = u.int_in_range(0..=4000usize)?;
        let payload = stream(u.arbitrary()?, 0, len);
        let (src, dst) = (
            client_endpoint(self.v6, port),
            server_endpoint(self.v6, port),
        );
        let udp = UdpRepr {
            src_port: src.port,
            dst_port: dst.port,
        };
        let ip = IpRepr::new(src.addr, dst.addr, IpProtocol::Udp, 8 + len, 64);
        let mut packet = vec![0u8; ip.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut packet[..], &caps);
        let at = ip.header_len();
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut packet[at..]),
            &src.addr,
            &dst.addr,
            len,
            |data| data.copy_from_slice(&payload),
            &caps,
        );
        let header = if self.offload == Offload::Uso && u.arbitrary::<bool>()? {
            vnet::Header {
                needs_csum: true,
                gso: vnet::Gso::UdpL4,
                ecn: false,
                hdr_len: (at + 8) as u16,
                gso_size: u.int_in_range(1..=1472u16)?,
                csum_start: at as u16,
                csum_offset: 6,
            }
        } else {
            vnet::Header::PLAIN
        };
        let framed = self.framed(&packet, header);
        self.dispatch(&framed);
        Ok(())
    }

    /// A ping from the client.
    fn client_echo(&mut self, u: &mut Unstructured) -> Arb<()> {
        let ident = u.int_in_range(1..=4u16)?;
        let data = stream(3, 0, u.int_in_range(0..=200usize)?);
        let (src, dst) = (client_endpoint(self.v6, 0), server_endpoint(self.v6, 0));
        let caps = ChecksumCapabilities::default();
        let mut packet;
        match (src.addr, dst.addr) {
            (IpAddress::Ipv4(_), IpAddress::Ipv4(_)) => {
                let icmp = Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no: 1,
                    data: &data,
                };
                let ip = IpRepr::new(src.addr, dst.addr, IpProtocol::Icmp, icmp.buffer_len(), 64);
                packet = vec![0u8; ip.buffer_len()];
                ip.emit(&mut packet[..], &caps);
                let at = ip.header_len();
                icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut packet[at..]), &caps);
            }
            (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
                let icmp = Icmpv6Repr::EchoRequest {
                    ident,
                    seq_no: 1,
                    data: &data,
                };
                let ip = IpRepr::new(
                    src.addr,
                    dst.addr,
                    IpProtocol::Icmpv6,
                    icmp.buffer_len(),
                    64,
                );
                packet = vec![0u8; ip.buffer_len()];
                ip.emit(&mut packet[..], &caps);
                let at = ip.header_len();
                icmp.emit(
                    &s,
                    &d,
                    &mut Icmpv6Packet::new_unchecked(&mut packet[at..]),
                    &caps,
                );
            }
            _ => unreachable!("one family"),
        }
        let framed = self.framed(&packet, vnet::Header::PLAIN);
        self.dispatch(&framed);
        Ok(())
    }

    /// A datagram or echo request from the client, as `Proxy::on_datagram` takes it.
    fn datagram(&mut self, packet: &[u8], parsed: Parsed, udp_segment: Option<u16>) {
        let now = self.now;
        let (kind, key) = match parsed {
            Parsed::Udp { key, .. } => (Kind::Udp, key),
            Parsed::Echo { key, .. } => (Kind::Echo, key),
            _ => return,
        };
        let id = match self.datagrams.find(kind, key) {
            Some(id) => id,
            None => {
                if let Some(evicted) = self.datagrams.evict_for_new() {
                    self.close_datagram(evicted);
                }
                // A ping refused (every echo identifier towards its host taken) is
                // dropped, as the loop drops it.
                let Ok(id) = self.datagrams.open(kind, key, (), now) else {
                    return;
                };
                self.dgram.insert(
                    id,
                    Datagram {
                        kind,
                        key,
                        armed: false,
                    },
                );
                id
            }
        };
        match parsed {
            Parsed::Udp {
                payload_start,
                payload_len,
                ..
            } => {
                self.datagrams.on_datagram(id, now, Some(Quote::of(packet)));
                let payload = &packet[payload_start..payload_start + payload_len];
                let parts: Vec<&[u8]> =
                    udp::datagrams(payload, udp_segment, udp::MAX_DATAGRAM).collect();
                assert_eq!(parts.concat(), payload, "the datagrams are the payload");
                let bytes = parts.iter().map(|part| part.len()).sum();
                self.datagrams.relayed_up(id, parts.len(), bytes);
            }
            _ => {
                self.datagrams.on_datagram(id, now, None);
                self.datagrams.relayed_up(id, 1, 8);
            }
        }
        if self.datagrams.arm_recv(id) {
            self.dgram.get_mut(&id).expect("a known flow").armed = true;
        }
    }

    /// A flow with a receive armed, chosen by the fuzzer.
    fn armed(&self, u: &mut Unstructured) -> Arb<Option<Id>> {
        let mut armed: Vec<Id> = self
            .dgram
            .iter()
            .filter(|(_, flow)| flow.armed)
            .map(|(&id, _)| id)
            .collect();
        armed.sort_by_key(|id| (id.slot, id.generation));
        if armed.is_empty() {
            return Ok(None);
        }
        Ok(Some(armed[u.choose_index(armed.len())?]))
    }

    /// The server answers a datagram flow (for a ping: the raw socket's bytes).
    fn server_datagram(&mut self, u: &mut Unstructured) -> Arb<()> {
        let Some(id) = self.armed(u)? else {
            return Ok(());
        };
        let more = u.arbitrary::<bool>()?;
        let len = u.int_in_range(0..=2000usize)?;
        let payload = stream(4, 0, len);
        // Now and then several datagrams in one receive, as UDP_GRO coalesces them.
        let segment_size = match u.int_in_range(0..=3u8)? {
            0 => Some(u.int_in_range(1..=1400u16)?),
            _ => None,
        };
        let flow = &self.dgram[&id];
        let (kind, key) = (flow.kind, flow.key);
        let received = match kind {
            Kind::Udp => payload.clone(),
            Kind::Echo => {
                let ident = self.datagrams.get(id).expect("open").echo_ident();
                // Another ping's reply now and then: not this flow's.
                let ident = if u.arbitrary::<u8>()? == 0 {
                    !ident
                } else {
                    ident
                };
                raw_echo_reply(key, ident, &payload)
            }
        };
        let segment_size = segment_size.filter(|_| kind == Kind::Udp);
        let mut ranges = Vec::new();
        datagram::split(&received, segment_size, &mut ranges);
        // The simulated kernel has no provided buffers: replies are copied, as through a
        // relay (the gathered path's buffer handling is the ring's, tested there).
        let batch = Arrival {
            bytes: &received,
            datagrams: &ranges,
            received_in: None,
        };
        let down_before = self.datagrams.counters.datagrams_down;
        let result = self
            .datagrams
            .on_received(id, self.now, Ok(batch), more, &mut self.stack.tx);
        // Written in order until the buffers ran out: the first ones went.
        let written = (self.datagrams.counters.datagrams_down - down_before) as usize;
        let back = FlowKey {
            client: key.server,
            server: key.client,
        };
        let queue = self.replies.entry(back).or_default();
        match kind {
            Kind::Udp => queue.extend(
                ranges
                    .iter()
                    .take(written)
                    .map(|r| payload[r.clone()].to_vec()),
            ),
            Kind::Echo if written > 0 => queue.push_back(payload),
            Kind::Echo => {}
        }
        self.received(id, more, result);
        Ok(())
    }

    /// The server's side fails: an ICMP error the kernel turned into an errno, as the
    /// event loop tells it to the flow.
    fn server_error(&mut self, u: &mut Unstructured) -> Arb<()> {
        let Some(id) = self.armed(u)? else {
            return Ok(());
        };
        let error = *u.choose(&[
            RecvError::Unreachable(Reason::Port),
            RecvError::Unreachable(Reason::Host),
            RecvError::Unreachable(Reason::Network),
            RecvError::Other,
            RecvError::NoBuffers,
        ])?;
        let more = u.arbitrary::<bool>()?;
        let (errors, drops) = (
            self.datagrams.counters.recv_errors,
            self.datagrams.counters.reply_drops,
        );
        let result = self
            .datagrams
            .on_received(id, self.now, Err(error), more, &mut self.stack.tx);
        let reported =
            matches!(error, RecvError::Unreachable(_)) && self.dgram[&id].kind == Kind::Udp;
        if reported
            && self.datagrams.counters.recv_errors > errors
            && self.datagrams.counters.reply_drops == drops
        {
            self.icmp_errors += 1;
        }
        self.received(id, more, result);
        Ok(())
    }

    /// What the loop does after a receive completion of flow `id`.
    fn received(&mut self, id: Id, more: bool, result: Received) {
        if !more {
            self.dgram.get_mut(&id).expect("a known flow").armed = false;
        }
        match result {
            Received::Rearm => {
                assert!(!more, "re-armed while armed");
                assert!(self.datagrams.arm_recv(id));
                self.dgram.get_mut(&id).unwrap().armed = true;
            }
            Received::Close => {
                self.datagrams.remove(id).expect("the closing flow");
                self.dgram.remove(&id);
            }
            Received::Nothing => {}
        }
    }

    /// Starts closing datagram flow `id`: its cancelled receive completes at once.
    fn close_datagram(&mut self, id: Id) {
        match self.datagrams.close(id) {
            Closing::Cancel => {
                let result = self.datagrams.on_received(
                    id,
                    self.now,
                    Err(RecvError::Other),
                    false,
                    &mut self.stack.tx,
                );
                assert_eq!(result, Received::Close, "a cancelled receive closes");
                self.datagrams.remove(id).expect("the closing flow");
            }
            Closing::Now => {
                self.datagrams.remove(id).expect("the flow");
            }
        }
        self.dgram.remove(&id);
    }

    /// Datagram flows idle past their timeout are closed.
    fn expire(&mut self) {
        while let Some(id) = self.datagrams.expired(self.now) {
            self.close_datagram(id);
        }
        if let Some(at) = self.datagrams.next_expiry() {
            assert!(at > self.now, "a flow past its expiry stays");
        }
    }

    /// A clean network from here on: if the flow is open with its client established,
    /// every byte planned either way arrives, and then both close and the flow is
    /// freed, within bounded simulated time. The loop runs the flow only when woken.
    fn settle(&mut self) {
        self.hold_writes = false;
        self.flush_tx();
        let open = self
            .flow
            .as_ref()
            .is_some_and(|flow| flow.phase() == Phase::Open);
        let healthy = !self.tainted
            && !self.client_closed
            && !self.client_aborted
            && !self.server.reset
            && !self.server.eof
            && !self.send_errors
            && open
            && self.client().state() == State::Established;
        self.server.stalled = false;
        let start = self.now;
        if healthy {
            let done = |h: &mut Harness| {
                h.client_written == h.client_planned
                    && h.server.received.len() == h.client_planned
                    && h.client_got.len() == h.server.planned
            };
            self.run_until(start, done, "transfer");
            // Both close: the flow must end.
            self.client().close();
            self.server.eof = true;
            self.run_until(start, |h| h.flow.is_none(), "close");
        }
        for (key, left) in &self.replies {
            assert!(
                left.is_empty(),
                "replies to {key:?} never sent: {}",
                left.len()
            );
        }
        assert_eq!(self.icmp_errors, 0, "ICMP errors counted as sent, not sent");
    }

    fn run_until(
        &mut self,
        start: Instant,
        mut done: impl FnMut(&mut Harness) -> bool,
        what: &str,
    ) {
        for turns in 0.. {
            if done(self) {
                return;
            }
            let state = self.client_sockets.get::<tcp::Socket>(self.client).state();
            assert!(
                self.now - start < SETTLE_LIMIT && turns < SETTLE_TURNS,
                "{what} not done in {SETTLE_LIMIT} or {SETTLE_TURNS} turns (mtu {}, {:?}): client {} wrote {}/{} got {}, \
                 server got {} sent {}/{}, flow {:?}, next {:?}",
                self.mtu,
                self.offload,
                state,
                self.client_written,
                self.client_planned,
                self.client_got.len(),
                self.server.received.len(),
                self.server.sent,
                self.server.planned,
                self.flow.as_ref().map(Flow::describe),
                self.next,
            );
            let tick = self.next_tick();
            self.turn(0, u16::MAX, tick);
        }
    }

    /// Turns on a clean network until `duration` has passed.
    fn wait(&mut self, duration: Duration) {
        let end = self.now + duration;
        for _ in 0..SETTLE_TURNS {
            if self.now >= end {
                return;
            }
            let tick = self.next_tick().min(end - self.now);
            self.turn(0, u16::MAX, tick);
        }
    }

    /// How far the clock moves in a turn: a millisecond while packets or completions
    /// are in flight, else to the next timer of the client or the flow (at most 1 s).
    fn next_tick(&mut self) -> Duration {
        let quiet = self.up.is_empty() && self.down.is_empty() && self.done.is_empty();
        let client_at = self
            .client_iface
            .poll_at(self.now, &self.client_sockets)
            .unwrap_or(self.now + Duration::from_secs(1));
        let flow_at = self.next.deadline.unwrap_or(client_at);
        let tick = if quiet && !self.woken && !self.next.again {
            (client_at.min(flow_at) - self.now).max(Duration::from_millis(1))
        } else {
            Duration::from_millis(1)
        };
        tick.min(Duration::from_secs(1))
    }
}

/// Drops, duplicates or reverses the packets in `queue`, as `faults` (low bits) says.
fn disturb(queue: &mut VecDeque<Vec<u8>>, faults: u8) {
    if faults & 1 != 0 {
        queue.pop_front();
    }
    if faults & 2 != 0
        && let Some(first) = queue.front().cloned()
    {
        queue.push_back(first);
    }
    if faults & 4 != 0 {
        queue.make_contiguous().reverse();
    }
}

fn client_endpoint(v6: bool, port: u16) -> IpEndpoint {
    let addr = if v6 {
        IpAddress::v6(0xfd00, 0, 0, 0, 0, 0, 0, 1)
    } else {
        IpAddress::v4(198, 18, 0, 1)
    };
    IpEndpoint::new(addr, if port == 0 { 0 } else { CLIENT_PORT + 1 })
}

fn server_endpoint(v6: bool, port: u16) -> IpEndpoint {
    let addr = if v6 {
        IpAddress::v6(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80)
    } else {
        IpAddress::v4(192, 0, 2, 80)
    };
    IpEndpoint::new(addr, port)
}

fn addresses(packet: &[u8]) -> (IpAddress, IpAddress) {
    match packet[0] >> 4 {
        4 => {
            let ip = Ipv4Packet::new_unchecked(packet);
            (ip.src_addr().into(), ip.dst_addr().into())
        }
        _ => {
            let ip = Ipv6Packet::new_unchecked(packet);
            (ip.src_addr().into(), ip.dst_addr().into())
        }
    }
}

/// What a raw ICMP socket of flow `key` delivers for an echo reply with `ident`: the IP
/// header too for IPv4, the message alone for IPv6.
fn raw_echo_reply(key: FlowKey, ident: u16, data: &[u8]) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    match (key.server.addr, key.client.addr) {
        (IpAddress::Ipv4(_), _) => {
            let icmp = Icmpv4Repr::EchoReply {
                ident,
                seq_no: 1,
                data,
            };
            let ip = IpRepr::new(
                key.server.addr,
                IpAddress::v4(10, 0, 0, 1),
                IpProtocol::Icmp,
                icmp.buffer_len(),
                64,
            );
            let mut packet = vec![0u8; ip.buffer_len()];
            ip.emit(&mut packet[..], &caps);
            let at = ip.header_len();
            icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut packet[at..]), &caps);
            packet
        }
        (IpAddress::Ipv6(server), _) => {
            let icmp = Icmpv6Repr::EchoReply {
                ident,
                seq_no: 1,
                data,
            };
            let local = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x99);
            let mut packet = vec![0u8; icmp.buffer_len()];
            icmp.emit(
                &server,
                &local,
                &mut Icmpv6Packet::new_unchecked(&mut packet[..]),
                &caps,
            );
            packet
        }
    }
}
