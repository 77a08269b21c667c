//! End-to-end tests of how the proxy stops: SIGHUP (the terminal closing) and SIGQUIT
//! stop it as SIGTERM does, and a TUN deleted under it resets the outbound flows, so
//! that servers see the transfer cut short rather than a clean end; an idle proxy
//! notices the deletion too.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

use nix::sys::signal::Signal;

use common::{MIB, Topology, connect, join, wait_until};

const ANY: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// The proxy's policy rules (`--route`) in the client namespace, both families.
fn route_rules(topo: &Topology) -> usize {
    let ns = topo.client_ns();
    let rules = common::ip(&format!("-n {ns} -4 rule show"))
        + &common::ip(&format!("-n {ns} -6 rule show"));
    rules.matches("lookup 30064").count()
}

fn is_reset<T>(result: std::io::Result<T>) -> bool {
    matches!(result, Err(e) if e.kind() == ErrorKind::ConnectionReset)
}

#[test]
fn sighup_and_sigquit_reset_every_flow_exit_zero_and_remove_the_rules() {
    const FLOWS: usize = 20;
    let Some(topo) =
        Topology::for_test("sighup_and_sigquit_reset_every_flow_exit_zero_and_remove_the_rules")
    else {
        return;
    };
    let v4 = format!("{}/32", topo.server_v4());
    let v6 = format!("{}/128", topo.server_v6());
    for signal in [Signal::SIGHUP, Signal::SIGQUIT] {
        let mut proxy = topo.start_proxy_unrouted(&["--route", &v4, "--route", &v6], &[]);
        assert!(
            wait_until(common::EVENT_DEADLINE, || route_rules(&topo) == 4),
            "{signal}: rules not installed"
        );
        let (ready_tx, ready_rx) = mpsc::channel();
        let server = topo.serve(ANY, FLOWS, move |mut stream| {
            ready_tx.send(()).expect("report ready");
            is_reset(stream.read(&mut [0u8; 1]))
        });
        let addrs: Vec<SocketAddr> = (0..FLOWS)
            .map(|i| {
                let ip = [topo.server_v4(), topo.server_v6()][i % 2];
                SocketAddr::new(ip, server.port())
            })
            .collect();
        let clients =
            join(topo.in_client(move || addrs.into_iter().map(connect).collect::<Vec<_>>()));
        for i in 0..FLOWS {
            ready_rx
                .recv_timeout(common::EVENT_DEADLINE)
                .unwrap_or_else(|e| panic!("{signal}: only {i} of {FLOWS} flows got through: {e}"));
        }
        proxy.signal(signal);
        let status = proxy
            .wait_exit(common::EVENT_DEADLINE)
            .unwrap_or_else(|| panic!("no exit after {signal}"));
        assert!(status.success(), "{signal}: exit status {status}");
        let clients_reset = clients
            .into_iter()
            .filter(|mut stream| is_reset(stream.read(&mut [0u8; 1])))
            .count();
        assert_eq!(clients_reset, FLOWS, "{signal}: clients that saw a RST");
        let servers_reset = server.join().into_iter().filter(|&reset| reset).count();
        assert_eq!(servers_reset, FLOWS, "{signal}: servers that saw a RST");
        assert_eq!(route_rules(&topo), 0, "{signal}: rules left after exit");
    }
}

#[test]
fn a_deleted_tun_resets_outbound_flows_and_ends_in_one_error_line() {
    let Some(topo) =
        Topology::for_test("a_deleted_tun_resets_outbound_flows_and_ends_in_one_error_line")
    else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    let received = Arc::new(AtomicU64::new(0));
    let counted = received.clone();
    // Reads until the stream ends and says how: Ok for a FIN, the error otherwise.
    let server = topo.serve(topo.server_v4(), 1, move |mut stream| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => counted.fetch_add(n as u64, Ordering::Relaxed),
                Err(e) => return Err(e.kind()),
            };
        }
    });
    let addr = server.addr();
    let (stream_tx, stream_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    // Uploads until told to stop, or until its writes fail once the path is gone.
    let client = topo.in_client(move || {
        let mut stream = connect(addr);
        stream_tx
            .send(stream.try_clone().expect("clone stream"))
            .expect("hand over the stream");
        let chunk = vec![0x5a; 64 * 1024];
        let mut sent = 0;
        while !stopped.load(Ordering::Relaxed) && sent < common::MAX_TRANSFER {
            if stream.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len() as u64;
        }
    });
    let stream = stream_rx
        .recv_timeout(common::EVENT_DEADLINE)
        .expect("client connected");
    assert!(
        wait_until(common::EVENT_DEADLINE, || received.load(Ordering::Relaxed)
            >= 4 * MIB),
        "the transfer did not get going"
    );
    delete_tun_and_expect_exit(&topo, &mut proxy);
    stop.store(true, Ordering::Relaxed);
    // Unblocks a write stuck on the vanished path.
    let _ = stream.shutdown(Shutdown::Both);
    join(client);
    assert_eq!(
        server.join().remove(0),
        Err(ErrorKind::ConnectionReset),
        "the server must see the cut-short transfer as a reset, not a clean end"
    );
}

/// Without traffic no TUN read or write fails; the link notification of the deletion
/// still ends the proxy.
#[test]
fn an_idle_proxy_exits_when_its_tun_is_deleted() {
    let Some(topo) = Topology::for_test("an_idle_proxy_exits_when_its_tun_is_deleted") else {
        return;
    };
    let mut proxy = topo.start_proxy(&[]);
    delete_tun_and_expect_exit(&topo, &mut proxy);
    assert_eq!(route_rules(&topo), 0, "rules left after exit");
}

/// Deletes the proxy's TUN; the proxy must exit 1 with one error line saying so.
fn delete_tun_and_expect_exit(topo: &Topology, proxy: &mut common::Proxy) {
    common::ip(&format!(
        "-n {} link del {}",
        topo.client_ns(),
        topo.tun_name()
    ));
    let status = proxy
        .wait_exit(common::EVENT_DEADLINE)
        .expect("no exit after the TUN was deleted");
    assert_eq!(status.code(), Some(1), "exit status {status}");
    let output = proxy.stderr();
    assert!(
        matches!(common::error_lines(&output)[..], [line] if line.contains("was deleted")),
        "expected one `uringproxy: error:` line about the deleted TUN:\n{output}"
    );
}
