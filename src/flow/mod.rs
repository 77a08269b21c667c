//! The flows, as state machines that perform no I/O: time is passed in, completions are
//! told as typed results, and the I/O to start comes back as actions for the event loop.

pub mod budget;
pub mod datagram;
pub mod idents;
pub mod lru;
pub mod table;
pub mod tcp;
pub mod upstream;

pub use table::{Id, Table};
