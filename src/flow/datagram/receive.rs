//! What becomes of what a flow's server sends: replies and ICMP errors for the client.

use smoltcp::time::Instant;

use super::{Arrival, Counters, Flow, Flows, Kind, Received, RecvError};
use crate::flow::Id;
use crate::stack::{Claim, TxPool};
use crate::wire::icmp::{self, EchoReply};
use crate::wire::{udp, uso};

impl<S> Flows<S> {
    /// A completion of flow `id`'s receive: server datagrams, or the error the kernel
    /// turned an ICMP error from the path into; `more` says whether the receive stays
    /// armed. Replies and errors for the client go into `tx`.
    pub fn on_received(
        &mut self,
        id: Id,
        now: Instant,
        result: Result<Arrival<'_>, RecvError>,
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
            Ok(batch) => {
                flow.last_active = now;
                let class = flow.class;
                let count = batch.datagrams.len();
                self.counters.coalesced_receives += u64::from(count > 1);
                if !(flow.kind == Kind::Udp && reply_as_one(flow, batch, tx, &mut self.counters)) {
                    self.counters.per_datagram_fallbacks += u64::from(count > 1);
                    for datagram in batch.iter() {
                        reply(flow, datagram, tx, &mut self.counters);
                    }
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

/// Writes the UDP datagrams of `batch` (more than one, of one size but a shorter last)
/// for flow `flow`'s client as one super-packet, if the TUN takes them; false when they
/// are to be written one by one. Nothing else is merged: each datagram reaches the
/// client as it came.
fn reply_as_one<S>(
    flow: &mut Flow<S>,
    batch: Arrival<'_>,
    tx: &mut TxPool,
    counters: &mut Counters,
) -> bool {
    let key = flow.key;
    let lens = batch.iter().map(<[u8]>::len);
    let Some(size) = tx
        .uso_limits()
        .and_then(|limits| uso::segment_size(lens.clone(), key.client.addr, limits))
    else {
        return false;
    };
    let count = batch.datagrams.len() as u64;
    let bytes = lens.sum::<usize>();
    // The datagrams are the received bytes back to back: the write can take them from
    // the receive buffer behind headers of its own, while a header slot is free.
    let gathered = batch
        .received_in
        .filter(|within| within.len as usize == bytes && batch.contiguous());
    let gathered = gathered.is_some_and(|payload| {
        tx.emit_gathered(payload, |buf| uso::headers(buf, key, bytes, size))
    });
    if gathered
        || tx.emit_with_header(Claim::Egress, |buf| {
            uso::reply(buf, key, batch.iter(), size)
        })
    {
        let bytes = bytes as u64;
        counters.gathered_down += u64::from(gathered);
        counters.super_packets_down += 1;
        counters.super_packet_datagrams_down += count;
        counters.datagrams_down += count;
        counters.bytes_down += bytes;
        flow.bytes_down += bytes;
    } else {
        counters.reply_drops += count;
    }
    true
}

/// Writes one server `datagram` (a UDP payload, or an ICMP message of a ping flow) for
/// flow `flow`'s client.
fn reply<S>(flow: &mut Flow<S>, datagram: &[u8], tx: &mut TxPool, counters: &mut Counters) {
    let emitted = match flow.kind {
        Kind::Udp => Some(tx.emit(Claim::Egress, |buf| udp::reply(buf, flow.key, datagram))),
        Kind::Echo => {
            let (key, ident) = (flow.key, flow.echo_ident);
            // Whose reply it is does not depend on the buffer: ask first, so a reply
            // dropped for want of a buffer is counted as one.
            if icmp::echo_reply(&mut [], key, ident, datagram) == EchoReply::NotOurs {
                None
            } else {
                let written = tx.emit(Claim::Egress, |buf| {
                    match icmp::echo_reply(buf, key, ident, datagram) {
                        EchoReply::Written(len) => Some(len),
                        _ => None,
                    }
                });
                counters.echo_replies += u64::from(written);
                Some(written)
            }
        }
    };
    match emitted {
        Some(true) => {
            let len = datagram.len() as u64;
            counters.datagrams_down += 1;
            counters.bytes_down += len;
            flow.bytes_down += len;
            if flow.kind == Kind::Echo {
                counters.echo_bytes_down += len;
            }
        }
        Some(false) => counters.reply_drops += 1,
        // Not for this flow (another ping's reply, an ICMP error): ignored.
        None => {}
    }
}
