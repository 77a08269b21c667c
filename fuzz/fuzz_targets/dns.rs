//! The fake-IP resolver on any bytes: one message as a UDP query, or a TCP stream of
//! length-prefixed messages in any chunking, answered by a small table that fills,
//! evicts and has entries held. Nothing panics; every reply fits the buffer, carries the
//! query's id, parses as a response with the query's question (or none, for a message
//! whose question cannot be read), and every fake address answered maps back to the
//! name asked for.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use smoltcp::time::Instant;
use smoltcp::wire::{Ipv4Cidr, Ipv6Cidr};
use uringproxy::flow::dns::stream::{self, Reassembler};
use uringproxy::flow::dns::{Answer, FakeConfig, Resolver};
use uringproxy::wire::dns::{
    self, HEADER_LEN, Header, MAX_TEXT, Name, Query, Rcode, TYPE_A, TYPE_AAAA, TYPE_PTR,
};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    // A /28 less one excluded address: 13 names, so a stream fills the table.
    let mut resolver = Resolver::new(FakeConfig {
        v4: Ipv4Cidr::new("198.18.0.0".parse().unwrap(), 28),
        v6: Some(Ipv6Cidr::new("fd7a:7072:7879:f4::".parse().unwrap(), 64)),
        exclude: vec!["198.18.0.1".parse().unwrap()],
        capacity: 65_536,
        forward: selector & 2 != 0,
    })
    .unwrap();
    if selector & 1 == 0 {
        let size = [dns::UDP_MAX, 64, 40, 12][usize::from(selector >> 2) % 4];
        answer(&mut resolver, rest, Instant::ZERO, size);
        truncate(rest, size);
    } else {
        tcp(&mut resolver, rest, usize::from(selector >> 2).max(1));
    }
});

/// Feeds `bytes` as a TCP stream, `chunk` bytes at a time; each message is answered a
/// second after the one before, and the address of every third A answer is held.
fn tcp(resolver: &mut Resolver, bytes: &[u8], chunk: usize) {
    let mut reassembler = Reassembler::new(512, 4);
    let mut now = Instant::ZERO;
    let mut held = Vec::new();
    for piece in bytes.chunks(chunk) {
        let mut rest = piece;
        while !rest.is_empty() {
            let Ok(taken) = reassembler.push(rest) else {
                return;
            };
            rest = &rest[taken..];
            while let Some(message) = reassembler.message() {
                assert!(!message.is_empty() && message.len() <= 512);
                now += smoltcp::time::Duration::from_secs(1);
                let message = message.to_vec();
                if let Some(addr) = answer(resolver, &message, now, dns::UDP_MAX + 2)
                    && held.len() % 3 == 0
                {
                    assert!(resolver.hold(addr));
                    held.push(addr);
                }
                if held.len() > 4 {
                    resolver.release(held.remove(0));
                }
            }
            // Messages taken leave room for more.
            assert!(taken > 0 || rest.is_empty());
        }
    }
}

/// A server's reply cut for a UDP client taking `limit` bytes: whole if it fits, else
/// its header and question with TC set.
fn truncate(reply: &[u8], limit: usize) {
    let mut cut = reply.to_vec();
    let Some(len) = dns::truncate(&mut cut, limit) else {
        assert!(reply.len() > limit);
        return;
    };
    if reply.len() <= limit {
        assert_eq!((len, &cut[..]), (reply.len(), reply));
        return;
    }
    assert!(len <= limit);
    let header = Header::parse(&cut).unwrap();
    let before = Header::parse(reply).unwrap();
    assert!(header.tc());
    assert_eq!(
        (header.id, header.flags),
        (before.id, before.flags | 0x0200)
    );
    assert_eq!(
        (
            header.qdcount,
            header.ancount,
            header.nscount,
            header.arcount
        ),
        (1, 0, 0, 0)
    );
    let name = Name::parse(&cut[HEADER_LEN..]).expect("the question is kept");
    assert_eq!(len, HEADER_LEN + name.wire().len() + 4);
    assert_eq!(cut[HEADER_LEN..len], reply[HEADER_LEN..len]);
}

/// Answers `query` into a buffer of `size` bytes (framed as over TCP when larger than
/// a UDP reply) and checks the reply; the fake address answered, if any.
fn answer(resolver: &mut Resolver, query: &[u8], now: Instant, size: usize) -> Option<IpAddr> {
    let mut out = vec![0u8; size];
    let framed = size > dns::UDP_MAX;
    let body = if framed { &mut out[2..] } else { &mut out[..] };
    let parsed = Query::parse(query);
    let len = match resolver.answer(query, now, body) {
        Answer::Reply(len) => len,
        Answer::Forward => {
            let parsed = parsed.expect("only queries are forwarded");
            assert!(![TYPE_A, TYPE_AAAA].contains(&parsed.qtype));
            return None;
        }
        Answer::Drop => {
            assert!(parsed.is_err() || body.len() < query.len());
            return None;
        }
    };
    assert!(
        len <= body.len(),
        "a reply of {len} bytes in {}",
        body.len()
    );
    if framed {
        assert_eq!(stream::frame(&mut out, len), Some(len + 2));
    }
    let reply = if framed {
        &out[2..len + 2]
    } else {
        &out[..len]
    };
    let header = Header::parse(reply).expect("a reply has a header");
    let asked = Header::parse(query).expect("a message with no header is dropped");
    assert!(header.is_response());
    assert_eq!(header.id, asked.id);
    assert_eq!(header.opcode(), asked.opcode());
    let Ok(parsed) = parsed else {
        assert_eq!((header.qdcount, header.ancount), (0, 0));
        let rcode = header.rcode();
        assert!(rcode == Rcode::FormErr as u8 || rcode == Rcode::NotImp as u8);
        return None;
    };
    assert_eq!(header.qdcount, 1);
    let question_len = parsed.name.wire().len() + 4;
    let question = &reply[HEADER_LEN..HEADER_LEN + question_len];
    assert_eq!(question, &query[HEADER_LEN..HEADER_LEN + question_len]);
    assert!(header.ancount <= 1 && header.arcount <= u16::from(parsed.edns));
    if header.ancount == 0 {
        return None;
    }
    assert_eq!(header.rcode(), 0);
    // The answer: a pointer to the question's name, the question's type and class, TTL,
    // RDLENGTH, then rdata.
    let record = &reply[HEADER_LEN + question_len..];
    assert_eq!(record[..2], [0xc0, 12]);
    assert_eq!(u16::from_be_bytes([record[2], record[3]]), parsed.qtype);
    let rdlen = usize::from(u16::from_be_bytes([record[10], record[11]]));
    let rdata = &record[12..12 + rdlen];
    let mut text = [0u8; MAX_TEXT];
    match parsed.qtype {
        TYPE_A | TYPE_AAAA => {
            let addr = match rdata.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(rdata).unwrap()),
                16 => IpAddr::from(<[u8; 16]>::try_from(rdata).unwrap()),
                n => panic!("an address of {n} bytes"),
            };
            assert_eq!(addr.is_ipv4(), parsed.qtype == TYPE_A);
            assert!(resolver.is_fake(addr));
            let name = parsed
                .name
                .text(&mut text)
                .expect("only host names are answered");
            assert_eq!(resolver.name_of(addr), Some(name));
            Some(addr)
        }
        TYPE_PTR => {
            let addr = parsed.name.reverse().expect("a reverse name");
            let name = Name::parse(rdata).expect("a name");
            assert_eq!(name.wire().len(), rdata.len());
            assert_eq!(resolver.name_of(addr), name.text(&mut text));
            None
        }
        other => panic!("an answer to type {other}"),
    }
}
