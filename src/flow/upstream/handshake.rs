//! The SOCKS5 handshake on one connection to the upstream (greeting, RFC 1929 auth, request).

// It writes each request into a small scratch buffer the caller owns and the ring sends
// from, says where the reply is to be received (never past its end, so bytes after a
// CONNECT reply stay in the socket for the relay), is told the results, and ends by its
// deadline with the reply's bound address or a `Fault`: CONNECT for a TCP flow, UDP
// ASSOCIATE for a UDP flow's control connection.

use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;

use smoltcp::time::Instant;

use super::Fault;
use crate::flow::IoError;
use crate::wire::socks5::{self, Bound, Command, Credentials, Method};

/// Where requests are written in the scratch buffer, and where replies are received.
const SEND_AREA: Range<usize> = 0..socks5::MAX_REQUEST;
const RECV_AREA: Range<usize> = SEND_AREA.end..SEND_AREA.end + socks5::MAX_REPLY;
/// Bytes of scratch buffer one handshake needs.
pub const SCRATCH: usize = RECV_AREA.end;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// The connection to the upstream is being made.
    Connecting,
    Greeting,
    Auth,
    Request,
    Done(Bound),
    Failed(Fault),
}

/// Where a request asks the upstream to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    /// A host name and port (fake-IP DNS): the upstream resolves the name.
    Name(Rc<str>, u16),
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Target {
        Target::Addr(addr)
    }
}

/// I/O to start now, as ranges of the scratch buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Io {
    pub send: Option<Range<usize>>,
    pub recv: Option<Range<usize>>,
}

/// One handshake.
#[derive(Debug)]
pub struct Handshake {
    command: Command,
    /// The destination of a CONNECT, the client address of a UDP ASSOCIATE.
    target: Target,
    credentials: Option<Rc<Credentials>>,
    deadline: Instant,
    stage: Stage,
    /// The current stage's request is in the send area.
    written: bool,
    /// Its length, and how much of it the kernel has taken.
    request: usize,
    sent: usize,
    /// The length of its reply as far as known yet, and how much of it has arrived.
    reply: usize,
    received: usize,
    /// The stage the reply leads to, once the request is also wholly sent.
    answered: Option<Stage>,
    sending: bool,
    receiving: bool,
}

impl Handshake {
    /// A handshake for `command` to `target`, to be finished by `deadline`; it starts
    /// once told its connection is made.
    pub fn new(
        command: Command,
        target: impl Into<Target>,
        credentials: Option<Rc<Credentials>>,
        deadline: Instant,
    ) -> Handshake {
        Handshake {
            command,
            target: target.into(),
            credentials,
            deadline,
            stage: Stage::Connecting,
            written: false,
            request: 0,
            sent: 0,
            reply: 0,
            received: 0,
            answered: None,
            sending: false,
            receiving: false,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The bound address of the reply, or why it failed; `None` while under way.
    pub fn outcome(&self) -> Option<Result<Bound, Fault>> {
        match self.stage {
            Stage::Done(bound) => Some(Ok(bound)),
            Stage::Failed(fault) => Some(Err(fault)),
            _ => None,
        }
    }

    /// A send of the handshake's is in flight (its completion is the handshake's).
    pub fn sending(&self) -> bool {
        self.sending
    }

    /// A receive of the handshake's is in flight.
    pub fn receiving(&self) -> bool {
        self.receiving
    }

    /// Operations of the handshake's in flight.
    pub fn inflight(&self) -> u32 {
        u32::from(self.sending) + u32::from(self.receiving)
    }

    fn under_way(&self) -> bool {
        self.outcome().is_none()
    }

    fn fail(&mut self, fault: Fault) {
        if self.under_way() {
            self.stage = Stage::Failed(fault);
        }
    }

    /// The connection to the upstream was made, or not.
    pub fn on_connected(&mut self, result: Result<(), IoError>) {
        if self.stage == Stage::Connecting {
            self.stage = match result {
                Ok(()) => Stage::Greeting,
                // The connect's linked timeout (the same --connect-timeout as the
                // deadline, so either may fire first): a silent upstream is a timeout.
                Err(IoError::Cancelled | IoError::TimedOut) => Stage::Failed(Fault::Timeout),
                Err(_) => Stage::Failed(Fault::Connect),
            };
        }
    }

    /// At `now` past the deadline an unfinished handshake fails (what it has in flight
    /// is then to be cancelled).
    pub fn expire(&mut self, now: Instant) {
        if now >= self.deadline {
            self.fail(Fault::Timeout);
        }
    }

    /// The I/O to start now, as ranges of `scratch` (`SCRATCH` bytes); a new stage's
    /// request is written into it first.
    pub fn pump(&mut self, scratch: &mut [u8]) -> Io {
        let mut io = Io::default();
        if !matches!(self.stage, Stage::Greeting | Stage::Auth | Stage::Request) {
            return io;
        }
        if !self.written && !self.write(&mut scratch[SEND_AREA]) {
            return io;
        }
        if !self.sending && self.sent < self.request {
            self.sending = true;
            io.send = Some(SEND_AREA.start + self.sent..SEND_AREA.start + self.request);
        }
        if !self.receiving && self.received < self.reply {
            self.receiving = true;
            io.recv = Some(RECV_AREA.start + self.received..RECV_AREA.start + self.reply);
        }
        io
    }

    /// Writes the current stage's request into `area`; false if it has none to send.
    fn write(&mut self, area: &mut [u8]) -> bool {
        let password = self.credentials.is_some();
        let (request, reply) = match (self.stage, &self.credentials) {
            (Stage::Greeting, _) => (socks5::greeting(area, password), socks5::SHORT_REPLY),
            (Stage::Auth, Some(credentials)) => {
                (socks5::auth_request(area, credentials), socks5::SHORT_REPLY)
            }
            (Stage::Request, _) => {
                let len = match &self.target {
                    Target::Addr(addr) => Some(socks5::request(area, self.command, *addr)),
                    Target::Name(name, port) => {
                        socks5::request_name(area, self.command, name.as_bytes(), *port)
                    }
                };
                let Some(len) = len else {
                    self.fail(Fault::Protocol);
                    return false;
                };
                (len, socks5::REPLY_PREFIX)
            }
            _ => {
                self.fail(Fault::Protocol);
                return false;
            }
        };
        (self.request, self.sent, self.reply, self.received) = (request, 0, reply, 0);
        self.written = true;
        true
    }

    /// A send finished: how many bytes the kernel took.
    pub fn on_sent(&mut self, result: Result<usize, IoError>) {
        self.sending = false;
        if !self.under_way() {
            return;
        }
        match result {
            // Nothing taken of a non-empty request would only be asked for again.
            Ok(0) | Err(_) => self.fail(Fault::Closed),
            Ok(n) => {
                self.sent = (self.sent + n).min(self.request);
                self.advance();
            }
        }
    }

    /// A receive into the range `pump` gave finished; `scratch` holds what arrived.
    pub fn on_received(&mut self, scratch: &[u8], result: Result<usize, IoError>) {
        self.receiving = false;
        if !self.under_way() {
            return;
        }
        match result {
            Ok(0) | Err(_) => self.fail(Fault::Closed),
            Ok(n) => {
                self.received = (self.received + n).min(self.reply);
                let reply = &scratch[RECV_AREA.start..RECV_AREA.start + self.received];
                match self.read_reply(reply) {
                    Ok(Some(next)) => {
                        self.answered = Some(next);
                        self.advance();
                    }
                    Ok(None) => {}
                    Err(fault) => self.fail(fault),
                }
            }
        }
    }

    /// What the reply so far says: the next stage once it is complete, `None` while
    /// more of it is needed.
    fn read_reply(&mut self, reply: &[u8]) -> Result<Option<Stage>, Fault> {
        let short = |reply: &[u8]| [reply[0], reply[1]];
        match self.stage {
            Stage::Greeting if reply.len() == socks5::SHORT_REPLY => {
                match socks5::method_reply(short(reply), self.credentials.is_some()) {
                    Ok(Method::NoAuth) => Ok(Some(Stage::Request)),
                    Ok(Method::Password) => Ok(Some(Stage::Auth)),
                    Err(error) => Err(Fault::of(error)),
                }
            }
            Stage::Auth if reply.len() == socks5::SHORT_REPLY => socks5::auth_reply(short(reply))
                .map(|()| Some(Stage::Request))
                .map_err(Fault::of),
            Stage::Request if reply.len() >= socks5::SHORT_REPLY => {
                // A failure is known from the first two bytes, whatever follows.
                socks5::reply_status(short(reply)).map_err(Fault::of)?;
                if reply.len() == socks5::REPLY_PREFIX && self.reply == socks5::REPLY_PREFIX {
                    self.reply = socks5::reply_len(reply).map_err(Fault::of)?;
                }
                if reply.len() < self.reply {
                    return Ok(None);
                }
                match socks5::reply(reply).map_err(Fault::of)? {
                    Bound::Domain if self.command == Command::UdpAssociate => Err(Fault::Protocol),
                    bound => Ok(Some(Stage::Done(bound))),
                }
            }
            _ => Ok(None),
        }
    }

    /// Moves to the stage the reply led to once the request is wholly sent too.
    fn advance(&mut self) {
        if self.sending || self.sent < self.request {
            return;
        }
        if let Some(next) = self.answered.take() {
            self.stage = next;
            self.written = false;
        }
    }
}

#[cfg(test)]
mod tests;
