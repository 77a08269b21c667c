//! rtnetlink, hand-encoded: the few messages the TUN and policy routing need (add an
//! address, add and delete a rule, add a route, dump the rules) and a bounds-checked
//! reader for the kernel's replies. Which rules to install is `routing`'s business, not
//! this module's.
//!
//! Hand-written on purpose, not netlink-packet-route: see docs/design.md.

mod reply;
mod request;

use std::io::{self, Read};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::libc;
use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
};
use socket2::{Domain, Protocol, Type};

use crate::wire::Cidr;
use reply::{Reply, parse_rule, replies, status};
use request::{dump_rules, new_address, new_default_route, rule_message};

const NLMSG_HDR: usize = 16;
/// `struct rtmsg` and `struct fib_rule_hdr` are both 12 bytes.
const FIXED: usize = 12;
/// `struct ifaddrmsg`: family, prefix length, flags, scope, interface index.
const IFADDRMSG: usize = 8;
/// Where `struct ifinfomsg` holds the interface index.
const IFINFOMSG_INDEX: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const RTM_DELLINK: u16 = 17;
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
const FRA_IIFNAME: u16 = 3;
const FRA_PRIORITY: u16 = 6;
const FRA_SUPPRESS_IFGROUP: u16 = 13;
const FRA_SUPPRESS_PREFIXLEN: u16 = 14;
const FRA_TABLE: u16 = 15;
const FRA_UID_RANGE: u16 = 20;
const FRA_PROTOCOL: u16 = 21;
/// The attribute type without the NLA_F_NESTED and NLA_F_NET_BYTEORDER bits.
const NLA_TYPE_MASK: u16 = 0x3fff;
const FIB_RULE_INVERT: u32 = 0x2;
/// Reported on an `iif` rule whose interface does not exist (now).
const FIB_RULE_IIF_DETACHED: u32 = 0x8;
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

/// A policy rule that looks up a table: `[not] [from SRC] [to DST] [iif NAME] [uidrange
/// A-B] lookup TABLE [suppress_prefixlength N] pref PRIORITY proto PROTOCOL`. A `/0`
/// selector is written as `None` (the kernel stores and reports it as absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub family: Family,
    pub priority: u32,
    pub src: Option<Cidr>,
    pub dst: Option<Cidr>,
    /// `iif NAME`: only packets that arrived on that interface (forwarded or delivered
    /// to the host), never the host's own.
    pub iif: Option<String>,
    /// `uidrange A-B`: only lookups made for sockets of these users.
    pub uids: Option<(u32, u32)>,
    /// `not`: inverts the whole selector.
    pub invert: bool,
    pub table: u32,
    /// `suppress_prefixlength N`: a route found with a prefix of N bits or fewer is
    /// ignored and the next rule tried.
    pub suppress_prefixlen: Option<u8>,
    pub protocol: u8,
}

impl Rule {
    /// A rule with only a family, priority, table and protocol: every selector empty.
    pub fn new(family: Family, priority: u32, table: u32, protocol: u8) -> Rule {
        Rule {
            family,
            priority,
            src: None,
            dst: None,
            iif: None,
            uids: None,
            invert: false,
            table,
            suppress_prefixlen: None,
            protocol,
        }
    }
}

/// As `ip rule` shows it, without the family and the `proto`: `30061: from all iif br-lan
/// lookup 30064`.
impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.priority)?;
        if self.invert {
            f.write_str(" not")?;
        }
        match self.src {
            Some(src) => write!(f, " from {src}")?,
            None => f.write_str(" from all")?,
        }
        if let Some(dst) = self.dst {
            write!(f, " to {dst}")?;
        }
        if let Some(iif) = &self.iif {
            write!(f, " iif {iif}")?;
        }
        if let Some((first, last)) = self.uids {
            write!(f, " uidrange {first}-{last}")?;
        }
        match self.table {
            254 => f.write_str(" lookup main")?,
            table => write!(f, " lookup {table}")?,
        }
        if let Some(len) = self.suppress_prefixlen {
            write!(f, " suppress_prefixlength {len}")?;
        }
        Ok(())
    }
}

/// A non-blocking NETLINK_ROUTE socket that receives the kernel's link notifications
/// (RTMGRP_LINK: links added, changed, deleted in this network namespace).
pub fn link_events() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkRoute,
    )?;
    bind(
        fd.as_raw_fd(),
        &NetlinkAddr::new(0, libc::RTMGRP_LINK as u32),
    )?;
    Ok(fd)
}

/// The interface a link notification says was deleted (RTM_DELLINK), from the start of
/// the datagram: its netlink header and `struct ifinfomsg` (family, pad, type, index).
/// Link notifications come one per datagram.
pub fn deleted_link(datagram: &[u8]) -> Option<u32> {
    let header = datagram.get(..NLMSG_HDR + IFINFOMSG_INDEX + 4)?;
    let kind = u16::from_ne_bytes([header[4], header[5]]);
    let index = &header[NLMSG_HDR + IFINFOMSG_INDEX..];
    (kind == RTM_DELLINK).then(|| u32::from_ne_bytes([index[0], index[1], index[2], index[3]]))
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

#[cfg(test)]
mod tests;
