//! The control socket and the metrics endpoint, served by the loop on its ring like
//! everything else: a multishot accept on each, receives of a client's request into a
//! bounded buffer, and its reply sent from a bounded buffer. A status reply is rendered
//! a slice at a time (the header, then at most `ROWS_PER_SLICE` flows), the next slice
//! only once the last one is sent, so a reply for 10,000 flows costs each turn a few
//! hundred rows at most and a client that stops reading stalls only its own reply.
//! Clients are few (`MAX_CLIENTS` per listener; more are closed at once), each holds a
//! fixed amount of memory, and each has a deadline, checked once a second.

mod listen;

use std::fmt::Write;
use std::net::Shutdown;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use log::info;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::User;
use slab::Slab;
use smoltcp::time::Instant;
use socket2::{SockRef, Socket};

use super::datagrams::Outbound;
use super::{Proxy, tun_io};
use crate::config::Config;
use crate::control::counters::{Clients, Gauges, Info, Snapshot};
use crate::control::out::Out;
use crate::control::wire::{self, FlowRow, Proto, State};
use crate::control::{
    CONTROL_REQUEST_LIMIT, HTTP_HEAD_LIMIT, REPLY_BUFFER, Request, http, prometheus,
};
use crate::error::Error;
use crate::flow::Id;
use crate::flow::datagram::{self, Kind};
use crate::uring::token::GENERATION_MASK;
use crate::uring::{Completion, Op, Region, Ring, Slice, Token};
use listen::SocketFile;

/// Clients served at once by each listener.
const MAX_CLIENTS: usize = 8;
/// How long a client may take to send its request, and then to take its reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to close after its reply (see `Phase::Draining`).
const LINGER: Duration = Duration::from_secs(2);
/// How often deadlines are checked (and accepts that ended are taken up again).
const TICK: Duration = Duration::from_secs(1);
/// Flows rendered per slice of a status reply: ~100 bytes and well under a microsecond
/// each, so a slice stays within `REPLY_BUFFER` and a few tens of microseconds.
const ROWS_PER_SLICE: usize = 128;
/// Each client's memory: its request, then its reply.
const REPLY_START: usize = HTTP_HEAD_LIMIT;
const CLIENT_MEMORY: usize = REPLY_START + REPLY_BUFFER;

/// What a listener serves; its index is the accept token's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Service {
    Control = 0,
    Metrics = 1,
}

impl Service {
    fn request_limit(self) -> usize {
        match self {
            Service::Control => CONTROL_REQUEST_LIMIT,
            Service::Metrics => HTTP_HEAD_LIMIT,
        }
    }
}

struct Listener {
    socket: Socket,
    /// The multishot accept is armed.
    accepting: bool,
    clients: usize,
    /// The control socket's file, removed with it.
    _file: Option<SocketFile>,
}

struct Client {
    /// `None` once closed.
    fd: Option<OwnedFd>,
    service: Service,
    generation: u32,
    memory: Region,
    phase: Phase,
    deadline: Instant,
    /// A receive or send is in flight.
    busy: bool,
}

enum Phase {
    /// Receiving the request; `have` bytes of it so far.
    Request { have: usize },
    /// Sending `range` of the memory; then the status listing goes on from `next`.
    Reply {
        range: Range<usize>,
        next: Option<Listing>,
    },
    /// The reply is out and our side shut down: what the client still sends is read
    /// and dropped until it closes, since closing with bytes unread resets the
    /// connection (TCP sends a RST, which can destroy the reply before the client has
    /// read it; a Unix peer reads ECONNRESET instead of the end).
    Draining,
    /// Its operation is being cancelled; it closes when that completes.
    Closing,
}

/// What a complete request gets.
enum Answer {
    Status,
    /// A control request that is not one: the `error` line says why.
    Refusal(&'static str),
    Http(http::Status),
}

/// Where a status reply's listing of flows goes on: TCP slots first, then datagram
/// flows' slots.
#[derive(Clone, Copy, Debug, Default)]
struct Listing {
    datagrams: bool,
    slot: u32,
    listed: u64,
}

pub struct Control {
    listeners: [Option<Listener>; 2],
    clients: Slab<Client>,
    next_generation: u32,
    tick_armed: bool,
    /// Where a metrics body is rendered first, so its length is known for the head.
    scratch: String,
    /// By service.
    counters: [Clients; 2],
}

impl Control {
    /// Listens where `config` asks (before the privileges are dropped: the control
    /// socket is handed to `--user`) and starts accepting.
    pub fn new(config: &Config, user: Option<&User>, ring: &mut Ring) -> Result<Control, Error> {
        let mut control = Control {
            listeners: [None, None],
            clients: Slab::new(),
            next_generation: 0,
            tick_armed: false,
            scratch: String::new(),
            counters: Default::default(),
        };
        if let Some(socket) = &config.control {
            let (listener, file) = listen::control_socket(socket, user)?;
            info!(
                "control socket at {} (see `uringproxy status`)",
                socket.path.display()
            );
            control.listeners[Service::Control as usize] = Some(Listener {
                socket: listener,
                accepting: false,
                clients: 0,
                _file: Some(file),
            });
        }
        if let Some(addr) = config.metrics {
            let (listener, local) = listen::metrics_socket(addr)?;
            info!("metrics at http://{local}/metrics");
            control.listeners[Service::Metrics as usize] = Some(Listener {
                socket: listener,
                accepting: false,
                clients: 0,
                _file: None,
            });
        }
        control.arm_accepts(ring);
        Ok(control)
    }

    fn arm_accepts(&mut self, ring: &mut Ring) {
        for (index, listener) in self.listeners.iter_mut().enumerate() {
            if let Some(listener) = listener
                && !listener.accepting
            {
                let token = Token::new(Op::ControlAccept, 0, index).encode();
                ring.accept_multishot(listener.socket.as_fd(), token);
                listener.accepting = true;
            }
        }
    }

    /// Keeps the tick coming while there are deadlines to check or accepts to re-arm.
    fn arm_tick(&mut self, ring: &mut Ring) {
        let needed =
            !self.clients.is_empty() || self.listeners.iter().flatten().any(|l| !l.accepting);
        if needed && !self.tick_armed {
            ring.timeout(TICK, Token::new(Op::ControlTick, 0, 0).encode());
            self.tick_armed = true;
        }
    }

    fn token(&self, op: Op, key: usize) -> u64 {
        Token::new(op, self.clients[key].generation, key).encode()
    }

    /// Receives more of client `key`'s request (or, draining, whatever it sends).
    fn receive(&mut self, ring: &mut Ring, key: usize) {
        let token = self.token(Op::ControlRecv, key);
        let client = &mut self.clients[key];
        let have = match client.phase {
            Phase::Request { have } => have,
            Phase::Draining => 0,
            _ => return,
        };
        let Some(fd) = &client.fd else {
            return;
        };
        let buf = Slice {
            region: client.memory.clone(),
            range: have..client.service.request_limit(),
        };
        ring.recv(fd.as_fd(), buf, token);
        client.busy = true;
    }

    /// Sends what is left of client `key`'s reply.
    fn send(&mut self, ring: &mut Ring, key: usize) {
        let token = self.token(Op::ControlSend, key);
        let client = &mut self.clients[key];
        let (Phase::Reply { range, .. }, Some(fd)) = (&client.phase, &client.fd) else {
            return;
        };
        let buf = Slice {
            region: client.memory.clone(),
            range: range.clone(),
        };
        ring.send(fd.as_fd(), buf, token);
        client.busy = true;
    }

    /// Client `key`'s reply is out: it is closed once it has closed its side (or its
    /// linger is over). Not on the ring: io_uring hands a shutdown to a worker thread,
    /// and shutdown(SHUT_WR) does not block.
    fn finish(&mut self, ring: &mut Ring, key: usize, now: Instant) {
        let client = &mut self.clients[key];
        let shut = client
            .fd
            .as_ref()
            .is_some_and(|fd| SockRef::from(fd).shutdown(Shutdown::Write).is_ok());
        if !shut {
            self.close(ring, key);
            return;
        }
        client.phase = Phase::Draining;
        client.deadline = now + LINGER.into();
        self.receive(ring, key);
    }

    /// Closes the client of `service` that has waited longest for its request (counted
    /// as evicted); false if there is none, or too many are still closing (each holds
    /// its memory until its cancel completes).
    fn evict_waiting(&mut self, ring: &mut Ring, service: Service) -> bool {
        let mine = || self.clients.iter().filter(|(_, c)| c.service == service);
        let closing = mine()
            .filter(|(_, c)| matches!(c.phase, Phase::Closing))
            .count();
        let oldest = mine()
            .filter(|(_, c)| matches!(c.phase, Phase::Request { .. }))
            .min_by_key(|(_, c)| c.deadline)
            .map(|(key, _)| key);
        let Some(key) = oldest.filter(|_| closing < MAX_CLIENTS) else {
            return false;
        };
        self.counters[service as usize].evicted += 1;
        self.close(ring, key);
        true
    }

    /// Closes client `key`, once what it has in flight is cancelled.
    fn close(&mut self, ring: &mut Ring, key: usize) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        if client.busy {
            if !matches!(client.phase, Phase::Closing)
                && let Some(fd) = &client.fd
            {
                ring.cancel_fd(fd.as_fd());
            }
            client.phase = Phase::Closing;
            return;
        }
        let client = self.clients.remove(key);
        if let Some(listener) = &mut self.listeners[client.service as usize] {
            listener.clients -= 1;
        }
        if let Some(fd) = client.fd {
            ring.close(fd);
        }
    }
}

impl Proxy {
    /// A connection to listener `index` (or the end of its accept).
    pub(super) fn on_control_accept(&mut self, index: u32, completion: &Completion) {
        let now = self.now();
        let Proxy { control, ring, .. } = self;
        let service = if index == Service::Control as u32 {
            Service::Control
        } else {
            Service::Metrics
        };
        let Some(listener) = control.listeners[service as usize].as_mut() else {
            return;
        };
        if !completion.more() {
            // Ended by an error (out of files, say): taken up again at the next tick,
            // not at once, which could spin.
            listener.accepting = false;
        }
        let Some(fd) = ring.take_accepted(completion) else {
            control.arm_tick(ring);
            return;
        };
        control.counters[service as usize].accepted += 1;
        let trusted = service == Service::Metrics || peer_is_us_or_root(&fd);
        let mut room = listener.clients < MAX_CLIENTS;
        if trusted && !room {
            // Clients that connect and say nothing must not keep the others out until
            // their deadline: the one waiting longest for its request makes room.
            room = control.evict_waiting(ring, service);
        }
        match (trusted && room)
            .then(|| Region::new(CLIENT_MEMORY))
            .flatten()
        {
            None => {
                control.counters[service as usize].refused += 1;
                ring.close(fd);
            }
            Some(memory) => {
                if let Some(listener) = control.listeners[service as usize].as_mut() {
                    listener.clients += 1;
                }
                let generation = control.next_generation;
                control.next_generation = generation.wrapping_add(1) & GENERATION_MASK;
                let key = control.clients.insert(Client {
                    fd: Some(fd),
                    service,
                    generation,
                    memory,
                    phase: Phase::Request { have: 0 },
                    deadline: now + REQUEST_TIMEOUT.into(),
                    busy: false,
                });
                control.receive(ring, key);
            }
        }
        control.arm_tick(ring);
    }

    /// A control client's receive or send completed with `result`.
    pub(super) fn on_control_io(&mut self, op: Op, id: Id, result: i32) {
        let key = id.slot as usize;
        let Some(client) = self
            .control
            .clients
            .get_mut(key)
            .filter(|client| client.generation == id.generation)
        else {
            return;
        };
        client.busy = false;
        // Nothing (the peer is gone), an error, or a cancel: done with it.
        if matches!(client.phase, Phase::Closing) || result <= 0 {
            self.control.close(&mut self.ring, key);
            return;
        }
        let done = result as usize;
        match (op, &client.phase) {
            (Op::ControlRecv, Phase::Draining) => self.control.receive(&mut self.ring, key),
            (Op::ControlRecv, _) => self.on_control_request(key, done),
            _ => self.on_control_sent(key, done),
        }
    }

    /// Deadlines passed are closed; accepts that ended are armed again.
    pub(super) fn on_control_tick(&mut self) {
        let now = self.now();
        let control = &mut self.control;
        control.tick_armed = false;
        let late: Vec<(usize, Service, bool)> = control
            .clients
            .iter()
            .filter(|(_, client)| client.deadline <= now && !matches!(client.phase, Phase::Closing))
            .map(|(key, client)| {
                let served = matches!(client.phase, Phase::Draining);
                (key, client.service, served)
            })
            .collect();
        for (key, service, served) in late {
            if !served {
                control.counters[service as usize].timed_out += 1;
            }
            control.close(&mut self.ring, key);
        }
        control.arm_accepts(&mut self.ring);
        control.arm_tick(&mut self.ring);
    }

    /// `n` more bytes of client `key`'s request arrived: answer once it is complete.
    fn on_control_request(&mut self, key: usize, n: usize) {
        let client = &mut self.control.clients[key];
        let Phase::Request { have } = &mut client.phase else {
            return;
        };
        *have += n;
        let (have, service) = (*have, client.service);
        let full = have >= service.request_limit();
        let memory = client.memory.clone();
        let answer = memory.with_mut(0..have, |request| match service {
            Service::Control => match Request::parse(request, full) {
                Request::Incomplete => None,
                Request::Status => Some(Answer::Status),
                Request::Invalid(why) => Some(Answer::Refusal(why)),
            },
            Service::Metrics => match http::parse(request, full) {
                http::Parsed::Incomplete => None,
                http::Parsed::Respond(status) => Some(Answer::Http(status)),
            },
        });
        let Some(answer) = answer else {
            self.control.receive(&mut self.ring, key);
            return;
        };
        if !matches!(answer, Answer::Status | Answer::Http(http::Status::Ok)) {
            self.control.counters[service as usize].bad_requests += 1;
        }
        let now = self.now();
        self.control.clients[key].deadline = now + REPLY_TIMEOUT.into();
        self.refresh_counters();
        let reply = REPLY_START..CLIENT_MEMORY;
        let (len, next) = match answer {
            Answer::Status => memory.with_mut(reply, |buf| {
                let mut out = Out::new(buf);
                let mut listing = Listing::default();
                let header = self.with_report(|info, snapshot| {
                    out.record(|out| wire::write_header(out, info, snapshot))
                });
                let done = header && self.list_flows(&mut out, &mut listing, now);
                (out.len(), (!done).then_some(listing))
            }),
            Answer::Refusal(why) => memory.with_mut(reply, |buf| {
                let mut out = Out::new(buf);
                out.record(|out| wire::write_error(out, why));
                (out.len(), None)
            }),
            Answer::Http(status) => {
                let mut body = std::mem::take(&mut self.control.scratch);
                body.clear();
                if status == http::Status::Ok {
                    // A String takes whatever is written.
                    let _ = self
                        .with_report(|info, snapshot| prometheus::write(&mut body, info, snapshot));
                } else {
                    body.push_str(status.explanation());
                }
                let len = memory.with_mut(reply, |buf| {
                    let mut out = Out::new(buf);
                    out.record(|out| {
                        http::write_head(out, status, body.len())?;
                        out.write_str(&body)
                    });
                    out.len()
                });
                self.control.scratch = body;
                (len, None)
            }
        };
        self.start_reply(key, len, next);
    }

    /// Sends the `len` bytes just rendered into client `key`'s reply buffer, to go on
    /// with the listing `next` (if any) once they are out.
    fn start_reply(&mut self, key: usize, len: usize, next: Option<Listing>) {
        if len == 0 {
            // Nothing fitted the buffer (it is sized so that this cannot happen).
            self.control.close(&mut self.ring, key);
            return;
        }
        self.control.clients[key].phase = Phase::Reply {
            range: REPLY_START..REPLY_START + len,
            next,
        };
        self.control.send(&mut self.ring, key);
    }

    /// `n` bytes of client `key`'s reply went out: the rest of this slice, the next
    /// slice, or (the reply complete) the close.
    fn on_control_sent(&mut self, key: usize, n: usize) {
        let now = self.now();
        let client = &mut self.control.clients[key];
        let Phase::Reply { range, next } = &mut client.phase else {
            return;
        };
        range.start = (range.start + n).min(range.end);
        if range.start < range.end {
            self.control.send(&mut self.ring, key);
            return;
        }
        let Some(mut listing) = next.take() else {
            self.control.finish(&mut self.ring, key, now);
            return;
        };
        let memory = client.memory.clone();
        let (len, done) = memory.with_mut(REPLY_START..CLIENT_MEMORY, |buf| {
            let mut out = Out::new(buf);
            let done = self.list_flows(&mut out, &mut listing, now);
            (out.len(), done)
        });
        self.start_reply(key, len, (!done).then_some(listing));
    }

    /// Lists flows into `out` from `listing` on: at most `ROWS_PER_SLICE`, and as many
    /// as fit. True once the listing is complete (its `end` line written).
    fn list_flows(&self, out: &mut Out, listing: &mut Listing, now: Instant) -> bool {
        let mut rows = 0;
        loop {
            let row = if !listing.datagrams {
                let table = &self.tcp.table;
                if listing.slot >= table.slot_end() {
                    *listing = Listing {
                        datagrams: true,
                        slot: 0,
                        ..*listing
                    };
                    continue;
                }
                let entry = table.id_at(listing.slot).and_then(|id| table.get(id));
                entry.map(|entry| entry.row(now))
            } else {
                let flows = &self.udp.flows;
                if listing.slot >= flows.slot_end() {
                    return out.record(|out| wire::write_end(out, listing.listed));
                }
                flows
                    .at_slot(listing.slot)
                    .map(|flow| datagram_row(flow, now))
            };
            if let Some(row) = row {
                if rows == ROWS_PER_SLICE || !out.record(|out| wire::write_flow(out, &row)) {
                    return false;
                }
                rows += 1;
                listing.listed += 1;
            }
            listing.slot += 1;
        }
    }

    /// Runs `report` on the proxy's identity and numbers (counters refreshed first).
    pub(super) fn with_report<R>(&self, report: impl FnOnce(&Info, &Snapshot) -> R) -> R {
        let [tcp_connecting, tcp_open, tcp_closing] = self.tcp.phases().map(|n| n as u64);
        let (udp_open, icmp_open) = self.udp.flows.open_by_kind();
        let (write_in_use, write_buffers) = self.stack.tx.buffer_use();
        let (read_circulating, read_buffers) = self.ring.buffer_use(tun_io::READ_GROUP);
        let gauges = Gauges {
            tcp_connecting,
            tcp_open,
            tcp_closing,
            udp_open: udp_open as u64,
            icmp_open: icmp_open as u64,
            tun_write_buffers_in_use: write_in_use as u64,
            tun_write_buffers: write_buffers as u64,
            tun_read_buffers_circulating: u64::from(read_circulating),
            tun_read_buffers: u64::from(read_buffers),
            flow_buffers_resident_bound: self.tcp.budget.resident_bound() as u64,
            memory_limit: self.tcp.budget.limit() as u64,
            resident: resident_bytes(),
        };
        let tun = &self.tun.tun;
        let info = Info {
            tun: tun.name(),
            interface: &self.config.interface,
            offload: tun.offload().name(),
            uptime_s: self.epoch.elapsed().as_secs(),
        };
        let [control, metrics] = &self.control.counters;
        report(
            &info,
            &Snapshot {
                stats: &self.stats,
                gauges: &gauges,
                control,
                metrics,
            },
        )
    }
}

/// What `uringproxy status` lists of datagram flow `flow` at `now`.
fn datagram_row(flow: &datagram::Flow<Outbound>, now: Instant) -> FlowRow {
    let key = flow.key();
    let (bytes_up, bytes_down) = flow.bytes();
    FlowRow {
        proto: match flow.kind() {
            Kind::Udp => Proto::Udp,
            Kind::Echo => Proto::Icmp,
        },
        client: key.client_addr(),
        server: key.server_addr(),
        state: if flow.is_closing() {
            State::Closing
        } else if flow.io.socket.is_none() {
            // Its SOCKS5 association is being set up.
            State::Connecting
        } else {
            State::Open
        },
        bytes_up,
        bytes_down,
        age_s: (now - flow.opened()).secs(),
        idle_s: (now - flow.last_active()).secs(),
    }
}

/// Whether the peer of control connection `fd` runs as the proxy's user or as root
/// (the socket's mode already keeps others out; this holds where it does not, e.g. a
/// `--control` path in a directory another user can replace it in).
fn peer_is_us_or_root(fd: &OwnedFd) -> bool {
    getsockopt(fd, PeerCredentials)
        .is_ok_and(|peer| peer.uid() == 0 || peer.uid() == nix::unistd::geteuid().as_raw())
}

/// The process's resident memory (VmRSS of /proc/self/status), read when asked.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
