//! End-to-end tests of `--dns fake`: the client namespace resolves through the proxy
//! (its resolv.conf names the TUN's peer address), gets fake addresses, and its flows to
//! them reach the server by name through a SOCKS5 upstream, which resolves the names
//! with the server namespace's own /etc/hosts. Real tools on both ends: getaddrinfo
//! (getent), curl, dig, microsocks, danted.

mod common;

use std::collections::HashSet;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::socks::{Daemon, danted, microsocks};
use common::udp_echo_server;
use common::{
    ANY, EVENT_DEADLINE, IO_TIMEOUT, PROXY_BIN, Proxy, Topology, dns_query, echo_once, join,
    send_payload, udp_client,
};
use common::{NetnsEtc, tool_or_skip};
use sha2::{Digest, Sha256};

/// The TUN's peer with the default --tun-addr (198.18.0.1/30): the documented resolver
/// address, routed into the TUN by the TUN's own prefix.
const RESOLVER: &str = "198.18.0.2";
/// Where fake addresses come from with the default --tun-addr.
const FAKE_V4_PREFIX: &str = "198.19.";
const FAKE_V6_PREFIX: &str = "fd7a:7072:7879:fa4e:";
const UDP_TIMEOUT: Duration = Duration::from_secs(2);
/// The DNS response code of a server failure.
const SERVFAIL: u8 = 2;

/// The client namespace resolving through the proxy, and the server namespace knowing
/// `hosts` (name, address) from its /etc/hosts.
fn name_service(topo: &Topology, hosts: &[(&str, IpAddr)]) -> [NetnsEtc; 2] {
    let hosts: String = hosts
        .iter()
        .map(|(name, addr)| format!("{addr} {name}\n"))
        .collect();
    let resolv = format!("nameserver {RESOLVER}\noptions timeout:2 attempts:3\n");
    [
        NetnsEtc::new(topo.server_ns(), &[("hosts", hosts)]),
        NetnsEtc::new(topo.client_ns(), &[("resolv.conf", resolv)]),
    ]
}

/// The topology of `test`, if it and `tools` can be had (else it is skipped).
fn topology(test: &str, tools: &[&str]) -> Option<Topology> {
    if !tools.iter().all(|tool| tool_or_skip(tool, test)) {
        return None;
    }
    Topology::for_test(test)
}

/// A proxy with TUN `tun` and `--dns fake` through `socks`, routing nothing but what
/// it routes itself: the fake ranges.
fn fake_dns_proxy(topo: &Topology, tun: &str, socks: &Daemon, extra: &[&str]) -> Proxy {
    let upstream = format!("socks5://{}", socks.addr);
    let mut args = vec!["--upstream", upstream.as_str(), "--dns", "fake"];
    args.extend_from_slice(extra);
    topo.start_proxy_on(tun, &args, &[])
}

/// `program args` in the client namespace (with its /etc files), to completion.
fn in_client(topo: &Topology, program: &str, args: &[&str]) -> Output {
    in_ns(topo.client_ns(), program, args)
}

/// `program args` in namespace `ns`, to completion.
fn in_ns(ns: &str, program: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// dig's answer section for `args`, and its status (NOERROR, REFUSED...).
fn dig(topo: &Topology, args: &[&str]) -> (Vec<String>, String) {
    let mut all = vec!["+time=3", "+tries=2", "+nocomments", "+nocmd", "+nostats"];
    all.push("@198.18.0.2");
    all.extend_from_slice(args);
    let output = in_client(topo, "dig", &all);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "dig {args:?}: {text}");
    let answers = text
        .lines()
        .filter(|line| !line.starts_with(';') && !line.trim().is_empty())
        .map(|line| {
            line.split_whitespace()
                .last()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    // +nocomments hides the header: ask again for the status alone.
    let mut status_args = vec!["+time=3", "+tries=2", "@198.18.0.2"];
    status_args.extend_from_slice(args);
    let status = String::from_utf8_lossy(&in_client(topo, "dig", &status_args).stdout)
        .split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("none")
        .to_string();
    (answers, status)
}

/// The fake IPv4 address the proxy gives `name`, asked over UDP from the client
/// namespace without its resolv.conf.
fn fake_v4(topo: &Topology, name: &str) -> Ipv4Addr {
    let query = dns_query(0x1234, name);
    let resolver = SocketAddr::new(RESOLVER.parse().unwrap(), 53);
    let reply = join(topo.in_client(move || echo_once(&udp_client(resolver, UDP_TIMEOUT), &query)));
    a_record(&reply)
}

/// The address of the one A record that ends `reply` (the proxy answers an A question
/// with one record and nothing after it).
fn a_record(reply: &[u8]) -> Ipv4Addr {
    assert!(reply.len() >= 16 + 12, "short reply: {reply:?}");
    assert_eq!(reply[3] & 0x0f, 0, "rcode of {reply:?}");
    assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 1, "one answer");
    let end = reply.len();
    Ipv4Addr::new(
        reply[end - 4],
        reply[end - 3],
        reply[end - 2],
        reply[end - 1],
    )
}

/// A one-shot HTTP/1.0 server of `len` payload bytes (seeded by the connection's
/// order) on the server namespace's both families, for `conns` connections.
fn http_server(topo: &Topology, conns: usize, len: u64) -> common::Server<common::Transfer> {
    topo.serve(ANY, conns, move |mut stream| {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") && request.len() < 8192 {
            stream.read_exact(&mut byte).expect("read the request");
            request.push(byte[0]);
        }
        write!(
            stream,
            "HTTP/1.0 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        send_payload(&mut stream, len ^ request.len() as u64, len)
    })
}

/// The value labelled `label` on the last `dns:` line of the counters in `stats`.
fn dns_field(stats: &str, label: &str) -> u64 {
    let line = stats
        .lines()
        .rfind(|l| l.contains("dns:"))
        .unwrap_or_default();
    line.split(&format!(" {label} "))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {label} in {line}"))
}

/// What curl downloads from `url` in the client namespace, resolving its name over
/// `family` (`-4`, `-6`).
fn curl(topo: &Topology, family: &str, url: &str) -> Vec<u8> {
    let args = ["-sS", "--fail", "--max-time", "60", family, "-o", "-", url];
    let output = in_client(topo, "curl", &args);
    assert!(
        output.status.success(),
        "curl {family}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[test]
fn names_resolve_to_fake_addresses_and_flows_reach_them_by_name_through_microsocks() {
    const TEST: &str =
        "names_resolve_to_fake_addresses_and_flows_reach_them_by_name_through_microsocks";
    const LEN: u64 = 4 << 20;
    let Some(topo) = topology(TEST, &["microsocks", "curl", "dig", "getent"]) else {
        return;
    };
    let _etc = name_service(
        &topo,
        &[
            ("web.fake.test", topo.server_v4()),
            ("web.fake.test", topo.server_v6()),
        ],
    );
    let socks = microsocks(&topo, None);
    let mut proxy = fake_dns_proxy(&topo, topo.tun_name(), &socks, &[]);

    // getaddrinfo through the client's resolv.conf: one fake address of each family.
    let output = in_client(&topo, "getent", &["ahosts", "web.fake.test"]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "getent: {text}");
    let addrs: HashSet<IpAddr> = text
        .lines()
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(addrs.len(), 2, "{text}");
    assert!(
        addrs
            .iter()
            .any(|a| a.to_string().starts_with(FAKE_V4_PREFIX))
            && addrs
                .iter()
                .any(|a| a.to_string().starts_with(FAKE_V6_PREFIX)),
        "not fake addresses: {text}"
    );

    // curl by name over the fake IPv4 address, then the fake IPv6 one: the server
    // answers through microsocks, which looked the name up itself.
    let server = http_server(&topo, 2, LEN);
    let url = format!("http://web.fake.test:{}/file", server.addr().port());
    let mut downloaded = Vec::new();
    for family in ["-4", "-6"] {
        let body = curl(&topo, family, &url);
        assert_eq!(body.len() as u64, LEN, "curl {family}");
        downloaded.push(sha256(&body));
    }
    let sent: Vec<[u8; 32]> = server.join().iter().map(|t| t.sha256).collect();
    for hash in &downloaded {
        assert!(
            sent.contains(hash),
            "a download does not match what was sent"
        );
    }

    // dig: A and AAAA give the addresses getaddrinfo got, HTTPS no record, PTR of the
    // fake address the name; MX goes nowhere without --dns-server.
    let (a, status) = dig(&topo, &["web.fake.test", "A"]);
    assert_eq!(status, "NOERROR");
    let (aaaa, _) = dig(&topo, &["web.fake.test", "AAAA"]);
    let dug: HashSet<IpAddr> = a.iter().chain(&aaaa).map(|a| a.parse().unwrap()).collect();
    assert_eq!(dug, addrs);
    let (https, status) = dig(&topo, &["web.fake.test", "HTTPS"]);
    assert_eq!((https.len(), status.as_str()), (0, "NOERROR"));
    let (ptr, status) = dig(&topo, &["-x", &a[0]]);
    assert_eq!(
        (ptr, status.as_str()),
        (vec!["web.fake.test.".to_string()], "NOERROR")
    );
    let (mx, status) = dig(&topo, &["web.fake.test", "MX"]);
    assert_eq!((mx.len(), status.as_str()), (0, "REFUSED"));

    // A live flow shows its name in `uringproxy status`.
    let held = http_server(&topo, 1, 1);
    let fake: IpAddr = a[0].parse().unwrap();
    let target = SocketAddr::new(fake, held.addr().port());
    let mut stream = join(topo.in_client(move || common::connect(target)));
    let status = Command::new(PROXY_BIN)
        .args(["status", "--control"])
        .arg(proxy.control_path())
        .output()
        .expect("run uringproxy status");
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains(&format!("{target} (web.fake.test)")),
        "{status}"
    );
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    assert!(response.starts_with(b"HTTP/1.0 200 OK"));
    held.join();

    let stats = proxy.stats();
    for label in [
        "a",
        "aaaa",
        "https-svcb",
        "ptr",
        "other",
        "answered",
        "refused",
    ] {
        assert!(dns_field(&stats, label) > 0, "no {label} counted:\n{stats}");
    }
    assert!(stats.contains("unmapped-tcp 0 unmapped-udp 0"), "{stats}");
    proxy.assert_running();
}

#[test]
fn stale_fake_addresses_fail_at_once_after_a_restart() {
    const TEST: &str = "stale_fake_addresses_fail_at_once_after_a_restart";
    let Some(topo) = topology(TEST, &["microsocks"]) else {
        return;
    };
    let socks = microsocks(&topo, None);
    let mut proxy = fake_dns_proxy(&topo, topo.tun_name(), &socks, &[]);
    let stale = IpAddr::V4(fake_v4(&topo, "gone.fake.test"));
    assert!(stale.to_string().starts_with(FAKE_V4_PREFIX), "{stale}");
    proxy.terminate();
    drop(proxy);
    // A new proxy (another TUN: the old one may linger a few ms) knows no names.
    let mut proxy = fake_dns_proxy(&topo, "upxfake1", &socks, &[]);
    let (error, took) = join(topo.in_client(move || {
        let start = Instant::now();
        let target = SocketAddr::new(stale, 80);
        match TcpStream::connect_timeout(&target, Duration::from_secs(10)) {
            Ok(_) => panic!("connected to stale {target}"),
            Err(e) => (e.kind(), start.elapsed()),
        }
    }));
    assert_eq!(error, ErrorKind::ConnectionRefused, "took {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let (error, took) = join(topo.in_client(move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect(SocketAddr::new(stale, 9)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let start = Instant::now();
        socket.send(b"anyone?").unwrap();
        let error = socket
            .recv(&mut [0u8; 64])
            .expect_err("an answer from nowhere");
        (error.kind(), start.elapsed())
    }));
    assert_eq!(error, ErrorKind::ConnectionRefused, "took {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let stats = proxy.stats();
    assert!(stats.contains("unmapped-tcp 1 unmapped-udp 1"), "{stats}");
    proxy.assert_running();
}

#[test]
fn udp_by_name_through_a_danted_association() {
    const TEST: &str = "udp_by_name_through_a_danted_association";
    const PORT: u16 = 7300;
    let Some(topo) = topology(TEST, &["danted"]) else {
        return;
    };
    // danted resolves the name from the server's /etc/hosts.
    let _etc = name_service(&topo, &[("echo.fake.test", topo.server_v4())]);
    let socks = danted(&topo);
    let mut proxy = fake_dns_proxy(&topo, topo.tun_name(), &socks, &[]);
    udp_echo_server(&topo, PORT, Duration::from_secs(60));
    let fake = SocketAddr::new(IpAddr::V4(fake_v4(&topo, "echo.fake.test")), PORT);
    join(topo.in_client(move || {
        let socket = udp_client(fake, UDP_TIMEOUT);
        // Within the TUN's MTU: the proxy takes no fragments.
        for (round, len) in [1usize, 100, 1400, 0, 1000].into_iter().enumerate() {
            let sent: Vec<u8> = (0..len).map(|i| (i * 7 + round) as u8).collect();
            let echoed = echo_once(&socket, &sent);
            assert!(echoed == sent, "{len} bytes came back as {}", echoed.len());
        }
    }));
    let stats = proxy.stats();
    assert!(stats.contains("udp associations 1 ended 0 "), "{stats}");
    proxy.assert_running();
}

#[test]
fn more_names_than_the_table_holds_reuse_its_entries() {
    const TEST: &str = "more_names_than_the_table_holds_reuse_its_entries";
    const NAMES: u32 = 70_000;
    // The default --fake-entries, 65,536, less the first and last address of the /16.
    const ENTRIES: u32 = 65_534;
    let Some(topo) = topology(TEST, &["microsocks"]) else {
        return;
    };
    let socks = microsocks(&topo, None);
    let mut proxy = fake_dns_proxy(&topo, topo.tun_name(), &socks, &[]);
    let resolver = SocketAddr::new(RESOLVER.parse().unwrap(), 53);
    // `round` names, each asked once, their answers all fake and (within one table's
    // worth) all different.
    let ask = |round: u32| {
        join(topo.in_client(move || {
            let socket = udp_client(resolver, UDP_TIMEOUT);
            let (mut seen, mut servfails) = (HashSet::new(), 0u64);
            for i in 0..NAMES {
                let name = format!("n{i}.r{round}.fake.test");
                let query = dns_query(i as u16, &name);
                // A full table hands out no entry answered in the last 2 s: the client
                // gets SERVFAIL and asks again, as a resolver would.
                let deadline = Instant::now() + Duration::from_secs(10);
                let reply = loop {
                    let reply = echo_once(&socket, &query);
                    if reply.get(3).is_some_and(|flags| flags & 0x0f == SERVFAIL)
                        && Instant::now() < deadline
                    {
                        servfails += 1;
                        continue;
                    }
                    break reply;
                };
                let addr = a_record(&reply);
                assert!(
                    addr.to_string().starts_with(FAKE_V4_PREFIX),
                    "{name}: {addr}"
                );
                if i < ENTRIES {
                    assert!(seen.insert(addr), "{name}: {addr} given twice");
                }
            }
            servfails
        }))
    };
    let entries = |stats: &str| -> u64 {
        // Every name answered past the table's size took an entry from another.
        assert_eq!(
            dns_field(stats, "evictions"),
            dns_field(stats, "answered") - u64::from(ENTRIES),
            "{stats}"
        );
        dns_field(stats, "entries")
    };
    let servfails = ask(0);
    assert_eq!(entries(&proxy.stats()), u64::from(ENTRIES));
    assert_eq!(dns_field(&proxy.stats(), "servfail"), servfails);
    let rss = proxy.rss_kib();
    ask(1);
    assert_eq!(entries(&proxy.stats()), u64::from(ENTRIES));
    let grown = proxy.rss_kib().saturating_sub(rss);
    assert!(
        grown < 2048,
        "RSS grew by {grown} KiB for {NAMES} more names"
    );
    proxy.assert_running();
}

/// dnsmasq in the server namespace on the server's address, answering from `records`
/// (its options) alone: reachable only there, so an answer in the client namespace came
/// through the upstream. The daemon, and the address it serves.
fn dnsmasq(topo: &Topology, records: &[&str]) -> (Daemon, SocketAddr) {
    let server = SocketAddr::new(topo.server_v4(), 53);
    let listen = format!("--listen-address={}", topo.server_v4());
    let mut args = vec![
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--pid-file=",
        "--log-queries",
        "--log-facility=-",
        &listen,
    ];
    args.extend_from_slice(records);
    let daemon = Daemon::start(topo, Daemon::dir("dnsmasq"), server, "dnsmasq", &args);
    (daemon, server)
}

#[test]
fn other_types_are_forwarded_over_tcp_through_the_upstream_to_the_dns_server() {
    const TEST: &str = "other_types_are_forwarded_over_tcp_through_the_upstream_to_the_dns_server";
    let Some(topo) = topology(TEST, &["microsocks", "dnsmasq", "dig"]) else {
        return;
    };
    let socks = microsocks(&topo, None);
    // Three strings of 250 bytes: a reply longer than 512 bytes.
    let big_txt = format!("--txt-record=big.fake.test,{0},{0},{0}", "x".repeat(250));
    let (_dnsmasq, server) = dnsmasq(
        &topo,
        &[
            "--mx-host=mail.fake.test,mx1.fake.test,10",
            "--txt-record=note.fake.test,through the upstream",
            &big_txt,
        ],
    );
    let server = server.to_string();
    let mut proxy = fake_dns_proxy(&topo, topo.tun_name(), &socks, &["--dns-server", &server]);
    let (mx, status) = dig(&topo, &["mail.fake.test", "MX"]);
    assert_eq!(status, "NOERROR");
    assert_eq!(mx, ["mx1.fake.test."]);
    let (txt, status) = dig(&topo, &["note.fake.test", "TXT"]);
    assert_eq!(
        (txt, status.as_str()),
        (vec!["upstream\"".to_string()], "NOERROR")
    );
    // Over TCP too: answered by the proxy, or forwarded and the reply framed back.
    let (mx, status) = dig(&topo, &["+tcp", "mail.fake.test", "MX"]);
    assert_eq!(
        (mx, status.as_str()),
        (vec!["mx1.fake.test.".to_string()], "NOERROR")
    );
    let (a, status) = dig(&topo, &["+tcp", "mail.fake.test", "A"]);
    assert_eq!(status, "NOERROR");
    assert!(a.len() == 1 && a[0].starts_with(FAKE_V4_PREFIX), "{a:?}");
    // Several queries on one connection (dig +keepopen), one of them forwarded.
    let (answers, _) = dig(
        &topo,
        &[
            "+tcp",
            "+keepopen",
            "one.fake.test",
            "A",
            "note.fake.test",
            "TXT",
            "two.fake.test",
            "AAAA",
        ],
    );
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(answers[0].starts_with(FAKE_V4_PREFIX), "{answers:?}");
    assert_eq!(answers[1], "upstream\"");
    assert!(answers[2].starts_with(FAKE_V6_PREFIX), "{answers:?}");
    // A long reply: whole to a client that takes it (EDNS, dig's default), cut with TC
    // set for one that does not, which dig then asks over TCP.
    let (txt, status) = dig(&topo, &["big.fake.test", "TXT"]);
    assert_eq!((txt.len(), status.as_str()), (1, "NOERROR"), "{txt:?}");
    let truncated = in_client(
        &topo,
        "dig",
        &[
            "+noedns",
            "+ignore",
            "+time=3",
            "@198.18.0.2",
            "big.fake.test",
            "TXT",
        ],
    );
    let text = String::from_utf8_lossy(&truncated.stdout);
    let flags = text
        .lines()
        .find(|l| l.starts_with(";; flags:"))
        .unwrap_or_default();
    assert!(
        flags.contains(" tc ") && flags.contains("ANSWER: 0"),
        "{text}"
    );
    let (txt, status) = dig(&topo, &["+noedns", "big.fake.test", "TXT"]);
    assert_eq!((txt.len(), status.as_str()), (1, "NOERROR"), "{txt:?}");
    let stats = proxy.stats();
    assert!(dns_field(&stats, "forwarded") >= 2, "{stats}");
    for label in ["tcp-refused", "tcp-malformed", "tcp-overflow"] {
        assert_eq!(dns_field(&stats, label), 0, "{stats}");
    }
    assert_eq!(dns_field(&stats, "forward-failed"), 0, "{stats}");
    assert_eq!(dns_field(&stats, "refused"), 0, "{stats}");
    proxy.assert_running();
}

/// The reply to `query` from the DNS server at `server` over TCP.
fn tcp_exchange(server: SocketAddr, query: &[u8]) -> Vec<u8> {
    let mut conn = TcpStream::connect_timeout(&server, IO_TIMEOUT).expect("connect");
    common::set_timeouts(&conn);
    tcp_query(&mut conn, query)
}

/// The reply to `query` asked on connection `conn` (RFC 1035 4.2.2 framing).
fn tcp_query(conn: &mut TcpStream, query: &[u8]) -> Vec<u8> {
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    conn.write_all(&framed).unwrap();
    let mut len = [0u8; 2];
    conn.read_exact(&mut len).expect("a reply's length");
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut reply).expect("the reply");
    reply
}

/// What dig prints for `args` asked of `server` from namespace `ns`, which must be a
/// NOERROR answer.
fn dig_text(ns: &str, server: IpAddr, args: &[&str]) -> String {
    let at = format!("@{server}");
    let mut all = vec!["+time=5", "+tries=2", at.as_str()];
    all.extend_from_slice(args);
    let output = in_ns(ns, "dig", &all);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && text.contains("status: NOERROR"),
        "dig {all:?} in {ns}: {text}"
    );
    text
}

/// The records of dig's answer section in `text`, as printed.
fn answer_section(text: &str) -> Vec<&str> {
    text.lines()
        .skip_while(|line| !line.starts_with(";; ANSWER SECTION:"))
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .collect()
}

#[test]
fn a_forwarded_reply_larger_than_16_kib_comes_whole_over_tcp_and_truncated_over_udp() {
    const TEST: &str =
        "a_forwarded_reply_larger_than_16_kib_comes_whole_over_tcp_and_truncated_over_udp";
    const RECORDS: usize = 24;
    let Some(topo) = topology(TEST, &["microsocks", "dnsmasq", "dig"]) else {
        return;
    };
    let socks = microsocks(&topo, None);
    // 24 TXT records of three 250-byte strings each: an answer of about 18 KiB, more
    // than the 16 KiB a DNS-over-TCP connection queues before its client reads.
    let records: Vec<String> = (0..RECORDS)
        .map(|i| {
            format!(
                "--txt-record=huge.fake.test,{0},{0},{0}",
                format!("{i:02}{}", "t".repeat(248))
            )
        })
        .collect();
    let records: Vec<&str> = records.iter().map(String::as_str).collect();
    let (_dnsmasq, server) = dnsmasq(&topo, &records);
    let mut proxy = fake_dns_proxy(
        &topo,
        topo.tun_name(),
        &socks,
        &["--dns-server", &server.to_string()],
    );
    let resolver: IpAddr = RESOLVER.parse().unwrap();

    // Byte for byte: the same query through the proxy and straight to dnsmasq.
    let mut query = dns_query(0x5a5a, "huge.fake.test");
    let qtype = query.len() - 4;
    query[qtype..qtype + 2].copy_from_slice(&16u16.to_be_bytes()); // TXT
    let through = {
        let query = query.clone();
        let resolver = SocketAddr::new(resolver, 53);
        join(topo.in_client(move || tcp_exchange(resolver, &query)))
    };
    let direct = join(topo.in_server(move || tcp_exchange(server, &query)));
    assert!(
        direct.len() > 16 << 10,
        "dnsmasq's reply: {} bytes",
        direct.len()
    );
    assert_eq!(u16::from_be_bytes([direct[6], direct[7]]), RECORDS as u16);
    assert!(
        through == direct,
        "{} bytes through the proxy",
        through.len()
    );

    // Record for record with dig, over TCP.
    let txt = ["huge.fake.test", "TXT"];
    let direct = dig_text(topo.server_ns(), server.ip(), &["+tcp", txt[0], txt[1]]);
    let direct = answer_section(&direct);
    assert_eq!(direct.len(), RECORDS, "{direct:?}");
    let tcp = dig_text(topo.client_ns(), resolver, &["+tcp", txt[0], txt[1]]);
    assert_eq!(answer_section(&tcp), direct);

    // Over UDP the reply is longer than the client takes (dig's EDNS 1232 bytes, and
    // the TUN's MTU): cut to the question with TC set, then dig asks again over TCP.
    let udp = dig_text(topo.client_ns(), resolver, &txt);
    assert!(udp.contains(";; Truncated, retrying in TCP mode."), "{udp}");
    assert_eq!(answer_section(&udp), direct);

    let stats = proxy.stats();
    // The exchange, dig over TCP, and dig over UDP then TCP.
    assert_eq!(dns_field(&stats, "forwarded"), 4, "{stats}");
    for label in ["forward-failed", "tcp-overflow", "tcp-malformed", "refused"] {
        assert_eq!(dns_field(&stats, label), 0, "{label}: {stats}");
    }
    proxy.assert_running();
}

/// `ssh -D` in the server namespace as a SOCKS5 server on the server's address: an sshd
/// on its loopback (its privilege separation directory on a tmpfs of its own mount
/// namespace, which `ip netns exec` made) and an ssh client logged in with a fresh key.
fn ssh_socks(topo: &Topology) -> [Daemon; 2] {
    let dir = Daemon::dir("ssh");
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    for key in ["host_key", "id"] {
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f", &path(key)])
            .status()
            .expect("run ssh-keygen");
        assert!(made.success(), "ssh-keygen {key}");
    }
    fs::copy(path("id.pub"), path("authorized_keys")).expect("authorize the key");
    let sshd_port = common::socks::free_port(topo, "127.0.0.1".parse().unwrap());
    let config = format!(
        "ListenAddress 127.0.0.1:{sshd_port}\nHostKey {}\nAuthorizedKeysFile {}\n\
         PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile none\n",
        path("host_key"),
        path("authorized_keys")
    );
    fs::write(path("sshd_config"), config).expect("write sshd_config");
    let script = format!(
        "mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && exec /usr/sbin/sshd -D -e -f {}",
        path("sshd_config")
    );
    let sshd_addr = SocketAddr::new("127.0.0.1".parse().unwrap(), sshd_port);
    let sshd = Daemon::start(topo, dir.clone(), sshd_addr, "sh", &["-c", &script]);
    let socks_port = common::socks::free_port(topo, topo.server_v4());
    let socks_addr = SocketAddr::new(topo.server_v4(), socks_port);
    let forward = format!("{socks_addr}");
    let port = sshd_port.to_string();
    let client = Daemon::start(
        topo,
        Daemon::dir("ssh-client"),
        socks_addr,
        "ssh",
        &[
            "-N",
            "-D",
            &forward,
            "-i",
            &path("id"),
            "-p",
            &port,
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "GatewayPorts=yes",
            "root@127.0.0.1",
        ],
    );
    [client, sshd]
}

#[test]
fn names_reach_their_server_through_ssh_dynamic_forwarding() {
    const TEST: &str = "names_reach_their_server_through_ssh_dynamic_forwarding";
    const LEN: u64 = 1 << 20;
    let Some(topo) = topology(TEST, &["sshd", "ssh", "ssh-keygen", "curl"]) else {
        return;
    };
    // sshd resolves the name the client asked for, from the server's /etc/hosts.
    let _etc = name_service(&topo, &[("ssh.fake.test", topo.server_v4())]);
    let [socks, _sshd] = ssh_socks(&topo);
    let mut proxy = fake_dns_proxy(&topo, topo.tun_name(), &socks, &[]);
    let server = http_server(&topo, 1, LEN);
    let url = format!("http://ssh.fake.test:{}/file", server.addr().port());
    let body = curl(&topo, "-4", &url);
    let sent = server.join().remove(0);
    assert_eq!(
        (body.len() as u64, sha256(&body)),
        (sent.bytes, sent.sha256)
    );
    proxy.assert_running();
}

#[test]
fn idle_dns_over_tcp_connections_make_room_for_new_ones_and_are_closed() {
    const TEST: &str = "idle_dns_over_tcp_connections_make_room_for_new_ones_and_are_closed";
    // The proxy's MAX_CONNS.
    const SLOTS: usize = 64;
    let Some(topo) = topology(TEST, &["microsocks"]) else {
        return;
    };
    let socks = microsocks(&topo, None);
    let mut proxy = fake_dns_proxy(&topo, topo.tun_name(), &socks, &[]);
    let resolver = SocketAddr::new(RESOLVER.parse().unwrap(), 53);
    let (extra, oldest_closed, next_open, closed, after, filled_in) =
        join(topo.in_client(move || {
            let connect = || {
                let conn = TcpStream::connect_timeout(&resolver, IO_TIMEOUT).expect("connect");
                common::set_timeouts(&conn);
                conn
            };
            let started = Instant::now();
            let mut idle: Vec<TcpStream> = (0..SLOTS).map(|_| connect()).collect();
            // Every slot held by a silent client: a query on one more is answered all the
            // same, in the slot of the one silent longest (the first), which is closed.
            let extra = tcp_query(&mut connect(), &dns_query(0x6565, "extra.fake.test"));
            let filled_in = started.elapsed();
            idle[0].set_read_timeout(Some(EVENT_DEADLINE)).unwrap();
            let oldest_closed = matches!(idle[0].read(&mut [0u8; 1]), Ok(0));
            idle[1].set_nonblocking(true).unwrap();
            let next_open =
                matches!(idle[1].read(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock);
            // Left idle, the others are closed by the proxy (10 s), well within the deadline.
            let deadline = Instant::now() + Duration::from_secs(40);
            let closed = idle
                .into_iter()
                .skip(1)
                .filter_map(|conn| {
                    conn.set_nonblocking(false).unwrap();
                    let left = deadline.saturating_duration_since(Instant::now());
                    conn.set_read_timeout(Some(left.max(Duration::from_millis(10))))
                        .unwrap();
                    matches!((&conn).read(&mut [0u8; 1]), Ok(0)).then_some(())
                })
                .count();
            // Then a new connection is served.
            let after = tcp_query(&mut connect(), &dns_query(0x4321, "after.fake.test"));
            (extra, oldest_closed, next_open, closed, after, filled_in)
        }));
    for (reply, id) in [(&extra, 0x6565u16), (&after, 0x4321)] {
        assert_eq!(&reply[..2], &id.to_be_bytes());
        assert!(a_record(reply).to_string().starts_with(FAKE_V4_PREFIX));
    }
    assert_eq!(closed, SLOTS - 1, "idle connections closed by the proxy");
    let stats = proxy.stats();
    // Had filling the slots taken the proxy's idle timeout (10 s, a machine far too
    // loaded), the first connections would have been closed as idle, not evicted.
    if filled_in < Duration::from_secs(9) {
        assert!(
            oldest_closed,
            "the connection silent longest is closed for the new one"
        );
        assert!(next_open, "only that one");
        assert_eq!(dns_field(&stats, "tcp-evicted"), 1, "{stats}");
    } else {
        eprintln!("filling the slots took {filled_in:?}: the eviction is not told apart");
    }
    assert_eq!(dns_field(&stats, "tcp-refused"), 0, "{stats}");
    proxy.assert_running();
}
