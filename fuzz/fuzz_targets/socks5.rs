//! SOCKS5 from an upstream proxy: the reply parsers on any bytes, the emitted requests
//! and UDP headers parsed back, and the handshake state machine fed any byte stream in
//! any chunking. Nothing panics, nothing is read past a reply (bytes after a CONNECT
//! reply belong to the relay), and every handshake ends when the stream does.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use smoltcp::time::Instant;
use uringproxy::flow::upstream::{Handshake, SCRATCH};
use uringproxy::wire::socks5::{self, Bound, Command, Credentials};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => parsers(rest),
        1 => emitted(rest, selector),
        _ => handshake(rest, selector),
    }
});

fn parsers(bytes: &[u8]) {
    if let [a, b, ..] = *bytes {
        for password in [false, true] {
            let _ = socks5::method_reply([a, b], password);
        }
        let _ = socks5::auth_reply([a, b]);
        assert_eq!(socks5::reply_status([a, b]).is_ok(), (a, b) == (5, 0));
    }
    if let Ok(len) = socks5::reply_len(bytes) {
        assert!(len <= socks5::MAX_REPLY, "reply of {len} bytes");
    }
    if let Ok(bound) = socks5::reply(bytes) {
        let len = socks5::reply_len(bytes).expect("a parsed reply has a length");
        assert!(len <= bytes.len());
        assert_eq!(bytes[1], 0, "a failed request parsed as a success");
        if let Bound::Addr(addr) = bound {
            assert_eq!(addr.port().to_be_bytes(), bytes[len - 2..len]);
        }
    }
    if let Ok((source, start)) = socks5::udp_datagram(bytes) {
        assert!(start <= bytes.len(), "payload starts past the datagram");
        // The header is the one we would write for that source (RSV not checked).
        let mut header = [0u8; 32];
        let len = socks5::udp_header(&mut header, source);
        assert_eq!(len, start);
        assert_eq!(header[2..len], bytes[2..start]);
    }
}

/// An address from the fuzzer's bytes.
fn address(bytes: &[u8]) -> SocketAddr {
    let mut raw = [0u8; 19];
    let n = bytes.len().min(raw.len());
    raw[..n].copy_from_slice(&bytes[..n]);
    let port = u16::from_be_bytes([raw[17], raw[18]]);
    let ip = if raw[0] & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(raw[1], raw[2], raw[3], raw[4]))
    } else {
        let octets: [u8; 16] = raw[1..17].try_into().unwrap();
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    SocketAddr::new(ip, port)
}

/// A request's layout is a reply's: with REP 0 it parses back to its address.
fn emitted(bytes: &[u8], selector: u8) {
    let addr = address(bytes);
    let command = if selector & 8 == 0 {
        Command::Connect
    } else {
        Command::UdpAssociate
    };
    let mut buf = [0u8; 64];
    let len = socks5::request(&mut buf, command, addr);
    buf[1] = 0;
    assert_eq!(socks5::reply_len(&buf[..len]), Ok(len));
    assert_eq!(socks5::reply(&buf[..len]), Ok(Bound::Addr(addr)));
    let len = socks5::udp_header(&mut buf, addr);
    assert_eq!(len, socks5::udp_header_len(&addr));
    assert_eq!(socks5::udp_datagram(&buf[..len]), Ok((addr, len)));
}

/// A handshake against an upstream that sends `stream` (then closes), received at most
/// `chunk` bytes at a time, its requests taken `send_chunk` bytes at a time.
fn handshake(bytes: &[u8], selector: u8) {
    let [chunk, send_chunk, stream @ ..] = bytes else {
        return;
    };
    let (chunk, send_chunk) = (usize::from(*chunk).max(1), usize::from(*send_chunk).max(1));
    let command = if selector & 8 == 0 {
        Command::Connect
    } else {
        Command::UdpAssociate
    };
    let credentials =
        (selector & 16 != 0).then(|| Rc::new(Credentials::new(b"user", b"secret").unwrap()));
    let password = credentials.is_some();
    let target: SocketAddr = "192.0.2.80:443".parse().unwrap();
    let mut handshake = Handshake::new(command, target, credentials, Instant::from_secs(10));
    handshake.on_connected(Ok(()));
    let mut scratch = vec![0u8; SCRATCH];
    let mut consumed = 0;
    let mut sent = Vec::new();
    // Each round moves at least a byte or ends the handshake.
    for _ in 0..4 * (stream.len() + 600) {
        if handshake.outcome().is_some() {
            break;
        }
        let io = handshake.pump(&mut scratch);
        assert!(handshake.inflight() <= 2);
        if let Some(range) = io.send {
            assert!(!range.is_empty() && range.end <= SCRATCH);
            let n = range.len().min(send_chunk);
            sent.extend_from_slice(&scratch[range.start..range.start + n]);
            handshake.on_sent(Ok(n));
        }
        if let Some(range) = io.recv {
            assert!(!range.is_empty() && range.end <= SCRATCH);
            let n = range.len().min(chunk).min(stream.len() - consumed);
            scratch[range.start..range.start + n].copy_from_slice(&stream[consumed..consumed + n]);
            consumed += n;
            handshake.on_received(&scratch, Ok(n));
        }
    }
    let outcome = handshake
        .outcome()
        .expect("the handshake ended with its stream");
    assert_eq!(handshake.inflight(), 0);
    let greeting: &[u8] = if password { &[5, 2, 0, 2] } else { &[5, 1, 0] };
    assert!(
        sent.starts_with(greeting) || greeting.starts_with(&sent),
        "greeting {sent:?}"
    );
    if let Ok(bound) = outcome {
        // Exactly the replies were read: the method choice, the authentication's
        // status if a password was asked for, the request's reply.
        let auth = if password && stream[1] == 2 { 2 } else { 0 };
        let reply = &stream[2 + auth..];
        let len = socks5::reply_len(reply).expect("a reply");
        assert_eq!(consumed, 2 + auth + len, "read past the reply");
        assert_eq!(socks5::reply(&reply[..len]), Ok(bound));
        assert!(command == Command::Connect || bound != Bound::Domain);
    }
}
