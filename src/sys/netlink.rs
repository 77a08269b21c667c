//! Policy routing through rtnetlink: the rules and routes that send chosen destinations
//! into the TUN, added at start-up and removed again at exit.

use std::io::{self, Read};
use std::net::IpAddr;

use nix::libc;
use socket2::{Domain, Protocol, Socket, Type};

use crate::wire::Cidr;

const NLMSG_HDR: usize = 16;
const RTMSG: usize = 12; // struct rtmsg and struct fib_rule_hdr have the same size
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FRA_DST: u16 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;
const RT_SCOPE_LINK: u8 = 253;
const RTPROT_STATIC: u8 = 4;
const RTN_UNICAST: u8 = 1;
const FR_ACT_TO_TBL: u8 = 1;

/// A netlink message under construction: header, fixed part, then attributes.
struct Message(Vec<u8>);

impl Message {
    fn new(kind: u16, flags: u16, fixed: [u8; RTMSG]) -> Message {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&fixed);
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

fn family_of(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
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

/// `default dev <ifindex> table <table>` for `family`.
fn default_route(family: u8, ifindex: u32, table: u32) -> Vec<u8> {
    let mut rtmsg = [0u8; RTMSG];
    rtmsg[0] = family;
    rtmsg[4] = table_byte(table);
    rtmsg[5] = RTPROT_STATIC;
    rtmsg[6] = RT_SCOPE_LINK;
    rtmsg[7] = RTN_UNICAST;
    Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, rtmsg)
        .attr(RTA_TABLE, &table.to_ne_bytes())
        .attr(RTA_OIF, &ifindex.to_ne_bytes())
        .finish()
}

/// `to <cidr> table <table> priority <priority>`, to add or to delete.
fn rule(kind: u16, cidr: &Cidr, table: u32, priority: u32) -> Vec<u8> {
    let mut hdr = [0u8; RTMSG];
    hdr[0] = family_of(cidr.addr);
    hdr[1] = cidr.prefix; // dst_len
    hdr[4] = table_byte(table);
    hdr[7] = FR_ACT_TO_TBL;
    let flags = if kind == RTM_NEWRULE {
        NLM_F_CREATE | NLM_F_EXCL
    } else {
        0
    };
    let mut message = Message::new(kind, flags, hdr);
    if cidr.prefix > 0 {
        message = message.attr(FRA_DST, &octets(cidr.addr));
    }
    message
        .attr(FRA_TABLE, &table.to_ne_bytes())
        .attr(FRA_PRIORITY, &priority.to_ne_bytes())
        .finish()
}

/// Sends one request and waits for the kernel's acknowledgement.
fn request(socket: &Socket, message: &[u8]) -> io::Result<()> {
    socket.send(message)?;
    let mut bytes = [0u8; 4096];
    let len = (&*socket).read(&mut bytes)?;
    let bytes = &bytes[..len];
    if bytes.len() < NLMSG_HDR + 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short netlink reply",
        ));
    }
    let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
    const NLMSG_ERROR: u16 = 2;
    if kind != NLMSG_ERROR {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected netlink reply",
        ));
    }
    let code = i32::from_ne_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-code))
    }
}

/// Rules this process installed; deleted again on drop (the routes in the table go away
/// with the TUN device).
pub struct Routes {
    socket: Socket,
    rules: Vec<Cidr>,
    table: u32,
    priority: u32,
}

impl Routes {
    /// Routes every destination in `cidrs` into interface `ifindex` through `table`.
    /// On failure nothing stays installed.
    pub fn install(cidrs: &[Cidr], ifindex: u32, table: u32, priority: u32) -> io::Result<Routes> {
        let socket = Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::RAW.cloexec(),
            Some(Protocol::from(libc::NETLINK_ROUTE)),
        )?;
        let mut routes = Routes {
            socket,
            rules: Vec::new(),
            table,
            priority,
        };
        let mut families: Vec<u8> = cidrs.iter().map(|c| family_of(c.addr)).collect();
        families.sort_unstable();
        families.dedup();
        for family in families {
            request(&routes.socket, &default_route(family, ifindex, table))?;
        }
        for cidr in cidrs {
            match request(&routes.socket, &rule(RTM_NEWRULE, cidr, table, priority)) {
                // Left by an earlier run that was killed before it could clean up: the
                // same rule, ours to remove at exit.
                Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
                result => result?,
            }
            routes.rules.push(*cidr);
        }
        Ok(routes)
    }
}

impl Drop for Routes {
    fn drop(&mut self) {
        for cidr in self.rules.drain(..) {
            let _ = request(
                &self.socket,
                &rule(RTM_DELRULE, &cidr, self.table, self.priority),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_length_prefixed_and_aligned() {
        let cidr: Cidr = "10.1.2.0/24".parse().unwrap();
        let message = rule(RTM_NEWRULE, &cidr, 200, 1000);
        assert_eq!(
            u32::from_ne_bytes(message[..4].try_into().unwrap()) as usize,
            message.len()
        );
        assert_eq!(message.len() % 4, 0);
        assert_eq!(message[NLMSG_HDR], libc::AF_INET as u8);
        assert_eq!(message[NLMSG_HDR + 1], 24);
        let route = default_route(libc::AF_INET6 as u8, 7, 200);
        assert_eq!(route.len(), NLMSG_HDR + RTMSG + 8 + 8);
    }

    #[test]
    fn default_rule_has_no_destination() {
        let cidr = Cidr::network("::/0").unwrap();
        let message = rule(RTM_NEWRULE, &cidr, 200, 1000);
        assert_eq!(message.len(), NLMSG_HDR + RTMSG + 8 + 8);
    }
}
