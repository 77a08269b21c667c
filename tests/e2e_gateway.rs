//! End-to-end tests of a router proxying its LAN (`--lan`, `--exclude`, `--uid`): four
//! namespaces the test builds, the proxy on the router, each connection checked by hash
//! and by the address its server saw.
//!
//! ```text
//! client (eth0 10.71.1.2)  --  lan0 10.71.1.1  router  wan0 10.71.9.1  --  wan (eth0 10.71.9.2,
//!                                 lan1 10.71.2.1                              lo 203.0.113.10, .20)
//!                                   |
//!                             second LAN (eth0 10.71.2.2)
//! ```
//!
//! IPv6 alike (fd71:N::/64, the WAN's servers 2001:db8:71::10 and ::20). The WAN has no
//! route back to the LANs, except for replies from its excluded address .20 (a policy
//! rule of its own): what reaches .10 from a LAN came through the proxy. The router runs
//! strict rp_filter.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    ANY, MIB, PROXY_BIN, Proxy, Transfer, add_namespace, check_response, delete_namespace,
    dns_query, dns_response, in_netns, ip, join, payload_digest, privileged_or_skip, recv_to_end,
    run, send_payload, set_timeouts, spawn_proxy_in, try_recv_to_end, wait_until,
};

const TUN: &str = "upxgw0";
const CLIENT: [&str; 2] = ["10.71.1.2", "fd71:1::2"];
const ROUTER_LAN: [&str; 2] = ["10.71.1.1", "fd71:1::1"];
const ROUTER_WAN: [&str; 2] = ["10.71.9.1", "fd71:9::1"];
const SECOND_LAN: [&str; 2] = ["10.71.2.2", "fd71:2::2"];
/// The WAN server the LAN reaches only through the proxy.
const WAN_SERVER: [&str; 2] = ["203.0.113.10", "2001:db8:71::10"];
/// The WAN server `--exclude`d: reached directly, with a route back.
const WAN_EXCLUDED: [&str; 2] = ["203.0.113.20", "2001:db8:71::20"];
/// The proxy's default TUN addresses: the source of the host's proxied connections.
const TUN_ADDRS: [&str; 2] = ["198.18.0.1", "fd7a:7072:7879::1"];
const PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;
/// Bounds every server thread, whatever the test does.
const SERVER_LIFETIME: Duration = Duration::from_secs(180);

fn addr(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// The four namespaces, deleted on drop.
struct Gateway {
    client: String,
    router: String,
    second_lan: String,
    wan: String,
    control: PathBuf,
}

impl Gateway {
    fn for_test(test: &str) -> Option<Gateway> {
        privileged_or_skip(test).then(Gateway::build)
    }

    fn build() -> Gateway {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}-gw{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // The `upx-[csr]-<pid>-` prefixes: reaped if a killed run leaves them.
        let gateway = Gateway {
            client: format!("upx-c-{id}"),
            router: format!("upx-r-{id}"),
            second_lan: format!("upx-c-{id}-l2"),
            wan: format!("upx-s-{id}"),
            control: std::env::temp_dir().join(format!("upx-{id}.sock")),
        };
        gateway.setup();
        gateway
    }

    fn namespaces(&self) -> [&str; 4] {
        [&self.client, &self.router, &self.second_lan, &self.wan]
    }

    fn setup(&self) {
        let (c, r, l2, w) = (&self.client, &self.router, &self.second_lan, &self.wan);
        for ns in self.namespaces() {
            add_namespace(ns);
        }
        // Strict reverse-path filtering on every interface of the router ("all" is the
        // floor: the kernel takes the larger of it and the interface's own value).
        ip(&format!(
            "netns exec {r} sysctl -qw net.ipv4.conf.all.rp_filter=1 \
             net.ipv4.conf.default.rp_filter=1 net.ipv4.ip_forward=1 \
             net.ipv6.conf.all.forwarding=1"
        ));
        // Each link created inside the namespaces, so its names are private to them.
        let links = [
            ("lan0", c, ROUTER_LAN, CLIENT),
            ("lan1", l2, ["10.71.2.1", "fd71:2::1"], SECOND_LAN),
            ("wan0", w, ROUTER_WAN, ["10.71.9.2", "fd71:9::2"]),
        ];
        for (dev, peer_ns, router_addrs, peer_addrs) in links {
            ip(&format!(
                "-n {r} link add {dev} type veth peer name eth0 netns {peer_ns}"
            ));
            for (ns, dev, addrs) in [
                (r.as_str(), dev, router_addrs),
                (peer_ns, "eth0", peer_addrs),
            ] {
                ip(&format!("-n {ns} addr add {}/24 dev {dev}", addrs[0]));
                ip(&format!("-n {ns} addr add {}/64 dev {dev} nodad", addrs[1]));
                ip(&format!("-n {ns} link set {dev} up"));
            }
            if peer_ns != w {
                ip(&format!(
                    "-n {peer_ns} route add default via {}",
                    router_addrs[0]
                ));
                ip(&format!(
                    "-n {peer_ns} -6 route add default via {}",
                    router_addrs[1]
                ));
            }
        }
        ip(&format!("-n {r} route add default via 10.71.9.2"));
        ip(&format!("-n {r} -6 route add default via fd71:9::2"));
        for server in WAN_SERVER.iter().chain(&WAN_EXCLUDED) {
            let len = if server.contains(':') { 128 } else { 32 };
            ip(&format!("-n {w} addr add {server}/{len} dev lo"));
        }
        // The way back to the LANs, for the excluded address's replies only.
        ip(&format!(
            "-n {w} rule add from {} lookup 100",
            WAN_EXCLUDED[0]
        ));
        ip(&format!(
            "-n {w} route add 10.71.0.0/16 via 10.71.9.1 table 100"
        ));
        ip(&format!(
            "-n {w} -6 rule add from {} lookup 100",
            WAN_EXCLUDED[1]
        ));
        ip(&format!(
            "-n {w} -6 route add fd71::/16 via fd71:9::1 table 100"
        ));
        for (ns, dev) in [
            (c.as_str(), "eth0"),
            (l2, "eth0"),
            (w, "eth0"),
            (r, "lan0"),
            (r, "lan1"),
            (r, "wan0"),
        ] {
            let up = wait_until(common::EVENT_DEADLINE, || {
                run("ip", &["-n", ns, "-j", "link", "show", "dev", dev])
                    .contains(r#""operstate":"UP""#)
            });
            assert!(up, "{dev} in {ns} not operationally up after 30 s");
        }
    }

    /// Starts the proxy on the router (`-i wan0`, our TUN and control socket, plus
    /// `args`) and waits for its control socket, made after the rules are in place.
    fn start_proxy(&self, args: &[&str]) -> Proxy {
        let control = self.control.to_str().unwrap();
        let mut all = vec!["-i", "wan0", "--tun", TUN, "--control", control];
        all.extend_from_slice(args);
        let mut proxy = spawn_proxy_in(&self.router, &all);
        let _ = std::fs::remove_file(&self.control);
        let listening = wait_until(Duration::from_secs(10), || {
            proxy.assert_running();
            std::os::unix::net::UnixStream::connect(&self.control).is_ok()
        });
        assert!(listening, "no control socket after 10 s");
        proxy
    }

    /// The router's rules tagged as ours, both families, as `ip rule` shows them.
    fn our_rules(&self) -> Vec<String> {
        ["-4", "-6"]
            .iter()
            .flat_map(|family| {
                run("ip", &["-n", &self.router, family, "rule", "show"])
                    .lines()
                    .filter(|line| line.contains("proto 117"))
                    .map(|line| format!("{family} {line}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn status(&self, json: bool) -> String {
        let control = self.control.to_str().unwrap();
        let mut args = vec!["status", "--control", control];
        if json {
            args.push("--json");
        }
        let output = Command::new(PROXY_BIN).args(&args).output().unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs `program` in namespace `ns` and returns its output.
    fn exec(&self, ns: &str, program: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(program)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {program:?}: {e}"))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for ns in self.namespaces() {
            delete_namespace(ns);
        }
        let _ = std::fs::remove_file(&self.control);
    }
}

/// A connection a server accepted: on which address, from which, and what it received.
#[derive(Clone, Debug)]
struct Accepted {
    local: IpAddr,
    peer: IpAddr,
    received: Option<Transfer>,
}

/// TCP on port `PORT` and UDP on `UDP_PORT` (and DNS on 53 when asked), both families,
/// in one namespace, recording every peer; stopped on drop.
struct Servers {
    accepted: Arc<Mutex<Vec<Accepted>>>,
    stop: Arc<AtomicBool>,
}

/// Bytes of the server's answer to a TCP connection (and of an HTTP body).
const ANSWER: u64 = 2 * MIB;
const ANSWER_SEED: u64 = 71;

impl Servers {
    /// TCP on every address of `ns`; UDP (and DNS, when `dns`) on each of `addrs`:
    /// bound to the address, so that replies leave from it (a wildcard UDP socket's
    /// replies would take the route's source address instead).
    fn start(ns: &str, addrs: &[&str], dns: bool) -> Servers {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let addrs: Vec<IpAddr> = addrs.iter().map(|a| addr(a)).collect();
        let (tcp, datagrams) = join(in_netns(ns, move || {
            let tcp = TcpListener::bind((ANY, PORT)).expect("bind TCP");
            let mut datagrams = Vec::new();
            for addr in addrs {
                datagrams.push((UdpSocket::bind((addr, UDP_PORT)).expect("bind UDP"), false));
                if dns {
                    datagrams.push((UdpSocket::bind((addr, 53)).expect("bind DNS"), true));
                }
            }
            (tcp, datagrams)
        }));
        tcp.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + SERVER_LIFETIME;
        let running = {
            let stop = stop.clone();
            move || !stop.load(Ordering::Relaxed) && Instant::now() < deadline
        };
        {
            let (accepted, running) = (accepted.clone(), running.clone());
            thread::spawn(move || {
                while running() {
                    match tcp.accept() {
                        Ok((stream, peer)) => {
                            let accepted = accepted.clone();
                            thread::spawn(move || serve_tcp(stream, peer, &accepted));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        for (socket, is_dns) in datagrams {
            let running = running.clone();
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while running() {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    // DNS: the test responder's answer; else the datagram back, after
                    // the address it came from.
                    let reply = if is_dns {
                        dns_response(&buf[..n]).unwrap_or_default()
                    } else {
                        let mut reply = format!("{}\n", from.ip().to_canonical()).into_bytes();
                        reply.extend_from_slice(&buf[..n]);
                        reply
                    };
                    let _ = socket.send_to(&reply, from);
                }
            });
        }
        Servers { accepted, stop }
    }

    /// The peer of the one connection accepted on `local` (waits for the server thread
    /// to record it).
    fn peer_on(&self, local: IpAddr) -> Accepted {
        let mut found = None;
        let seen = wait_until(Duration::from_secs(10), || {
            found = (self.accepted.lock().unwrap().iter())
                .rfind(|a| a.local == local)
                .cloned();
            found.is_some()
        });
        assert!(seen, "no connection accepted on {local}");
        found.unwrap()
    }

    fn clear(&self) {
        self.accepted.lock().unwrap().clear();
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One connection: an HTTP GET gets `ANSWER` bytes as its body; anything else is read
/// to its end (and hashed) before `ANSWER` bytes go back.
fn serve_tcp(stream: TcpStream, peer: SocketAddr, accepted: &Mutex<Vec<Accepted>>) {
    stream.set_nonblocking(false).unwrap();
    set_timeouts(&stream);
    let local = stream.local_addr().unwrap().ip().to_canonical();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let http = reader
        .fill_buf()
        .is_ok_and(|head| head.starts_with(b"GET "));
    let received = if http {
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        None
    } else {
        try_recv_to_end(&mut reader).ok()
    };
    accepted.lock().unwrap().push(Accepted {
        local,
        peer: peer.ip().to_canonical(),
        received,
    });
    let mut writer = stream;
    if http {
        let head =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {ANSWER}\r\nConnection: close\r\n\r\n");
        let _ = writer.write_all(head.as_bytes());
    }
    send_payload(&mut writer, ANSWER_SEED, ANSWER);
    let _ = writer.shutdown(Shutdown::Write);
    // Until the client has read everything and closed.
    let _ = writer.read(&mut [0u8; 1]);
}

/// From namespace `ns`: sends `len` bytes of `seed` to `server`, half-closes, and checks
/// the answer's hash.
fn exchange(ns: &str, server: IpAddr, seed: u64, len: u64) {
    join(in_netns(ns, move || {
        let target = SocketAddr::new(server, PORT);
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect {target}: {e}"));
        set_timeouts(&stream);
        let mut writer = stream.try_clone().unwrap();
        send_payload(&mut writer, seed, len);
        writer.shutdown(Shutdown::Write).unwrap();
        let mut reader = stream;
        assert_eq!(
            recv_to_end(&mut reader),
            payload_digest(ANSWER_SEED, ANSWER),
            "answer from {target}"
        );
    }));
}

/// A TCP exchange from the LAN client to `server`, which must have seen `expected_peer`
/// and received every byte intact.
fn check_tcp(gw: &Gateway, servers: &Servers, server: &str, expected_peer: &str, seed: u64) {
    let len = 3 * MIB + 5;
    exchange(&gw.client, addr(server), seed, len);
    let accepted = servers.peer_on(addr(server));
    assert_eq!(
        (accepted.peer, accepted.received),
        (addr(expected_peer), Some(payload_digest(seed, len))),
        "TCP to {server}"
    );
}

/// A UDP round trip from the LAN client to `server`, which must have seen
/// `expected_peer`.
fn check_udp(gw: &Gateway, server: &str, expected_peer: &str) {
    let target = SocketAddr::new(addr(server), UDP_PORT);
    let reply = join(in_netns(&gw.client, move || {
        let socket = UdpSocket::bind(if target.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::new(ANY, 0)
        })
        .unwrap();
        socket.connect(target).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let payload = vec![0x5au8; 1200];
        let mut buf = vec![0u8; 65536];
        for _ in 0..5 {
            socket.send(&payload).unwrap();
            if let Ok(n) = socket.recv(&mut buf) {
                return Some(buf[..n].to_vec());
            }
        }
        None
    }))
    .unwrap_or_else(|| panic!("no UDP answer from {target}"));
    // The address line first, so that a wrong one shows as text.
    let (seen, echoed) = reply.split_at(reply.iter().position(|&b| b == b'\n').unwrap_or(0));
    assert_eq!(
        (String::from_utf8_lossy(seen).as_ref(), echoed.len()),
        (expected_peer, 1201),
        "UDP to {target}"
    );
    assert!(
        echoed[1..].iter().all(|&b| b == 0x5a),
        "UDP to {target}: payload changed"
    );
}

fn check_dns(gw: &Gateway, server: &str) {
    let target = SocketAddr::new(addr(server), 53);
    join(in_netns(&gw.client, move || {
        let socket = UdpSocket::bind(SocketAddr::new(
            if target.is_ipv4() {
                [0, 0, 0, 0].into()
            } else {
                ANY
            },
            0,
        ))
        .unwrap();
        socket.connect(target).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let query = dns_query(0x7171, "gateway.example");
        let mut buf = vec![0u8; 512];
        for _ in 0..5 {
            socket.send(&query).unwrap();
            if let Ok(n) = socket.recv(&mut buf) {
                check_response(&query, &buf[..n]);
                return;
            }
        }
        panic!("no DNS answer from {target}");
    }));
}

fn check_ping(gw: &Gateway, target: &str) {
    let output = gw.exec(
        &gw.client,
        &["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", target],
    );
    assert!(
        output.status.success(),
        "ping {target}: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// curl from the LAN client: the whole body, hash-checked.
fn check_curl(gw: &Gateway, server: &str) {
    let url = if server.contains(':') {
        format!("http://[{server}]:{PORT}/")
    } else {
        format!("http://{server}:{PORT}/")
    };
    let output = gw.exec(
        &gw.client,
        &["curl", "-sS", "--max-time", "30", "-o", "-", &url],
    );
    assert!(
        output.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        recv_to_end(&mut &output.stdout[..]),
        payload_digest(ANSWER_SEED, ANSWER),
        "curl {url}"
    );
}

#[test]
fn a_routers_lan_is_proxied_while_the_router_other_lans_and_excludes_stay_direct() {
    let Some(gw) = Gateway::for_test(
        "a_routers_lan_is_proxied_while_the_router_other_lans_and_excludes_stay_direct",
    ) else {
        return;
    };
    let wan = Servers::start(&gw.wan, &[WAN_SERVER, WAN_EXCLUDED].concat(), true);
    let router = Servers::start(&gw.router, &[ROUTER_LAN, ROUTER_WAN].concat(), false);
    let second_lan = Servers::start(&gw.second_lan, &SECOND_LAN, false);
    let mut proxy = gw.start_proxy(&[
        "--lan",
        "lan0",
        "--exclude",
        &format!("{}/32", WAN_EXCLUDED[0]),
        "--exclude",
        &format!("{}/128", WAN_EXCLUDED[1]),
    ]);
    for family in 0..2 {
        let seed = 100 + family as u64;
        // Through the proxy: the WAN sees the router's uplink address.
        check_tcp(&gw, &wan, WAN_SERVER[family], ROUTER_WAN[family], seed);
        check_curl(&gw, WAN_SERVER[family]);
        check_udp(&gw, WAN_SERVER[family], ROUTER_WAN[family]);
        check_dns(&gw, WAN_SERVER[family]);
        check_ping(&gw, WAN_SERVER[family]);
        // Excluded: routed as before, the WAN sees the client itself.
        check_tcp(&gw, &wan, WAN_EXCLUDED[family], CLIENT[family], seed + 10);
        check_udp(&gw, WAN_EXCLUDED[family], CLIENT[family]);
        // The router's own services, on its LAN and its uplink addresses.
        for local in [ROUTER_LAN[family], ROUTER_WAN[family]] {
            check_tcp(&gw, &router, local, CLIENT[family], seed + 20);
            check_udp(&gw, local, CLIENT[family]);
        }
        // LAN to LAN: forwarded.
        check_tcp(
            &gw,
            &second_lan,
            SECOND_LAN[family],
            CLIENT[family],
            seed + 30,
        );
        check_udp(&gw, SECOND_LAN[family], CLIENT[family]);
        check_ping(&gw, SECOND_LAN[family]);
        wan.clear();
    }
    // What went through the proxy: the LAN's flows to the WAN server, none else.
    let text = gw.status(false);
    assert!(text.contains("\nrules: 6\n"), "{text}");
    for rule in [
        "  IPv4 30059: from all to 203.0.113.20/32 iif lan0 lookup main\n",
        "  IPv4 30060: from all iif lan0 lookup main suppress_prefixlength 0\n",
        "  IPv4 30061: from all iif lan0 lookup 30064\n",
        "  IPv6 30061: from all iif lan0 lookup 30064\n",
    ] {
        assert!(text.contains(rule), "{rule:?} not in\n{text}");
    }
    let json = gw.status(true);
    assert!(
        json.contains(
            r#""rules":["IPv4 30059: from all to 203.0.113.20/32 iif lan0 lookup main","#
        ),
        "{json}"
    );
    assert_eq!(gw.our_rules().len(), 6, "{:?}", gw.our_rules());
    proxy.terminate();
    assert_eq!(gw.our_rules(), Vec::<String>::new());
    // With the rules gone the LAN's traffic is forwarded as before (and, with no route
    // back, unanswered): the proxy was the way.
    let direct = gw.exec(
        &gw.client,
        &[
            "curl",
            "-sS",
            "--max-time",
            "3",
            "-o",
            "/dev/null",
            &format!("http://{}:{PORT}/", WAN_SERVER[0]),
        ],
    );
    assert!(
        !direct.status.success(),
        "reached the WAN without the proxy"
    );
}

#[test]
fn uid_ranges_pick_the_hosts_connections() {
    let Some(gw) = Gateway::for_test("uid_ranges_pick_the_hosts_connections") else {
        return;
    };
    let _wan = Servers::start(&gw.wan, &[], false);
    let proxy = gw.start_proxy(&[
        "--route",
        "203.0.113.0/24",
        "--route",
        "2001:db8:71::/64",
        "--uid",
        "4242-4243",
        "--exclude-uid",
        "4243",
    ]);
    // The source address the connection had on the router: the TUN's when proxied.
    let local_ip = |uid: Option<&str>, server: &str| {
        let url = if server.contains(':') {
            format!("http://[{server}]:{PORT}/")
        } else {
            format!("http://{server}:{PORT}/")
        };
        let mut program: Vec<String> = Vec::new();
        if let Some(uid) = uid {
            program.extend(
                [
                    "setpriv",
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                ]
                .map(String::from),
            );
        }
        program.extend(
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                "-o",
                "/dev/null",
                "-w",
                "%{local_ip} %{size_download}",
                &url,
            ]
            .map(String::from),
        );
        let program: Vec<&str> = program.iter().map(String::as_str).collect();
        let output = gw.exec(&gw.router, &program);
        assert!(
            output.status.success(),
            "{program:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    for family in 0..2 {
        let server = WAN_SERVER[family];
        let size = format!(" {ANSWER}");
        assert_eq!(
            local_ip(Some("4242"), server),
            format!("{}{size}", TUN_ADDRS[family]),
            "uid 4242 to {server}"
        );
        for uid in [None, Some("4243"), Some("4244")] {
            assert_eq!(
                local_ip(uid, server),
                format!("{}{size}", ROUTER_WAN[family]),
                "uid {uid:?} to {server}"
            );
        }
    }
    drop(proxy);
}

#[test]
fn rules_go_at_sigterm_and_a_killed_run_s_at_the_next_start() {
    let Some(gw) = Gateway::for_test("rules_go_at_sigterm_and_a_killed_run_s_at_the_next_start")
    else {
        return;
    };
    let args = [
        "--lan",
        "lan0",
        "--lan",
        "lan1",
        "--route",
        "0.0.0.0/0",
        "--exclude",
        "192.0.2.0/24",
        "--exclude-uid",
        "34",
    ];
    // The host forwards IPv4 only: the proxy says so and starts all the same.
    ip(&format!(
        "netns exec {} sysctl -qw net.ipv6.conf.all.forwarding=0",
        gw.router
    ));
    let mut proxy = gw.start_proxy(&args);
    let stderr = proxy.stderr();
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("forward")).collect();
    assert_eq!(
        warnings,
        [
            "uringproxy: warn: net.ipv6.conf.all.forwarding is not 1: the host does not forward IPv6, so --lan clients' IPv6 traffic reaches neither the TUN nor anywhere else (sysctl -w net.ipv6.conf.all.forwarding=1)"
        ]
    );
    let installed = gw.our_rules();
    // IPv4: TUN source, bypass, exclude, uid exclude, destination, and per LAN an
    // exclude, main and the TUN; IPv6: the LANs' main and TUN rules.
    assert_eq!(installed.len(), 5 + 2 * 3 + 2 * 2, "{installed:?}");
    proxy.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(proxy.wait_exit(common::EVENT_DEADLINE).is_some());
    assert_eq!(
        gw.our_rules(),
        installed,
        "a killed proxy cannot remove its rules"
    );
    // The TUN may outlive the killed process by a few ms.
    let gone = wait_until(common::EVENT_DEADLINE, || {
        !run("ip", &["-n", &gw.router, "link", "show"]).contains(TUN)
    });
    assert!(gone, "the killed proxy's TUN stayed");
    let mut proxy = gw.start_proxy(&args);
    assert_eq!(gw.our_rules(), installed);
    let removed = format!("removed {} policy rules for table 30064", installed.len());
    assert!(proxy.stderr().contains(&removed), "{}", proxy.stderr());
    proxy.terminate();
    assert_eq!(gw.our_rules(), Vec::<String>::new());
}

#[test]
fn bad_gateway_flags_are_one_line_before_anything_is_created() {
    if !privileged_or_skip("bad_gateway_flags_are_one_line_before_anything_is_created") {
        return;
    }
    let gw = Gateway::build();
    for (args, expected) in [
        (
            &["--lan", "nosuch0"][..],
            "--lan nosuch0: no such interface",
        ),
        (&["--lan", TUN], "--lan upxgw0: that is the proxy's own TUN"),
        (&["--lan", "wan0"], "--lan wan0: that is -i"),
        (
            &["--lan", "lan0", "--exclude", "203.0.113.1/24"],
            "--exclude '203.0.113.1/24' has host bits set: the network is 203.0.113.0/24",
        ),
        (
            &["--route", "::/0", "--uid", "1000-"],
            "--uid '1000-': expected a user id",
        ),
        (
            &["--route", "::/0", "--exclude-uid", "9-1"],
            "--exclude-uid '9-1': the range is reversed",
        ),
        (
            &["--lan", "lan0", "--uid", "1000"],
            "--uid selects among the host's connections",
        ),
    ] {
        let output = gw.exec(
            &gw.router,
            &[
                &[PROXY_BIN, "-i", "wan0", "--tun", TUN, "--control", "none"][..],
                args,
            ]
            .concat(),
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        let lines: Vec<&str> = common::without_override_warnings(&stderr).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].starts_with(&format!("uringproxy: error: {expected}")),
            "{args:?}: {stderr}"
        );
        assert!(!run("ip", &["-n", &gw.router, "link", "show"]).contains(TUN));
        assert_eq!(gw.our_rules(), Vec::<String>::new());
    }
}

#[test]
fn the_upstreams_address_stays_direct_for_the_lan() {
    let Some(gw) = Gateway::for_test("the_upstreams_address_stays_direct_for_the_lan") else {
        return;
    };
    let wan = Servers::start(&gw.wan, &WAN_EXCLUDED, false);
    // Nothing listens for SOCKS5 there: only the address matters to the rules.
    let upstream = format!("socks5://{}:1080", WAN_EXCLUDED[0]);
    let _proxy = gw.start_proxy(&["--lan", "lan0", "--upstream", &upstream]);
    let text = gw.status(false);
    assert!(
        text.contains("  IPv4 30059: from all to 203.0.113.20/32 iif lan0 lookup main\n"),
        "{text}"
    );
    // Reached directly, as if --exclude'd: the upstream sees the client itself.
    check_tcp(&gw, &wan, WAN_EXCLUDED[0], CLIENT[0], 300);
    check_udp(&gw, WAN_EXCLUDED[0], CLIENT[0]);
}

/// The name the WAN's /etc/hosts gives its proxied server (both families).
const WAN_NAME: &str = "web.gw.test";
/// The TUN's peer with the default --tun-addr: the resolver a LAN client is given.
const RESOLVER: &str = "198.18.0.2";
/// Where the proxy's fake addresses come from with the default --tun-addr.
const FAKE_PREFIXES: [&str; 2] = ["198.19.", "fd7a:7072:7879:fa4e:"];

/// microsocks in the WAN namespace on its router-facing address, resolving names with
/// that namespace's /etc/hosts; killed on drop.
struct WanSocks(std::process::Child);

impl WanSocks {
    const ADDR: &str = "10.71.9.2";
    const PORT: u16 = 1080;

    fn start(gw: &Gateway) -> WanSocks {
        let child = Command::new("ip")
            .args(["netns", "exec", &gw.wan, "microsocks", "-i", Self::ADDR])
            .args(["-p", &Self::PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn microsocks");
        let socks = WanSocks(child);
        let target = SocketAddr::new(addr(Self::ADDR), Self::PORT);
        let listening = wait_until(Duration::from_secs(10), || {
            join(in_netns(&gw.wan, move || {
                TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
            }))
        });
        assert!(listening, "microsocks not listening on {target} after 10 s");
        socks
    }
}

impl Drop for WanSocks {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn lan_clients_resolve_through_the_tun_peer_and_reach_servers_by_name() {
    let test = "lan_clients_resolve_through_the_tun_peer_and_reach_servers_by_name";
    if !["microsocks", "curl"]
        .iter()
        .all(|tool| common::tool_or_skip(tool, test))
    {
        return;
    }
    let Some(gw) = Gateway::for_test(test) else {
        return;
    };
    // Before anything runs there: `ip netns exec` mounts these files at each start.
    let hosts = format!(
        "{} {WAN_NAME}\n{} {WAN_NAME}\n",
        WAN_SERVER[0], WAN_SERVER[1]
    );
    let resolv = format!("nameserver {RESOLVER}\noptions timeout:2 attempts:3\n");
    let _etc = [
        common::NetnsEtc::new(&gw.wan, &[("hosts", hosts)]),
        common::NetnsEtc::new(&gw.client, &[("resolv.conf", resolv)]),
    ];
    let wan = Servers::start(&gw.wan, &WAN_SERVER, false);
    let _socks = WanSocks::start(&gw);
    let upstream = format!("socks5://{}:{}", WanSocks::ADDR, WanSocks::PORT);
    let _proxy = gw.start_proxy(&["--lan", "lan0", "--upstream", &upstream, "--dns", "fake"]);
    let body = std::env::temp_dir().join(format!("upx-gw-{}-body", std::process::id()));
    let mut used = Vec::new();
    for (family, fake_prefix) in ["-4", "-6"].into_iter().zip(FAKE_PREFIXES) {
        wan.clear();
        let url = format!("http://{WAN_NAME}:{PORT}/");
        let output = gw.exec(
            &gw.client,
            &[
                "curl",
                family,
                "-sS",
                "--max-time",
                "30",
                "-o",
                body.to_str().unwrap(),
                "-w",
                "%{remote_ip}",
                &url,
            ],
        );
        assert!(
            output.status.success(),
            "curl {family} {url}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // The name came back as a fake address, so the flow went by name.
        let remote = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            remote.starts_with(fake_prefix),
            "curl {family} {url} connected to {remote}"
        );
        used.push(remote);
        let bytes = std::fs::read(&body).expect("read the body curl wrote");
        let _ = std::fs::remove_file(&body);
        assert_eq!(
            recv_to_end(&mut &bytes[..]),
            payload_digest(ANSWER_SEED, ANSWER),
            "curl {family} {url}"
        );
        // microsocks connected (to whichever address of the name it picked) from the WAN
        // itself: the client's address never got there.
        let mut seen = Vec::new();
        wait_until(Duration::from_secs(10), || {
            seen = wan.accepted.lock().unwrap().clone();
            !seen.is_empty()
        });
        assert!(
            seen.iter().all(|a| !CLIENT.map(addr).contains(&a.peer)) && !seen.is_empty(),
            "curl {family}: the WAN server saw {seen:?}"
        );
    }
    // A resolver past the router (where nothing answers DNS) is the proxy too: every
    // query entering the TUN is its to answer, with the name's fake address.
    let resolver = SocketAddr::new(addr(WAN_SERVER[0]), 53);
    let reply = join(in_netns(&gw.client, move || {
        let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).unwrap();
        socket.connect(resolver).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let query = dns_query(0x7272, WAN_NAME);
        let mut buf = vec![0u8; 512];
        (0..5).find_map(|_| {
            socket.send(&query).unwrap();
            let n = socket.recv(&mut buf).ok()?;
            Some(buf[..n].to_vec())
        })
    }))
    .unwrap_or_else(|| panic!("no DNS answer from {resolver}"));
    let end = reply.len();
    assert!(end >= 16 + 12 && reply[3] & 0x0f == 0, "{reply:?}");
    let answer = IpAddr::from([
        reply[end - 4],
        reply[end - 3],
        reply[end - 2],
        reply[end - 1],
    ]);
    assert_eq!(answer.to_string(), used[0], "{WAN_NAME} from {resolver}");
}
