//! One DNS query forwarded over TCP through the SOCKS5 upstream (a CONNECT to
//! `--dns-server`) and its reply read back, without I/O.

// The query goes with its 2-byte length prefix right after the handshake, and the reply
// is read the same way: the prefix, then exactly its length. One query per connection,
// closed after: queries that need forwarding (neither A, AAAA, HTTPS, SVCB nor PTR) are
// few. The event loop owns the connection and the scratch bytes, and carries out `Io`.

use std::ops::Range;

use smoltcp::time::Instant;

use super::{Fault, Handshake, Io, SCRATCH};
use crate::flow::IoError;

/// Bytes of the length prefix of a DNS message over TCP.
const PREFIX: usize = 2;
/// Longest query forwarded (the largest EDNS payload clients commonly offer).
pub const MAX_QUERY: usize = 4096;
/// Where the framed query and the framed reply are, after the handshake's bytes.
const QUERY_AREA: Range<usize> = SCRATCH..SCRATCH + PREFIX + MAX_QUERY;
const REPLY_AREA: Range<usize> = QUERY_AREA.end..QUERY_AREA.end + PREFIX + u16::MAX as usize;
/// Bytes of scratch one exchange needs.
pub const FORWARD_SCRATCH: usize = REPLY_AREA.end;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Handshake,
    /// The framed query is being sent.
    Query,
    /// The reply's length prefix is being read, then the reply of that length.
    Prefix,
    Reply(usize),
    Done(usize),
    Failed(Fault),
}

/// One forwarded query.
#[derive(Debug)]
pub struct Forward {
    handshake: Handshake,
    stage: Stage,
    /// Bytes of the framed query, and of it sent; of the framed reply received.
    query: usize,
    sent: usize,
    received: usize,
    sending: bool,
    receiving: bool,
}

impl Forward {
    /// Forwards `query` once `handshake` (a CONNECT to the DNS server) is done, writing
    /// it framed into `scratch` (`FORWARD_SCRATCH` bytes); `None` for a query longer than
    /// `MAX_QUERY` or empty.
    pub fn new(handshake: Handshake, query: &[u8], scratch: &mut [u8]) -> Option<Forward> {
        if query.is_empty() || query.len() > MAX_QUERY {
            return None;
        }
        let area = &mut scratch[QUERY_AREA];
        // At most MAX_QUERY bytes: the length fits the prefix.
        area[..PREFIX].copy_from_slice(&(query.len() as u16).to_be_bytes());
        area[PREFIX..PREFIX + query.len()].copy_from_slice(query);
        Some(Forward {
            handshake,
            stage: Stage::Handshake,
            query: PREFIX + query.len(),
            sent: 0,
            received: 0,
            sending: false,
            receiving: false,
        })
    }

    pub fn deadline(&self) -> Instant {
        self.handshake.deadline()
    }

    /// Where the reply is in the scratch bytes once it is all in, or why it failed;
    /// `None` while under way.
    pub fn outcome(&self) -> Option<Result<Range<usize>, Fault>> {
        match self.stage {
            Stage::Done(len) => Some(Ok(
                REPLY_AREA.start + PREFIX..REPLY_AREA.start + PREFIX + len
            )),
            Stage::Failed(fault) => Some(Err(fault)),
            _ => None,
        }
    }

    fn fail(&mut self, fault: Fault) {
        if self.outcome().is_none() {
            self.stage = Stage::Failed(fault);
        }
    }

    /// The connection to the upstream was made, or not.
    pub fn on_connected(&mut self, result: Result<(), IoError>) {
        self.handshake.on_connected(result);
        self.follow_handshake();
    }

    /// At `now` past the deadline an unfinished exchange fails.
    pub fn expire(&mut self, now: Instant) {
        if now >= self.handshake.deadline() {
            self.handshake.expire(now);
            self.fail(Fault::Timeout);
        }
    }

    /// Operations in flight.
    pub fn inflight(&self) -> u32 {
        self.handshake.inflight() + u32::from(self.sending) + u32::from(self.receiving)
    }

    /// The handshake's end is the exchange's start (or end).
    fn follow_handshake(&mut self) {
        if self.stage == Stage::Handshake {
            match self.handshake.outcome() {
                Some(Ok(_)) => self.stage = Stage::Query,
                Some(Err(fault)) => self.stage = Stage::Failed(fault),
                None => {}
            }
        }
    }

    /// The I/O to start now, as ranges of `scratch`.
    pub fn pump(&mut self, scratch: &mut [u8]) -> Io {
        match self.stage {
            Stage::Handshake => {
                let io = self.handshake.pump(&mut scratch[..SCRATCH]);
                self.follow_handshake();
                io
            }
            Stage::Query if !self.sending => {
                self.sending = true;
                Io {
                    send: Some(QUERY_AREA.start + self.sent..QUERY_AREA.start + self.query),
                    recv: None,
                }
            }
            Stage::Prefix | Stage::Reply(_) if !self.receiving => {
                let wanted = match self.stage {
                    Stage::Reply(len) => PREFIX + len,
                    _ => PREFIX,
                };
                self.receiving = true;
                Io {
                    send: None,
                    recv: Some(REPLY_AREA.start + self.received..REPLY_AREA.start + wanted),
                }
            }
            _ => Io::default(),
        }
    }

    /// A send finished: how many bytes the kernel took.
    pub fn on_sent(&mut self, result: Result<usize, IoError>) {
        if self.stage == Stage::Handshake {
            self.handshake.on_sent(result);
            return self.follow_handshake();
        }
        self.sending = false;
        match result {
            _ if self.stage != Stage::Query => {}
            Ok(n) if n > 0 => {
                self.sent += n;
                if self.sent >= self.query {
                    self.stage = Stage::Prefix;
                }
            }
            _ => self.fail(Fault::Closed),
        }
    }

    /// A receive into the range `pump` gave finished (`scratch`: its bytes).
    pub fn on_received(&mut self, scratch: &[u8], result: Result<usize, IoError>) {
        if self.stage == Stage::Handshake {
            self.handshake.on_received(&scratch[..SCRATCH], result);
            return self.follow_handshake();
        }
        self.receiving = false;
        if !matches!(self.stage, Stage::Prefix | Stage::Reply(_)) {
            return;
        }
        match result {
            Ok(n) if n > 0 => self.received += n,
            // Closed before the whole reply: the server gave up on the query.
            _ => return self.fail(Fault::Closed),
        }
        let reply = &scratch[REPLY_AREA];
        match self.stage {
            Stage::Prefix if self.received >= PREFIX => {
                match usize::from(u16::from_be_bytes([reply[0], reply[1]])) {
                    0 => self.fail(Fault::Protocol),
                    len => self.stage = Stage::Reply(len),
                }
            }
            Stage::Reply(len) if self.received >= PREFIX + len => self.stage = Stage::Done(len),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::wire::socks5::Command;

    const SERVER: &str = "192.0.2.53:53";

    fn forward(query: &[u8], scratch: &mut [u8]) -> Forward {
        let server: SocketAddr = SERVER.parse().unwrap();
        let handshake = Handshake::new(Command::Connect, server, None, Instant::from_secs(5));
        let mut forward = Forward::new(handshake, query, scratch).unwrap();
        forward.on_connected(Ok(()));
        forward
    }

    /// Runs `forward` against an upstream that answers `script` (greeting, CONNECT
    /// reply, then the DNS server's bytes), `chunk` bytes per receive at most; returns
    /// what was sent to it.
    fn run(forward: &mut Forward, scratch: &mut [u8], script: &[u8], chunk: usize) -> Vec<u8> {
        let (mut sent, mut from) = (Vec::new(), 0);
        for _ in 0..1000 {
            let io = forward.pump(scratch);
            if io.send.is_none() && io.recv.is_none() {
                break;
            }
            if let Some(range) = io.send {
                sent.extend_from_slice(&scratch[range.clone()]);
                forward.on_sent(Ok(range.len()));
            }
            if let Some(range) = io.recv {
                let n = range.len().min(chunk).min(script.len() - from);
                scratch[range.start..range.start + n].copy_from_slice(&script[from..from + n]);
                from += n;
                forward.on_received(scratch, Ok(n));
            }
        }
        sent
    }

    const CONNECTED: [u8; 12] = [5, 0, 5, 0, 0, 1, 10, 0, 0, 1, 0, 53];

    #[test]
    fn the_query_goes_framed_after_the_connect_and_the_reply_comes_back_whole() {
        let mut scratch = vec![0u8; FORWARD_SCRATCH];
        let query = b"\x12\x34query";
        let reply = b"\x12\x34a reply of some length";
        for chunk in [1, 3, 1000] {
            let mut forward = forward(query, &mut scratch);
            let script = [&CONNECTED[..], &[0, reply.len() as u8], reply].concat();
            let sent = run(&mut forward, &mut scratch, &script, chunk);
            let connect = [5, 1, 0, 1, 192, 0, 2, 53, 0, 53];
            let expected = [&[5, 1, 0][..], &connect, &[0, query.len() as u8], query].concat();
            assert_eq!(sent, expected, "chunk {chunk}");
            let range = forward.outcome().unwrap().unwrap();
            assert_eq!(&scratch[range], reply, "chunk {chunk}");
            assert_eq!(forward.inflight(), 0);
        }
    }

    #[test]
    fn short_replies_refusals_and_silence_fail() {
        let mut scratch = vec![0u8; FORWARD_SCRATCH];
        // The server closes after half the reply.
        let mut f = forward(b"q", &mut scratch);
        run(
            &mut f,
            &mut scratch,
            &[&CONNECTED[..], &[0, 9, 1, 2]].concat(),
            100,
        );
        assert_eq!(f.outcome(), Some(Err(Fault::Closed)));
        // An empty reply is no DNS message.
        let mut f = forward(b"q", &mut scratch);
        run(
            &mut f,
            &mut scratch,
            &[&CONNECTED[..], &[0, 0]].concat(),
            100,
        );
        assert_eq!(f.outcome(), Some(Err(Fault::Protocol)));
        // The upstream refuses the CONNECT.
        let mut f = forward(b"q", &mut scratch);
        run(
            &mut f,
            &mut scratch,
            &[5, 0, 5, 5, 0, 1, 0, 0, 0, 0, 0, 0],
            100,
        );
        assert!(matches!(f.outcome(), Some(Err(Fault::Refused(_)))));
        // Silence past the deadline.
        let mut f = forward(b"q", &mut scratch);
        f.pump(&mut scratch);
        f.expire(Instant::from_secs(4));
        assert_eq!(f.outcome(), None);
        f.expire(Instant::from_secs(5));
        assert_eq!(f.outcome(), Some(Err(Fault::Timeout)));
        // Queries that cannot be framed are not taken.
        let handshake = |_| {
            Handshake::new(
                Command::Connect,
                SERVER.parse::<SocketAddr>().unwrap(),
                None,
                Instant::ZERO,
            )
        };
        assert!(Forward::new(handshake(()), b"", &mut scratch).is_none());
        let long = vec![0u8; MAX_QUERY + 1];
        assert!(Forward::new(handshake(()), &long, &mut scratch).is_none());
    }
}
