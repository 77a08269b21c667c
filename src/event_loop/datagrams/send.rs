//! Client datagrams out to servers: gathered per flow over a turn, sent segmented.

// Each flow gathers its client datagrams of a turn in one send slot while they can be
// one segmented send (`coalesce`); a datagram that cannot join sends what was gathered
// and starts the next slot, and at the end of the turn every flow's gathered datagrams
// go out. A send the kernel refuses as segmented goes again one datagram at a time from
// the same slot, which is freed once all its sends are done.

use std::os::fd::AsFd;

use log::info;
use nix::libc;
use nix::sys::socket::{setsockopt, sockopt::UdpGsoSegment};
use socket2::{Domain, Protocol, Socket, Type};

use super::{Datagrams, MAX_DATAGRAM, SEND_SLOTS};
use crate::flow::Id;
use crate::flow::datagram::coalesce::{Batch, Limits, MAX_SEGMENTS};
use crate::uring::{MESSAGE_ALIGN, MESSAGE_LEN, Op, Ring, Slice, Token};
use crate::wire::{socks5, udp};

/// Bytes set aside per slot for a segmented send's message header.
const MESSAGE_STRIDE: usize = MESSAGE_LEN.next_multiple_of(MESSAGE_ALIGN);
/// Where the message headers start in the slots' region: after the slots.
const MESSAGES_START: usize = (SEND_SLOTS as usize * MAX_DATAGRAM).next_multiple_of(64);
/// The slots' region: the slots, then one message header per slot.
pub(super) const REGION_LEN: usize = MESSAGES_START + SEND_SLOTS as usize * MESSAGE_STRIDE;
/// IP and UDP header bytes, IPv4 and IPv6: the segment size is at most the MTU less them.
const HEADERS: [usize; 2] = [udp::headers_len(false), udp::headers_len(true)];
/// The MTU assumed when the outbound interface's cannot be read.
const DEFAULT_MTU: usize = 1500;

/// A send slot in flight: the flow, what it holds, and how many sends still use it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Sending {
    id: Id,
    len: usize,
    /// The segment size of a segmented send in flight, 0 for plain sends.
    segment: u16,
    sends: u16,
}

impl Sending {
    pub(super) const IDLE: Sending = Sending {
        id: Id {
            slot: 0,
            generation: 0,
        },
        len: 0,
        segment: 0,
        sends: 0,
    };
}

/// What one send may carry towards IPv4 and IPv6 servers: probed at start-up (a socket
/// that takes UDP_SEGMENT), the segment size bounded by the outbound interface's MTU.
pub(super) fn probe(interface: &str) -> [Limits; 2] {
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{interface}/mtu"))
        .ok()
        .and_then(|mtu| mtu.trim().parse().ok())
        .unwrap_or(DEFAULT_MTU);
    let limits = [Domain::IPV4, Domain::IPV6]
        .into_iter()
        .zip(HEADERS)
        .map(|(domain, headers)| {
            let takes = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))
                .and_then(|socket| Ok(setsockopt(&socket, UdpGsoSegment, &1200)?))
                .is_ok();
            Limits {
                max_segment: mtu.saturating_sub(headers),
                max_bytes: MAX_DATAGRAM,
                max_segments: if takes { MAX_SEGMENTS } else { 1 },
            }
        });
    let [v4, v6] =
        <[Limits; 2]>::try_from(limits.collect::<Vec<_>>()).unwrap_or([Limits::SINGLE; 2]);
    let family = |limits: &Limits| match limits.max_segments {
        1 => "off".to_string(),
        n => format!("up to {n} x {} B", limits.max_segment),
    };
    info!(
        "UDP send offload (UDP_SEGMENT, {interface} mtu {mtu}): IPv4 {}, IPv6 {}",
        family(&v4),
        family(&v6)
    );
    [v4, v6]
}

impl Datagrams {
    /// Adds a client datagram of flow `id` (`len` bytes, which `build` writes) to the
    /// flow's send; without a socket yet (an association being set up) it is held. A
    /// datagram that cannot join the flow's send makes that send ready (`submit_ready`).
    /// False when no send slot is free (dropped, counted).
    pub(super) fn gather(
        &mut self,
        id: Id,
        len: usize,
        build: impl FnOnce(&mut [u8]) -> usize,
    ) -> bool {
        let Some(flow) = self.flows.get_mut(id) else {
            return false;
        };
        if flow.io.socket.is_none() {
            return self.fill(build);
        }
        let limits = match (flow.io.segmenting, flow.io.ipv6) {
            (false, _) => Limits::SINGLE,
            (true, false) => self.limits[0],
            (true, true) => self.limits[1],
        };
        let gathering = flow.io.batch.is_some();
        if let Some((slot, batch)) = &mut flow.io.batch {
            let offset = batch.bytes();
            if batch.join(len, &limits) {
                let start = usize::from(*slot) * MAX_DATAGRAM + offset;
                self.slots.with_mut(start..start + len, build);
                return true;
            }
        }
        if let Some((slot, batch)) = flow.io.batch.take() {
            self.ready.push((id, slot, batch));
        }
        let Some(slot) = self.free_slots.pop() else {
            self.flows.counters.no_send_slot += 1;
            return false;
        };
        let start = usize::from(slot) * MAX_DATAGRAM;
        self.slots.with_mut(start..start + len, build);
        if let Some(flow) = self.flows.get_mut(id) {
            flow.io.batch = Some((slot, Batch::new(len, &limits)));
        }
        if !gathering {
            self.batched.push(id);
        }
        true
    }

    /// Submits the sends `gather` made ready, in order.
    pub(super) fn submit_ready(&mut self, ring: &mut Ring) {
        let mut ready = std::mem::take(&mut self.ready);
        for (id, slot, batch) in ready.drain(..) {
            self.submit(ring, id, slot, batch);
        }
        self.ready = ready;
    }

    /// The end of a turn: every flow's gathered datagrams go out.
    pub fn flush(&mut self, ring: &mut Ring) {
        self.submit_ready(ring);
        let mut batched = std::mem::take(&mut self.batched);
        for id in batched.drain(..) {
            self.flush_flow(ring, id);
        }
        self.batched = batched;
    }

    /// Sends what flow `id` has gathered, if anything.
    pub(super) fn flush_flow(&mut self, ring: &mut Ring, id: Id) {
        let batch = self.flows.get_mut(id).and_then(|flow| flow.io.batch.take());
        if let Some((slot, batch)) = batch {
            self.submit(ring, id, slot, batch);
        }
    }

    /// Sends the datagrams `batch` gathered in `slot` on flow `id`'s socket: one plain
    /// send, or one segmented.
    pub(super) fn submit(&mut self, ring: &mut Ring, id: Id, slot: u16, batch: Batch) {
        let Some(flow) = self.flows.get(id) else {
            self.free_slots.push(slot);
            return;
        };
        let Some(socket) = &flow.io.socket else {
            self.free_slots.push(slot);
            return;
        };
        let start = usize::from(slot) * MAX_DATAGRAM;
        let buf = Slice {
            region: self.slots.clone(),
            range: start..start + batch.bytes(),
        };
        let token = Token::new(Op::UdpSend, 0, usize::from(slot)).encode();
        let mut sending = Sending {
            id,
            len: batch.bytes(),
            segment: 0,
            sends: 1,
        };
        match batch.segment() {
            Some(segment) => {
                let message = MESSAGES_START + usize::from(slot) * MESSAGE_STRIDE;
                let message = message..message + MESSAGE_STRIDE;
                if ring.send_segmented(socket.as_fd(), buf, message, segment, token) {
                    sending.segment = segment;
                } else {
                    sending.sends =
                        send_each(ring, socket, &self.slots, slot, batch.bytes(), segment);
                }
            }
            None => ring.send(socket.as_fd(), buf, token),
        }
        // Through an upstream each datagram starts with its SOCKS5 header, which is not
        // payload.
        let header = match (&self.upstream, &flow.io.name) {
            (Some(_), Some(name)) => socks5::udp_header_name_len(name.as_bytes()),
            (Some(_), None) => socks5::udp_header_len(&flow.key().server_addr()),
            (None, _) => 0,
        };
        let payload = batch.bytes().saturating_sub(header * batch.segments());
        if sending.segment > 0 {
            self.flows.counters.super_sends_up += 1;
            self.flows.counters.super_send_segments_up += batch.segments() as u64;
        }
        if let Some(at) = self.sending.get_mut(usize::from(slot)) {
            *at = sending;
        }
        self.flows.relayed_up(id, batch.segments(), payload);
    }

    /// A send from `slot` finished with `result`. A refused segmented send goes again
    /// one datagram at a time, and its socket sends no more segmented; the slot is free
    /// once none of its sends is in flight.
    pub fn on_sent(&mut self, ring: &mut Ring, slot: u32, result: i32) {
        let Some(slot) = u16::try_from(slot).ok().filter(|&slot| slot < SEND_SLOTS) else {
            return;
        };
        let Some(mut sending) = self.sending.get(usize::from(slot)).copied() else {
            return;
        };
        let refused =
            sending.segment > 0 && matches!(-result, libc::EIO | libc::EINVAL | libc::EMSGSIZE);
        let socket = self
            .flows
            .get_mut(sending.id)
            .filter(|_| refused)
            .and_then(|flow| {
                flow.io.segmenting = false;
                flow.io.socket.as_ref()
            });
        let resent = socket.map(|socket| {
            send_each(
                ring,
                socket,
                &self.slots,
                slot,
                sending.len,
                sending.segment,
            )
        });
        if let Some(resent) = resent {
            self.flows.counters.gso_fallbacks += 1;
            sending.sends += resent;
            sending.segment = 0;
        } else if result < 0 {
            self.flows.counters.send_errors += 1;
        }
        sending.sends = sending.sends.saturating_sub(1);
        if sending.sends == 0 {
            self.free_slots.push(slot);
        }
        self.sending[usize::from(slot)] = sending;
    }
}

/// Sends the `len` bytes of `slot` on `socket` as datagrams of `segment` bytes (the last
/// may be shorter), one plain send each; returns how many.
fn send_each(
    ring: &mut Ring,
    socket: &Socket,
    slots: &crate::uring::Region,
    slot: u16,
    len: usize,
    segment: u16,
) -> u16 {
    let start = usize::from(slot) * MAX_DATAGRAM;
    let token = Token::new(Op::UdpSend, 0, usize::from(slot)).encode();
    let mut sends = 0;
    for at in (0..len).step_by(usize::from(segment).max(1)) {
        let end = (at + usize::from(segment)).min(len);
        let buf = Slice {
            region: slots.clone(),
            range: start + at..start + end,
        };
        ring.send(socket.as_fd(), buf, token);
        sends += 1;
    }
    sends
}
