use super::*;
use crate::wire::dns::{HEADER_LEN, Name, UDP_MAX};
use std::net::{Ipv4Addr, Ipv6Addr};

fn config(forward: bool, capacity: usize) -> FakeConfig {
    FakeConfig {
        v4: Ipv4Cidr::new(Ipv4Addr::new(198, 18, 0, 0), 16),
        v6: Some(Ipv6Cidr::new("fd7a:7072:7879:f4::".parse().unwrap(), 64)),
        exclude: vec!["198.18.0.1".parse().unwrap()],
        capacity,
        forward,
    }
}

fn resolver(forward: bool, capacity: usize) -> Resolver {
    Resolver::new(config(forward, capacity)).unwrap()
}

/// A query for `name` with `qtype` (class IN, RD).
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&[0, 1]);
    out
}

/// Asks `resolver`; the reply's RCODE and its one answer's rdata, if any.
fn ask(resolver: &mut Resolver, message: &[u8], now: i64) -> (u8, Option<Vec<u8>>) {
    let mut out = [0u8; UDP_MAX];
    let Answer::Reply(len) = resolver.answer(message, Instant::from_secs(now), &mut out) else {
        panic!("no reply");
    };
    let reply = &out[..len];
    let header = Header::parse(reply).unwrap();
    assert!(header.is_response());
    assert_eq!(header.id, u16::from_be_bytes([message[0], message[1]]));
    if header.qdcount == 0 {
        return (header.rcode(), None);
    }
    let question = Name::parse(&reply[HEADER_LEN..]).unwrap().wire().len() + 4;
    let at = HEADER_LEN + question;
    let rdata = (header.ancount == 1).then(|| reply[at + 12..].to_vec());
    (header.rcode(), rdata)
}

#[test]
fn a_and_aaaa_get_fake_addresses_that_map_back() {
    let mut dns = resolver(false, 100);
    let (rcode, v4) = ask(&mut dns, &query(1, "www.Example.com", dns::TYPE_A), 0);
    assert_eq!(
        (rcode, v4.as_deref()),
        (0, Some(&[198, 18, 0, 2][..])),
        "198.18.0.1 excluded"
    );
    let (_, v6) = ask(&mut dns, &query(2, "WWW.example.com", dns::TYPE_AAAA), 0);
    let v6: [u8; 16] = v6.unwrap().try_into().unwrap();
    let v6 = IpAddr::V6(Ipv6Addr::from(v6));
    assert_eq!(v6, "fd7a:7072:7879:f4::2".parse::<IpAddr>().unwrap());
    assert_eq!(dns.name_of(v6), Some("www.example.com"));
    assert_eq!(
        dns.name_of("198.18.0.2".parse().unwrap()),
        Some("www.example.com")
    );
    assert!(dns.is_fake("198.18.200.1".parse().unwrap()));
    assert!(!dns.is_fake("192.0.2.1".parse().unwrap()));
    let counters = dns.counters();
    assert_eq!((counters.a, counters.aaaa, counters.answered), (1, 1, 2));
    assert_eq!(counters.table_size, 1);
}

#[test]
fn ptr_of_a_fake_address_gives_its_name() {
    let mut dns = resolver(true, 100);
    ask(&mut dns, &query(1, "host.example", dns::TYPE_A), 0);
    let ptr = query(2, "2.0.18.198.in-addr.arpa", dns::TYPE_PTR);
    let (rcode, name) = ask(&mut dns, &ptr, 0);
    assert_eq!(rcode, 0);
    assert_eq!(name.unwrap(), b"\x04host\x07example\0");
    let v6 = "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.4.f.0.0.9.7.8.7.2.7.0.7.a.7.d.f.ip6.arpa";
    let (_, name) = ask(&mut dns, &query(3, v6, dns::TYPE_PTR), 0);
    assert_eq!(name.unwrap(), b"\x04host\x07example\0");
    // A fake address without a name, and one outside the ranges.
    let (rcode, _) = ask(
        &mut dns,
        &query(4, "9.0.18.198.in-addr.arpa", dns::TYPE_PTR),
        0,
    );
    assert_eq!(rcode, Rcode::NxDomain as u8);
    let mut out = [0u8; UDP_MAX];
    let other = query(5, "1.2.0.192.in-addr.arpa", dns::TYPE_PTR);
    assert_eq!(dns.answer(&other, Instant::ZERO, &mut out), Answer::Forward);
    assert_eq!(dns.counters().ptr, 4);
    let mut refusing = resolver(false, 100);
    assert_eq!(ask(&mut refusing, &other, 0).0, Rcode::Refused as u8);
}

#[test]
fn https_and_svcb_get_no_record_and_other_types_are_forwarded_or_refused() {
    let mut dns = resolver(true, 100);
    for qtype in [dns::TYPE_HTTPS, dns::TYPE_SVCB] {
        assert_eq!(ask(&mut dns, &query(1, "example.com", qtype), 0), (0, None));
    }
    let mut out = [0u8; UDP_MAX];
    let mx = query(2, "example.com", 15);
    assert_eq!(dns.answer(&mx, Instant::ZERO, &mut out), Answer::Forward);
    let counters = dns.counters();
    assert_eq!(
        (counters.https_svcb, counters.other, counters.forwarded),
        (2, 1, 1)
    );
    assert_eq!(
        counters.table_size, 0,
        "no address for what is not A or AAAA"
    );
    let mut refusing = resolver(false, 100);
    assert_eq!(ask(&mut refusing, &mx, 0).0, Rcode::Refused as u8);
    // Zone transfers and OPT are not forwarded; ANY is.
    for qtype in [251, 252, 253, 254, dns::TYPE_OPT] {
        let message = query(2, "example.com", qtype);
        assert_eq!(
            ask(&mut dns, &message, 0).0,
            Rcode::Refused as u8,
            "{qtype}"
        );
    }
    let any = query(2, "example.com", dns::TYPE_ANY);
    assert_eq!(dns.answer(&any, Instant::ZERO, &mut out), Answer::Forward);
    // Another class, and names that are not host names.
    let mut chaos = query(3, "version.bind", 16);
    let len = chaos.len();
    chaos[len - 1] = 3;
    assert_eq!(ask(&mut dns, &chaos, 0).0, Rcode::Refused as u8);
    assert_eq!(
        ask(&mut dns, &query(4, "", dns::TYPE_A), 0).0,
        Rcode::Refused as u8
    );
    let mut spaced = query(5, "a_b.example", dns::TYPE_A);
    spaced[HEADER_LEN + 2] = b' ';
    assert_eq!(ask(&mut dns, &spaced, 0).0, Rcode::Refused as u8);
    assert_eq!(dns.counters().refused, 8);
}

#[test]
fn malformed_queries_get_formerr_or_are_dropped() {
    let mut dns = resolver(true, 100);
    let good = query(7, "example.com", dns::TYPE_A);
    let mut out = [0u8; UDP_MAX];
    for len in 0..good.len() {
        if len < HEADER_LEN {
            let answer = dns.answer(&good[..len], Instant::ZERO, &mut out);
            assert_eq!(answer, Answer::Drop);
        } else {
            assert_eq!(ask(&mut dns, &good[..len], 0), (Rcode::FormErr as u8, None));
        }
    }
    // 1000 questions.
    let mut many = good.clone();
    many[4..6].copy_from_slice(&1000u16.to_be_bytes());
    for _ in 1..1000 {
        many.extend_from_slice(&good[HEADER_LEN..]);
    }
    assert_eq!(ask(&mut dns, &many, 0).0, Rcode::FormErr as u8);
    // Another opcode (NOTIFY), and a response.
    let mut notify = good.clone();
    notify[2] = 4 << 3;
    assert_eq!(ask(&mut dns, &notify, 0).0, Rcode::NotImp as u8);
    let mut response = good.clone();
    response[2] |= 0x80;
    assert_eq!(dns.answer(&response, Instant::ZERO, &mut out), Answer::Drop);
    let counters = dns.counters();
    assert_eq!(
        (counters.formerr, counters.dropped),
        (good.len() as u64 - 12 + 2, 13)
    );
    assert_eq!(counters.answered, 0);
}

#[test]
fn a_full_table_answers_servfail() {
    let mut dns = resolver(false, 2);
    for name in ["a.example", "b.example"] {
        assert_eq!(ask(&mut dns, &query(1, name, dns::TYPE_A), 0).0, 0);
    }
    assert!(dns.hold("198.18.0.2".parse().unwrap()));
    let c = query(1, "c.example", dns::TYPE_A);
    assert_eq!(
        ask(&mut dns, &c, 1).0,
        Rcode::ServFail as u8,
        "b used 1 s ago"
    );
    let (rcode, addr) = ask(&mut dns, &c, 2);
    assert_eq!(
        (rcode, addr.as_deref()),
        (0, Some(&[198, 18, 0, 3][..])),
        "b's address"
    );
    assert_eq!(
        ask(&mut dns, &query(1, "d.example", dns::TYPE_A), 10).0,
        Rcode::NoError as u8
    );
    dns.release("198.18.0.2".parse().unwrap());
    let counters = dns.counters();
    assert_eq!(
        (counters.servfail, counters.evictions, counters.table_size),
        (1, 2, 2)
    );
}

#[test]
fn a_buffer_too_small_for_the_question_drops_the_query() {
    let mut dns = resolver(false, 10);
    let message = query(1, "example.com", dns::TYPE_A);
    let mut out = [0u8; 20];
    assert_eq!(dns.answer(&message, Instant::ZERO, &mut out), Answer::Drop);
    assert_eq!(
        dns.answer(&message[..13], Instant::ZERO, &mut out[..11]),
        Answer::Drop
    );
    assert_eq!(dns.counters().dropped, 2);
}

#[test]
fn the_longest_replies_fit_512_bytes() {
    let mut dns = resolver(false, 100);
    let label = "a".repeat(63);
    let longest = [&label[..], &label, &label, &"b".repeat(61)].join(".");
    assert_eq!(longest.len(), MAX_TEXT);
    let with_edns = |mut message: Vec<u8>| {
        message[11] = 1;
        message.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        message
    };
    let mut out = [0u8; UDP_MAX];
    for (qtype, name) in [
        (dns::TYPE_A, longest.clone()),
        (dns::TYPE_AAAA, longest.clone()),
        // The reverse name of the address just given, the longest there is.
        (
            dns::TYPE_PTR,
            "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.4.f.0.0.9.7.8.7.2.7.0.7.a.7.d.f.ip6.arpa".into(),
        ),
    ] {
        let message = with_edns(query(1, &name, qtype));
        let Answer::Reply(len) = dns.answer(&message, Instant::ZERO, &mut out) else {
            panic!("no reply to {qtype}");
        };
        let header = Header::parse(&out[..len]).unwrap();
        assert_eq!((header.rcode(), header.ancount, header.arcount), (0, 1, 1));
        assert!(!header.tc(), "{qtype}: {len} bytes");
    }
    assert_eq!(
        dns.name_of("198.18.0.2".parse().unwrap()),
        Some(longest.as_str())
    );
}

#[test]
fn without_an_ipv6_range_aaaa_gets_no_record() {
    let mut dns = Resolver::new(FakeConfig {
        v6: None,
        ..config(false, 16)
    })
    .unwrap();
    let (rcode, v4) = ask(&mut dns, &query(1, "example.com", dns::TYPE_A), 0);
    assert_eq!((rcode, v4.map(|a| a.len())), (0, Some(4)));
    let aaaa = query(2, "example.com", dns::TYPE_AAAA);
    assert_eq!(ask(&mut dns, &aaaa, 0), (0, None), "NOERROR, no record");
    assert_eq!(dns.counters().aaaa_without_range, 1);
    assert_eq!(resolver(false, 16).counters().aaaa_without_range, 0);
    let mut routed = resolver(false, 16);
    assert!(
        ask(&mut routed, &aaaa, 0).1.is_some(),
        "with a range, an address"
    );
}
