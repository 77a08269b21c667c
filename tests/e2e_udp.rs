//! End-to-end datagram tests: UDP echo over IPv4 and IPv6 with many flows at once, idle
//! expiry closing the proxy's sockets, DNS (1,000 queries over UDP from one socket, and
//! over TCP) against a small DNS responder in the server namespace, `ping` through the
//! proxy to a live host and to an address with no host, two pingers to one host each
//! getting only their own replies, and the ICMP errors that make failures look as they
//! do on the direct path. Empty and largest datagrams cross both
//! ways, with the servers routed into the TUN and with everything routed into it.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    ANY, Topology, check_response, dns_query, dns_response, echo_once, join, ping, udp_client,
    udp_echo_server, wait_until,
};

const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Opens `count` UDP flows to `server` from the client namespace, one echo each, and
/// returns the client sockets (still open).
fn open_echo_flows(topo: &Topology, server: SocketAddr, count: usize) -> Vec<UdpSocket> {
    join(topo.in_client(move || {
        (0..count)
            .map(|flow| {
                let socket = UdpSocket::bind(("0.0.0.0", 0)).expect("bind client");
                socket.connect(server).expect("connect");
                socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let sent = payload(flow, 100);
                assert_eq!(echo_once(&socket, &sent), sent, "flow {flow}");
                socket
            })
            .collect()
    }))
}

fn payload(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 131 + seed * 7) as u8).collect()
}

#[test]
fn udp_echo_many_flows_ipv4_and_ipv6() {
    const PORT: u16 = 7100;
    const FLOWS: usize = 32;
    let Some(topo) = Topology::for_test("udp_echo_many_flows_ipv4_and_ipv6") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    udp_echo_server(&topo, PORT, Duration::from_secs(60));
    let servers = [topo.server_v4(), topo.server_v6()];
    let results = join(topo.in_client(move || {
        let clients: Vec<_> = (0..FLOWS)
            .map(|flow| {
                let server = SocketAddr::new(servers[flow % 2], PORT);
                thread::spawn(move || {
                    let socket = udp_client(server, IO_TIMEOUT);
                    let mut mismatches = 0;
                    for (round, len) in [1, 64, 512, 1000, 1400].into_iter().enumerate() {
                        let sent = payload(flow * 10 + round, len);
                        if echo_once(&socket, &sent) != sent {
                            mismatches += 1;
                        }
                    }
                    mismatches
                })
            })
            .collect();
        clients.into_iter().map(join).collect::<Vec<_>>()
    }));
    assert_eq!(results, vec![0; FLOWS], "mismatched echoes per flow");
    let stats = proxy.stats();
    assert!(
        stats.contains("udp: flows opened 32 "),
        "expected 32 UDP flows:\n{stats}"
    );
    proxy.assert_running();
}

#[test]
fn udp_segmentation_super_packets_are_split_into_their_datagrams() {
    const PORT: u16 = 7103;
    const SEGMENT: usize = 1000;
    const SEGMENTS: usize = 5;
    let Some(topo) = Topology::for_test("udp_segmentation_super_packets_are_split") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    let (ready, is_ready) = mpsc::channel();
    let server = SocketAddr::new(topo.server_v4(), PORT);
    let receiver = topo.in_server(move || {
        let socket = UdpSocket::bind(server).expect("bind");
        socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        ready.send(()).unwrap();
        let mut sizes = Vec::new();
        let mut buf = [0u8; 65536];
        while sizes.len() < SEGMENTS {
            let Ok(n) = socket.recv(&mut buf) else { break };
            sizes.push(n);
        }
        sizes
    });
    is_ready.recv().unwrap();
    join(topo.in_client(move || {
        let socket = UdpSocket::bind(("0.0.0.0", 0)).expect("bind");
        socket.connect(server).expect("connect");
        // One send of 5 x 1000 bytes that the kernel hands the TUN as one UDP
        // segmentation super-packet (USO is negotiated by default).
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::UdpGsoSegment,
            &(SEGMENT as i32),
        )
        .expect("UDP_SEGMENT");
        socket.send(&payload(1, SEGMENT * SEGMENTS)).expect("send");
    }));
    assert_eq!(
        join(receiver),
        vec![SEGMENT; SEGMENTS],
        "datagrams the server received"
    );
    let stats = proxy.stats();
    // A suite run with the TUN's offload capped (URINGPROXY_MAX_OFFLOAD, inherited by
    // the proxy) has no USO: the client's kernel then splits the send itself.
    if std::env::var_os("URINGPROXY_MAX_OFFLOAD").is_none() {
        assert!(
            !stats.contains("super-packets in 0 "),
            "the send should have crossed the TUN as a super-packet:\n{stats}"
        );
    }
    proxy.assert_running();
}

/// With the TUN at its largest MTU, echoes of empty datagrams and of the largest one a
/// single IP packet carries (65,507 bytes of payload over IPv4, 65,487 over IPv6) cross
/// the proxy both ways, each byte checked, none of them a receive error.
fn empty_and_largest_datagrams_echo(topo: &Topology, proxy: &mut common::Proxy, port: u16) {
    udp_echo_server(topo, port, Duration::from_secs(60));
    for (server, largest) in [(topo.server_v4(), 65507), (topo.server_v6(), 65487)] {
        let server = SocketAddr::new(server, port);
        let echoed = join(topo.in_client(move || {
            let socket = udp_client(server, IO_TIMEOUT);
            [0, 1, 0, largest, 0]
                .into_iter()
                .enumerate()
                .map(|(round, len)| {
                    let sent = payload(round, len);
                    (len, echo_once(&socket, &sent) == sent)
                })
                .collect::<Vec<_>>()
        }));
        let expected: Vec<_> = [0, 1, 0, largest, 0].map(|len| (len, true)).into();
        assert_eq!(echoed, expected, "(length, echoed intact) via {server}");
    }
    let stats = proxy.stats();
    assert!(
        stats.contains("recv-errors 0 "),
        "a server's datagram taken for an error:\n{stats}"
    );
    proxy.assert_running();
}

#[test]
fn empty_and_largest_datagrams_cross_both_ways() {
    let Some(topo) = Topology::for_test("empty_and_largest_datagrams_cross_both_ways") else {
        return;
    };
    let mut proxy = topo.start_proxy(&["--mtu", "65535"]);
    empty_and_largest_datagrams_echo(&topo, &mut proxy, 7104);
}

#[test]
fn empty_and_largest_datagrams_cross_with_everything_routed() {
    let Some(topo) = Topology::for_test("empty_and_largest_datagrams_cross_with_everything") else {
        return;
    };
    let args = ["--mtu", "65535", "--route", "0.0.0.0/0", "--route", "::/0"];
    let mut proxy = topo.start_proxy_unrouted(&args, &[]);
    empty_and_largest_datagrams_echo(&topo, &mut proxy, 7105);
}

#[test]
fn idle_udp_flows_expire_and_close_their_sockets() {
    const PORT: u16 = 7101;
    const FLOWS: usize = 20;
    let Some(topo) = Topology::for_test("idle_udp_flows_expire_and_close_their_sockets") else {
        return;
    };
    let mut proxy = topo.start_proxy(&["--udp-timeout", "1"]);
    udp_echo_server(&topo, PORT, Duration::from_secs(30));
    let baseline = proxy.settled_fd_count();
    // Keep the client sockets open: only the proxy's idle timeout may end the flows.
    let sockets = open_echo_flows(&topo, SocketAddr::new(topo.server_v4(), PORT), FLOWS);
    assert!(
        proxy.fd_count() >= baseline + FLOWS,
        "expected {FLOWS} outbound UDP sockets over the baseline {baseline}"
    );
    let closed = wait_until(Duration::from_secs(6), || proxy.fd_count() <= baseline);
    assert!(
        closed,
        "UDP sockets still open: {} fds, baseline {baseline}",
        proxy.fd_count()
    );
    let stats = proxy.stats();
    assert!(
        stats.contains(&format!("expired {FLOWS} ")),
        "expected {FLOWS} expiries:\n{stats}"
    );
    drop(sockets);
    proxy.assert_running();
}

#[test]
fn udp_table_evicts_the_longest_idle_flow_when_full() {
    const PORT: u16 = 7102;
    const LIMIT: usize = 4;
    let Some(topo) = Topology::for_test("udp_table_evicts_the_longest_idle_flow_when_full") else {
        return;
    };
    let mut proxy = topo.start_proxy(&["--max-udp-flows", "4"]);
    udp_echo_server(&topo, PORT, Duration::from_secs(30));
    let baseline = proxy.settled_fd_count();
    let sockets = open_echo_flows(&topo, SocketAddr::new(topo.server_v4(), PORT), 2 * LIMIT);
    // Every new flow past the limit closed an old one's socket.
    assert!(
        wait_until(Duration::from_secs(2), || proxy.fd_count()
            <= baseline + LIMIT),
        "{} fds with at most {LIMIT} UDP flows over the baseline {baseline}",
        proxy.fd_count()
    );
    let stats = proxy.stats();
    assert!(
        stats.contains(&format!("evicted {LIMIT} ")),
        "expected {LIMIT} evictions:\n{stats}"
    );
    drop(sockets);
    proxy.assert_running();
}

#[test]
fn dns_over_udp_and_tcp() {
    const QUERIES: usize = 1000;
    /// Queries in flight at once on the one client socket.
    const WINDOW: usize = 50;
    let Some(topo) = Topology::for_test("dns_over_udp_and_tcp") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    let (ready, is_ready) = mpsc::channel();
    topo.in_server(move || {
        let udp = UdpSocket::bind((ANY, 53)).expect("bind DNS/UDP");
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let tcp = TcpListener::bind((ANY, 53)).expect("bind DNS/TCP");
        tcp.set_nonblocking(true).unwrap();
        ready.send(()).unwrap();
        let end = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 512];
        while Instant::now() < end {
            if let Ok((n, from)) = udp.recv_from(&mut buf)
                && let Some(response) = dns_response(&buf[..n])
            {
                let _ = udp.send_to(&response, from);
            }
            if let Ok((mut stream, _)) = tcp.accept() {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut len = [0u8; 2];
                let mut query = vec![0u8; 512];
                if stream.read_exact(&mut len).is_ok() {
                    let n = usize::from(u16::from_be_bytes(len)).min(512);
                    if stream.read_exact(&mut query[..n]).is_ok()
                        && let Some(response) = dns_response(&query[..n])
                    {
                        let _ = stream.write_all(&(response.len() as u16).to_be_bytes());
                        let _ = stream.write_all(&response);
                    }
                }
            }
        }
    });
    is_ready.recv().expect("DNS responder started");

    for server_ip in [topo.server_v4(), topo.server_v6()] {
        let server = SocketAddr::new(server_ip, 53);
        let answered = join(topo.in_client(move || {
            let socket = udp_client(server, IO_TIMEOUT);
            let queries: Vec<Vec<u8>> = (0..QUERIES)
                .map(|i| dns_query(i as u16, &format!("host{i}.example.test")))
                .collect();
            let mut answered = vec![false; QUERIES];
            let mut buf = [0u8; 512];
            for window in queries.chunks(WINDOW) {
                // Several queries in flight on one socket, as a stub resolver does.
                for _attempt in 0..3 {
                    for query in window {
                        let id = usize::from(u16::from_be_bytes([query[0], query[1]]));
                        if !answered[id] {
                            socket.send(query).expect("send query");
                        }
                    }
                    while window
                        .iter()
                        .any(|q| !answered[usize::from(u16::from_be_bytes([q[0], q[1]]))])
                    {
                        let Ok(n) = socket.recv(&mut buf) else { break };
                        let id = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                        assert!(id < QUERIES, "unknown id {id}");
                        check_response(&queries[id], &buf[..n]);
                        answered[id] = true;
                    }
                }
            }
            answered.iter().filter(|&&a| a).count()
        }));
        assert_eq!(answered, QUERIES, "answered queries via {server_ip}");

        let tcp_ok = join(topo.in_client(move || {
            let mut stream = TcpStream::connect_timeout(&server, IO_TIMEOUT).expect("DNS/TCP");
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let query = dns_query(4242, "over-tcp.example.test");
            stream
                .write_all(&(query.len() as u16).to_be_bytes())
                .unwrap();
            stream.write_all(&query).unwrap();
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).expect("response length");
            let mut response = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut response).expect("response");
            check_response(&query, &response)
        }));
        assert_eq!(tcp_ok, 4242);
    }
    proxy.assert_running();
}

#[test]
fn ping_reaches_live_hosts_and_not_absent_ones() {
    let Some(topo) = Topology::for_test("ping_reaches_live_hosts_and_not_absent_ones") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    for target in [topo.server_v4(), topo.server_v6()] {
        let (ok, output) = ping(&topo, target, 3);
        assert!(ok, "ping {target} through the proxy failed:\n{output}");
        assert!(
            output.contains("3 received"),
            "replies from {target}:\n{output}"
        );
        assert!(
            !output.contains("duplicates"),
            "duplicate replies from {target}:\n{output}"
        );
    }
    let absent = topo.route_absent_host(77);
    let (ok, output) = ping(&topo, absent, 2);
    assert!(
        !ok,
        "ping to an absent host succeeded through the proxy:\n{output}"
    );
    assert!(
        output.contains(" 0 received"),
        "replies from an absent host:\n{output}"
    );
    let stats = proxy.stats();
    assert!(
        stats.contains("icmp: flows opened 3 "),
        "three ping flows expected:\n{stats}"
    );
    proxy.assert_running();
}

/// A pinger in the client namespace: a raw ICMP socket connected to `server` (so it
/// reads only what comes from there), sending echo requests with its own identifier and
/// noting the echo replies with it.
struct Pinger {
    socket: socket2::Socket,
    ipv4: bool,
    ident: u16,
    /// Sequence numbers of the replies read so far.
    seen: Vec<u16>,
}

impl Pinger {
    fn new(server: IpAddr, ident: u16) -> Pinger {
        use socket2::{Domain, Protocol, Socket, Type};
        let (domain, protocol) = match server {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
        };
        let socket = Socket::new(domain, Type::RAW, Some(protocol)).expect("raw socket");
        socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        socket
            .connect(&SocketAddr::new(server, 0).into())
            .expect("connect");
        Pinger {
            socket,
            ipv4: server.is_ipv4(),
            ident,
            seen: Vec::new(),
        }
    }

    /// The data of request `seq`: derived from both, so a reply shows whose it is.
    fn data(&self, seq: u16) -> Vec<u8> {
        (0..24u16)
            .map(|i| (i.wrapping_mul(31) ^ self.ident ^ seq) as u8)
            .collect()
    }

    fn send(&self, seq: u16) {
        let mut request = vec![if self.ipv4 { 8 } else { 128 }, 0, 0, 0];
        request.extend_from_slice(&self.ident.to_be_bytes());
        request.extend_from_slice(&seq.to_be_bytes());
        request.extend_from_slice(&self.data(seq));
        if self.ipv4 {
            // The kernel fills in the checksum of ICMPv6 from raw sockets, not of ICMP.
            let sum = request.chunks(2).fold(0u32, |sum, pair| {
                sum + u32::from(u16::from_be_bytes([pair[0], pair[1]]))
            });
            let folded = (sum & 0xffff) + (sum >> 16);
            let checksum = !((folded & 0xffff) + (folded >> 16)) as u16;
            request[2..4].copy_from_slice(&checksum.to_be_bytes());
        }
        self.socket.send(&request).expect("send echo request");
    }

    /// Reads until the reply to `seq` came (each read bounded by the socket's timeout,
    /// the whole by a deadline and a count of packets), noting every reply with our
    /// identifier.
    fn await_reply(&mut self, seq: u16) {
        let mut buf = [0u8; 1500];
        let deadline = Instant::now() + Duration::from_secs(30);
        for _ in 0..10_000 {
            if self.seen.contains(&seq) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no reply {seq} for pinger {} within 30 s",
                self.ident
            );
            let n = std::io::Read::read(&mut &self.socket, &mut buf)
                .unwrap_or_else(|e| panic!("no reply {seq} for pinger {}: {e}", self.ident));
            // IPv4 raw sockets read the IP header too.
            let icmp = if self.ipv4 {
                &buf[usize::from(buf[0] & 0x0f) * 4..n]
            } else {
                &buf[..n]
            };
            let reply = if self.ipv4 { 0 } else { 129 };
            if icmp.len() < 8 || icmp[0] != reply {
                continue;
            }
            let got = u16::from_be_bytes([icmp[6], icmp[7]]);
            if u16::from_be_bytes([icmp[4], icmp[5]]) == self.ident {
                assert_eq!(icmp[8..], self.data(got), "data of reply {got}");
                self.seen.push(got);
            }
        }
        panic!(
            "no reply {seq} for pinger {} among 10,000 packets",
            self.ident
        );
    }
}

#[test]
fn pingers_to_one_host_each_get_only_their_own_replies() {
    const ROUNDS: u16 = 4;
    let Some(topo) = Topology::for_test("pingers_to_one_host_each_get_only_their_own_replies")
    else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    // The datagram flows of a fresh proxy are given generations 0, 1, 2, ... Pairs of
    // client identifiers whose outbound identifiers, once derived from the generation
    // and the client's identifier alone, were one: the first two flows go to the IPv4
    // server, the next two to the IPv6 one.
    let derived = |generation: u16| generation.wrapping_mul(0x9e37);
    let pairs = [0, 2].map(|g| [1, derived(g) ^ derived(g + 1) ^ 1]);
    for (server, idents) in [topo.server_v4(), topo.server_v6()].into_iter().zip(pairs) {
        let seen = join(topo.in_client(move || {
            let mut pingers = idents.map(|ident| Pinger::new(server, ident));
            // In turn, so that the flows are opened in this order.
            for pinger in &mut pingers {
                pinger.send(1);
                pinger.await_reply(1);
            }
            for seq in 2..=ROUNDS {
                for pinger in &pingers {
                    pinger.send(seq);
                }
            }
            // Each pinger's last request goes after all of the other's: a reply to the
            // other's requests relayed to it would have come before its last one.
            for pinger in &mut pingers {
                pinger.send(ROUNDS + 1);
                pinger.await_reply(ROUNDS + 1);
            }
            pingers.map(|pinger| pinger.seen)
        }));
        for (ident, mut seen) in idents.into_iter().zip(seen) {
            seen.sort_unstable();
            let expected: Vec<u16> = (1..=ROUNDS + 1).collect();
            assert_eq!(seen, expected, "replies pinger {ident} got from {server}");
        }
    }
    let stats = proxy.stats();
    assert!(
        stats.contains("icmp: flows opened 4 "),
        "four ping flows expected:\n{stats}"
    );
    proxy.assert_running();
}

#[test]
fn failures_reach_the_client_as_icmp_errors() {
    let Some(topo) = Topology::for_test("failures_reach_the_client_as_icmp_errors") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    let absent = topo.route_absent_host(77);
    let servers = [topo.server_v4(), topo.server_v6()];
    let (udp_errors, tcp_error) = join(topo.in_client(move || {
        // A closed UDP port: the server's port unreachable becomes ECONNREFUSED.
        let udp_errors: Vec<_> = servers
            .iter()
            .map(|&server| {
                let socket = udp_client(SocketAddr::from((server, 9)), IO_TIMEOUT);
                socket.send(b"anyone there?").expect("send");
                socket.recv(&mut [0u8; 64]).map(drop).map_err(|e| e.kind())
            })
            .collect();
        // A host that does not exist: EHOSTUNREACH, not a reset.
        let tcp_error =
            TcpStream::connect_timeout(&SocketAddr::new(absent, 80), Duration::from_secs(10))
                .map(drop)
                .map_err(|e| e.kind());
        (udp_errors, tcp_error)
    }));
    for error in udp_errors {
        assert_eq!(error, Err(std::io::ErrorKind::ConnectionRefused));
    }
    assert_eq!(tcp_error, Err(std::io::ErrorKind::HostUnreachable));
    proxy.assert_running();
}
