//! A flow's run after its relay I/O: smoltcp egress, the lifecycle rules (TIME-WAIT,
//! orphaned bytes, the client's silence), teardown once it ends, and the last rounds at
//! shut-down.

use smoltcp::iface::{Interface, PollResult};
use smoltcp::socket::tcp::State;
use smoltcp::time::Instant;

use super::{
    Action, Actions, EGRESS_BUDGET, Failure, Flow, Next, ORPHAN_TIMEOUT, Phase, TIME_WAIT_EGRESS,
    Teardown, device_flow,
};
use crate::flow::budget::Budget;
use crate::flow::upstream::Handshake;
use crate::stack::{Claim, StackDevice, TxPool};
use crate::wire::icmp::{self, Reason};

impl Flow {
    /// Resets a flow still waiting for its outbound connect (admission control makes
    /// room for a newer SYN). False if it was no longer connecting.
    pub fn evict(&mut self) -> bool {
        // A flow whose connect completed this turn (not yet polled) is not connecting
        // any more: it leaves admission's count through `left_half_open` instead.
        if !self.half_open || self.relay.phase() != Phase::Connecting {
            return false;
        }
        self.half_open = false;
        let relay = &mut self.relay;
        self.memory.with(|sockets, _| relay.evict(sockets.socket()));
        true
    }

    /// Whether the flow has stopped connecting since last asked (once).
    pub fn left_half_open(&mut self) -> bool {
        let left = self.half_open && self.relay.phase() != Phase::Connecting;
        if left {
            self.half_open = false;
        }
        left
    }

    /// Runs smoltcp egress (at most `EGRESS_BUDGET` packets into `tx`), the flow's
    /// lifecycle rules and its share of the memory `budget`; `actions` gets what to do
    /// next.
    pub fn poll(
        &mut self,
        now: Instant,
        iface: &mut Interface,
        tx: &mut TxPool,
        budget: &mut Budget,
        actions: &mut Actions,
    ) -> Next {
        let mut next = Next::default();
        if let Some(handshake) = &mut self.upstream {
            handshake.expire(now);
            self.settle_handshake();
        }
        let state = self.memory.get(|sockets| sockets.state());
        let owes_server = self.owes_server();
        self.update_ack_delay(state);
        if matches!(state, State::TimeWait | State::Closed) && owes_server && !self.orphaned {
            // The client is gone but bytes are still owed to the server. Like the kernel
            // with an orphaned socket, bound how long a server that stops reading may
            // hold the flow: the outbound connection then fails and the flow ends.
            self.orphaned = true;
            actions.push(Action::UserTimeout(ORPHAN_TIMEOUT));
        }
        // smoltcp ends TIME-WAIT (and clears the receive buffer) from its egress timer,
        // 10 s after entering it. Keep egress (ACKs) running until shortly before that,
        // then hold it off while client bytes are still going to the server.
        if state == State::TimeWait {
            self.time_wait_since.get_or_insert(now);
        }
        let holding_time_wait = state == State::TimeWait
            && owes_server
            && self
                .time_wait_since
                .is_some_and(|since| now - since >= TIME_WAIT_EGRESS);

        if !holding_time_wait {
            let flow = device_flow(self.segment_size, self.window_limit(), &mut self.window);
            next.again = self.memory.with(|sockets, _| {
                let mut device = StackDevice::egress(tx, flow);
                (0..EGRESS_BUDGET).all(|_| {
                    device.egress_ready()
                        && iface.poll_egress(now, &mut device, &mut sockets.set) != PollResult::None
                })
            });
        }
        self.account(now, tx, budget, actions);
        self.update_ack_delay(state);
        if tx.take_exhausted() {
            self.starved = true;
        }
        next.starved = self.starved;

        let relay = &mut self.relay;
        self.memory
            .get(|sockets| relay.update_phase(sockets.set.get(sockets.handle)));
        match self.relay.phase() {
            Phase::Closing(teardown) => {
                next.again |= self.teardown(teardown, now, iface, tx, actions);
            }
            Phase::Connecting => next.deadline = self.upstream.as_ref().map(Handshake::deadline),
            Phase::Open if self.starved || next.again || holding_time_wait => {}
            Phase::Open => {
                // "Now" after a full egress pass means smoltcp is waiting on something
                // that is not a packet (e.g. a zero window); never spin on it.
                next.deadline = self
                    .memory
                    .get(|sockets| iface.poll_at(now, &sockets.set))
                    .map(|at| at.max(now + smoltcp::time::Duration::from_millis(1)));
            }
        }
        next
    }

    /// Starts the teardown (ICMP error, RST, cancel) and ends with `Close` and `Free`
    /// once nothing is in flight or owed. True when it must run again this turn.
    fn teardown(
        &mut self,
        teardown: Teardown,
        now: Instant,
        iface: &mut Interface,
        tx: &mut TxPool,
        actions: &mut Actions,
    ) -> bool {
        if !self.teardown_started {
            self.teardown_started = true;
            let reason = match self.relay.failure() {
                Some(Failure::HostUnreachable) => Some(Reason::Host),
                Some(Failure::NetUnreachable) => Some(Reason::Network),
                _ => None,
            };
            if let Some(reason) = reason
                && !tx.emit(Claim::Egress, |buf| {
                    icmp::unreachable(buf, &self.syn, reason)
                })
            {
                tx.counters.dropped_replies += 1;
            }
            if teardown == Teardown::Abortive {
                actions.push(Action::Linger0);
                if self.inflight() > 0 {
                    actions.push(Action::Cancel);
                }
            }
        }
        if self.inflight() > 0 || self.starved {
            return false;
        }
        // An aborted socket keeps its peer until its RST is out (the tuple is cleared
        // once sent); freeing it earlier would swallow the reset.
        let rst_owed = self.memory.get(|sockets| {
            sockets.state() == State::Closed && iface.poll_at(now, &sockets.set).is_some()
        });
        if rst_owed {
            return true;
        }
        actions.push(Action::Close);
        actions.push(Action::Free(self.relay.failure()));
        false
    }

    pub(super) fn owes_server(&self) -> bool {
        let relay = &self.relay;
        self.memory
            .get(|sockets| relay.owes_server(sockets.set.get(sockets.handle)))
    }

    /// Shutting down: RST to the client (the caller resets the server with `Linger0`).
    pub fn abort(&mut self) {
        self.memory.with(|sockets, _| sockets.socket().abort());
    }

    /// One egress pass for the shutdown rounds; true while packets are still owed.
    pub fn flush(&mut self, now: Instant, iface: &mut Interface, tx: &mut TxPool) -> bool {
        let flow = device_flow(self.segment_size, self.window_limit(), &mut self.window);
        self.memory.with(|sockets, _| {
            let mut device = StackDevice::egress(tx, flow);
            if device.egress_ready() {
                iface.poll_egress(now, &mut device, &mut sockets.set);
            }
            iface.poll_at(now, &sockets.set).is_some()
        })
    }
}
