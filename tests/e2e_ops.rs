//! End-to-end tests of running the proxy for a long time: a churn of connections in a
//! mix of endings leaves no flow, fd or memory behind, and running out of file
//! descriptors refuses new flows while existing ones keep working.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use common::{
    KIB, MIB, Topology, Transfer, abort, echo, exchange, join, recv_to_end, send_payload,
    wait_until,
};

const ANY: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// How a churn connection ends.
#[derive(Clone, Copy)]
enum Ending {
    /// Bytes both ways, hash-checked, FIN each way.
    Echo,
    /// The client half-closes, then the server answers.
    HalfClose,
    /// The client resets mid-transfer.
    ClientAbort,
    /// The server resets mid-transfer.
    ServerReset,
}

const ENDINGS: [Ending; 4] = [
    Ending::Echo,
    Ending::HalfClose,
    Ending::ClientAbort,
    Ending::ServerReset,
];

/// The server side of one churn connection; the first byte says how it ends.
fn churn_server(mut stream: TcpStream) {
    let mut mode = [0u8; 1];
    if stream.read_exact(&mut mode).is_err() {
        return;
    }
    match ENDINGS.get(usize::from(mode[0])) {
        Some(Ending::Echo) => {
            echo(stream);
        }
        Some(Ending::HalfClose) => {
            recv_to_end(&mut stream);
            send_payload(&mut stream, 7, 32 * KIB);
        }
        Some(Ending::ClientAbort) => {
            let _ = std::io::copy(&mut stream, &mut std::io::sink());
        }
        Some(Ending::ServerReset) => {
            let _ = stream.write_all(&[0x55; 16 * 1024]);
            abort(stream);
        }
        None => {}
    }
}

/// The client side; returns whether the connection ended as it should have.
fn churn_client(addr: SocketAddr, index: usize) -> bool {
    let ending = ENDINGS[index % ENDINGS.len()];
    let Ok(mut stream) = common::try_connect(addr) else {
        return false;
    };
    stream
        .write_all(&[(index % ENDINGS.len()) as u8])
        .expect("send mode");
    let len = (4 + index % 61) as u64 * KIB;
    match ending {
        Ending::Echo => {
            let (sent, received) = exchange(stream, index as u64, len);
            sent == received
        }
        Ending::HalfClose => {
            send_payload(&mut stream, index as u64, len);
            stream.shutdown(Shutdown::Write).expect("shutdown");
            recv_to_end(&mut stream).bytes == 32 * KIB
        }
        Ending::ClientAbort => {
            send_payload(&mut stream, index as u64, len);
            abort(stream);
            true
        }
        Ending::ServerReset => {
            let mut sink = Vec::new();
            matches!(stream.read_to_end(&mut sink), Err(e) if e.kind() == ErrorKind::ConnectionReset)
        }
    }
}

/// The memory of closed flows goes back to the kernel: thousands of concurrent flows
/// raise the proxy's RSS, and once they have closed most of that rise is gone (glibc
/// would keep the freed heap mapped if the proxy did not trim it).
#[test]
fn memory_of_closed_flows_is_returned() {
    const FLOWS: usize = 3000;
    let Some(topo) = Topology::for_test("memory_of_closed_flows_is_returned") else {
        return;
    };
    // This process holds one socket per flow.
    raise_fd_limit(FLOWS as u64);
    // Without offload: its buffer pools become resident as they are used, which would
    // blur what the flows themselves cost.
    let proxy = topo.start_proxy(&["--no-offload"]);
    let baseline_fds = proxy.settled_fd_count();
    let baseline = proxy.rss_kib();
    // The server's kernel establishes the connections; nobody accepts them, so the
    // test process holds one fd per flow, not two.
    let addr = SocketAddr::new(topo.server_v4(), 7300);
    let listener = join(topo.in_server(move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.bind(&addr.into()).expect("bind");
        socket.listen(FLOWS as i32 + 64).expect("listen");
        socket
    }));
    let clients = join(topo.in_client(move || {
        (0..FLOWS)
            .map(|_| common::connect(addr))
            .collect::<Vec<_>>()
    }));
    let peak = proxy.rss_kib();
    assert!(
        peak >= baseline + 2 * 1024,
        "{FLOWS} flows should cost megabytes: RSS {baseline} -> {peak} KiB"
    );
    drop(clients);
    drop(listener);
    let closed = wait_until(Duration::from_secs(15), || proxy.fd_count() <= baseline_fds);
    assert!(
        closed,
        "fds {} after closing, baseline {baseline_fds}",
        proxy.fd_count()
    );
    // The proxy trims its heap in its once-a-second housekeeping.
    let limit = baseline + (peak - baseline) / 2;
    wait_until(Duration::from_secs(10), || proxy.rss_kib() <= limit);
    let after = proxy.rss_kib();
    eprintln!("closed flows: RSS {baseline} KiB -> {peak} KiB with {FLOWS} flows -> {after} KiB");
    assert!(
        after <= limit,
        "RSS {after} KiB after the flows closed: baseline {baseline} KiB, peak {peak} KiB"
    );
}

/// Raises this process's fd limit to its hard limit, which must leave room for `sockets`.
fn raise_fd_limit(sockets: u64) {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("RLIMIT_NOFILE");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise RLIMIT_NOFILE");
    assert!(
        hard >= sockets + 256,
        "fd limit {hard} too low for {sockets} sockets"
    );
}

/// What a connection of the stalled-flows test does; the client's first byte says.
const STALLED_DOWNLOAD: u8 = b'D';
const STALLED_UPLOAD: u8 = b'U';
const BULK_DOWNLOAD: u8 = b'B';
const STALLED_BYTES: u64 = 512 * KIB;
const BULK_BYTES: u64 = 256 * MIB;

/// The server side of the stalled-flows test: it sends a download at once, but reads an
/// upload only once the test lets it.
fn stalled_server(mut stream: TcpStream, release: &AtomicBool) -> Transfer {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).expect("read header");
    let seed = u64::from_le_bytes(header[1..].try_into().unwrap());
    match header[0] {
        STALLED_UPLOAD => {
            await_release(release);
            recv_to_end(&mut stream)
        }
        STALLED_DOWNLOAD => send_payload(&mut stream, seed, STALLED_BYTES),
        _ => send_payload(&mut stream, seed, BULK_BYTES),
    }
}

fn await_release(release: &AtomicBool) {
    let released = wait_until(Duration::from_secs(60), || release.load(Ordering::Relaxed));
    assert!(released, "never released");
}

/// One connection's client side; returns what it sent and what it received.
fn stalled_client(addr: SocketAddr, mode: u8, seed: u64, release: &AtomicBool) -> [Transfer; 2] {
    let mut stream = common::connect(addr);
    let mut header = [mode; 9];
    header[1..].copy_from_slice(&seed.to_le_bytes());
    stream.write_all(&header).expect("write header");
    let sent = match mode {
        STALLED_UPLOAD => send_payload(&mut stream, seed, STALLED_BYTES),
        _ => common::payload_digest(0, 0),
    };
    stream.shutdown(Shutdown::Write).expect("shutdown write");
    // A stalled flow's end comes only after the release, which waits for the bulk
    // download (up to a minute): its read timeout must start there. An upload's bytes
    // often all fit in the kernels' and the proxy's buffers, so its sends finish long
    // before its server reads them and closes.
    if mode != BULK_DOWNLOAD {
        await_release(release);
    }
    [sent, recv_to_end(&mut stream)]
}

/// Flows whose other end stops reading hold the proxy to its memory limit: a thousand
/// downloads whose clients do not read and a thousand uploads whose servers do not, each
/// with half a megabyte to move, keep the RSS within the default limit while a bulk
/// download runs beside them; then every byte arrives intact once they read again.
#[test]
fn stalled_flows_are_held_to_the_memory_limit() {
    const STALLED: usize = 1000;
    // The default --memory-limit.
    const LIMIT_MIB: u64 = 64;
    let Some(topo) = Topology::for_test("stalled_flows_are_held_to_the_memory_limit") else {
        return;
    };
    raise_fd_limit(2 * STALLED as u64);
    let proxy = topo.start_proxy(&[]);
    let baseline = proxy.rss_kib();
    let release = Arc::new(AtomicBool::new(false));
    let server = {
        let release = Arc::clone(&release);
        topo.serve(topo.server_v4(), 2 * STALLED + 1, move |stream| {
            stalled_server(stream, &release)
        })
    };
    let addr = server.addr();
    let clients: Vec<_> = (0..2 * STALLED + 1)
        .map(|i| {
            let release = Arc::clone(&release);
            let mode = match i {
                0 => BULK_DOWNLOAD,
                _ if i % 2 == 0 => STALLED_DOWNLOAD,
                _ => STALLED_UPLOAD,
            };
            topo.in_client(move || stalled_client(addr, mode, i as u64, &release))
        })
        .collect();
    // The bulk download runs while the stalled flows fill what they may; the proxy's
    // RSS is sampled throughout.
    let mut clients = clients.into_iter();
    let bulk = clients.next().unwrap();
    let mut peak = 0;
    let start = Instant::now();
    let bulk_done = wait_until(Duration::from_secs(60), || {
        let rss = proxy.rss_kib();
        peak = peak.max(rss);
        bulk.is_finished() && start.elapsed() >= Duration::from_secs(4)
    });
    assert!(
        bulk_done,
        "the bulk download did not finish beside the stalled flows"
    );
    let [_, bulk_received] = join(bulk);
    assert_eq!(bulk_received, common::payload_digest(0, BULK_BYTES));
    let stats = proxy.stats();
    eprintln!(
        "stalled flows: RSS {baseline} KiB -> peak {peak} KiB with {STALLED} stalled each way, \
         limit {LIMIT_MIB} MiB; {stats}"
    );
    // Every flow was live: none reset for want of a connect slot, none by the server
    // (one that cannot keep up with its accepts does that: see `listen` in tests/common).
    assert!(
        stats.contains("half-open-evicted 0 ") && stats.contains("server-reset 0 "),
        "flows were reset: {stats}"
    );
    release.store(true, Ordering::Relaxed);
    let mut received = Vec::new();
    let mut sent = Vec::new();
    for (i, client) in clients.enumerate() {
        let [up, down] = join(client);
        let seed = i as u64 + 1;
        if seed.is_multiple_of(2) {
            assert_eq!(
                down,
                common::payload_digest(seed, STALLED_BYTES),
                "download {seed}"
            );
        } else {
            sent.push(up);
        }
    }
    for transfer in server.join() {
        received.push(transfer);
    }
    // The server returned what it sent for downloads and what it received for uploads:
    // every upload must be among them.
    for upload in &sent {
        assert!(
            received.contains(upload),
            "an upload arrived changed: {upload:?}"
        );
    }
    // The flows' buffers stay within the limit; on top come the TUN buffer pools (8 MiB
    // each way at most with offload) and what a flow costs besides its buffers (about
    // 1.3 KiB: the idle-flow bench), over the proxy's RSS at start.
    let pools_kib = 16 * 1024;
    let bookkeeping_kib = 2 * STALLED as u64 * 2;
    let allowed = baseline + LIMIT_MIB * 1024 + pools_kib + bookkeeping_kib;
    assert!(
        peak <= allowed,
        "RSS peaked at {peak} KiB with stalled flows: more than {allowed} KiB"
    );
}

#[test]
fn connection_churn_leaves_nothing_behind() {
    const CONNECTIONS: usize = 3000;
    const WORKERS: usize = 12;
    let Some(topo) = Topology::for_test("connection_churn_leaves_nothing_behind") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    let baseline_fds = proxy.settled_fd_count();
    let baseline_rss = proxy.rss_kib();
    let server = topo.serve(ANY, CONNECTIONS, churn_server);
    let port = server.port();
    let servers = [topo.server_v4(), topo.server_v6()];
    let next = Arc::new(AtomicUsize::new(0));
    let failures = join(topo.in_client(move || {
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                let next = Arc::clone(&next);
                thread::spawn(move || {
                    let mut failed = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= CONNECTIONS {
                            return failed;
                        }
                        let addr = SocketAddr::new(servers[index % 2], port);
                        if !churn_client(addr, index) {
                            failed.push(index);
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(join).collect::<Vec<_>>()
    }));
    server.join();
    assert!(
        failures.is_empty(),
        "connections that ended wrongly: {failures:?}"
    );

    let settled = wait_until(Duration::from_secs(15), || proxy.fd_count() <= baseline_fds);
    assert!(
        settled,
        "fds {} after churn, baseline {baseline_fds}",
        proxy.fd_count()
    );
    let stats = proxy.stats();
    assert!(
        stats.contains("flow states: connecting 0 open 0 closing 0 "),
        "flows left in the table:\n{stats}"
    );
    let rss = proxy.rss_kib();
    eprintln!(
        "churn: {CONNECTIONS} connections; fds {} (baseline {baseline_fds}); RSS {rss} KiB (baseline {baseline_rss} KiB)",
        proxy.fd_count()
    );
    assert!(
        rss <= baseline_rss + 16 * 1024,
        "RSS {rss} KiB after churn, baseline {baseline_rss} KiB"
    );
    proxy.assert_running();
}

#[test]
fn fd_exhaustion_refuses_new_flows_and_keeps_old_ones() {
    const FD_LIMIT: usize = 40;
    const ATTEMPTS: usize = 60;
    let Some(topo) = Topology::for_test("fd_exhaustion_refuses_new_flows_and_keeps_old_ones")
    else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    let server = topo.serve(ANY, ATTEMPTS + 1, echo);
    let addr = SocketAddr::new(topo.server_v4(), server.port());
    let limit = format!("--nofile={FD_LIMIT}:{FD_LIMIT}");
    let status = Command::new("prlimit")
        .args(["--pid", &proxy.pid().to_string(), &limit])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit failed");

    let (opened, refused, still_working) = join(topo.in_client(move || {
        let mut open = Vec::new();
        let mut refused = 0;
        for _ in 0..ATTEMPTS {
            match common::try_connect(addr) {
                Ok(mut stream) => {
                    // A flow the proxy accepted must really work.
                    stream.write_all(b"ping").expect("write");
                    let mut reply = [0u8; 4];
                    stream.read_exact(&mut reply).expect("echo");
                    open.push(stream);
                }
                Err(e) => {
                    assert!(
                        matches!(
                            e.kind(),
                            ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
                        ),
                        "refused flows get RST, got {e}"
                    );
                    refused += 1;
                }
            }
        }
        // The flows opened before the limit was hit keep working.
        let still_working = open
            .iter()
            .filter(|stream| {
                let mut stream: &TcpStream = stream;
                let mut reply = [0u8; 4];
                stream.write_all(b"pong").is_ok()
                    && stream.read_exact(&mut reply).is_ok()
                    && &reply == b"pong"
            })
            .count();
        let opened = open.len();
        for stream in open {
            let _ = stream.shutdown(Shutdown::Write);
        }
        (opened, refused, still_working)
    }));
    eprintln!(
        "fd exhaustion: limit {FD_LIMIT}: {opened} flows opened and kept working, {refused} refused"
    );
    assert!(
        opened > 0 && refused > 0,
        "opened {opened}, refused {refused}"
    );
    assert!(
        opened < FD_LIMIT,
        "opened {opened} flows with {FD_LIMIT} fds"
    );
    assert_eq!(
        still_working, opened,
        "existing flows broke when fds ran out"
    );
    let warnings = proxy
        .stderr()
        .matches("cannot open outbound sockets")
        .count();
    assert_eq!(warnings, 1, "the condition is logged once per interval");
    // With the old flows closed, new ones get through again.
    wait_until(common::EVENT_DEADLINE, || proxy.fd_count() < FD_LIMIT / 2);
    let reopened = join(topo.in_client(move || common::try_connect(addr).is_ok()));
    assert!(reopened, "no new flow after fds were freed");
    proxy.assert_running();
    drop(server);
}

/// A raw TCP SYN from `src_port` to `dst` (the kernel adds the IP header; the proxy does
/// not verify checksums of packets from its own kernel, so none is computed).
fn syn(src_port: u16, dst_port: u16, seq: u32) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4; // header length: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp
}

#[test]
fn syn_flood_is_bounded_and_real_clients_get_through() {
    const FLOOD: u32 = 50_000;
    let Some(topo) = Topology::for_test("syn_flood_is_bounded_and_real_clients_get_through") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    let baseline_rss = proxy.rss_kib();
    // The flood goes to an address routed into the TUN where no host answers, so every
    // outbound connect hangs (ARP) and its flow stays half open.
    let absent = topo.route_absent_host(66);

    let real_server = topo.serve(topo.server_v4(), 2, echo);
    let real = SocketAddr::new(topo.server_v4(), real_server.port());
    let flood = topo.in_client(move || {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::TCP),
        )
        .expect("raw socket");
        let target = socket2::SockAddr::from(SocketAddr::new(absent, 80));
        let mut state = 0x1234_5678u32;
        let mut sent = 0;
        for i in 0..FLOOD {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let port = 1024 + (state % 64000) as u16;
            if socket.send_to(&syn(port, 80, state ^ i), &target).is_ok() {
                sent += 1;
            }
        }
        sent
    });
    // A real client's flow is half open too until its outbound connect completes: if
    // that takes longer than the flood needs to bring the bound's worth of newer SYNs
    // (about 4 ms here, longer on a loaded machine), it is the oldest and is reset by
    // design. Like a real client it then tries again, a bounded number of times.
    let real_client = move |attempts: usize| {
        for attempt in 1..=attempts {
            match TcpStream::connect_timeout(&real, Duration::from_secs(10)) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    return exchange(stream, 99, 256 * KIB);
                }
                Err(e) if e.kind() == ErrorKind::ConnectionRefused && attempt < attempts => {}
                Err(e) => panic!("real client, attempt {attempt}: {e}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    };
    // A real client in the middle of the flood...
    thread::sleep(Duration::from_millis(50));
    let (sent, received) = join(topo.in_client(move || real_client(3)));
    assert_eq!(received, sent, "real client's echo during the flood");
    let flooded = join(flood);
    assert!(flooded > FLOOD / 2, "only {flooded} SYNs sent");
    // ...and one right after it, while the flood's connects still hang: without the
    // half-open bound the table would fill with them and this SYN would get RST.
    let (sent, received) = join(topo.in_client(move || real_client(1)));
    assert_eq!(received, sent, "real client's echo right after the flood");
    real_server.join();

    let stats = proxy.stats();
    let rss = proxy.rss_kib();
    eprintln!("syn flood: {flooded} SYNs; RSS {rss} KiB (baseline {baseline_rss} KiB)");
    assert!(
        !stats.contains("half-open-evicted 0 "),
        "the flood should have hit the half-open bound:\n{stats}"
    );
    assert!(
        rss <= baseline_rss + 64 * 1024,
        "RSS {rss} KiB after the flood, baseline {baseline_rss} KiB"
    );
    proxy.assert_running();
}

/// The policy rules in the client namespace other than the kernel's three (local, main,
/// default), IPv4 then IPv6, sorted, as `ip rule` prints them ("30062: from ...").
fn policy_rules(topo: &Topology) -> Vec<String> {
    let ns = topo.client_ns();
    let mut rules: Vec<String> = ["-4", "-6"]
        .iter()
        .flat_map(|family| {
            common::ip(&format!("-n {ns} {family} rule show"))
                .lines()
                .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
        })
        .filter(|line| {
            !["0:", "32766:", "32767:"]
                .iter()
                .any(|p| line.starts_with(p))
        })
        .collect();
    rules.sort();
    rules
}

/// What `ip rule` shows for one proxy's rules through `table`, with TUN addresses
/// `tun4`/`tun6` and destinations `to4`/`to6` as `ip` prints them ("" for everything).
fn expected_rules(
    table: u32,
    (tun4, tun6): (&str, &str),
    to4: &[&str],
    to6: &[&str],
) -> Vec<String> {
    let to = |dst: &&str| match *dst {
        "" => format!("{table}: from all lookup {table} proto 117"),
        dst => format!("{table}: from all to {dst} lookup {table} proto 117"),
    };
    let bypass = table - 1;
    let mut rules = Vec::new();
    if !to4.is_empty() {
        rules.push(format!("30062: from {tun4} lookup {table} proto 117"));
        rules.push(format!("{bypass}: not from 0.0.0.0 lookup main proto 117"));
        rules.extend(to4.iter().map(to));
    }
    if !to6.is_empty() {
        rules.push(format!("30062: from {tun6} lookup {table} proto 117"));
        rules.push(format!("{bypass}: from ::/1 lookup main proto 117"));
        rules.push(format!("{bypass}: from 8000::/1 lookup main proto 117"));
        rules.extend(to6.iter().map(to));
    }
    rules.sort();
    rules
}

/// Waits (up to 30 s: the TUN is up before the rules are in) until the namespace's rules
/// are exactly `expected`.
fn assert_rules(topo: &Topology, expected: &[String]) {
    let mut rules = Vec::new();
    let reached = wait_until(common::EVENT_DEADLINE, || {
        rules = policy_rules(topo);
        rules == expected
    });
    assert!(reached, "rules:\n{rules:#?}\nexpected:\n{expected:#?}");
}

/// Waits for `proxy` to exit with status 1 having printed only `uringproxy: error: {error}`.
fn assert_fails_in_one_line(proxy: &mut common::Proxy, error: &str) {
    let status = proxy
        .wait_exit(common::EVENT_DEADLINE)
        .unwrap_or_else(|| panic!("still running after 30 s; expected {error:?}"));
    assert_eq!(status.code(), Some(1), "exit status {status}");
    let stderr = proxy.stderr();
    let lines: Vec<&str> = common::without_override_warnings(&stderr).collect();
    assert_eq!(lines, [format!("uringproxy: error: {error}")]);
}

const TUN4: &str = "198.18.0.1";
const TUN6: &str = "fd7a:7072:7879::1";

/// Echoes 64 KiB to each server address.
fn echo_both_families(topo: &Topology) {
    for ip in [topo.server_v4(), topo.server_v6()] {
        echo_from_client(topo, ip);
    }
}

/// Asserts from the proxy's counters that it has opened exactly `flows` TCP flows.
fn assert_flows_opened(proxy: &common::Proxy, flows: usize, why: &str) {
    let stats = proxy.stats();
    let expected = format!("flows: opened {flows} ");
    assert!(
        stats.contains(&expected),
        "{why}: expected {expected:?}:\n{stats}"
    );
}

/// Echoes 64 KiB through a new connection from the client namespace to a server at
/// `ip`; returns the connection's local address (the TUN's, if the proxy relayed it).
fn echo_from_client(topo: &Topology, ip: IpAddr) -> IpAddr {
    let server = topo.serve(ip, 1, echo);
    let addr = server.addr();
    let (local, sent, received) = join(topo.in_client(move || {
        let stream = common::connect(addr);
        let local = stream.local_addr().expect("local address").ip();
        let (sent, received) = exchange(stream, 5, 64 * KIB);
        (local, sent, received)
    }));
    assert_eq!(received, sent, "echo via {ip}");
    server.join();
    local
}

#[test]
fn route_flag_installs_and_removes_policy_routing() {
    let Some(topo) = Topology::for_test("route_flag_installs_and_removes_policy_routing") else {
        return;
    };
    let (s4, s6) = (topo.server_v4().to_string(), topo.server_v6().to_string());
    let v4 = format!("{s4}/32");
    let v6 = format!("{s6}/128");
    let mut proxy = topo.start_proxy_unrouted(&["--route", &v4, "--route", &v6], &[]);
    assert_rules(&topo, &expected_rules(30064, (TUN4, TUN6), &[&s4], &[&s6]));
    echo_both_families(&topo);
    assert_flows_opened(&proxy, 2, "traffic did not go through the proxy");
    proxy.terminate();
    assert_rules(&topo, &[]);
}

#[test]
fn routing_everything_into_the_tun_does_not_loop() {
    let Some(topo) = Topology::for_test("routing_everything_into_the_tun_does_not_loop") else {
        return;
    };
    let mut proxy = topo.start_proxy_unrouted(&["--route", "0.0.0.0/0", "--route", "::/0"], &[]);
    assert_rules(&topo, &expected_rules(30064, (TUN4, TUN6), &[""], &[""]));
    // The proxy's own sockets leave through the veth (SO_BINDTODEVICE) although every
    // destination is routed into the TUN: flows complete instead of looping.
    echo_both_families(&topo);
    assert_flows_opened(&proxy, 2, "expected exactly the two client flows");
    proxy.terminate();
    assert_rules(&topo, &[]);
}

/// With `routes` sending every destination into the TUN, a TCP server on the proxy's
/// host (wildcard-bound) still answers a client behind a router, over IPv4 and IPv6,
/// without the proxy seeing those connections; new outbound connections from the host
/// meanwhile cross the TUN. The client is off-link on purpose: replies to an on-link
/// client would also keep the main table under weaker rules (wg-quick's
/// `suppress_prefixlength 0`), so only an off-link one tells them apart.
fn hosts_servers_stay_reachable(test: &str, routes: &[&str], to4: &[&str], to6: &[&str]) {
    let Some(topo) = Topology::routed_for_test(test) else {
        return;
    };
    // Strict reverse-path filtering as well: its reverse lookup of an arriving reply
    // carries the local address as source, so the bypass keeps it on the veth.
    common::ip(&format!(
        "netns exec {} sysctl -qw net.ipv4.conf.all.rp_filter=1",
        topo.client_ns()
    ));
    let args: Vec<&str> = routes.iter().flat_map(|r| ["--route", r]).collect();
    let mut proxy = topo.start_proxy_unrouted(&args, &[]);
    assert_rules(&topo, &expected_rules(30064, (TUN4, TUN6), to4, to6));

    let host_server = topo.serve_in_client(ANY, 2, echo);
    let port = host_server.port();
    for ip in [topo.client_v4(), topo.client_v6()] {
        let addr = SocketAddr::new(ip, port);
        let (sent, received) =
            join(topo.in_server(move || exchange(common::connect(addr), 6, 256 * KIB)));
        assert_eq!(received, sent, "the host's server via {ip}");
    }
    host_server.join();
    assert_flows_opened(&proxy, 0, "the server's connections went through the proxy");

    for (ip, tun) in [(topo.server_v4(), TUN4), (topo.server_v6(), TUN6)] {
        let local = echo_from_client(&topo, ip);
        assert_eq!(
            local.to_string(),
            tun,
            "connection to {ip} bypassed the TUN"
        );
    }
    assert_flows_opened(
        &proxy,
        2,
        "outbound connections did not go through the proxy",
    );
    proxy.terminate();
    assert_rules(&topo, &[]);
}

#[test]
fn routing_everything_keeps_the_hosts_servers_reachable() {
    hosts_servers_stay_reachable(
        "routing_everything_keeps_the_hosts_servers_reachable",
        &["0.0.0.0/0", "::/0"],
        &[""],
        &[""],
    );
}

#[test]
fn split_default_routes_work_like_everything() {
    hosts_servers_stay_reachable(
        "split_default_routes_work_like_everything",
        &["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"],
        &["0.0.0.0/1", "128.0.0.0/1"],
        &["::/1", "8000::/1"],
    );
}

/// Two proxies with tables 30064 and 30065 in one namespace, both routing IPv4: the
/// second one's connections look up again with its TUN's address as source and must
/// meet its TUN-source rule before the first one's bypass (priority 30063). A third
/// one with the taken table is refused in one line and leaves the others alone.
#[test]
fn proxies_with_their_own_tables_run_side_by_side() {
    let Some(topo) = Topology::for_test("proxies_with_their_own_tables_run_side_by_side") else {
        return;
    };
    let IpAddr::V4(server) = topo.server_v4() else {
        unreachable!("server_v4 is IPv4")
    };
    let [a, b, c, _] = server.octets();
    let second_server = IpAddr::from([a, b, c, 3]);
    common::ip(&format!(
        "-n {} addr add {second_server}/24 dev {}",
        topo.server_ns(),
        topo.server_veth()
    ));
    let (s4, s6, s4b) = (
        server.to_string(),
        topo.server_v6().to_string(),
        second_server.to_string(),
    );
    let mut first = topo.start_proxy_unrouted(&["--route", &format!("{s4}/32")], &[]);
    let second_tun = ("198.18.0.5", "fd7a:7072:7879:1::1");
    let mut second = topo.start_proxy_on(
        "upxtun1",
        &[
            "--table",
            "30065",
            "--tun-addr",
            "198.18.0.5/30",
            "--tun-addr",
            "fd7a:7072:7879:1::1/64",
            "--route",
            &format!("{s4b}/32"),
            "--route",
            &format!("{s6}/128"),
        ],
        &[],
    );
    let first_rules = expected_rules(30064, (TUN4, TUN6), &[&s4], &[]);
    let second_rules = expected_rules(30065, second_tun, &[&s4b], &[&s6]);
    let mut both: Vec<String> = first_rules.iter().chain(&second_rules).cloned().collect();
    both.sort();
    assert_rules(&topo, &both);

    for (ip, tun) in [
        (topo.server_v4(), TUN4),
        (second_server, second_tun.0),
        (topo.server_v6(), second_tun.1),
    ] {
        let local = echo_from_client(&topo, ip);
        assert_eq!(local.to_string(), tun, "connection to {ip}");
    }
    assert_flows_opened(&first, 1, "the first proxy");
    assert_flows_opened(&second, 2, "the second proxy");

    let mut third = topo.spawn_proxy_on(
        "upxtun2",
        topo.client_veth(),
        &["--tun-addr", "198.18.0.9/30", "--route", "192.0.2.0/24"],
        &[],
    );
    assert_fails_in_one_line(
        &mut third,
        "routing table 30064 already has a default route (another uringproxy or another \
         program uses it): pass another table, e.g. --table 30065",
    );
    assert_rules(&topo, &both);
    assert_eq!(echo_from_client(&topo, topo.server_v4()).to_string(), TUN4);

    first.terminate();
    assert_rules(&topo, &second_rules);
    second.terminate();
    assert_rules(&topo, &[]);
}

/// Two IPv4 TUN addresses: both are on the TUN (SIOCSIFADDR kept only the last one,
/// while the TUN-source rules named both), and a connection bound to each is relayed.
#[test]
fn every_ipv4_tun_address_is_assigned_and_relays() {
    let Some(topo) = Topology::for_test("every_ipv4_tun_address_is_assigned_and_relays") else {
        return;
    };
    let route = format!("{}/32", topo.server_v4());
    let tun_addrs = ["198.18.0.1/30", "198.18.0.5/30"];
    let mut proxy = topo.start_proxy_unrouted(
        &[
            "--tun-addr",
            tun_addrs[0],
            "--tun-addr",
            tun_addrs[1],
            "--route",
            &route,
        ],
        &[],
    );
    let shown = common::ip(&format!(
        "-n {} -4 -o addr show dev {}",
        topo.client_ns(),
        topo.tun_name()
    ));
    let assigned: Vec<&str> = shown
        .lines()
        .filter_map(|line| line.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .collect();
    assert_eq!(assigned, tun_addrs, "ip -4 addr show:\n{shown}");

    let server = topo.serve(topo.server_v4(), tun_addrs.len(), echo);
    let addr = server.addr();
    for (seed, cidr) in tun_addrs.iter().enumerate() {
        let local: IpAddr = cidr.split('/').next().unwrap().parse().unwrap();
        let (bound, sent, received) = join(topo.in_client(move || {
            let stream = connect_from(local, addr);
            let bound = stream.local_addr().expect("local address").ip();
            let (sent, received) = exchange(stream, seed as u64, 64 * KIB);
            (bound, sent, received)
        }));
        assert_eq!(bound, local);
        assert_eq!(received, sent, "echo from {local}");
    }
    server.join();
    assert_flows_opened(&proxy, 2, "a bound connection bypassed the proxy");
    proxy.terminate();
}

/// Connects to `addr` from `local` (port chosen by the kernel), with timeouts applied.
fn connect_from(local: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    socket
        .bind(&SocketAddr::new(local, 0).into())
        .unwrap_or_else(|e| panic!("bind {local}: {e}"));
    socket
        .connect_timeout(&addr.into(), common::IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr} from {local}: {e}"));
    let stream = TcpStream::from(socket);
    common::set_timeouts(&stream);
    stream
}

#[test]
fn rules_left_by_a_killed_proxy_are_removed_at_the_next_start() {
    let Some(topo) =
        Topology::for_test("rules_left_by_a_killed_proxy_are_removed_at_the_next_start")
    else {
        return;
    };
    let (s4, s6) = (topo.server_v4().to_string(), topo.server_v6().to_string());
    let (v4, v6) = (format!("{s4}/32"), format!("{s6}/128"));
    let args = ["--route", v4.as_str(), "--route", v6.as_str()];
    let ours = expected_rules(30064, (TUN4, TUN6), &[&s4], &[&s6]);
    let killed = topo.start_proxy_unrouted(&args, &[]);
    assert_rules(&topo, &ours);
    drop(killed); // SIGKILL
    assert!(
        wait_until(common::EVENT_DEADLINE, || !topo.tun_exists()),
        "the killed proxy's TUN is still there"
    );
    assert_eq!(
        policy_rules(&topo),
        ours,
        "a SIGKILL should leave the rules"
    );
    // Rules that resemble ours but are not: untagged at our priority, tagged with
    // another selector at our bypass priority, a network at the TUN-source priority.
    let ns = topo.client_ns();
    let foreign = [
        (
            "-4",
            "30064 to 192.0.2.0/24 table 30064",
            "30064: from all to 192.0.2.0/24 lookup 30064",
        ),
        (
            "-4",
            "30063 from 192.0.2.0/24 table main proto 117",
            "30063: from 192.0.2.0/24 lookup main proto 117",
        ),
        (
            "-6",
            "30062 from 2001:db8::/32 table 30064 proto 117",
            "30062: from 2001:db8::/32 lookup 30064 proto 117",
        ),
    ];
    for (family, rule, _) in foreign {
        common::ip(&format!("-n {ns} {family} rule add pref {rule}"));
    }
    let mut theirs: Vec<String> = foreign
        .iter()
        .map(|(_, _, shown)| shown.to_string())
        .collect();
    theirs.sort();
    let mut all: Vec<String> = ours.iter().chain(&theirs).cloned().collect();
    all.sort();

    let mut proxy = topo.start_proxy_unrouted(&args, &[]);
    assert_rules(&topo, &all);
    let warnings: Vec<String> = common::without_override_warnings(&proxy.stderr())
        .filter(|line| line.contains("warn"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        warnings,
        [
            "uringproxy: warn: removed 7 policy rules for table 30064 left by a uringproxy that \
          was killed before it could remove them"
        ]
    );
    echo_both_families(&topo);
    assert_flows_opened(&proxy, 2, "after the restart");
    proxy.terminate();
    assert_rules(&topo, &theirs);
}

#[test]
fn bad_route_values_fail_in_one_line() {
    let Some(topo) = Topology::for_test("bad_route_values_fail_in_one_line") else {
        return;
    };
    for (args, error) in [
        (
            &["--route", "10.1.2.3/24"][..],
            "--route '10.1.2.3/24' has host bits set: the network is 10.1.2.0/24",
        ),
        (
            &["--route", "fd00::1/64"],
            "--route 'fd00::1/64' has host bits set: the network is fd00::/64",
        ),
        (
            &["--route", "garbage"],
            "--route 'garbage': expected ADDRESS/PREFIX, e.g. 198.18.0.1/30",
        ),
        (
            &["--route", "10.0.0.0/33"],
            "--route '10.0.0.0/33': prefix longer than 32",
        ),
        (
            &["--route", "10.0.0.0/8", "--table", "100"],
            "--table 100 out of range 30064..=32765 (it is also the priority of the rules, \
             which must come before the main table's at 32766)",
        ),
    ] {
        assert_fails_in_one_line(&mut topo.spawn_proxy(topo.client_veth(), args), error);
    }
    assert!(!topo.tun_exists());
    assert_rules(&topo, &[]);
}

#[test]
fn user_flag_drops_root_and_keeps_working() {
    let Some(topo) = Topology::for_test("user_flag_drops_root_and_keeps_working") else {
        return;
    };
    let v4 = format!("{}/32", topo.server_v4());
    let mut proxy = topo.start_proxy_unrouted(&["--user", "nobody", "--route", &v4], &[]);
    // The TUN is up before the switch: wait for the proxy to report it.
    let switched = wait_until(common::EVENT_DEADLINE, || {
        proxy.stderr().contains("running as nobody")
    });
    assert!(switched, "no privilege drop reported");
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .map(|line| {
                line[name.len()..]
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    assert_eq!(
        field("Uid:"),
        "65534 65534 65534 65534",
        "not running as nobody"
    );
    // CAP_NET_ADMIN (12) and CAP_NET_RAW (13) only.
    assert_eq!(field("CapEff:"), "0000000000003000");
    assert_eq!(field("CapPrm:"), "0000000000003000");
    // New flows (sockets bound to the interface) still work without root...
    let server = topo.serve(topo.server_v4(), 1, echo);
    let addr = server.addr();
    let (sent, received) =
        join(topo.in_client(move || exchange(common::connect(addr), 8, 64 * KIB)));
    assert_eq!(received, sent);
    server.join();
    // ...and so does removing the rules at exit.
    proxy.terminate();
    assert_rules(&topo, &[]);
}

/// The demo's namespaces of process `pid` that are still there.
fn demo_namespaces_left(pid: u32) -> Vec<String> {
    common::run("ip", &["netns", "list"])
        .lines()
        .filter(|line| {
            line.contains(&format!("upd-c-{pid}")) || line.contains(&format!("upd-s-{pid}"))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn demo_runs_end_to_end_and_cleans_up() {
    if !common::privileged_or_skip("demo_runs_end_to_end_and_cleans_up") {
        return;
    }
    for extra in [&[][..], &["--no-offload"][..]] {
        let child = Command::new(env!("CARGO_BIN_EXE_uringproxy"))
            .args(["demo", "--bytes", "16777216"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run uringproxy demo");
        let pid = child.id();
        let output = child.wait_with_output().expect("demo output");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "demo {extra:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        for expected in [
            "16777216 bytes client -> server in",
            "16777216 bytes server -> client in",
            "100 of 100 datagrams echoed",
            "3 received",
            "flows: opened 2",
            "namespaces removed",
        ] {
            assert!(
                stdout.contains(expected),
                "demo {extra:?} output lacks {expected:?}:\n{stdout}"
            );
        }
        assert_eq!(stdout.matches("hash matches").count(), 2, "{stdout}");
        assert!(
            demo_namespaces_left(pid).is_empty(),
            "namespaces left behind"
        );
    }
}

#[test]
fn demo_help_interrupt_and_closed_stdout() {
    if !common::privileged_or_skip("demo_help_interrupt_and_closed_stdout") {
        return;
    }
    let demo = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_uringproxy"));
        command.arg("demo");
        command
    };
    // --help describes the demo and runs nothing.
    let help = demo().arg("--help").output().expect("run demo --help");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success() && text.contains("--bytes"), "{text}");
    assert!(
        !text.contains("namespaces upd-"),
        "demo --help ran the demo"
    );
    let bad = demo().arg("--bogus").output().expect("run demo --bogus");
    assert!(!bad.status.success());

    // Interrupted half-way: the proxy child and both namespaces go.
    let mut child = demo()
        .args(["--bytes", "100000000000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run uringproxy demo");
    let pid = child.id();
    // The demo's namespace is listed a moment before it can be entered.
    let running = common::wait_until(Duration::from_secs(10), || {
        common::try_run("ip", &["-n", &format!("upd-c-{pid}"), "rule", "show"])
            .is_some_and(|rules| rules.contains("lookup 30064"))
    });
    assert!(running, "demo did not get its proxy up");
    // The proxy is the demo's child (`ip netns exec` execs it).
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("the demo's children");
    let proxy_pids: Vec<String> = children.split_whitespace().map(str::to_string).collect();
    assert!(!proxy_pids.is_empty(), "the demo has no proxy child");
    let proxies_alive = || {
        proxy_pids
            .iter()
            .any(|child| std::path::Path::new(&format!("/proc/{child}")).exists())
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("signal the demo");
    let status = child.wait().expect("wait for the demo");
    assert!(!status.success(), "an interrupted demo must not succeed");
    assert!(
        demo_namespaces_left(pid).is_empty(),
        "namespaces left behind"
    );
    assert!(
        common::wait_until(Duration::from_secs(2), || !proxies_alive()),
        "the demo's proxy outlived it"
    );

    // stdout closed after the first line (`demo | head -1`): no panic, still clean.
    let mut child = demo()
        .args(["--bytes", "1048576"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run uringproxy demo");
    let pid = child.id();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(child.stdout.as_mut().expect("stdout"), &mut first)
        .expect("first byte of the demo's output");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("demo output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        output.status.success(),
        "demo with a closed stdout: {stderr}"
    );
    assert!(
        demo_namespaces_left(pid).is_empty(),
        "namespaces left behind"
    );
}

/// What `systemctl restart` does: stop the proxy and start it again at once with the
/// same `--tun`. The proxy exits only once its TUN is gone, so this must always work,
/// also with flows (and so operations on the ring) in flight at the stop.
#[test]
fn a_restart_right_after_exit_finds_the_tun_name_free() {
    const ROUNDS: usize = 20;
    let Some(topo) = Topology::for_test("a_restart_right_after_exit_finds_the_tun_name_free")
    else {
        return;
    };
    let server = topo.serve(topo.server_v4(), ROUNDS, |mut stream| {
        let mut byte = [0u8; 1];
        // Held open until the proxy's stop resets it.
        let _ = std::io::Read::read(&mut stream, &mut byte);
    });
    let addr = server.addr();
    for round in 0..ROUNDS {
        let mut proxy = topo.start_proxy(&[]);
        let client = join(topo.in_client(move || common::connect(addr)));
        proxy.terminate();
        assert!(
            !topo.tun_exists(),
            "round {round}: the proxy exited before its TUN was gone"
        );
        drop(client);
    }
    server.join();
}

/// A jumbo MTU under a tight memory limit: with veths at MTU 9000 and a hundred
/// downloads whose clients stopped reading holding every flow to the 16 KiB floor (less
/// than two 8960-byte segments), a 1 MiB exchange on another flow must take at most
/// three times what it takes with `--mtu 1500`. Without window updates of its own at
/// that floor, the client only learnt its window had opened from zero-window probes.
#[test]
fn a_jumbo_mtu_at_the_memory_floor_moves_bytes_as_fast_as_a_small_one() {
    const STALLED: usize = 100;
    const EXCHANGE: u64 = MIB;
    let Some(topo) = Topology::for_test("a_jumbo_mtu_at_the_memory_floor_moves_bytes") else {
        return;
    };
    for (ns, dev) in [
        (topo.client_ns(), topo.client_veth()),
        (topo.server_ns(), topo.server_veth()),
    ] {
        common::ip(&format!("-n {ns} link set {dev} mtu 9000"));
    }
    let mut took = Vec::new();
    for mtu in ["1500", "9000"] {
        let mut proxy = topo.start_proxy(&["--mtu", mtu, "--memory-limit", "1M"]);
        let release = Arc::new(AtomicBool::new(false));
        let stalled_server = {
            let release = Arc::clone(&release);
            topo.serve(topo.server_v4(), STALLED, move |stream| {
                stalled_server(stream, &release)
            })
        };
        let addr = stalled_server.addr();
        let stalled: Vec<_> = (0..STALLED)
            .map(|i| {
                let release = Arc::clone(&release);
                topo.in_client(move || stalled_client(addr, STALLED_DOWNLOAD, i as u64, &release))
            })
            .collect();
        // Every stalled flow holds the server bytes its allowance lets it: the budget
        // (two thirds of the limit for allowances) is spent, nothing may grow.
        let floor_kib = STALLED as u64 * 16 * 3 / 2;
        let held = wait_until(Duration::from_secs(30), || {
            resident_bound_kib(&proxy.stats()) >= floor_kib
        });
        assert!(held, "the stalled flows never filled their allowances");
        let echo_server = topo.serve(topo.server_v4(), 1, echo);
        let echo_addr = echo_server.addr();
        let start = Instant::now();
        let (sent, received) =
            join(topo.in_client(move || exchange(common::connect(echo_addr), 1, EXCHANGE)));
        took.push(start.elapsed());
        assert_eq!(sent, common::payload_digest(1, EXCHANGE));
        assert_eq!(received, sent, "the echo came back changed (--mtu {mtu})");
        assert_eq!(echo_server.join(), [EXCHANGE]);
        release.store(true, Ordering::Relaxed);
        for (i, client) in stalled.into_iter().enumerate() {
            let [_, down] = join(client);
            assert_eq!(down, common::payload_digest(i as u64, STALLED_BYTES));
        }
        stalled_server.join();
        proxy.terminate();
    }
    let (small, jumbo) = (took[0], took[1]);
    eprintln!(
        "1 MiB exchange beside {STALLED} stalled downloads: --mtu 1500 {small:?}, --mtu 9000 {jumbo:?}"
    );
    // Stalled on zero-window probes the exchange took 22 s; unstalled it takes tens of
    // ms, and on a loaded machine both runs slow down alike, so the bound is the ratio,
    // with a floor of 1 s that load alone does not reach and a stall far exceeds.
    assert!(
        jumbo <= 3 * small.max(Duration::from_secs(1)),
        "--mtu 9000 took {jumbo:?}, --mtu 1500 {small:?}"
    );
}

/// The bound on the flows' resident buffers from the last counters report, in KiB.
fn resident_bound_kib(report: &str) -> u64 {
    let marker = " flow-buffers-bound-bytes ";
    let Some((_, rest)) = report.rsplit_once(marker) else {
        return 0;
    };
    let bytes: u64 = rest
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    bytes / 1024
}
