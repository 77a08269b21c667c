//! End-to-end tests of UDP offload on the way down: a server that sends with UDP_SEGMENT
//! (44 datagrams of 1,350 bytes a send, the last shorter, as QUIC stacks do) and plainly,
//! and a client that receives without GRO and checks every datagram's length, sequence
//! number and bytes, in order, and the hash of them all; over IPv4 and IPv6, with the
//! TUN's USO on (coalesced receives leave as one super-packet each) and off (one write
//! per datagram), and through a SOCKS5 relay (danted). The proxy's counters say which,
//! and that a direct flow's super-packets are written from the receive buffer (gathered).

mod common;

use std::io::{IoSlice, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::setsockopt;
use nix::sys::socket::sockopt::RcvBufForce;
use sha2::{Digest, Sha256};
use socket2::{MsgHdr, SockAddr, SockRef};

use common::socks::{danted, upstream_arg};
use common::tool_or_skip;
use common::{ANY, Topology, in_netns, join, udp_client};

/// Payload of each datagram of a GSO send but its last.
const SIZE: usize = 1350;
/// Datagrams in each GSO send.
const PER_SEND: usize = 44;
/// GSO sends (unless the client asks for fewer), then plain datagrams of these lengths,
/// in each round.
const GSO_SENDS: u8 = 2;
const PLAIN: [usize; 3] = [1, SIZE, 700];
/// Rounds of a run: the client asks for each when it has every datagram of the last,
/// so no queue along the way overflows and any loss is the proxy's.
const ROUNDS: u32 = 12;
/// A lost datagram fails the run after this.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Each datagram of round `round` with `gso_sends` GSO sends, as (sequence number,
/// length), grouped by send.
fn round_sends(round: u32, gso_sends: u8) -> Vec<Vec<(u32, usize)>> {
    let mut seq = round * 1000;
    let mut next = |len| {
        seq += 1;
        (seq, len)
    };
    let mut sends = Vec::new();
    for send in 0..usize::from(gso_sends) {
        let last = 100 + (round as usize * 37 + send * 11) % (SIZE - 100);
        let lens = (0..PER_SEND).map(|i| if i + 1 < PER_SEND { SIZE } else { last });
        sends.push(lens.map(&mut next).collect());
    }
    sends.extend(PLAIN.map(|len| vec![next(len)]));
    sends
}

/// Datagram `seq`'s bytes: its sequence number, then bytes only it has.
fn datagram(seq: u32, len: usize) -> Vec<u8> {
    let mut state = u64::from(seq).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes: Vec<u8> = seq.to_be_bytes().into_iter().take(len).collect();
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.push(state as u8);
    }
    bytes
}

/// Sends round `round`'s datagrams to `to` on `socket`, each after `header` (a SOCKS5
/// relay's); returns the hash of the datagrams (without headers).
fn answer(socket: &UdpSocket, to: SocketAddr, header: &[u8], request: [u8; 5]) -> Sha256 {
    let mut hash = Sha256::new();
    let to = SockAddr::from(to);
    let gso = udp_segment_cmsg((header.len() + SIZE) as u16);
    let round = u32::from_be_bytes(request[..4].try_into().unwrap());
    for send in round_sends(round, request[4]) {
        let mut bytes = Vec::new();
        for &(seq, len) in &send {
            let datagram = datagram(seq, len);
            hash.update(&datagram);
            bytes.extend(header);
            bytes.extend(datagram);
        }
        let iov = [IoSlice::new(&bytes)];
        let mut message = MsgHdr::new().with_buffers(&iov).with_addr(&to);
        if send.len() > 1 {
            message = message.with_control(&gso);
        }
        SockRef::from(socket)
            .sendmsg(&message, 0)
            .expect("send to the client");
    }
    hash
}

/// Answers `rounds` requests (a round number and its GSO sends, after the relay header
/// whose length `header_len` tells, which the answer repeats) on `socket`, or stops
/// after a minute; returns the hash of everything sent.
fn serve_rounds(
    socket: &UdpSocket,
    header_len: fn(&[u8]) -> Option<usize>,
    rounds: u32,
) -> Vec<u8> {
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let (mut hashes, mut request) = (Vec::new(), [0u8; 64]);
    let end = Instant::now() + Duration::from_secs(60);
    while hashes.len() < rounds as usize && Instant::now() < end {
        let Ok((n, from)) = socket.recv_from(&mut request) else {
            continue;
        };
        let Some(header_len) = header_len(&request[..n]) else {
            continue;
        };
        let Some(Ok(round)) = request[..n].get(header_len..).map(<[u8; 5]>::try_from) else {
            continue;
        };
        hashes.push(answer(socket, from, &request[..header_len], round));
    }
    let mut all = Sha256::new();
    for hash in hashes {
        all.update(hash.finalize());
    }
    all.finalize().to_vec()
}

/// A server on `port` (both families) that answers `rounds` requests; it returns the
/// hash of everything it sent.
fn gso_server(topo: &Topology, port: u16, rounds: u32) -> JoinHandle<Vec<u8>> {
    let (ready, is_ready) = mpsc::channel();
    let server = topo.in_server(move || {
        let socket = UdpSocket::bind((ANY, port)).expect("bind the server");
        ready.send(()).unwrap();
        serve_rounds(&socket, |_| Some(0), rounds)
    });
    is_ready.recv().expect("server started");
    server
}

/// A UDP_SEGMENT control message: the send is cut into datagrams of `size` bytes.
fn udp_segment_cmsg(size: u16) -> Vec<u8> {
    const SOL_UDP: i32 = 17;
    const UDP_SEGMENT: i32 = 103;
    let header = size_of::<usize>() + 8;
    let mut cmsg = (header + 2).to_ne_bytes().to_vec();
    cmsg.extend(SOL_UDP.to_ne_bytes());
    cmsg.extend(UDP_SEGMENT.to_ne_bytes());
    cmsg.extend(size.to_ne_bytes());
    cmsg.resize((header + 2).next_multiple_of(size_of::<usize>()), 0);
    cmsg
}

/// Asks `server` for `ROUNDS` rounds from the client namespace and checks each datagram
/// as it comes, in order; returns the hash of all of them.
fn receive_rounds(topo: &Topology, server: SocketAddr, gso_sends: u8) -> Vec<u8> {
    join(topo.in_client(move || {
        let socket = udp_client(server, RECV_TIMEOUT);
        // Room for a whole round, should the client be descheduled while it comes.
        setsockopt(&socket, RcvBufForce, &(4 << 20)).expect("SO_RCVBUFFORCE");
        let mut all = Sha256::new();
        let mut buf = vec![0u8; 65536];
        for round in 0..ROUNDS {
            let mut hash = Sha256::new();
            let mut request = round.to_be_bytes().to_vec();
            request.push(gso_sends);
            socket.send(&request).expect("ask for a round");
            for (seq, len) in round_sends(round, gso_sends).into_iter().flatten() {
                let n = socket.recv(&mut buf).unwrap_or_else(|err| {
                    panic!("{server}: datagram {seq} ({len} bytes) of round {round}: {err}")
                });
                assert_eq!(n, len, "{server}: length of datagram {seq}");
                let got = u32::from_be_bytes(buf[..4.min(n)].try_into().unwrap_or([0; 4]));
                assert!(
                    buf[..n] == datagram(seq, len)[..],
                    "{server}: datagram {seq} ({len} bytes) came with other bytes (numbered {got})"
                );
                hash.update(&buf[..n]);
            }
            all.update(hash.finalize());
        }
        all.finalize().to_vec()
    }))
}

/// Runs the rounds to `ip` on `port` and checks the client got all the server sent.
fn run(topo: &Topology, ip: IpAddr, port: u16, gso_sends: u8) {
    let server = gso_server(topo, port, ROUNDS);
    let received = receive_rounds(topo, SocketAddr::new(ip, port), gso_sends);
    assert_eq!(received, join(server), "hash of all datagrams via {ip}");
}

/// The last value printed for `label` in the proxy's counters.
fn counter(stats: &str, label: &str) -> u64 {
    let at = stats
        .rfind(&format!(" {label} "))
        .unwrap_or_else(|| panic!("no {label} in:\n{stats}"));
    let digits: String = stats[at + label.len() + 2..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect("a number")
}

/// The datagrams sent in all rounds, and how many came through a GSO send.
fn totals() -> (u64, u64) {
    let sends: Vec<Vec<(u32, usize)>> = (0..ROUNDS)
        .flat_map(|round| round_sends(round, GSO_SENDS))
        .collect();
    let all = sends.iter().map(Vec::len).sum::<usize>() as u64;
    let gso = sends
        .iter()
        .filter(|s| s.len() > 1)
        .map(Vec::len)
        .sum::<usize>() as u64;
    (all, gso)
}

#[test]
fn gso_and_plain_datagrams_reach_the_client_as_sent_in_super_packets() {
    let Some(topo) = Topology::for_test("gso_and_plain_datagrams_in_super_packets") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    run(&topo, topo.server_v4(), 7300, GSO_SENDS);
    run(&topo, topo.server_v6(), 7301, GSO_SENDS);
    let stats = proxy.stats();
    assert!(
        stats.contains("offload uso"),
        "the TUN took no USO:\n{stats}"
    );
    let (all, gso) = totals();
    let super_packets = counter(&stats, "udp-super-packets-out");
    let in_them = counter(&stats, "udp-datagrams-in-super-packets-out");
    // Each GSO send reaches the proxy's socket whole, one receive; plain datagrams
    // may be coalesced too (by the veth's GRO), when they are of one size.
    assert!(super_packets >= 2 * u64::from(ROUNDS), "{stats}");
    assert!(in_them >= 2 * gso && in_them <= 2 * all, "{stats}");
    assert_eq!(
        counter(&stats, "udp-per-datagram-fallbacks-out"),
        0,
        "{stats}"
    );
    assert!(counter(&stats, "udp-coalesced-receives") >= super_packets);
    // Rounds go one at a time, so a header slot is always free: no payload is copied.
    assert_eq!(
        counter(&stats, "udp-gathered-out"),
        super_packets,
        "{stats}"
    );
    proxy.assert_running();
}

#[test]
fn without_uso_on_the_tun_each_datagram_is_written_alone() {
    let Some(topo) = Topology::for_test("without_uso_each_datagram_is_written_alone") else {
        return;
    };
    let mut proxy = topo.start_proxy_with_env(&[], &[("URINGPROXY_MAX_OFFLOAD", "tso")]);
    run(&topo, topo.server_v4(), 7302, GSO_SENDS);
    run(&topo, topo.server_v6(), 7303, GSO_SENDS);
    let stats = proxy.stats();
    assert!(stats.contains("offload tso"), "{stats}");
    assert_eq!(counter(&stats, "udp-super-packets-out"), 0, "{stats}");
    let coalesced = counter(&stats, "udp-coalesced-receives");
    assert!(coalesced >= 2 * u64::from(ROUNDS), "{stats}");
    assert_eq!(
        counter(&stats, "udp-per-datagram-fallbacks-out"),
        coalesced,
        "{stats}"
    );
    proxy.assert_running();
}

/// Through danted: the server's GSO sends reach the relay as datagrams, which it relays
/// one by one, each with its SOCKS5 header.
#[test]
fn through_danted_every_datagram_arrives_as_sent() {
    const TEST: &str = "through_danted_every_datagram_arrives_as_sent";
    if !tool_or_skip("danted", TEST) {
        return;
    }
    let Some(topo) = Topology::for_test(TEST) else {
        return;
    };
    let socks = danted(&topo);
    let upstream = upstream_arg(socks.addr, None);
    let mut proxy = topo.start_proxy(&["--upstream", &upstream]);
    // One GSO send a round: danted's socket (default buffer) takes it split, 44 at once.
    run(&topo, topo.server_v4(), 7304, 1);
    run(&topo, topo.server_v6(), 7305, 1);
    let stats = proxy.stats();
    assert!(
        stats.contains("udp associations 2 ended 0 fragments 0 malformed 0 "),
        "{stats}"
    );
    proxy.assert_running();
}

/// A SOCKS5 relay that is itself the server (for one association): it answers the
/// greeting and UDP ASSOCIATE on `stream` (its socket in `namespace`), then each round asked for through it with
/// GSO sends of datagrams each behind the relay header of the server addressed, as a
/// relay that coalesces its sends would. Returns the hash of the datagrams it sent.
fn gso_relay(mut stream: TcpStream, namespace: &str) -> Vec<u8> {
    let mut greeting = [0u8; 3];
    stream.read_exact(&mut greeting).expect("greeting");
    assert_eq!(greeting, [5, 1, 0], "no-auth greeting");
    stream.write_all(&[5, 0]).unwrap();
    let mut request = [0u8; 4];
    stream.read_exact(&mut request).expect("request");
    assert_eq!(request[..3], [5, 3, 0], "UDP ASSOCIATE");
    let mut address = vec![0u8; if request[3] == 4 { 18 } else { 6 }];
    stream.read_exact(&mut address).expect("request's address");
    let IpAddr::V4(ip) = stream.local_addr().unwrap().ip() else {
        panic!("the relay listens on IPv4");
    };
    // Handlers run outside the server namespace; the relay's socket is made in it.
    let socket = join(in_netns(namespace, move || UdpSocket::bind((ip, 0))));
    let socket = socket.expect("bind the relay");
    let mut reply = vec![5, 0, 0, 1];
    reply.extend(ip.octets());
    reply.extend(socket.local_addr().unwrap().port().to_be_bytes());
    stream.write_all(&reply).unwrap();
    // RSV RSV FRAG, then the address type: 10 bytes for IPv4, 22 for IPv6.
    let header_len = |datagram: &[u8]| match datagram.get(..4)? {
        [0, 0, 0, 1] => Some(10),
        [0, 0, 0, 4] => Some(22),
        _ => None,
    };
    serve_rounds(&socket, header_len, ROUNDS)
}

#[test]
fn through_a_socks5_relay_coalesced_datagrams_lose_each_header() {
    let Some(topo) = Topology::for_test("coalesced_datagrams_lose_each_header") else {
        return;
    };
    let namespace = topo.server_ns().to_string();
    let relay = topo.serve(topo.server_v4(), 2, move |stream| {
        gso_relay(stream, &namespace)
    });
    let upstream = upstream_arg(relay.addr(), None);
    let mut proxy = topo.start_proxy(&["--upstream", &upstream]);
    let received = [topo.server_v4(), topo.server_v6()]
        .map(|ip| receive_rounds(&topo, SocketAddr::new(ip, 7306), GSO_SENDS));
    assert_eq!(received.to_vec(), relay.join(), "hash of all datagrams");
    let stats = proxy.stats();
    assert!(stats.contains("fragments 0 malformed 0 "), "{stats}");
    assert!(
        counter(&stats, "udp-super-packets-out") >= 2 * u64::from(ROUNDS),
        "{stats}"
    );
    assert_eq!(
        counter(&stats, "udp-per-datagram-fallbacks-out"),
        0,
        "{stats}"
    );
    // Each datagram had its relay header in front: the payload is copied without them.
    assert_eq!(counter(&stats, "udp-gathered-out"), 0, "{stats}");
    proxy.assert_running();
}
