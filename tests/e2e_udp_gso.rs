//! End-to-end tests of UDP segmentation offload from client to server: clients that send
//! with UDP_SEGMENT (44 datagrams of 1,350 bytes per send, and sends with a shorter last
//! datagram) and clients that send plainly, over IPv4 and IPv6, with the TUN's USO on and
//! off, directly and through a danted SOCKS5 association, and with a path MTU below the
//! segment size (the kernel refuses the segmented send); the server receives without UDP_GRO and checks every
//! datagram's boundary and bytes, empty and largest ones included, and the proxy's
//! counters show whether segmented sends were made. Then a real QUIC transfer (aioquic)
//! of 8 MiB each way through the proxy.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::socks::{danted, danted_on};
use common::tool_or_skip;
use common::{Topology, join, wait_until};
use nix::sys::socket::{setsockopt, sockopt};
use socket2::{MsgHdr, SockRef};

/// Datagrams per segmented send and their size, as QUIC stacks send on Linux.
const PER_SEND: usize = 44;
const SEGMENT: usize = 1350;
/// Rounds of sends per client (see `schedule`).
const ROUNDS: usize = 12;
/// How long a round's datagrams may take to arrive.
const ROUND_DEADLINE: Duration = Duration::from_secs(10);

/// What a client sends until the server has seen one, before the checked datagrams.
const WARM_UP: &[u8] = b"warm-up";

/// How a client sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sender {
    /// Each group of more than one datagram in one sendmsg with UDP_SEGMENT.
    Segmented,
    /// One send per datagram.
    Plain,
}

/// The datagrams a client sends, in groups (one segmented send each for
/// `Sender::Segmented`): per round, 44 x 1,350 bytes, 10 x 1,350 and a shorter one, an
/// empty datagram, a lone 1,350 and a 1-byte one; every fourth round also the largest
/// datagram `largest` (not segmentable: alone).
fn schedule(largest: usize) -> Vec<Vec<usize>> {
    let mut groups = Vec::new();
    for round in 0..ROUNDS {
        groups.push(vec![SEGMENT; PER_SEND]);
        let mut short_last = vec![SEGMENT; 10];
        short_last.push(700 + round);
        groups.push(short_last);
        groups.extend([vec![0], vec![SEGMENT], vec![1]]);
        if round % 4 == 3 {
            groups.push(vec![largest]);
        }
    }
    groups
}

/// Datagram `index` of `len` bytes: its index first (when it fits), then a pattern of
/// both, so a datagram cut, merged or moved is seen.
fn datagram(index: usize, len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..len)
        .map(|i| (i * 131 + index * 7 + i / 251) as u8)
        .collect();
    if len >= 4 {
        bytes[..4].copy_from_slice(&(index as u32).to_le_bytes());
    }
    bytes
}

/// FNV-1a over the datagrams' lengths and bytes, in order: the total both ends agree on.
fn digest(total: &mut u64, bytes: &[u8]) {
    for &byte in (bytes.len() as u32).to_le_bytes().iter().chain(bytes) {
        *total = (*total ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
    }
}

/// What the server received: datagrams, those that were not the expected one (index,
/// length received, length expected), and the digest of all.
struct Received {
    count: usize,
    wrong: Vec<(usize, usize, usize)>,
    digest: u64,
}

/// Binds a plain UDP socket (no UDP_GRO: each datagram is its own receive) at `server`
/// in the server namespace and receives `lengths` datagrams, counting them in `progress`,
/// until `lengths` are all in or nothing came for a round's deadline.
fn receive(
    topo: &Topology,
    server: SocketAddr,
    lengths: Vec<usize>,
    progress: Arc<AtomicUsize>,
    warm: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Received> {
    let (ready, is_ready) = std::sync::mpsc::channel();
    let handle = topo.in_server(move || {
        let socket = UdpSocket::bind(server).expect("bind the server");
        // Room for a whole round whatever the thread's scheduling.
        setsockopt(&socket, sockopt::RcvBufForce, &(8 << 20)).expect("SO_RCVBUFFORCE");
        socket.set_read_timeout(Some(ROUND_DEADLINE)).unwrap();
        ready.send(()).unwrap();
        // Warm-up datagrams (the client's, until one arrives) precede the checked ones:
        // through a SOCKS5 upstream the first datagrams wait for the association.
        let mut buf = vec![0u8; 65536];
        let first = loop {
            let Ok(n) = socket.recv(&mut buf) else {
                break None;
            };
            warm.store(true, Ordering::Release);
            if buf[..n] != *WARM_UP {
                break Some(n);
            }
        };
        let mut received = Received {
            count: 0,
            wrong: Vec::new(),
            digest: 0xcbf2_9ce4_8422_2325,
        };
        let mut next = first;
        while received.count < lengths.len() {
            let Some(n) = next.take().or_else(|| socket.recv(&mut buf).ok()) else {
                break;
            };
            let index = received.count;
            if buf[..n] != datagram(index, lengths[index])[..] {
                received.wrong.push((index, n, lengths[index]));
            }
            digest(&mut received.digest, &buf[..n]);
            received.count += 1;
            progress.store(received.count, Ordering::Release);
        }
        received
    });
    is_ready.recv().expect("server bound");
    handle
}

/// Sends the `schedule` from a new client socket in the client namespace, waiting after
/// each round of groups until the server has them all; returns the digest sent.
fn send(
    topo: &Topology,
    server: SocketAddr,
    sender: Sender,
    groups: Vec<Vec<usize>>,
    progress: Arc<AtomicUsize>,
    warm: Arc<AtomicBool>,
) -> u64 {
    join(topo.in_client(move || {
        let bind: IpAddr = if server.is_ipv4() {
            [0, 0, 0, 0].into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        let socket = UdpSocket::bind((bind, 0)).expect("bind the client");
        socket.connect(server).expect("connect");
        let warmed = wait_until(ROUND_DEADLINE, || {
            socket.send(WARM_UP).expect("send");
            warm.load(Ordering::Acquire)
        });
        assert!(warmed, "no warm-up datagram reached {server}");
        let mut total = 0xcbf2_9ce4_8422_2325;
        let mut index = 0;
        for group in groups {
            let datagrams: Vec<Vec<u8>> = group
                .iter()
                .enumerate()
                .map(|(i, &len)| datagram(index + i, len))
                .collect();
            for bytes in &datagrams {
                digest(&mut total, bytes);
            }
            if sender == Sender::Segmented && datagrams.len() > 1 {
                let buffer = datagrams.concat();
                let iov = [std::io::IoSlice::new(&buffer)];
                let control = udp_segment(datagrams[0].len() as u16);
                let message = MsgHdr::new().with_buffers(&iov).with_control(&control);
                let sent = SockRef::from(&socket)
                    .sendmsg(&message, 0)
                    .expect("segmented send");
                assert_eq!(sent, buffer.len());
            } else {
                for bytes in &datagrams {
                    socket.send(bytes).expect("send");
                }
            }
            index += datagrams.len();
            let arrived = wait_until(ROUND_DEADLINE, || progress.load(Ordering::Acquire) >= index);
            if !arrived {
                break;
            }
        }
        total
    }))
}

/// A UDP_SEGMENT control message (SOL_UDP 17, UDP_SEGMENT 103) for `segment`-byte
/// datagrams: cmsghdr (length 18, level, type), the u16, padding to 24 bytes.
fn udp_segment(segment: u16) -> [u8; 24] {
    let mut control = [0u8; 24];
    control[..8].copy_from_slice(&18u64.to_ne_bytes());
    control[8..12].copy_from_slice(&17i32.to_ne_bytes());
    control[12..16].copy_from_slice(&103i32.to_ne_bytes());
    control[16..18].copy_from_slice(&segment.to_ne_bytes());
    control
}

/// The number after `label ` on the proxy's `udp:` counter line, in its latest report.
fn udp_counter(stats: &str, label: &str) -> u64 {
    let line = stats
        .lines()
        .rev()
        .find(|line| line.contains("udp:") && line.contains("super-sends-up"))
        .unwrap_or_else(|| panic!("no udp counters in:\n{stats}"));
    let at = line
        .find(&format!(" {label} "))
        .unwrap_or_else(|| panic!("no '{label}' in {line}"));
    line[at + label.len() + 2..]
        .split_whitespace()
        .next()
        .and_then(|n| n.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no number after '{label}' in {line}"))
}

/// Every datagram of a segmented and of a plain client, to each of `servers` (with the
/// largest datagram each takes), reaches its server whole, in order, once.
fn every_datagram_arrives(topo: &Topology, servers: &[(IpAddr, usize)], port: u16) {
    for (round, &(ip, largest)) in servers.iter().enumerate() {
        for (n, sender) in [Sender::Segmented, Sender::Plain].into_iter().enumerate() {
            let server = SocketAddr::new(ip, port + (2 * round + n) as u16);
            let groups = schedule(largest);
            let lengths: Vec<usize> = groups.iter().flatten().copied().collect();
            let progress = Arc::new(AtomicUsize::new(0));
            let warm = Arc::new(AtomicBool::new(false));
            let receiver = receive(
                topo,
                server,
                lengths.clone(),
                progress.clone(),
                warm.clone(),
            );
            let sent = send(topo, server, sender, groups, progress, warm);
            let received = join(receiver);
            assert!(
                received.wrong.is_empty(),
                "{sender:?} to {server}: (index, length, expected) of datagrams not as sent: {:?}",
                &received.wrong[..received.wrong.len().min(10)]
            );
            assert_eq!(
                received.count,
                lengths.len(),
                "{sender:?} to {server}: datagrams received"
            );
            assert_eq!(received.digest, sent, "{sender:?} to {server}: digest");
        }
    }
}

/// The servers of `topo` with the largest datagram a client sends each over a TUN with
/// the largest MTU (`header`: bytes of a SOCKS5 header the relay's datagram also holds).
fn servers(topo: &Topology, header: [usize; 2]) -> [(IpAddr, usize); 2] {
    [
        (topo.server_v4(), 65507 - header[0]),
        (topo.server_v6(), 65487 - header[1]),
    ]
}

#[test]
fn segmented_and_plain_senders_keep_every_datagram_with_tun_uso() {
    let Some(topo) = Topology::for_test("segmented_and_plain_senders_with_tun_uso") else {
        return;
    };
    let mut proxy = topo.start_proxy(&["--mtu", "65535"]);
    every_datagram_arrives(&topo, &servers(&topo, [0, 0]), 7400);
    let stats = proxy.stats();
    let (sends, segments) = (
        udp_counter(&stats, "super-sends-up"),
        udp_counter(&stats, "super-send-segments-up"),
    );
    // Each client's 44-datagram sends cross the TUN as one super-packet each and leave
    // as one segmented send: at least one per round and family.
    assert!(
        sends >= 2 * ROUNDS as u64,
        "segmented sends {sends}:\n{stats}"
    );
    assert!(
        segments >= 2 * sends,
        "segments {segments} in {sends} sends"
    );
    assert_eq!(udp_counter(&stats, "gso-fallbacks"), 0, "{stats}");
    proxy.assert_running();
}

#[test]
fn segmented_and_plain_senders_keep_every_datagram_without_tun_uso() {
    let Some(topo) = Topology::for_test("segmented_and_plain_senders_without_tun_uso") else {
        return;
    };
    let env = [("URINGPROXY_MAX_OFFLOAD", "tso")];
    let mut proxy = topo.start_proxy_with_env(&["--mtu", "65535"], &env);
    let log = proxy.stderr();
    assert!(
        log.contains("TUN offload: checksum + TCP segmentation") && !log.contains("UDP seg"),
        "USO capped off:\n{log}"
    );
    every_datagram_arrives(&topo, &servers(&topo, [0, 0]), 7410);
    let stats = proxy.stats();
    assert_eq!(udp_counter(&stats, "gso-fallbacks"), 0, "{stats}");
    proxy.assert_running();
}

#[test]
fn segmented_and_plain_senders_keep_every_datagram_through_socks5() {
    const TEST: &str = "segmented_and_plain_senders_through_socks5";
    if !tool_or_skip("danted", TEST) {
        return;
    }
    let Some(topo) = Topology::for_test(TEST) else {
        return;
    };
    let socks = danted(&topo);
    let upstream = format!("socks5://{}", socks.addr);
    let mut proxy = topo.start_proxy(&["--upstream", &upstream, "--mtu", "65535"]);
    // The SOCKS5 header: 10 bytes for an IPv4 server, 22 for IPv6.
    every_datagram_arrives(&topo, &servers(&topo, [10, 22]), 7420);
    let stats = proxy.stats();
    assert!(
        udp_counter(&stats, "super-sends-up") >= 2 * ROUNDS as u64,
        "segmented sends to the relay:\n{stats}"
    );
    proxy.assert_running();
    drop(socks);
}

#[test]
fn segments_to_an_ipv6_relay_keep_to_ipv6_limits_for_an_ipv4_server() {
    const TEST: &str = "segments_to_an_ipv6_relay_keep_to_ipv6_limits";
    if !tool_or_skip("danted", TEST) {
        return;
    }
    let Some(topo) = Topology::for_test(TEST) else {
        return;
    };
    let socks = danted_on(&topo, topo.server_v6());
    let upstream = format!("socks5://{}", socks.addr);
    let mut proxy = topo.start_proxy(&["--upstream", &upstream, "--mtu", "65535"]);
    // 1,450 bytes and the 10-byte header of an IPv4 server: within IPv4's 1,472-byte
    // segments at MTU 1500, beyond IPv6's 1,452, which the socket to the relay has.
    let server = SocketAddr::new(topo.server_v4(), 7440);
    let groups = vec![vec![1450; PER_SEND]; 4];
    let lengths: Vec<usize> = groups.iter().flatten().copied().collect();
    let (progress, warm) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let receiver = receive(
        &topo,
        server,
        lengths.clone(),
        progress.clone(),
        warm.clone(),
    );
    let sent = send(&topo, server, Sender::Segmented, groups, progress, warm);
    let received = join(receiver);
    assert!(received.wrong.is_empty(), "datagrams not as sent");
    assert_eq!(received.count, lengths.len(), "datagrams received");
    assert_eq!(received.digest, sent, "digest");
    let stats = proxy.stats();
    assert_eq!(udp_counter(&stats, "gso-fallbacks"), 0, "{stats}");
    proxy.assert_running();
    drop(socks);
}

#[test]
fn a_segmented_send_the_kernel_refuses_goes_again_one_datagram_at_a_time() {
    let Some(topo) = Topology::for_test("a_segmented_send_the_kernel_refuses") else {
        return;
    };
    let mut proxy = topo.start_proxy(&["--mtu", "65535"]);
    // A path MTU of 1,300 bytes to the servers, below the interface's: a 1,350-byte
    // segment does not fit (EMSGSIZE), and each datagram alone is fragmented.
    let (ns, veth) = (topo.client_ns(), topo.client_veth());
    for (family, server) in [("-4", topo.server_v4()), ("-6", topo.server_v6())] {
        common::ip(&format!(
            "-n {ns} {family} route add {server} dev {veth} mtu lock 1300"
        ));
    }
    every_datagram_arrives(&topo, &servers(&topo, [0, 0]), 7430);
    let stats = proxy.stats();
    let fallbacks = udp_counter(&stats, "gso-fallbacks");
    // Once per socket that tried: the segmented clients' at least; a plain client's
    // datagrams of one turn may have been gathered too.
    assert!(
        (2..=4).contains(&fallbacks),
        "fallbacks {fallbacks}:\n{stats}"
    );
    proxy.assert_running();
}

/// Whether python3 has aioquic; otherwise prints why the test is skipped (or panics in
/// CI, where .ci/test installs it).
fn aioquic_or_skip(test: &str) -> bool {
    let found = Command::new("python3")
        .args(["-c", "import aioquic"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    common::found_or_skip(found, "aioquic", "pip install aioquic", test)
}

#[test]
fn a_quic_transfer_crosses_8_mib_each_way() {
    const TEST: &str = "a_quic_transfer_crosses_8_mib_each_way";
    if !aioquic_or_skip(TEST) {
        return;
    }
    let Some(topo) = Topology::for_test(TEST) else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/quic/transfer.py");
    let dir = std::env::temp_dir().join(format!("upx-quic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let dir_text = dir.to_string_lossy().into_owned();
    for ip in [topo.server_v4(), topo.server_v6()] {
        let port = "7443";
        let mut server = Command::new("ip")
            .args(["netns", "exec", topo.server_ns(), "python3", script])
            .args(["server", &ip.to_string(), port, &dir_text])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the QUIC server");
        // It prints "listening" once bound.
        let mut line = String::new();
        let stdout = server.stdout.take().expect("server stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("server output");
        assert_eq!(line.trim(), "listening", "QUIC server on {ip}");
        let client = Command::new("ip")
            .args([
                "netns",
                "exec",
                topo.client_ns(),
                "timeout",
                "120",
                "python3",
            ])
            .args([script, "client", &ip.to_string(), port, &dir_text])
            .output()
            .expect("run the QUIC client");
        let served = server.wait().expect("QUIC server exit");
        assert!(
            client.status.success() && served.success(),
            "QUIC via {ip}: client {}, server {served}:\n{}{}",
            client.status,
            String::from_utf8_lossy(&client.stdout),
            String::from_utf8_lossy(&client.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&client.stdout).trim(),
            "8388608 bytes each way, digests match"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    proxy.assert_running();
}
