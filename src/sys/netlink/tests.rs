//! Messages built here read back by the reply parser, and replies garbled every way.

use std::net::Ipv6Addr;

use super::reply::attributes;
use super::request::{Message, octets};
use super::*;

fn cidr(text: &str) -> Cidr {
    Cidr::network(text).unwrap()
}

fn rule(src: Option<&str>, dst: Option<&str>, invert: bool) -> Rule {
    let addr = src.or(dst).map(|t| cidr(t).addr);
    Rule {
        src: src.map(cidr),
        dst: dst.map(cidr),
        invert,
        ..Rule::new(addr.map_or(Family::V4, Family::of), 30063, 30064, 117)
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
        Rule {
            iif: Some("br-lan".into()),
            suppress_prefixlen: Some(0),
            table: 254,
            ..rule(None, None, false)
        },
        Rule {
            iif: Some("lan.10".into()),
            ..rule(None, Some("fd00::/8"), false)
        },
        Rule {
            uids: Some((1000, 1999)),
            ..rule(None, Some("0.0.0.0/1"), false)
        },
        Rule {
            uids: Some((0, u32::MAX - 1)),
            table: 254,
            ..rule(None, None, false)
        },
    ] {
        let message = rule_message(RTM_NEWRULE, 1, &r);
        assert_eq!(parse_rule(payload(&message)), Some(r));
    }
}

#[test]
fn interface_uid_and_suppress_attributes() {
    let r = Rule {
        iif: Some("eth1".into()),
        uids: Some((7, 9)),
        suppress_prefixlen: Some(0),
        ..rule(None, None, false)
    };
    let message = rule_message(RTM_NEWRULE, 1, &r);
    let attrs = attributes(&payload(&message)[FIXED..]).unwrap();
    let mut range = 7u32.to_ne_bytes().to_vec();
    range.extend_from_slice(&9u32.to_ne_bytes());
    assert_eq!(
        attrs[3..],
        [
            (FRA_IIFNAME, &b"eth1\0"[..]),
            (FRA_UID_RANGE, &range[..]),
            (FRA_SUPPRESS_PREFIXLEN, &0u32.to_ne_bytes()[..]),
        ]
    );
    // As the kernel dumps an `iif` rule whose interface is gone: flagged detached, the
    // name padded with NULs; still the same rule, so a leftover can be deleted.
    let detached = dumped(
        [2, 0, 0, 0, 0, 0, 0, 1, 8, 0, 0, 0],
        &[
            (FRA_IIFNAME, &b"eth1\0\0\0"[..]),
            (FRA_TABLE, &30064u32.to_ne_bytes()),
            (FRA_PRIORITY, &30063u32.to_ne_bytes()),
            (FRA_PROTOCOL, &[117]),
            (FRA_UID_RANGE, &range),
            (FRA_SUPPRESS_PREFIXLEN, &0u32.to_ne_bytes()),
        ],
    );
    assert_eq!(parse_rule(payload(&detached)), Some(r));
    // An empty name, a short uid range, a prefix length no address has: not described.
    for attr in [
        (FRA_IIFNAME, &b"\0\0\0\0"[..]),
        (FRA_UID_RANGE, &range[..4]),
        (FRA_SUPPRESS_PREFIXLEN, &300u32.to_ne_bytes()[..]),
    ] {
        let bad = dumped([2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[attr]);
        assert_eq!(parse_rule(payload(&bad)), None, "{attr:?}");
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
    const FRA_FWMARK: u16 = 10;
    const FRA_OIFNAME: u16 = 17;
    for attrs in [
        vec![table, (FRA_OIFNAME, &b"lo\0\0"[..])],
        vec![table, (FRA_FWMARK, &1u32.to_ne_bytes()[..])],
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

#[test]
fn deleted_link_names_the_interface_of_an_rtm_dellink_only() {
    // nlmsghdr (len, type, flags, seq, pid), then ifinfomsg (family, pad, type, index,
    // flags, change); a real notification goes on with attributes.
    let notification = |kind: u16, index: u32| {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&1200u32.to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&[0; 10]);
        bytes.extend_from_slice(&[0, 0, 0xfe, 0xff]);
        bytes.extend_from_slice(&index.to_ne_bytes());
        bytes.extend_from_slice(&[0; 8]);
        bytes
    };
    assert_eq!(deleted_link(&notification(RTM_DELLINK, 7)), Some(7));
    let new_link = 16;
    assert_eq!(deleted_link(&notification(new_link, 7)), None);
    // Cut short before the index: nothing said.
    assert_eq!(deleted_link(&notification(RTM_DELLINK, 7)[..23]), None);
    assert_eq!(deleted_link(&[]), None);
}
