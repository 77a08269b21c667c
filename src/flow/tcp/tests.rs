//! In-process tests of the TCP flow: a smoltcp client talks to the flow through the
//! proxy's own interface and transmit pool over in-memory queues, a simulated server
//! plays the outbound socket (its completions delivered in order, or in seeded shuffled
//! orders with partial sends), and time is a simulated clock, so lifecycle rules that
//! take minutes run in microseconds.

use std::collections::VecDeque;

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{IpAddress, IpEndpoint, IpProtocol, Ipv4Address, Ipv4Packet, TcpPacket};

use super::*;
use crate::flow::budget::{Budget, FLOOR};
use crate::stack::client::QueueDevice;
use crate::stack::{self, Claim, StackDevice, TxPool};
use crate::uring::Region;
use crate::wire::{self, Offload, Parsed};

/// The MTU of the TUN and of the client's link, unless a test sets another.
const MTU: usize = 1500;
const SERVER: IpEndpoint = IpEndpoint {
    addr: IpAddress::Ipv4(Ipv4Address::new(192, 0, 2, 80)),
    port: 80,
};
const FLOW_BUFFER: usize = 64 * 1024;

impl Flow {
    /// The client's bytes the flow holds.
    fn rx_held(&self) -> usize {
        self.memory
            .get(|sockets| sockets.set.get::<tcp::Socket>(sockets.handle).recv_queue())
    }
}

/// xorshift64: the seeded choices of the shuffled runs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A completion the simulated kernel has produced and not yet delivered.
#[derive(Debug)]
enum Done {
    Connect(Result<(), IoError>),
    Sent(Result<usize, IoError>),
    Received(Result<usize, IoError>),
}

/// What the simulated server does with the outbound socket.
#[derive(Default)]
struct Server {
    /// Bytes the server sends, delivered through the flow's receives.
    to_send: VecDeque<u8>,
    /// Once `to_send` is empty: end with EOF (FIN) instead of waiting for more.
    eof: bool,
    /// Once `to_send` is empty: fail the pending receive with ECONNRESET.
    reset: bool,
    /// Leave sends in flight (a server that stops reading) until this is cleared.
    stall_sends: bool,
    received: Vec<u8>,
    shutdowns: usize,
}

/// How the simulated kernel delivers completions, and when the flow runs.
#[derive(Clone, Copy, Debug)]
enum Order {
    /// All at once, in the order they happened; the flow runs every step.
    Instant,
    /// A random number of them each step, in random order; sends take a random prefix.
    Shuffled(u64),
    /// Shuffled, with a pool of two TUN write buffers, and the flow runs only when the
    /// event loop would run it: a packet, a completion, or what its last `Next` asked
    /// for. A missing wake-up then stalls the test instead of going unnoticed.
    Strict(u64),
}

struct Harness {
    now: Instant,
    client_iface: Interface,
    client_dev: QueueDevice,
    client_sockets: SocketSet<'static>,
    client: SocketHandle,
    proxy_iface: Interface,
    tx: TxPool,
    flow: Option<Flow>,
    server: Server,
    /// A send held back by `stall_sends`: its range.
    stalled_send: Option<Range<usize>>,
    /// A receive waiting for the server to have something: its range.
    pending_recv: Option<Range<usize>>,
    done: Vec<Done>,
    order: Order,
    rng: Rng,
    /// Actions of the flow's polls, other than relay I/O, in order.
    lifecycle: Vec<Action>,
    freed: Option<Option<Failure>>,
    closed: bool,
    /// Keep the client's packets from the flow (the client vanished).
    client_gone: bool,
    /// What the flow's last poll asked for (`Order::Strict`).
    next: Next,
    budget: Budget,
    /// Something happened since the last poll that would make the loop run the flow.
    woken: bool,
    /// The outbound connect is in flight.
    connect_pending: bool,
    /// ICMP packets the flow sent the client.
    icmp_to_client: usize,
    /// The pure ACKs the flow sent the client: when, their acknowledgement number and
    /// window field.
    pure_acks: Vec<(Instant, u32, u16)>,
    /// When the client's segments beyond the window (zero-window probes) came.
    probes: Vec<Instant>,
    /// The SOCKS5 handshake the flow is created with (`None`: a direct flow).
    upstream: Option<Handshake>,
    mtu: usize,
    /// Each of the flow's buffers (`FLOW_BUFFER` unless a test changes it first).
    buffer: usize,
    /// The flow takes one of the client's packets per step, the rest waiting their turn
    /// (a slow link): its ACKs then go out between the client's segments.
    trickle: bool,
}

fn client_socket() -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; 64 * 1024]),
        tcp::SocketBuffer::new(vec![0u8; 64 * 1024]),
    )
}

impl Harness {
    fn new(server: Server, order: Order) -> Harness {
        Harness::with_mtu(server, order, MTU)
    }

    /// A harness whose TUN and client link have this MTU (the client announces the MSS
    /// it allows).
    fn with_mtu(server: Server, order: Order, mtu: usize) -> Harness {
        let now = Instant::from_millis(1);
        let mut client_dev = QueueDevice::new(mtu, false);
        let client_iface = stack::client::interface(&mut client_dev, false, now);
        let mut client_sockets = SocketSet::new(Vec::new());
        let client = client_sockets.add(client_socket());
        let buffers = if matches!(order, Order::Strict(_)) {
            2
        } else {
            64
        };
        let mut tx = TxPool::new(buffers, mtu, Offload::None).unwrap();
        let proxy_iface = stack::new_interface(
            &mut StackDevice::for_interface(&mut tx, smoltcp::wire::IpVersion::Ipv4),
            now,
            7,
        );
        let seed = match order {
            Order::Instant => 1,
            Order::Shuffled(seed) | Order::Strict(seed) => seed.max(1),
        };
        let mut harness = Harness {
            now,
            client_iface,
            client_dev,
            client_sockets,
            client,
            proxy_iface,
            tx,
            flow: None,
            server,
            stalled_send: None,
            pending_recv: None,
            done: Vec::new(),
            order,
            rng: Rng(seed),
            lifecycle: Vec::new(),
            freed: None,
            closed: false,
            client_gone: false,
            next: Next::default(),
            woken: false,
            budget: Budget::new(1 << 30),
            connect_pending: false,
            icmp_to_client: 0,
            pure_acks: Vec::new(),
            probes: Vec::new(),
            upstream: None,
            mtu,
            buffer: FLOW_BUFFER,
            trickle: false,
        };
        let cx = harness.client_iface.context();
        harness
            .client_sockets
            .get_mut::<tcp::Socket>(client)
            .connect(cx, SERVER, 40000)
            .unwrap();
        harness
    }

    fn client(&mut self) -> &mut tcp::Socket<'static> {
        self.client_sockets.get_mut::<tcp::Socket>(self.client)
    }

    fn flow(&self) -> &Flow {
        self.flow.as_ref().expect("no flow yet")
    }

    /// The outbound connect completes with `result`.
    fn connected(&mut self, result: Result<(), IoError>) {
        self.done.push(Done::Connect(result));
    }

    /// Operations the flow has in flight, as the simulated kernel sees them.
    fn in_flight(&self) -> usize {
        self.done.len()
            + usize::from(self.stalled_send.is_some())
            + usize::from(self.pending_recv.is_some())
            + usize::from(self.connect_pending)
    }

    /// One round: the client runs, its packets reach the flow, completions are
    /// delivered, the flow runs (relay I/O, then egress and lifecycle), its packets
    /// reach the client, and the clock moves on by `tick`.
    fn step_by(&mut self, tick: Duration) {
        if !self.client_gone {
            self.client_iface
                .poll(self.now, &mut self.client_dev, &mut self.client_sockets);
        }
        while let Some(packet) = self.client_dev.sent.pop_front() {
            self.flow_ingress(&packet);
            if self.trickle {
                break;
            }
        }
        // The kernel and the server go on whether the flow runs or not.
        if self.flow.is_some() {
            self.serve_pending();
        }
        self.deliver();
        let due = self.next.again || self.next.deadline.is_some_and(|at| at <= self.now);
        let wanted = !matches!(self.order, Order::Strict(_)) || self.woken || due;
        if self.flow.is_some() && self.freed.is_none() && wanted {
            self.woken = false;
            self.run_flow();
        }
        let mut delivered = Vec::new();
        self.tx.take_ready(|index, slice| {
            delivered.push((index, slice.region.with_mut(slice.range, |b| b.to_vec())));
        });
        for (index, packet) in delivered {
            self.tx.release(index);
            // The loop wakes the flows that found no buffer when one comes back.
            if let Some(flow) = &mut self.flow
                && self.next.starved
            {
                flow.on_tx_buffer();
                self.woken = true;
            }
            let Ok(ip) = Ipv4Packet::new_checked(&packet[..]) else {
                panic!("the flow sent the client a non-IPv4 packet");
            };
            self.icmp_to_client += usize::from(ip.next_header() == IpProtocol::Icmp);
            if ip.next_header() == IpProtocol::Tcp
                && let Ok(tcp) = TcpPacket::new_checked(ip.payload())
                && tcp.ack()
                && tcp.payload().is_empty()
            {
                let ack = tcp.ack_number().0 as u32;
                self.pure_acks.push((self.now, ack, tcp.window_len()));
            }
            if !self.client_gone {
                self.client_dev.inbox.push_back(packet);
            }
        }
        self.now += tick;
    }

    fn step(&mut self) {
        self.step_by(Duration::from_millis(1));
    }

    fn flow_ingress(&mut self, packet: &[u8]) {
        let Parsed::Tcp { key, opens, mss } = wire::parse(packet) else {
            panic!("client sent a non-TCP packet");
        };
        assert_eq!(key.server, SERVER);
        if self.flow.is_none() && opens {
            let settings = Settings {
                buffer: self.buffer,
                mtu: self.mtu as u32,
            };
            let region = Region::new(Flow::memory_needed(settings)).unwrap();
            let upstream = self.upstream.take();
            self.flow = Some(Flow::new(
                key,
                mss,
                Quote::of(packet),
                settings,
                region,
                upstream,
            ));
            self.connect_pending = true;
        }
        if self.freed.is_some() {
            return;
        }
        let flow = self.flow.as_mut().expect("segment before SYN");
        if !flow.on_segment(self.now, &mut self.proxy_iface, &mut self.tx, packet) {
            // Beyond the window: a zero-window probe.
            self.probes.push(self.now);
        }
        self.woken = true;
    }

    /// Hands the flow its completions: all in order, or a shuffled random subset.
    fn deliver(&mut self) {
        let batch: Vec<Done> = match self.order {
            Order::Instant => self.done.drain(..).collect(),
            Order::Shuffled(_) | Order::Strict(_) => {
                let take = if self.done.is_empty() {
                    0
                } else {
                    self.rng.below(self.done.len() + 1)
                };
                (0..take)
                    .map(|_| {
                        let at = self.rng.below(self.done.len());
                        self.done.swap_remove(at)
                    })
                    .collect()
            }
        };
        let Some(flow) = self.flow.as_mut() else {
            assert!(batch.is_empty());
            return;
        };
        self.woken |= !batch.is_empty();
        for done in batch {
            match done {
                Done::Connect(result) => {
                    self.connect_pending = false;
                    flow.on_connected(result);
                }
                Done::Sent(result) => drop(flow.on_sent(result)),
                Done::Received(result) => drop(flow.on_received(result)),
            }
        }
    }

    /// The flow's polls, with the simulated kernel carrying out their actions.
    fn run_flow(&mut self) {
        let mut actions = Actions::default();
        self.flow.as_mut().unwrap().poll_relay(&mut actions);
        let relay_io: Vec<Action> = actions.drain().collect();
        for action in relay_io {
            self.carry_out(action);
        }
        let flow = self.flow.as_mut().unwrap();
        self.next = flow.poll(
            self.now,
            &mut self.proxy_iface,
            &mut self.tx,
            &mut self.budget,
            &mut actions,
        );
        let lifecycle: Vec<Action> = actions.drain().collect();
        for action in lifecycle {
            self.carry_out(action);
        }
    }

    fn carry_out(&mut self, action: Action) {
        assert!(self.freed.is_none(), "{action:?} after Free");
        let region = self.flow().region().clone();
        match action {
            Action::Send(range) => {
                assert!(!self.closed, "send after close");
                assert!(self.stalled_send.is_none(), "two sends in flight");
                self.stalled_send = Some(range);
            }
            Action::Recv(range) => {
                assert!(!self.closed, "receive after close");
                assert!(self.pending_recv.is_none(), "two receives in flight");
                self.pending_recv = Some(range);
            }
            Action::Shutdown => {
                self.server.shutdowns += 1;
                self.flow.as_mut().unwrap().on_shutdown(Ok(()));
                self.woken = true;
            }
            Action::Cancel => {
                if self.stalled_send.take().is_some() {
                    self.done.push(Done::Sent(Err(IoError::Cancelled)));
                }
                if self.pending_recv.take().is_some() {
                    self.done.push(Done::Received(Err(IoError::Cancelled)));
                }
                self.lifecycle.push(action);
            }
            Action::Close => {
                self.closed = true;
                self.lifecycle.push(action);
            }
            Action::Free(failure) => {
                assert!(self.closed, "freed before its socket was closed");
                self.flow.as_mut().unwrap().release(&mut self.budget);
                assert_eq!(self.budget.used(), 0, "the flow's share came back");
                assert_eq!(
                    self.in_flight(),
                    0,
                    "freed with operations in flight: {:?}",
                    self.done
                );
                self.freed = Some(failure);
            }
            Action::UserTimeout(_) | Action::Linger0 => self.lifecycle.push(action),
            Action::Discard(range) => {
                // Never pages an operation in flight reads or writes.
                for busy in [&self.stalled_send, &self.pending_recv]
                    .into_iter()
                    .flatten()
                {
                    let apart = range.end <= busy.start || busy.end <= range.start;
                    assert!(apart, "discard {range:?} under {busy:?}");
                }
                region.discard(range);
            }
        }
        drop(region);
    }

    /// The simulated server: takes sent bytes (unless stalled) and fills receives.
    fn serve_pending(&mut self) {
        let region = self.flow().region().clone();
        if !self.server.stall_sends
            && let Some(range) = self.stalled_send.take()
        {
            let len = match self.order {
                Order::Shuffled(_) | Order::Strict(_) if range.len() > 1 => {
                    1 + self.rng.below(range.len())
                }
                _ => range.len(),
            };
            let bytes = region.kernel_read(range.start..range.start + len);
            self.server.received.extend_from_slice(&bytes);
            self.done.push(Done::Sent(Ok(len)));
        }
        if let Some(range) = self.pending_recv.clone() {
            if !self.server.to_send.is_empty() {
                let n = range.len().min(self.server.to_send.len());
                let bytes: Vec<u8> = self.server.to_send.drain(..n).collect();
                region.kernel_write(range.start, &bytes);
                self.done.push(Done::Received(Ok(n)));
                self.pending_recv = None;
            } else if self.server.reset {
                self.done.push(Done::Received(Err(IoError::Other)));
                self.pending_recv = None;
            } else if self.server.eof {
                self.done.push(Done::Received(Ok(0)));
                self.pending_recv = None;
            }
        }
    }

    /// Steps until the server has `server_bytes` bytes and the client has read
    /// `download` bytes, the client sending `upload` as its window lets it and reading
    /// all that arrives; returns what it read.
    fn upload_and_download(
        &mut self,
        upload: &[u8],
        server_bytes: usize,
        download: usize,
    ) -> Vec<u8> {
        let mut offset = 0;
        let mut got = Vec::new();
        self.steps_until(20_000, |h| {
            let client = h.client();
            if offset < upload.len() && client.can_send() {
                offset += client.send_slice(&upload[offset..]).unwrap();
            }
            client_recv(h, &mut got);
            h.server.received.len() == server_bytes && got.len() == download
        });
        got
    }

    /// Steps (at most `limit`) until the server has all of `upload`, the client sending
    /// it from `offset` on as its window lets it; returns how long that took.
    fn finish_upload(&mut self, upload: &[u8], mut offset: usize, limit: usize) -> Duration {
        let start = self.now;
        self.steps_until(limit, |h| {
            let client = h.client();
            if offset < upload.len() && client.can_send() {
                offset += client.send_slice(&upload[offset..]).unwrap();
            }
            h.server.received.len() == upload.len()
        });
        self.now - start
    }

    fn steps_until(&mut self, limit: usize, mut done: impl FnMut(&mut Harness) -> bool) {
        for _ in 0..limit {
            if done(self) {
                return;
            }
            self.step();
        }
        let flow = self.flow.as_ref().map(Flow::describe);
        panic!(
            "condition not reached in {limit} steps: client {}, flow {flow:?}, freed {:?}",
            self.client().state(),
            self.freed
        );
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn connect(h: &mut Harness, result: Result<(), IoError>) {
    h.steps_until(5, |h| h.flow.is_some());
    h.connected(result);
}

/// A flow whose server has `download` to send, connected, its client established.
fn established(download: &[u8]) -> Harness {
    let mut h = Harness::new(
        Server {
            to_send: download.iter().copied().collect(),
            ..Server::default()
        },
        Order::Instant,
    );
    connect(&mut h, Ok(()));
    h.steps_until(50, |h| h.client().state() == State::Established);
    h
}

/// Moves what the client has received into `got`.
fn client_recv(h: &mut Harness, got: &mut Vec<u8>) {
    let client = h.client();
    while client.can_recv() {
        client
            .recv(|data| {
                got.extend_from_slice(data);
                (data.len(), ())
            })
            .unwrap();
    }
}

/// The orders every relay test runs in: in order, shuffled with 16 seeds, and strict
/// (run only when woken, two TUN write buffers) with 8.
fn orders() -> impl Iterator<Item = Order> {
    std::iter::once(Order::Instant)
        .chain((1..=16).map(Order::Shuffled))
        .chain((1..=8).map(Order::Strict))
}

#[test]
fn handshake_waits_for_the_outbound_connect() {
    let mut h = Harness::new(Server::default(), Order::Instant);
    for _ in 0..50 {
        h.step();
    }
    assert_eq!(
        h.client().state(),
        State::SynSent,
        "SYN|ACK must be held back"
    );
    assert_eq!(h.flow().phase(), Phase::Connecting);
    h.connected(Ok(()));
    h.steps_until(20, |h| h.client().state() == State::Established);
    assert_eq!(h.flow().phase(), Phase::Open);
}

#[test]
fn refused_connect_resets_the_client_and_frees_the_flow() {
    let mut h = Harness::new(Server::default(), Order::Instant);
    connect(&mut h, Err(IoError::Refused));
    h.steps_until(20, |h| {
        h.client().state() == State::Closed && h.freed.is_some()
    });
    assert_eq!(h.freed, Some(Some(Failure::ConnectRefused)));
    assert_eq!(h.lifecycle, [Action::Linger0, Action::Close]);
}

#[test]
fn an_unreachable_host_gets_the_client_an_icmp_error_not_a_rst() {
    let mut h = Harness::new(Server::default(), Order::Instant);
    connect(&mut h, Err(IoError::HostUnreachable));
    h.steps_until(5, |h| h.freed.is_some());
    assert_eq!(h.freed, Some(Some(Failure::HostUnreachable)));
    // The ICMP error went out in the last step; the client's socket has not seen a RST.
    let icmp: Vec<Vec<u8>> = h
        .client_dev
        .inbox
        .iter()
        .filter(|packet| {
            Ipv4Packet::new_checked(&packet[..])
                .is_ok_and(|ip| ip.next_header() == IpProtocol::Icmp)
        })
        .cloned()
        .collect();
    assert_eq!(icmp.len(), 1, "one ICMP error for the client");
    let ip = Ipv4Packet::new_checked(&icmp[0][..]).unwrap();
    assert_eq!(
        (ip.payload()[0], ip.payload()[1]),
        (3, 1),
        "host unreachable"
    );
    assert_eq!(IpAddress::Ipv4(ip.src_addr()), SERVER.addr);
    assert_eq!(h.client().state(), State::SynSent);
}

#[test]
fn each_connect_error_fails_the_flow_by_its_cause() {
    // (error, failure counted, the client reset rather than told by an ICMP error)
    let cases = [
        (IoError::Refused, Failure::ConnectRefused, true),
        (IoError::HostUnreachable, Failure::HostUnreachable, false),
        (IoError::NetUnreachable, Failure::NetUnreachable, false),
        (IoError::TimedOut, Failure::ConnectTimeout, true),
        // The connect's linked timeout fired.
        (IoError::Cancelled, Failure::ConnectTimeout, true),
        (IoError::Other, Failure::ConnectOther, true),
    ];
    for (error, failure, reset) in cases {
        let mut h = Harness::new(Server::default(), Order::Instant);
        connect(&mut h, Err(error));
        let client = if reset { State::Closed } else { State::SynSent };
        h.steps_until(20, |h| h.freed.is_some() && h.client().state() == client);
        assert_eq!(h.freed, Some(Some(failure)), "{error:?}");
    }
}

#[test]
fn bytes_flow_both_ways_in_any_completion_order() {
    let upload = pattern(100_000, 1);
    let download = pattern(150_000, 2);
    for order in orders() {
        let mut h = Harness::new(
            Server {
                to_send: download.iter().copied().collect(),
                ..Server::default()
            },
            order,
        );
        connect(&mut h, Ok(()));
        h.steps_until(50, |h| h.client().state() == State::Established);
        let mut offset = 0;
        let mut got = Vec::new();
        h.steps_until(20_000, |h| {
            let client = h.client();
            if offset < upload.len() && client.can_send() {
                offset += client.send_slice(&upload[offset..]).unwrap();
                if offset == upload.len() {
                    client.close(); // half-close: keep reading
                }
            }
            client_recv(h, &mut got);
            h.server.shutdowns == 1 && got.len() == download.len()
        });
        assert_eq!(
            h.server.received, upload,
            "client -> server bytes ({order:?})"
        );
        assert_eq!(got, download, "server -> client bytes ({order:?})");
        assert_eq!(
            h.client().state(),
            State::FinWait2,
            "only the client's FIN so far"
        );
        assert_eq!(h.flow().phase(), Phase::Open);

        h.server.eof = true;
        h.steps_until(500, |h| h.freed.is_some());
        assert_eq!(h.freed, Some(None), "a graceful end ({order:?})");
        assert_eq!(h.lifecycle, [Action::Close], "no RST for a graceful end");
        assert_eq!(h.server.shutdowns, 1);
    }
}

#[test]
fn a_server_reset_reaches_the_client_as_rst() {
    for order in orders() {
        let mut h = Harness::new(
            Server {
                to_send: pattern(10_000, 3).into_iter().collect(),
                reset: true,
                ..Server::default()
            },
            order,
        );
        connect(&mut h, Ok(()));
        h.steps_until(500, |h| {
            h.client().state() == State::Closed && h.freed.is_some()
        });
        assert_eq!(h.freed, Some(Some(Failure::ServerReset)), "{order:?}");
        assert_eq!(h.lifecycle.first(), Some(&Action::Linger0));
    }
}

#[test]
fn a_client_abort_cancels_outbound_io_before_the_flow_is_freed() {
    for order in orders() {
        let mut h = Harness::new(Server::default(), order);
        connect(&mut h, Ok(()));
        h.steps_until(50, |h| h.client().state() == State::Established);
        h.steps_until(50, |h| h.pending_recv.is_some());
        h.client().abort();
        h.steps_until(500, |h| h.freed.is_some());
        assert_eq!(h.freed, Some(Some(Failure::ClientReset)), "{order:?}");
        // The receive started while open was cancelled, and freeing waited for it.
        assert_eq!(
            h.lifecycle,
            [Action::Linger0, Action::Cancel, Action::Close]
        );
    }
}

#[test]
fn a_slow_client_stops_reads_from_the_server() {
    let mut h = Harness::new(
        Server {
            to_send: pattern(1_000_000, 4).into_iter().collect(),
            ..Server::default()
        },
        Order::Instant,
    );
    connect(&mut h, Ok(()));
    for _ in 0..2000 {
        h.step();
    }
    // The client never reads: only its window and the flow's send buffer may have left
    // the server.
    let taken = 1_000_000 - h.server.to_send.len();
    assert!(
        taken <= 64 * 1024 + FLOW_BUFFER,
        "server drained {taken} bytes"
    );
    assert!(taken > 0);
}

#[test]
fn client_bytes_still_buffered_when_both_sides_closed_reach_the_server() {
    let upload = pattern(12_000, 5);
    for order in orders() {
        let mut h = Harness::new(
            Server {
                eof: true,
                stall_sends: true,
                ..Server::default()
            },
            order,
        );
        connect(&mut h, Ok(()));
        h.steps_until(50, |h| h.client().state() == State::Established);
        h.client().send_slice(&upload).unwrap();
        h.client().close();
        // The server sends EOF at once but reads slowly: both FINs cross while the
        // client's bytes still sit in the flow, and the client's socket finishes.
        h.steps_until(500, |h| h.client().state() == State::TimeWait);
        assert_eq!(
            h.flow().phase(),
            Phase::Open,
            "the bytes must get out first"
        );
        h.server.stall_sends = false;
        h.steps_until(1000, |h| h.freed.is_some());
        assert_eq!(h.freed, Some(None), "{order:?}");
        assert_eq!(h.server.received, upload, "{order:?}");
        assert_eq!(h.server.shutdowns, 1);
    }
}

#[test]
fn time_wait_is_held_while_bytes_are_owed_and_an_orphan_gets_a_user_timeout() {
    let upload = pattern(12_000, 6);
    let mut h = Harness::new(
        Server {
            eof: true,
            stall_sends: true,
            ..Server::default()
        },
        Order::Instant,
    );
    connect(&mut h, Ok(()));
    h.steps_until(50, |h| h.client().state() == State::Established);
    h.client().send_slice(&upload).unwrap();
    h.client().close();
    h.steps_until(500, |h| h.client().state() == State::TimeWait);
    // The client has finished, bytes are still owed: bound how long the server may hold
    // them, as the kernel does for an orphaned socket.
    h.step();
    assert!(
        h.lifecycle.contains(&Action::UserTimeout(ORPHAN_TIMEOUT)),
        "{:?}",
        h.lifecycle
    );
    // A server that stops reading for 30 s: smoltcp's own TIME-WAIT (10 s) would clear
    // the bytes; the flow holds its egress off instead and keeps them.
    for _ in 0..30 {
        h.step_by(Duration::from_secs(1));
    }
    assert_eq!(h.flow().phase(), Phase::Open);
    assert!(h.freed.is_none());
    h.server.stall_sends = false;
    h.steps_until(1000, |h| h.freed.is_some());
    assert_eq!(h.server.received, upload, "no owed byte lost");
    assert_eq!(h.freed, Some(None));
}

#[test]
fn a_vanished_client_is_given_up_after_the_silence_limit() {
    // Strict: only the flow's own deadlines (keep-alive, timeout) can wake it here.
    for order in [Order::Instant, Order::Strict(3)] {
        vanished_client(order);
    }
}

fn vanished_client(order: Order) {
    let mut h = Harness::new(Server::default(), order);
    connect(&mut h, Ok(()));
    h.steps_until(50, |h| h.client().state() == State::Established);
    h.client_gone = true;
    let silent_since = h.now;
    // Keep-alive probes go unanswered; after the silence limit the flow ends.
    h.steps_until(400, |h| {
        if h.freed.is_none() {
            h.step_by(Duration::from_secs(1));
        }
        h.freed.is_some()
    });
    let waited = h.now - silent_since;
    assert!(
        waited >= CLIENT_SILENCE_LIMIT.into()
            && waited <= (CLIENT_SILENCE_LIMIT + std::time::Duration::from_secs(10)).into(),
        "gave up after {waited}"
    );
    assert_eq!(h.freed, Some(Some(Failure::ClientReset)));
    assert!(
        h.lifecycle.contains(&Action::Linger0),
        "the server gets a RST"
    );
}

#[test]
fn a_fast_retransmit_decided_without_a_buffer_goes_out_when_one_frees() {
    let mut h = Harness::new(Server::default(), Order::Instant);
    connect(&mut h, Ok(()));
    h.steps_until(50, |h| {
        h.client().state() == State::Established && h.pending_recv.is_some()
    });
    // 32 KiB first, so that the congestion window holds four segments; then 8 KiB that
    // go out at once, with no new data after them to restart the retransmission timer.
    let download = pattern(40 * 1024, 9);
    h.server
        .to_send
        .extend(download[..32 * 1024].iter().copied());
    let mut got = Vec::new();
    h.steps_until(500, |h| {
        client_recv(h, &mut got);
        got.len() == 32 * 1024
    });
    h.server
        .to_send
        .extend(download[32 * 1024..].iter().copied());
    // The first data segment is lost: the client answers the others with duplicate ACKs.
    let data = |packet: &Vec<u8>| {
        let ip = Ipv4Packet::new_checked(&packet[..]).unwrap();
        TcpPacket::new_checked(ip.payload()).is_ok_and(|tcp| !tcp.payload().is_empty())
    };
    let mut segments = VecDeque::new();
    for _ in 0..10 {
        h.step();
        segments.extend(h.client_dev.inbox.drain(..).filter(data));
    }
    assert!(segments.len() >= 4, "{} segments: too few", segments.len());
    segments.pop_front();
    h.client_dev.inbox.extend(segments);
    // Every TUN write buffer egress may take is in use while the duplicate ACKs come.
    let mut held = Vec::new();
    while h.tx.emit(Claim::Egress, |buf| Some(buf.len().min(40))) {}
    h.tx.take_ready(|index, _| held.push(index));
    for _ in 0..5 {
        h.step();
    }
    for index in held {
        h.tx.release(index);
    }
    h.flow.as_mut().unwrap().on_tx_buffer();
    // The retransmission follows within a second (steps of 1 ms), not after a minute's
    // keep-alive, whose garbage byte the client would take for the stream's last.
    h.steps_until(1000, |h| {
        client_recv(h, &mut got);
        got.len() == download.len()
    });
    assert_eq!(got, download);
}

#[test]
fn the_flow_stays_until_its_rst_is_out() {
    let mut h = Harness::new(Server::default(), Order::Instant);
    connect(&mut h, Ok(()));
    h.steps_until(50, |h| {
        h.client().state() == State::Established && h.pending_recv.is_some()
    });
    // Every TUN write buffer taken: the RST the server's reset causes cannot go out yet.
    let mut held = Vec::new();
    while h.tx.emit(Claim::Reply, |buf| Some(buf.len().min(40))) {}
    h.tx.take_ready(|index, _| held.push(index));
    h.server.reset = true;
    for _ in 0..20 {
        h.step();
    }
    assert_eq!(
        h.flow().phase(),
        Phase::Closing(Teardown::Abortive),
        "the reset was seen"
    );
    assert!(h.freed.is_none(), "freed with its RST still owed");
    assert_eq!(
        h.client().state(),
        State::Established,
        "no RST reached it yet"
    );
    for index in held {
        h.tx.release(index);
    }
    h.flow.as_mut().unwrap().on_tx_buffer();
    h.steps_until(20, |h| {
        h.freed.is_some() && h.client().state() == State::Closed
    });
    assert_eq!(h.freed, Some(Some(Failure::ServerReset)));
}

#[test]
fn an_evicted_half_open_flow_resets_the_client_once_its_connect_is_cancelled() {
    let mut h = Harness::new(Server::default(), Order::Instant);
    h.steps_until(5, |h| h.flow.is_some());
    h.step();
    assert!(h.flow.as_mut().unwrap().evict());
    assert!(!h.flow.as_mut().unwrap().evict(), "only once");
    h.steps_until(5, |h| h.lifecycle.contains(&Action::Cancel));
    assert!(h.freed.is_none(), "the connect is still in flight");
    h.connected(Err(IoError::Cancelled));
    h.steps_until(20, |h| {
        h.freed.is_some() && h.client().state() == State::Closed
    });
    assert_eq!(h.freed, Some(Some(Failure::Evicted)));
}

#[test]
fn segment_size_is_the_client_mss_capped_by_our_mtu() {
    let v4 = IpAddress::v4(10, 0, 0, 1);
    let v6 = IpAddress::v6(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    assert_eq!(segment_size(v4, Some(1460), 1500), 1460);
    assert_eq!(segment_size(v6, Some(1440), 1500), 1440);
    assert_eq!(segment_size(v6, Some(8960), 1500), 1440);
    assert_eq!(segment_size(v4, Some(1000), 1500), 1000);
    assert_eq!(segment_size(v4, None, 1500), 536);
    assert_eq!(segment_size(v6, None, 1500), 1220);
    assert_eq!(segment_size(v4, Some(0), 1500), 1);
}

#[test]
fn server_bytes_received_while_the_send_buffer_drained_arrive_in_order() {
    // The receive is started into the free window behind bytes still unacknowledged;
    // the client acknowledges them all before the server's next bytes land, so smoltcp
    // restarts its empty buffer at the beginning and the bytes must move there.
    let first = pattern(10_000, 7);
    let second = pattern(5_000, 8);
    let mut h = established(&first);
    let mut got = Vec::new();
    h.steps_until(100, |h| {
        client_recv(h, &mut got);
        h.server.to_send.is_empty() && h.pending_recv.is_some()
    });
    let pending = h.pending_recv.clone().unwrap();
    assert!(
        pending.start > FLOW_BUFFER,
        "the receive was started into the send buffer (second half of the region)"
    );
    for _ in 0..50 {
        client_recv(&mut h, &mut got);
        h.step();
    }
    h.server.to_send.extend(second.iter().copied());
    h.steps_until(100, |h| {
        client_recv(h, &mut got);
        got.len() == first.len() + second.len()
    });
    assert_eq!(got, [first, second].concat());
}

#[test]
fn a_server_that_stops_reading_holds_the_client_to_the_floor() {
    // The server takes nothing: the flow may hold only its first allowance of the
    // client's bytes, whatever smoltcp's buffer could take.
    let upload = pattern(200_000, 9);
    for order in [Order::Instant, Order::Strict(5)] {
        let mut h = Harness::new(
            Server {
                stall_sends: true,
                ..Server::default()
            },
            order,
        );
        connect(&mut h, Ok(()));
        h.steps_until(50, |h| h.client().state() == State::Established);
        let mut offset = 0;
        for _ in 0..300 {
            let client = h.client();
            if offset < upload.len() && client.can_send() {
                offset += client.send_slice(&upload[offset..]).unwrap();
            }
            h.step();
        }
        let held = h.flow().rx_held();
        assert!(held <= FLOOR, "{held} bytes held ({order:?})");
        assert!(held > 0);
        // The server reads again: everything arrives, the window opening as it drains.
        h.server.stall_sends = false;
        h.steps_until(20_000, |h| {
            let client = h.client();
            if offset < upload.len() && client.can_send() {
                offset += client.send_slice(&upload[offset..]).unwrap();
            }
            h.server.received.len() == upload.len()
        });
        assert_eq!(h.server.received, upload, "{order:?}");
    }
}

#[test]
fn a_busy_flow_grows_its_window_past_the_floor() {
    let upload = pattern(600_000, 10);
    let mut h = Harness::new(Server::default(), Order::Instant);
    connect(&mut h, Ok(()));
    h.steps_until(50, |h| h.client().state() == State::Established);
    let mut offset = 0;
    h.steps_until(20_000, |h| {
        let client = h.client();
        if offset < upload.len() && client.can_send() {
            offset += client.send_slice(&upload[offset..]).unwrap();
        }
        h.server.received.len() == upload.len()
    });
    assert!(
        h.flow().rx.get() > FLOOR,
        "it never grew: {}",
        h.flow().rx.get()
    );
    assert_eq!(h.server.received, upload);
}

/// smoltcp rounds its window down to its scale, so the edge it advertises moves back and
/// forth by up to a unit as its acknowledgement number moves, and it takes bytes only up
/// to the edge it advertised last. A client that sent up to a further edge just as the
/// buffer filled (its server stopped reading) then holds bytes smoltcp never takes,
/// behind a zero window, and its sequence number stays past smoltcp's: every segment it
/// sends later is out of window, and smoltcp dropped it with the acknowledgement it
/// carried. A download then stalled for good once its own bytes needed acknowledging
/// (seen end to end: an echo under load, both directions stuck).
#[test]
fn a_client_that_filled_its_window_is_still_heard_acknowledging_a_download() {
    // 1 MiB buffers: window scale 5, as the proxy's default flows have.
    const BUFFER: usize = 1 << 20;
    let upload = pattern(16 * BUFFER, 3);
    let download = pattern(2 * BUFFER, 4);
    let mut h = Harness::new(Server::default(), Order::Instant);
    h.buffer = BUFFER;
    // A client with buffers as large as the flow's, so that it can fill its window (the
    // allowance grows only then).
    h.client_sockets.remove(h.client);
    h.client = h.client_sockets.add(tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; BUFFER]),
        tcp::SocketBuffer::new(vec![0u8; BUFFER]),
    ));
    let cx = h.client_iface.context();
    let client = h.client_sockets.get_mut::<tcp::Socket>(h.client);
    // Without Nagle it sends up to the edge of its window, as Linux does.
    client.set_nagle_enabled(false);
    client.connect(cx, SERVER, 40000).unwrap();
    connect(&mut h, Ok(()));
    h.steps_until(50, |h| h.client().state() == State::Established);
    let mut offset = 0;
    let mut send = |h: &mut Harness| {
        let client = h.client();
        if offset < upload.len() && client.can_send() {
            offset += client.send_slice(&upload[offset..]).unwrap();
        }
    };
    // A busy upload: the window grows to the whole buffer.
    h.steps_until(20_000, |h| {
        send(h);
        h.flow().rx.get() == BUFFER
    });
    // The server stops reading and starts sending: the client fills its window while
    // it takes the download, its segments reaching the flow between the flow's ACKs.
    h.server.stall_sends = true;
    h.trickle = true;
    h.server.to_send.extend(&download);
    let mut got = Vec::new();
    h.steps_until(60_000, |h| {
        send(h);
        client_recv(h, &mut got);
        got.len() == download.len()
    });
    assert_eq!(got, download);
}

#[test]
fn pages_the_buffers_do_not_hold_go_back_to_the_kernel() {
    // No budget: both directions stay at the floor, a quarter of their ring, while
    // bytes move through all of it.
    let upload = pattern(200_000, 11);
    let download = pattern(200_000, 12);
    let mut h = established(&download);
    h.budget = Budget::new(0);
    let got = h.upload_and_download(&upload, upload.len(), download.len());
    assert_eq!(h.server.received, upload);
    assert_eq!(got, download);
    assert_eq!((h.flow().rx.get(), h.flow().tx.get()), (FLOOR, FLOOR));
    // Each ring keeps at most its allowance (the window offered, a receive in flight)
    // and the pages around it; the rest was discarded and reads as zero.
    let region = h.flow().region();
    for (name, ring) in [
        ("receive", 0..FLOW_BUFFER),
        ("send", FLOW_BUFFER..2 * FLOW_BUFFER),
    ] {
        let zeros = region.kernel_read(ring).iter().filter(|&&b| b == 0).count();
        assert!(
            zeros >= FLOW_BUFFER - FLOOR - 3 * 4096,
            "{name} buffer: only {zeros} bytes read as zero"
        );
    }
}

/// A flow at the memory floor (no budget) whose server, with `download` to send, stopped
/// reading until the client filled its window with the start of `upload` and was told
/// it is closed; returns it and how much of `upload` the client has sent.
fn window_closed(mtu: usize, order: Order, download: &[u8], upload: &[u8]) -> (Harness, usize) {
    let mut h = Harness::with_mtu(
        Server {
            to_send: download.iter().copied().collect(),
            stall_sends: true,
            ..Server::default()
        },
        order,
        mtu,
    );
    h.budget = Budget::new(0);
    connect(&mut h, Ok(()));
    h.steps_until(50, |h| h.client().state() == State::Established);
    let mut offset = 0;
    h.steps_until(100, |h| {
        let client = h.client();
        if client.can_send() {
            offset += client.send_slice(&upload[offset..]).unwrap();
        }
        h.flow().rx_held() == FLOOR
    });
    // Long enough for the flow's ACK of the last byte, with a zero window, to go out.
    for _ in 0..20 {
        h.step();
    }
    (h, offset)
}

#[test]
fn at_the_floor_a_jumbo_mtu_needs_no_zero_window_probe() {
    // No budget: both directions stay at the 16 KiB floor, below two segments of a
    // jumbo MTU. The server first stops reading until the client has filled its window
    // and been told so; from then on, each time the server drains the client's bytes the
    // client must hear that its window opened. A client left to find out by zero-window
    // probes (smoltcp's: a byte beyond the window, counted in `probes`) waits
    // at least smoltcp's minimum RTO, 1 s, for each.
    let upload = pattern(512 * 1024, 16);
    let download = pattern(512 * 1024, 17);
    for mtu in [1500, 9000, 65535] {
        for order in [
            Order::Instant,
            Order::Shuffled(mtu as u64),
            Order::Strict(3),
        ] {
            let (mut h, mut offset) = window_closed(mtu, order, &download, &upload);
            h.server.stall_sends = false;
            let start = h.now;
            let mut got = Vec::new();
            h.steps_until(1000, |h| {
                let client = h.client();
                if offset < upload.len() && client.can_send() {
                    offset += client.send_slice(&upload[offset..]).unwrap();
                }
                client_recv(h, &mut got);
                h.server.received.len() == upload.len() && got.len() == download.len()
            });
            let took = h.now - start;
            assert_eq!(h.server.received, upload, "MTU {mtu} ({order:?})");
            assert_eq!(got, download, "MTU {mtu} ({order:?})");
            assert_eq!((h.flow().rx.get(), h.flow().tx.get()), (FLOOR, FLOOR));
            assert_eq!(h.probes, [], "MTU {mtu} ({order:?})");
            assert!(
                took < Duration::from_secs(1),
                "MTU {mtu} ({order:?}): 512 KiB each way took {took}"
            );
        }
    }
}

#[test]
fn a_window_update_that_found_no_buffer_goes_out_once_one_frees() {
    let upload = pattern(64 * 1024, 18);
    // Strict: the flow runs only when the event loop would run it.
    let (mut h, offset) = window_closed(MTU, Order::Strict(4), &[], &upload);
    // Every TUN write buffer is taken, and the server reads: the window opens, but its
    // update finds no buffer.
    let mut held = Vec::new();
    while h.tx.emit(Claim::Reply, |buf| Some(buf.len().min(40))) {}
    h.tx.take_ready(|index, _| held.push(index));
    h.server.stall_sends = false;
    h.steps_until(100, |h| h.flow().rx_held() == 0);
    for _ in 0..5 {
        h.step();
    }
    assert!(h.next.starved, "an update owed waits for a buffer");
    // A write completes: the loop wakes the flows that found no buffer (only those).
    for index in held {
        h.tx.release(index);
    }
    if h.next.starved {
        h.flow.as_mut().unwrap().on_tx_buffer();
        h.woken = true;
    }
    let took = h.finish_upload(&upload, offset, 1000);
    // Well before the client's zero-window probe (1 s).
    assert!(took < Duration::from_millis(500), "took {took}");
    assert_eq!(h.probes, []);
    assert_eq!(h.server.received, upload);
}

#[test]
fn a_zero_window_probe_beyond_the_window_is_answered_with_the_window() {
    // smoltcp's client probes a closed window with a byte beyond it (as BSD, macOS and
    // Windows do). The flow must not take that byte (its pages may have been given
    // back), but must answer it with an ACK carrying the current window, as RFC 9293
    // asks of a segment that is not acceptable.
    let upload = pattern(64 * 1024, 19);
    for order in [Order::Instant, Order::Shuffled(7), Order::Strict(6)] {
        let (mut h, offset) = window_closed(MTU, order, &[], &upload);
        let edge = h.flow().window.furthest.expect("a window was advertised");
        h.steps_until(5000, |h| h.probes.len() == 2);
        for &probe in &h.probes {
            let answered = h.pure_acks.iter().any(|&(at, ack, window)| {
                at >= probe && at <= probe + Duration::from_millis(2) && ack == edge && window == 0
            });
            assert!(answered, "{order:?}: probe at {probe} not answered");
        }
        assert_eq!(
            h.flow().rx_held(),
            FLOOR,
            "{order:?}: the probe's byte was taken"
        );
        // The server reads again: the window opens and the client goes on at once.
        h.server.stall_sends = false;
        let took = h.finish_upload(&upload, offset, 1000);
        assert!(took < Duration::from_millis(500), "{order:?}: took {took}");
        assert_eq!(h.server.received, upload, "{order:?}");
    }
}

/// Simulated time an upload of `len` bytes takes through a flow at the memory floor on
/// links of this MTU.
fn upload_time_at_the_floor(mtu: usize, len: usize) -> Duration {
    let upload = pattern(len, 20);
    let mut h = Harness::with_mtu(Server::default(), Order::Instant, mtu);
    h.budget = Budget::new(0);
    connect(&mut h, Ok(()));
    h.steps_until(50, |h| h.client().state() == State::Established);
    let took = h.finish_upload(&upload, 0, 20_000);
    assert_eq!(h.server.received, upload, "MTU {mtu}");
    assert_eq!(h.flow().rx.get(), FLOOR);
    took
}

#[test]
fn at_the_floor_a_jumbo_mtu_is_not_held_to_the_delayed_ack() {
    // At MTU 65535 the floor's whole window fits in one segment: smoltcp, which ACKs
    // at once only past one full segment, would hold each ACK for its 10 ms delayed-ACK
    // timer, one window per 10 ms (1.6 MB/s).
    let len = 1024 * 1024;
    let base = upload_time_at_the_floor(1500, len);
    let jumbo = upload_time_at_the_floor(65535, len);
    assert!(
        jumbo <= base * 2,
        "1 MiB at the floor: {jumbo} at MTU 65535, {base} at MTU 1500"
    );
}

#[test]
fn a_download_grows_its_send_allowance_and_goes_around_the_ring() {
    let download = pattern(600_000, 13);
    let mut h = established(&download);
    let mut got = Vec::new();
    h.steps_until(20_000, |h| {
        client_recv(h, &mut got);
        got.len() == download.len()
    });
    assert_eq!(got, download);
    assert!(
        h.flow().tx.get() > FLOOR,
        "tx stayed at {}",
        h.flow().tx.get()
    );
    assert_eq!(
        h.flow().touched()[1],
        FLOW_BUFFER,
        "it went around the ring"
    );
}

#[test]
fn a_short_exchange_touches_only_the_start_of_each_buffer() {
    let mut h = established(&pattern(100, 14));
    h.client().send_slice(&pattern(200, 15)).unwrap();
    h.steps_until(200, |h| h.server.received.len() == 200);
    let [rx, tx] = h.flow().touched();
    // The window offered (the first allowance plus what moved) and the 100 bytes.
    assert!(rx <= FLOOR + 200, "receive buffer touched to {rx}");
    assert_eq!(tx, 100);
}

/// A harness whose flow connects through a SOCKS5 upstream (the simulated server plays
/// it: its first bytes are the replies), with `credentials` if given.
fn through_upstream(server: Server, order: Order, credentials: Option<&[u8]>) -> Harness {
    let mut h = Harness::new(server, order);
    let credentials = credentials.map(|pair| {
        let (user, password) = pair.split_at(pair.len() / 2);
        std::rc::Rc::new(crate::wire::socks5::Credentials::new(user, password).unwrap())
    });
    h.upstream = Some(Handshake::new(
        crate::wire::socks5::Command::Connect,
        std::net::SocketAddr::from(SERVER),
        credentials,
        h.now + Duration::from_secs(10),
    ));
    h
}

/// The SOCKS5 replies of a successful no-auth CONNECT.
const SOCKS_OK: [u8; 12] = [5, 0, 5, 0, 0, 1, 192, 0, 2, 9, 0x30, 0x39];
/// What the flow sends the upstream for it: the greeting, CONNECT to `SERVER`.
const SOCKS_REQUESTS: [u8; 13] = [5, 1, 0, 5, 1, 0, 1, 192, 0, 2, 80, 0, 80];

#[test]
fn through_an_upstream_the_syn_ack_waits_for_the_connect_reply_and_bytes_follow_it() {
    let upload = pattern(30_000, 13);
    let download = pattern(40_000, 14);
    for order in orders() {
        // The reply and the server's first bytes arrive together: the relay gets them.
        let mut h = through_upstream(
            Server {
                to_send: SOCKS_OK.iter().chain(&download).copied().collect(),
                stall_sends: true,
                ..Server::default()
            },
            order,
            None,
        );
        connect(&mut h, Ok(()));
        for _ in 0..30 {
            h.step();
        }
        assert_eq!(
            h.client().state(),
            State::SynSent,
            "no SYN|ACK before the reply ({order:?})"
        );
        assert_eq!(h.flow().phase(), Phase::Connecting);
        h.server.stall_sends = false;
        h.steps_until(200, |h| h.client().state() == State::Established);
        let expected = SOCKS_REQUESTS.len() + upload.len();
        let got = h.upload_and_download(&upload, expected, download.len());
        assert_eq!(
            h.server.received,
            [&SOCKS_REQUESTS[..], &upload].concat(),
            "{order:?}"
        );
        assert_eq!(got, download, "{order:?}");
    }
}

#[test]
fn through_an_upstream_with_a_password() {
    let mut h = through_upstream(
        Server {
            to_send: [&[5, 2, 1, 0][..], &SOCKS_OK[2..], b"hi"].concat().into(),
            ..Server::default()
        },
        Order::Shuffled(3),
        Some(b"userpass"),
    );
    connect(&mut h, Ok(()));
    h.steps_until(500, |h| h.client().state() == State::Established);
    assert_eq!(&h.server.received[..4], [5, 2, 0, 2]);
    assert_eq!(&h.server.received[4..15], b"\x01\x04user\x04pass");
}

#[test]
fn upstream_refusals_reach_the_client_as_the_direct_path_would_report_them() {
    use crate::flow::upstream::Fault;
    use crate::wire::socks5::ReplyCode;
    let cases = [
        (5, Failure::ConnectRefused, false),
        (4, Failure::HostUnreachable, true),
        (3, Failure::NetUnreachable, true),
        (
            1,
            Failure::Upstream(Fault::Refused(ReplyCode::GeneralFailure)),
            false,
        ),
        (
            2,
            Failure::Upstream(Fault::Refused(ReplyCode::NotAllowed)),
            false,
        ),
        (
            7,
            Failure::Upstream(Fault::Refused(ReplyCode::CommandNotSupported)),
            false,
        ),
    ];
    for (code, failure, icmp) in cases {
        for order in [Order::Instant, Order::Strict(code.into())] {
            let mut h = through_upstream(
                Server {
                    to_send: [5, 0, 5, code, 0, 1, 0, 0, 0, 0, 0, 0].into(),
                    ..Server::default()
                },
                order,
                None,
            );
            connect(&mut h, Ok(()));
            h.steps_until(200, |h| h.freed.is_some());
            assert_eq!(h.freed, Some(Some(failure)), "code {code} ({order:?})");
            if icmp {
                assert_eq!(h.icmp_to_client, 1, "code {code} ({order:?})");
                assert_eq!(
                    h.client().state(),
                    State::SynSent,
                    "no RST with the ICMP error"
                );
            } else {
                h.steps_until(20, |h| h.client().state() == State::Closed);
            }
        }
    }
}

#[test]
fn a_silent_or_vanishing_upstream_fails_the_flow_within_the_connect_timeout() {
    use crate::flow::upstream::Fault;
    for order in [Order::Instant, Order::Strict(9)] {
        // Accepts and says nothing: the deadline must wake the flow (strict order).
        let mut h = through_upstream(Server::default(), order, None);
        let start = h.now;
        connect(&mut h, Ok(()));
        h.steps_until(100, |h| {
            h.step_by(Duration::from_millis(500));
            h.freed.is_some()
        });
        assert_eq!(h.freed, Some(Some(Failure::Upstream(Fault::Timeout))));
        let waited = h.now - start;
        assert!(
            waited >= Duration::from_secs(10) && waited <= Duration::from_secs(12),
            "{waited} ({order:?})"
        );
        assert!(
            h.lifecycle.contains(&Action::Cancel),
            "the receive was cancelled"
        );
        h.steps_until(20, |h| h.client().state() == State::Closed);

        // Closes half-way through a reply.
        let mut h = through_upstream(
            Server {
                to_send: [5, 0, 5, 0, 0].into(),
                eof: true,
                ..Server::default()
            },
            order,
            None,
        );
        connect(&mut h, Ok(()));
        h.steps_until(100, |h| h.freed.is_some());
        assert_eq!(h.freed, Some(Some(Failure::Upstream(Fault::Closed))));

        // Cannot be reached.
        let mut h = through_upstream(Server::default(), order, None);
        connect(&mut h, Err(IoError::Refused));
        h.steps_until(100, |h| h.freed.is_some());
        assert_eq!(h.freed, Some(Some(Failure::Upstream(Fault::Connect))));
        h.steps_until(20, |h| h.client().state() == State::Closed);
    }
}

#[test]
fn a_flow_handshaking_with_its_upstream_can_be_evicted() {
    let mut h = through_upstream(Server::default(), Order::Instant, None);
    connect(&mut h, Ok(()));
    h.steps_until(20, |h| h.pending_recv.is_some());
    assert!(h.flow.as_mut().unwrap().evict());
    h.steps_until(50, |h| h.freed.is_some());
    assert_eq!(h.freed, Some(Some(Failure::Evicted)));
}
