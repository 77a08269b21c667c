//! Requests answered: replies rendered into the client's buffer, status a slice at a time.

use std::fmt::Write;

use smoltcp::time::Instant;

use super::{
    Answer, CLIENT_MEMORY, Listing, Phase, REPLY_START, REPLY_TIMEOUT, ROWS_PER_SLICE, Service,
};
use crate::control::out::Out;
use crate::control::wire::{self, FlowRow, Proto, State};
use crate::control::{Request, http, prometheus};
use crate::event_loop::Proxy;
use crate::event_loop::datagrams::Outbound;
use crate::flow::datagram::{self, Kind};

impl Proxy {
    /// `n` more bytes of client `key`'s request arrived: answer once it is complete.
    pub(super) fn on_control_request(&mut self, key: usize, n: usize) {
        let client = &mut self.control.clients[key];
        let Phase::Request { have } = &mut client.phase else {
            return;
        };
        *have += n;
        let (have, service) = (*have, client.service);
        let full = have >= service.request_limit();
        let memory = client.memory.clone();
        let answer = memory.with_mut(0..have, |request| match service {
            Service::Control => match Request::parse(request, full) {
                Request::Incomplete => None,
                Request::Status => Some(Answer::Status),
                Request::Invalid(why) => Some(Answer::Refusal(why)),
            },
            Service::Metrics => match http::parse(request, full) {
                http::Parsed::Incomplete => None,
                http::Parsed::Respond(status) => Some(Answer::Http(status)),
            },
        });
        let Some(answer) = answer else {
            self.control.receive(&mut self.ring, key);
            return;
        };
        if !matches!(answer, Answer::Status | Answer::Http(http::Status::Ok)) {
            self.control.counters[service as usize].bad_requests += 1;
        }
        let now = self.now();
        self.control.clients[key].deadline = now + REPLY_TIMEOUT.into();
        self.refresh_counters();
        let reply = REPLY_START..CLIENT_MEMORY;
        let (len, next) = match answer {
            Answer::Status => memory.with_mut(reply, |buf| {
                let mut out = Out::new(buf);
                let mut listing = Listing::default();
                let header = self.with_report(|info, snapshot| {
                    out.record(|out| wire::write_header(out, info, snapshot))
                });
                let done = header && self.list_flows(&mut out, &mut listing, now);
                (out.len(), (!done).then_some(listing))
            }),
            Answer::Refusal(why) => memory.with_mut(reply, |buf| {
                let mut out = Out::new(buf);
                out.record(|out| wire::write_error(out, why));
                (out.len(), None)
            }),
            Answer::Http(status) => {
                let mut body = std::mem::take(&mut self.control.scratch);
                body.clear();
                if status == http::Status::Ok {
                    // A String takes whatever is written.
                    let _ = self
                        .with_report(|info, snapshot| prometheus::write(&mut body, info, snapshot));
                } else {
                    body.push_str(status.explanation());
                }
                let len = memory.with_mut(reply, |buf| {
                    let mut out = Out::new(buf);
                    out.record(|out| {
                        http::write_head(out, status, body.len())?;
                        out.write_str(&body)
                    });
                    out.len()
                });
                self.control.scratch = body;
                (len, None)
            }
        };
        self.start_reply(key, len, next);
    }

    /// Sends the `len` bytes just rendered into client `key`'s reply buffer, to go on
    /// with the listing `next` (if any) once they are out.
    fn start_reply(&mut self, key: usize, len: usize, next: Option<Listing>) {
        if len == 0 {
            // Nothing fitted the buffer (it is sized so that this cannot happen).
            self.control.close(&mut self.ring, key);
            return;
        }
        self.control.clients[key].phase = Phase::Reply {
            range: REPLY_START..REPLY_START + len,
            next,
        };
        self.control.send(&mut self.ring, key);
    }

    /// `n` bytes of client `key`'s reply went out: the rest of this slice, the next
    /// slice, or (the reply complete) the close.
    pub(super) fn on_control_sent(&mut self, key: usize, n: usize) {
        let now = self.now();
        let client = &mut self.control.clients[key];
        let Phase::Reply { range, next } = &mut client.phase else {
            return;
        };
        range.start = (range.start + n).min(range.end);
        if range.start < range.end {
            self.control.send(&mut self.ring, key);
            return;
        }
        let Some(mut listing) = next.take() else {
            self.control.finish(&mut self.ring, key, now);
            return;
        };
        let memory = client.memory.clone();
        let (len, done) = memory.with_mut(REPLY_START..CLIENT_MEMORY, |buf| {
            let mut out = Out::new(buf);
            let done = self.list_flows(&mut out, &mut listing, now);
            (out.len(), done)
        });
        self.start_reply(key, len, (!done).then_some(listing));
    }

    /// Lists flows into `out` from `listing` on: at most `ROWS_PER_SLICE`, and as many
    /// as fit. True once the listing is complete (its `end` line written).
    fn list_flows(&self, out: &mut Out, listing: &mut Listing, now: Instant) -> bool {
        let mut rows = 0;
        loop {
            let row = if !listing.datagrams {
                let table = &self.tcp.table;
                if listing.slot >= table.slot_end() {
                    *listing = Listing {
                        datagrams: true,
                        slot: 0,
                        ..*listing
                    };
                    continue;
                }
                let entry = table.id_at(listing.slot).and_then(|id| table.get(id));
                entry.map(|entry| entry.row(now))
            } else {
                let flows = &self.udp.flows;
                if listing.slot >= flows.slot_end() {
                    return out.record(|out| wire::write_end(out, listing.listed));
                }
                flows
                    .at_slot(listing.slot)
                    .map(|flow| datagram_row(flow, now))
            };
            if let Some(row) = row {
                if rows == ROWS_PER_SLICE || !out.record(|out| wire::write_flow(out, &row)) {
                    return false;
                }
                rows += 1;
                listing.listed += 1;
            }
            listing.slot += 1;
        }
    }
}

/// What `uringproxy status` lists of datagram flow `flow` at `now`.
fn datagram_row(flow: &datagram::Flow<Outbound>, now: Instant) -> FlowRow {
    let key = flow.key();
    let (bytes_up, bytes_down) = flow.bytes();
    FlowRow {
        proto: match flow.kind() {
            Kind::Udp => Proto::Udp,
            Kind::Echo => Proto::Icmp,
        },
        client: key.client_addr(),
        server: key.server_addr(),
        state: if flow.is_closing() {
            State::Closing
        } else if flow.io.socket.is_none() {
            // Its SOCKS5 association is being set up.
            State::Connecting
        } else {
            State::Open
        },
        bytes_up,
        bytes_down,
        age_s: (now - flow.opened()).secs(),
        idle_s: (now - flow.last_active()).secs(),
        name: flow.io.name.as_deref().map(str::to_string),
    }
}
