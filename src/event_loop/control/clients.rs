//! Each client's ring operations: accepts and tick armed, receive, send, shutdown, close.

use std::net::Shutdown;
use std::os::fd::AsFd;

use smoltcp::time::Instant;
use socket2::SockRef;

use super::{Control, LINGER, MAX_CLIENTS, Phase, Service, TICK};
use crate::uring::{Op, Ring, Slice, Token};

impl Control {
    pub(super) fn arm_accepts(&mut self, ring: &mut Ring) {
        for (index, listener) in self.listeners.iter_mut().enumerate() {
            if let Some(listener) = listener
                && !listener.accepting
            {
                let token = Token::new(Op::ControlAccept, 0, index).encode();
                ring.accept_multishot(listener.socket.as_fd(), token);
                listener.accepting = true;
            }
        }
    }

    /// Keeps the tick coming while there are deadlines to check or accepts to re-arm.
    pub(super) fn arm_tick(&mut self, ring: &mut Ring) {
        let needed =
            !self.clients.is_empty() || self.listeners.iter().flatten().any(|l| !l.accepting);
        if needed && !self.tick_armed {
            ring.timeout(TICK, Token::new(Op::ControlTick, 0, 0).encode());
            self.tick_armed = true;
        }
    }

    fn token(&self, op: Op, key: usize) -> u64 {
        Token::new(op, self.clients[key].generation, key).encode()
    }

    /// Receives more of client `key`'s request (or, draining, whatever it sends).
    pub(super) fn receive(&mut self, ring: &mut Ring, key: usize) {
        let token = self.token(Op::ControlRecv, key);
        let client = &mut self.clients[key];
        let have = match client.phase {
            Phase::Request { have } => have,
            Phase::Draining => 0,
            _ => return,
        };
        let Some(fd) = &client.fd else {
            return;
        };
        let buf = Slice {
            region: client.memory.clone(),
            range: have..client.service.request_limit(),
        };
        ring.recv(fd.as_fd(), buf, token);
        client.busy = true;
    }

    /// Sends what is left of client `key`'s reply.
    pub(super) fn send(&mut self, ring: &mut Ring, key: usize) {
        let token = self.token(Op::ControlSend, key);
        let client = &mut self.clients[key];
        let (Phase::Reply { range, .. }, Some(fd)) = (&client.phase, &client.fd) else {
            return;
        };
        let buf = Slice {
            region: client.memory.clone(),
            range: range.clone(),
        };
        ring.send(fd.as_fd(), buf, token);
        client.busy = true;
    }

    /// Client `key`'s reply is out: it is closed once it has closed its side (or its
    /// linger is over). Not on the ring: io_uring hands a shutdown to a worker thread,
    /// and shutdown(SHUT_WR) does not block.
    pub(super) fn finish(&mut self, ring: &mut Ring, key: usize, now: Instant) {
        let client = &mut self.clients[key];
        let shut = client
            .fd
            .as_ref()
            .is_some_and(|fd| SockRef::from(fd).shutdown(Shutdown::Write).is_ok());
        if !shut {
            self.close(ring, key);
            return;
        }
        client.phase = Phase::Draining;
        client.deadline = now + LINGER.into();
        self.receive(ring, key);
    }

    /// Closes the client of `service` that has waited longest for its request (counted
    /// as evicted); false if there is none, or too many are still closing (each holds
    /// its memory until its cancel completes).
    pub(super) fn evict_waiting(&mut self, ring: &mut Ring, service: Service) -> bool {
        let mine = || self.clients.iter().filter(|(_, c)| c.service == service);
        let closing = mine()
            .filter(|(_, c)| matches!(c.phase, Phase::Closing))
            .count();
        let oldest = mine()
            .filter(|(_, c)| matches!(c.phase, Phase::Request { .. }))
            .min_by_key(|(_, c)| c.deadline)
            .map(|(key, _)| key);
        let Some(key) = oldest.filter(|_| closing < MAX_CLIENTS) else {
            return false;
        };
        self.counters[service as usize].evicted += 1;
        self.close(ring, key);
        true
    }

    /// Closes client `key`, once what it has in flight is cancelled.
    pub(super) fn close(&mut self, ring: &mut Ring, key: usize) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        if client.busy {
            if !matches!(client.phase, Phase::Closing)
                && let Some(fd) = &client.fd
            {
                ring.cancel_fd(fd.as_fd());
            }
            client.phase = Phase::Closing;
            return;
        }
        let client = self.clients.remove(key);
        if let Some(listener) = &mut self.listeners[client.service as usize] {
            listener.clients -= 1;
        }
        if let Some(fd) = client.fd {
            ring.close(fd);
        }
    }
}
