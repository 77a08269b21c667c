//! The single-threaded event loop: TUN packets and outbound socket I/O all complete on
//! one io_uring ring. Each turn submits what is queued, waits for completions or the
//! next deadline, dispatches the completions to the flows, and runs the flows that have
//! work. Everything else lives in the modules below.

mod association;
mod control;
mod datagrams;
mod dns;
mod dns_tcp;
mod forward;
mod host;
mod housekeeping;
mod outbound;
mod report;
mod setup;
mod shutdown;
mod signals;
mod tcp;
mod timers;
mod tun_io;

use std::time::Duration;

use log::info;
use nix::libc;
use smoltcp::time::Instant;

use crate::config::Config;
use crate::error::Error;
use crate::flow::Id;
use crate::stack::Stack;
use crate::stats::Stats;
use crate::uring::{Completion, Op, Ring, Token};
use crate::wire::icmp::Quote;
use crate::wire::{self, Parsed};
use control::Control;
use datagrams::Datagrams;
use housekeeping::Housekeeping;
use signals::{Request, Signals};
use tcp::TcpFlows;
use timers::Timers;
use tun_io::{Frame, TunIo};

pub use setup::run;

/// Completions handled per turn before the flows run and their writes go out.
const MAX_COMPLETIONS_PER_TURN: usize = 1024;
/// Timers fired, and idle datagram flows closed, per turn.
const MAX_TIMERS_PER_TURN: usize = 1024;

/// Everything the loop owns. The ring comes first: when the proxy is dropped on an
/// error path, it drains (and only then lets go of any memory) before the TUN closes.
struct Proxy {
    ring: Ring,
    tun: TunIo,
    stack: Stack,
    tcp: TcpFlows,
    udp: Datagrams,
    /// Fake-IP DNS (`--dns fake`).
    dns: Option<dns::Dns>,
    timers: Timers,
    signals: Signals,
    housekeeping: Housekeeping,
    control: Control,
    stats: Stats,
    completions: Vec<Completion>,
    epoch: std::time::Instant,
    /// When the counters were last logged at debug level.
    last_report: std::time::Instant,
    /// Set by a stopping signal: the loop ends after this turn.
    stop: bool,
    /// Set when the TUN itself fails; the loop ends with it.
    fatal: Option<Error>,
    config: Config,
    /// The policy rules installed for this run, for `status`.
    rules: Vec<String>,
}

impl Proxy {
    /// Time since start, as smoltcp and the flows count it.
    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Runs until a stopping signal (then resets every flow) or a fatal error.
    fn run(&mut self) -> Result<(), Error> {
        loop {
            self.tun.arm_reads(&mut self.ring);
            self.signals.arm(&mut self.ring);
            self.tun
                .flush_writes(&mut self.ring, &mut self.stack.tx, &mut self.stats);
            let timeout = self.next_timeout();
            self.tun
                .submit_and_wait(&mut self.ring, timeout)
                .map_err(|err| Error::Io("io_uring_enter", err))?;

            let mut completions = std::mem::take(&mut self.completions);
            self.ring.drain(&mut completions, MAX_COMPLETIONS_PER_TURN);
            // Link notifications are no traffic: on a host where links come and go they
            // would keep the pools from ever giving their pages back.
            let traffic = completions
                .iter()
                .any(|c| Token::decode(c.token).is_none_or(|token| token.op != Op::LinkEvent));
            if traffic {
                self.housekeeping.busy(self.now());
            }
            for completion in &completions {
                self.dispatch(completion);
            }
            self.completions = completions;
            // The client datagrams of this turn's TUN reads, gathered per flow.
            self.udp.flush(&mut self.ring);
            self.ring.publish(tun_io::READ_GROUP);
            self.ring.publish(datagrams::RECV_GROUP);
            if let Some(err) = self.fatal.take() {
                self.reset_all();
                return Err(err);
            }
            if self.stop {
                self.reset_all();
                self.print_counters();
                return Ok(());
            }

            let now = self.now();
            self.fire_timers(now);
            self.expire_datagrams(now);
            self.service_forwards(now);
            self.close_idle_dns(now);
            self.housekeeping(now);
            self.service_tcp_work();
            let table = &self.tcp;
            self.timers
                .compact(table.len(), |id, at| table.timer_is(id, at));
            self.log_counters();
        }
    }

    fn dispatch(&mut self, completion: &Completion) {
        let Some(token) = Token::decode(completion.token) else {
            return;
        };
        let id = Id {
            slot: token.key,
            generation: token.generation,
        };
        match token.op {
            Op::TunRead => self.on_tun_read(completion),
            Op::TunWrite | Op::TunGather => {
                tun_io::release_write(&mut self.stack.tx, token);
                if completion.result == -libc::EBADFD {
                    self.fatal.get_or_insert(self.tun.deleted());
                } else if completion.result < 0 {
                    self.stats.tun_write_errors += 1;
                } else {
                    self.stats.tun_writes += 1;
                    self.stats.tun_write_bytes += completion.result as u64;
                }
                // Only a transmit buffer freed can feed a flow starved of them.
                if token.op == Op::TunWrite {
                    self.tcp.wake_starved();
                }
            }
            Op::Signal => match self.signals.on_read(completion.result) {
                Some(Request::Counters) => self.print_counters(),
                Some(Request::Stop(signal)) => {
                    info!("{signal}: resetting {} flows and exiting", self.tcp.len());
                    self.stop = true;
                }
                None => {}
            },
            Op::UdpSend => self
                .udp
                .on_sent(&mut self.ring, token.key, completion.result),
            Op::UdpRecv => self.on_udp_received(id, completion),
            Op::Connect | Op::Send | Op::Recv => {
                self.on_tcp_completion(token.op, id, completion.result);
            }
            Op::ControlAccept => self.on_control_accept(token.key, completion),
            Op::ControlRecv | Op::ControlSend => {
                self.on_control_io(token.op, id, completion.result);
            }
            Op::ControlTick => self.on_control_tick(),
            Op::LinkEvent => {
                if let Err(err) = self.tun.on_link_event(completion.result) {
                    self.fatal.get_or_insert(err);
                }
            }
            Op::AssociationConnect | Op::AssociationSend | Op::AssociationRecv => {
                self.on_association_completion(token.op, id, completion.result);
            }
            Op::DnsConnect | Op::DnsSend | Op::DnsRecv => {
                self.on_forward_completion(token.op, id, completion.result);
            }
            Op::DnsTcpRecv | Op::DnsTcpSend => {
                self.on_dns_tcp_completion(token.op, id, completion.result);
            }
        }
    }

    fn on_tun_read(&mut self, completion: &Completion) {
        match self
            .tun
            .on_read(&mut self.ring, completion, &mut self.stats)
        {
            Ok(Some((bid, frame))) => {
                if let Some(frame) = frame {
                    self.on_packet(frame);
                }
                self.ring.recycle(tun_io::READ_GROUP, bid);
            }
            Ok(None) => {}
            Err(err) => {
                self.fatal.get_or_insert(err);
            }
        }
    }

    /// The IP packet of `frame`, in its TUN read buffer.
    fn packet(&self, frame: &Frame) -> &[u8] {
        self.ring
            .buffer(tun_io::READ_GROUP, frame.bid, frame.len)
            .map_or(&[], |buffer| &buffer[frame.ip_start..])
    }

    /// Demultiplexes one packet from the TUN to its flow.
    fn on_packet(&mut self, frame: Frame) {
        let packet = self.packet(&frame);
        let parsed = wire::parse(packet);
        let syn = matches!(parsed, Parsed::Tcp { opens: true, .. }).then(|| Quote::of(packet));
        match parsed {
            Parsed::Tcp { key, mss, .. } => self.on_tcp_segment(&frame, key, syn, mss),
            Parsed::Udp { .. } | Parsed::Echo { .. } => self.on_datagram(&frame, parsed),
            Parsed::Fragment => self.stats.fragments += 1,
            Parsed::Unsupported => self.stats.unsupported += 1,
            Parsed::Malformed => self.stats.malformed += 1,
        }
    }

    /// How long the loop may sleep: not at all with work queued, else until the next
    /// flow deadline, datagram expiry or pending heap trim.
    fn next_timeout(&self) -> Option<Duration> {
        if self.tcp.has_work() {
            return Some(Duration::ZERO);
        }
        let now = self.now();
        [
            self.timers.next(),
            self.udp.next_expiry(),
            self.dns
                .as_ref()
                .and_then(|dns| dns.forwards.as_ref()?.next_deadline()),
            self.dns.as_ref().and_then(|dns| dns.conns.next_idle()),
            self.housekeeping.due(self.tcp.closed_since_peak()),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| {
            if at > now {
                Duration::from_micros((at - now).total_micros())
            } else {
                Duration::ZERO
            }
        })
    }

    fn fire_timers(&mut self, now: Instant) {
        for _ in 0..MAX_TIMERS_PER_TURN {
            let Some((at, id)) = self.timers.pop_due(now) else {
                break;
            };
            self.tcp.timer_fired(id, at);
        }
    }
}
