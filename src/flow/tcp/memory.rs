//! How much of its memory a flow may hold, and what the client is told of it: the two
//! allowances kept up to date, the window updates smoltcp would not send, the ACK delay
//! a small window needs, and the pages of the buffers that hold nothing.

use smoltcp::socket::tcp::{self, State};
use smoltcp::time::Instant;

use super::{ACK_DELAY, Action, Actions, Flow, trim};
use crate::flow::budget::Budget;
use crate::stack::window;
use crate::stack::{Claim, TxPool};

impl Flow {
    /// Whether smoltcp may delay its ACKs. Not once the client closed, so that no ACK is
    /// still owed when the flow is freed. Nor while the client's window is under two
    /// segments: smoltcp ACKs at once only when more than a segment is unacknowledged,
    /// which such a window may never hold (at MTU 65535 the floor's is one segment),
    /// so each window would wait for the delayed-ACK timer.
    pub(super) fn update_ack_delay(&mut self, state: State) {
        let closed = matches!(
            state,
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        );
        let tight = self.rx.get() < 2 * usize::from(self.segment_size);
        let delay = (!closed && !tight).then_some(ACK_DELAY);
        self.memory
            .with(|sockets, _| sockets.socket().set_ack_delay(delay));
    }

    /// Brings the allowances up to date with what the buffers hold, and tells the
    /// client of a window its allowance opened that smoltcp would not announce.
    pub(super) fn account(
        &mut self,
        now: Instant,
        tx: &mut TxPool,
        budget: &mut Budget,
        actions: &mut Actions,
    ) {
        let (rx_held, tx_held) = self.memory.get(|sockets| {
            let socket = sockets.set.get::<tcp::Socket>(sockets.handle);
            (socket.recv_queue(), socket.send_queue())
        });
        let acked = self.relay.committed().saturating_sub(tx_held);
        self.tx.drained(acked.saturating_sub(self.tx_acked));
        self.tx_acked = acked;
        let used_up = std::mem::take(&mut self.rx_window_used);
        self.rx.update(rx_held, used_up, now, budget);
        self.tx.update(tx_held, false, now, budget);
        let limit = self.window_limit();
        // Two segments, as for the kernel's window updates, but at most half the
        // allowance (RFC 9293 3.8.6.2.2's receiver rule): with a jumbo MSS two segments
        // can exceed the whole allowance, and the client, never told its window opened,
        // would be left to zero-window probes with their backoff.
        let min_step = (2 * u32::from(self.segment_size)).min(self.rx.get() as u32 / 2);
        if window::update_due(&self.window, limit, min_step) {
            let ends = (self.key.server, self.key.client);
            let state = &mut self.window;
            // Not a reply to the client's packet but to the server taking its bytes
            // (an outbound completion), and one that can wait: it leaves the ACKs'
            // reserve. Without a buffer the update is owed: the flow waits for one
            // (`starved`), and the next poll finds the update still due, since only a
            // written one is recorded in the window state. (It always fits a buffer.)
            let ack = state.ack;
            if !tx.emit(Claim::Egress, |buf| {
                window::pure_ack(buf, ends, state, ack, limit)
            }) {
                self.starved = true;
            }
        }
        let (trim_rx, trim_tx) = (self.rx.take_trim(), self.tx.take_trim());
        if trim_rx || trim_tx {
            self.trim(trim_rx, trim_tx, actions);
        }
    }

    /// Asks for the pages of the receive (`rx`) and send (`tx`) buffers that hold
    /// nothing to go back to the kernel. Kept: the receive buffer's bytes and the rest
    /// of the window the client was offered (out-of-order bytes land there), the send
    /// buffer's bytes and the space a receive in flight writes.
    fn trim(&mut self, rx: bool, tx: bool, actions: &mut Actions) {
        let size = self.buffer;
        let (relay, client_next) = (&self.relay, self.client_next);
        let furthest = self.window.furthest;
        self.memory.get(|sockets| {
            let socket = sockets.set.get::<tcp::Socket>(sockets.handle);
            if rx && let Some(furthest) = furthest {
                let offered = (furthest.wrapping_sub(client_next) as i32).max(0) as usize;
                let kept = socket.recv_queue().max(offered);
                for span in trim::free_spans(0..size, relay.client_bytes_at(), kept, None) {
                    actions.push(Action::Discard(span));
                }
            }
            if tx {
                // The bytes end where the last ones were added (at the start before the
                // first), and begin `held` before that, around the ring.
                let held = socket.send_queue().min(size);
                let end = relay
                    .server_bytes_end()
                    .map_or(0, |end| end.saturating_sub(size));
                let from = size + (end + size - held) % size;
                let ring = size..2 * size;
                for span in trim::free_spans(ring, from, held, relay.receiving()) {
                    actions.push(Action::Discard(span));
                }
            }
        });
    }

    /// Where the client's window may end: its first byte still with us, plus the
    /// allowance.
    pub(super) fn window_limit(&self) -> u32 {
        self.client_next.wrapping_add(self.rx.get() as u32)
    }

    /// How far into each of its buffers (receive, send) the flow may have written, from
    /// their start: the receive buffer up to the furthest window the client was offered
    /// (smoltcp writes nowhere else), the send buffer up to the server bytes it took
    /// (it starts over at its beginning whenever it is empty). The whole buffer once
    /// that went around the ring.
    pub fn touched(&self) -> [usize; 2] {
        let offered = self.window.furthest.map_or(0, |furthest| {
            furthest.wrapping_sub(self.client_first) as usize
        });
        [
            offered.min(self.buffer),
            self.relay.committed().min(self.buffer),
        ]
    }

    /// The flow ends: its share of the budget goes back.
    pub fn release(&mut self, budget: &mut Budget) {
        self.rx.release(budget);
        self.tx.release(budget);
    }
}
