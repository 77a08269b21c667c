//! End-to-end tests of the io_uring feature probe: the fallbacks that older kernels get
//! (forced here with URINGPROXY_MAX_URING) relay like the full feature set, and a kernel
//! below the floor is refused before anything is created.

mod common;

use common::{MIB, Topology, echo, exchange, join, request_after_half_close};

/// With the 6.1 cap the proxy must say it uses single reads and relay both families,
/// bulk and half-closed, hash-checked.
fn single_reads_relay(test: &str, extra: &[&str]) {
    let Some(topo) = Topology::for_test(test) else {
        return;
    };
    let mut proxy = topo.start_proxy_with_env(extra, &[("URINGPROXY_MAX_URING", "6.1")]);
    let log = proxy.stderr();
    assert!(
        log.contains("multishot reads unavailable") && log.contains("single reads"),
        "the 6.1 cap did not select single reads:\n{log}"
    );
    for (seed, ip) in [(1, topo.server_v4()), (2, topo.server_v6())] {
        let server = topo.serve(ip, 1, echo);
        let addr = server.addr();
        let (sent, received) =
            join(topo.in_client(move || exchange(common::connect(addr), seed, 16 * MIB)));
        assert_eq!(server.join(), [16 * MIB], "bytes echoed via {ip}");
        assert_eq!(received, sent, "echo via {ip}");
        request_after_half_close(&topo, ip, MIB, 8 * MIB);
    }
    proxy.assert_running();
}

#[test]
fn single_reads_relay_with_offload() {
    single_reads_relay("single_reads_relay_with_offload", &[]);
}

#[test]
fn single_reads_relay_without_offload() {
    single_reads_relay("single_reads_relay_without_offload", &["--no-offload"]);
}

#[test]
fn kernel_below_the_floor_is_refused_before_anything_is_created() {
    let Some(topo) = Topology::for_test("kernel_below_the_floor_is_refused") else {
        return;
    };
    let mut proxy = topo.spawn_proxy_with_env(
        topo.client_veth(),
        &["--route", "10.1.2.0/24"],
        &[("URINGPROXY_MAX_URING", "5.15")],
    );
    let status = proxy
        .wait_exit(common::EVENT_DEADLINE)
        .expect("still running after 30 s");
    assert!(!status.success(), "exit status {status}");
    let output = proxy.stderr();
    let errors: Vec<&str> = output
        .lines()
        .filter(|line| line.starts_with("uringproxy: error:"))
        .collect();
    assert!(
        matches!(errors[..], [line] if line.contains("5.15") && line.contains("6.1 or newer")),
        "expected one error line naming the capped kernel and the floor, got:\n{output}"
    );
    assert!(
        !output.contains("info:"),
        "started before refusing:\n{output}"
    );
    assert!(!topo.tun_exists(), "a TUN was created before the refusal");
    assert!(
        !common::ip(&format!("-n {} rule show", topo.client_ns())).contains("10.1.2.0"),
        "a --route rule was installed before the refusal"
    );
}
