//! The flows, as state machines that perform no I/O: time is passed in, completions are
//! told as typed results, and the I/O to start comes back as actions for the event loop.

pub mod budget;
pub mod datagram;
pub mod dns;
pub mod idents;
pub mod lru;
pub mod table;
pub mod tcp;
pub mod upstream;

pub use table::{Id, Table};

/// Why an operation on a flow's outbound TCP socket (a connect, send, receive or
/// shutdown) failed, as far as any flow tells causes apart: the event loop tells it so
/// from the kernel's error, as it tells datagram flows a `datagram::RecvError`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// The server answered the connect with a RST: the client gets one too.
    Refused,
    /// The host or its network cannot be reached: the client of a direct connect gets
    /// the ICMP error it would have got, not a RST.
    HostUnreachable,
    NetUnreachable,
    /// The kernel gave up on the connection (retransmissions, the user timeout), or a
    /// timer expired.
    TimedOut,
    /// Cancelled: a connect by its linked timeout (`--connect-timeout`), anything else
    /// by the flow's own teardown.
    Cancelled,
    /// Anything else (a reset, a closed socket): no flow tells these apart.
    Other,
}
