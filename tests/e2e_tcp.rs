//! End-to-end TCP tests: kernel sockets on both ends with the proxy in
//! between. See common/mod.rs for the namespace topology.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    KIB, MIB, Topology, Transfer, abort, connect, echo, exchange, is_timeout, join, recv_to_end,
    request_after_half_close, send_payload, try_connect, try_recv_to_end, wait_until,
};

/// Listening on `::` accepts both families, so one server can take flows
/// addressed to either server address.
const ANY: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// Even flows go to the server's IPv4 address and odd ones to its IPv6
/// address, so the multi-flow tests exercise both families at once.
fn flow_addr(topo: &Topology, flow: usize, port: u16) -> SocketAddr {
    let ip = if flow.is_multiple_of(2) {
        topo.server_v4()
    } else {
        topo.server_v6()
    };
    SocketAddr::new(ip, port)
}

#[test]
fn ipv4_and_ipv6_small_echo() {
    let Some(topo) = Topology::for_test("ipv4_and_ipv6_small_echo") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    for (seed, ip) in [(1, topo.server_v4()), (2, topo.server_v6())] {
        let server = topo.serve(ip, 1, echo);
        let addr = server.addr();
        let (sent, received) = join(topo.in_client(move || exchange(connect(addr), seed, MIB)));
        assert_eq!(server.join(), [MIB], "bytes echoed via {ip}");
        assert_eq!(received, sent, "echo via {ip}");
    }
    proxy.assert_running();
}

/// Each of `flows` clients sends `len` bytes and half-closes; the server
/// hashes everything up to EOF and answers with the digest.
fn upload(test: &str, flows: usize, len: u64) {
    let Some(topo) = Topology::for_test(test) else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    let server = topo.serve(ANY, flows, |mut stream| {
        let received = recv_to_end(&mut stream);
        stream.write_all(&received.sha256).expect("send digest");
        received
    });
    let addrs: Vec<_> = (0..flows)
        .map(|flow| flow_addr(&topo, flow, server.port()))
        .collect();
    let start = Instant::now();
    let results = join(topo.in_client(move || {
        let clients: Vec<_> = addrs
            .into_iter()
            .zip(0..)
            .map(|(addr, seed)| {
                thread::spawn(move || {
                    let mut stream = connect(addr);
                    let sent = send_payload(&mut stream, seed, len);
                    stream.shutdown(Shutdown::Write).expect("shutdown write");
                    let mut reply = Vec::new();
                    // Bounded in case the proxy appends garbage.
                    (&mut stream)
                        .take(64)
                        .read_to_end(&mut reply)
                        .expect("read digest");
                    (sent, reply)
                })
            })
            .collect();
        clients.into_iter().map(join).collect::<Vec<_>>()
    }));
    eprintln!("{test}: {flows} x {len} bytes in {:?}", start.elapsed());

    for (flow, (sent, reply)) in results.iter().enumerate() {
        assert_eq!(sent.bytes, len, "flow {flow} sent");
        assert_eq!(
            reply.as_slice(),
            sent.sha256,
            "flow {flow}: digest returned by the server differs from what was sent"
        );
    }
    let mut received = server.join();
    let mut sent: Vec<Transfer> = results.into_iter().map(|(sent, _)| sent).collect();
    received.sort();
    sent.sort();
    assert_eq!(received, sent);
    proxy.assert_running();
}

/// Each of `flows` clients names a seed; the server sends `len` bytes of
/// that payload and closes, and the client hashes everything up to EOF.
fn download(test: &str, flows: usize, len: u64) {
    let Some(topo) = Topology::for_test(test) else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    let server = topo.serve(ANY, flows, move |mut stream| {
        let mut seed = [0; 8];
        stream.read_exact(&mut seed).expect("read seed");
        let seed = u64::from_le_bytes(seed);
        // Dropping the stream afterwards sends the FIN that ends the payload.
        (seed, send_payload(&mut stream, seed, len))
    });
    let addrs: Vec<_> = (0..flows)
        .map(|flow| flow_addr(&topo, flow, server.port()))
        .collect();
    let start = Instant::now();
    let mut received = join(topo.in_client(move || {
        let clients: Vec<_> = addrs
            .into_iter()
            .zip(0u64..)
            .map(|(addr, seed)| {
                thread::spawn(move || {
                    let mut stream = connect(addr);
                    stream.write_all(&seed.to_le_bytes()).expect("send seed");
                    (seed, recv_to_end(&mut stream))
                })
            })
            .collect();
        clients.into_iter().map(join).collect::<Vec<_>>()
    }));
    eprintln!("{test}: {flows} x {len} bytes in {:?}", start.elapsed());

    let mut sent = server.join();
    assert!(sent.iter().all(|(_, t)| t.bytes == len));
    sent.sort();
    received.sort();
    assert_eq!(received, sent, "(seed, transfer) per flow");
    proxy.assert_running();
}

#[test]
fn parallel_32_flows_upload() {
    upload("parallel_32_flows_upload", 32, 16 * MIB);
}

#[test]
fn parallel_32_flows_download() {
    download("parallel_32_flows_download", 32, 16 * MIB);
}

#[test]
fn bulk_256mib_upload() {
    upload("bulk_256mib_upload", 1, 256 * MIB);
}

#[test]
fn bulk_256mib_download() {
    download("bulk_256mib_download", 1, 256 * MIB);
}

#[test]
fn half_close() {
    const REQUEST: u64 = 100 * KIB;
    const RESPONSE: u64 = MIB;
    let Some(topo) = Topology::for_test("half_close") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    for ip in [topo.server_v4(), topo.server_v6()] {
        // The server answers only after the client's FIN, so the whole
        // response has to cross a connection that is already half-closed.
        request_after_half_close(&topo, ip, REQUEST, RESPONSE);
    }
    proxy.assert_running();
}

#[test]
fn server_reset_reaches_client() {
    const DEADLINE: Duration = Duration::from_secs(5);
    let Some(topo) = Topology::for_test("server_reset_reaches_client") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    for ip in [topo.server_v4(), topo.server_v6()] {
        let server = topo.serve(ip, 1, |mut stream| {
            send_payload(&mut stream, 3, 64 * KIB);
            abort(stream);
        });
        let addr = server.addr();
        let (outcome, elapsed) = join(topo.in_client(move || {
            let start = Instant::now();
            // The reset can overtake the client's view of the handshake, so
            // connect() failing with it counts as well.
            let outcome = try_connect(addr).and_then(|mut stream| {
                stream.set_read_timeout(Some(DEADLINE))?;
                try_recv_to_end(&mut stream)
            });
            (outcome, start.elapsed())
        }));
        server.join();
        match outcome {
            Ok(transfer) => panic!("via {ip}: clean EOF after {transfer:?}, expected a reset"),
            Err(e) => assert!(!is_timeout(&e), "via {ip}: no reset within {DEADLINE:?}"),
        }
        assert!(elapsed < DEADLINE, "via {ip}: reset took {elapsed:?}");
    }
    proxy.assert_running();
}

#[test]
fn client_abort_frees_outbound_socket() {
    const CONNS: usize = 20;
    let Some(topo) = Topology::for_test("client_abort_frees_outbound_socket") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);

    // A completed connection first, so that whatever the proxy allocates
    // lazily on its first flow is part of the baseline.
    let server = topo.serve(topo.server_v4(), 1, echo);
    let addr = server.addr();
    join(topo.in_client(move || exchange(connect(addr), 4, KIB)));
    server.join();
    let baseline = proxy.settled_fd_count();

    let (ready_tx, ready_rx) = mpsc::channel();
    let server = topo.serve(topo.server_v4(), CONNS, move |mut stream| {
        let mut byte = [0];
        stream.read_exact(&mut byte).expect("read first byte");
        ready_tx.send(()).expect("report ready");
        // Keep reading until the proxy closes its side; a shorter timeout
        // than usual since this is expected within seconds.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set read timeout");
        try_recv_to_end(&mut stream)
    });
    let addr = server.addr();
    let clients = join(topo.in_client(move || {
        (0..CONNS)
            .map(|_| {
                let mut stream = connect(addr);
                stream.write_all(b"x").expect("send first byte");
                stream
            })
            .collect::<Vec<_>>()
    }));
    for i in 0..CONNS {
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("only {i} of {CONNS} connections reached the server: {e}"));
    }
    let loaded = proxy.fd_count();
    if loaded < baseline + CONNS {
        // io_uring direct descriptors do not show up in /proc/<pid>/fd.
        eprintln!(
            "warning: fd count {baseline} -> {loaded} with {CONNS} open flows; \
             the fd leak check below cannot see the proxy's sockets"
        );
    }

    clients.into_iter().for_each(abort);
    let freed = wait_until(common::EVENT_DEADLINE, || proxy.fd_count() <= baseline);
    assert!(
        freed,
        "proxy fds: baseline {baseline}, {loaded} with flows open, {} 30 s after aborting them",
        proxy.fd_count()
    );
    for (i, outcome) in server.join().into_iter().enumerate() {
        if let Err(e) = outcome {
            assert!(!is_timeout(&e), "server connection {i} was never closed");
        }
    }
    proxy.assert_running();
}

#[test]
fn refused_port_fails_fast() {
    /// Nothing listens in the fresh server namespace.
    const CLOSED_PORT: u16 = 9;
    let Some(topo) = Topology::for_test("refused_port_fails_fast") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    for ip in [topo.server_v4(), topo.server_v6()] {
        let addr = SocketAddr::new(ip, CLOSED_PORT);
        let (outcome, elapsed) = join(topo.in_client(move || {
            let start = Instant::now();
            let outcome = TcpStream::connect_timeout(&addr, Duration::from_secs(5));
            (outcome.map(drop).map_err(|e| e.kind()), start.elapsed())
        }));
        assert_eq!(
            outcome,
            Err(ErrorKind::ConnectionRefused),
            "connect to {addr}"
        );
        // Failing slowly would mean waiting out the proxy's connect timeout (10 s): the
        // bound leaves room for a loaded machine (1.01 s was seen under a parallel build).
        assert!(
            elapsed < Duration::from_secs(3),
            "refusal of {addr} took {elapsed:?}"
        );
    }
    proxy.assert_running();
}

#[test]
fn bad_interface_exits_nonzero() {
    let Some(topo) = Topology::for_test("bad_interface_exits_nonzero") else {
        return;
    };
    let mut proxy = topo.spawn_proxy("doesnotexist0", &[]);
    let status = proxy
        .wait_exit(common::EVENT_DEADLINE)
        .expect("still running after 30 s");
    let output = proxy.stderr();
    assert!(!status.success(), "exit status {status}");
    let errors: Vec<&str> = output
        .lines()
        .filter(|line| line.starts_with("uringproxy: error:"))
        .collect();
    assert!(
        matches!(errors[..], [line] if line.contains("doesnotexist0")),
        "expected exactly one `uringproxy: error:` line, naming doesnotexist0"
    );
}

#[test]
fn unprivileged_start_exits_nonzero_naming_the_problem() {
    if !common::privileged_or_skip("unprivileged_start_exits_nonzero_naming_the_problem") {
        return;
    }
    // As an unprivileged user the TUN cannot be created: one clear line, non-zero exit.
    let output = std::process::Command::new("runuser")
        .args([
            "-u",
            "nobody",
            "--",
            env!("CARGO_BIN_EXE_uringproxy"),
            "-i",
            "lo",
        ])
        .output()
        .expect("run runuser (util-linux)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit status {}", output.status);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("uringproxy: error:"))
        .collect();
    assert!(
        matches!(errors[..], [line] if line.contains("run as root")),
        "expected one error line asking for root, got:\n{stderr}"
    );
}

/// More flows than the proxy has TUN write buffers (256 with segmentation offload), so
/// the resets must go out in rounds.
#[test]
fn sigterm_resets_every_client_and_exits_zero() {
    const FLOWS: usize = 400;
    let Some(topo) = Topology::for_test("sigterm_resets_every_client_and_exits_zero") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = topo.serve(ANY, FLOWS, move |mut stream| {
        ready_tx.send(()).expect("report ready");
        let _ = stream.read(&mut [0u8; 1]);
    });
    let addr = flow_addr(&topo, 0, server.port());
    let clients =
        join(topo.in_client(move || (0..FLOWS).map(|_| connect(addr)).collect::<Vec<_>>()));
    for i in 0..FLOWS {
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("only {i} of {FLOWS} flows reached the server: {e}"));
    }
    let took = proxy.terminate();
    assert!(took < Duration::from_secs(1), "exit took {took:?}");
    let reset = clients
        .into_iter()
        .filter(|stream| {
            let mut stream = stream;
            matches!((&mut stream).read(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::ConnectionReset)
        })
        .count();
    server.join();
    assert_eq!(reset, FLOWS, "clients that saw a RST");
}
