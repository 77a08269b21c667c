//! The proxy's own DNS resolver for fake-IP (`--dns fake`), as policy without I/O: a
//! query's bytes in, the reply written into a lent buffer or the decision to forward it.
//! This object performs no I/O; the event loop carries queries and replies.

pub mod fake;
pub mod stream;

use std::net::{IpAddr, Ipv6Addr};

use smoltcp::time::Instant;
use smoltcp::wire::{Ipv4Cidr, Ipv6Cidr};

use crate::wire::dns::{self, CLASS_IN, Header, MAX_TEXT, Query, Rcode, Rdata, Record};
pub use fake::FakeTable;

/// TTL of fake answers: short, so that a client asks again rather than keeping an
/// address the table may since have given to another name.
pub const TTL: u32 = 1;
/// Where the table lays out IPv6 addresses when no IPv6 range is routed: never handed
/// out (AAAA then gets no record), but the table gives every name one.
const UNROUTED_V6: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x7072, 0x7879, 0xfa4e, 0, 0, 0, 0);

/// What the resolver is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeConfig {
    /// The ranges fake addresses come from (networks; host bits ignored).
    pub v4: Ipv4Cidr,
    /// `None` when no IPv6 range is routed (the TUN has no IPv6 address): AAAA then
    /// gets no record, so clients use the IPv4 answer, not an address leading nowhere.
    pub v6: Option<Ipv6Cidr>,
    /// Addresses in the ranges never handed out (the TUN's own).
    pub exclude: Vec<IpAddr>,
    /// Names held at most; less if the IPv4 range is smaller.
    pub capacity: usize,
    /// Whether queries the resolver does not answer itself go to an upstream DNS server
    /// (`--dns-server`); else they get REFUSED.
    pub forward: bool,
}

/// What to do with a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A reply of that many bytes is at the start of the buffer lent to `answer`.
    Reply(usize),
    /// The query goes unchanged over TCP through the upstream to the DNS server.
    Forward,
    /// Nothing to send (counted): no id to answer to, a response, or no room to reply.
    Drop,
}

/// What the resolver counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsCounters {
    /// Queries by type (those with a readable question).
    pub a: u64,
    pub aaaa: u64,
    pub https_svcb: u64,
    pub ptr: u64,
    pub other: u64,
    /// Replies written with NOERROR or NXDOMAIN.
    pub answered: u64,
    pub forwarded: u64,
    pub refused: u64,
    /// Malformed queries answered FORMERR (or NOTIMP for other opcodes).
    pub formerr: u64,
    /// Names refused a fake address because the table was full.
    pub servfail: u64,
    pub dropped: u64,
    /// Names in the table, and entries reused for another name.
    pub table_size: u64,
    pub evictions: u64,
    /// AAAA queries answered with no record: no IPv6 range is routed.
    pub aaaa_without_range: u64,
}

/// Answers A and AAAA from the fake table, PTR of fake addresses from it too, HTTPS and
/// SVCB with no record (clients fall back to A and AAAA, whose answers are ours), and
/// forwards or refuses the rest.
pub struct Resolver {
    table: FakeTable,
    /// An IPv6 range is routed: AAAA gets a fake address.
    v6: bool,
    forward: bool,
    counters: DnsCounters,
}

impl Resolver {
    pub fn new(config: FakeConfig) -> Result<Resolver, String> {
        let v6 = config.v6.unwrap_or(Ipv6Cidr::new(UNROUTED_V6, 64));
        Ok(Resolver {
            table: FakeTable::new(config.v4, v6, &config.exclude, config.capacity)?,
            v6: config.v6.is_some(),
            forward: config.forward,
            counters: DnsCounters::default(),
        })
    }

    /// Decides on the DNS message `query` from a client at `now`, writing any reply
    /// into `out` (512 bytes hold every reply written; over UDP without EDNS no more may
    /// be sent).
    pub fn answer(&mut self, query: &[u8], now: Instant, out: &mut [u8]) -> Answer {
        let parsed = match Query::parse(query) {
            Ok(parsed) => parsed,
            Err(error) => return self.malformed(query, error, out),
        };
        let counters = &mut self.counters;
        *match parsed.qtype {
            dns::TYPE_A => &mut counters.a,
            dns::TYPE_AAAA => &mut counters.aaaa,
            dns::TYPE_HTTPS | dns::TYPE_SVCB => &mut counters.https_svcb,
            dns::TYPE_PTR => &mut counters.ptr,
            _ => &mut counters.other,
        } += 1;
        if parsed.qclass != CLASS_IN {
            return reply(&mut self.counters, out, &parsed, Rcode::Refused, None);
        }
        match parsed.qtype {
            dns::TYPE_A | dns::TYPE_AAAA => self.address(&parsed, now, out),
            dns::TYPE_HTTPS | dns::TYPE_SVCB => {
                reply(&mut self.counters, out, &parsed, Rcode::NoError, None)
            }
            dns::TYPE_PTR => match parsed.name.reverse() {
                Some(addr) if self.table.contains(addr) => {
                    let (rcode, record) = match self.table.name_of(addr) {
                        Some(name) => {
                            let data = Rdata::Ptr(name);
                            (Rcode::NoError, Some(Record { ttl: TTL, data }))
                        }
                        None => (Rcode::NxDomain, None),
                    };
                    reply(&mut self.counters, out, &parsed, rcode, record)
                }
                _ => self.other(&parsed, out),
            },
            _ => self.other(&parsed, out),
        }
    }

    /// The name a fake address stands for.
    pub fn name_of(&self, addr: IpAddr) -> Option<&str> {
        self.table.name_of(addr)
    }

    /// Whether `addr` lies in a fake range, mapped or not: such a destination is never
    /// connected to as an address.
    pub fn is_fake(&self, addr: IpAddr) -> bool {
        self.table.contains(addr)
    }

    /// A flow to `addr` starts; false if `addr` has no name (see `FakeTable::hold`).
    pub fn hold(&mut self, addr: IpAddr) -> bool {
        self.table.hold(addr)
    }

    /// A flow `hold` counted ends.
    pub fn release(&mut self, addr: IpAddr) {
        self.table.release(addr)
    }

    pub fn counters(&self) -> DnsCounters {
        let table = self.table.counters();
        DnsCounters {
            table_size: table.size,
            evictions: table.evictions,
            ..self.counters
        }
    }

    /// A fake address for an A or AAAA question.
    fn address(&mut self, query: &Query, now: Instant, out: &mut [u8]) -> Answer {
        if query.qtype == dns::TYPE_AAAA && !self.v6 {
            self.counters.aaaa_without_range += 1;
            return reply(&mut self.counters, out, query, Rcode::NoError, None);
        }
        let mut text = [0u8; MAX_TEXT];
        let name = match query.name.text(&mut text) {
            Some(name) if !name.is_empty() => name,
            // Not a host name an upstream could resolve.
            _ => return reply(&mut self.counters, out, query, Rcode::Refused, None),
        };
        let Some(slot) = self.table.lookup(name, now) else {
            return reply(&mut self.counters, out, query, Rcode::ServFail, None);
        };
        let data = if query.qtype == dns::TYPE_A {
            Rdata::A(self.table.v4(slot))
        } else {
            Rdata::Aaaa(self.table.v6(slot))
        };
        reply(
            &mut self.counters,
            out,
            query,
            Rcode::NoError,
            Some(Record { ttl: TTL, data }),
        )
    }

    /// A question the fake table does not answer.
    fn other(&mut self, query: &Query, out: &mut [u8]) -> Answer {
        if self.forward && forwardable(query.qtype) {
            self.counters.forwarded += 1;
            return Answer::Forward;
        }
        reply(&mut self.counters, out, query, Rcode::Refused, None)
    }

    /// A message that is not a query we answer: FORMERR (NOTIMP for another opcode) if
    /// its header can be read and it is not itself a response, else dropped.
    fn malformed(&mut self, message: &[u8], error: dns::Error, out: &mut [u8]) -> Answer {
        let rcode = match error {
            dns::Error::Header | dns::Error::Response => None,
            dns::Error::Opcode(_) => Some(Rcode::NotImp),
            _ => Some(Rcode::FormErr),
        };
        let header = Header::parse(message);
        let written = rcode
            .zip(header)
            .and_then(|(rcode, header)| dns::error(out, &header, rcode));
        match written {
            Some(len) => {
                self.counters.formerr += 1;
                Answer::Reply(len)
            }
            None => {
                self.counters.dropped += 1;
                Answer::Drop
            }
        }
    }
}

/// Whether a question of type `qtype` may go to the DNS server: not OPT (a pseudo-record,
/// never asked for), not zone transfers nor the obsolete mail meta types (251 to 254),
/// which are answered with streams of messages or not at all: a forwarded query gets
/// one reply.
fn forwardable(qtype: u16) -> bool {
    qtype != dns::TYPE_OPT && !(dns::TYPE_IXFR..dns::TYPE_ANY).contains(&qtype)
}

/// Writes a reply into `out` and counts it; dropped (and counted) if `out` cannot hold
/// its question.
fn reply(
    counters: &mut DnsCounters,
    out: &mut [u8],
    query: &Query,
    rcode: Rcode,
    record: Option<Record>,
) -> Answer {
    let Some(len) = dns::reply(out, query, rcode, record) else {
        counters.dropped += 1;
        return Answer::Drop;
    };
    *match rcode {
        Rcode::NoError | Rcode::NxDomain => &mut counters.answered,
        Rcode::Refused => &mut counters.refused,
        Rcode::ServFail => &mut counters.servfail,
        Rcode::FormErr | Rcode::NotImp => &mut counters.formerr,
    } += 1;
    Answer::Reply(len)
}

#[cfg(test)]
mod tests;
