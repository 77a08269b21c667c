//! Shared harness for the end-to-end tests.
//!
//! Every test builds its own [`Topology`]: a client and a server network
//! namespace joined by a veth pair, or through a router namespace
//! ([`Topology::routed_for_test`]). The proxy runs in the client namespace;
//! policy routing sends traffic for the server's addresses into the proxy's
//! TUN device, and the proxy re-originates it over the veth. Sockets are
//! created inside a namespace by running code on a thread that has joined
//! it (see [`in_netns`]).
//!
//! Everything here needs root and iproute2; [`Topology::for_test`] skips (or,
//! in CI, fails) when they are missing.

// Each test binary compiles its own copy of this module and uses only part of
// it, so unused helpers are expected rather than a sign of dead code.
#![allow(dead_code)]

pub mod socks;

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::panic;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sched::{CloneFlags, setns};
use sha2::{Digest, Sha256};
use socket2::SockRef;

/// How long a test waits for an event that should come at once (an exit, a rule, a
/// counter): generous, for a loaded machine; the wait ends as soon as it comes.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(30);
/// Both families' unspecified address (an IPv6 socket bound to it takes IPv4 too).
pub const ANY: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// Read/write/accept timeout on every socket, so a stuck proxy fails a test
/// instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound on any single receive, so a proxy that invents data cannot
/// keep a read loop going forever.
pub const MAX_TRANSFER: u64 = 1 << 30;

/// Write/read granularity of payload streams.
const CHUNK: usize = 64 * 1024;

pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_uringproxy");
const NETNS_DIR: &str = "/var/run/netns";
const TUN_NAME: &str = "upxtun0";
/// Policy-routing table whose default route leads into the proxy's TUN.
pub const ROUTE_TABLE: &str = "200";
const PROXY_STARTUP_TIMEOUT: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// `found` (whether `what`, which a test needs, is installed), printing why the test is
/// skipped when it is not, or panicking in CI, where .ci/test installs it (`how`).
pub fn found_or_skip(found: bool, what: &str, how: &str, test: &str) -> bool {
    if !found {
        if std::env::var_os("URINGPROXY_REQUIRE_ROOT_TESTS").is_some_and(|v| v == "1") {
            panic!("{test} needs {what} ({how}; .ci/test does)");
        }
        eprintln!("SKIPPED (needs {what}): {test}");
    }
    found
}

/// Returns whether a privileged test can run. Otherwise prints
/// `SKIPPED (needs ...): <test>` and returns false, or panics when
/// `URINGPROXY_REQUIRE_ROOT_TESTS=1` so CI cannot silently skip everything.
pub fn privileged_or_skip(test: &str) -> bool {
    let missing = if !nix::unistd::geteuid().is_root() {
        "root"
    } else if !ip_available() {
        "iproute2 `ip`"
    } else {
        return true;
    };
    if std::env::var_os("URINGPROXY_REQUIRE_ROOT_TESTS").is_some_and(|v| v == "1") {
        panic!("URINGPROXY_REQUIRE_ROOT_TESTS=1 but {test} cannot run: needs {missing}");
    }
    // Straight to stderr rather than eprintln!, which the test harness
    // captures: a skip should be visible in a normal `cargo test` run.
    let _ = writeln!(io::stderr(), "SKIPPED (needs {missing}): {test}");
    false
}

/// Files `ip netns exec NS` mounts over those of /etc (hosts, resolv.conf), in
/// /etc/netns/NS, removed again on drop.
pub struct NetnsEtc {
    dir: PathBuf,
}

impl NetnsEtc {
    pub fn new(ns: &str, files: &[(&str, String)]) -> NetnsEtc {
        let dir = PathBuf::from("/etc/netns").join(ns);
        fs::create_dir_all(&dir).expect("create /etc/netns/NS");
        let etc = NetnsEtc { dir };
        for (name, text) in files {
            fs::write(etc.dir.join(name), text).expect("write a namespace's /etc file");
        }
        etc
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Whether `tool` is installed; otherwise prints why the test is skipped (or panics in
/// CI, where .ci/test installs it).
pub fn tool_or_skip(tool: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    found_or_skip(found, tool, "apt-get install it", test)
}

fn ip_available() -> bool {
    Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Runs a command to completion and returns its stdout; panics with its
/// stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = output_of(program, args);
    assert!(
        output.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a command to completion and returns its stdout if it succeeded: for probes of
/// what another process is still setting up (a namespace is listed before it can be
/// entered).
pub fn try_run(program: &str, args: &[&str]) -> Option<String> {
    let output = output_of(program, args);
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn output_of(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs `ip` with a whitespace-separated argument string (none of our
/// arguments contain spaces).
pub fn ip(args: &str) -> String {
    run("ip", &args.split_whitespace().collect::<Vec<_>>())
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns
/// whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Joins a thread, re-raising its panic so the original message reaches the
/// test output.
pub fn join<T>(handle: JoinHandle<T>) -> T {
    handle.join().unwrap_or_else(|e| panic::resume_unwind(e))
}

/// Runs `f` on a new thread that has joined network namespace `ns`; sockets
/// it creates live in that namespace. Threads spawned from inside `f` inherit
/// the namespace too.
pub fn in_netns<T, F>(ns: &str, f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let path = format!("{NETNS_DIR}/{ns}");
    thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            let ns_file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(&ns_file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .expect("spawn namespace thread")
}

/// Two namespaces, `upx-c-*` (client, runs the proxy) and `upx-s-*`
/// (server), joined by veth `vc<N>` (10.201.N.1, fd00:201:N::1) <->
/// `vs<N>` (10.201.N.2, fd00:201:N::2). Routed, a third one, `upx-r-*`, forwards
/// between them: `vc<N>` <-> `rc<N>` (10.201.N.254, fd00:201:N::fe) and
/// `rs<N>` (10.202.N.254, fd00:202:N::fe) <-> `vs<N>` (10.202.N.2, fd00:202:N::2),
/// each end's default route via the router, so the two ends are off-link, as a
/// real server's clients are. Deleted on drop.
pub struct Topology {
    n: u32,
    client_ns: String,
    server_ns: String,
    router_ns: Option<String>,
    client_veth: String,
    server_veth: String,
    /// The policy rules sending the server addresses to the TUN's table are in place
    /// (they outlive a proxy; its TUN's routes do not).
    rules_added: std::cell::Cell<bool>,
}

/// Serialises `ip netns add`/`del`: the first `ip netns add` on a machine
/// sets up the shared mount on /var/run/netns, and concurrent first calls
/// would stack mounts on top of each other.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

impl Topology {
    /// Creates a topology for `test`, or returns None after printing a skip
    /// notice when the test cannot run here (see [`privileged_or_skip`]).
    pub fn for_test(test: &str) -> Option<Topology> {
        privileged_or_skip(test).then(|| Topology::build(false))
    }

    /// Like [`Topology::for_test`], with a router namespace between client and server.
    pub fn routed_for_test(test: &str) -> Option<Topology> {
        privileged_or_skip(test).then(|| Topology::build(true))
    }

    pub fn new() -> Topology {
        Topology::build(false)
    }

    fn build(routed: bool) -> Topology {
        static REAP: Once = Once::new();
        REAP.call_once(reap_stale_namespaces);

        // N keeps subnets and veth names distinct between the topologies of
        // concurrently running tests; the namespace names add the pid and a
        // time-derived suffix so that other test processes and leftovers of
        // killed runs cannot collide with them.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        let n = seq % 254 + 1;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let suffix = format!("{}-{seq}-{:04x}", std::process::id(), nanos & 0xffff);
        // Construct first so that Drop cleans up whatever setup managed to
        // create before a failure.
        let topo = Topology {
            n,
            client_ns: format!("upx-c-{suffix}"),
            server_ns: format!("upx-s-{suffix}"),
            router_ns: routed.then(|| format!("upx-r-{suffix}")),
            client_veth: format!("vc{n}"),
            server_veth: format!("vs{n}"),
            rules_added: std::cell::Cell::new(false),
        };
        topo.setup();
        topo
    }

    fn setup(&self) {
        let (c, s) = (self.client_ns.as_str(), self.server_ns.as_str());
        let (vc, vs) = (self.client_veth.as_str(), self.server_veth.as_str());
        let router = self.router_ns.as_deref();
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            for ns in [Some(c), Some(s), router].into_iter().flatten() {
                ip(&format!("netns add {ns}"));
            }
        }
        // New namespaces inherit the host's IPv4 rp_filter. Our policy route
        // sends the server address into the TUN while the proxy's replies
        // from that address arrive on the veth, which strict reverse-path
        // filtering would drop.
        ip(&format!(
            "netns exec {c} sysctl -qw \
             net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0"
        ));
        // Every veth end: namespace, device, IPv4 and IPv6 address.
        let mut ends = vec![
            (c, vc.to_string(), self.client_v4(), self.client_v6()),
            (s, vs.to_string(), self.server_v4(), self.server_v6()),
        ];
        // Create the ends directly inside their namespaces so the names never
        // meet those of other processes in the root namespace.
        match router {
            None => {
                ip(&format!(
                    "-n {c} link add {vc} type veth peer name {vs} netns {s}"
                ));
            }
            Some(r) => {
                let n = self.n;
                let (rc, rs) = (format!("rc{n}"), format!("rs{n}"));
                ip(&format!(
                    "-n {c} link add {vc} type veth peer name {rc} netns {r}"
                ));
                ip(&format!(
                    "-n {s} link add {vs} type veth peer name {rs} netns {r}"
                ));
                ends.push((r, rc, self.gateway(c), self.gateway6(c)));
                ends.push((r, rs, self.gateway(s), self.gateway6(s)));
                ip(&format!(
                    "netns exec {r} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
                ));
            }
        };
        for (ns, dev, v4, v6) in &ends {
            ip(&format!("-n {ns} addr add {v4}/24 dev {dev}"));
            // nodad: the address is usable at once instead of after DAD.
            ip(&format!("-n {ns} addr add {v6}/64 dev {dev} nodad"));
            ip(&format!("-n {ns} link set lo up"));
            ip(&format!("-n {ns} link set {dev} up"));
        }
        if router.is_some() {
            for ns in [c, s] {
                ip(&format!(
                    "-n {ns} route add default via {}",
                    self.gateway(ns)
                ));
                ip(&format!(
                    "-n {ns} -6 route add default via {}",
                    self.gateway6(ns)
                ));
            }
        }
        // Until the kernel's link watcher has processed carrier-up (which
        // can take up to a second), a veth end silently drops what it sends,
        // e.g. the first neighbour advertisement, costing a full SYN
        // retransmission timeout. Operational state UP is set in the same
        // step, so wait for it on every end.
        for (ns, dev, _, _) in &ends {
            let up = wait_until(EVENT_DEADLINE, || {
                link_json(ns, dev).is_some_and(|json| json.contains(r#""operstate":"UP""#))
            });
            assert!(up, "{dev} in {ns} not operationally up after 30 s");
        }
    }

    /// The router's address on the subnet of `ns` (the client's or the server's).
    fn gateway(&self, ns: &str) -> IpAddr {
        let subnet = if ns == self.client_ns { 201 } else { 202 };
        self.addr(&format!("10.{subnet}.{}.254", self.n))
    }

    fn gateway6(&self, ns: &str) -> IpAddr {
        let subnet = if ns == self.client_ns { 201 } else { 202 };
        self.addr(&format!("fd00:{subnet}:{}::fe", self.n))
    }

    pub fn client_ns(&self) -> &str {
        &self.client_ns
    }

    /// Whether the proxy's TUN exists in the client namespace.
    pub fn tun_exists(&self) -> bool {
        link_json(&self.client_ns, TUN_NAME).is_some()
    }

    pub fn server_ns(&self) -> &str {
        &self.server_ns
    }

    pub fn client_veth(&self) -> &str {
        &self.client_veth
    }

    pub fn server_veth(&self) -> &str {
        &self.server_veth
    }

    pub fn tun_name(&self) -> &str {
        TUN_NAME
    }

    pub fn client_v4(&self) -> IpAddr {
        self.addr(&format!("10.201.{}.1", self.n))
    }

    pub fn client_v6(&self) -> IpAddr {
        self.addr(&format!("fd00:201:{}::1", self.n))
    }

    pub fn server_v4(&self) -> IpAddr {
        self.addr(&format!("10.{}.{}.2", self.server_subnet(), self.n))
    }

    pub fn server_v6(&self) -> IpAddr {
        self.addr(&format!("fd00:{}:{}::2", self.server_subnet(), self.n))
    }

    /// Routed, the server has a subnet of its own.
    fn server_subnet(&self) -> u32 {
        if self.router_ns.is_some() { 202 } else { 201 }
    }

    fn addr(&self, text: &str) -> IpAddr {
        text.parse().expect("valid topology address")
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T, F>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        in_netns(&self.client_ns, f)
    }

    /// Runs `f` on a thread inside the server namespace.
    pub fn in_server<T, F>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        in_netns(&self.server_ns, f)
    }

    /// Listens on `ip` (kernel-chosen port) in the server namespace, accepts
    /// exactly `conns` connections and runs `handler` on each one in its own
    /// thread. `::` listens on both families.
    pub fn serve<T, F>(&self, ip: IpAddr, conns: usize, handler: F) -> Server<T>
    where
        F: Fn(TcpStream) -> T + Send + Sync + 'static,
        T: Send + 'static,
    {
        serve_in(&self.server_ns, ip, conns, handler)
    }

    /// Like [`Topology::serve`], in the client namespace: a server on the proxy's host.
    pub fn serve_in_client<T, F>(&self, ip: IpAddr, conns: usize, handler: F) -> Server<T>
    where
        F: Fn(TcpStream) -> T + Send + Sync + 'static,
        T: Send + 'static,
    {
        serve_in(&self.client_ns, ip, conns, handler)
    }

    /// Spawns the proxy in the client namespace with `-i iface --tun <tun>`
    /// plus `extra_args`, without waiting for it to come up.
    pub fn spawn_proxy(&self, iface: &str, extra_args: &[&str]) -> Proxy {
        self.spawn_proxy_with_env(iface, extra_args, &[])
    }

    /// Like [`Topology::spawn_proxy`], with extra environment variables.
    pub fn spawn_proxy_with_env(
        &self,
        iface: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Proxy {
        self.spawn_proxy_launched(TUN_NAME, &[], iface, extra_args, env)
    }

    /// Like [`Topology::spawn_proxy_with_env`], started through `wrapper`, a command
    /// that execs the rest of its arguments (e.g. `setpriv ... --`).
    pub fn spawn_proxy_wrapped(
        &self,
        wrapper: &[&str],
        iface: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Proxy {
        self.spawn_proxy_launched(TUN_NAME, wrapper, iface, extra_args, env)
    }

    /// Starts a proxy with TUN `tun` and its default control socket
    /// (/run/uringproxy/<tun>.sock; the other ways of starting one give it a socket of
    /// its own in the temporary directory), and waits for its TUN to be up.
    pub fn start_proxy_default_control(&self, tun: &str, extra_args: &[&str]) -> Proxy {
        let proxy = self.spawn_proxy_default_control(tun, extra_args);
        self.wait_for_tun_named(tun, proxy)
    }

    /// Like [`Topology::start_proxy_default_control`], without waiting for anything.
    pub fn spawn_proxy_default_control(&self, tun: &str, extra_args: &[&str]) -> Proxy {
        self.launch(tun, &[], &self.client_veth, extra_args, &[], false)
    }

    /// Like [`Topology::spawn_proxy_with_env`], with TUN `tun` (for a second proxy).
    pub fn spawn_proxy_on(
        &self,
        tun: &str,
        iface: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Proxy {
        self.spawn_proxy_launched(tun, &[], iface, extra_args, env)
    }

    /// Spawns a proxy with TUN `tun`, through `wrapper` (empty: none), with a control
    /// socket of its own unless `extra_args` name one.
    fn spawn_proxy_launched(
        &self,
        tun: &str,
        wrapper: &[&str],
        iface: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Proxy {
        let own_control = !extra_args.contains(&"--control");
        self.launch(tun, wrapper, iface, extra_args, env, own_control)
    }

    /// Spawns a proxy; `own_control` gives it `--control` in the temporary directory.
    /// Tests in other namespaces use the same TUN name at once, so the default path,
    /// derived from it, would be taken by whichever started first.
    fn launch(
        &self,
        tun: &str,
        wrapper: &[&str],
        iface: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
        own_control: bool,
    ) -> Proxy {
        // One log per proxy, also when a test runs several at once.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}.{tun}.{seq}.proxy.log", self.client_ns);
        let stderr_path = std::env::temp_dir().join(name);
        let control_path = own_control
            .then(|| std::env::temp_dir().join(format!("{}.{tun}.{seq}.sock", self.client_ns)));
        let mut command: Vec<&OsStr> = wrapper.iter().map(OsStr::new).collect();
        command.push(OsStr::new(PROXY_BIN));
        command.extend(["-i", iface, "--tun", tun].map(OsStr::new));
        if let Some(path) = &control_path {
            command.extend([OsStr::new("--control"), path.as_os_str()]);
        }
        command.extend(extra_args.iter().map(OsStr::new));
        spawn_logged(
            &self.client_ns,
            &command,
            env,
            stderr_path,
            control_path.clone(),
        )
    }

    /// Starts the proxy on the client veth, waits for its TUN to be up and
    /// routes both server addresses into it.
    pub fn start_proxy(&self, extra_args: &[&str]) -> Proxy {
        self.start_proxy_with_env(extra_args, &[])
    }

    /// Like [`Topology::start_proxy`], with extra environment variables.
    pub fn start_proxy_with_env(&self, extra_args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let proxy = self.start_proxy_unrouted(extra_args, env);
        self.route_servers_into_tun();
        proxy
    }

    /// Routes both server addresses into the running proxy's TUN. Only connections to
    /// them go through the proxy. Its own outbound sockets are bound to the veth, so
    /// the lookup in this table (whose route points at the TUN) fails for them and
    /// falls through to the main table.
    pub fn route_servers_into_tun(&self) {
        let c = self.client_ns.as_str();
        for (family, server) in [("-4", self.server_v4()), ("-6", self.server_v6())] {
            if !self.rules_added.get() {
                ip(&format!(
                    "-n {c} {family} rule add to {server} table {ROUTE_TABLE}"
                ));
            }
            ip(&format!(
                "-n {c} {family} route add default dev {TUN_NAME} table {ROUTE_TABLE}"
            ));
        }
        self.rules_added.set(true);
    }

    /// Routes address `.{last_octet}` of the server's IPv4 subnet, where no host answers,
    /// into the TUN (same table as the server addresses) and returns it.
    pub fn route_absent_host(&self, last_octet: u8) -> IpAddr {
        let IpAddr::V4(server) = self.server_v4() else {
            unreachable!("server_v4 is IPv4")
        };
        let [a, b, c, _] = server.octets();
        let absent = IpAddr::from([a, b, c, last_octet]);
        ip(&format!(
            "-n {} rule add to {absent} table {ROUTE_TABLE}",
            self.client_ns
        ));
        absent
    }

    /// Starts the proxy and waits for its TUN to be up, without routing anything into
    /// it (for tests of the proxy's own `--route`).
    pub fn start_proxy_unrouted(&self, extra_args: &[&str], env: &[(&str, &str)]) -> Proxy {
        self.start_proxy_on(TUN_NAME, extra_args, env)
    }

    /// Like [`Topology::start_proxy_unrouted`], with TUN `tun` (for a second proxy).
    pub fn start_proxy_on(&self, tun: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Proxy {
        self.wait_for_tun_named(
            tun,
            self.spawn_proxy_on(tun, &self.client_veth, extra_args, env),
        )
    }

    /// Waits for the TUN of a spawned `proxy` to be up.
    pub fn wait_for_tun(&self, proxy: Proxy) -> Proxy {
        self.wait_for_tun_named(TUN_NAME, proxy)
    }

    /// Waits for TUN `tun` of a spawned `proxy` to be up.
    fn wait_for_tun_named(&self, tun: &str, mut proxy: Proxy) -> Proxy {
        let c = self.client_ns.as_str();
        let tun_up = wait_until(PROXY_STARTUP_TIMEOUT, || {
            proxy.assert_running();
            // Exact flag match: `"UP"` is not a substring of `"LOWER_UP"`.
            link_json(c, tun).is_some_and(|json| json.contains(r#""UP""#))
        });
        // The proxy's output is printed when it is dropped during the panic.
        assert!(tun_up, "TUN {tun} not up after {PROXY_STARTUP_TIMEOUT:?}");
        if let Some(path) = &proxy.control_path {
            wait_for_control(path);
        }
        proxy
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let router = self.router_ns.iter();
        for ns in [&self.client_ns, &self.server_ns].into_iter().chain(router) {
            delete_namespace(ns);
        }
    }
}

/// Adds network namespace `ns` (serialised as the topologies' are, after reaping those
/// of killed runs), with its loopback up: for tests that build a topology of their own.
/// Names of the form `upx-[csr]-<pid>-...` are reaped when a killed run leaves them.
pub fn add_namespace(ns: &str) {
    static REAP: Once = Once::new();
    REAP.call_once(reap_stale_namespaces);
    {
        let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        ip(&format!("netns add {ns}"));
    }
    ip(&format!("-n {ns} link set lo up"));
}

/// Deletes namespace `ns`; never panics (it runs in Drop guards, maybe while unwinding).
pub fn delete_namespace(ns: &str) {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    match Command::new("ip").args(["netns", "del", ns]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "warning: ip netns del {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        ),
        Err(e) => eprintln!("warning: ip netns del {ns}: {e}"),
    }
}

/// Spawns the proxy in namespace `ns` with exactly `args` (its log in the temporary
/// directory), without waiting for it to come up: for topologies built by the test.
pub fn spawn_proxy_in(ns: &str, args: &[&str]) -> Proxy {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seq = NEXT.fetch_add(1, Ordering::Relaxed);
    let stderr_path = std::env::temp_dir().join(format!("{ns}.{seq}.proxy.log"));
    let control_path = args
        .iter()
        .position(|&arg| arg == "--control")
        .and_then(|at| args.get(at + 1))
        .map(PathBuf::from);
    let command: Vec<&OsStr> = std::iter::once(PROXY_BIN)
        .chain(args.iter().copied())
        .map(OsStr::new)
        .collect();
    spawn_logged(ns, &command, &[], stderr_path, control_path)
}

/// Runs `command` (the proxy, or a wrapper that execs it) in namespace `ns` with its
/// output to a new log at `stderr_path`. `ip netns exec` (and the wrapper) exec the
/// proxy, so the child's pid is the proxy's.
fn spawn_logged(
    ns: &str,
    command: &[&OsStr],
    env: &[(&str, &str)],
    stderr_path: PathBuf,
    control_path: Option<PathBuf>,
) -> Proxy {
    let log = File::create(&stderr_path)
        .unwrap_or_else(|e| panic!("create {}: {e}", stderr_path.display()));
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(command)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {PROXY_BIN}: {e}"));
    Proxy {
        child,
        stderr_path,
        control_path,
    }
}

/// Listens on `ip` (kernel-chosen port) in namespace `ns`, accepts exactly `conns`
/// connections and runs `handler` on each one in its own thread.
fn serve_in<T, F>(ns: &str, ip: IpAddr, conns: usize, handler: F) -> Server<T>
where
    F: Fn(TcpStream) -> T + Send + Sync + 'static,
    T: Send + 'static,
{
    let listener = join(in_netns(ns, move || listen(SocketAddr::new(ip, 0), conns)));
    // Linux bounds accept() by SO_RCVTIMEO, so a client that never
    // arrives fails the test instead of hanging it.
    SockRef::from(&listener)
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("set accept timeout");
    let addr = listener.local_addr().expect("listener address");
    let acceptor = thread::spawn(move || {
        thread::scope(|scope| {
            let handler = &handler;
            let handles: Vec<_> = (0..conns)
                .map(|i| {
                    let (stream, _) = listener
                        .accept()
                        .unwrap_or_else(|e| panic!("accept #{i} on {addr}: {e}"));
                    set_timeouts(&stream);
                    scope.spawn(move || handler(stream))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| panic::resume_unwind(e)))
                .collect()
        })
    });
    Server { addr, acceptor }
}

/// A listener at `addr` whose accept queue holds `conns` connections (std's
/// `TcpListener::bind` allows 128). Tests open up to thousands at once, and the thread
/// that accepts them falls behind on a loaded machine: with a short queue the server's
/// kernel then drops handshakes and answers with SYN cookies, and a data segment after a
/// dropped cookie ACK fails validation and is reset (nstat: TcpExtListenOverflows,
/// TcpExtSyncookiesFailed = TcpOutRsts). The proxy rightly relays that reset to its
/// client, and its connects stalled meanwhile count against `--max-half-open`.
fn listen(addr: SocketAddr, conns: usize) -> TcpListener {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.cloexec(),
        None,
    )
    .expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket
        .bind(&addr.into())
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let backlog = i32::try_from(conns).map_or(i32::MAX, |n| n.max(128));
    socket.listen(backlog).expect("listen");
    socket.into()
}

/// Waits for a proxy's control socket at `path` to take connections: it is made just
/// after the TUN (a second later when it replaces a socket left behind).
pub fn wait_for_control(path: &Path) {
    let listening = wait_until(PROXY_STARTUP_TIMEOUT, || {
        std::os::unix::net::UnixStream::connect(path).is_ok()
    });
    assert!(
        listening,
        "no control socket at {} after {PROXY_STARTUP_TIMEOUT:?}",
        path.display()
    );
}

/// `ip -j link show` output for `dev` in `ns`, or None if there is no such
/// link (yet).
fn link_json(ns: &str, dev: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", "dev", dev])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes `upx-[csr]-<pid>-*` namespaces whose creating process is gone,
/// left behind by test runs that were killed before their Drop guards ran.
fn reap_stale_namespaces() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("upx-c-")
            .or_else(|| name.strip_prefix("upx-s-"))
            .or_else(|| name.strip_prefix("upx-r-"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().filter(|p| !p.is_empty()) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A server started by [`Topology::serve`].
pub struct Server<T> {
    addr: SocketAddr,
    acceptor: JoinHandle<Vec<T>>,
}

impl<T> Server<T> {
    /// The listening address; with an unspecified listen address only the
    /// port is meaningful.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Waits for all handlers and returns their results in accept order.
    pub fn join(self) -> Vec<T> {
        join(self.acceptor)
    }
}

/// The running proxy. Killed (SIGKILL) and reaped on drop; its output is
/// printed then if the test is failing, so panic messages need not repeat it.
pub struct Proxy {
    child: Child,
    stderr_path: PathBuf,
    /// The control socket the harness gave it, if it did.
    control_path: Option<PathBuf>,
}

impl Proxy {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The control socket the harness gave it (panics for one started without).
    pub fn control_path(&self) -> &Path {
        self.control_path
            .as_deref()
            .expect("a proxy started with its own --control")
    }

    /// Number of open file descriptors of the proxy process.
    pub fn fd_count(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.pid());
        fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {dir}: {e}"))
            .count()
    }

    /// Fd count once it has stopped changing (ten equal samples in a row, at
    /// most 5 s), for a baseline that excludes connections still closing.
    pub fn settled_fd_count(&self) -> usize {
        let mut last = self.fd_count();
        let mut stable = 0;
        wait_until(Duration::from_secs(5), || {
            let now = self.fd_count();
            stable = if now == last { stable + 1 } else { 0 };
            last = now;
            stable >= 10
        });
        last
    }

    /// Everything the proxy wrote to stderr (and stdout) so far.
    pub fn stderr(&self) -> String {
        fs::read(&self.stderr_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.stderr_path.display()))
    }

    /// Asks the proxy for its counters (SIGUSR1) and returns its output once the
    /// new report is complete (its last line starts with `drops:`).
    pub fn stats(&self) -> String {
        let reports = |text: &str| text.matches("drops:").count();
        let before = reports(&self.stderr());
        self.signal(nix::sys::signal::Signal::SIGUSR1);
        let printed = wait_until(EVENT_DEADLINE, || reports(&self.stderr()) > before);
        assert!(printed, "no counters printed after SIGUSR1");
        self.stderr()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, signal).unwrap_or_else(|e| panic!("send {signal}: {e}"));
    }

    /// Sends SIGTERM, asserts a clean exit within `EVENT_DEADLINE` and returns how long it
    /// took.
    pub fn terminate(&mut self) -> Duration {
        let start = Instant::now();
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self
            .wait_exit(EVENT_DEADLINE)
            .expect("no exit after SIGTERM");
        assert!(status.success(), "exit status {status}");
        start.elapsed()
    }

    /// Resident memory of the proxy (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:").expect("VmRSS of the proxy")
    }

    /// Panics with the proxy's output if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("poll proxy") {
            panic!("proxy exited unexpectedly ({status})");
        }
    }

    /// Waits up to `timeout` for the proxy to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().expect("poll proxy");
            status.is_some()
        });
        status
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "--- proxy output ({}) ---\n{}--- end of proxy output ---",
                self.stderr_path.display(),
                self.stderr()
            );
        } else {
            let _ = fs::remove_file(&self.stderr_path);
        }
        // What a killed proxy leaves behind.
        if let Some(path) = &self.control_path {
            let _ = fs::remove_file(path);
        }
    }
}

/// The `uringproxy: error:` lines of a proxy's output (a start-up error is exactly one).
pub fn error_lines(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|line| line.starts_with("uringproxy: error:"))
        .collect()
}

/// A proxy's output without the warnings of the test overrides (URINGPROXY_MAX_URING,
/// URINGPROXY_MAX_OFFLOAD), which .ci/test sets for a whole second run of the suite:
/// the lines a test of the proxy's own messages compares.
pub fn without_override_warnings(output: &str) -> impl Iterator<Item = &str> {
    output
        .lines()
        .filter(|line| !line.starts_with("uringproxy: warn: URINGPROXY_MAX_"))
}

/// A KiB figure from /proc/<pid>/status, such as `VmRSS:`.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Applies [`IO_TIMEOUT`] to both directions of `stream`.
pub fn set_timeouts(stream: &TcpStream) {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("set read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("set write timeout");
}

/// Connects (from the calling thread's namespace) with timeouts applied.
pub fn try_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    set_timeouts(&stream);
    Ok(stream)
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    try_connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// Closes `stream` with an RST instead of a FIN (SO_LINGER 0).
pub fn abort(stream: TcpStream) {
    SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("set SO_LINGER 0");
    drop(stream);
}

/// Whether `e` is a socket timeout rather than a real failure.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Echoes everything it reads until EOF, then closes its write side.
pub fn echo(stream: TcpStream) -> u64 {
    let bytes = io::copy(&mut &stream, &mut &stream).expect("echo");
    stream.shutdown(Shutdown::Write).expect("echo shutdown");
    bytes
}

/// Length and SHA-256 of a byte stream.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Transfer {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

impl fmt::Debug for Transfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex: String = self.sha256.iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "Transfer {{ bytes: {}, sha256: {hex} }}", self.bytes)
    }
}

/// Running length and hash of a stream.
struct Tally {
    bytes: u64,
    hasher: Sha256,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            bytes: 0,
            hasher: Sha256::new(),
        }
    }

    fn add(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        self.hasher.update(data);
    }

    fn finish(self) -> Transfer {
        Transfer {
            bytes: self.bytes,
            sha256: self.hasher.finalize().into(),
        }
    }
}

/// Deterministic pseudo-random byte stream of a given length (xorshift64),
/// produced chunk by chunk so large payloads never sit in memory.
struct Payload {
    state: u64,
    remaining: u64,
}

impl Payload {
    fn new(seed: u64, len: u64) -> Payload {
        // One splitmix64 step: turns small consecutive seeds into unrelated
        // xorshift states, and `| 1` avoids the all-zero fixed point.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Payload {
            state: (z ^ (z >> 31)) | 1,
            remaining: len,
        }
    }

    /// Fills and returns the next chunk, or None at the end. Chunks are
    /// always CHUNK bytes except the last, so the stream depends only on
    /// the seed and length.
    fn next_chunk<'a>(&mut self, buf: &'a mut [u8; CHUNK]) -> Option<&'a [u8]> {
        if self.remaining == 0 {
            return None;
        }
        let len = usize::try_from(self.remaining).map_or(CHUNK, |r| r.min(CHUNK));
        for word in buf[..len].chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            word.copy_from_slice(&self.state.to_le_bytes()[..word.len()]);
        }
        self.remaining -= len as u64;
        Some(&buf[..len])
    }
}

/// The length and hash of payload `seed` without sending it.
pub fn payload_digest(seed: u64, len: u64) -> Transfer {
    let mut payload = Payload::new(seed, len);
    let mut buf = [0; CHUNK];
    let mut tally = Tally::new();
    while let Some(chunk) = payload.next_chunk(&mut buf) {
        tally.add(chunk);
    }
    tally.finish()
}

/// Writes `len` bytes of payload `seed`; returns what was sent.
pub fn send_payload(out: &mut impl Write, seed: u64, len: u64) -> Transfer {
    let mut payload = Payload::new(seed, len);
    let mut buf = [0; CHUNK];
    let mut tally = Tally::new();
    while let Some(chunk) = payload.next_chunk(&mut buf) {
        out.write_all(chunk)
            .unwrap_or_else(|e| panic!("send failed after {} of {len} bytes: {e}", tally.bytes));
        tally.add(chunk);
    }
    tally.finish()
}

/// Reads until EOF and returns what was received, or the first read error
/// (a timeout shows up as [`is_timeout`]).
pub fn try_recv_to_end(input: &mut impl Read) -> io::Result<Transfer> {
    let mut buf = vec![0; CHUNK];
    let mut tally = Tally::new();
    loop {
        match input.read(&mut buf) {
            Ok(0) => return Ok(tally.finish()),
            Ok(n) => {
                tally.add(&buf[..n]);
                assert!(
                    tally.bytes <= MAX_TRANSFER,
                    "received more than {MAX_TRANSFER} bytes"
                );
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

pub fn recv_to_end(input: &mut impl Read) -> Transfer {
    try_recv_to_end(input).unwrap_or_else(|e| panic!("receive failed: {e}"))
}

/// Sends payload `seed` on `stream` and half-closes it while concurrently
/// reading whatever comes back until EOF, so an echo peer can never
/// deadlock us on full buffers. Returns (sent, received).
pub fn exchange(stream: TcpStream, seed: u64, len: u64) -> (Transfer, Transfer) {
    let mut writer = stream.try_clone().expect("clone stream");
    let sender = thread::spawn(move || {
        let sent = send_payload(&mut writer, seed, len);
        writer.shutdown(Shutdown::Write).expect("shutdown write");
        sent
    });
    let mut reader = stream;
    let received = recv_to_end(&mut reader);
    (join(sender), received)
}

/// One connection to `ip`: the client sends `request` bytes and half-closes; only then
/// does the server answer with `response` bytes and close. Checks both hashes.
pub fn request_after_half_close(topo: &Topology, ip: IpAddr, request: u64, response: u64) {
    let server = topo.serve(ip, 1, move |mut stream| {
        let received = recv_to_end(&mut stream);
        (received, send_payload(&mut stream, 2, response))
    });
    let addr = server.addr();
    let (request_sent, response_received) = join(topo.in_client(move || {
        let mut stream = connect(addr);
        let sent = send_payload(&mut stream, 1, request);
        stream.shutdown(Shutdown::Write).expect("shutdown write");
        (sent, recv_to_end(&mut stream))
    }));
    let (request_received, response_sent) = server.join()[0];
    assert_eq!(request_received, request_sent, "request via {ip}");
    assert_eq!(response_received, response_sent, "response via {ip}");
}

// Datagram helpers shared by e2e_udp and e2e_socks.

/// Binds a UDP socket in the server namespace on `port` (both families) and echoes every
/// datagram until `deadline`.
pub fn udp_echo_server(topo: &Topology, port: u16, deadline: Duration) {
    let (ready, is_ready) = mpsc::channel();
    topo.in_server(move || {
        let socket = UdpSocket::bind((ANY, port)).expect("bind echo server");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        ready.send(()).unwrap();
        let end = Instant::now() + deadline;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < end {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        }
    });
    is_ready.recv().expect("echo server started");
}

/// A UDP socket in the calling thread's namespace, connected to `server`, its receives
/// bounded by `timeout`.
pub fn udp_client(server: SocketAddr, timeout: Duration) -> UdpSocket {
    let bind: IpAddr = if server.is_ipv4() {
        [0, 0, 0, 0].into()
    } else {
        ANY
    };
    let socket = UdpSocket::bind((bind, 0)).expect("bind client");
    socket.connect(server).expect("connect");
    socket.set_read_timeout(Some(timeout)).unwrap();
    socket
}

/// Sends `payload` and waits for it to come back, retrying a lost datagram twice.
pub fn echo_once(socket: &UdpSocket, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    for _ in 0..3 {
        socket.send(payload).expect("send");
        if let Ok(n) = socket.recv(&mut buf) {
            return buf[..n].to_vec();
        }
    }
    panic!("no echo of {} bytes after 3 tries", payload.len());
}

/// A DNS query for `name` (type A, class IN) with transaction `id`.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut msg = Vec::new();
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; 1 question
    for label in name.split('.') {
        msg.push(label.len() as u8);
        msg.extend_from_slice(label.as_bytes());
    }
    msg.extend_from_slice(&[0, 0, 1, 0, 1]);
    msg
}

/// The address the test responder gives `name`: derived from its bytes.
pub fn answer_for(question: &[u8]) -> [u8; 4] {
    let sum = question
        .iter()
        .fold(17u32, |acc, &b| acc.wrapping_mul(31).wrapping_add(b.into()));
    [10, (sum >> 16) as u8, (sum >> 8) as u8, sum as u8]
}

/// The response to a query built by `dns_query`: same id and question, one A record.
pub fn dns_response(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 17 {
        return None;
    }
    let question = &query[12..];
    let mut msg = Vec::new();
    msg.extend_from_slice(&query[..2]);
    msg.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]); // response, 1 answer
    msg.extend_from_slice(question);
    msg.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]); // name ptr, A, IN, TTL, len
    msg.extend_from_slice(&answer_for(question));
    Some(msg)
}

/// Checks `response` answers `query` and returns its transaction id.
pub fn check_response(query: &[u8], response: &[u8]) -> u16 {
    assert!(response.len() >= query.len() + 16, "short response");
    assert_eq!(&response[..2], &query[..2], "transaction id");
    assert_eq!(&response[12..query.len()], &query[12..], "question echoed");
    assert_eq!(
        &response[response.len() - 4..],
        &answer_for(&query[12..]),
        "A record"
    );
    u16::from_be_bytes([query[0], query[1]])
}

/// Runs `ping` in the client namespace; returns whether it succeeded and its output.
pub fn ping(topo: &Topology, target: IpAddr, count: u32) -> (bool, String) {
    let count = count.to_string();
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            topo.client_ns(),
            "ping",
            "-n",
            "-c",
            &count,
        ])
        .args(["-i", "0.2", "-W", "1", &target.to_string()])
        .output()
        .expect("run ping (iputils-ping)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}
