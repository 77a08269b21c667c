//! End-to-end tests of TUN offload: hash-checked transfers both ways over IPv4 and IPv6
//! at every offload level the start-up probe can fall back to (capped through
//! URINGPROXY_MAX_OFFLOAD, or `--no-offload`), and proof from the proxy's own counters
//! that super-packets really crossed the TUN when segmentation offload is on.

mod common;

use common::{MIB, Topology, request_after_half_close};

const LEN: u64 = 16 * MIB;

/// The number after `label` on the proxy's `offload:` counter line.
fn counter(stats: &str, label: &str) -> u64 {
    let line = stats
        .lines()
        .rev()
        .find(|line| line.contains("offload: super-packets"))
        .unwrap_or_else(|| panic!("no offload counters in:\n{stats}"));
    let rest = &line[line
        .find(label)
        .unwrap_or_else(|| panic!("no '{label}' in {line}"))
        + label.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after '{label}' in {line}"))
}

/// Runs transfers with the proxy started as given; checks the negotiated level it logs
/// and whether super-packets went in and out.
fn run_at_level(test: &str, args: &[&str], cap: Option<&str>, level: &str, segmented: bool) {
    let Some(topo) = Topology::for_test(test) else {
        return;
    };
    let env: Vec<(&str, &str)> = cap
        .map(|c| ("URINGPROXY_MAX_OFFLOAD", c))
        .into_iter()
        .collect();
    let mut proxy = topo.start_proxy_with_env(args, &env);
    for ip in [topo.server_v4(), topo.server_v6()] {
        request_after_half_close(&topo, ip, LEN, LEN);
    }
    let stats = proxy.stats();
    assert!(
        stats.contains(&format!("TUN offload: {level}\n")),
        "expected offload level '{level}' in:\n{stats}"
    );
    let (into_proxy, out_of_proxy) = (counter(&stats, "in "), counter(&stats, "out "));
    if segmented {
        // Both families upload super-packets; IPv4 downloads are sent as super-packets.
        assert!(into_proxy > 0, "no super-packets read:\n{stats}");
        assert!(out_of_proxy > 0, "no super-packets written:\n{stats}");
    } else {
        assert_eq!(
            (into_proxy, out_of_proxy),
            (0, 0),
            "super-packets without TSO:\n{stats}"
        );
    }
    proxy.assert_running();
}

#[test]
fn default_negotiates_full_offload() {
    run_at_level(
        "default_negotiates_full_offload",
        &[],
        None,
        "checksum + TCP and UDP segmentation",
        true,
    );
}

#[test]
fn tso_without_uso() {
    run_at_level(
        "tso_without_uso",
        &[],
        Some("tso"),
        "checksum + TCP segmentation",
        true,
    );
}

#[test]
fn checksum_offload_only() {
    run_at_level(
        "checksum_offload_only",
        &[],
        Some("csum"),
        "checksum",
        false,
    );
}

#[test]
fn vnet_header_without_offload() {
    run_at_level(
        "vnet_header_without_offload",
        &[],
        Some("header"),
        "none (virtio-net header only)",
        false,
    );
}

#[test]
fn no_offload_flag() {
    run_at_level(
        "no_offload_flag",
        &["--no-offload"],
        None,
        "none (no virtio-net header)",
        false,
    );
}

/// With a TUN MTU of 64 KiB the client's MSS lets whole 64 KiB segments through the TUN
/// (sent without PSH, see `wire::offload`; whether a packet is one segment or a
/// super-packet with a short tail depends on timing, so it is not asserted), and the
/// outbound side still uses the real link's: data arrives intact both ways, both
/// families.
#[test]
fn mtu_of_64_kib() {
    let Some(topo) = Topology::for_test("mtu_of_64_kib") else {
        return;
    };
    let mut proxy = topo.start_proxy(&["--mtu", "65520"]);
    for ip in [topo.server_v4(), topo.server_v6()] {
        request_after_half_close(&topo, ip, LEN, LEN);
    }
    proxy.assert_running();
}
