//! The loop's side of a UDP flow's SOCKS5 association: its control connection and bytes.

// The control connection is a TCP connection to the upstream, connected on the ring; its
// scratch bytes are what the handshake sends from and receives into. What to do with them
// is the flow's `upstream::Association`'s to say; this carries out its I/O.

use std::os::fd::AsFd;

use smoltcp::time::Instant;
use socket2::Socket;

use super::outbound::{self, Purpose, Upstream};
use crate::flow::Id;
use crate::flow::upstream::{self, Counters, Io, SCRATCH, Step, WATCH};
use crate::uring::{Op, Region, Ring, Token};

/// A UDP flow's association.
pub struct Association {
    /// The control connection; `None` once closed.
    control: Option<Socket>,
    /// The handshake's bytes, which the ring sends from and receives into.
    scratch: Region,
    /// The association itself, without I/O.
    pub flow: upstream::Association,
}

impl Association {
    /// Starts an association through `upstream`: the control connection's socket, bound
    /// to `interface`, to be connected on the ring (`connect`).
    pub fn open(
        upstream: &Upstream,
        interface: &str,
        now: Instant,
    ) -> std::io::Result<Association> {
        let control = outbound::socket(Purpose::Tcp, upstream.server.into(), interface)?;
        let scratch = Region::new(SCRATCH).ok_or(std::io::ErrorKind::OutOfMemory)?;
        Ok(Association {
            control: Some(control),
            scratch,
            flow: upstream.association(now),
        })
    }

    /// The control connection is open: its completions are the association's.
    pub fn is_open(&self) -> bool {
        self.control.is_some()
    }

    /// Connects the control connection of flow `id` to `upstream`.
    pub fn connect(&self, ring: &mut Ring, upstream: &Upstream, id: Id) {
        if let Some(control) = &self.control {
            let token = token(Op::AssociationConnect, id);
            ring.connect(control.as_fd(), upstream.server, upstream.timeout, token);
        }
    }

    /// A completion of `op` on the control connection, with `result`.
    pub fn on_completion(&mut self, op: Op, result: i32, counters: &mut Counters) {
        let outcome = outbound::completion(result);
        let flow = &mut self.flow;
        match op {
            Op::AssociationConnect => flow.on_connected(outcome.map(drop)),
            Op::AssociationSend => flow.on_sent(outcome),
            _ => self.scratch.with_mut(0..SCRATCH, |bytes| {
                flow.on_received(bytes, outcome, counters)
            }),
        }
    }

    /// Starts on the control connection of flow `id` the I/O the association asks for;
    /// what else it asks for (closing the flow, opening its socket to the relay) is the
    /// caller's.
    pub fn drive(&mut self, ring: &mut Ring, id: Id, counters: &mut Counters) -> Step {
        let Some(control) = &self.control else {
            return Step::Wait;
        };
        let (flow, scratch) = (&mut self.flow, &self.scratch);
        let step = scratch.with_mut(0..SCRATCH, |bytes| flow.poll(bytes, counters));
        let tokens = [
            token(Op::AssociationSend, id),
            token(Op::AssociationRecv, id),
        ];
        match &step {
            Step::Io(io) => outbound::start_io(ring, control.as_fd(), scratch, io, tokens),
            Step::Open(_) => {
                let watch = Io {
                    send: None,
                    recv: Some(WATCH),
                };
                outbound::start_io(ring, control.as_fd(), scratch, &watch, tokens);
            }
            Step::Wait | Step::Close => {}
        }
        step
    }

    /// Closes the control connection (which ends the association for the upstream),
    /// cancelling what it has in flight; its memory is the ring's to keep until those
    /// operations are done.
    pub fn close(&mut self, ring: &mut Ring) {
        if let Some(control) = self.control.take() {
            ring.cancel_fd(control.as_fd());
            ring.close(control.into());
        }
    }
}

fn token(op: Op, id: Id) -> u64 {
    Token::new(op, id.generation, id.slot as usize).encode()
}
