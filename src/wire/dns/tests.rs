use super::*;

/// `name` (dotted, "" for the root) in wire form.
pub fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A query for `name` with `qtype`, RD set, with an OPT record if `edns`.
pub fn query(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
    out.extend_from_slice(&wire_name(name));
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    if edns {
        // OPT: 4096-byte payload, DO set, one cookie option of 8 bytes.
        out.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 12, 0, 10, 0, 8]);
        out.extend_from_slice(&[7; 8]);
    }
    out
}

fn text(name: Name) -> Option<String> {
    let mut out = [0u8; MAX_TEXT];
    name.text(&mut out).map(str::to_owned)
}

#[test]
fn parses_a_query_and_its_name() {
    let message = query(0xbeef, "WwW.Example.COM", TYPE_AAAA, false);
    let parsed = Query::parse(&message).unwrap();
    assert_eq!(parsed.header.id, 0xbeef);
    assert!(parsed.header.rd());
    assert_eq!((parsed.qtype, parsed.qclass), (TYPE_AAAA, CLASS_IN));
    assert!(!parsed.edns);
    assert_eq!(text(parsed.name).as_deref(), Some("www.example.com"));
    let labels: Vec<&[u8]> = parsed.name.labels().collect();
    assert_eq!(labels, [&b"WwW"[..], b"Example", b"COM"]);
    let root = query(1, "", TYPE_A, true);
    let parsed = Query::parse(&root).unwrap();
    assert!(parsed.name.is_root() && parsed.edns);
    assert_eq!(text(parsed.name).as_deref(), Some(""));
}

#[test]
fn names_that_are_not_host_names_have_no_text() {
    for bad in [&b"a b"[..], b"a.b", b"\0x", b"caf\xc3\xa9", b"*"] {
        let mut wire = vec![bad.len() as u8];
        wire.extend_from_slice(bad);
        wire.extend_from_slice(&[3, b'c', b'o', b'm', 0]);
        let name = Name::parse(&wire).unwrap();
        assert_eq!(text(name), None, "{bad:?}");
    }
    let name = wire_name("_dmarc.my-host.example");
    assert_eq!(
        text(Name::parse(&name).unwrap()).as_deref(),
        Some("_dmarc.my-host.example")
    );
}

#[test]
fn every_truncation_of_a_query_is_an_error() {
    let message = query(7, "www.example.com", TYPE_A, true);
    assert!(Query::parse(&message).is_ok());
    for len in 0..message.len() {
        let error = Query::parse(&message[..len]).unwrap_err();
        let want = if len < HEADER_LEN {
            Error::Header
        } else {
            Error::Truncated
        };
        assert_eq!(error, want, "cut at {len}");
    }
    let mut longer = message.clone();
    longer.push(0);
    assert_eq!(Query::parse(&longer), Err(Error::Trailing));
}

#[test]
fn pointers_and_reserved_labels_are_refused() {
    // A pointer to itself (a loop), to the header, and after a label.
    for name in [
        &[0xc0, 12][..],
        &[0xc0, 0],
        &[1, b'a', 0xc0, 12],
        &[0x40, 0],
        &[0x80, 0],
    ] {
        let mut message = query(1, "", TYPE_A, false);
        message.truncate(HEADER_LEN);
        message.extend_from_slice(name);
        message.extend_from_slice(&[0, 1, 0, 1]);
        assert_eq!(Query::parse(&message), Err(Error::Label), "{name:?}");
    }
}

#[test]
fn label_and_name_lengths_are_bounded() {
    let label63 = "a".repeat(63);
    let max = [&label63[..], &label63, &label63, &"b".repeat(61)].join(".");
    assert_eq!(wire_name(&max).len(), MAX_NAME);
    let message = query(1, &max, TYPE_A, false);
    let parsed = Query::parse(&message).unwrap();
    assert_eq!(text(parsed.name).unwrap().len(), MAX_TEXT);
    // One byte more on the wire.
    let long = format!("{max}b");
    assert_eq!(
        Query::parse(&query(1, &long, TYPE_A, false)),
        Err(Error::LongName)
    );
    // A label of 64 bytes: its length byte is a reserved label type.
    let label64 = "a".repeat(64);
    assert_eq!(
        Query::parse(&query(1, &label64, TYPE_A, false)),
        Err(Error::Label)
    );
    // A name that runs on forever.
    let mut endless = query(1, "", TYPE_A, false);
    endless.truncate(HEADER_LEN);
    for _ in 0..1000 {
        endless.extend_from_slice(&[1, b'x']);
    }
    assert_eq!(Query::parse(&endless), Err(Error::LongName));
}

#[test]
fn header_counts_other_than_one_question_are_refused() {
    let message = query(1, "example.com", TYPE_A, false);
    let with = |at: usize, value: u16| {
        let mut m = message.clone();
        m[at..at + 2].copy_from_slice(&value.to_be_bytes());
        Query::parse(&m).map(|_| ())
    };
    assert_eq!(with(4, 0), Err(Error::Questions(0)));
    assert_eq!(with(4, 1000), Err(Error::Questions(1000)));
    assert_eq!(with(6, 1), Err(Error::Records));
    assert_eq!(with(8, 1), Err(Error::Records));
    assert_eq!(with(10, 2), Err(Error::Additional));
    // An additional record that is not OPT, then one OPT with a name.
    let mut m = message.clone();
    m[11] = 1;
    m.extend_from_slice(&[0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4]);
    assert_eq!(Query::parse(&m), Err(Error::Additional));
    let mut m = message.clone();
    m[11] = 1;
    m.extend_from_slice(&[1, b'a', 0, 0, 41, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(Query::parse(&m), Err(Error::Additional));
    assert_eq!(with(2, 0x8100), Err(Error::Response));
    assert_eq!(with(2, 0x2100), Err(Error::Opcode(4)));
}

#[test]
fn reverse_names_give_their_addresses() {
    let reverse = |name: &str| Name::parse(&wire_name(name)).unwrap().reverse();
    assert_eq!(
        reverse("5.0.18.198.in-addr.arpa"),
        Some("198.18.0.5".parse().unwrap())
    );
    assert_eq!(
        reverse("5.0.18.198.IN-ADDR.Arpa"),
        Some("198.18.0.5".parse().unwrap())
    );
    let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa";
    assert_eq!(reverse(v6), Some("2001:db8::1".parse().unwrap()));
    for bad in [
        "18.198.in-addr.arpa",
        "1.5.0.18.198.in-addr.arpa",
        "05.0.18.198.in-addr.arpa",
        "256.0.18.198.in-addr.arpa",
        "x.0.18.198.in-addr.arpa",
        "5.0.18.198.in-addr.arpa.com",
        "5.0.18.198.ip6.arpa",
        "10.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
        "g.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
        "example.com",
        "",
    ] {
        assert_eq!(reverse(bad), None, "{bad}");
    }
}

/// An answer record's type, TTL and rdata.
type Answered = (u16, u32, Vec<u8>);

/// The records of a reply, parsed back: (header, question bytes, answers as (type, ttl,
/// rdata), whether an OPT record ends it).
fn parse_reply(reply: &[u8]) -> (Header, Vec<u8>, Vec<Answered>, bool) {
    let header = Header::parse(reply).unwrap();
    assert!(header.is_response());
    let mut at = HEADER_LEN;
    let mut question = Vec::new();
    if header.qdcount == 1 {
        let name = Name::parse(&reply[at..]).unwrap();
        let end = at + name.wire().len() + 4;
        question = reply[at..end].to_vec();
        at = end;
    }
    let mut answers = Vec::new();
    for _ in 0..header.ancount {
        assert_eq!(reply[at..at + 2], QUESTION_POINTER);
        let kind = u16_at(reply, at + 2).unwrap();
        assert_eq!(u16_at(reply, at + 4), Some(CLASS_IN));
        let ttl = u32::from_be_bytes(reply[at + 6..at + 10].try_into().unwrap());
        let len = usize::from(u16_at(reply, at + 10).unwrap());
        answers.push((kind, ttl, reply[at + 12..at + 12 + len].to_vec()));
        at += 12 + len;
    }
    let opt = header.arcount == 1;
    if opt {
        assert_eq!(reply[at..at + 11], OPT_RECORD);
        at += 11;
    }
    assert_eq!(at, reply.len(), "nothing after the records");
    (header, question, answers, opt)
}

#[test]
fn replies_echo_the_question_and_carry_one_record() {
    let message = query(0x1234, "Mixed.Case.example", TYPE_A, false);
    let parsed = Query::parse(&message).unwrap();
    let mut out = [0u8; UDP_MAX];
    let record = Record {
        ttl: 1,
        data: Rdata::A(Ipv4Addr::new(198, 18, 0, 5)),
    };
    let len = reply(&mut out, &parsed, Rcode::NoError, Some(record)).unwrap();
    let (header, question, answers, opt) = parse_reply(&out[..len]);
    assert_eq!(header.id, 0x1234);
    assert_eq!(header.flags, 0x8180, "QR, RD echoed, RA, NOERROR");
    assert_eq!(
        question,
        message[HEADER_LEN..],
        "the question byte for byte"
    );
    assert_eq!(answers, [(TYPE_A, 1, vec![198, 18, 0, 5])]);
    assert!(!opt);

    let message = query(9, "a.example", TYPE_AAAA, true);
    let parsed = Query::parse(&message).unwrap();
    let addr: Ipv6Addr = "fd00::5".parse().unwrap();
    let record = Record {
        ttl: 7,
        data: Rdata::Aaaa(addr),
    };
    let len = reply(&mut out, &parsed, Rcode::NoError, Some(record)).unwrap();
    let (_, _, answers, opt) = parse_reply(&out[..len]);
    assert_eq!(answers, [(TYPE_AAAA, 7, addr.octets().to_vec())]);
    assert!(opt, "EDNS answered with EDNS");

    let message = query(9, "5.0.18.198.in-addr.arpa", TYPE_PTR, false);
    let parsed = Query::parse(&message).unwrap();
    let record = Record {
        ttl: 1,
        data: Rdata::Ptr("www.example.com"),
    };
    let len = reply(&mut out, &parsed, Rcode::NoError, Some(record)).unwrap();
    let (_, _, answers, _) = parse_reply(&out[..len]);
    assert_eq!(answers, [(TYPE_PTR, 1, wire_name("www.example.com"))]);

    let len = reply(&mut out, &parsed, Rcode::Refused, None).unwrap();
    let (header, _, answers, _) = parse_reply(&out[..len]);
    assert_eq!((header.rcode(), answers.len()), (5, 0));
}

#[test]
fn a_reply_too_big_for_the_buffer_is_truncated_or_not_written() {
    let message = query(3, "www.example.com", TYPE_A, true);
    let parsed = Query::parse(&message).unwrap();
    let record = Record {
        ttl: 1,
        data: Rdata::A(Ipv4Addr::new(198, 18, 0, 5)),
    };
    let question_end = message.len() - 23;
    let full = question_end + 16 + 11;
    let mut out = vec![0u8; full];
    assert_eq!(
        reply(&mut out, &parsed, Rcode::NoError, Some(record)),
        Some(full)
    );
    for size in 0..full {
        let mut out = vec![0u8; size];
        match reply(&mut out, &parsed, Rcode::NoError, Some(record)) {
            None => assert!(size < question_end, "{size}"),
            Some(len) => {
                assert!(len <= size);
                let (header, question, answers, _) = parse_reply(&out[..len]);
                // The answer, else TC; the OPT record only if it fits too.
                assert_eq!(header.tc(), answers.is_empty(), "{size}");
                assert_eq!(answers.is_empty(), size < question_end + 16, "{size}");
                assert_eq!(question, message[HEADER_LEN..question_end]);
            }
        }
    }
    // A PTR name that is not one is not written.
    let record = Record {
        ttl: 1,
        data: Rdata::Ptr("a..b"),
    };
    let len = reply(&mut out, &parsed, Rcode::NoError, Some(record)).unwrap();
    assert!(Header::parse(&out[..len]).unwrap().tc());
}

#[test]
fn errors_answer_the_header_alone() {
    let header = Header::parse(&[0xab, 0xcd, 0x01, 0x00, 0, 9, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut out = [0u8; 12];
    assert_eq!(error(&mut out, &header, Rcode::FormErr), Some(12));
    assert_eq!(out, [0xab, 0xcd, 0x81, 0x81, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(error(&mut out[..11], &header, Rcode::FormErr), None);
}

#[test]
fn the_udp_size_is_512_without_edns_and_at_least_512_with_it() {
    let plain = query(1, "example.com", TYPE_A, false);
    assert_eq!(Query::parse(&plain).unwrap().udp_size, 512);
    let mut edns = query(1, "example.com", TYPE_A, true);
    assert_eq!(Query::parse(&edns).unwrap().udp_size, 4096);
    let size_at = plain.len() + 3;
    edns[size_at..size_at + 2].copy_from_slice(&100u16.to_be_bytes());
    assert_eq!(Query::parse(&edns).unwrap().udp_size, 512);
}

#[test]
fn a_long_reply_is_cut_to_its_question_with_tc() {
    // A server's reply: the question, then records the proxy does not read.
    let mut message = query(0x4242, "example.com", 16, false);
    let question_end = message.len();
    message[2] = 0x81;
    message[3] = 0x80;
    message[7] = 3;
    message.extend_from_slice(&[0xab; 600]);
    let len = message.len();
    assert_eq!(truncate(&mut message, len), Some(len), "fits: unchanged");
    assert_eq!(truncate(&mut message.clone(), question_end - 1), None);
    assert_eq!(truncate(&mut message, 512), Some(question_end));
    let header = Header::parse(&message).unwrap();
    assert_eq!((header.id, header.flags), (0x4242, 0x8380));
    assert_eq!([header.qdcount, header.ancount, header.arcount], [1, 0, 0]);
    // No question, or one that cannot be read.
    let mut none = message.clone();
    none[5] = 0;
    assert_eq!(truncate(&mut none, 20), None);
    let mut pointer = message.clone();
    pointer[HEADER_LEN] = 0xc0;
    assert_eq!(truncate(&mut pointer, 100), None);
    assert_eq!(truncate(&mut [0u8; 11], 10), None);
}
