//! End-to-end tests of the proxy's live status: `uringproxy status` (text and JSON) over
//! its control socket, who may connect to that socket, and the Prometheus endpoint
//! (parsed with the `prometheus_client` package's parser), each against a proxy relaying
//! hash-checked traffic between two namespaces; and clients that stall or send garbage
//! next to a relay of 10,000 flows.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{
    KIB, MIB, PROXY_BIN, Topology, Transfer, connect, echo, error_lines, exchange, join,
    recv_to_end, request_after_half_close, send_payload, wait_until,
};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Where each test's proxy serves metrics: inside the test's own client namespace, so
/// tests running side by side cannot collide on it.
const METRICS: &str = "127.0.0.1:9464";

/// Runs `uringproxy status` with `args` through `wrapper` (a command that execs the
/// rest, or nothing).
fn run_status(wrapper: &[&str], args: &[&str]) -> Output {
    let (program, rest) = match wrapper.split_first() {
        Some((program, rest)) => (*program, rest),
        None => (PROXY_BIN, &[][..]),
    };
    let mut command = Command::new(program);
    command.args(rest);
    if !wrapper.is_empty() {
        command.arg(PROXY_BIN);
    }
    command
        .arg("status")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run uringproxy status")
}

/// `uringproxy status --control PATH` plus `args`: its output, which must be a success.
fn status(path: &Path, args: &[&str]) -> String {
    let path = path.to_str().expect("UTF-8 path");
    let output = run_status(&[], &[&["--control", path][..], args].concat());
    assert!(
        output.status.success(),
        "status {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 status")
}

/// A flow as `status --json` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    proto: String,
    client: String,
    server: String,
    state: String,
    bytes_up: u64,
    bytes_down: u64,
}

/// The flows and counters of `status --json`, read by Python's JSON parser (which also
/// checks that it is one valid JSON object with the documented fields).
fn json_status(path: &Path, args: &[&str]) -> (Vec<Listed>, HashMap<String, u64>) {
    let json = status(path, &[&["--json"][..], args].concat());
    let script = r#"
import json, sys
reply = json.load(sys.stdin)
for key in ("tun", "interface", "offload"):
    assert isinstance(reply[key], str), key
assert isinstance(reply["uptime_s"], int)
for group in ("counters", "gauges"):
    for key, value in reply[group].items():
        print("number", key, value)
for flow in reply["flows"]:
    assert isinstance(flow["age_s"], int) and isinstance(flow["idle_s"], int)
    print("flow", flow["proto"], flow["client"], flow["server"], flow["state"],
          flow["bytes_up"], flow["bytes_down"])
"#;
    let output = python(&[], script, &[], json.as_bytes());
    let mut flows = Vec::new();
    let mut numbers = HashMap::new();
    for line in output.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        match fields[..] {
            ["number", key, value] => {
                numbers.insert(key.to_string(), value.parse().unwrap());
            }
            ["flow", proto, client, server, state, up, down] => flows.push(Listed {
                proto: proto.into(),
                client: client.into(),
                server: server.into(),
                state: state.into(),
                bytes_up: up.parse().unwrap(),
                bytes_down: down.parse().unwrap(),
            }),
            _ => panic!("unexpected line {line:?}"),
        }
    }
    (flows, numbers)
}

/// Runs Python `script` (with `args`, `input` on stdin), in namespace `ns` if given;
/// its stdout, which must be a success.
fn python(ns: &[&str], script: &str, args: &[&str], input: &[u8]) -> String {
    let mut command = match ns {
        [ns] => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns, "python3"]);
            command
        }
        _ => Command::new("python3"),
    };
    let mut child = command
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("feed python3");
    let output = child.wait_with_output().expect("python3 output");
    assert!(
        output.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 from python3")
}

/// One scrape of the metrics endpoint, parsed by prometheus_client: sample
/// `name{label=value,...}` (labels sorted) to value. Checks the content type and that
/// every family has help and a type.
fn scrape(topo: &Topology) -> HashMap<String, u64> {
    let script = r#"
import sys, urllib.request
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    sys.exit("needs the prometheus_client package: pip install prometheus_client")
with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
    assert response.status == 200, response.status
    kind = response.headers["Content-Type"]
    assert kind.startswith("text/plain; version=0.0.4"), kind
    body = response.read().decode()
families = list(text_string_to_metric_families(body))
assert families, "no metrics"
for family in families:
    assert family.name.startswith("uringproxy_"), family.name
    assert family.documentation, family.name + " has no help"
    assert family.type in ("counter", "gauge"), family.name + " " + family.type
    for sample in family.samples:
        labels = ",".join(k + "=" + v for k, v in sorted(sample.labels.items()))
        print(sample.name + "{" + labels + "}", int(sample.value))
"#;
    let url = format!("http://{METRICS}/metrics");
    python(&[topo.client_ns()], script, &[&url], b"")
        .lines()
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').expect("name value");
            (name.to_string(), value.parse().expect("a whole number"))
        })
        .collect()
}

fn sample(metrics: &HashMap<String, u64>, name: &str) -> u64 {
    *metrics
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", metrics.keys().collect::<Vec<_>>()))
}

/// A connection to `addr` that has moved `up` bytes to the server and `down` back,
/// both hash-checked by the caller, and is then held open.
struct Held {
    stream: TcpStream,
    sent: Transfer,
    received: Transfer,
}

#[test]
fn status_lists_held_flows_with_their_addresses_in_text_and_json() {
    let Some(topo) =
        Topology::for_test("status_lists_held_flows_with_their_addresses_in_text_and_json")
    else {
        return;
    };
    let proxy = topo.start_proxy(&[]);
    let path = proxy.control_path().to_path_buf();
    // One TCP flow of each family, the IPv6 one the bigger, and one UDP exchange.
    let sizes = [
        (topo.server_v4(), 100 * KIB, 200 * KIB),
        (topo.server_v6(), 300 * KIB, MIB),
    ];
    let mut servers = Vec::new();
    let mut held = Vec::new();
    for (seed, &(ip, up, down)) in sizes.iter().enumerate() {
        let server = topo.serve(ip, 1, move |mut stream| {
            let received = recv_to_end(&mut (&stream).take(up));
            let sent = send_payload(&mut stream, 100 + seed as u64, down);
            // Held until the client half-closes.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
            (received, sent, rest.len())
        });
        let addr = server.addr();
        held.push(join(topo.in_client(move || {
            let mut stream = connect(addr);
            let sent = send_payload(&mut stream, seed as u64, up);
            let received = recv_to_end(&mut (&stream).take(down));
            Held {
                stream,
                sent,
                received,
            }
        })));
        servers.push(server);
    }
    let udp_server = join(topo.in_server({
        let ip = topo.server_v4();
        move || UdpSocket::bind((ip, 0)).expect("bind UDP")
    }));
    let udp_addr = udp_server.local_addr().unwrap();
    let udp_echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        udp_server
            .set_read_timeout(Some(common::IO_TIMEOUT))
            .unwrap();
        let (n, from) = udp_server.recv_from(&mut buf).expect("UDP datagram");
        udp_server.send_to(&buf[..n], from).expect("UDP reply");
    });
    let udp_client = join(topo.in_client(move || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind UDP client");
        socket.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
        socket.connect(udp_addr).unwrap();
        socket.send(&[7u8; 1000]).unwrap();
        let mut buf = [0u8; 2048];
        assert_eq!(socket.recv(&mut buf).expect("UDP reply"), 1000);
        socket
    }));
    join(udp_echo);

    let expected: Vec<Listed> = held
        .iter()
        .zip(&sizes)
        .map(|(flow, &(_, up, down))| Listed {
            proto: "tcp".into(),
            client: flow.stream.local_addr().unwrap().to_string(),
            server: flow.stream.peer_addr().unwrap().to_string(),
            state: "open".into(),
            bytes_up: up,
            bytes_down: down,
        })
        .chain(std::iter::once(Listed {
            proto: "udp".into(),
            client: udp_client
                .local_addr()
                .unwrap()
                .to_string()
                .replace("0.0.0.0", ""),
            server: udp_addr.to_string(),
            state: "open".into(),
            bytes_up: 1000,
            bytes_down: 1000,
        }))
        .collect();
    // The UDP client's address as the proxy sees it: the source of its datagram.
    let mut flows = Vec::new();
    let all_counted = wait_until(Duration::from_secs(10), || {
        flows = json_status(&path, &[]).0;
        expected
            .iter()
            .all(|want| flows.iter().any(|got| same_flow(got, want)))
    });
    assert!(all_counted, "expected {expected:#?}\nlisted {flows:#?}");
    assert_eq!(flows.len(), 3, "{flows:#?}");
    assert!(expected[1].client.starts_with('['), "IPv6 as [addr]:port");
    assert!(
        flows[0].client == expected[1].client,
        "the biggest flow first: {flows:#?}"
    );
    let (top, numbers) = json_status(&path, &["--top", "1"]);
    assert_eq!(top.len(), 1);
    assert!(same_flow(&top[0], &expected[1]), "{top:?}");
    assert_eq!(sample(&numbers, "tcp_flows_open"), 2);
    assert_eq!(sample(&numbers, "udp_flows_open"), 1);
    assert!(sample(&numbers, "tcp_bytes_up") >= 400 * KIB);

    // The same flows in the text table, bytes in human units.
    let text = status(&path, &[]);
    assert!(
        text.starts_with(&format!(
            "uringproxy on {} via {}",
            topo.tun_name(),
            topo.client_veth()
        )),
        "{text}"
    );
    for (want, (up, down)) in expected.iter().zip([
        ("100.0 KiB", "200.0 KiB"),
        ("300.0 KiB", "1.0 MiB"),
        ("1000 B", "1000 B"),
    ]) {
        let line = text
            .lines()
            .find(|line| {
                line.contains(&format!(" {}", want.server)) && line.starts_with(&want.proto)
            })
            .unwrap_or_else(|| panic!("no line for {want:?}:\n{text}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields[1].ends_with(&want.client), "{line}");
        assert_eq!(fields[3], "open", "{line}");
        assert!(
            line.contains(&format!("{up}  ")) && line.contains(down),
            "{line}"
        );
    }

    // Released: every byte arrived as sent, both ways.
    for held in &held {
        held.stream.shutdown(Shutdown::Write).unwrap();
    }
    for ((server, held), (_, up, _)) in servers.into_iter().zip(held).zip(sizes) {
        let (received, sent, rest) = server.join().remove(0);
        assert_eq!(received, held.sent, "upload of {up} bytes");
        assert_eq!(sent, held.received, "download");
        assert_eq!(rest, 0);
    }
    let gone = wait_until(Duration::from_secs(10), || {
        json_status(&path, &[])
            .0
            .iter()
            .all(|flow| flow.proto != "tcp")
    });
    assert!(gone, "closed flows still listed");
}

/// `got` is `want`: the UDP client's address is compared by port (it is bound to the
/// unspecified address; the proxy sees the source its kernel chose).
fn same_flow(got: &Listed, want: &Listed) -> bool {
    let client = if want.client.starts_with(':') {
        got.client.ends_with(&want.client)
    } else {
        got.client == want.client
    };
    client
        && (
            &got.proto,
            &got.server,
            &got.state,
            got.bytes_up,
            got.bytes_down,
        ) == (
            &want.proto,
            &want.server,
            &want.state,
            want.bytes_up,
            want.bytes_down,
        )
}

#[test]
fn only_the_proxys_user_and_root_may_use_its_control_socket() {
    let Some(topo) = Topology::for_test("only_the_proxys_user_and_root_may_use_its_control_socket")
    else {
        return;
    };
    // A TUN name no other test uses, for the default path derived from it.
    let tun = format!("upxst{}", std::process::id() % 100_000);
    let mut proxy = topo.start_proxy_default_control(&tun, &["--user", "nobody"]);
    let path = format!("/run/uringproxy/{tun}.sock");
    common::wait_for_control(Path::new(&path));
    let switched = wait_until(common::EVENT_DEADLINE, || {
        proxy.stderr().contains("running as nobody")
    });
    assert!(switched, "no privilege drop reported");
    let socket = std::fs::symlink_metadata(&path).expect("the default control socket");
    assert!(socket.file_type().is_socket());
    assert_eq!(socket.permissions().mode() & 0o777, 0o600);
    assert_eq!(socket.uid(), 65534, "owned by --user nobody");
    let dir = std::fs::symlink_metadata("/run/uringproxy").unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);
    assert_eq!(dir.uid(), 65534);

    // Root and the proxy's user may ask; a user that is neither may not.
    for wrapper in [
        &[][..],
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
    ] {
        let output = run_status(wrapper, &["--tun", &tun]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{wrapper:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.starts_with(&format!("uringproxy on {tun} via ")),
            "{stdout}"
        );
    }
    let stranger = [
        "setpriv",
        "--reuid=54321",
        "--regid=54321",
        "--clear-groups",
        "--",
    ];
    let output = run_status(&stranger, &["--tun", &tun]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        matches!(error_lines(&stderr)[..], [line] if line.contains("Permission denied") && line.contains(&path)),
        "{stderr}"
    );
    // Should the socket's mode let it through, the proxy still refuses it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions("/run/uringproxy", std::fs::Permissions::from_mode(0o711)).unwrap();
    let output = run_status(&stranger, &["--tun", &tun]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("closed without a reply"), "{stderr}");
    std::fs::set_permissions("/run/uringproxy", std::fs::Permissions::from_mode(0o700)).unwrap();

    proxy.terminate();
    assert!(!Path::new(&path).exists(), "the socket stays after exit");

    // The directory is shared: a --user proxy does not take it from another user, and a
    // proxy running as root takes it back.
    nix::unistd::chown("/run/uringproxy", Some(54321.into()), None).unwrap();
    let mut refused = topo.spawn_proxy_default_control(&tun, &["--user", "nobody"]);
    assert!(
        refused
            .wait_exit(common::EVENT_DEADLINE)
            .is_some_and(|status| !status.success()),
        "started in a directory of another user"
    );
    let stderr = refused.stderr();
    assert!(
        matches!(error_lines(&stderr)[..], [line] if line.contains("belongs to uid 54321")),
        "{stderr}"
    );
    let mut as_root = topo.start_proxy_default_control(&tun, &[]);
    common::wait_for_control(Path::new(&path));
    let dir = std::fs::symlink_metadata("/run/uringproxy").unwrap();
    assert_eq!((dir.uid(), dir.permissions().mode() & 0o777), (0, 0o700));
    as_root.terminate();
    // Leave no directory of ours behind (another run may be using it: best effort).
    let _ = std::fs::remove_dir("/run/uringproxy");
}

#[test]
fn a_stale_control_socket_is_replaced_and_a_live_one_refused() {
    let Some(topo) =
        Topology::for_test("a_stale_control_socket_is_replaced_and_a_live_one_refused")
    else {
        return;
    };
    let path = std::env::temp_dir().join(format!("{}.shared.sock", topo.client_ns()));
    let shared = path.to_str().unwrap();
    let first = topo.start_proxy(&["--control", shared]);
    common::wait_for_control(&path);
    let mut second =
        topo.spawn_proxy_on("upxtun1", topo.client_veth(), &["--control", shared], &[]);
    let status_code = second
        .wait_exit(common::EVENT_DEADLINE)
        .expect("the second one exits");
    assert!(!status_code.success());
    let output = second.stderr();
    assert!(
        matches!(error_lines(&output)[..], [line] if line.contains(shared) && line.contains("in use by a running proxy")),
        "{output}"
    );
    assert!(
        status(&path, &[]).contains(&format!("on {} via", topo.tun_name())),
        "the first one is unharmed"
    );

    // Killed: its socket stays behind, and the next proxy takes its place.
    drop(first);
    assert!(path.exists());
    let tun_gone = wait_until(common::EVENT_DEADLINE, || !topo.tun_exists());
    assert!(tun_gone, "the killed proxy's TUN is still there");
    let mut third = topo.start_proxy(&["--control", shared]);
    // Until the third has replaced it, the killed one's socket may still take
    // connections (the kernel tears its ring down after it, longer on a loaded
    // machine), and one made there is reset without a reply: wait for the third's own.
    let replaced = wait_until(common::EVENT_DEADLINE, || {
        third
            .stderr()
            .contains("uringproxy: info: control socket at")
    });
    assert!(
        replaced,
        "the third made no control socket: {}",
        third.stderr()
    );
    common::wait_for_control(&path);
    assert!(status(&path, &[]).starts_with("uringproxy on "));
    third.terminate();
    assert!(!path.exists(), "the socket stays after exit");

    // A file that is not a socket is never removed.
    std::fs::write(&path, b"not a socket").unwrap();
    let mut fourth = topo.spawn_proxy(topo.client_veth(), &["--control", shared]);
    assert!(
        fourth
            .wait_exit(common::EVENT_DEADLINE)
            .is_some_and(|s| !s.success())
    );
    let output = fourth.stderr();
    assert!(
        matches!(error_lines(&output)[..], [line] if line.contains("not a socket")),
        "{output}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    std::fs::remove_file(&path).unwrap();
}

/// An HTTP request on a new connection to the metrics endpoint, from the client
/// namespace: the status line of the reply.
fn http_status_line(topo: &Topology, request: Vec<u8>) -> String {
    join(topo.in_client(move || {
        let mut stream = connect(METRICS.parse().unwrap());
        // The proxy may answer (and close) before all of an oversized request is in.
        let _ = stream.write_all(&request);
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }))
}

#[test]
fn metrics_parse_and_count_the_bytes_of_a_hash_checked_transfer() {
    let Some(topo) =
        Topology::for_test("metrics_parse_and_count_the_bytes_of_a_hash_checked_transfer")
    else {
        return;
    };
    let proxy = topo.start_proxy(&["--metrics", METRICS]);
    let before = scrape(&topo);
    let info = format!("uringproxy_info{{interface={},offload=", topo.client_veth());
    assert!(
        before.keys().any(|name| name.starts_with(&info)),
        "{before:?}"
    );
    let (up, down) = (3 * MIB, 5 * MIB);
    // Hash-checked both ways.
    request_after_half_close(&topo, topo.server_v4(), up, down);
    let tcp = |metrics: &HashMap<String, u64>, direction: &str| {
        sample(
            metrics,
            &format!("uringproxy_bytes_total{{direction={direction},protocol=tcp}}"),
        )
    };
    let mut after = HashMap::new();
    let counted = wait_until(common::EVENT_DEADLINE, || {
        after = scrape(&topo);
        tcp(&after, "up") - tcp(&before, "up") == up
            && tcp(&after, "down") - tcp(&before, "down") == down
    });
    assert!(
        counted,
        "moved {up} up and {down} down; counted {} and {}",
        tcp(&after, "up") - tcp(&before, "up"),
        tcp(&after, "down") - tcp(&before, "down")
    );
    assert_eq!(
        sample(&after, "uringproxy_flows_opened_total{protocol=tcp}"),
        1
    );
    assert!(sample(&after, "uringproxy_resident_memory_bytes{}") > MIB);
    assert!(sample(&after, "uringproxy_tun_write_buffers{}") > 0);
    assert!(after.contains_key("uringproxy_open_flows{protocol=tcp,state=open}"));
    assert!(after.contains_key("uringproxy_drops_total{reason=malformed}"));
    assert!(
        after.contains_key("uringproxy_flows_failed_total{cause=connect_refused,protocol=tcp}")
    );

    // Bad requests get a 4xx, and are counted.
    let big_header = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
        "a".repeat(9000)
    );
    for (request, expected) in [
        (
            b"\x16\x03\x01\x02\x00garbage\r\n\r\n".to_vec(),
            "HTTP/1.1 400 Bad Request",
        ),
        (
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "HTTP/1.1 404 Not Found",
        ),
        (
            b"POST /metrics HTTP/1.0\r\n\r\n".to_vec(),
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (
            b"GET /metrics HTTP/1.0\r\nContent-Length: 9\r\n\r\n".to_vec(),
            "HTTP/1.1 413 Content Too Large",
        ),
        (
            big_header.into_bytes(),
            "HTTP/1.1 431 Request Header Fields Too Large",
        ),
    ] {
        assert_eq!(http_status_line(&topo, request), expected);
    }
    let last = scrape(&topo);
    assert_eq!(
        sample(
            &last,
            "uringproxy_control_clients_total{event=bad_request,listener=metrics}"
        ),
        5
    );
    drop(proxy);
}

/// A Unix connection to the control socket at `path` that sends `request` and then
/// reads nothing until asked to (`read_all`).
fn control_client(path: &Path, request: &[u8]) -> UnixStream {
    let mut stream = UnixStream::connect(path).expect("connect to the control socket");
    stream.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    stream.write_all(request).expect("send a request");
    stream
}

fn read_all(mut stream: UnixStream) -> String {
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .expect("read the reply to its end");
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn stuck_and_garbage_clients_leave_relaying_and_other_clients_unharmed() {
    const HELD: usize = 10_000;
    let Some(topo) =
        Topology::for_test("stuck_and_garbage_clients_leave_relaying_and_other_clients_unharmed")
    else {
        return;
    };
    // This process holds one socket per flow (the server's kernel holds the other end:
    // nobody accepts them).
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("RLIMIT_NOFILE");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise RLIMIT_NOFILE");
    assert!(
        hard >= HELD as u64 + 256,
        "fd limit {hard} too low for {HELD} flows"
    );
    let mut proxy = topo.start_proxy(&["--metrics", METRICS]);
    let path = proxy.control_path().to_path_buf();
    common::ip(&format!(
        "netns exec {} sysctl -qw net.core.somaxconn={}",
        topo.server_ns(),
        HELD + 64
    ));
    let held_addr = SocketAddr::new(topo.server_v6(), 7400);
    let listener = join(topo.in_server(move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
            .expect("socket");
        socket.bind(&held_addr.into()).expect("bind");
        socket.listen(HELD as i32 + 64).expect("listen");
        socket
    }));
    let held =
        join(topo.in_client(move || (0..HELD).map(|_| connect(held_addr)).collect::<Vec<_>>()));

    // The troublemakers: silent ones (control and metrics), a status client that never
    // reads its reply of 10,000 flows, and garbage.
    let silent = UnixStream::connect(&path).unwrap();
    let silent_http = join(topo.in_client(|| connect(METRICS.parse().unwrap())));
    let never_reads = control_client(&path, b"status\n");
    let too_long = control_client(&path, &[b'x'; 300]);
    let unknown = control_client(&path, b"\x00\xffstatus please\n");
    let garbage_http = join(topo.in_client(|| {
        let mut stream = connect(METRICS.parse().unwrap());
        stream
            .write_all(b"\x16\x03\x01 not http at all\r\n\r\n")
            .unwrap();
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    }));
    assert!(garbage_http.starts_with("HTTP/1.1 400 "), "{garbage_http}");
    assert_eq!(read_all(too_long), "error request too long\n");
    assert!(read_all(unknown).starts_with("error unknown request"));

    // Meanwhile: a hash-checked transfer, other status clients and a scrape all
    // complete, each reply whole.
    let server = topo.serve(topo.server_v4(), 1, echo);
    let addr = server.addr();
    let transfer = topo.in_client(move || exchange(connect(addr), 9, 64 * MIB));
    let (listed, numbers) = json_status(&path, &[]);
    let held_listed = listed
        .iter()
        .filter(|flow| flow.server == held_addr.to_string() && flow.state == "open")
        .count();
    assert_eq!(held_listed, HELD, "every held flow listed");
    assert!(sample(&numbers, "tcp_flows_open") >= HELD as u64);
    let reply_size = status(&path, &[]).len();
    // As many silent clients as the metrics endpoint serves at once: a scrape still
    // gets through, making room by closing the one that waited longest. Asked from
    // here at once: the scraper's Python can take seconds to start on a loaded
    // machine, by which time the crowd's request deadline (5 s) may have made room.
    let crowd: Vec<TcpStream> = join(topo.in_client(|| {
        (0..8)
            .map(|_| connect(METRICS.parse().unwrap()))
            .collect::<Vec<_>>()
    }));
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    assert_eq!(http_status_line(&topo, request), "HTTP/1.1 200 OK");
    let metrics = scrape(&topo);
    assert!(
        sample(
            &metrics,
            "uringproxy_control_clients_total{event=evicted,listener=metrics}"
        ) >= 1
    );
    assert!(sample(&metrics, "uringproxy_open_flows{protocol=tcp,state=open}") >= HELD as u64);
    let (sent, received) = join(transfer);
    assert_eq!(received, sent, "the transfer beside the stuck clients");
    server.join();

    // The stuck ones are closed at their deadlines (5 s for a request, 10 s for a
    // reply), and nothing else is.
    let mut metrics = HashMap::new();
    let closed = wait_until(Duration::from_secs(30), || {
        metrics = scrape(&topo);
        sample(
            &metrics,
            "uringproxy_control_clients_total{event=timed_out,listener=control}",
        ) >= 2
            && sample(
                &metrics,
                "uringproxy_control_clients_total{event=timed_out,listener=metrics}",
            ) >= 1
    });
    assert!(closed, "stuck clients not closed: {metrics:?}");
    assert_eq!(
        sample(
            &metrics,
            "uringproxy_control_clients_total{event=timed_out,listener=control}"
        ),
        2
    );
    assert_eq!(
        sample(
            &metrics,
            "uringproxy_control_clients_total{event=bad_request,listener=control}"
        ),
        2
    );
    assert_eq!(read_all(silent), "", "a silent client gets nothing");
    let mut rest = Vec::new();
    let mut silent_http = silent_http;
    assert_eq!(silent_http.read_to_end(&mut rest).unwrap(), 0);
    // The reader that never read got part of its reply, not an end: it was stuck.
    let cut = read_all(never_reads);
    assert!(
        cut.starts_with("uringproxy-status 1\n"),
        "{}",
        &cut[..cut.len().min(200)]
    );
    assert!(
        !cut.contains("\nend "),
        "a reply of {} bytes fitted in the socket buffer",
        reply_size
    );
    assert!(cut.len() < reply_size);

    proxy.assert_running();
    drop(crowd);
    drop(held);
    drop(listener);
    proxy.terminate();
}
