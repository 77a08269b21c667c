//! The handshake's tests: a scripted upstream, replies in pieces, every way it fails.

use std::collections::VecDeque;

use super::*;

const TARGET: &str = "192.0.2.80:443";
const NO_AUTH: [u8; 2] = [5, 0];
const SUCCESS_V4: [u8; 10] = [5, 0, 0, 1, 10, 9, 8, 7, 0x12, 0x34];

/// The upstream as the kernel would show it: what it sends, given out `chunk` bytes
/// at a time at most, then EOF if `eof`; sends taken `send_chunk` bytes at a time.
struct Peer {
    to_send: VecDeque<u8>,
    chunk: usize,
    send_chunk: usize,
    eof: bool,
    received: Vec<u8>,
}

impl Peer {
    fn new(script: &[&[u8]]) -> Peer {
        Peer {
            to_send: script.concat().into_iter().collect(),
            chunk: usize::MAX,
            send_chunk: usize::MAX,
            eof: true,
            received: Vec::new(),
        }
    }
}

fn handshake(credentials: Option<Credentials>) -> Handshake {
    let mut handshake = Handshake::new(
        Command::Connect,
        TARGET.parse::<SocketAddr>().unwrap(),
        credentials.map(Rc::new),
        Instant::from_secs(10),
    );
    handshake.on_connected(Ok(()));
    handshake
}

/// Runs the handshake against `peer` until it ends or nothing moves; what is left
/// in flight stays so (the caller may cancel it).
fn run(handshake: &mut Handshake, peer: &mut Peer) -> Option<Result<Bound, Fault>> {
    let mut scratch = vec![0u8; SCRATCH];
    let mut pending_recv = None;
    for _ in 0..10_000 {
        let io = handshake.pump(&mut scratch);
        let mut moved = false;
        if let Some(range) = io.send {
            let n = range.len().min(peer.send_chunk);
            peer.received
                .extend_from_slice(&scratch[range.start..range.start + n]);
            handshake.on_sent(Ok(n));
            moved = true;
        }
        if let Some(range) = io.recv {
            pending_recv = Some(range);
        }
        if let Some(range) = pending_recv.clone() {
            let n = range.len().min(peer.chunk).min(peer.to_send.len());
            if n > 0 {
                for (at, byte) in peer.to_send.drain(..n).enumerate() {
                    scratch[range.start + at] = byte;
                }
                handshake.on_received(&scratch, Ok(n));
                pending_recv = None;
                moved = true;
            } else if peer.eof {
                handshake.on_received(&scratch, Ok(0));
                pending_recv = None;
                moved = true;
            }
        }
        if handshake.outcome().is_some() || !moved {
            break;
        }
    }
    handshake.outcome()
}

#[test]
fn a_name_is_asked_for_as_atyp_3() {
    let mut handshake = Handshake::new(
        Command::Connect,
        Target::Name("example.com".into(), 443),
        None,
        Instant::from_secs(10),
    );
    handshake.on_connected(Ok(()));
    let mut peer = Peer::new(&[&NO_AUTH, &SUCCESS_V4]);
    assert!(matches!(run(&mut handshake, &mut peer), Some(Ok(_))));
    let mut request = vec![5, 1, 0, 3, 11];
    request.extend_from_slice(b"example.com");
    request.extend_from_slice(&443u16.to_be_bytes());
    assert_eq!(peer.received, [&[5, 1, 0][..], &request].concat());
}

fn connect_request() -> Vec<u8> {
    let mut buf = [0u8; 32];
    let n = socks5::request(&mut buf, Command::Connect, TARGET.parse().unwrap());
    buf[..n].to_vec()
}

#[test]
fn no_auth_connect_sends_the_greeting_then_the_request() {
    let mut h = handshake(None);
    let mut peer = Peer::new(&[&NO_AUTH, &SUCCESS_V4]);
    let bound = "10.9.8.7:4660".parse().unwrap();
    assert_eq!(run(&mut h, &mut peer), Some(Ok(Bound::Addr(bound))));
    assert_eq!(peer.received, [&[5, 1, 0][..], &connect_request()].concat());
    assert_eq!(h.inflight(), 0);
}

#[test]
fn password_auth_is_offered_and_used_when_chosen() {
    let credentials = Credentials::new(b"user", b"pass").unwrap();
    let mut h = handshake(Some(credentials));
    let mut peer = Peer::new(&[&[5, 2], &[1, 0], &SUCCESS_V4]);
    assert!(matches!(run(&mut h, &mut peer), Some(Ok(_))));
    let expected = [
        &[5, 2, 0, 2][..],
        b"\x01\x04user\x04pass",
        &connect_request(),
    ]
    .concat();
    assert_eq!(peer.received, expected);
    // A server may also waive it.
    let credentials = Credentials::new(b"user", b"pass").unwrap();
    let mut h = handshake(Some(credentials));
    let mut peer = Peer::new(&[&NO_AUTH, &SUCCESS_V4]);
    assert!(matches!(run(&mut h, &mut peer), Some(Ok(_))));
}

#[test]
fn data_after_the_reply_is_left_in_the_socket() {
    // The reply and the server's first bytes in one segment: the handshake reads up
    // to the end of the reply and not a byte more.
    for reply in [
        SUCCESS_V4.to_vec(),
        [&[5, 0, 0, 4][..], &[0; 16], &[0, 80]].concat(),
        b"\x05\x00\x00\x03\x0bexample.com\x00\x50".to_vec(),
    ] {
        let mut h = handshake(None);
        let mut peer = Peer::new(&[&NO_AUTH, &reply, b"HTTP/1.1 200 OK"]);
        peer.eof = false;
        assert!(matches!(run(&mut h, &mut peer), Some(Ok(_))));
        let rest: Vec<u8> = peer.to_send.iter().copied().collect();
        assert_eq!(rest, b"HTTP/1.1 200 OK");
    }
}

#[test]
fn byte_at_a_time_replies_and_sends_still_complete() {
    let credentials = Credentials::new(b"u", b"p").unwrap();
    let mut h = handshake(Some(credentials));
    let mut peer = Peer::new(&[&[5, 2], &[1, 0], &SUCCESS_V4]);
    (peer.chunk, peer.send_chunk) = (1, 1);
    assert!(matches!(run(&mut h, &mut peer), Some(Ok(_))));
    assert_eq!(peer.received.len(), 4 + 5 + 10);
}

#[test]
fn truncated_replies_fail_as_closed() {
    for script in [
        &[][..],
        &[5][..],
        &[5, 0, 5][..],
        &[5, 0, 5, 0, 0, 1, 1, 2, 3][..],
        &[5, 0, 5, 0, 0, 3, 200, b'a'][..],
    ] {
        let mut h = handshake(None);
        let mut peer = Peer::new(&[script]);
        assert_eq!(
            run(&mut h, &mut peer),
            Some(Err(Fault::Closed)),
            "{script:?}"
        );
        assert_eq!(h.inflight(), 0);
    }
}

#[test]
fn garbage_fails_as_a_protocol_error() {
    for script in [
        &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
        &[4, 0][..],
        // A method not offered, and the password method offered by nobody.
        &[5, 1][..],
        &[5, 2][..],
        &[5, 0, 4, 0, 0, 1, 0, 0, 0, 0, 0, 0][..],
        // An address type RFC 1928 does not have.
        &[5, 0, 5, 0, 0, 7, 0, 0, 0, 0, 0, 0][..],
    ] {
        let mut h = handshake(None);
        let mut peer = Peer::new(&[script]);
        assert_eq!(
            run(&mut h, &mut peer),
            Some(Err(Fault::Protocol)),
            "{script:?}"
        );
    }
    // An auth reply in the wrong version.
    let mut h = handshake(Some(Credentials::new(b"u", b"p").unwrap()));
    let mut peer = Peer::new(&[&[5, 2], &[5, 0]]);
    assert_eq!(run(&mut h, &mut peer), Some(Err(Fault::Protocol)));
}

#[test]
fn the_longest_reply_fits_and_is_read_whole() {
    let name = [b'x'; 255];
    let reply = [&[5, 0, 0, 3, 255][..], &name, &[0, 80]].concat();
    assert_eq!(reply.len(), socks5::MAX_REPLY);
    let mut h = handshake(None);
    let mut peer = Peer::new(&[&NO_AUTH, &reply, b"after"]);
    peer.eof = false;
    assert_eq!(run(&mut h, &mut peer), Some(Ok(Bound::Domain)));
    assert_eq!(peer.to_send.len(), 5);
}

#[test]
fn a_relay_named_by_a_domain_is_refused_for_udp() {
    let mut h = Handshake::new(
        Command::UdpAssociate,
        "0.0.0.0:0".parse::<SocketAddr>().unwrap(),
        None,
        Instant::from_secs(10),
    );
    h.on_connected(Ok(()));
    let mut peer = Peer::new(&[&NO_AUTH, b"\x05\x00\x00\x03\x01r\x00\x50"]);
    assert_eq!(run(&mut h, &mut peer), Some(Err(Fault::Protocol)));
    assert_eq!(peer.received[3..5], [5, 3], "a UDP ASSOCIATE request");
}

#[test]
fn methods_and_passwords_refused() {
    let mut h = handshake(None);
    let mut peer = Peer::new(&[&[5, 0xff]]);
    assert_eq!(run(&mut h, &mut peer), Some(Err(Fault::NoAcceptableMethod)));
    let mut h = handshake(Some(Credentials::new(b"u", b"wrong").unwrap()));
    let mut peer = Peer::new(&[&[5, 2], &[1, 1]]);
    assert_eq!(run(&mut h, &mut peer), Some(Err(Fault::AuthRejected)));
    assert_eq!(peer.received.len(), 4 + 9, "no request after a refusal");
}

#[test]
fn every_reply_code_is_a_refusal_even_when_the_rest_never_comes() {
    for code in 1..=9u8 {
        let full = [5, code, 0, 1, 0, 0, 0, 0, 0, 0];
        for reply in [&full[..], &full[..2]] {
            let mut h = handshake(None);
            let mut peer = Peer::new(&[&NO_AUTH, reply]);
            peer.eof = false;
            let Some(Err(Fault::Refused(found))) = run(&mut h, &mut peer) else {
                panic!("code {code}: {:?}", h.outcome());
            };
            assert_eq!(socks5::reply(&full), Err(socks5::Error::Refused(found)));
        }
    }
}

#[test]
fn a_silent_upstream_times_out_and_its_receive_is_then_cancelled() {
    let mut h = handshake(None);
    let mut peer = Peer::new(&[]);
    peer.eof = false;
    assert_eq!(run(&mut h, &mut peer), None);
    assert!(h.receiving(), "waiting for the method reply");
    h.expire(Instant::from_secs(9));
    assert_eq!(h.outcome(), None);
    h.expire(h.deadline());
    assert_eq!(h.outcome(), Some(Err(Fault::Timeout)));
    assert_eq!(h.inflight(), 1, "still to be cancelled");
    h.on_received(&[0; SCRATCH], Err(IoError::Cancelled));
    assert_eq!(h.inflight(), 0);
    assert_eq!(
        h.outcome(),
        Some(Err(Fault::Timeout)),
        "the first fault stays"
    );
    assert_eq!(h.pump(&mut [0; SCRATCH]), Io::default());
}

#[test]
fn a_failed_connect_or_a_reset_ends_it() {
    let mut h = Handshake::new(
        Command::Connect,
        TARGET.parse::<SocketAddr>().unwrap(),
        None,
        Instant::from_secs(10),
    );
    assert_eq!(
        h.pump(&mut [0; SCRATCH]),
        Io::default(),
        "not connected yet"
    );
    h.on_connected(Err(IoError::Refused));
    assert_eq!(h.outcome(), Some(Err(Fault::Connect)));
    let connect_fails = [
        (IoError::HostUnreachable, Fault::Connect),
        (IoError::NetUnreachable, Fault::Connect),
        (IoError::Other, Fault::Connect),
        (IoError::TimedOut, Fault::Timeout),
        // The connect's linked timeout, the same as the deadline, fired first.
        (IoError::Cancelled, Fault::Timeout),
    ];
    for (error, fault) in connect_fails {
        let mut h = Handshake::new(
            Command::Connect,
            TARGET.parse::<SocketAddr>().unwrap(),
            None,
            Instant::from_secs(10),
        );
        h.on_connected(Err(error));
        assert_eq!(h.outcome(), Some(Err(fault)), "{error:?}");
    }
    let mut h = handshake(None);
    let io = h.pump(&mut [0; SCRATCH]);
    assert!(io.send.is_some() && io.recv.is_some());
    h.on_sent(Err(IoError::Other));
    assert_eq!(h.outcome(), Some(Err(Fault::Closed)));
    h.on_received(&[0; SCRATCH], Err(IoError::Other));
    assert_eq!(h.inflight(), 0);
}

#[test]
fn an_early_reply_waits_for_the_request_to_be_sent() {
    // The server answers before taking the whole request (it cannot know it, but a
    // hostile one may): the next stage starts only once the request is out.
    let mut h = handshake(None);
    let mut scratch = vec![0u8; SCRATCH];
    let io = h.pump(&mut scratch);
    let (send, recv) = (io.send.unwrap(), io.recv.unwrap());
    scratch[recv.clone()].copy_from_slice(&NO_AUTH);
    h.on_received(&scratch, Ok(2));
    assert_eq!(h.pump(&mut scratch), Io::default(), "the send is in flight");
    h.on_sent(Ok(send.len() - 1));
    let io = h.pump(&mut scratch);
    assert_eq!(
        io.send,
        Some(send.end - 1..send.end),
        "the rest of the greeting"
    );
    h.on_sent(Ok(1));
    let io = h.pump(&mut scratch);
    assert_eq!(io.send.map(|r| r.len()), Some(connect_request().len()));
    assert_eq!(io.recv.map(|r| r.len()), Some(socks5::REPLY_PREFIX));
}
