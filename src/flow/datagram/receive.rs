//! What becomes of what a flow's server sends: replies and ICMP errors for the client.

use smoltcp::time::Instant;

use super::{Flows, Kind, Received, RecvError};
use crate::flow::Id;
use crate::stack::{Claim, TxPool};
use crate::wire::icmp::{self, EchoReply};
use crate::wire::udp;

impl<S> Flows<S> {
    /// A completion of flow `id`'s receive: a server datagram, or the error the kernel
    /// turned an ICMP error from the path into; `more` says whether the receive stays
    /// armed. Replies and errors for the client go into `tx`.
    pub fn on_received(
        &mut self,
        id: Id,
        now: Instant,
        result: Result<&[u8], RecvError>,
        more: bool,
        tx: &mut TxPool,
    ) -> Received {
        let Some(flow) = self.table.get_mut(id) else {
            return Received::Nothing;
        };
        if !more {
            flow.receiving = false;
        }
        if flow.closing {
            return if flow.receiving {
                Received::Nothing
            } else {
                Received::Close
            };
        }
        match result {
            Ok(datagram) => {
                flow.last_active = now;
                let class = flow.class;
                let emitted = match flow.kind {
                    Kind::Udp => {
                        Some(tx.emit(Claim::Egress, |buf| udp::reply(buf, flow.key, datagram)))
                    }
                    Kind::Echo => {
                        let (key, ident) = (flow.key, flow.echo_ident);
                        // Whose reply it is does not depend on the buffer: ask first, so a
                        // reply dropped for want of a buffer is counted as one.
                        if icmp::echo_reply(&mut [], key, ident, datagram) == EchoReply::NotOurs {
                            None
                        } else {
                            let written = tx.emit(Claim::Egress, |buf| {
                                match icmp::echo_reply(buf, key, ident, datagram) {
                                    EchoReply::Written(len) => Some(len),
                                    _ => None,
                                }
                            });
                            self.counters.echo_replies += u64::from(written);
                            Some(written)
                        }
                    }
                };
                match emitted {
                    Some(true) => {
                        let len = datagram.len() as u64;
                        self.counters.datagrams_down += 1;
                        self.counters.bytes_down += len;
                        flow.bytes_down += len;
                        if flow.kind == Kind::Echo {
                            self.counters.echo_bytes_down += len;
                        }
                    }
                    Some(false) => self.counters.reply_drops += 1,
                    // Not for this flow (another ping's reply, an ICMP error): ignored.
                    None => {}
                }
                self.idle[class as usize].touch(id.slot);
            }
            // Every provided buffer was in use: re-armed once they are recycled.
            Err(RecvError::NoBuffers) => {}
            Err(error) => {
                // The flow stays, as a direct client's socket would, and keeps receiving.
                self.counters.recv_errors += 1;
                if let RecvError::Unreachable(reason) = error
                    && flow.kind == Kind::Udp
                    && !tx.emit(Claim::Egress, |buf| {
                        icmp::unreachable(buf, &flow.last_quote, reason)
                    })
                {
                    self.counters.reply_drops += 1;
                }
            }
        }
        let flow = &self.table.get(id).expect("looked up above");
        if !flow.receiving && !flow.closing {
            Received::Rearm
        } else {
            Received::Nothing
        }
    }

    /// A completion of flow `id`'s receive that brought nothing for the client (the
    /// caller dropped its datagram): only whether to re-arm or close.
    pub fn on_dropped(&mut self, id: Id, more: bool) -> Received {
        let Some(flow) = self.table.get_mut(id) else {
            return Received::Nothing;
        };
        if !more {
            flow.receiving = false;
        }
        match (flow.receiving, flow.closing) {
            (false, true) => Received::Close,
            (false, false) => Received::Rearm,
            (true, _) => Received::Nothing,
        }
    }
}
