//! End-to-end tests of the command line as a user meets it: help and version, start-up
//! errors in one line, log filters, the counters SIGUSR1 asks for at any log level, and
//! what the proxy does without CAP_NET_RAW.

mod common;

use std::process::{Command, Output, Stdio};

use common::{KIB, PROXY_BIN, Topology, echo, exchange, join};

fn run(args: &[&str]) -> Output {
    Command::new(PROXY_BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run uringproxy")
}

#[test]
fn help_and_version_go_to_stdout_and_exit_zero() {
    for (args, expected) in [
        (
            &["-V"][..],
            format!("uringproxy {}\n", env!("CARGO_PKG_VERSION")),
        ),
        (
            &["--version"],
            format!("uringproxy {}\n", env!("CARGO_PKG_VERSION")),
        ),
        (
            &["-h"],
            "Usage: uringproxy -i <interface> [<options>]\n".into(),
        ),
        (
            &["--help"],
            "       uringproxy demo [--bytes <bytes>]".into(),
        ),
        (&["demo", "-h"], "Usage: uringproxy demo".into()),
    ] {
        let output = run(args);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        assert!(stdout.contains(&expected), "{args:?}:\n{stdout}");
        assert!(output.stderr.is_empty(), "{args:?} wrote to stderr");
    }
}

#[test]
fn help_into_a_closed_pipe_does_not_panic() {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    // Closed before the proxy writes: its write fails with EPIPE.
    drop(read);
    let output = Command::new(PROXY_BIN)
        .arg("--help")
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .expect("run uringproxy --help");
    assert_eq!(output.status.code(), Some(0));
    assert!(output.stderr.is_empty(), "{output:?}");
}

/// Asserts that `args` fail with status 1 and one stderr line, `uringproxy: error: `
/// followed by text containing `needle`; nothing on stdout.
fn assert_one_error_line(args: &[&str], needle: &str) {
    let output = run(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        matches!(lines[..], [line] if line.starts_with("uringproxy: error: ") && line.contains(needle)),
        "{args:?}: expected one `uringproxy: error:` line containing {needle:?}, got:\n{stderr}"
    );
    assert!(output.stdout.is_empty(), "{args:?} wrote to stdout");
}

#[test]
fn start_up_errors_are_one_line_with_status_1() {
    for (args, needle) in [
        (
            &["-i", "lo", "--mtu", "abc"][..],
            "--mtu abc: invalid digit",
        ),
        (&[], "-i IFACE is required"),
        (&["-i"], "no value provided for option '-i' (see --help)"),
        (
            &["-i", "lo", "--bogus"],
            "unrecognized argument: --bogus (see --help)",
        ),
        (&["-i", "lo", "--log-level", "loud"], "--log-level loud"),
        (
            &["-i", "lo", "--tun", "up%d"],
            "--tun 'up%d': '%' is not allowed",
        ),
        (&["-i", "lo", "--tun", "a b"], "--tun 'a b': white space"),
        (
            &["-i", "lo", "--tun", "much-too-long-name"],
            "at most 15 bytes",
        ),
        (&["demo", "--bogus"], "(see uringproxy demo --help)"),
    ] {
        assert_one_error_line(args, needle);
    }
}

#[test]
fn counters_print_at_any_log_level_and_filters_apply() {
    let Some(topo) = Topology::for_test("counters_print_at_any_log_level_and_filters_apply") else {
        return;
    };
    // warn: the start-up lines (info) are not printed, the counters still are.
    let mut proxy = topo.start_proxy_with_env(&[], &[("RUST_LOG", "warn")]);
    let stats = proxy.stats();
    assert!(stats.contains("uringproxy: flows: opened 0 "), "{stats}");
    assert!(
        !stats.contains("info:"),
        "info lines at RUST_LOG=warn:\n{stats}"
    );
    proxy.terminate();
    drop(proxy);

    // --log-level overrides RUST_LOG; what RUST_LOG says wrong is named in one warning.
    let mut proxy = topo.start_proxy_unrouted(
        &["--log-level", "info"],
        &[("RUST_LOG", "warn,uringproxy=loud")],
    );
    let stats = proxy.stats();
    assert!(stats.contains("info: TUN offload:"), "{stats}");
    assert!(!stats.contains("RUST_LOG"), "{stats}");
    proxy.terminate();
    drop(proxy);

    let mut proxy = topo.start_proxy_unrouted(&[], &[("RUST_LOG", "warn,uringproxy=loud")]);
    let stats = proxy.stats();
    let warnings: Vec<&str> = stats.lines().filter(|l| l.contains("RUST_LOG")).collect();
    assert!(
        matches!(warnings[..], [line] if line.starts_with("uringproxy: warn: ") && line.contains("'uringproxy=loud'")),
        "{stats}"
    );
    proxy.terminate();
}

/// The proxy with CAP_NET_ADMIN only (uid 0, every other capability dropped from the
/// bounding set): SO_BINDTODEVICE works without CAP_NET_RAW (Linux 5.7 on), so TCP is
/// relayed; raw ICMP sockets do not, and the proxy says once that pings are not.
#[test]
fn without_cap_net_raw_tcp_is_relayed_and_ping_is_reported_off() {
    let Some(topo) =
        Topology::for_test("without_cap_net_raw_tcp_is_relayed_and_ping_is_reported_off")
    else {
        return;
    };
    let off = "ping (ICMP echo) relaying is off";
    let mut proxy = topo.wait_for_tun(topo.spawn_proxy_wrapped(
        &[
            "setpriv",
            "--bounding-set=-all,+net_admin",
            "--inh-caps=-all",
            "--",
        ],
        topo.client_veth(),
        &[],
        &[],
    ));
    topo.route_servers_into_tun();
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).expect("status");
    assert!(
        status.lines().any(|l| l == "CapEff:\t0000000000001000"),
        "not CAP_NET_ADMIN only:\n{status}"
    );
    let server = topo.serve(topo.server_v4(), 1, echo);
    let addr = server.addr();
    let (sent, received) =
        join(topo.in_client(move || exchange(common::connect(addr), 3, 64 * KIB)));
    assert_eq!(received, sent, "echo without CAP_NET_RAW");
    server.join();
    let output = proxy.stats();
    let warnings: Vec<&str> = output.lines().filter(|l| l.contains(off)).collect();
    assert!(
        matches!(warnings[..], [line] if line.starts_with("uringproxy: warn: ") && line.contains("CAP_NET_RAW")),
        "expected one warning naming CAP_NET_RAW:\n{output}"
    );
    assert!(output.contains("flows: opened 1 "), "{output}");
    proxy.terminate();
    drop(proxy);

    // With every capability there is nothing to warn about.
    let mut proxy = topo.start_proxy(&[]);
    let output = proxy.stats();
    assert!(!output.contains(off), "{output}");
    proxy.terminate();
}

/// `--cpu` is checked against the CPUs the process may run on, not their count: under
/// `taskset -c H` (H the highest CPU this test may use), `--cpu H` starts and pins the
/// proxy there, and `--cpu L` (the lowest) is refused in one line naming H, before a
/// TUN exists.
#[test]
fn cpu_is_checked_against_the_affinity_mask() {
    let Some(topo) = Topology::for_test("cpu_is_checked_against_the_affinity_mask") else {
        return;
    };
    let mask = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    let allowed: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&cpu| mask.is_set(cpu).unwrap_or(false))
        .collect();
    let (low, high) = (allowed[0], allowed[allowed.len() - 1]);
    if low == high {
        eprintln!("SKIPPED (needs two CPUs): cpu_is_checked_against_the_affinity_mask");
        return;
    }
    let (low, high) = (low.to_string(), high.to_string());
    let taskset = ["taskset", "-c", high.as_str()];

    let mut proxy = topo.wait_for_tun(topo.spawn_proxy_wrapped(
        &taskset,
        topo.client_veth(),
        &["--cpu", &high],
        &[],
    ));
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l == format!("Cpus_allowed_list:\t{high}")),
        "not pinned to CPU {high}:\n{status}"
    );
    proxy.terminate();
    drop(proxy);

    let mut refused = topo.spawn_proxy_wrapped(&taskset, topo.client_veth(), &["--cpu", &low], &[]);
    let exit = refused
        .wait_exit(common::EVENT_DEADLINE)
        .expect("still running after 30 s");
    assert_eq!(exit.code(), Some(1), "exit status {exit}");
    assert_eq!(
        refused.stderr().trim_end(),
        format!(
            "uringproxy: error: --cpu {low}: not among the CPUs this process may run on ({high})"
        )
    );
    assert!(!topo.tun_exists(), "a TUN was created before the refusal");
}

/// Left in a service's environment, the test overrides would lower features without a
/// word: each is announced by one warning at start-up, naming it and its effect.
#[test]
fn test_overrides_are_each_announced_once_at_start_up() {
    let Some(topo) = Topology::for_test("test_overrides_are_each_announced_once_at_start_up")
    else {
        return;
    };
    let mut proxy = topo.start_proxy_unrouted(
        &[],
        &[
            ("URINGPROXY_MAX_OFFLOAD", "csum"),
            ("URINGPROXY_MAX_URING", "6.1"),
        ],
    );
    let output = proxy.stats();
    let lines: Vec<&str> = output.lines().collect();
    let started = lines
        .iter()
        .position(|line| line.contains("info: relaying from"))
        .unwrap_or_else(|| panic!("no start-up line:\n{output}"));
    for (variable, warning) in [
        (
            "URINGPROXY_MAX_OFFLOAD",
            "uringproxy: warn: URINGPROXY_MAX_OFFLOAD=csum set: TUN offload capped at checksum",
        ),
        (
            "URINGPROXY_MAX_URING",
            "uringproxy: warn: URINGPROXY_MAX_URING=6.1 set: io_uring features capped to those \
             of Linux 6.1 (multishot TUN reads off)",
        ),
    ] {
        let naming: Vec<(usize, &&str)> = lines
            .iter()
            .enumerate()
            .filter(|(_, line)| line.contains(variable))
            .collect();
        assert!(
            matches!(naming[..], [(at, line)] if *line == warning && at < started),
            "expected one warning before start-up, {warning:?}:\n{output}"
        );
    }
    proxy.terminate();
}
