//! End-to-end tests of `--upstream socks5://...`: the proxy relays through real SOCKS5
//! servers from Debian, started in the server namespace (microsocks for TCP, with and
//! without a password; danted for UDP ASSOCIATE), and through small scripted servers
//! for what real ones do not do on purpose (closing mid-handshake, staying silent,
//! answering garbage, each reply code, a reply coalesced with data).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::socks::{danted, free_port, microsocks, upstream_arg};
use common::{
    ANY, Topology, check_response, dns_query, dns_response, echo_once, join, ping, recv_to_end,
    send_payload, tool_or_skip, udp_client, udp_echo_server, wait_until,
};

const UDP_TIMEOUT: Duration = Duration::from_secs(2);

/// One connection to `ip` from the client: `up` bytes there, then `down` bytes back,
/// both hash-checked; returns the address the server saw the connection come from.
/// The server closes first: microsocks ends both directions at the first FIN, so a
/// client's half-close would cut the server's answer short.
fn transfer(topo: &Topology, ip: IpAddr, up: u64, down: u64) -> SocketAddr {
    let server = topo.serve(ip, 1, move |mut stream| {
        let peer = stream.peer_addr().unwrap();
        let received = recv_to_end(&mut Read::take(&mut stream, up));
        (peer, received, send_payload(&mut stream, 7, down))
    });
    let addr = server.addr();
    let (sent, received) = join(topo.in_client(move || {
        let mut stream = common::connect(addr);
        let sent = send_payload(&mut stream, 6, up);
        (sent, recv_to_end(&mut stream))
    }));
    let (peer, server_received, server_sent) = server.join().remove(0);
    assert_eq!(server_received, sent, "upload via {ip}");
    assert_eq!(received, server_sent, "download via {ip}");
    peer
}

/// The error a client's connect to `addr` through the proxy ends with, and how long it
/// took.
fn connect_error(topo: &Topology, addr: SocketAddr) -> (ErrorKind, Duration) {
    join(topo.in_client(move || {
        let start = Instant::now();
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(_) => panic!("connect to {addr} succeeded"),
            Err(e) => (e.kind(), start.elapsed()),
        }
    }))
}

#[test]
fn tcp_through_microsocks_both_ways_with_and_without_a_password() {
    const TEST: &str = "tcp_through_microsocks_both_ways_with_and_without_a_password";
    if !tool_or_skip("microsocks", TEST) {
        return;
    }
    for auth in [None, Some(("alice", "s3cret"))] {
        let Some(topo) = Topology::for_test(TEST) else {
            return;
        };
        let socks = microsocks(&topo, auth);
        let upstream = upstream_arg(socks.addr, auth);
        let mut proxy = topo.start_proxy(&["--upstream", &upstream]);
        for ip in [topo.server_v4(), topo.server_v6()] {
            let peer = transfer(&topo, ip, 8 << 20, 8 << 20);
            // microsocks made the connection, from the server's own namespace.
            assert!(
                peer.ip() == topo.server_v4() || peer.ip() == topo.server_v6(),
                "the server saw {peer}: not through the upstream"
            );
        }
        // Many short connections at once, each echoed whole and then closed.
        const LEN: u64 = 100_000;
        let server = topo.serve(topo.server_v4(), 20, |mut stream| {
            let mut bytes = Vec::new();
            Read::take(&mut stream, LEN)
                .read_to_end(&mut bytes)
                .unwrap();
            stream.write_all(&bytes).unwrap();
        });
        let addr = server.addr();
        let echoed = join(topo.in_client(move || {
            let clients: Vec<_> = (0..20)
                .map(|seed| {
                    thread::spawn(move || {
                        let mut stream = common::connect(addr);
                        let sent = send_payload(&mut stream, seed, LEN);
                        (sent, recv_to_end(&mut stream))
                    })
                })
                .collect();
            clients.into_iter().map(join).collect::<Vec<_>>()
        }));
        for (sent, received) in echoed {
            assert_eq!(sent, received);
        }
        server.join();
        let stats = proxy.stats();
        assert!(
            stats.contains("upstream: connect-failed 0 timeout 0 closed 0 protocol-error 0 "),
            "{stats}"
        );
        assert!(
            !stats.contains("s3cret"),
            "the password in the output:\n{stats}"
        );
        assert!(!proxy.stderr().contains("s3cret"));
        proxy.assert_running();
    }
}

#[test]
fn a_wrong_or_missing_password_resets_the_client() {
    const TEST: &str = "a_wrong_or_missing_password_resets_the_client";
    if !tool_or_skip("microsocks", TEST) {
        return;
    }
    let Some(topo) = Topology::for_test(TEST) else {
        return;
    };
    let socks = microsocks(&topo, Some(("alice", "s3cret")));
    let server = SocketAddr::new(topo.server_v4(), 9);
    for (auth, counter) in [
        (Some(("alice", "wrong")), "auth-rejected 1 "),
        (None, "no-acceptable-method 1 "),
    ] {
        let mut proxy = topo.start_proxy(&["--upstream", &upstream_arg(socks.addr, auth)]);
        let (error, _) = connect_error(&topo, server);
        assert_eq!(error, ErrorKind::ConnectionRefused, "{auth:?}");
        let stats = proxy.stats();
        assert!(stats.contains(counter), "{counter}:\n{stats}");
        assert!(
            !proxy.stderr().contains("wrong"),
            "the password in the output"
        );
        proxy.terminate();
    }
}

#[test]
fn an_upstream_that_is_down_resets_the_client_at_once() {
    let Some(topo) = Topology::for_test("an_upstream_that_is_down_resets_the_client_at_once")
    else {
        return;
    };
    let nobody = SocketAddr::new(topo.server_v4(), free_port(&topo, topo.server_v4()));
    let mut proxy = topo.start_proxy(&["--upstream", &upstream_arg(nobody, None)]);
    let (error, took) = connect_error(&topo, SocketAddr::new(topo.server_v4(), 80));
    assert_eq!(error, ErrorKind::ConnectionRefused);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let stats = proxy.stats();
    assert!(stats.contains("upstream: connect-failed 1 "), "{stats}");
    proxy.assert_running();
}

/// A scripted SOCKS5 server in the server namespace: for each of `conns` connections,
/// `script` gets the stream (its timeouts set) and does what it likes.
fn scripted(
    topo: &Topology,
    conns: usize,
    script: impl Fn(TcpStream) + Send + Sync + 'static,
) -> common::Server<()> {
    topo.serve(topo.server_v4(), conns, script)
}

/// What a scripted upstream does with a connection.
type Script = fn(TcpStream);

/// Reads the no-auth greeting and the CONNECT request of a client (IPv4 target).
fn read_greeting_and_request(stream: &mut TcpStream) -> [u8; 10] {
    let mut greeting = [0u8; 3];
    stream.read_exact(&mut greeting).expect("greeting");
    assert_eq!(greeting, [5, 1, 0]);
    stream.write_all(&[5, 0]).expect("method reply");
    let mut request = [0u8; 10];
    stream.read_exact(&mut request).expect("request");
    request
}

#[test]
fn an_upstream_that_closes_stalls_or_babbles_fails_the_flow_within_the_connect_timeout() {
    let Some(topo) = Topology::for_test("an_upstream_that_closes_stalls_or_babbles") else {
        return;
    };
    let target = SocketAddr::new(topo.server_v4(), 80);
    let cases: [(&str, Script, &str); 4] = [
        ("accepts and closes", drop, "closed 1 "),
        (
            "closes mid-reply",
            |mut stream| {
                read_greeting_and_request(&mut stream);
                let _ = stream.write_all(&[5, 0, 0]);
            },
            "closed 1 ",
        ),
        (
            "answers HTTP",
            |mut stream| {
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
                let _ = stream.read(&mut [0u8; 64]);
            },
            "protocol-error 1 ",
        ),
        (
            "never answers",
            |mut stream| {
                let _ = stream.read_exact(&mut [0u8; 3]);
                thread::sleep(Duration::from_secs(3));
            },
            "timeout 1 ",
        ),
    ];
    for (what, script, counter) in cases {
        let server = scripted(&topo, 1, script);
        let upstream = upstream_arg(server.addr(), None);
        let mut proxy = topo.start_proxy(&["--upstream", &upstream, "--connect-timeout", "1"]);
        let (error, took) = connect_error(&topo, target);
        assert_eq!(error, ErrorKind::ConnectionRefused, "{what}");
        assert!(took < Duration::from_millis(2500), "{what}: took {took:?}");
        let stats = proxy.stats();
        assert!(stats.contains(counter), "{what}: {counter}\n{stats}");
        server.join();
        proxy.terminate();
    }
}

#[test]
fn reply_codes_reach_the_client_as_on_the_direct_path_and_coalesced_data_is_kept() {
    let Some(topo) = Topology::for_test("reply_codes_reach_the_client_as_on_the_direct_path")
    else {
        return;
    };
    let target = SocketAddr::new(topo.server_v4(), 80);
    for (code, expected) in [
        (5u8, ErrorKind::ConnectionRefused),
        (4, ErrorKind::HostUnreachable),
        (3, ErrorKind::NetworkUnreachable),
        (2, ErrorKind::ConnectionRefused),
    ] {
        let server = scripted(&topo, 1, move |mut stream| {
            read_greeting_and_request(&mut stream);
            let _ = stream.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]);
        });
        let mut proxy = topo.start_proxy(&["--upstream", &upstream_arg(server.addr(), None)]);
        let (error, _) = connect_error(&topo, target);
        assert_eq!(error, expected, "reply code {code}");
        server.join();
        proxy.terminate();
    }
    // The reply and the server's first bytes in one segment, then more both ways.
    let server = scripted(&topo, 1, move |mut stream| {
        let request = read_greeting_and_request(&mut stream);
        assert_eq!(&request[..4], [5, 1, 0, 1], "CONNECT to an IPv4 address");
        stream
            .write_all(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00hello, ")
            .unwrap();
        let mut name = [0u8; 5];
        stream.read_exact(&mut name).unwrap();
        stream.write_all(&name).unwrap();
    });
    let mut proxy = topo.start_proxy(&["--upstream", &upstream_arg(server.addr(), None)]);
    let got = join(topo.in_client(move || {
        let mut stream = common::connect(target);
        stream.write_all(b"world").unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).unwrap();
        got
    }));
    assert_eq!(got, b"hello, world");
    server.join();
    proxy.assert_running();
}

/// The tests' DNS responder (`common::dns_response`) on port 53 of the server, until
/// `deadline`.
fn dns_server(topo: &Topology, deadline: Duration) {
    let (ready, is_ready) = mpsc::channel();
    topo.in_server(move || {
        let socket = UdpSocket::bind((ANY, 53)).expect("bind DNS");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        ready.send(()).unwrap();
        let end = Instant::now() + deadline;
        let mut buf = [0u8; 512];
        while Instant::now() < end {
            if let Ok((n, from)) = socket.recv_from(&mut buf)
                && let Some(response) = dns_response(&buf[..n])
            {
                let _ = socket.send_to(&response, from);
            }
        }
    });
    is_ready.recv().expect("DNS responder started");
}

#[test]
fn udp_echo_and_dns_through_a_danted_association_until_it_ends() {
    const TEST: &str = "udp_echo_and_dns_through_a_danted_association_until_it_ends";
    const PORT: u16 = 7200;
    const FLOWS: usize = 8;
    if !tool_or_skip("danted", TEST) {
        return;
    }
    let Some(topo) = Topology::for_test(TEST) else {
        return;
    };
    let mut socks = danted(&topo);
    let upstream = upstream_arg(socks.addr, None);
    let mut proxy = topo.start_proxy(&["--upstream", &upstream, "--mtu", "65535"]);
    udp_echo_server(&topo, PORT, Duration::from_secs(60));
    dns_server(&topo, Duration::from_secs(60));
    let servers = [topo.server_v4(), topo.server_v6()];
    let sockets = join(topo.in_client(move || {
        let clients: Vec<_> = (0..FLOWS)
            .map(|flow| {
                let server = SocketAddr::new(servers[flow % 2], PORT);
                // The largest payload with the SOCKS5 header (10 bytes for an IPv4
                // server, 22 for IPv6) in one datagram to the relay.
                let largest = if server.is_ipv4() { 65497 } else { 65485 };
                thread::spawn(move || {
                    let socket = udp_client(server, UDP_TIMEOUT);
                    // The first datagrams are held while the association is set up;
                    // an empty one is all header to the relay. (Not bigger than the
                    // TUN's MTU: the proxy takes no fragments.)
                    for (round, len) in [0, 1, 100, 1400, 0, largest].into_iter().enumerate() {
                        let sent: Vec<u8> = (0..len)
                            .map(|i| (i * 7 + flow * 13 + round) as u8)
                            .collect();
                        let echoed = echo_once(&socket, &sent);
                        assert!(
                            echoed == sent,
                            "flow {flow}: {len} bytes to {server} came back as {}",
                            echoed.len()
                        );
                    }
                    socket
                })
            })
            .collect();
        clients.into_iter().map(join).collect::<Vec<_>>()
    }));
    let dns = SocketAddr::new(topo.server_v4(), 53);
    let answered = join(topo.in_client(move || {
        let query = dns_query(0x4242, "through.socks.test");
        check_response(&query, &echo_once(&udp_client(dns, UDP_TIMEOUT), &query))
    }));
    assert_eq!(answered, 0x4242);
    let stats = proxy.stats();
    assert!(
        stats.contains(&format!(
            "udp associations {} ended 0 fragments 0 malformed 0 ",
            FLOWS + 1
        )),
        "{stats}"
    );
    // The upstream goes away: every association's control connection closes, and with
    // it the flow (its sockets closed).
    let before = proxy.fd_count();
    socks.stop();
    let ended = wait_until(common::EVENT_DEADLINE, || {
        proxy.stats().contains(&format!("ended {} ", FLOWS + 1))
    });
    assert!(ended, "associations still open:\n{}", proxy.stats());
    assert!(
        proxy.fd_count() + 2 * (FLOWS + 1) <= before,
        "{} fds, {before} before",
        proxy.fd_count()
    );
    drop(sockets);
    proxy.assert_running();
}

#[test]
fn ping_is_refused_through_an_upstream() {
    let Some(topo) = Topology::for_test("ping_is_refused_through_an_upstream") else {
        return;
    };
    let nobody = SocketAddr::new(topo.server_v4(), 1080);
    let proxy = topo.start_proxy(&["--upstream", &upstream_arg(nobody, None)]);
    let (ok, text) = ping(&topo, topo.server_v4(), 2);
    assert!(!ok, "ping went through:\n{text}");
    assert!(
        text.contains("Packet filtered"),
        "no ICMP error for the client:\n{text}"
    );
    let stats = proxy.stats();
    assert!(stats.contains("echo-refused 2"), "{stats}");
}
