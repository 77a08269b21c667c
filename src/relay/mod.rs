//! The per-flow relay state machine: moves bytes between a smoltcp socket (the client side)
//! and an outbound kernel socket (the server side) and decides FIN, RST and teardown.
//! It never touches a file descriptor: it returns the I/O to start, and is told results.

pub mod datagram;

use smoltcp::socket::tcp::{self, State};

use nix::libc;

/// Where the flow is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Outbound connect in flight; the client's SYN|ACK is held back until it succeeds.
    Connecting,
    /// Both sides connected; bytes flow.
    Open,
    /// Tearing down: waiting for in-flight operations before the outbound fd is closed.
    Closing(Teardown),
}

/// How the outbound socket should be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Teardown {
    /// Both sides finished with FIN: plain close.
    Graceful,
    /// A reset, timeout or failure: close with RST (SO_LINGER 0), cancelling pending I/O.
    Abortive,
}

/// Progress of forwarding the client's FIN to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientFin {
    NotSeen,
    /// Received, but client bytes before it are still on their way to the server.
    Seen,
    /// Asked of the event loop (which does it at once today; the relay does not rely on
    /// that).
    ShutdownInFlight,
    Forwarded,
}

/// I/O the event loop should start for this flow, borrowed from the flow's buffers.
/// The buffers stay where they are until the matching `on_*` call.
#[derive(Debug, Default)]
pub struct Actions<'a> {
    /// Client bytes to send to the server (a view into the smoltcp receive buffer).
    pub send: Option<&'a [u8]>,
    /// Space to receive server bytes into.
    pub recv: Option<&'a mut [u8]>,
    /// Forward the client's FIN: shutdown(SHUT_WR) on the outbound socket.
    pub shutdown: bool,
}

/// Why a flow failed, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    ConnectRefused,
    /// The client gets the ICMP error a direct connect would have got, not a RST.
    HostUnreachable,
    NetUnreachable,
    ConnectTimeout,
    ConnectOther,
    ServerReset,
    ClientReset,
    /// Evicted while still connecting, to make room for a newer SYN (e.g. a SYN flood).
    Evicted,
}

/// Relay state of one flow, independent of how its I/O is carried out.
pub struct Relay {
    phase: Phase,
    /// Bytes of the smoltcp receive buffer handed to an in-flight send (0: none).
    sending: usize,
    client_fin: ClientFin,
    /// Server bytes received but not yet accepted by the smoltcp send buffer.
    staging: &'static mut [u8],
    staged: std::ops::Range<usize>,
    receiving: bool,
    server_eof: bool,
    /// Whether the server's FIN has been passed to smoltcp (`close`).
    server_fin_forwarded: bool,
    /// Outbound operations started and not yet completed.
    inflight: u32,
    failure: Option<Failure>,
}

/// Largest single send to the outbound socket; bigger only delays the first byte.
const MAX_SEND: usize = 256 * 1024;

impl Relay {
    /// A relay waiting for its outbound connect, staging server data in `staging`.
    pub fn new(staging: &'static mut [u8]) -> Relay {
        Relay {
            phase: Phase::Connecting,
            sending: 0,
            client_fin: ClientFin::NotSeen,
            staging,
            staged: 0..0,
            receiving: false,
            server_eof: false,
            server_fin_forwarded: false,
            inflight: 1, // the connect
            failure: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn inflight(&self) -> u32 {
        self.inflight
    }

    pub fn failure(&self) -> Option<Failure> {
        self.failure
    }

    /// Records an operation started outside `pump` (a cancel does not count: it has its
    /// own completion that nobody waits for).
    fn started(&mut self) {
        self.inflight += 1;
    }

    fn completed(&mut self) {
        debug_assert!(self.inflight > 0);
        self.inflight = self.inflight.saturating_sub(1);
    }

    fn fail(&mut self, socket: &mut tcp::Socket, failure: Failure) {
        self.failure.get_or_insert(failure);
        // abort() queues one RST to the client and closes the smoltcp socket.
        socket.abort();
        self.phase = Phase::Closing(Teardown::Abortive);
    }

    /// Gives up on a flow still waiting for its outbound connect: RST to the client.
    pub fn evict(&mut self, socket: &mut tcp::Socket) {
        if self.phase == Phase::Connecting {
            self.fail(socket, Failure::Evicted);
        }
    }

    /// Ends a flow whose client is told by other means (an ICMP error): the smoltcp
    /// socket, still holding back its SYN|ACK, is dropped without a RST.
    fn fail_quietly(&mut self, failure: Failure) {
        self.failure.get_or_insert(failure);
        self.phase = Phase::Closing(Teardown::Abortive);
    }

    /// The outbound connect finished with `result` (0 or -errno).
    pub fn on_connected(&mut self, socket: &mut tcp::Socket, result: i32) {
        self.completed();
        if self.phase != Phase::Connecting {
            return;
        }
        match -result {
            0 => {
                self.phase = Phase::Open;
                socket.pause_synack(false);
            }
            libc::ECONNREFUSED => self.fail(socket, Failure::ConnectRefused),
            libc::EHOSTUNREACH => self.fail_quietly(Failure::HostUnreachable),
            libc::ENETUNREACH => self.fail_quietly(Failure::NetUnreachable),
            libc::ECANCELED | libc::ETIMEDOUT => self.fail(socket, Failure::ConnectTimeout),
            _ => self.fail(socket, Failure::ConnectOther),
        }
    }

    /// A send of client bytes finished with `result` (bytes sent or -errno).
    pub fn on_sent(&mut self, socket: &mut tcp::Socket, result: i32) {
        self.completed();
        let in_flight = std::mem::take(&mut self.sending);
        if result < 0 {
            if self.phase == Phase::Open {
                self.fail(socket, Failure::ServerReset);
            }
            return;
        }
        let sent = (result as usize).min(in_flight);
        // The bytes were only peeked; now that the kernel has them, free their space
        // in the smoltcp buffer (which re-opens the client's window).
        let _ = socket.recv(|data| (sent.min(data.len()), ()));
    }

    /// A receive of server bytes finished with `result` (bytes, 0 at EOF, or -errno).
    pub fn on_received(&mut self, socket: &mut tcp::Socket, result: i32) {
        self.completed();
        self.receiving = false;
        match result {
            0 => self.server_eof = true,
            n if n > 0 => self.staged = 0..(n as usize).min(self.staging.len()),
            _ if self.phase == Phase::Open => self.fail(socket, Failure::ServerReset),
            _ => {}
        }
    }

    /// The shutdown(SHUT_WR) forwarding the client's FIN finished.
    pub fn on_shutdown(&mut self, socket: &mut tcp::Socket, result: i32) {
        self.completed();
        self.client_fin = ClientFin::Forwarded;
        if result < 0 && self.phase == Phase::Open {
            self.fail(socket, Failure::ServerReset);
        }
    }

    /// Moves what can move without I/O and returns the I/O to start now.
    pub fn pump<'a>(&'a mut self, socket: &'a mut tcp::Socket) -> Actions<'a> {
        let mut actions = Actions::default();
        if self.phase != Phase::Open {
            return actions;
        }
        // Server -> client: hand staged bytes to smoltcp, then the server's FIN.
        if !self.staged.is_empty()
            && socket.may_send()
            && let Ok(n) = socket.send_slice(&self.staging[self.staged.clone()])
        {
            self.staged.start += n;
        }
        if self.server_eof && self.staged.is_empty() && !self.server_fin_forwarded {
            socket.close();
            self.server_fin_forwarded = true;
        }
        let want_recv = !self.receiving && !self.server_eof && self.staged.is_empty();

        // Client -> server: send what the client has sent, then forward its FIN.
        self.note_client_fin(socket);
        let want_shutdown =
            self.sending == 0 && socket.recv_queue() == 0 && self.client_fin == ClientFin::Seen;
        if want_shutdown {
            self.client_fin = ClientFin::ShutdownInFlight;
            self.started();
            actions.shutdown = true;
        }
        if want_recv {
            self.receiving = true;
            self.started();
            actions.recv = Some(&mut self.staging[..]);
        }
        if self.sending == 0
            && socket.recv_queue() > 0
            && let Ok(data) = socket.peek(MAX_SEND)
            && !data.is_empty()
        {
            self.sending = data.len();
            self.inflight += 1;
            actions.send = Some(data);
        }
        actions
    }

    /// Records the client's FIN once smoltcp is in a state that implies it. Every such
    /// state is reached by ingress or by our own `close`, both followed by a `pump` or
    /// `update_phase`, so the FIN is noted before the socket can move on to `Closed`.
    fn note_client_fin(&mut self, socket: &tcp::Socket) {
        let fin_received = matches!(
            socket.state(),
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        );
        if fin_received && self.client_fin == ClientFin::NotSeen {
            self.client_fin = ClientFin::Seen;
        }
    }

    /// Whether client bytes or the client's FIN still have to reach the server.
    pub fn owes_server(&self, socket: &tcp::Socket) -> bool {
        self.sending > 0 || socket.recv_queue() > 0 || self.client_fin == ClientFin::Seen
    }

    /// After smoltcp has run: moves the flow to `Closing` once its socket is done and
    /// everything the client sent has been handed to the server.
    pub fn update_phase(&mut self, socket: &tcp::Socket) {
        if matches!(self.phase, Phase::Closing(_)) {
            return;
        }
        self.note_client_fin(socket);
        let both_fins = self.client_fin != ClientFin::NotSeen && self.server_fin_forwarded;
        let teardown = match socket.state() {
            // Listen again means the client reset the half-open connection.
            State::Listen => Teardown::Abortive,
            State::Closed if !both_fins => Teardown::Abortive,
            State::Closed | State::TimeWait if both_fins => {
                if self.owes_server(socket) {
                    return;
                }
                Teardown::Graceful
            }
            _ => return,
        };
        if teardown == Teardown::Abortive {
            self.failure.get_or_insert(Failure::ClientReset);
        }
        self.phase = Phase::Closing(teardown);
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("phase", &self.phase)
            .field("sending", &self.sending)
            .field("client_fin", &self.client_fin)
            .field("staged", &self.staged)
            .field("receiving", &self.receiving)
            .field("server_eof", &self.server_eof)
            .field("server_fin_forwarded", &self.server_fin_forwarded)
            .field("inflight", &self.inflight)
            .field("failure", &self.failure)
            .finish()
    }
}

#[cfg(test)]
mod tests;
