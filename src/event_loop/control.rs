//! The control socket and the metrics endpoint, served by the loop on its ring like
//! everything else: a multishot accept on each, receives of a client's request into a
//! bounded buffer, and its reply sent from a bounded buffer. A status reply is rendered
//! a slice at a time (the header, then at most `ROWS_PER_SLICE` flows), the next slice
//! only once the last one is sent, so a reply for 10,000 flows costs each turn a few
//! hundred rows at most and a client that stops reading stalls only its own reply.
//! Clients are few (`MAX_CLIENTS` per listener; more are closed at once), each holds a
//! fixed amount of memory, and each has a deadline, checked once a second.

mod clients;
mod listen;
mod reply;
mod snapshot;

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::time::Duration;

use log::info;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::User;
use slab::Slab;
use smoltcp::time::Instant;
use socket2::Socket;

use super::Proxy;
use crate::config::Config;
use crate::control::counters::Clients;
use crate::control::{CONTROL_REQUEST_LIMIT, HTTP_HEAD_LIMIT, REPLY_BUFFER, http};
use crate::error::Error;
use crate::flow::Id;
use crate::uring::token::GENERATION_MASK;
use crate::uring::{Completion, Op, Region, Ring};
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
}

/// Whether the peer of control connection `fd` runs as the proxy's user or as root
/// (the socket's mode already keeps others out; this holds where it does not, e.g. a
/// `--control` path in a directory another user can replace it in).
fn peer_is_us_or_root(fd: &OwnedFd) -> bool {
    getsockopt(fd, PeerCredentials)
        .is_ok_and(|peer| peer.uid() == 0 || peer.uid() == nix::unistd::geteuid().as_raw())
}
