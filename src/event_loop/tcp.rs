//! The loop's side of TCP flows: opening them (admission, outbound socket, connect),
//! handing them completions and packets, running the ones with work, and carrying out
//! the actions they return.

use std::net::Shutdown;
use std::os::fd::AsFd;
use std::rc::Rc;
use std::time::Duration;

use log::warn;
use smoltcp::time::Instant;
use socket2::Socket;

use super::Proxy;
use super::outbound::{self, Purpose};
use super::tun_io::Frame;
use crate::flow::tcp::admission::Verdict;
use crate::flow::tcp::{Action, Actions, Failure, Flow, Phase};
use crate::flow::upstream::Target;
use crate::flow::{Id, IoError};
use crate::uring::{Op, Ring, Slice, Token};
use crate::wire::FlowKey;
use crate::wire::icmp::Quote;
use crate::wire::socks5::Command;

/// Shortest time between two warnings about running out of sockets.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);
mod flows;

use flows::phase_index;
pub use flows::{Entry, TcpFlows};

impl Proxy {
    /// A TCP segment from a client; `syn` is set for a segment that opens a flow.
    pub(super) fn on_tcp_segment(
        &mut self,
        frame: &Frame,
        key: FlowKey,
        syn: Option<Quote>,
        mss: Option<u16>,
    ) {
        let now = self.now();
        // A flow to port 53 under --dns fake is answered by the proxy (`dns_tcp`): its
        // socket is connected from the start.
        let local = self.dns.is_some() && key.server.port == super::dns::PORT;
        let (id, opened) = match (self.tcp.table.find(&key), syn) {
            (Some(id), _) => (Some(id), false),
            (None, Some(syn)) => (self.open_tcp(key, mss, syn, now), true),
            (None, None) => (None, false),
        };
        let packet = self
            .ring
            .buffer(super::tun_io::READ_GROUP, frame.bid, frame.len)
            .map_or(&[][..], |buffer| &buffer[frame.ip_start..]);
        let iface = self.stack.ifaces.serving(&key.server.addr);
        match id.and_then(|id| self.tcp.table.get_mut(id).map(|entry| (id, entry))) {
            Some((id, entry)) => {
                if !entry
                    .flow
                    .on_segment(now, iface, &mut self.stack.tx, packet)
                {
                    self.stats.beyond_window += 1;
                }
                self.tcp.enqueue(id);
            }
            None => {
                self.stats.no_flow += 1;
                self.stack.reject(now, &key.server.addr, packet);
            }
        }
        if local
            && opened
            && let Some(id) = id
        {
            self.on_tcp_completion(Op::Connect, id, 0);
        }
    }

    /// Opens a flow for a new SYN: a held-back listening socket plus an outbound
    /// connect, to the server or to the upstream (whose handshake then asks for the
    /// server). `None` (the SYN is then answered with RST) when a limit is hit.
    fn open_tcp(&mut self, key: FlowKey, mss: Option<u16>, syn: Quote, now: Instant) -> Option<Id> {
        let tcp = &mut self.tcp;
        if !tcp.admission.may_open(tcp.table.len()) {
            self.stats.refused_limit += 1;
            return None;
        }
        let server = key.server_addr();
        if self.dns.is_some() && server.port() == super::dns::PORT {
            let socket = self.open_dns_tcp(now)?;
            return self.open_tcp_to(key, mss, syn, now, None, Some(socket));
        }
        // A fake destination (`--dns fake`) is connected to by its name, which the flow
        // holds while it lives; one without a name is refused (RST) at once.
        let Ok(name) = self.hold_name(server.ip()) else {
            if let Some(dns) = &mut self.dns {
                dns.counters.unmapped_tcp += 1;
            }
            return None;
        };
        let opened = self.open_tcp_to(key, mss, syn, now, name, None);
        if opened.is_none() {
            self.release_name(server.ip());
        }
        opened
    }

    /// `open_tcp` for a destination whose name (if it has one) is held, or that is
    /// served by the proxy on `local`, already connected.
    fn open_tcp_to(
        &mut self,
        key: FlowKey,
        mss: Option<u16>,
        syn: Quote,
        now: Instant,
        name: Option<Rc<str>>,
        local: Option<Socket>,
    ) -> Option<Id> {
        let tcp = &mut self.tcp;
        let server = key.server_addr();
        let served_here = local.is_some();
        let (peer, handshake) = match &tcp.upstream {
            _ if served_here => (server, None),
            Some(upstream) => {
                let target = match name.clone() {
                    Some(name) => Target::Name(name, server.port()),
                    None => server.into(),
                };
                (
                    upstream.server,
                    Some(upstream.handshake(Command::Connect, target, now)),
                )
            }
            None => (server, None),
        };
        let socket = match local.map_or_else(
            || outbound::socket(Purpose::Tcp, peer.into(), &tcp.interface),
            Ok,
        ) {
            Ok(socket) => socket,
            Err(err) => {
                self.stats.socket_errors += 1;
                // Usually fd exhaustion: worth saying, but not once per refused SYN.
                let now = std::time::Instant::now();
                if tcp
                    .last_socket_warning
                    .is_none_or(|at| now - at >= WARNING_INTERVAL)
                {
                    tcp.last_socket_warning = Some(now);
                    warn!(
                        "cannot open outbound sockets ({err}); new flows are refused with RST \
                         ({} so far)",
                        self.stats.socket_errors
                    );
                }
                return None;
            }
        };
        let Some(region) = tcp.region() else {
            self.stats.memory_refusals += 1;
            return None;
        };
        let flow = Flow::new(key, mss, syn, tcp.settings, region, handshake);
        // Only now that this flow has its socket and memory: evicting earlier would
        // reset a connecting flow for a SYN that is refused anyway.
        match tcp.admission.verdict(tcp.table.len()) {
            Verdict::Admit => {}
            Verdict::Refuse => {
                self.stats.refused_limit += 1;
                return None;
            }
            Verdict::AdmitEvicting { required } => {
                let mut evicted = None;
                let table = &mut tcp.table;
                let made_room = tcp.admission.evict_oldest(|id| {
                    let done = table.get_mut(id).is_some_and(|entry| entry.flow.evict());
                    if done {
                        evicted = Some(id);
                    }
                    done
                });
                if let Some(id) = evicted {
                    tcp.enqueue(id);
                }
                if required && !made_room {
                    self.stats.refused_limit += 1;
                    return None;
                }
            }
        }
        let token = |id: Id| Token::new(Op::Connect, id.generation, id.slot as usize).encode();
        let id = tcp.table.insert(
            key,
            Box::new(Entry {
                flow,
                socket: Some(socket),
                queued: false,
                starved: false,
                timer_at: None,
                opened_at: now,
                active_at: now,
                moved: false,
                bytes_up: 0,
                bytes_down: 0,
                counted: Phase::Connecting,
                name,
            }),
        );
        tcp.phases[phase_index(Phase::Connecting)] += 1;
        if let Some(socket) = tcp.table.get(id).and_then(|entry| entry.socket.as_ref())
            && !served_here
        {
            self.ring
                .connect(socket.as_fd(), peer, tcp.connect_timeout, token(id));
        }
        let table = &tcp.table;
        tcp.admission.opened(id, |queued| {
            table
                .get(queued)
                .is_some_and(|entry| entry.flow.phase() == Phase::Connecting)
        });
        self.stats.flows_opened += 1;
        Some(id)
    }

    /// An outbound operation of flow `id` completed with `result` (a count or -errno).
    pub(super) fn on_tcp_completion(&mut self, op: Op, id: Id, result: i32) {
        let Some(entry) = self.tcp.table.get_mut(id) else {
            return;
        };
        let outcome = outbound::completion(result);
        match op {
            Op::Connect => entry.flow.on_connected(outcome.map(drop)),
            Op::Send => {
                let moved = entry.flow.on_sent(outcome) as u64;
                self.stats.bytes_up += moved;
                entry.bytes_up += moved;
                entry.moved |= moved > 0;
            }
            _ => {
                let moved = entry.flow.on_received(outcome) as u64;
                self.stats.bytes_down += moved;
                entry.bytes_down += moved;
                entry.moved |= moved > 0;
            }
        }
        self.tcp.enqueue(id);
    }

    /// Runs every flow on this turn's work list once; flows that have more to do (their
    /// egress budget ran out) go on the next turn's.
    pub(super) fn service_tcp_work(&mut self) {
        let work = std::mem::take(&mut self.tcp.work);
        let now = self.now();
        for &id in &work {
            self.service_tcp(id, now);
        }
        // Reuse the list's memory for the next turn.
        let mut work = work;
        work.clear();
        work.append(&mut self.tcp.work);
        self.tcp.work = work;
    }

    /// Runs one flow: its relay I/O, then smoltcp egress and lifecycle, carrying out
    /// the actions of each.
    fn service_tcp(&mut self, id: Id, now: Instant) {
        let tcp = &mut self.tcp;
        let Some(entry) = tcp.table.get_mut(id) else {
            return;
        };
        entry.queued = false;
        // Every completion is followed by a run in the same turn: its time will do.
        if std::mem::take(&mut entry.moved) {
            entry.active_at = now;
        }
        entry.flow.poll_relay(&mut tcp.actions);
        execute(&mut self.ring, id, entry, &mut tcp.actions);
        let iface = self.stack.ifaces.serving(&entry.flow.key().server.addr);
        let next = entry.flow.poll(
            now,
            iface,
            &mut self.stack.tx,
            &mut tcp.budget,
            &mut tcp.actions,
        );
        if entry.flow.left_half_open() {
            tcp.admission.left();
        }
        // Every change of phase (a completion, a packet, an eviction) is followed by a
        // run in the same turn.
        let phase = entry.flow.phase();
        if phase_index(phase) != phase_index(entry.counted) {
            tcp.phases[phase_index(entry.counted)] -= 1;
            tcp.phases[phase_index(phase)] += 1;
            entry.counted = phase;
        }
        if let Some(failure) = execute(&mut self.ring, id, entry, &mut tcp.actions) {
            entry.flow.release(&mut tcp.budget);
            tcp.phases[phase_index(entry.counted)] -= 1;
            if let Some(failure) = failure {
                self.stats.count_failure(failure);
            }
            let mut named = None;
            if let Some(entry) = tcp.table.remove(id) {
                named = entry
                    .name
                    .is_some()
                    .then(|| entry.flow.key().server_addr().ip());
                let touched = entry.flow.touched();
                if let Some(region) = entry.flow.into_region() {
                    tcp.keep_spare(region, touched);
                }
            }
            if let Some(server) = named {
                self.release_name(server);
            }
            self.stats.flows_closed += 1;
            return;
        }
        if next.starved && !entry.starved {
            entry.starved = true;
            tcp.starved.push(id);
        }
        if let Some(at) = next.deadline {
            self.timers.schedule(&mut entry.timer_at, id, at);
        }
        if next.again {
            tcp.enqueue(id);
        }
    }
}

/// Carries out flow `id`'s actions on its outbound socket; `Some` (with the failure to
/// count) when the flow is to be freed.
fn execute(
    ring: &mut Ring,
    id: Id,
    entry: &mut Entry,
    actions: &mut Actions,
) -> Option<Option<Failure>> {
    let token = |op| Token::new(op, id.generation, id.slot as usize).encode();
    let mut freed = None;
    for action in actions.drain() {
        match action {
            Action::Free(failure) => {
                freed = Some(failure);
                continue;
            }
            // Whether or not its socket is still open.
            Action::Discard(range) => {
                entry.flow.region().discard(range);
                continue;
            }
            _ => {}
        }
        let Some(socket) = &entry.socket else {
            // Its socket is closed: what the relay asks for fails at once, so nothing it
            // counts as in flight is left waiting.
            match action {
                Action::Shutdown => entry.flow.on_shutdown(Err(IoError::Other)),
                Action::Send(_) => drop(entry.flow.on_sent(Err(IoError::Other))),
                Action::Recv(_) => drop(entry.flow.on_received(Err(IoError::Other))),
                _ => {}
            }
            continue;
        };
        let slice = |range| Slice {
            region: entry.flow.region().clone(),
            range,
        };
        match action {
            Action::Send(range) => ring.send(socket.as_fd(), slice(range), token(Op::Send)),
            Action::Recv(range) => ring.recv(socket.as_fd(), slice(range), token(Op::Recv)),
            Action::Shutdown => {
                // Not on the ring: io_uring never issues IORING_OP_SHUTDOWN inline but
                // hands it to an io-wq worker thread, which (wake-ups included) took 9% of
                // the proxy's CPU in the crr benchmark. shutdown(SHUT_WR) of a TCP socket
                // does not block.
                let result = socket
                    .shutdown(Shutdown::Write)
                    .map_err(outbound::io_error_of);
                entry.flow.on_shutdown(result);
            }
            Action::UserTimeout(timeout) => {
                let _ = socket.set_tcp_user_timeout(Some(timeout));
            }
            // Closing with linger 0 sends RST, which is what the server must see.
            Action::Linger0 => {
                let _ = socket.set_linger(Some(Duration::ZERO));
            }
            Action::Cancel => ring.cancel_fd(socket.as_fd()),
            Action::Close => {
                if let Some(socket) = entry.socket.take() {
                    ring.close(socket.into());
                }
            }
            Action::Free(_) | Action::Discard(_) => {}
        }
    }
    freed
}
