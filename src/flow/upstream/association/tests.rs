//! The association's tests, on a simulated clock: deadlines, relays, held and relayed datagrams.

use super::*;
use crate::flow::upstream::SCRATCH;
use crate::wire::Offload;
use crate::wire::demux::tests::{udp_packet, v4};

const UPSTREAM: &str = "192.0.2.1:1080";

fn at(secs: i64) -> Instant {
    Instant::from_secs(secs)
}

fn id(slot: u32) -> Id {
    Id {
        slot,
        generation: 0,
    }
}

/// Runs `association` against an upstream that sends `replies` (as one byte stream,
/// given out as asked), until it asks for no more I/O; the step it then gives.
fn run(association: &mut Association, replies: &[&[u8]], counters: &mut Counters) -> Step {
    let mut scratch = vec![0u8; SCRATCH];
    let mut stream: std::collections::VecDeque<u8> = replies.concat().into();
    let mut pending = None;
    for _ in 0..16 {
        let step = association.poll(&mut scratch, counters);
        let Step::Io(io) = step else {
            return step;
        };
        let mut moved = false;
        if let Some(send) = io.send {
            association.on_sent(Ok(send.len()));
            moved = true;
        }
        pending = io.recv.or(pending);
        if let Some(recv) = pending.clone()
            && !stream.is_empty()
        {
            let n = recv.len().min(stream.len());
            for (at, byte) in stream.drain(..n).enumerate() {
                scratch[recv.start + at] = byte;
            }
            association.on_received(&scratch, Ok(n), counters);
            (pending, moved) = (None, true);
        }
        if !moved {
            return Step::Io(Io::default());
        }
    }
    panic!("the handshake did not settle");
}

fn connected() -> Association {
    let mut association = Association::new(UPSTREAM.parse().unwrap(), None, at(5));
    association.on_connected(Ok(()));
    association
}

#[test]
fn an_association_not_set_up_by_its_deadline_closes_its_flow() {
    let mut counters = Counters::default();
    let mut association = connected();
    // The upstream takes the greeting and never answers.
    let step = run(&mut association, &[], &mut counters);
    assert_eq!(
        step,
        Step::Io(Io::default()),
        "waiting for the method reply"
    );
    association.expire(at(4));
    assert_eq!(
        run(&mut association, &[], &mut counters),
        Step::Io(Io::default())
    );
    association.expire(association.deadline());
    let mut scratch = [0u8; SCRATCH];
    assert_eq!(association.poll(&mut scratch, &mut counters), Step::Close);
    assert!(!association.is_pending());
    assert_eq!(
        association.poll(&mut scratch, &mut counters),
        Step::Wait,
        "once"
    );
    assert_eq!(counters.timeouts, 1);
}

#[test]
fn a_set_up_association_opens_its_relay_and_ends_with_its_control_connection() {
    let mut counters = Counters::default();
    let mut association = connected();
    // The relay "wherever you reached me": the upstream's own address.
    let reply = [5, 0, 0, 1, 0, 0, 0, 0, 0x12, 0x34];
    let step = run(&mut association, &[&[5, 0], &reply], &mut counters);
    assert_eq!(step, Step::Open("192.0.2.1:4660".parse().unwrap()));
    let mut scratch = [0u8; SCRATCH];
    assert_eq!(association.poll(&mut scratch, &mut counters), Step::Wait);
    // Its deadline passing changes nothing now.
    association.expire(at(60));
    assert_eq!(association.poll(&mut scratch, &mut counters), Step::Wait);
    // The upstream closes the control connection: the flow ends.
    association.on_received(&scratch, Ok(0), &mut counters);
    assert_eq!(association.poll(&mut scratch, &mut counters), Step::Close);
    assert_eq!(
        (counters.associations_ended, counters.timeouts),
        (1, 0),
        "ended, not failed"
    );
    // A relay with an address of its own is used as given.
    let mut association = connected();
    let reply = [5, 0, 0, 1, 198, 51, 100, 7, 0, 53];
    let step = run(&mut association, &[&[5, 0], &reply], &mut counters);
    assert_eq!(step, Step::Open("198.51.100.7:53".parse().unwrap()));
}

#[test]
fn a_refused_association_is_counted_and_closes_its_flow() {
    let mut counters = Counters::default();
    let mut association = connected();
    let step = run(
        &mut association,
        &[&[5, 0], &[5, 2, 0, 1, 0, 0, 0, 0, 0, 0]],
        &mut counters,
    );
    assert_eq!(step, Step::Close);
    assert_eq!(counters.not_allowed, 1);
}

#[test]
fn only_a_few_datagrams_are_held_while_it_is_set_up() {
    let mut association = connected();
    for slot in 0..HELD as u16 {
        assert!(association.hold(slot, 100 + usize::from(slot)));
    }
    assert!(!association.hold(9, 100), "full");
    let held: Vec<_> = association.take_held().collect();
    assert_eq!(held, [(0, 100), (1, 101), (2, 102), (3, 103)]);
    assert_eq!(association.take_held().count(), 0);
    assert!(association.hold(9, 100), "room again");
}

#[test]
fn deadlines_of_gone_flows_do_not_pile_up() {
    let mut deadlines = Deadlines::default();
    // Many short flows, each closed at once.
    for slot in 0..10_000 {
        deadlines.push(Instant::from_millis(i64::from(slot)), id(slot), 1, |_| {
            false
        });
        assert!(
            deadlines.0.len() <= 2 * MIN_COMPACTED + 1,
            "{}",
            deadlines.0.len()
        );
    }
    // Pending ones are kept, in order.
    let mut deadlines = Deadlines::default();
    for slot in 0..200 {
        deadlines.push(
            Instant::from_millis(i64::from(slot)),
            id(slot),
            1000,
            |_| true,
        );
    }
    deadlines.push(Instant::from_millis(200), id(200), 10, |id| {
        id.slot % 2 == 0
    });
    assert_eq!(deadlines.0.len(), 101);
    assert_eq!(deadlines.pop_due(Instant::from_millis(1)), Some(id(0)));
    assert_eq!(deadlines.pop_due(Instant::from_millis(1)), None);
    assert_eq!(deadlines.next(), Some(Instant::from_millis(2)));
}

#[test]
fn only_whole_datagrams_from_the_flows_server_are_relayed() {
    let server: SocketAddr = "192.0.2.53:53".parse().unwrap();
    let mut counters = Counters::default();
    let mut datagram = [0u8; 64];
    let n = socks5::udp_header(&mut datagram, server);
    datagram[n..n + 4].copy_from_slice(b"answ");
    assert_eq!(
        strip(&datagram[..n + 4], server, false, &mut counters),
        Some(&b"answ"[..])
    );
    let other: SocketAddr = "192.0.2.54:53".parse().unwrap();
    assert_eq!(strip(&datagram[..n + 4], other, false, &mut counters), None);
    datagram[2] = 1;
    assert_eq!(
        strip(&datagram[..n + 4], server, false, &mut counters),
        None
    );
    datagram[2] = 0;
    assert_eq!(
        strip(&datagram[..n - 1], server, false, &mut counters),
        None
    );
    assert_eq!(
        (counters.udp_fragments, counters.udp_malformed),
        (1, 2),
        "one fragment; one from elsewhere, one too short"
    );
    // A source the relay gives as an IPv4-mapped IPv6 address is the same server.
    let mapped: SocketAddr = "[::ffff:192.0.2.53]:53".parse().unwrap();
    let n = socks5::udp_header(&mut datagram, mapped);
    assert!(strip(&datagram[..n], server, false, &mut counters).is_some());
    // A server asked for by name: any address the relay resolved it to, the same port.
    let resolved: SocketAddr = "198.51.100.7:53".parse().unwrap();
    let n = socks5::udp_header(&mut datagram, resolved);
    assert!(strip(&datagram[..n], server, true, &mut counters).is_some());
    assert!(strip(&datagram[..n], server, false, &mut counters).is_none());
    let other_port: SocketAddr = "198.51.100.7:54".parse().unwrap();
    let n = socks5::udp_header(&mut datagram, other_port);
    assert!(strip(&datagram[..n], server, true, &mut counters).is_none());
}

#[test]
fn datagrams_too_big_for_the_header_are_refused() {
    let v4: SocketAddr = "192.0.2.1:9".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
    let mut counters = Counters::default();
    assert_eq!(header_len(v4, None, 100, 65507, &mut counters), Some(10));
    assert_eq!(header_len(v6, None, 100, 65507, &mut counters), Some(22));
    assert_eq!(header_len(v4, None, 65497, 65507, &mut counters), Some(10));
    assert_eq!(counters.udp_too_big, 0);
    assert_eq!(header_len(v4, None, 65498, 65507, &mut counters), None);
    assert_eq!(header_len(v6, None, 65486, 65507, &mut counters), None);
    assert_eq!(counters.udp_too_big, 2);
    // By name: 3 + 1 + 1 + 11 + 2 bytes of header for "example.com".
    assert_eq!(
        header_len(v4, Some("example.com"), 100, 65507, &mut counters),
        Some(18)
    );
}

#[test]
fn errors_on_the_path_to_the_relay_are_not_the_servers() {
    assert_eq!(
        relay_error(RecvError::Unreachable(Reason::Port)),
        RecvError::Other
    );
    assert_eq!(relay_error(RecvError::NoBuffers), RecvError::NoBuffers);
    assert_eq!(relay_error(RecvError::Other), RecvError::Other);
    let server: SocketAddr = "192.0.2.53:53".parse().unwrap();
    let mut counters = Counters::default();
    let refused = Err(RecvError::Unreachable(Reason::Port));
    let mut ranges = Vec::new();
    assert_eq!(
        from_relay(refused, server, false, &mut ranges, &mut counters),
        Err(RecvError::Other)
    );
    let malformed = Ok((&b"\0\0"[..], None));
    assert!(from_relay(malformed, server, false, &mut ranges, &mut counters).is_ok());
    assert!(ranges.is_empty());
    assert_eq!(counters.udp_malformed, 1);
}

#[test]
fn a_coalesced_receive_from_the_relay_loses_each_datagrams_header() {
    let server: SocketAddr = "192.0.2.53:4433".parse().unwrap();
    let other: SocketAddr = "192.0.2.54:4433".parse().unwrap();
    let datagram = |from: SocketAddr, payload: &[u8]| {
        let mut bytes = vec![0u8; socks5::udp_header_len(&from)];
        socks5::udp_header(&mut bytes, from);
        bytes.extend(payload);
        bytes
    };
    // Four of 110 bytes (10 of header) coalesced, the last shorter: one from another
    // source and one fragment among them are dropped, counted.
    let mut fragment = datagram(server, &[3; 100]);
    fragment[2] = 1;
    let received = [
        datagram(server, &[1; 100]),
        datagram(other, &[2; 100]),
        fragment,
        datagram(server, &[4; 100]),
        datagram(server, &[5; 40]),
    ]
    .concat();
    let (mut counters, mut ranges) = (Counters::default(), Vec::new());
    let bytes = from_relay(
        Ok((&received, Some(110))),
        server,
        false,
        &mut ranges,
        &mut counters,
    );
    let bytes = bytes.unwrap();
    let payloads: Vec<&[u8]> = ranges.iter().map(|range| &bytes[range.clone()]).collect();
    assert_eq!(payloads, [&[1; 100][..], &[4; 100], &[5; 40]]);
    assert_eq!((counters.udp_malformed, counters.udp_fragments), (1, 1));
    let one = datagram(server, b"");
    let bytes = from_relay(Ok((&one, None)), server, false, &mut ranges, &mut counters).unwrap();
    let empty = bytes.len()..bytes.len();
    assert_eq!(ranges, std::slice::from_ref(&empty), "an empty datagram");
}

#[test]
fn pings_are_refused_and_answered_at_once() {
    let mut tx = TxPool::new(4, 1500, Offload::None).unwrap();
    let (mut counters, mut flows) = (Counters::default(), datagram::Counters::default());
    let request = udp_packet(v4([10, 0, 0, 1], 7), v4([192, 0, 2, 9], 0), b"ping");
    assert!(!refuses(
        Kind::Udp,
        &request,
        &mut tx,
        &mut counters,
        &mut flows
    ));
    assert!(refuses(
        Kind::Echo,
        &request,
        &mut tx,
        &mut counters,
        &mut flows
    ));
    let mut answers = Vec::new();
    tx.take_ready(|_, slice| answers.push(slice.region.with_mut(slice.range, |b| b.to_vec())));
    assert_eq!(answers.len(), 1);
    assert_eq!(
        (answers[0][20], answers[0][21]),
        (3, 13),
        "administratively prohibited"
    );
    assert_eq!((counters.echo_refused, flows.reply_drops), (1, 0));
}
