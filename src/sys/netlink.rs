//! rtnetlink, hand-encoded: the few messages the TUN and policy routing need (add an
//! address, add and delete a rule, add a route, dump the rules) and a bounds-checked
//! reader for the kernel's replies. Which rules to install is `routing`'s business, not
//! this module's.
//!
//! Hand-written on purpose, not netlink-packet-route: see docs/design.md.

use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use nix::libc;
use socket2::{Domain, Protocol, Type};

use crate::wire::Cidr;

const NLMSG_HDR: usize = 16;
/// `struct rtmsg` and `struct fib_rule_hdr` are both 12 bytes.
const FIXED: usize = 12;
/// `struct ifaddrmsg`: family, prefix length, flags, scope, interface index.
const IFADDRMSG: usize = 8;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;
const RTA_OIF: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_TABLE: u16 = 15;
const FRA_DST: u16 = 1;
const FRA_SRC: u16 = 2;
const FRA_PRIORITY: u16 = 6;
const FRA_SUPPRESS_IFGROUP: u16 = 13;
const FRA_SUPPRESS_PREFIXLEN: u16 = 14;
const FRA_TABLE: u16 = 15;
const FRA_PROTOCOL: u16 = 21;
/// The attribute type without the NLA_F_NESTED and NLA_F_NET_BYTEORDER bits.
const NLA_TYPE_MASK: u16 = 0x3fff;
const FIB_RULE_INVERT: u32 = 0x2;
const FR_ACT_TO_TBL: u8 = 1;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
/// Replies come within microseconds; a kernel that stays silent fails the start-up
/// instead of hanging it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Address family of a rule or route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn code(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }

    fn from_code(code: u8) -> Option<Family> {
        match i32::from(code) {
            libc::AF_INET => Some(Family::V4),
            libc::AF_INET6 => Some(Family::V6),
            _ => None,
        }
    }
}

/// A policy rule that looks up a table: `[not] [from SRC] [to DST] lookup TABLE pref
/// PRIORITY proto PROTOCOL`. A `/0` selector is written as `None` (the kernel stores
/// and reports it as absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub family: Family,
    pub priority: u32,
    pub src: Option<Cidr>,
    pub dst: Option<Cidr>,
    /// `not`: inverts the whole selector.
    pub invert: bool,
    pub table: u32,
    pub protocol: u8,
}

/// A netlink message under construction: header, fixed part, then attributes.
struct Message(Vec<u8>);

impl Message {
    fn new(kind: u16, flags: u16, seq: u32, fixed: &[u8]) -> Message {
        let mut buf = Vec::with_capacity(96);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(fixed);
        Message(buf)
    }

    fn attr(mut self, kind: u16, value: &[u8]) -> Message {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The 8-bit table field: the id itself when it fits, else RT_TABLE_UNSPEC and the
/// 32-bit id goes in the TABLE attribute (as iproute2 does).
fn table_byte(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(0)
}

/// `default dev <ifindex> table <table> proto <protocol>`, added only if the table has no
/// default route yet (EEXIST otherwise).
fn new_default_route(seq: u32, family: Family, table: u32, ifindex: u32, protocol: u8) -> Vec<u8> {
    let mut rtmsg = [0u8; FIXED];
    rtmsg[0] = family.code();
    rtmsg[4] = table_byte(table);
    rtmsg[5] = protocol;
    rtmsg[6] = RT_SCOPE_LINK;
    rtmsg[7] = RTN_UNICAST;
    Message::new(
        RTM_NEWROUTE,
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
        &rtmsg,
    )
    .attr(RTA_TABLE, &table.to_ne_bytes())
    .attr(RTA_OIF, &ifindex.to_ne_bytes())
    .finish()
}

/// Adds `cidr` (address and prefix length) to interface `ifindex`, as `ip addr add`
/// does: an IPv4 address joins those already there, where SIOCSIFADDR would replace the
/// primary one. Exclusive: EEXIST if the interface has it already.
fn new_address(seq: u32, ifindex: u32, cidr: Cidr) -> Vec<u8> {
    let mut ifaddrmsg = [0u8; IFADDRMSG];
    ifaddrmsg[0] = Family::of(cidr.addr).code();
    ifaddrmsg[1] = cidr.prefix;
    // Flags 0 and scope 0 (global), as for an address added by hand.
    ifaddrmsg[4..].copy_from_slice(&ifindex.to_ne_bytes());
    let addr = octets(cidr.addr);
    // LOCAL and ADDRESS equal: ADDRESS would otherwise name a point-to-point peer (the
    // TUN is one) instead of our address with its prefix route.
    Message::new(
        RTM_NEWADDR,
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
        &ifaddrmsg,
    )
    .attr(IFA_LOCAL, &addr)
    .attr(IFA_ADDRESS, &addr)
    .finish()
}

/// RTM_NEWRULE or RTM_DELRULE for `rule`. Adds are exclusive: without NLM_F_EXCL the
/// kernel silently adds a second identical rule. Every field is sent on deletes too, so
/// the kernel deletes exactly this rule and not the first one at its priority.
fn rule_message(kind: u16, seq: u32, rule: &Rule) -> Vec<u8> {
    let selector = |cidr: Option<Cidr>| cidr.filter(|c| c.prefix > 0);
    let (src, dst) = (selector(rule.src), selector(rule.dst));
    let mut hdr = [0u8; FIXED];
    hdr[0] = rule.family.code();
    hdr[1] = dst.map_or(0, |c| c.prefix);
    hdr[2] = src.map_or(0, |c| c.prefix);
    hdr[4] = table_byte(rule.table);
    hdr[7] = FR_ACT_TO_TBL;
    if rule.invert {
        hdr[8..12].copy_from_slice(&FIB_RULE_INVERT.to_ne_bytes());
    }
    let flags = match kind {
        RTM_NEWRULE => NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        _ => NLM_F_ACK,
    };
    let mut message = Message::new(kind, flags, seq, &hdr)
        .attr(FRA_PRIORITY, &rule.priority.to_ne_bytes())
        .attr(FRA_TABLE, &rule.table.to_ne_bytes())
        .attr(FRA_PROTOCOL, &[rule.protocol]);
    if let Some(src) = src {
        message = message.attr(FRA_SRC, &octets(src.addr));
    }
    if let Some(dst) = dst {
        message = message.attr(FRA_DST, &octets(dst.addr));
    }
    message.finish()
}

/// A dump of every rule of both families (AF_UNSPEC).
fn dump_rules(seq: u32) -> Vec<u8> {
    Message::new(RTM_GETRULE, NLM_F_DUMP, seq, &[0u8; FIXED]).finish()
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed rtnetlink reply: {what}"),
    )
}

/// One message of a reply: its type, sequence number and payload.
#[derive(Debug, PartialEq, Eq)]
struct Reply<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits a datagram from the kernel into its messages, checking every length.
fn replies(mut buf: &[u8]) -> impl Iterator<Item = io::Result<Reply<'_>>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        let header = buf.get(..NLMSG_HDR);
        let len = header.map_or(0, |h| u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize);
        let Some(message) = buf.get(..len).filter(|_| len >= NLMSG_HDR) else {
            buf = &[];
            return Some(Err(malformed("bad message length")));
        };
        let reply = Reply {
            kind: u16::from_ne_bytes([message[4], message[5]]),
            seq: u32::from_ne_bytes([message[8], message[9], message[10], message[11]]),
            payload: &message[NLMSG_HDR..],
        };
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some(Ok(reply))
    })
}

/// The attributes after a message's fixed part, as (type, value); `None` when one of
/// them runs past the end.
fn attributes(mut buf: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let header = buf.get(..4)?;
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        if len < 4 {
            return None;
        }
        out.push((kind, buf.get(4..len)?));
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Some(out)
}

fn u32_value(value: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(value.try_into().ok()?))
}

fn address(family: Family, value: &[u8]) -> Option<IpAddr> {
    match family {
        Family::V4 => <[u8; 4]>::try_from(value)
            .ok()
            .map(|a| Ipv4Addr::from(a).into()),
        Family::V6 => <[u8; 16]>::try_from(value)
            .ok()
            .map(|a| Ipv6Addr::from(a).into()),
    }
}

/// A rule from a dump, or `None` when it is anything `Rule` cannot describe exactly
/// (another action, an interface, mark, port or uid selector, a malformed attribute):
/// such a rule is never ours, so the caller never deletes it.
fn parse_rule(payload: &[u8]) -> Option<Rule> {
    let hdr = payload.get(..FIXED)?;
    let family = Family::from_code(hdr[0])?;
    let (dst_len, src_len, tos, action) = (hdr[1], hdr[2], hdr[3], hdr[7]);
    let flags = u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    if tos != 0 || action != FR_ACT_TO_TBL || flags & !FIB_RULE_INVERT != 0 {
        return None;
    }
    let mut rule = Rule {
        family,
        priority: 0,
        src: None,
        dst: None,
        invert: flags & FIB_RULE_INVERT != 0,
        table: u32::from(hdr[4]),
        protocol: 0,
    };
    for (kind, value) in attributes(&payload[FIXED..])? {
        match kind {
            FRA_PRIORITY => rule.priority = u32_value(value)?,
            FRA_TABLE => rule.table = u32_value(value)?,
            FRA_PROTOCOL => rule.protocol = *value.first()?,
            FRA_SRC => {
                rule.src = Some(Cidr {
                    addr: address(family, value)?,
                    prefix: src_len,
                })
            }
            FRA_DST => {
                rule.dst = Some(Cidr {
                    addr: address(family, value)?,
                    prefix: dst_len,
                })
            }
            // Reported on every rule; u32::MAX (-1) means unset.
            FRA_SUPPRESS_PREFIXLEN | FRA_SUPPRESS_IFGROUP if u32_value(value)? == u32::MAX => {}
            _ => return None,
        }
    }
    // A prefix length without its address (or the reverse) is not a rule we wrote.
    let consistent = |cidr: Option<Cidr>, len: u8| cidr.map_or(0, |c| c.prefix) == len;
    (consistent(rule.src, src_len) && consistent(rule.dst, dst_len)).then_some(rule)
}

/// A NETLINK_ROUTE socket for one request at a time.
pub struct Socket {
    socket: socket2::Socket,
    seq: u32,
}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        let socket = socket2::Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::RAW.cloexec(),
            Some(Protocol::from(libc::NETLINK_ROUTE)),
        )?;
        socket.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Socket { socket, seq: 0 })
    }

    /// Adds `cidr` to interface `ifindex`; EEXIST if it has that address already.
    pub fn add_address(&mut self, ifindex: u32, cidr: Cidr) -> io::Result<()> {
        let seq = self.next_seq();
        self.call(seq, &new_address(seq, ifindex, cidr), |_| {})
    }

    /// Adds `default dev <ifindex>` to `table`; EEXIST if the table already has one.
    pub fn add_default_route(
        &mut self,
        family: Family,
        table: u32,
        ifindex: u32,
        protocol: u8,
    ) -> io::Result<()> {
        let seq = self.next_seq();
        self.call(
            seq,
            &new_default_route(seq, family, table, ifindex, protocol),
            |_| {},
        )
    }

    /// Adds `rule`; EEXIST if an identical one exists.
    pub fn add_rule(&mut self, rule: &Rule) -> io::Result<()> {
        let seq = self.next_seq();
        self.call(seq, &rule_message(RTM_NEWRULE, seq, rule), |_| {})
    }

    /// Deletes exactly `rule`; ENOENT if there is none.
    pub fn delete_rule(&mut self, rule: &Rule) -> io::Result<()> {
        let seq = self.next_seq();
        self.call(seq, &rule_message(RTM_DELRULE, seq, rule), |_| {})
    }

    /// Every rule of both families that `Rule` can describe exactly.
    pub fn rules(&mut self) -> io::Result<Vec<Rule>> {
        let seq = self.next_seq();
        let mut rules = Vec::new();
        self.call(seq, &dump_rules(seq), |reply| {
            if reply.kind == RTM_NEWRULE {
                rules.extend(parse_rule(reply.payload));
            }
        })?;
        Ok(rules)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `message` (sequence number `seq`) and reads replies until its acknowledgement (or the end of a
    /// dump), handing every data message to `on_data`.
    fn call(
        &mut self,
        seq: u32,
        message: &[u8],
        mut on_data: impl FnMut(&Reply),
    ) -> io::Result<()> {
        self.socket.send(message)?;
        // Large enough for any datagram the kernel sends (it sizes dumps to a page or
        // two); a truncated one would fail the length checks.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let len = (&self.socket).read(&mut buf)?;
            for reply in replies(&buf[..len]) {
                let reply = reply?;
                if reply.seq != seq {
                    continue;
                }
                match reply.kind {
                    NLMSG_ERROR | NLMSG_DONE => return status(&reply),
                    _ => on_data(&reply),
                }
            }
        }
    }
}

/// The errno an NLMSG_ERROR (0: success) or NLMSG_DONE (a failed dump) carries.
fn status(reply: &Reply) -> io::Result<()> {
    let code = reply
        .payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match code {
        Some(0) => Ok(()),
        Some(code) if code < 0 => Err(io::Error::from_raw_os_error(-code)),
        _ if reply.kind == NLMSG_DONE => Ok(()),
        _ => Err(malformed("bad error code")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        Cidr::network(text).unwrap()
    }

    fn rule(src: Option<&str>, dst: Option<&str>, invert: bool) -> Rule {
        let addr = src.or(dst).map(|t| cidr(t).addr);
        Rule {
            family: addr.map_or(Family::V4, Family::of),
            priority: 30063,
            src: src.map(cidr),
            dst: dst.map(cidr),
            invert,
            table: 30064,
            protocol: 117,
        }
    }

    /// The payload (fixed part and attributes) of a message built here.
    fn payload(message: &[u8]) -> &[u8] {
        &message[NLMSG_HDR..]
    }

    /// The header of a request that creates something and fails if it exists.
    fn assert_exclusive_add(message: &[u8], kind: u16, seq: u32) {
        assert_eq!(
            u32::from_ne_bytes(message[..4].try_into().unwrap()) as usize,
            message.len()
        );
        assert_eq!(u16::from_ne_bytes([message[4], message[5]]), kind);
        assert_eq!(
            u16::from_ne_bytes([message[6], message[7]]),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(u32::from_ne_bytes(message[8..12].try_into().unwrap()), seq);
    }

    #[test]
    fn rule_messages_carry_every_field() {
        let from = rule(Some("198.18.0.1/32"), None, false);
        let message = rule_message(RTM_NEWRULE, 7, &from);
        assert_exclusive_add(&message, RTM_NEWRULE, 7);
        let p = payload(&message);
        assert_eq!(&p[..FIXED], &[2, 0, 32, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
        let attrs = attributes(&p[FIXED..]).unwrap();
        assert_eq!(
            attrs,
            vec![
                (FRA_PRIORITY, &30063u32.to_ne_bytes()[..]),
                (FRA_TABLE, &30064u32.to_ne_bytes()[..]),
                (FRA_PROTOCOL, &[117][..]),
                (FRA_SRC, &[198, 18, 0, 1][..]),
            ]
        );
        // Attributes are padded to 4 bytes: the 1-byte protocol takes 8.
        assert_eq!(message.len(), NLMSG_HDR + FIXED + 8 + 8 + 8 + 8);
    }

    #[test]
    fn inverted_and_ipv6_rules() {
        let not_from = rule(Some("0.0.0.0/32"), None, true);
        let p = rule_message(RTM_DELRULE, 1, &not_from);
        assert_eq!(u16::from_ne_bytes([p[6], p[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(payload(&p)[8..12], FIB_RULE_INVERT.to_ne_bytes());
        assert_eq!(payload(&p)[2], 32);
        let half = rule(Some("8000::/1"), None, false);
        let message = rule_message(RTM_NEWRULE, 1, &half);
        let p = payload(&message);
        assert_eq!((p[0], p[1], p[2]), (libc::AF_INET6 as u8, 0, 1));
        let attrs = attributes(&p[FIXED..]).unwrap();
        let src = Ipv6Addr::from(0x8000u128 << 112).octets();
        assert_eq!(attrs[3], (FRA_SRC, &src[..]));
    }

    #[test]
    fn everything_rule_has_no_destination_attribute() {
        let everything = rule(None, Some("::/0"), false);
        let message = rule_message(RTM_NEWRULE, 1, &everything);
        assert_eq!(payload(&message)[1], 0);
        assert_eq!(message.len(), NLMSG_HDR + FIXED + 8 + 8 + 8);
        assert_eq!(
            parse_rule(payload(&message)),
            Some(Rule {
                dst: None,
                ..everything
            })
        );
    }

    #[test]
    fn large_table_ids_go_in_the_attribute() {
        let mut big = rule(None, Some("10.0.0.0/8"), false);
        big.table = 100_000;
        let message = rule_message(RTM_NEWRULE, 1, &big);
        assert_eq!(payload(&message)[4], 0);
        assert_eq!(parse_rule(payload(&message)), Some(big));
        let route = new_default_route(3, Family::V6, 30064, 9, 117);
        let p = payload(&route);
        assert_eq!(&p[..8], &[libc::AF_INET6 as u8, 0, 0, 0, 0, 117, 253, 1]);
        let attrs = attributes(&p[FIXED..]).unwrap();
        assert_eq!(
            attrs,
            vec![
                (RTA_TABLE, &30064u32.to_ne_bytes()[..]),
                (RTA_OIF, &9u32.to_ne_bytes()[..])
            ]
        );
        assert_eq!(
            u16::from_ne_bytes([route[6], route[7]]),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
    }

    #[test]
    fn address_messages_name_the_address_twice() {
        for (text, family, len) in [
            ("198.18.0.5/30", libc::AF_INET, 4),
            ("fd7a:7072:7879::1/64", libc::AF_INET6, 16),
        ] {
            let cidr: Cidr = text.parse().unwrap();
            let message = new_address(3, 9, cidr);
            assert_exclusive_add(&message, RTM_NEWADDR, 3);
            let p = payload(&message);
            assert_eq!(&p[..4], &[family as u8, cidr.prefix, 0, 0], "{text}");
            assert_eq!(p[4..IFADDRMSG], 9u32.to_ne_bytes());
            let addr = octets(cidr.addr);
            assert_eq!(addr.len(), len);
            assert_eq!(
                attributes(&p[IFADDRMSG..]).unwrap(),
                vec![(IFA_LOCAL, &addr[..]), (IFA_ADDRESS, &addr[..])]
            );
        }
    }

    #[test]
    fn rules_survive_a_round_trip() {
        for r in [
            rule(Some("198.18.0.1/32"), None, false),
            rule(Some("0.0.0.0/32"), None, true),
            rule(Some("::/1"), None, false),
            rule(Some("fd7a:7072:7879::1/128"), None, false),
            rule(None, Some("128.0.0.0/1"), false),
            rule(None, Some("2001:db8::/32"), false),
        ] {
            let message = rule_message(RTM_NEWRULE, 1, &r);
            assert_eq!(parse_rule(payload(&message)), Some(r));
        }
    }

    /// A rule as the kernel dumps it (attributes in its order, suppress_prefixlength -1).
    fn dumped(hdr: [u8; FIXED], attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut message = Message::new(RTM_NEWRULE, 0x2, 1, &hdr);
        for (kind, value) in attrs {
            message = message.attr(*kind, value);
        }
        message.finish()
    }

    #[test]
    fn dumped_rules_as_the_kernel_writes_them() {
        let hdr = [2, 0, 32, 0, 0, 0, 0, 1, 2, 0, 0, 0];
        let message = dumped(
            hdr,
            &[
                (FRA_TABLE, &254u32.to_ne_bytes()),
                (FRA_SUPPRESS_PREFIXLEN, &u32::MAX.to_ne_bytes()),
                (FRA_PROTOCOL, &[117]),
                (FRA_PRIORITY, &30063u32.to_ne_bytes()),
                (FRA_SRC, &[0, 0, 0, 0]),
            ],
        );
        let parsed = parse_rule(payload(&message)).unwrap();
        assert_eq!(
            parsed,
            Rule {
                table: 254,
                ..rule(Some("0.0.0.0/32"), None, true)
            }
        );
        // `from all lookup local` at priority 0: no FRA_PRIORITY, table in the header.
        let local = dumped(
            [2, 0, 0, 0, 255, 0, 0, 1, 0, 0, 0, 0],
            &[(FRA_TABLE, &255u32.to_ne_bytes())],
        );
        let parsed = parse_rule(payload(&local)).unwrap();
        assert_eq!(
            (parsed.priority, parsed.table, parsed.protocol),
            (0, 255, 0)
        );
    }

    #[test]
    fn rules_with_selectors_we_do_not_model_are_not_described() {
        let base = [2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
        let table = (FRA_TABLE, &30064u32.to_ne_bytes()[..]);
        const FRA_IIFNAME: u16 = 3;
        const FRA_FWMARK: u16 = 10;
        for attrs in [
            vec![table, (FRA_IIFNAME, &b"lo\0\0"[..])],
            vec![table, (FRA_FWMARK, &1u32.to_ne_bytes()[..])],
            vec![table, (FRA_SUPPRESS_PREFIXLEN, &0u32.to_ne_bytes()[..])],
        ] {
            assert_eq!(parse_rule(payload(&dumped(base, &attrs))), None);
        }
        let mut goto = base;
        goto[7] = 2; // FR_ACT_GOTO
        assert_eq!(parse_rule(payload(&dumped(goto, &[table]))), None);
        let mut tos = base;
        tos[3] = 0x10;
        assert_eq!(parse_rule(payload(&dumped(tos, &[table]))), None);
        let mut family = base;
        family[0] = 7;
        assert_eq!(parse_rule(payload(&dumped(family, &[table]))), None);
    }

    #[test]
    fn garbled_rules_are_not_described() {
        let good = rule_message(RTM_NEWRULE, 1, &rule(Some("198.18.0.1/32"), None, false));
        let p = payload(&good).to_vec();
        // Every truncation: never a panic, never a different rule.
        for len in 0..p.len() {
            let parsed = parse_rule(&p[..len]);
            assert!(parsed.is_none() || len >= FIXED, "{len}: {parsed:?}");
            if let Some(parsed) = parsed {
                assert_ne!(parsed, rule(Some("198.18.0.1/32"), None, false), "{len}");
            }
        }
        // Every byte flipped: never a panic.
        for i in 0..p.len() {
            for value in [0x00, 0x03, 0x7f, 0xff] {
                let mut bad = p.clone();
                bad[i] = value;
                let _ = parse_rule(&bad);
            }
        }
        // A prefix length without its address.
        let mut no_src = p.clone();
        no_src.truncate(p.len() - 8);
        assert_eq!(parse_rule(&no_src), None);
        // An IPv4 rule with a 16-byte address.
        let v6_addr = dumped(
            [2, 0, 128, 0, 0, 0, 0, 1, 0, 0, 0, 0],
            &[(FRA_SRC, &[0u8; 16])],
        );
        assert_eq!(parse_rule(payload(&v6_addr)), None);
        // An attribute length below its own header.
        let mut tiny = p[..FIXED].to_vec();
        tiny.extend_from_slice(&[2, 0, 6, 0]);
        assert_eq!(parse_rule(&tiny), None);
    }

    #[test]
    fn reply_framing_is_checked() {
        let ack = |seq: u32, code: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&20u32.to_ne_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&code.to_ne_bytes());
            m
        };
        let mut two = ack(4, 0);
        two.extend(ack(5, -libc::EEXIST));
        let parsed: Vec<Reply> = replies(&two).map(Result::unwrap).collect();
        assert_eq!(parsed.len(), 2);
        assert_eq!((parsed[1].kind, parsed[1].seq), (NLMSG_ERROR, 5));
        assert!(status(&parsed[0]).is_ok());
        assert_eq!(
            status(&parsed[1]).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        // Truncated anywhere: an error, then nothing; never a panic.
        for len in 1..two.len() {
            let results: Vec<_> = replies(&two[..len]).collect();
            if len != 20 {
                assert!(results.last().unwrap().is_err(), "{len}");
            }
        }
        // A length field of 0 or beyond the datagram.
        for bad_len in [0u32, 8, 21, 1 << 20] {
            let mut bad = ack(1, 0);
            bad[..4].copy_from_slice(&bad_len.to_ne_bytes());
            let results: Vec<_> = replies(&bad).collect();
            assert_eq!(results.len(), 1);
            assert!(results[0].is_err());
        }
        // An error message too short for its code.
        let short = Reply {
            kind: NLMSG_ERROR,
            seq: 1,
            payload: &[0, 0],
        };
        assert!(status(&short).is_err());
        let done = Reply {
            kind: NLMSG_DONE,
            seq: 1,
            payload: &[],
        };
        assert!(status(&done).is_ok());
        // A positive error code is no errno; a dump that ends with one failed.
        let positive = Reply {
            kind: NLMSG_ERROR,
            seq: 1,
            payload: &5i32.to_ne_bytes(),
        };
        assert_eq!(
            status(&positive).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let failed_dump = Reply {
            kind: NLMSG_DONE,
            seq: 1,
            payload: &(-libc::EPERM).to_ne_bytes(),
        };
        assert_eq!(
            status(&failed_dump).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
    }

    #[test]
    fn dump_request_asks_for_both_families() {
        let message = dump_rules(9);
        assert_eq!(message.len(), NLMSG_HDR + FIXED);
        assert_eq!(u16::from_ne_bytes([message[4], message[5]]), RTM_GETRULE);
        assert_eq!(
            u16::from_ne_bytes([message[6], message[7]]),
            NLM_F_REQUEST | NLM_F_DUMP
        );
        assert_eq!(payload(&message)[0], 0); // AF_UNSPEC
    }
}
