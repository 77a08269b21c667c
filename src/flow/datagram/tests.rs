//! The datagram flows' tests, on a simulated clock: timeouts, eviction, replies, pings.

use super::*;
use crate::stack::{TxPool, Write};
use crate::uring::InBuffer;
use crate::wire::demux::tests::v4;
use crate::wire::icmp;
use crate::wire::{Offload, Parsed, parse};

fn limits(max_flows: usize) -> Limits {
    Limits {
        idle_timeout: Duration::from_secs(60),
        dns_timeout: Duration::from_secs(10),
        max_flows,
    }
}

fn key(client_port: u16, server_port: u16) -> FlowKey {
    FlowKey {
        client: v4([10, 0, 0, 1], client_port),
        server: v4([10, 0, 0, 2], server_port),
    }
}

/// Flow `id`'s receive brought one server `datagram`.
fn receive<S>(
    flows: &mut Flows<S>,
    id: Id,
    now: Instant,
    datagram: &[u8],
    more: bool,
    tx: &mut TxPool,
) -> Received {
    let whole = 0..datagram.len();
    let batch = Arrival {
        bytes: datagram,
        datagrams: std::slice::from_ref(&whole),
        received_in: None,
    };
    flows.on_received(id, now, Ok(batch), more, tx)
}

fn at(secs: u64) -> Instant {
    Instant::from_secs(secs as i64)
}

/// The packets `tx` holds for the client, taken.
fn ready(tx: &mut TxPool) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    tx.take_ready(|_, slice| packets.push(slice.region.with_mut(slice.range, |b| b.to_vec())));
    packets
}

#[test]
fn idle_flows_expire_after_their_own_timeout() {
    let mut flows: Flows<()> = Flows::new(limits(100));
    let web = flows.open(Kind::Udp, key(1000, 443), (), at(0)).unwrap();
    let dns = flows.open(Kind::Udp, key(1001, 53), (), at(0)).unwrap();
    let ping = flows.open(Kind::Echo, key(7, 0), (), at(0)).unwrap();
    assert_eq!(flows.next_expiry(), Some(at(10)), "DNS and ping go first");
    assert_eq!(flows.expired(at(9)), None);
    let mut gone = Vec::new();
    while let Some(id) = flows.expired(at(10)) {
        assert_eq!(flows.close(id), Closing::Now);
        flows.remove(id);
        gone.push(id);
    }
    gone.sort();
    let mut expected = vec![dns, ping];
    expected.sort();
    assert_eq!(gone, expected);
    // Traffic keeps a flow alive: a datagram at 50 s moves its expiry to 110 s.
    flows.on_datagram(web, at(50), None);
    assert_eq!(flows.expired(at(60)), None);
    assert_eq!(flows.next_expiry(), Some(at(110)));
    assert_eq!(flows.expired(at(110)), Some(web));
    assert_eq!(flows.counters.flows_expired, 3);
}

#[test]
fn a_full_table_evicts_the_longest_idle_flow() {
    let mut flows: Flows<()> = Flows::new(limits(3));
    let a = flows.open(Kind::Udp, key(1, 443), (), at(1)).unwrap();
    let b = flows.open(Kind::Udp, key(2, 53), (), at(2)).unwrap();
    let c = flows.open(Kind::Echo, key(3, 0), (), at(3)).unwrap();
    assert_eq!(flows.evict_for_new(), Some(a));
    flows.on_datagram(a, at(4), None);
    assert_eq!(flows.evict_for_new(), Some(b), "a was used again");
    flows.close(b);
    assert_eq!(flows.evict_for_new(), None, "closing flows leave room");
    assert_eq!(
        flows.find(Kind::Udp, key(2, 53)),
        None,
        "its key is free again"
    );
    assert!(
        flows.get(b).is_some(),
        "but it is there until its socket is closed"
    );
    let _ = c;
    assert_eq!(flows.counters.flows_evicted, 2);
}

#[test]
fn a_flow_with_a_receive_armed_is_closed_after_its_cancel() {
    let mut flows: Flows<()> = Flows::new(limits(8));
    let mut tx = TxPool::new(4, 1500, Offload::None).unwrap();
    let id = flows.open(Kind::Udp, key(1, 443), (), at(0)).unwrap();
    assert!(flows.arm_recv(id));
    assert!(!flows.arm_recv(id), "one receive at a time");
    assert_eq!(flows.close(id), Closing::Cancel);
    let last = flows.on_received(id, at(1), Err(RecvError::Other), false, &mut tx);
    assert_eq!(last, Received::Close);
}

#[test]
fn server_datagrams_become_replies_and_errors_become_icmp() {
    let mut flows: Flows<()> = Flows::new(limits(8));
    let mut tx = TxPool::new(4, 1500, Offload::None).unwrap();
    let k = key(5353, 53);
    let id = flows.open(Kind::Udp, k, (), at(0)).unwrap();
    let query = crate::wire::demux::tests::udp_packet(k.client, k.server, b"query");
    flows.on_datagram(id, at(0), Some(Quote::of(&query)));
    flows.arm_recv(id);
    let kept = receive(&mut flows, id, at(1), b"answer", true, &mut tx);
    assert_eq!(kept, Received::Nothing, "the multishot receive stays armed");
    let refused = flows.on_received(
        id,
        at(2),
        Err(RecvError::Unreachable(Reason::Port)),
        false,
        &mut tx,
    );
    assert_eq!(refused, Received::Rearm);
    let packets = ready(&mut tx);
    assert_eq!(packets.len(), 2);
    let Parsed::Udp { key: back, .. } = parse(&packets[0]) else {
        panic!("the reply is not UDP");
    };
    assert_eq!((back.client, back.server), (k.server, k.client));
    let icmp = &packets[1][20..];
    assert_eq!(
        (icmp[0], icmp[1]),
        (3, 3),
        "port unreachable for the client"
    );
    assert_eq!(flows.counters.datagrams_down, 1);
    assert_eq!(flows.counters.recv_errors, 1);
    assert_eq!(flows.get(id).unwrap().bytes(), (0, 6), "the answer's bytes");
}

#[test]
fn only_unreachable_errors_reach_a_udp_client_and_a_lack_of_buffers_is_no_error() {
    let mut flows: Flows<()> = Flows::new(limits(8));
    let mut tx = TxPool::new(4, 1500, Offload::None).unwrap();
    let k = key(4000, 443);
    let udp = flows.open(Kind::Udp, k, (), at(0)).unwrap();
    let ping = flows.open(Kind::Echo, key(7, 0), (), at(0)).unwrap();
    let query = crate::wire::demux::tests::udp_packet(k.client, k.server, b"q");
    flows.on_datagram(udp, at(0), Some(Quote::of(&query)));
    let unreachable = Err(RecvError::Unreachable(Reason::Host));
    for (id, error) in [
        (udp, Err(RecvError::NoBuffers)),
        (udp, Err(RecvError::Other)),
        (ping, unreachable),
        (udp, unreachable),
    ] {
        flows.arm_recv(id);
        assert_eq!(
            flows.on_received(id, at(1), error, false, &mut tx),
            Received::Rearm
        );
    }
    let packets = ready(&mut tx);
    assert_eq!(packets.len(), 1, "one ICMP error, the UDP flow's");
    assert_eq!((packets[0][20], packets[0][21]), (3, 1), "host unreachable");
    assert_eq!(flows.counters.recv_errors, 3, "all but the lack of buffers");
}

#[test]
fn an_empty_server_datagram_becomes_an_empty_reply() {
    let mut flows: Flows<()> = Flows::new(limits(8));
    let mut tx = TxPool::new(4, 1500, Offload::None).unwrap();
    let k = key(4000, 7);
    let id = flows.open(Kind::Udp, k, (), at(0)).unwrap();
    flows.arm_recv(id);
    // A receive of 0 bytes ends the multishot receive: re-armed, not an error.
    let empty = receive(&mut flows, id, at(1), b"", false, &mut tx);
    assert_eq!(empty, Received::Rearm);
    let packets = ready(&mut tx);
    assert_eq!(packets.len(), 1);
    let Parsed::Udp {
        key: back,
        payload_len,
        ..
    } = parse(&packets[0])
    else {
        panic!("the reply is not UDP");
    };
    assert_eq!(
        (back.client, back.server, payload_len),
        (k.server, k.client, 0)
    );
    assert_eq!(
        (flows.counters.datagrams_down, flows.counters.recv_errors),
        (1, 0)
    );
}

/// What a ping flow's raw ICMPv6 socket reads: an echo reply with `ident`.
fn echo_reply_v6(ident: u16, seq: u16) -> Vec<u8> {
    let mut reply = [0u8; 64];
    let len = icmp::echo_request(&mut reply, false, ident, seq, b"data");
    reply[0] = 129;
    reply[..len].to_vec()
}

/// The echo identifiers of the ICMPv6 packets `tx` holds for the client.
fn client_idents(tx: &mut TxPool) -> Vec<u16> {
    ready(tx)
        .iter()
        .map(|packet| {
            let ip = smoltcp::wire::Ipv6Packet::new_checked(&packet[..]).unwrap();
            smoltcp::wire::Icmpv6Packet::new_checked(ip.payload())
                .unwrap()
                .echo_ident()
        })
        .collect()
}

#[test]
fn pings_to_one_host_get_their_own_identifiers_and_replies() {
    use crate::wire::demux::tests::v6;
    let mut flows: Flows<()> = Flows::new(limits(8));
    let mut tx = TxPool::new(8, 1500, Offload::None).unwrap();
    let server = v6(2, 0);
    // Client identifiers for which the identifier once derived from the flow's
    // generation and the client's (generation * 0x9e37 ^ client ^ 0x8000) was the
    // same for the first two flows: 0x8001.
    let (first, second) = (1, 0x9e37 ^ 1);
    let ping = |flows: &mut Flows<()>, ident| {
        let key = FlowKey {
            client: v6(1, ident),
            server,
        };
        flows.open(Kind::Echo, key, (), at(0)).unwrap()
    };
    let a = ping(&mut flows, first);
    let b = ping(&mut flows, second);
    let (out_a, out_b) = (
        flows.get(a).unwrap().echo_ident(),
        flows.get(b).unwrap().echo_ident(),
    );
    assert_ne!(out_a, out_b, "one identifier for two pings to one host");
    assert!(![first, second].contains(&out_a) && ![first, second].contains(&out_b));
    // Each flow's socket reads both replies; each relays only its own, with its
    // client's identifier.
    for id in [a, b] {
        flows.arm_recv(id);
        for ident in [out_a, out_b] {
            receive(
                &mut flows,
                id,
                at(1),
                &echo_reply_v6(ident, 5),
                true,
                &mut tx,
            );
        }
    }
    assert_eq!(client_idents(&mut tx), vec![first, second]);
    assert_eq!(flows.counters.echo_replies, 2);
}

#[test]
fn a_ping_is_refused_when_every_identifier_to_its_host_is_taken() {
    use crate::wire::demux::tests::v6;
    let mut flows: Flows<()> = Flows::new(limits(usize::MAX));
    let pair = |client, server| FlowKey { client, server };
    let key = |client| pair(v6(1, client), v6(2, 0));
    let mut opened = Vec::new();
    let mut outbound = std::collections::HashSet::new();
    let mut refused = 0;
    let (other, another) = (pair(v6(3, 7), v6(2, 0)), pair(v6(3, 8), v6(2, 0)));
    for client in 0..=u16::MAX {
        match flows.open(Kind::Echo, key(client), (), at(0)) {
            Ok(id) => opened.push(id),
            Err(()) => refused += 1,
        }
    }
    // An identifier left only to the client it must not go to goes to another.
    if opened.len() < 65536 {
        opened.push(flows.open(Kind::Echo, other, (), at(0)).unwrap());
    }
    for &id in &opened {
        outbound.insert(flows.get(id).unwrap().echo_ident());
    }
    assert_eq!(outbound.len(), 65536, "unique identifiers");
    // Known before a socket is made or a flow evicted for it.
    assert!(flows.refuses(Kind::Echo, another));
    assert!(!flows.refuses(Kind::Udp, another));
    assert_eq!(flows.open(Kind::Echo, another, (), at(0)), Err(()));
    assert_eq!(flows.counters.echo_no_ident, refused + 2);
    // Another host has its own; a closing flow gives its identifier back, once.
    let elsewhere = pair(v6(3, 8), v6(4, 0));
    assert!(flows.open(Kind::Echo, elsewhere, (), at(0)).is_ok());
    let gone = opened[0];
    let freed = flows.get(gone).unwrap().echo_ident();
    flows.close(gone);
    assert!(!flows.refuses(Kind::Echo, another));
    let id = flows.open(Kind::Echo, another, (), at(0)).unwrap();
    assert_eq!(flows.get(id).unwrap().echo_ident(), freed);
    flows.remove(gone);
    assert_eq!(flows.open(Kind::Echo, key(9), (), at(0)), Err(()));
}

#[test]
fn ping_flows_are_counted_apart_and_flows_carry_their_bytes_and_age() {
    let mut flows: Flows<()> = Flows::new(limits(8));
    let udp = flows.open(Kind::Udp, key(1, 443), (), at(3)).unwrap();
    let ping = flows.open(Kind::Echo, key(7, 0), (), at(4)).unwrap();
    flows.relayed_up(udp, 2, 2800);
    flows.relayed_up(ping, 1, 64);
    assert_eq!(flows.counters.flows_opened, 2);
    assert_eq!(flows.counters.echo_flows_opened, 1);
    assert_eq!(
        (
            flows.counters.echo_datagrams_up,
            flows.counters.echo_bytes_up
        ),
        (1, 64)
    );
    let flow = flows.get(udp).unwrap();
    assert_eq!(
        (flow.bytes(), flow.opened(), flow.kind()),
        ((2800, 0), at(3), Kind::Udp)
    );
    assert_eq!(flows.open_by_kind(), (1, 1));
    flows.close(ping);
    assert_eq!(flows.open_by_kind(), (1, 0), "a closing flow is not open");
    assert!(flows.at_slot(ping.slot).unwrap().is_closing());
    assert!(flows.at_slot(flows.slot_end()).is_none());
}

/// What `tx` holds for the client, taken: each packet's bytes, and for a gathered one
/// its headers and where the rest is to come from.
fn writes(tx: &mut TxPool) -> Vec<(Vec<u8>, Option<InBuffer>)> {
    let mut all = Vec::new();
    tx.take_writes(|write| {
        all.push(match write {
            Write::Packet(_, packet) => (packet.region.kernel_read(packet.range), None),
            Write::Gathered {
                headers, payload, ..
            } => (headers.region.kernel_read(headers.range), Some(payload)),
        });
        true
    });
    all
}

#[test]
fn a_direct_flows_super_packet_is_written_from_its_receive_buffer_while_slots_last() {
    let mut flows: Flows<()> = Flows::new(limits(8));
    let mut tx = TxPool::new(4, 1500, Offload::Uso).unwrap();
    let id = flows.open(Kind::Udp, key(5000, 443), (), at(0)).unwrap();
    flows.arm_recv(id);
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let mut ranges = Vec::new();
    split(&data, Some(1200), &mut ranges);
    let within = InBuffer {
        group: 1,
        bid: 7,
        start: 80,
        len: 3000,
    };
    let mut receive = |tx: &mut TxPool, received_in, datagrams: &[std::ops::Range<usize>]| {
        let batch = Arrival {
            bytes: &data,
            datagrams,
            received_in,
        };
        flows.on_received(id, at(1), Ok(batch), true, tx);
        tx.take_gathered()
    };
    assert_eq!(
        receive(&mut tx, Some(within), &ranges),
        Some(within),
        "gathered"
    );
    assert_eq!(
        receive(&mut tx, None, &ranges),
        None,
        "through a relay: copied"
    );
    let lone = std::slice::from_ref(&(0..1200));
    assert_eq!(
        receive(&mut tx, Some(within), lone),
        None,
        "one datagram: copied"
    );
    let written = writes(&mut tx);
    assert_eq!(written.len(), 3);
    assert_eq!(written[0].1, Some(within));
    let mut gathered = written[0].0.clone();
    gathered.extend(&data);
    assert_eq!(gathered, written[1].0, "the same packet as the copy");
    assert_eq!(written[1].1, None);
    assert_eq!(written[2].0.len(), 10 + 28 + 1200);
    // Every slot holds a receive buffer until its write completes (the first still
    // does): then copies.
    let more = (0..100)
        .take_while(|_| receive(&mut tx, Some(within), &ranges) == Some(within))
        .count();
    assert_eq!(more, 63);
    let written = writes(&mut tx);
    assert_eq!(written.len(), 64);
    assert!(written[..63].iter().all(|(_, payload)| payload.is_some()));
    assert_eq!(written[63].1, None, "copied with no slot free");
    tx.release_gathered(3);
    assert_eq!(
        receive(&mut tx, Some(within), &ranges),
        Some(within),
        "a slot back"
    );
    let counters = &flows.counters;
    assert_eq!(
        (counters.gathered_down, counters.super_packets_down),
        (65, 67)
    );
}
