//! Replies decoded with every length checked: framing, status, attributes, dumped rules.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    FIB_RULE_IIF_DETACHED, FIB_RULE_INVERT, FIXED, FR_ACT_TO_TBL, FRA_DST, FRA_IIFNAME,
    FRA_PRIORITY, FRA_PROTOCOL, FRA_SRC, FRA_SUPPRESS_IFGROUP, FRA_SUPPRESS_PREFIXLEN, FRA_TABLE,
    FRA_UID_RANGE, Family, NLA_TYPE_MASK, NLMSG_DONE, NLMSG_HDR, Rule,
};
use crate::wire::Cidr;

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed rtnetlink reply: {what}"),
    )
}

/// One message of a reply: its type, sequence number and payload.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Reply<'a> {
    pub(super) kind: u16,
    pub(super) seq: u32,
    pub(super) payload: &'a [u8],
}

/// Splits a datagram from the kernel into its messages, checking every length.
pub(super) fn replies(mut buf: &[u8]) -> impl Iterator<Item = io::Result<Reply<'_>>> {
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
pub(super) fn attributes(mut buf: &[u8]) -> Option<Vec<(u16, &[u8])>> {
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
/// (another action, an output interface, mark or port selector, a malformed attribute):
/// such a rule is never ours, so the caller never deletes it. An `iif` rule whose
/// interface is gone is described all the same (the kernel flags it detached).
pub(super) fn parse_rule(payload: &[u8]) -> Option<Rule> {
    let hdr = payload.get(..FIXED)?;
    let family = Family::from_code(hdr[0])?;
    let (dst_len, src_len, tos, action) = (hdr[1], hdr[2], hdr[3], hdr[7]);
    let flags = u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    if tos != 0
        || action != FR_ACT_TO_TBL
        || flags & !(FIB_RULE_INVERT | FIB_RULE_IIF_DETACHED) != 0
    {
        return None;
    }
    let mut rule = Rule::new(family, 0, u32::from(hdr[4]), 0);
    rule.invert = flags & FIB_RULE_INVERT != 0;
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
            FRA_IIFNAME => {
                let name = value.split(|&b| b == 0).next().filter(|n| !n.is_empty())?;
                rule.iif = Some(std::str::from_utf8(name).ok()?.to_string());
            }
            FRA_UID_RANGE => {
                let range = <[u8; 8]>::try_from(value).ok()?;
                rule.uids = Some((u32_value(&range[..4])?, u32_value(&range[4..])?));
            }
            // Reported on every rule; u32::MAX (-1) means unset.
            FRA_SUPPRESS_PREFIXLEN | FRA_SUPPRESS_IFGROUP if u32_value(value)? == u32::MAX => {}
            FRA_SUPPRESS_PREFIXLEN => {
                rule.suppress_prefixlen = Some(u8::try_from(u32_value(value)?).ok()?);
            }
            _ => return None,
        }
    }
    // A prefix length without its address (or the reverse) is not a rule we wrote.
    let consistent = |cidr: Option<Cidr>, len: u8| cidr.map_or(0, |c| c.prefix) == len;
    (consistent(rule.src, src_len) && consistent(rule.dst, dst_len)).then_some(rule)
}

/// The errno an NLMSG_ERROR (0: success) or NLMSG_DONE (a failed dump) carries.
pub(super) fn status(reply: &Reply) -> io::Result<()> {
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
