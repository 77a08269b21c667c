//! The SOCKS5 handshake on one connection to an upstream proxy, without I/O: the
//! greeting, RFC 1929 authentication when credentials are configured, then CONNECT (a
//! TCP flow) or UDP ASSOCIATE (a UDP flow's control connection). It writes each request
//! into a small scratch buffer the caller owns and the ring sends from, says where the
//! reply is to be received (never past its end, so bytes after a CONNECT reply stay in
//! the socket for the relay), is told the results, and ends by its deadline with the
//! reply's bound address or a `Fault`.

use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;

use nix::errno::Errno;
use smoltcp::time::Instant;

use crate::wire::socks5::{self, Bound, Command, Credentials, Method, ReplyCode};

/// Where requests are written in the scratch buffer, and where replies are received.
const SEND_AREA: Range<usize> = 0..socks5::MAX_REQUEST;
const RECV_AREA: Range<usize> = SEND_AREA.end..SEND_AREA.end + socks5::MAX_REPLY;
/// Bytes of scratch buffer one handshake needs.
pub const SCRATCH: usize = RECV_AREA.end;

/// Why a handshake failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The connection to the upstream could not be made (refused, unreachable, timed
    /// out): it is down or unreachable from `-i`.
    Connect,
    /// Not finished by the deadline (`--connect-timeout` from the start).
    Timeout,
    /// The upstream closed or reset the connection during the handshake.
    Closed,
    /// Not a SOCKS5 reply, or not an answer to what was asked (version, method, address
    /// type, a relay named by a domain name).
    Protocol,
    /// The upstream accepts none of the methods offered: it wants a password and none is
    /// configured, or something else.
    NoAcceptableMethod,
    /// The upstream refused the user name and password.
    AuthRejected,
    /// The request failed with this reply code.
    Refused(ReplyCode),
}

impl Fault {
    fn of(error: socks5::Error) -> Fault {
        match error {
            socks5::Error::NoAcceptableMethod => Fault::NoAcceptableMethod,
            socks5::Error::AuthRejected(_) => Fault::AuthRejected,
            socks5::Error::Refused(code) => Fault::Refused(code),
            socks5::Error::Version(_)
            | socks5::Error::Method(_)
            | socks5::Error::AddressType(_)
            | socks5::Error::Truncated => Fault::Protocol,
        }
    }
}

/// Flows and associations the upstream failed, by cause, and what the UDP relay through
/// it dropped.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub connect_failed: u64,
    pub timeouts: u64,
    pub closed: u64,
    pub protocol_errors: u64,
    pub no_acceptable_method: u64,
    pub auth_rejected: u64,
    /// Reply codes 1 (general failure) and 2 (not allowed by the ruleset); refusals and
    /// unreachable destinations are counted with the direct path's failures.
    pub general_failure: u64,
    pub not_allowed: u64,
    /// Reply codes 6 to 8 and unassigned ones.
    pub other_reply: u64,
    /// Reply codes 3 to 5 (unreachable, refused) to a UDP ASSOCIATE; to a CONNECT they
    /// reach the client as the direct path's would and are counted with those.
    pub unreachable: u64,
    /// UDP associations set up, and ended by the upstream closing their control
    /// connection (or sending on it).
    pub associations: u64,
    pub associations_ended: u64,
    /// Datagrams from the relay dropped: fragments, malformed headers or sources other
    /// than the flow's server, and client datagrams too big for the header or beyond
    /// those held while the association is set up.
    pub udp_fragments: u64,
    pub udp_malformed: u64,
    pub udp_too_big: u64,
    pub udp_not_held: u64,
    /// Pings refused: ICMP cannot go through SOCKS5.
    pub echo_refused: u64,
}

impl Counters {
    pub fn count(&mut self, fault: Fault) {
        let counter = match fault {
            Fault::Connect => &mut self.connect_failed,
            Fault::Timeout => &mut self.timeouts,
            Fault::Closed => &mut self.closed,
            Fault::Protocol => &mut self.protocol_errors,
            Fault::NoAcceptableMethod => &mut self.no_acceptable_method,
            Fault::AuthRejected => &mut self.auth_rejected,
            Fault::Refused(ReplyCode::GeneralFailure) => &mut self.general_failure,
            Fault::Refused(ReplyCode::NotAllowed) => &mut self.not_allowed,
            Fault::Refused(
                ReplyCode::NetworkUnreachable
                | ReplyCode::HostUnreachable
                | ReplyCode::ConnectionRefused,
            ) => &mut self.unreachable,
            Fault::Refused(_) => &mut self.other_reply,
        };
        *counter += 1;
    }
}

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
    target: SocketAddr,
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
        target: SocketAddr,
        credentials: Option<Rc<Credentials>>,
        deadline: Instant,
    ) -> Handshake {
        Handshake {
            command,
            target,
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
    pub fn on_connected(&mut self, result: Result<(), Errno>) {
        if self.stage == Stage::Connecting {
            self.stage = match result {
                Ok(()) => Stage::Greeting,
                // The connect's linked timeout (the same --connect-timeout as the
                // deadline, so either may fire first): a silent upstream is a timeout.
                Err(Errno::ECANCELED | Errno::ETIME | Errno::ETIMEDOUT) => {
                    Stage::Failed(Fault::Timeout)
                }
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
            (Stage::Request, _) => (
                socks5::request(area, self.command, self.target),
                socks5::REPLY_PREFIX,
            ),
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
    pub fn on_sent(&mut self, result: Result<usize, Errno>) {
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
    pub fn on_received(&mut self, scratch: &[u8], result: Result<usize, Errno>) {
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
mod tests {
    use std::collections::VecDeque;

    use super::*;

    const TARGET: &str = "192.0.2.80:443";
    const NO_AUTH: [u8; 2] = [5, 0];
    const SUCCESS_V4: [u8; 10] = [5, 0, 0, 1, 10, 9, 8, 7, 0x12, 0x34];

    /// The upstream as the kernel would show it: what it sends, given out `chunk` bytes
    /// at a time at most, then EOF if `eof`; sends taken `send_chunk` bytes at a time.
    struct Peer {
        to_send: VecDeque<u8>,
        chunk: usize,
        send_chunk: usize,
        eof: bool,
        received: Vec<u8>,
    }

    impl Peer {
        fn new(script: &[&[u8]]) -> Peer {
            Peer {
                to_send: script.concat().into_iter().collect(),
                chunk: usize::MAX,
                send_chunk: usize::MAX,
                eof: true,
                received: Vec::new(),
            }
        }
    }

    fn handshake(credentials: Option<Credentials>) -> Handshake {
        let mut handshake = Handshake::new(
            Command::Connect,
            TARGET.parse().unwrap(),
            credentials.map(Rc::new),
            Instant::from_secs(10),
        );
        handshake.on_connected(Ok(()));
        handshake
    }

    /// Runs the handshake against `peer` until it ends or nothing moves; what is left
    /// in flight stays so (the caller may cancel it).
    fn run(handshake: &mut Handshake, peer: &mut Peer) -> Option<Result<Bound, Fault>> {
        let mut scratch = vec![0u8; SCRATCH];
        let mut pending_recv = None;
        for _ in 0..10_000 {
            let io = handshake.pump(&mut scratch);
            let mut moved = false;
            if let Some(range) = io.send {
                let n = range.len().min(peer.send_chunk);
                peer.received
                    .extend_from_slice(&scratch[range.start..range.start + n]);
                handshake.on_sent(Ok(n));
                moved = true;
            }
            if let Some(range) = io.recv {
                pending_recv = Some(range);
            }
            if let Some(range) = pending_recv.clone() {
                let n = range.len().min(peer.chunk).min(peer.to_send.len());
                if n > 0 {
                    for (at, byte) in peer.to_send.drain(..n).enumerate() {
                        scratch[range.start + at] = byte;
                    }
                    handshake.on_received(&scratch, Ok(n));
                    pending_recv = None;
                    moved = true;
                } else if peer.eof {
                    handshake.on_received(&scratch, Ok(0));
                    pending_recv = None;
                    moved = true;
                }
            }
            if handshake.outcome().is_some() || !moved {
                break;
            }
        }
        handshake.outcome()
    }

    fn connect_request() -> Vec<u8> {
        let mut buf = [0u8; 32];
        let n = socks5::request(&mut buf, Command::Connect, TARGET.parse().unwrap());
        buf[..n].to_vec()
    }

    #[test]
    fn no_auth_connect_sends_the_greeting_then_the_request() {
        let mut h = handshake(None);
        let mut peer = Peer::new(&[&NO_AUTH, &SUCCESS_V4]);
        let bound = "10.9.8.7:4660".parse().unwrap();
        assert_eq!(run(&mut h, &mut peer), Some(Ok(Bound::Addr(bound))));
        assert_eq!(peer.received, [&[5, 1, 0][..], &connect_request()].concat());
        assert_eq!(h.inflight(), 0);
    }

    #[test]
    fn password_auth_is_offered_and_used_when_chosen() {
        let credentials = Credentials::new(b"user", b"pass").unwrap();
        let mut h = handshake(Some(credentials));
        let mut peer = Peer::new(&[&[5, 2], &[1, 0], &SUCCESS_V4]);
        assert!(matches!(run(&mut h, &mut peer), Some(Ok(_))));
        let expected = [
            &[5, 2, 0, 2][..],
            b"\x01\x04user\x04pass",
            &connect_request(),
        ]
        .concat();
        assert_eq!(peer.received, expected);
        // A server may also waive it.
        let credentials = Credentials::new(b"user", b"pass").unwrap();
        let mut h = handshake(Some(credentials));
        let mut peer = Peer::new(&[&NO_AUTH, &SUCCESS_V4]);
        assert!(matches!(run(&mut h, &mut peer), Some(Ok(_))));
    }

    #[test]
    fn data_after_the_reply_is_left_in_the_socket() {
        // The reply and the server's first bytes in one segment: the handshake reads up
        // to the end of the reply and not a byte more.
        for reply in [
            SUCCESS_V4.to_vec(),
            [&[5, 0, 0, 4][..], &[0; 16], &[0, 80]].concat(),
            b"\x05\x00\x00\x03\x0bexample.com\x00\x50".to_vec(),
        ] {
            let mut h = handshake(None);
            let mut peer = Peer::new(&[&NO_AUTH, &reply, b"HTTP/1.1 200 OK"]);
            peer.eof = false;
            assert!(matches!(run(&mut h, &mut peer), Some(Ok(_))));
            let rest: Vec<u8> = peer.to_send.iter().copied().collect();
            assert_eq!(rest, b"HTTP/1.1 200 OK");
        }
    }

    #[test]
    fn byte_at_a_time_replies_and_sends_still_complete() {
        let credentials = Credentials::new(b"u", b"p").unwrap();
        let mut h = handshake(Some(credentials));
        let mut peer = Peer::new(&[&[5, 2], &[1, 0], &SUCCESS_V4]);
        (peer.chunk, peer.send_chunk) = (1, 1);
        assert!(matches!(run(&mut h, &mut peer), Some(Ok(_))));
        assert_eq!(peer.received.len(), 4 + 5 + 10);
    }

    #[test]
    fn truncated_replies_fail_as_closed() {
        for script in [
            &[][..],
            &[5][..],
            &[5, 0, 5][..],
            &[5, 0, 5, 0, 0, 1, 1, 2, 3][..],
            &[5, 0, 5, 0, 0, 3, 200, b'a'][..],
        ] {
            let mut h = handshake(None);
            let mut peer = Peer::new(&[script]);
            assert_eq!(
                run(&mut h, &mut peer),
                Some(Err(Fault::Closed)),
                "{script:?}"
            );
            assert_eq!(h.inflight(), 0);
        }
    }

    #[test]
    fn garbage_fails_as_a_protocol_error() {
        for script in [
            &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
            &[4, 0][..],
            // A method not offered, and the password method offered by nobody.
            &[5, 1][..],
            &[5, 2][..],
            &[5, 0, 4, 0, 0, 1, 0, 0, 0, 0, 0, 0][..],
            // An address type RFC 1928 does not have.
            &[5, 0, 5, 0, 0, 7, 0, 0, 0, 0, 0, 0][..],
        ] {
            let mut h = handshake(None);
            let mut peer = Peer::new(&[script]);
            assert_eq!(
                run(&mut h, &mut peer),
                Some(Err(Fault::Protocol)),
                "{script:?}"
            );
        }
        // An auth reply in the wrong version.
        let mut h = handshake(Some(Credentials::new(b"u", b"p").unwrap()));
        let mut peer = Peer::new(&[&[5, 2], &[5, 0]]);
        assert_eq!(run(&mut h, &mut peer), Some(Err(Fault::Protocol)));
    }

    #[test]
    fn the_longest_reply_fits_and_is_read_whole() {
        let name = [b'x'; 255];
        let reply = [&[5, 0, 0, 3, 255][..], &name, &[0, 80]].concat();
        assert_eq!(reply.len(), socks5::MAX_REPLY);
        let mut h = handshake(None);
        let mut peer = Peer::new(&[&NO_AUTH, &reply, b"after"]);
        peer.eof = false;
        assert_eq!(run(&mut h, &mut peer), Some(Ok(Bound::Domain)));
        assert_eq!(peer.to_send.len(), 5);
    }

    #[test]
    fn a_relay_named_by_a_domain_is_refused_for_udp() {
        let mut h = Handshake::new(
            Command::UdpAssociate,
            "0.0.0.0:0".parse().unwrap(),
            None,
            Instant::from_secs(10),
        );
        h.on_connected(Ok(()));
        let mut peer = Peer::new(&[&NO_AUTH, b"\x05\x00\x00\x03\x01r\x00\x50"]);
        assert_eq!(run(&mut h, &mut peer), Some(Err(Fault::Protocol)));
        assert_eq!(peer.received[3..5], [5, 3], "a UDP ASSOCIATE request");
    }

    #[test]
    fn methods_and_passwords_refused() {
        let mut h = handshake(None);
        let mut peer = Peer::new(&[&[5, 0xff]]);
        assert_eq!(run(&mut h, &mut peer), Some(Err(Fault::NoAcceptableMethod)));
        let mut h = handshake(Some(Credentials::new(b"u", b"wrong").unwrap()));
        let mut peer = Peer::new(&[&[5, 2], &[1, 1]]);
        assert_eq!(run(&mut h, &mut peer), Some(Err(Fault::AuthRejected)));
        assert_eq!(peer.received.len(), 4 + 9, "no request after a refusal");
    }

    #[test]
    fn every_reply_code_is_a_refusal_even_when_the_rest_never_comes() {
        for code in 1..=9u8 {
            let full = [5, code, 0, 1, 0, 0, 0, 0, 0, 0];
            for reply in [&full[..], &full[..2]] {
                let mut h = handshake(None);
                let mut peer = Peer::new(&[&NO_AUTH, reply]);
                peer.eof = false;
                let Some(Err(Fault::Refused(found))) = run(&mut h, &mut peer) else {
                    panic!("code {code}: {:?}", h.outcome());
                };
                assert_eq!(socks5::reply(&full), Err(socks5::Error::Refused(found)));
            }
        }
    }

    #[test]
    fn a_silent_upstream_times_out_and_its_receive_is_then_cancelled() {
        let mut h = handshake(None);
        let mut peer = Peer::new(&[]);
        peer.eof = false;
        assert_eq!(run(&mut h, &mut peer), None);
        assert!(h.receiving(), "waiting for the method reply");
        h.expire(Instant::from_secs(9));
        assert_eq!(h.outcome(), None);
        h.expire(h.deadline());
        assert_eq!(h.outcome(), Some(Err(Fault::Timeout)));
        assert_eq!(h.inflight(), 1, "still to be cancelled");
        h.on_received(&[0; SCRATCH], Err(Errno::ECANCELED));
        assert_eq!(h.inflight(), 0);
        assert_eq!(
            h.outcome(),
            Some(Err(Fault::Timeout)),
            "the first fault stays"
        );
        assert_eq!(h.pump(&mut [0; SCRATCH]), Io::default());
    }

    #[test]
    fn a_failed_connect_or_a_reset_ends_it() {
        let mut h = Handshake::new(
            Command::Connect,
            TARGET.parse().unwrap(),
            None,
            Instant::from_secs(10),
        );
        assert_eq!(
            h.pump(&mut [0; SCRATCH]),
            Io::default(),
            "not connected yet"
        );
        h.on_connected(Err(Errno::ECONNREFUSED));
        assert_eq!(h.outcome(), Some(Err(Fault::Connect)));
        let mut h = handshake(None);
        let io = h.pump(&mut [0; SCRATCH]);
        assert!(io.send.is_some() && io.recv.is_some());
        h.on_sent(Err(Errno::EPIPE));
        assert_eq!(h.outcome(), Some(Err(Fault::Closed)));
        h.on_received(&[0; SCRATCH], Err(Errno::ECONNRESET));
        assert_eq!(h.inflight(), 0);
    }

    #[test]
    fn an_early_reply_waits_for_the_request_to_be_sent() {
        // The server answers before taking the whole request (it cannot know it, but a
        // hostile one may): the next stage starts only once the request is out.
        let mut h = handshake(None);
        let mut scratch = vec![0u8; SCRATCH];
        let io = h.pump(&mut scratch);
        let (send, recv) = (io.send.unwrap(), io.recv.unwrap());
        scratch[recv.clone()].copy_from_slice(&NO_AUTH);
        h.on_received(&scratch, Ok(2));
        assert_eq!(h.pump(&mut scratch), Io::default(), "the send is in flight");
        h.on_sent(Ok(send.len() - 1));
        let io = h.pump(&mut scratch);
        assert_eq!(
            io.send,
            Some(send.end - 1..send.end),
            "the rest of the greeting"
        );
        h.on_sent(Ok(1));
        let io = h.pump(&mut scratch);
        assert_eq!(io.send.map(|r| r.len()), Some(connect_request().len()));
        assert_eq!(io.recv.map(|r| r.len()), Some(socks5::REPLY_PREFIX));
    }
}
