//! The loop's side of fake-IP DNS (`--dns fake`): queries read from the TUN answered in
//! place, and the names flows to fake addresses connect to.

// The resolver (`flow::dns`) decides; this carries its replies to the TUN, from the
// address the client asked, so no socket is involved. A flow to a fake address holds
// its table entry while it lives, so the name cannot be given away under it.

use std::net::IpAddr;
use std::rc::Rc;

use smoltcp::time::Instant;
use smoltcp::wire::{IpVersion, Ipv4Cidr, Ipv6Cidr};
use socket2::Socket;

use super::dns_tcp::Conns;
use super::forward::{Client, Forwards};
use super::outbound::Upstream;
use crate::config::{Config, FakeDns};
use crate::error::Error;
use crate::flow::dns::{Answer, FakeConfig, Resolver};
use crate::flow::upstream::MAX_QUERY;
use crate::stack::{Claim, TxPool};
use crate::stats::DnsStats;
use crate::uring::Ring;
use crate::wire::dns::{self, Query};
use crate::wire::icmp::{self, Quote, Reason};
use crate::wire::{Cidr, FlowKey, udp};

use super::Proxy;
use super::dns_tcp::ConnId;
use super::tun_io::{self, Frame};
use crate::flow::Id;
use crate::uring::Op;
use crate::wire::Parsed;

/// The DNS port: datagrams to it, to any address, are queries for the resolver.
pub const PORT: u16 = 53;
/// Largest reply written: the classic UDP limit, which every reply the resolver writes
/// fits in.
const MAX_REPLY: usize = 512;

/// Fake-IP DNS in the loop.
pub struct Dns {
    resolver: Resolver,
    /// Where a reply is written before it is copied into a TUN write buffer.
    reply: Box<[u8; MAX_REPLY]>,
    pub counters: DnsStats,
    /// Queries forwarded to `--dns-server`, if one is given.
    pub forwards: Option<Forwards>,
    /// DNS over TCP from clients, and where a query from one is copied to be answered.
    pub conns: Conns,
    query: Box<[u8]>,
    /// The TUN's MTU: no UDP reply is longer than one packet of it.
    mtu: usize,
}

impl Dns {
    /// The resolver `config` asks for, if it asks for one.
    pub fn new(config: &Config) -> Result<Option<Dns>, Error> {
        let Some(dns) = &config.dns else {
            return Ok(None);
        };
        let resolver = fake_config(dns, config)
            .and_then(Resolver::new)
            .map_err(|why| Error::Usage(format!("--dns fake: {why}")))?;
        Ok(Some(Dns {
            resolver,
            reply: Box::new([0; MAX_REPLY]),
            counters: DnsStats::default(),
            forwards: dns.server.map(Forwards::new),
            conns: Conns::default(),
            query: vec![0; MAX_QUERY].into_boxed_slice(),
            mtu: config.mtu as usize,
        }))
    }

    /// The counters, the resolver's taken now.
    pub fn counters(&self) -> DnsStats {
        DnsStats {
            resolver: self.resolver.counters(),
            ..self.counters
        }
    }

    /// Whether a flow to `addr` must go by name (`addr` is in a fake range).
    pub fn is_fake(&self, addr: IpAddr) -> bool {
        self.resolver.is_fake(addr)
    }

    /// The name a flow to fake address `addr` starts with, its table entry held until
    /// `release`; `None` (counted by the caller) if no name is mapped to it.
    pub fn hold(&mut self, addr: IpAddr) -> Option<Rc<str>> {
        let name = self.resolver.name_of(addr)?.into();
        self.resolver.hold(addr).then_some(name)
    }

    /// The resolver's answer to `query`, written into `self.reply`.
    fn resolve(&mut self, query: &[u8], now: Instant) -> Answer {
        self.resolver.answer(query, now, &mut self.reply[..])
    }

    /// The longest reply to UDP query `query` (to an IPv6 address if `ipv6`): what the
    /// client offers (512 bytes, or its EDNS size), but no more than one TUN packet
    /// holds. Replies go with DF set, so a longer one is dropped on the way (by the
    /// router to a LAN client, say) and the client never sees TC to ask again over TCP.
    fn udp_limit(&self, query: &[u8], ipv6: bool) -> u16 {
        let offered = Query::parse(query).map_or(dns::UDP_MAX as u16, |q| q.udp_size);
        let headers = udp::headers_len(ipv6);
        let fits = u16::try_from(self.mtu.saturating_sub(headers)).unwrap_or(u16::MAX);
        offered.min(fits)
    }

    /// A flow that `hold` gave a name ended.
    pub fn release(&mut self, addr: IpAddr) {
        self.resolver.release(addr);
    }

    /// A UDP datagram `payload` to port 53 from the client of `key`: answered from the
    /// address it was sent to, at once, or taken to forward through `upstream`.
    pub fn on_query(
        &mut self,
        key: FlowKey,
        payload: &[u8],
        now: Instant,
        tx: &mut TxPool,
        upstream: Option<(&Upstream, &str)>,
    ) {
        match self.resolve(payload, now) {
            Answer::Reply(len) => {
                let reply = &self.reply[..len.min(MAX_REPLY)];
                if !tx.emit(Claim::Reply, |buf| udp::reply(buf, key, reply)) {
                    self.counters.reply_drops += 1;
                }
            }
            Answer::Forward => {
                let limit = self.udp_limit(payload, key.server.addr.version() == IpVersion::Ipv6);
                // The resolver forwards only with --dns-server, which needs --upstream.
                if let (Some(forwards), Some((upstream, interface))) =
                    (&mut self.forwards, upstream)
                {
                    let client = Client::Udp(key, limit);
                    forwards.start(
                        payload,
                        client,
                        upstream,
                        interface,
                        now,
                        &mut self.counters,
                    );
                }
            }
            // Counted by the resolver.
            Answer::Drop => {}
        }
    }

    /// Answers the queries DNS-over-TCP connections received (forwarding those the
    /// resolver does not answer through `upstream`), and starts their I/O.
    pub fn answer_tcp(
        &mut self,
        ring: &mut Ring,
        now: Instant,
        upstream: Option<(&Upstream, &str)>,
    ) {
        // Taken out while queries are answered from it (an empty box allocates nothing).
        let mut buffer = std::mem::take(&mut self.query);
        while let Some((len, conn)) = self.conns.take_query(&mut buffer) {
            let query = &buffer[..len];
            match self.resolve(query, now) {
                Answer::Reply(len) => {
                    let reply = &self.reply[..len.min(MAX_REPLY)];
                    self.conns.queue(conn, reply, &mut self.counters);
                }
                Answer::Forward => {
                    if let (Some(forwards), Some((upstream, interface))) =
                        (&mut self.forwards, upstream)
                    {
                        let client = Client::Tcp(conn);
                        forwards.start(query, client, upstream, interface, now, &mut self.counters);
                    }
                }
                Answer::Drop => {}
            }
            self.conns.pump(ring, conn.slot);
        }
        self.query = buffer;
        if let (Some(forwards), Some((upstream, _))) = (&mut self.forwards, upstream) {
            forwards.connect_pending(ring, upstream);
        }
    }

    /// A UDP datagram (`packet`) to a fake address no name is mapped to: ICMP port
    /// unreachable at once, as if nothing listened there.
    pub fn refuse_unmapped(&mut self, packet: &[u8], tx: &mut TxPool) {
        self.counters.unmapped_udp += 1;
        let quote = Quote::of(packet);
        if !tx.emit(Claim::Reply, |buf| {
            icmp::unreachable(buf, &quote, Reason::Port)
        }) {
            self.counters.reply_drops += 1;
        }
    }
}

/// The resolver's configuration from the validated flags.
fn fake_config(dns: &FakeDns, config: &Config) -> Result<FakeConfig, String> {
    let IpAddr::V4(v4) = dns.v4.addr else {
        return Err(format!("{} is not an IPv4 range", dns.v4));
    };
    // Without an IPv6 TUN address there is no IPv6 range to route.
    let v6 = match dns.v6 {
        Some(Cidr {
            addr: IpAddr::V6(addr),
            prefix,
        }) => Some(Ipv6Cidr::new(addr, prefix)),
        _ => None,
    };
    Ok(FakeConfig {
        v4: Ipv4Cidr::new(v4, dns.v4.prefix),
        v6,
        exclude: config.tun_addrs.iter().map(|tun| tun.addr).collect(),
        capacity: dns.entries,
        forward: dns.server.is_some(),
    })
}

impl Proxy {
    /// Answers a UDP datagram to port 53 from the resolver, if `--dns fake` is on
    /// (returns whether it was taken as a query).
    pub(super) fn answered_query(&mut self, frame: &Frame, parsed: &Parsed, now: Instant) -> bool {
        let &Parsed::Udp {
            key,
            payload_start,
            payload_len,
        } = parsed
        else {
            return false;
        };
        let Some(dns) = self.dns.as_mut().filter(|_| key.server.port == PORT) else {
            return false;
        };
        let packet = self
            .ring
            .buffer(tun_io::READ_GROUP, frame.bid, frame.len)
            .map_or(&[][..], |buffer| &buffer[frame.ip_start..]);
        let payload = packet
            .get(payload_start..payload_start + payload_len)
            .unwrap_or(&[]);
        let upstream = self
            .udp
            .upstream
            .as_ref()
            .map(|u| (u, self.udp.interface.as_str()));
        for query in udp::datagrams(payload, frame.udp_segment, udp::MAX_DATAGRAM) {
            dns.on_query(key, query, now, &mut self.stack.tx, upstream);
        }
        true
    }

    /// The name a new flow to `server` goes by: `Ok(None)` for a real address, the name
    /// for a mapped fake one, its entry held until `release_name`; `Err` for a fake
    /// address with no name (the caller refuses the flow).
    pub(super) fn hold_name(&mut self, server: IpAddr) -> Result<Option<Rc<str>>, ()> {
        match self.dns.as_mut().filter(|dns| dns.is_fake(server)) {
            None => Ok(None),
            Some(dns) => dns.hold(server).map(Some).ok_or(()),
        }
    }

    /// A flow that `hold_name` gave a name to ended, or was not opened after all.
    pub(super) fn release_name(&mut self, server: IpAddr) {
        if let Some(dns) = self.dns.as_mut().filter(|dns| dns.is_fake(server)) {
            dns.release(server);
        }
    }

    /// Refuses the datagram in `frame`, to a fake address with no name, with ICMP port
    /// unreachable (counted).
    pub(super) fn refuse_unmapped(&mut self, frame: &Frame) {
        let Some(dns) = &mut self.dns else {
            return;
        };
        let packet = self
            .ring
            .buffer(tun_io::READ_GROUP, frame.bid, frame.len)
            .map_or(&[][..], |buffer| &buffer[frame.ip_start..]);
        dns.refuse_unmapped(packet, &mut self.stack.tx);
    }

    /// Closes the DNS-over-TCP connections fallen idle by `now`.
    pub(super) fn close_idle_dns(&mut self, now: Instant) {
        if let Some(dns) = &mut self.dns {
            let forwards = &dns.forwards;
            let forwarding = |conn| forwards.as_ref().is_some_and(|f| f.serves(conn));
            dns.conns.close_idle(&mut self.ring, now, forwarding);
        }
    }

    /// The flow's end of a new DNS-over-TCP connection (an idle one closed for it if
    /// every slot is taken); `None`, counted, when every connection is busy.
    pub(super) fn open_dns_tcp(&mut self, now: Instant) -> Option<Socket> {
        let dns = self.dns.as_mut()?;
        let forwards = &dns.forwards;
        let forwarding = |conn| forwards.as_ref().is_some_and(|f| f.serves(conn));
        let socket = dns
            .conns
            .open(&mut self.ring, now, forwarding, &mut dns.counters);
        if socket.is_none() {
            dns.counters.tcp_refused += 1;
        }
        socket
    }

    /// A completion on the proxy's end of a DNS-over-TCP flow.
    pub(super) fn on_dns_tcp_completion(&mut self, op: Op, id: Id, result: i32) {
        let now = self.now();
        let Some(dns) = &mut self.dns else {
            return;
        };
        let conn = ConnId {
            slot: id.slot as usize,
            generation: id.generation,
        };
        dns.conns
            .on_completion(op, conn, result, now, &mut dns.counters);
        let upstream = self
            .udp
            .upstream
            .as_ref()
            .map(|u| (u, self.udp.interface.as_str()));
        dns.answer_tcp(&mut self.ring, now, upstream);
        dns.conns.pump(&mut self.ring, conn.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::dns::TYPE_AAAA;

    fn dns_for(extra: &[&str]) -> Dns {
        let mut args = vec![
            "-i",
            "lo",
            "--upstream",
            "socks5://192.0.2.1:1080",
            "--dns",
            "fake",
        ];
        args.extend_from_slice(extra);
        let args: crate::cli::Args = argh::FromArgs::from_args(&["uringproxy"], &args).unwrap();
        Dns::new(&Config::from_args(args).unwrap())
            .unwrap()
            .unwrap()
    }

    /// A query for `example.com` of type `qtype`.
    fn query(qtype: u16) -> Vec<u8> {
        let mut query = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        query.extend_from_slice(b"\x07example\x03com\x00");
        query.extend_from_slice(&qtype.to_be_bytes());
        query.extend_from_slice(&1u16.to_be_bytes());
        query
    }

    /// The rcode and answer count of the reply `dns` wrote for `qtype`.
    fn answered(dns: &mut Dns, qtype: u16) -> (u8, u16) {
        let Answer::Reply(len) = dns.resolve(&query(qtype), Instant::ZERO) else {
            panic!("no reply to type {qtype}");
        };
        let reply = &dns.reply[..len];
        (reply[3] & 0x0f, u16::from_be_bytes([reply[6], reply[7]]))
    }

    #[test]
    fn without_an_ipv6_tun_address_aaaa_gets_no_record() {
        let mut dns = dns_for(&["--tun-addr", "10.0.0.1/30"]);
        assert_eq!(answered(&mut dns, dns::TYPE_A), (0, 1));
        assert_eq!(answered(&mut dns, TYPE_AAAA), (0, 0));
        assert_eq!(dns.counters().resolver.aaaa_without_range, 1);
        let mut dns = dns_for(&[]);
        assert_eq!(
            answered(&mut dns, TYPE_AAAA),
            (0, 1),
            "the default TUN has IPv6"
        );
        assert_eq!(dns.counters().resolver.aaaa_without_range, 0);
    }

    /// `query(qtype)` with an EDNS record offering `size` bytes over UDP.
    fn query_with_edns(qtype: u16, size: u16) -> Vec<u8> {
        let mut query = query(qtype);
        query[11] = 1;
        query.extend_from_slice(&[0, 0, 41]);
        query.extend_from_slice(&size.to_be_bytes());
        query.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        query
    }

    #[test]
    fn a_forwarded_udp_reply_fits_one_tun_packet() {
        let dns = dns_for(&["--mtu", "1500"]);
        let mx = 15;
        assert_eq!(dns.udp_limit(&query(mx), false), 512, "no EDNS");
        assert_eq!(dns.udp_limit(&query_with_edns(mx, 1232), false), 1232);
        assert_eq!(dns.udp_limit(&query_with_edns(mx, 4096), false), 1472);
        assert_eq!(dns.udp_limit(&query_with_edns(mx, 4096), true), 1452);
        let dns = dns_for(&["--mtu", "9000"]);
        assert_eq!(dns.udp_limit(&query_with_edns(mx, 4096), false), 4096);
    }
}
