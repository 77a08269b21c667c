//! In-process tests of the relay: a smoltcp client talks through the proxy's interface
//! (the same `StackDevice` and per-flow socket set the event loop uses) over in-memory
//! queues, and the outbound socket is simulated by completing the relay's I/O by hand.

use std::collections::VecDeque;

use nix::libc;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint, Ipv4Address,
};

use super::{Failure, Phase, Relay, Teardown};
use crate::stack::{self, Parsed, StackDevice, TxPool};
use crate::tun::Offload;

const MTU: usize = 1500;
const SERVER: IpEndpoint = IpEndpoint {
    addr: IpAddress::Ipv4(Ipv4Address::new(192, 0, 2, 80)),
    port: 80,
};

/// The client's device: packets it sends pile up in `sent`, packets for it in `inbox`.
#[derive(Default)]
struct QueueDevice {
    inbox: VecDeque<Vec<u8>>,
    sent: VecDeque<Vec<u8>>,
}

struct QueueRx(Vec<u8>);
struct QueueTx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for QueueRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for QueueTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0u8; len];
        let result = f(&mut packet);
        self.0.push_back(packet);
        result
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = QueueRx;
    type TxToken<'a> = QueueTx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(QueueRx, QueueTx<'_>)> {
        let packet = self.inbox.pop_front()?;
        Some((QueueRx(packet), QueueTx(&mut self.sent)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<QueueTx<'_>> {
        Some(QueueTx(&mut self.sent))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        caps
    }
}

/// What the simulated server does with the outbound socket.
#[derive(Default)]
struct Server {
    /// Bytes the server sends, delivered through the relay's receives.
    to_send: VecDeque<u8>,
    /// Once `to_send` is empty: end with EOF (FIN) instead of waiting for more.
    eof: bool,
    /// Once `to_send` is empty: fail the pending receive with ECONNRESET.
    reset: bool,
    /// A receive the relay started while the server had nothing to give.
    recv_pending: bool,
    /// Leave sends in flight (a slow server) until this is cleared.
    stall_sends: bool,
    /// A send held in flight by `stall_sends`: its bytes.
    send_pending: Option<Vec<u8>>,
    received: Vec<u8>,
    shutdowns: usize,
}

struct Harness {
    now: Instant,
    client_iface: Interface,
    client_dev: QueueDevice,
    client_sockets: SocketSet<'static>,
    client: SocketHandle,
    proxy_iface: Interface,
    tx: TxPool,
    flow: Option<(SocketSet<'static>, SocketHandle)>,
    relay: Relay,
    server: Server,
}

fn new_tcp_socket(buffer: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; buffer]),
        tcp::SocketBuffer::new(vec![0u8; buffer]),
    )
}

impl Harness {
    fn new(server: Server) -> Harness {
        let now = Instant::from_millis(1);
        let mut client_dev = QueueDevice::default();
        let mut client_iface =
            Interface::new(Config::new(HardwareAddress::Ip), &mut client_dev, now);
        client_iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::new(IpAddress::v4(198, 18, 0, 1), 30))
                .unwrap();
        });
        client_iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(198, 18, 0, 2))
            .unwrap();
        let mut client_sockets = SocketSet::new(Vec::new());
        let client = client_sockets.add(new_tcp_socket(64 * 1024));
        let mut tx = TxPool::new(64, MTU, Offload::None);
        let proxy_iface = stack::new_interface(&mut StackDevice::egress(&mut tx), now, 7);
        let mut harness = Harness {
            now,
            client_iface,
            client_dev,
            client_sockets,
            client,
            proxy_iface,
            tx,
            flow: None,
            relay: Relay::new(Vec::leak(vec![0u8; 4096])),
            server,
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

    /// Completes the outbound connect with `result`.
    fn connected(&mut self, result: i32) {
        let (sockets, handle) = self.flow.as_mut().expect("no flow yet");
        self.relay
            .on_connected(sockets.get_mut::<tcp::Socket>(*handle), result);
    }

    /// One round: client runs, its packets reach the proxy, the relay does its I/O,
    /// the proxy's packets reach the client.
    fn step(&mut self) {
        self.client_iface
            .poll(self.now, &mut self.client_dev, &mut self.client_sockets);
        while let Some(packet) = self.client_dev.sent.pop_front() {
            self.proxy_ingress(&packet);
        }
        if self.flow.is_some() {
            self.run_relay_io();
            let (sockets, _) = self.flow.as_mut().unwrap();
            let mut device = StackDevice::egress(&mut self.tx);
            while self.proxy_iface.poll_egress(self.now, &mut device, sockets)
                != smoltcp::iface::PollResult::None
            {}
            let (sockets, handle) = self.flow.as_ref().unwrap();
            self.relay.update_phase(sockets.get::<tcp::Socket>(*handle));
        }
        let mut delivered = Vec::new();
        self.tx
            .take_ready(|index, packet| delivered.push((index, packet.to_vec())));
        for (index, packet) in delivered {
            self.tx.release(index);
            self.client_dev.inbox.push_back(packet);
        }
        self.now += Duration::from_millis(1);
    }

    fn proxy_ingress(&mut self, packet: &[u8]) {
        let Parsed::Tcp { key, opens, .. } = stack::parse(packet) else {
            panic!("client sent a non-TCP packet");
        };
        assert_eq!(key.server, SERVER);
        if self.flow.is_none() && opens {
            let mut socket = new_tcp_socket(16 * 1024);
            socket.pause_synack(true);
            socket
                .listen(IpListenEndpoint {
                    addr: Some(key.server.addr),
                    port: key.server.port,
                })
                .unwrap();
            let mut sockets = SocketSet::new(Vec::new());
            let handle = sockets.add(socket);
            self.flow = Some((sockets, handle));
        }
        let (sockets, _) = self.flow.as_mut().expect("segment before SYN");
        let mut device = StackDevice::ingress(packet, &mut self.tx);
        self.proxy_iface
            .poll_ingress_single(self.now, &mut device, sockets);
    }

    /// Plays the outbound socket: completes sends, receives and shutdowns at once.
    fn run_relay_io(&mut self) {
        let (sockets, handle) = self.flow.as_mut().unwrap();
        let socket = sockets.get_mut::<tcp::Socket>(*handle);
        let actions = self.relay.pump(socket);
        let sent = actions.send.map(|data| {
            if self.server.stall_sends {
                self.server.send_pending = Some(data.to_vec());
                return None;
            }
            self.server.received.extend_from_slice(data);
            Some(data.len())
        });
        let received = actions.recv.map(|space| {
            let n = space.len().min(self.server.to_send.len());
            for byte in &mut space[..n] {
                *byte = self.server.to_send.pop_front().unwrap();
            }
            n
        });
        let shutdown = actions.shutdown;
        if let Some(Some(n)) = sent {
            self.relay.on_sent(socket, n as i32);
        }
        if !self.server.stall_sends
            && let Some(data) = self.server.send_pending.take()
        {
            self.server.received.extend_from_slice(&data);
            self.relay.on_sent(socket, data.len() as i32);
        }
        match received {
            Some(0) => self.server.recv_pending = true,
            Some(n) => self.relay.on_received(socket, n as i32),
            None => {}
        }
        if self.server.recv_pending && self.server.to_send.is_empty() {
            if self.server.reset {
                self.server.recv_pending = false;
                self.relay.on_received(socket, -libc::ECONNRESET);
            } else if self.server.eof {
                self.server.recv_pending = false;
                self.relay.on_received(socket, 0);
            }
        }
        if shutdown {
            self.server.shutdowns += 1;
            self.relay.on_shutdown(socket, 0);
        }
    }

    fn steps_until(&mut self, limit: usize, mut done: impl FnMut(&mut Harness) -> bool) {
        for _ in 0..limit {
            if done(self) {
                return;
            }
            self.step();
        }
        panic!(
            "condition not reached in {limit} steps: client {}, relay {:?}",
            self.client().state(),
            self.relay
        );
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn handshake_waits_for_the_outbound_connect() {
    let mut h = Harness::new(Server::default());
    for _ in 0..50 {
        h.step();
    }
    assert_eq!(
        h.client().state(),
        State::SynSent,
        "SYN|ACK must be held back"
    );
    assert_eq!(h.relay.phase(), Phase::Connecting);
    h.connected(0);
    h.steps_until(20, |h| h.client().state() == State::Established);
    assert_eq!(h.relay.phase(), Phase::Open);
}

fn connect(h: &mut Harness, result: i32) {
    h.steps_until(5, |h| h.flow.is_some());
    h.connected(result);
}

#[test]
fn refused_connect_resets_the_client() {
    let mut h = Harness::new(Server::default());
    connect(&mut h, -libc::ECONNREFUSED);
    h.steps_until(20, |h| h.client().state() == State::Closed);
    assert_eq!(h.relay.phase(), Phase::Closing(Teardown::Abortive));
    assert_eq!(h.relay.failure(), Some(Failure::ConnectRefused));
    assert_eq!(h.relay.inflight(), 0);
}

#[test]
fn unreachable_host_ends_the_flow_without_rst() {
    let mut h = Harness::new(Server::default());
    connect(&mut h, -libc::EHOSTUNREACH);
    for _ in 0..20 {
        h.step();
    }
    // No SYN|ACK and no RST: the event loop sends the client an ICMP error instead.
    assert_eq!(h.client().state(), State::SynSent);
    assert_eq!(h.relay.phase(), Phase::Closing(Teardown::Abortive));
    assert_eq!(h.relay.failure(), Some(Failure::HostUnreachable));
}

#[test]
fn bytes_flow_both_ways_and_each_fin_is_forwarded_on_its_own() {
    let upload = pattern(100_000, 1);
    let download = pattern(150_000, 2);
    let mut h = Harness::new(Server {
        to_send: download.iter().copied().collect(),
        ..Server::default()
    });
    connect(&mut h, 0);
    h.steps_until(20, |h| h.client().state() == State::Established);

    let mut offset = 0;
    let mut got = Vec::new();
    h.steps_until(5000, |h| {
        let client = h.client();
        if offset < upload.len() && client.can_send() {
            offset += client.send_slice(&upload[offset..]).unwrap();
            if offset == upload.len() {
                client.close(); // half-close: keep reading
            }
        }
        while client.can_recv() {
            client
                .recv(|data| {
                    got.extend_from_slice(data);
                    (data.len(), ())
                })
                .unwrap();
        }
        h.server.shutdowns == 1 && got.len() == download.len()
    });
    assert_eq!(h.server.received, upload, "client -> server bytes");
    assert_eq!(got, download, "server -> client bytes");
    assert_eq!(
        h.client().state(),
        State::FinWait2,
        "client's FIN forwarded, server's not yet"
    );
    assert_eq!(h.relay.phase(), Phase::Open);

    h.server.eof = true;
    h.steps_until(100, |h| {
        h.client().state() == State::TimeWait && h.relay.phase() != Phase::Open
    });
    assert_eq!(h.relay.phase(), Phase::Closing(Teardown::Graceful));
    assert_eq!(h.relay.inflight(), 0);
    assert_eq!(h.server.shutdowns, 1);
}

#[test]
fn server_reset_reaches_the_client_as_rst() {
    let mut h = Harness::new(Server {
        to_send: pattern(10_000, 3).into_iter().collect(),
        reset: true,
        ..Server::default()
    });
    connect(&mut h, 0);
    h.steps_until(200, |h| h.client().state() == State::Closed);
    assert_eq!(h.relay.phase(), Phase::Closing(Teardown::Abortive));
    assert_eq!(h.relay.failure(), Some(Failure::ServerReset));
}

#[test]
fn client_abort_tears_the_flow_down_abortively() {
    let mut h = Harness::new(Server::default());
    connect(&mut h, 0);
    h.steps_until(20, |h| h.client().state() == State::Established);
    h.client().abort();
    h.steps_until(20, |h| matches!(h.relay.phase(), Phase::Closing(_)));
    assert_eq!(h.relay.phase(), Phase::Closing(Teardown::Abortive));
    assert_eq!(h.relay.failure(), Some(Failure::ClientReset));
    // The receive started while open is still in flight: the event loop must cancel it
    // before closing the socket.
    assert_eq!(h.relay.inflight(), 1);
}

#[test]
fn a_slow_client_stops_reads_from_the_server() {
    let mut h = Harness::new(Server {
        to_send: pattern(1_000_000, 4).into_iter().collect(),
        ..Server::default()
    });
    connect(&mut h, 0);
    for _ in 0..2000 {
        h.step();
    }
    // The client never reads: only its window, the proxy's socket buffer and one
    // staging buffer may have left the server.
    let taken = 1_000_000 - h.server.to_send.len();
    assert!(
        taken <= 64 * 1024 + 16 * 1024 + 4096,
        "server drained {taken} bytes"
    );
    assert!(taken > 0);
}

#[test]
fn client_bytes_still_buffered_when_both_sides_closed_reach_the_server() {
    let upload = pattern(12_000, 5);
    let mut h = Harness::new(Server {
        eof: true,
        stall_sends: true,
        ..Server::default()
    });
    connect(&mut h, 0);
    h.steps_until(20, |h| h.client().state() == State::Established);
    h.client().send_slice(&upload).unwrap();
    h.client().close();
    // The server sends EOF at once but reads slowly: both FINs cross while the client's
    // bytes still sit in the proxy, and the client's socket finishes.
    h.steps_until(200, |h| h.client().state() == State::TimeWait);
    assert_eq!(
        h.relay.phase(),
        Phase::Open,
        "flow must stay until the bytes are out"
    );
    h.server.stall_sends = false;
    h.steps_until(200, |h| h.relay.phase() != Phase::Open);
    assert_eq!(h.relay.phase(), Phase::Closing(Teardown::Graceful));
    assert_eq!(h.server.received, upload);
    assert_eq!(h.server.shutdowns, 1);
    assert_eq!(h.relay.failure(), None);
}
