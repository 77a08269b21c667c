//! The SOCKS5 upstream without I/O: handshakes, UDP associations, and why they fail.

mod association;
mod forward;
mod handshake;

pub use association::{Association, Deadlines, Step, WATCH, from_relay, header_len, refuses};
pub use forward::{FORWARD_SCRATCH, Forward, MAX_QUERY};
pub use handshake::{Handshake, Io, SCRATCH, Target};

use crate::wire::socks5::{self, ReplyCode};

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
