//! Requests encoded: a message builder, and the address, route, rule and dump messages.

use std::net::IpAddr;

use super::{
    FIB_RULE_INVERT, FIXED, FR_ACT_TO_TBL, FRA_DST, FRA_IIFNAME, FRA_PRIORITY, FRA_PROTOCOL,
    FRA_SRC, FRA_SUPPRESS_PREFIXLEN, FRA_TABLE, FRA_UID_RANGE, Family, IFA_ADDRESS, IFA_LOCAL,
    IFADDRMSG, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, RT_SCOPE_LINK,
    RTA_OIF, RTA_TABLE, RTM_GETRULE, RTM_NEWADDR, RTM_NEWROUTE, RTM_NEWRULE, RTN_UNICAST, Rule,
};
use crate::wire::Cidr;

/// A netlink message under construction: header, fixed part, then attributes.
pub(super) struct Message(Vec<u8>);

impl Message {
    pub(super) fn new(kind: u16, flags: u16, seq: u32, fixed: &[u8]) -> Message {
        let mut buf = Vec::with_capacity(96);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(fixed);
        Message(buf)
    }

    pub(super) fn attr(mut self, kind: u16, value: &[u8]) -> Message {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

pub(super) fn octets(addr: IpAddr) -> Vec<u8> {
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
pub(super) fn new_default_route(
    seq: u32,
    family: Family,
    table: u32,
    ifindex: u32,
    protocol: u8,
) -> Vec<u8> {
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
pub(super) fn new_address(seq: u32, ifindex: u32, cidr: Cidr) -> Vec<u8> {
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
pub(super) fn rule_message(kind: u16, seq: u32, rule: &Rule) -> Vec<u8> {
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
    if let Some(iif) = &rule.iif {
        // NUL-terminated, as the kernel's nla_strscpy expects.
        let mut name = iif.as_bytes().to_vec();
        name.push(0);
        message = message.attr(FRA_IIFNAME, &name);
    }
    if let Some((first, last)) = rule.uids {
        let mut range = first.to_ne_bytes().to_vec();
        range.extend_from_slice(&last.to_ne_bytes());
        message = message.attr(FRA_UID_RANGE, &range);
    }
    if let Some(len) = rule.suppress_prefixlen {
        message = message.attr(FRA_SUPPRESS_PREFIXLEN, &u32::from(len).to_ne_bytes());
    }
    message.finish()
}

/// A dump of every rule of both families (AF_UNSPEC).
pub(super) fn dump_rules(seq: u32) -> Vec<u8> {
    Message::new(RTM_GETRULE, NLM_F_DUMP, seq, &[0u8; FIXED]).finish()
}
