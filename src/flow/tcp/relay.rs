//! Moving bytes between a flow's smoltcp socket (the client side) and its outbound
//! kernel socket (the server side), and deciding from both sides' FIN and RST when and
//! how the flow ends. It describes the outbound I/O to start and is told its results.

use std::ops::Range;

use smoltcp::socket::tcp::{self, State};

use crate::flow::IoError;
use crate::flow::upstream::Fault;
use crate::uring::Region;
use crate::wire::socks5::ReplyCode;

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
    /// The SOCKS5 upstream failed the flow for a cause the direct path has no
    /// counterpart for (refusals and unreachable destinations map to those above).
    Upstream(Fault),
}

/// Progress of forwarding the client's FIN to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientFin {
    NotSeen,
    /// Received, but client bytes before it are still on their way to the server.
    Seen,
    /// Asked for; its result not yet reported.
    ShutdownInFlight,
    Forwarded,
}

/// Outbound I/O to start now, as offsets into the flow's region. The bytes stay where
/// they are until the matching `on_*` call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayIo {
    /// Client bytes to send to the server (a view into the smoltcp receive buffer).
    pub send: Option<Range<usize>>,
    /// Space to receive server bytes into: the free window of the smoltcp send buffer.
    pub recv: Option<Range<usize>>,
    /// Forward the client's FIN: shutdown(SHUT_WR) on the outbound socket.
    pub shutdown: bool,
}

/// Largest single send to the outbound socket; bigger only delays the first byte.
const MAX_SEND: usize = 256 * 1024;

/// Commits `n` bytes the kernel received at `start` of `region` (the send buffer's
/// free window when the receive was started) as data for smoltcp to send; returns how
/// many, and where in the region they end. Only we add to that buffer, so its free
/// window still starts there, unless it drained empty meanwhile: smoltcp then restarts
/// it at its beginning, the whole buffer is free, and the bytes move there first.
fn commit(socket: &mut tcp::Socket, region: &Region, start: usize, n: usize) -> (usize, usize) {
    socket
        .send(|free| {
            let Some(at) = region.offset_of(free) else {
                return (0, (0, start));
            };
            let n = n.min(free.len());
            if at.start != start {
                let from = start.saturating_sub(at.start);
                if from + n > free.len() {
                    return (0, (0, start));
                }
                free.copy_within(from..from + n, 0);
            }
            (n, (n, at.start + n))
        })
        .unwrap_or((0, start))
}

/// Relay state of one flow.
#[derive(Debug)]
pub struct Relay {
    phase: Phase,
    /// Bytes of the smoltcp receive buffer handed to an in-flight send (0: none).
    sending: usize,
    client_fin: ClientFin,
    /// Where the receive in flight writes (in the region): straight into the free
    /// window of the smoltcp send buffer, committed there once it completes.
    receiving: Option<Range<usize>>,
    /// Where in the region the bytes of the smoltcp receive buffer start. Only we take
    /// bytes out of it and smoltcp never moves its start otherwise (until a reset,
    /// which ends the flow), so this is exact.
    client_bytes_at: usize,
    /// Where in the region the bytes of the smoltcp send buffer end (only we add to
    /// it); `None` before the first.
    server_bytes_end: Option<usize>,
    server_eof: bool,
    /// Whether the server's FIN has been passed to smoltcp (`close`).
    server_fin_forwarded: bool,
    /// Outbound operations started and not yet completed.
    inflight: u32,
    failure: Option<Failure>,
    /// Server bytes committed to smoltcp's send buffer so far.
    committed: usize,
}

impl Relay {
    /// A relay whose outbound connect has just been started.
    pub fn connecting() -> Relay {
        Relay {
            phase: Phase::Connecting,
            sending: 0,
            client_fin: ClientFin::NotSeen,
            receiving: None,
            client_bytes_at: 0,
            server_bytes_end: None,
            server_eof: false,
            server_fin_forwarded: false,
            inflight: 1, // the connect
            failure: None,
            committed: 0,
        }
    }

    /// Server bytes handed to smoltcp so far.
    pub fn committed(&self) -> usize {
        self.committed
    }

    /// Where in the region the client's bytes waiting for the server start.
    pub fn client_bytes_at(&self) -> usize {
        self.client_bytes_at
    }

    /// Where in the region the server's bytes waiting for the client end, if any came.
    pub fn server_bytes_end(&self) -> Option<usize> {
        self.server_bytes_end
    }

    /// The part of the region the receive in flight writes.
    pub fn receiving(&self) -> Option<Range<usize>> {
        self.receiving.clone()
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

    fn completed(&mut self) {
        debug_assert!(self.inflight > 0, "a completion nothing was waiting for");
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// Fails the flow: one RST to the client (smoltcp's `abort`), RST to the server.
    pub fn fail(&mut self, socket: &mut tcp::Socket, failure: Failure) {
        self.failure.get_or_insert(failure);
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

    /// The outbound connect finished.
    pub fn on_connected(&mut self, socket: &mut tcp::Socket, result: Result<(), IoError>) {
        self.completed();
        if self.phase != Phase::Connecting {
            return;
        }
        match result {
            Ok(()) => self.open(socket),
            Err(IoError::Refused) => self.fail(socket, Failure::ConnectRefused),
            Err(IoError::HostUnreachable) => self.fail_quietly(Failure::HostUnreachable),
            Err(IoError::NetUnreachable) => self.fail_quietly(Failure::NetUnreachable),
            // Still connecting, the connect is cancelled only by its linked timeout.
            Err(IoError::Cancelled | IoError::TimedOut) => {
                self.fail(socket, Failure::ConnectTimeout);
            }
            Err(_) => self.fail(socket, Failure::ConnectOther),
        }
    }

    /// Both sides are connected: the client gets its SYN|ACK.
    fn open(&mut self, socket: &mut tcp::Socket) {
        self.phase = Phase::Open;
        socket.pause_synack(false);
    }

    /// The connect to the SOCKS5 upstream finished; its handshake follows (outside the
    /// relay), and the flow stays connecting until `on_upstream_reply`.
    pub fn on_upstream_connected(&mut self) {
        self.completed();
    }

    /// What the upstream made of the flow (a failed connect to it included): open, or
    /// failed as the direct path fails for the same cause (a refusal with RST, an
    /// unreachable destination with the ICMP error), any other cause with RST.
    pub fn on_upstream_reply(&mut self, socket: &mut tcp::Socket, result: Result<(), Fault>) {
        if self.phase != Phase::Connecting {
            return;
        }
        match result {
            Ok(()) => self.open(socket),
            Err(Fault::Refused(ReplyCode::ConnectionRefused)) => {
                self.fail(socket, Failure::ConnectRefused);
            }
            Err(Fault::Refused(ReplyCode::HostUnreachable)) => {
                self.fail_quietly(Failure::HostUnreachable);
            }
            Err(Fault::Refused(ReplyCode::NetworkUnreachable)) => {
                self.fail_quietly(Failure::NetUnreachable);
            }
            Err(fault) => self.fail(socket, Failure::Upstream(fault)),
        }
    }

    /// A send of client bytes finished: how many the kernel took. Returns how many
    /// left the smoltcp buffer.
    pub fn on_sent(
        &mut self,
        socket: &mut tcp::Socket,
        region: &Region,
        result: Result<usize, IoError>,
    ) -> usize {
        self.completed();
        let in_flight = std::mem::take(&mut self.sending);
        match result {
            Err(_) if self.phase == Phase::Open => {
                self.fail(socket, Failure::ServerReset);
                0
            }
            Err(_) => 0,
            Ok(sent) => {
                // The bytes were only peeked; now that the kernel has them, free their
                // space in the smoltcp buffer (which re-opens the client's window).
                let sent = sent.min(in_flight);
                let (n, at) = socket
                    .recv(|data| {
                        let n = sent.min(data.len());
                        (n, (n, region.offset_of(data).map(|at| at.start + n)))
                    })
                    .unwrap_or((0, None));
                if let Some(at) = at {
                    self.client_bytes_at = at;
                }
                n
            }
        }
    }

    /// A receive of server bytes into the send buffer's free window finished (0 bytes:
    /// EOF); `region` is the flow's memory.
    pub fn on_received(
        &mut self,
        socket: &mut tcp::Socket,
        region: &Region,
        result: Result<usize, IoError>,
    ) {
        self.completed();
        let Some(range) = self.receiving.take() else {
            return;
        };
        match result {
            Ok(0) => self.server_eof = true,
            Ok(n) => {
                let (n, end) = commit(socket, region, range.start, n);
                self.committed += n;
                if n > 0 {
                    self.server_bytes_end = Some(end);
                }
            }
            Err(_) if self.phase == Phase::Open => self.fail(socket, Failure::ServerReset),
            Err(_) => {}
        }
    }

    /// The shutdown(SHUT_WR) forwarding the client's FIN finished.
    pub fn on_shutdown(&mut self, socket: &mut tcp::Socket, result: Result<(), IoError>) {
        self.completed();
        self.client_fin = ClientFin::Forwarded;
        if result.is_err() && self.phase == Phase::Open {
            self.fail(socket, Failure::ServerReset);
        }
    }

    /// Moves what can move without I/O and returns the outbound I/O to start now, as
    /// offsets into `region`, the flow's memory. At most `tx_room` more server bytes
    /// are received (the flow's memory allowance).
    pub fn pump(&mut self, socket: &mut tcp::Socket, region: &Region, tx_room: usize) -> RelayIo {
        let mut io = RelayIo::default();
        if self.phase != Phase::Open {
            return io;
        }
        // Server -> client: the server's FIN once its bytes are with smoltcp, else
        // receive into whatever of the send buffer is free (nothing while it is full:
        // the server then waits, as it would for a slow direct client).
        if self.server_eof && !self.server_fin_forwarded {
            socket.close();
            self.server_fin_forwarded = true;
        }
        if self.receiving.is_none()
            && !self.server_eof
            && tx_room > 0
            && let Ok(Some(free)) = socket.send(|free| (0, region.offset_of(free)))
            && !free.is_empty()
        {
            let free = free.start..free.end.min(free.start + tx_room);
            self.receiving = Some(free.clone());
            self.inflight += 1;
            io.recv = Some(free);
        }

        // Client -> server: send what the client has sent, then forward its FIN.
        self.note_client_fin(socket);
        if self.sending == 0 && socket.recv_queue() == 0 && self.client_fin == ClientFin::Seen {
            self.client_fin = ClientFin::ShutdownInFlight;
            self.inflight += 1;
            io.shutdown = true;
        }
        if self.sending == 0
            && socket.recv_queue() > 0
            && let Ok(data) = socket.peek(MAX_SEND)
            && let Some(range) = region.offset_of(data)
            && !range.is_empty()
        {
            self.sending = range.len();
            self.inflight += 1;
            io.send = Some(range);
        }
        io
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
