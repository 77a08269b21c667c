//! End-to-end benchmark: every scenario on the direct path and through each proxy,
//! interleaved, in two network namespaces this program builds and removes.
//!
//! Run as root: `cargo bench --bench e2e` (`-- --help` lists the options). A Markdown
//! table goes to stdout, progress to stderr, raw results (JSON) and SVG charts to
//! `target/bench-e2e/`.
#![deny(unsafe_code)]

#[path = "../../tests/common/mod.rs"]
mod common;
mod load;
mod peer;
mod procfs;
mod report;
mod shape;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use argh::FromArgs;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;

use common::{PROXY_BIN, ROUTE_TABLE, Topology, wait_until};
use load::{Meter, Sample};
use peer::Ends;
use shape::Shaping;

/// The server port that answers start-up probes (one byte echoed, then closed).
const PROBE_PORT: u16 = 5000;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Where proxies put their control sockets by default.
const CONTROL_DIR: &str = "/run/uringproxy";

/// End-to-end benchmark of uringproxy against the direct path (run as root).
#[derive(FromArgs)]
struct Args {
    /// seconds per scenario run (default 5)
    #[argh(option, default = "5.0")]
    seconds: f64,
    /// rounds of every scenario; the median is reported (default 2)
    #[argh(option, default = "2")]
    rounds: usize,
    /// another TUN proxy to run through the same scenarios, as a shell command in the
    /// client namespace; {tun} and {iface} are replaced by the TUN name it must create
    /// and the interface its outbound sockets must bind to, {uringproxy} by this
    /// checkout's binary (repeatable)
    #[argh(option)]
    compare: Vec<String>,
    /// a user-space stack that is no TUN proxy to run through the same scenarios:
    /// `pasta` or `slirp4netns`; it serves a child namespace of the client namespace
    /// through its own tap device, and the clients run there (repeatable)
    #[argh(option)]
    peer: Vec<String>,
    /// of uringproxy's own paths run only the default one (no --no-offload, single-read
    /// or --upstream runs): for comparisons with --compare and --peer
    #[argh(switch)]
    default_path_only: bool,
    /// comma-separated scenarios to run (default: all)
    #[argh(option)]
    only: Option<String>,
    /// offered rate of udp-echo, datagrams/s (default 50000)
    #[argh(option, default = "50000")]
    udp_rate: u64,
    /// emulate a link of this rate (tc units: 1gbit, 500mbit) with a tbf qdisc on both
    /// veth ends, for every path including the direct one; removed before the resource
    /// figures
    #[argh(option)]
    rate: Option<String>,
    /// offered load of udp-up and udp-down, % of the line rate (--rate, or 1 Gbit/s
    /// without it) counted in bytes on the wire (default 95)
    #[argh(option, default = "95.0")]
    udp_load: f64,
    /// TCP downloads whose clients stop reading, for the stalled-flows RSS figure
    /// (default 500)
    #[argh(option, default = "500")]
    stalled: usize,
    /// udp-up and udp-down senders use UDP GSO as QUIC stacks do: 1,350-byte datagrams,
    /// 44 to a sendmsg with a UDP_SEGMENT control message (receivers stay plain)
    #[argh(switch)]
    udp_gso: bool,
    /// run against the server's IPv6 address instead of its IPv4 one
    #[argh(switch)]
    ipv6: bool,
    /// skip the resource figures (start-up, idle RSS, idle flows, wake-ups)
    #[argh(switch)]
    no_resources: bool,
    /// run each scenario 0.3 s, one round, small resource figures: proves the harness
    /// works, measures nothing
    #[argh(switch)]
    smoke: bool,
    /// also copy the SVG charts into this directory (e.g. bench/charts)
    #[argh(option)]
    charts: Option<PathBuf>,
    /// passed by `cargo bench`; ignored
    #[argh(switch)]
    #[allow(dead_code)]
    bench: bool,
}

/// The scenarios, in the order they run and are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    TcpUp1,
    TcpDown1,
    TcpUp4,
    TcpDown4,
    TcpUp8,
    TcpDown8,
    Rr,
    Rr8x1k,
    Crr,
    UdpEcho,
    UdpUp,
    UdpDown,
    DnsFake,
    DnsFakeCached,
}

impl Scenario {
    pub const ALL: [Scenario; 14] = [
        Scenario::TcpUp1,
        Scenario::TcpDown1,
        Scenario::TcpUp4,
        Scenario::TcpDown4,
        Scenario::TcpUp8,
        Scenario::TcpDown8,
        Scenario::Rr,
        Scenario::Rr8x1k,
        Scenario::Crr,
        Scenario::UdpEcho,
        Scenario::UdpUp,
        Scenario::UdpDown,
        Scenario::DnsFake,
        Scenario::DnsFakeCached,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::TcpUp1 => "tcp-up-1",
            Scenario::TcpDown1 => "tcp-down-1",
            Scenario::TcpUp4 => "tcp-up-4",
            Scenario::TcpDown4 => "tcp-down-4",
            Scenario::TcpUp8 => "tcp-up-8",
            Scenario::TcpDown8 => "tcp-down-8",
            Scenario::Rr => "rr",
            Scenario::Rr8x1k => "rr-8x1k",
            Scenario::Crr => "crr",
            Scenario::UdpEcho => "udp-echo",
            Scenario::UdpUp => "udp-up",
            Scenario::UdpDown => "udp-down",
            Scenario::DnsFake => "dns-fake",
            Scenario::DnsFakeCached => "dns-fake-cached",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Scenario::Rr | Scenario::Rr8x1k => "trans/s",
            Scenario::Crr => "conn/s",
            Scenario::UdpEcho | Scenario::UdpUp | Scenario::UdpDown => "pkt/s",
            Scenario::DnsFake | Scenario::DnsFakeCached => "queries/s",
            _ => "Gbit/s",
        }
    }

    /// Whether the scenario moves bulk data (measured in Gbit/s and CPU-seconds per GB)
    /// rather than transactions, connections or datagrams.
    pub fn is_bulk(self) -> bool {
        matches!(
            self,
            Scenario::TcpUp1
                | Scenario::TcpDown1
                | Scenario::TcpUp4
                | Scenario::TcpDown4
                | Scenario::TcpUp8
                | Scenario::TcpDown8
        )
    }

    /// Whether the scenario runs over TCP.
    pub fn is_tcp(self) -> bool {
        !matches!(
            self,
            Scenario::UdpEcho
                | Scenario::UdpUp
                | Scenario::UdpDown
                | Scenario::DnsFake
                | Scenario::DnsFakeCached
        )
    }

    /// Whether the scenario queries the proxy's fake-IP resolver, which only the
    /// `--dns fake` path has (the direct path has no resolver to compare with).
    pub fn is_dns(self) -> bool {
        matches!(self, Scenario::DnsFake | Scenario::DnsFakeCached)
    }

    /// Whether the scenario sends datagrams one way at a target rate (reported with
    /// their loss).
    pub fn is_flood(self) -> bool {
        matches!(self, Scenario::UdpUp | Scenario::UdpDown)
    }

    /// The headline figure of a run, in [`Scenario::unit`].
    pub fn value(self, sample: &Sample) -> f64 {
        if self.is_bulk() {
            sample.per_second() * 8.0 / 1e9
        } else {
            sample.per_second()
        }
    }

    fn run(self, topo: &Ends, ip: IpAddr, settings: &Settings, meter: &Meter) -> Sample {
        let d = settings.duration;
        match self {
            Scenario::TcpUp1 => load::bulk(topo, ip, 1, true, d, meter),
            Scenario::TcpDown1 => load::bulk(topo, ip, 1, false, d, meter),
            Scenario::TcpUp4 => load::bulk(topo, ip, 4, true, d, meter),
            Scenario::TcpDown4 => load::bulk(topo, ip, 4, false, d, meter),
            Scenario::TcpUp8 => load::bulk(topo, ip, 8, true, d, meter),
            Scenario::TcpDown8 => load::bulk(topo, ip, 8, false, d, meter),
            Scenario::Rr => load::request_response(topo, ip, 1, 1, d, meter),
            Scenario::Rr8x1k => load::request_response(topo, ip, 8, 1024, d, meter),
            Scenario::Crr => load::connect_request_response(topo, ip, d, meter),
            Scenario::UdpEcho => load::udp_echo(topo, ip, settings.udp_rate, d, meter),
            Scenario::UdpUp => load::udp_flood(topo, ip, true, settings.flood, d, meter),
            Scenario::UdpDown => load::udp_flood(topo, ip, false, settings.flood, d, meter),
            Scenario::DnsFake => load::dns_queries(topo, false, d, meter),
            Scenario::DnsFakeCached => load::dns_queries(topo, true, d, meter),
        }
    }
}

/// A path through which the scenarios run: direct, or a proxy command.
pub struct Variant {
    pub label: String,
    /// Shell command with {tun} and {iface} placeholders; None for the direct path.
    pub command: Option<String>,
    /// Whether UDP goes through it: without, its UDP scenarios and resource figures
    /// (which open UDP flows) are not run.
    pub udp: bool,
    /// Another process on the path whose CPU time is counted with the proxy's (the
    /// SOCKS5 server of an --upstream run).
    pub helper: Option<u32>,
    /// A peer that is no TUN proxy (`--peer`): it runs `command` to serve a child
    /// namespace its clients run in.
    pub peer: Option<peer::Kind>,
    /// Whether it answers DNS itself (`--dns fake`): it runs the dns scenarios and
    /// nothing else.
    pub dns: bool,
}

impl Variant {
    fn new(label: &str, command: Option<&str>) -> Variant {
        Variant {
            label: label.into(),
            command: command.map(str::to_string),
            udp: true,
            helper: None,
            peer: None,
            dns: false,
        }
    }

    /// Whether `scenario` runs through this path.
    pub fn runs(&self, scenario: Scenario) -> bool {
        if self.dns || scenario.is_dns() {
            self.dns && scenario.is_dns()
        } else {
            self.udp || scenario.is_tcp()
        }
    }
}

/// Port of the SOCKS5 server (microsocks) the --upstream run goes through.
const SOCKS_PORT: u16 = 1080;

/// Starts microsocks on `server`'s address in the server namespace, for the run through
/// `--upstream`; `Err` says why there is none.
fn start_microsocks(topo: &Topology, server: IpAddr) -> Result<Child, String> {
    let installed = Command::new("sh")
        .args(["-c", "command -v microsocks"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !installed {
        return Err("microsocks is not installed (apt-get install microsocks)".into());
    }
    let child = {
        let mut cleanup = cleanup_list();
        let child = Command::new("ip")
            .args(["netns", "exec", topo.server_ns(), "microsocks", "-i"])
            .args([server.to_string(), "-p".into(), SOCKS_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn microsocks: {e}"))?;
        cleanup.1.push(child.id());
        child
    };
    let addr = SocketAddr::new(server, SOCKS_PORT);
    let up = wait_until(STARTUP_TIMEOUT, || {
        common::join(topo.in_server(move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        }))
    });
    if !up {
        return Err(format!("microsocks not listening on {addr}"));
    }
    Ok(child)
}

struct Settings {
    duration: Duration,
    udp_rate: u64,
    /// What udp-up and udp-down send.
    flood: load::Flood,
    idle_window: Duration,
    after_load_wait: Duration,
    idle_tcp: [usize; 2],
    udp_flows: usize,
    stalled_flows: usize,
    stalled_window: Duration,
}

/// One run of one scenario on one path.
pub struct Run {
    pub scenario: Scenario,
    pub variant: usize,
    pub round: usize,
    pub outcome: Result<Measured, String>,
}

pub struct Measured {
    pub sample: Sample,
    /// The proxy's CPU seconds during the run, and the wall time they were measured
    /// over (None on the direct path).
    pub cpu: Option<(f64, Duration)>,
    /// The proxy's wake-ups and device packets during the run (None on the direct path).
    pub activity: Option<load::Activity>,
    /// The proxy's peak RSS during the run, KiB.
    pub peak_rss_kib: Option<u64>,
}

/// Resource figures of one proxy, from one start.
#[derive(Default)]
pub struct Resources {
    pub startup: Option<Duration>,
    pub idle_rss_kib: Option<u64>,
    pub wakeups: Option<u64>,
    pub wakeup_window: Duration,
    /// (flows, RSS KiB) with that many idle TCP flows open.
    pub tcp_flows_rss: Vec<(usize, Option<u64>)>,
    pub udp_flows: usize,
    pub udp_answered: u64,
    pub udp_flows_rss_kib: Option<u64>,
    pub load_peak_rss_kib: Option<u64>,
    pub after_load_rss_kib: Option<u64>,
    pub after_load_wait: Duration,
    /// Stalled downloads: how many, for how long, RSS sampled every second (time since
    /// the servers started writing, KiB), what the servers wrote and how many failed.
    pub stalled_flows: usize,
    pub stalled_window: Duration,
    pub stalled_rss_kib: Vec<(Duration, Option<u64>)>,
    pub stalled_bytes: u64,
    pub stalled_failed: u64,
    /// Bytes unread in the kernel at the end: the proxy's sockets', the clients'.
    pub stalled_unread: Option<(u64, u64)>,
    /// One bulk download's Gbit/s right before the stalled flows, and beside them at
    /// their end: what they cost a busy flow.
    pub bulk_alone_gbps: Option<f64>,
    pub bulk_beside_stalled_gbps: Option<f64>,
    pub error: Option<String>,
}

/// Namespaces and proxy processes to remove if the benchmark is interrupted.
static CLEANUP: Mutex<(Vec<String>, Vec<u32>)> = Mutex::new((Vec::new(), Vec::new()));

/// Blocks the termination signals in every thread and lets one thread wait for them:
/// on Ctrl-C the proxies are killed and the namespaces removed before exiting.
fn handle_interrupts() {
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals.thread_block().expect("block termination signals");
    thread::spawn(move || {
        let signal = signals.wait().unwrap_or(Signal::SIGINT);
        eprintln!("e2e: {signal}: removing namespaces");
        let (namespaces, pids) = &*cleanup_list();
        for &pid in pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        for ns in namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        std::process::exit(130);
    });
}

fn cleanup_list() -> std::sync::MutexGuard<'static, (Vec<String>, Vec<u32>)> {
    CLEANUP.lock().unwrap_or_else(|e| e.into_inner())
}

/// A proxy started for one run; stopped (SIGTERM, then SIGKILL) on drop.
struct Running {
    child: Child,
    startup: Duration,
    namespace: String,
    tun: String,
    /// `-4` or `-6`: the family of the route into the TUN.
    family: &'static str,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the proxy still runs and the route into its TUN is still in place: if
    /// either went away, the traffic of a run went direct (the policy rule falls
    /// through to the main table) and the run measured the wrong path.
    fn still_in_path(&mut self) -> Result<(), String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!("the proxy exited during the run ({status})"));
        }
        let (ns, family, tun) = (&self.namespace, self.family, &self.tun);
        let routes = Command::new("ip")
            .args(["-n", ns, family, "route", "show", "table", ROUTE_TABLE])
            .stderr(Stdio::null())
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default();
        if !routes.contains(&format!("dev {tun}")) {
            return Err(format!(
                "the route into {tun} vanished: the traffic went around the proxy"
            ));
        }
        Ok(())
    }

    /// Starts `command` in the client namespace, routes the server into its TUN and
    /// waits until a connection through it works.
    fn start(
        topo: &Topology,
        command: &str,
        server: IpAddr,
        log: &File,
    ) -> Result<Running, String> {
        let command = command
            .replace("{uringproxy}", PROXY_BIN)
            .replace("{tun}", topo.tun_name())
            .replace("{iface}", topo.client_veth());
        let start = Instant::now();
        let child = {
            // Registered under the lock it was spawned under, so an interrupt cannot
            // come between and leave it running.
            let mut cleanup = cleanup_list();
            // `ip netns exec` runs the command in a mount namespace of its own: a tmpfs
            // there keeps the proxy's default control socket (/run/uringproxy/TUN.sock)
            // apart from those of other benchmarks and tests using the same TUN name.
            let child = Command::new("ip")
                .args(["netns", "exec", topo.client_ns(), "sh", "-c"])
                .arg(format!(
                    "mkdir -p {CONTROL_DIR} && mount -t tmpfs e2e-bench {CONTROL_DIR} && \
                     exec {command}"
                ))
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log.try_clone().map_err(|e| e.to_string())?)
                .spawn()
                .map_err(|e| format!("spawn `{command}`: {e}"))?;
            cleanup.1.push(child.id());
            child
        };
        let family = if server.is_ipv4() { "-4" } else { "-6" };
        let mut running = Running {
            child,
            startup: Duration::ZERO,
            namespace: topo.client_ns().to_string(),
            tun: topo.tun_name().to_string(),
            family,
        };
        let (ns, tun) = (topo.client_ns(), topo.tun_name());
        // The process's own view of its namespace's links, read every millisecond
        // (cheaper and finer than running `ip`).
        let net_dev = format!("/proc/{}/net/dev", running.pid());
        let tun_line = format!("{tun}:");
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut exited = None;
        let mut tun_exists = false;
        while !tun_exists && exited.is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
            exited = running.child.try_wait().ok().flatten();
            tun_exists = fs::read_to_string(&net_dev)
                .is_ok_and(|links| links.lines().any(|l| l.trim_start().starts_with(&tun_line)));
        }
        if let Some(status) = exited {
            return Err(format!("`{command}` exited ({status})"));
        }
        if !tun_exists {
            return Err(format!(
                "`{command}` made no TUN {tun} in {STARTUP_TIMEOUT:?}"
            ));
        }
        // A proxy configures its TUN after creating it, and the kernel flushes the
        // TUN's routes when an address is replaced (uringproxy sets the netmask after the
        // address; the only address is then briefly gone): a route added before that is
        // lost and the traffic goes direct. Bringing the TUN up is uringproxy's last
        // step, so wait for that, for a while; some proxies never do it themselves.
        wait_until(Duration::from_secs(1), || link_is_up(ns, tun));
        // Whatever the proxy did itself: the TUN must be up and hold the route that
        // the policy rule (see `prepare_namespaces`) looks up.
        let routed = wait_until(STARTUP_TIMEOUT, || {
            ip_ok(&format!("-n {ns} link set dev {tun} up"))
                && ip_ok(&format!(
                    "-n {ns} {family} route replace default dev {tun} table {ROUTE_TABLE}"
                ))
        });
        if !routed {
            return Err(format!("cannot route into {tun}"));
        }
        probe_until_works(topo.client_ns(), server, &command)?;
        // A probe that found no route went direct and proves nothing.
        running.still_in_path()?;
        running.startup = start.elapsed();
        Ok(running)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let pid = self.pid();
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let exited = wait_until(Duration::from_secs(3), || {
            self.child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        cleanup_list().1.retain(|&p| p != pid);
        // The kernel may tear the TUN down a moment after the process is gone (its ring
        // still holds the device); the next proxy would find the name taken.
        let (ns, tun) = (&self.namespace, &self.tun);
        wait_until(Duration::from_secs(2), || {
            !ip_ok(&format!("-n {ns} link show dev {tun}"))
        });
    }
}

/// Whether `dev` in `ns` has IFF_UP set (`ip link` shows flags as `<...,UP,...>`).
fn link_is_up(ns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", dev])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            let text = String::from_utf8_lossy(&out.stdout);
            let flags = text
                .split_once('<')
                .and_then(|(_, rest)| rest.split_once('>'));
            flags.is_some_and(|(flags, _)| flags.split(',').any(|f| f == "UP"))
        })
}

fn ip_ok(args: &str) -> bool {
    Command::new("ip")
        .args(args.split_whitespace())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits until a connection from namespace `ns` to the probe server on `server` works
/// through the path `command` set up. The first tries are short, so a SYN lost while the
/// path comes up is retried at once rather than after the kernel's one-second
/// retransmission timeout; later ones give a slow proxy more time.
fn probe_until_works(ns: &str, server: IpAddr, command: &str) -> Result<(), String> {
    let probe = SocketAddr::new(server, PROBE_PORT);
    let works = common::join(common::in_netns(ns, move || {
        let mut timeout = Duration::from_millis(50);
        wait_until(STARTUP_TIMEOUT, || {
            let ok = probe_once(probe, timeout);
            timeout = (timeout * 2).min(Duration::from_secs(1));
            ok
        })
    }));
    if works {
        Ok(())
    } else {
        Err(format!(
            "no connection through `{command}` in {STARTUP_TIMEOUT:?}"
        ))
    }
}

/// One connection to the probe server within `timeout`: one byte there and back.
fn probe_once(addr: SocketAddr, timeout: Duration) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut byte = [0_u8];
    stream.write_all(b"p").is_ok() && stream.read_exact(&mut byte).is_ok() && byte == *b"p"
}

/// Answers start-up probes for as long as the benchmark runs.
fn serve_probes(topo: &Topology, server: IpAddr) {
    let listener =
        common::join(topo.in_server(move || {
            TcpListener::bind((server, PROBE_PORT)).expect("bind probe listener")
        }));
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            load::answer_one_byte(&mut stream);
        }
    });
}

/// Sends everything for `server` from the client namespace to the routing table that
/// holds the TUN route while a proxy runs; without a proxy the table is empty and the
/// lookup falls through to the direct route. Proxies bind their outbound sockets to the
/// veth, which no route in that table leads to, so their own traffic goes direct. Also
/// makes room for the many connections of crr and the idle-flow figures.
fn prepare_namespaces(topo: &Topology, server: IpAddr) {
    let ns = topo.client_ns();
    let family = if server.is_ipv4() { "-4" } else { "-6" };
    common::ip(&format!(
        "-n {ns} {family} rule add to {server} table {ROUTE_TABLE}"
    ));
    // Crr and the idle-flow figures open tens of thousands of connections, and the
    // idle flows wait in the server's accept queue.
    let range = "net.ipv4.ip_local_port_range=10000 65000";
    common::run("ip", &["netns", "exec", ns, "sysctl", "-qw", range]);
    let backlog = "net.core.somaxconn=65535";
    common::run(
        "ip",
        &["netns", "exec", topo.server_ns(), "sysctl", "-qw", backlog],
    );
}

fn measure(
    topo: &Topology,
    scenario: Scenario,
    variant: &Variant,
    server: IpAddr,
    settings: &Settings,
    log: &File,
) -> Result<Measured, String> {
    let (mut proxy, mut peer) = (None, None);
    let ends = match (variant.peer, &variant.command) {
        (Some(kind), _) => {
            let running = peer::Running::start(topo, kind, server, log)?;
            let ends = running.ends(topo);
            peer = Some(running);
            ends
        }
        (None, Some(command)) => {
            proxy = Some(Running::start(topo, command, server, log)?);
            Ends::of(topo)
        }
        (None, None) => Ends::of(topo),
    };
    let pid = proxy
        .as_ref()
        .map(Running::pid)
        .or(peer.as_ref().map(peer::Running::pid));
    if let Some(pid) = pid {
        procfs::reset_peak_rss(pid);
    }
    let mut meter = Meter::new(pid).with(variant.helper);
    if pid.is_some() {
        meter = meter.with_device(&ends.client_ns, ends.tun_name());
    }
    let sample = panic::catch_unwind(AssertUnwindSafe(|| {
        scenario.run(&ends, server, settings, &meter)
    }))
    .map_err(|e| panic_message(&e))?;
    if let Some(proxy) = &mut proxy {
        proxy.still_in_path()?;
    }
    if let Some(peer) = &mut peer {
        peer.still_running()?;
    }
    Ok(Measured {
        sample,
        cpu: meter.cpu(),
        activity: meter.activity(),
        peak_rss_kib: pid.and_then(procfs::peak_rss_kib),
    })
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

fn resources(
    topo: &Topology,
    command: &str,
    server: IpAddr,
    settings: &Settings,
    log: &File,
) -> Resources {
    let mut figures = Resources {
        udp_flows: settings.udp_flows,
        tcp_flows_rss: settings.idle_tcp.iter().map(|&n| (n, None)).collect(),
        wakeup_window: settings.idle_window,
        after_load_wait: settings.after_load_wait,
        stalled_flows: settings.stalled_flows,
        stalled_window: settings.stalled_window,
        ..Resources::default()
    };
    let mut proxy = match Running::start(topo, command, server, log) {
        Ok(proxy) => proxy,
        Err(e) => {
            figures.error = Some(e);
            return figures;
        }
    };
    let pid = proxy.pid();
    figures.startup = Some(proxy.startup);
    let ends = Ends::of(topo);
    thread::sleep(Duration::from_secs(1));
    figures.idle_rss_kib = procfs::rss_kib(pid);
    let before = procfs::context_switches(pid);
    thread::sleep(settings.idle_window);
    let after = procfs::context_switches(pid);
    figures.wakeups = (!after.is_empty()).then(|| procfs::switches_between(&before, &after));

    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let mut held = Vec::new();
        let mut open = 0;
        for (count, rss) in &mut figures.tcp_flows_rss {
            held.push(load::idle_tcp(&ends, server, *count - open));
            open = *count;
            thread::sleep(Duration::from_millis(500));
            *rss = procfs::rss_kib(pid);
        }
        drop(held);
        thread::sleep(Duration::from_secs(1));
        procfs::reset_peak_rss(pid);
        let meter = Meter::new(None);
        for upload in [true, false] {
            let sample = load::bulk(&ends, server, 8, upload, settings.duration, &meter);
            assert!(
                sample.bytes > 0 && sample.errors == 0,
                "8-stream load (upload {upload}): {} bytes, {} errors",
                sample.bytes,
                sample.errors
            );
        }
        figures.load_peak_rss_kib = procfs::peak_rss_kib(pid);
        thread::sleep(settings.after_load_wait);
        figures.after_load_rss_kib = procfs::rss_kib(pid);

        let (sockets, answered) = load::udp_flows(&ends, server, settings.udp_flows);
        thread::sleep(Duration::from_millis(500));
        figures.udp_answered = answered;
        figures.udp_flows_rss_kib = procfs::rss_kib(pid);
        drop(sockets);
        // Lost datagrams on a quiet path are a failure of the proxy, not noise.
        assert!(
            answered == settings.udp_flows as u64,
            "{answered} of {} UDP flows answered",
            settings.udp_flows
        );

        // Last: whatever the stalled flows leave behind cannot distort the figures above.
        let bulk_gbps = || {
            let sample = load::bulk(&ends, server, 1, false, settings.duration, &meter);
            (sample.errors == 0 && sample.bytes > 0)
                .then(|| sample.bytes as f64 * 8.0 / sample.elapsed.as_secs_f64() / 1e9)
        };
        figures.bulk_alone_gbps = bulk_gbps();
        let mut samples = Vec::new();
        let stalled = load::stalled_downloads(
            &ends,
            server,
            settings.stalled_flows,
            settings.stalled_window,
            pid,
            |at| {
                samples.push((at, procfs::rss_kib(pid)));
                if at == settings.stalled_window {
                    figures.bulk_beside_stalled_gbps = bulk_gbps();
                }
            },
        );
        figures.stalled_rss_kib = samples;
        figures.stalled_bytes = stalled.bytes;
        figures.stalled_failed = stalled.failed;
        figures.stalled_unread = Some((stalled.proxy_unread, stalled.clients_unread));
    }));
    if let Err(e) = outcome {
        figures.error = Some(panic_message(&e));
    } else if let Err(e) = proxy.still_in_path() {
        figures.error = Some(e);
    }
    figures
}

fn main() {
    let args: Args = argh::from_env();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("e2e: needs root (it builds network namespaces); run it with sudo");
        std::process::exit(1);
    }
    handle_interrupts();
    let scenarios: Vec<Scenario> = match &args.only {
        None => Scenario::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(|name| {
                Scenario::ALL
                    .into_iter()
                    .find(|s| s.name() == name.trim())
                    .unwrap_or_else(|| {
                        eprintln!("e2e: unknown scenario {name:?}");
                        std::process::exit(2)
                    })
            })
            .collect(),
    };
    let shaping = args.rate.as_deref().map(|rate| {
        Shaping::parse(rate).unwrap_or_else(|e| {
            eprintln!("e2e: {e}");
            std::process::exit(2)
        })
    });
    let line_rate = shaping.as_ref().map_or(1e9, |s| s.bits_per_second as f64);
    // Bytes each datagram takes on the wire, which is what the shaper counts: payload,
    // UDP, IP and Ethernet headers.
    let ip_header = if args.ipv6 { 40 } else { 20 };
    let (flood_size, flood_batch) = if args.udp_gso {
        (load::GSO_FLOOD_SIZE, load::GSO_BATCH)
    } else {
        (load::FLOOD_SIZE, 1)
    };
    let wire_bytes = (flood_size + 8 + ip_header + 14) as f64;
    let flood = load::Flood {
        rate: (line_rate * args.udp_load.clamp(1.0, 1000.0) / 100.0 / 8.0 / wire_bytes) as u64,
        size: flood_size,
        batch: flood_batch,
    };
    let settings = if args.smoke {
        Settings {
            duration: Duration::from_millis(300),
            udp_rate: args.udp_rate.min(5_000),
            flood,
            idle_window: Duration::from_secs(1),
            after_load_wait: Duration::from_secs(1),
            idle_tcp: [20, 100],
            udp_flows: 20,
            stalled_flows: args.stalled.min(20),
            stalled_window: Duration::from_secs(1),
        }
    } else {
        Settings {
            duration: Duration::from_secs_f64(args.seconds),
            udp_rate: args.udp_rate,
            flood,
            idle_window: Duration::from_secs(20),
            // The proxy gives its pools' free pages back after 5 s without traffic:
            // measured well after that.
            after_load_wait: Duration::from_secs(10),
            idle_tcp: [1_000, 10_000],
            udp_flows: 1_000,
            stalled_flows: args.stalled,
            stalled_window: Duration::from_secs(7),
        }
    };
    let rounds = if args.smoke { 1 } else { args.rounds.max(1) };

    let mut variants = vec![
        Variant::new("direct", None),
        Variant::new("uringproxy", Some("{uringproxy} -i {iface} --tun {tun}")),
    ];
    let other_paths = [
        Variant::new(
            "uringproxy --no-offload",
            Some("{uringproxy} -i {iface} --tun {tun} --no-offload"),
        ),
        // What kernels before 6.7 get: single TUN reads instead of a multishot one.
        Variant::new(
            "uringproxy, single reads (<6.7)",
            Some("env URINGPROXY_MAX_URING=6.1 {uringproxy} -i {iface} --tun {tun}"),
        ),
    ];
    if !args.default_path_only {
        variants.extend(other_paths);
    }
    for name in &args.peer {
        let kind = peer::Kind::parse(name).unwrap_or_else(|e| {
            eprintln!("e2e: --peer: {e}");
            std::process::exit(2)
        });
        if !kind.installed() {
            eprintln!("e2e: --peer {name}: not installed (Debian: passt, slirp4netns)");
            std::process::exit(2);
        }
        if args.ipv6 {
            eprintln!("e2e: --peer {name}: IPv4 only (the child namespace gets 10.0.2.100)");
            continue;
        }
        variants.push(Variant {
            peer: Some(kind),
            ..Variant::new(
                &format!("{name} (own namespace, tap)"),
                Some(kind.command()),
            )
        });
    }
    for (i, command) in args.compare.iter().enumerate() {
        let program = command.split_whitespace().next().unwrap_or_default();
        let name = program.rsplit('/').next().unwrap_or(program);
        let label = format!("compare {}: {}", i + 1, name.trim_matches(['{', '}']));
        variants.push(Variant::new(&label, Some(command)));
    }

    // The client end of every idle flow lives in this process.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("RLIMIT_NOFILE");
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let out_dir = target.join("bench-e2e");
    fs::create_dir_all(&out_dir).expect("create the output directory");
    let log_path = out_dir.join("proxies.log");
    let log = File::create(&log_path).expect("create proxy log");

    let topo = Topology::new();
    cleanup_list()
        .0
        .extend([topo.client_ns().to_string(), topo.server_ns().to_string()]);
    let server = if args.ipv6 {
        topo.server_v6()
    } else {
        topo.server_v4()
    };
    prepare_namespaces(&topo, server);
    serve_probes(&topo, server);
    // Through a SOCKS5 server on the server's host: microsocks relays TCP only (it has
    // no UDP ASSOCIATE), and its CPU is counted with the proxy's.
    let socks = if args.default_path_only {
        Err("--default-path-only".to_string())
    } else {
        start_microsocks(&topo, server)
    };
    let mut socks = match socks {
        Ok(child) => {
            let upstream = SocketAddr::new(server, SOCKS_PORT);
            variants.push(Variant {
                udp: false,
                helper: Some(child.id()),
                ..Variant::new(
                    "uringproxy --upstream microsocks (CPU of both)",
                    Some(&format!(
                        "{{uringproxy}} -i {{iface}} --tun {{tun}} --upstream socks5://{upstream}"
                    )),
                )
            });
            // The fake-IP resolver answers A queries itself: the upstream (which
            // --dns fake requires) carries nothing, and the CPU is the proxy's alone.
            // The proxy keeps its upstream's address (the server's) out of the TUN, so
            // the start-up probe goes direct here; answered queries prove the path.
            variants.push(Variant {
                udp: false,
                dns: true,
                ..Variant::new(
                    "uringproxy --upstream microsocks --dns fake",
                    Some(&format!(
                        "{{uringproxy}} -i {{iface}} --tun {{tun}} --upstream socks5://{upstream} --dns fake"
                    )),
                )
            });
            Some(child)
        }
        Err(why) => {
            // In CI (.ci/test installs microsocks) a missing run is a failure.
            if std::env::var_os("URINGPROXY_REQUIRE_ROOT_TESTS").is_some_and(|v| v == "1") {
                eprintln!("e2e: no --upstream run: {why}");
                std::process::exit(1);
            }
            eprintln!("e2e: no --upstream or dns-fake runs: {why}");
            None
        }
    };
    if let Some(shaping) = &shaping {
        shaping.apply(&topo).unwrap_or_else(|e| {
            eprintln!("e2e: {e}");
            std::process::exit(1)
        });
        eprintln!("e2e: both veth ends shaped: {}", shaping.tbf());
    }

    let pairs = scenarios
        .iter()
        .map(|&s| variants.iter().filter(|v| v.runs(s)).count());
    let total = rounds * pairs.sum::<usize>();
    let mut runs = Vec::new();
    for round in 0..rounds {
        for &scenario in &scenarios {
            // Alternate the order so that drift in machine load does not always favour
            // the same path.
            let order: Vec<usize> = if round % 2 == 0 {
                (0..variants.len()).collect()
            } else {
                (0..variants.len()).rev().collect()
            };
            for v in order {
                let variant = &variants[v];
                if !variant.runs(scenario) {
                    continue;
                }
                let outcome = measure(&topo, scenario, variant, server, &settings, &log);
                eprintln!(
                    "[{}/{total}] round {} {} via {}: {}",
                    runs.len() + 1,
                    round + 1,
                    scenario.name(),
                    variant.label,
                    report::describe(scenario, &outcome)
                );
                runs.push(Run {
                    scenario,
                    variant: v,
                    round,
                    outcome,
                });
            }
        }
    }

    if shaping.is_some() {
        Shaping::remove(&topo);
    }
    let mut figures = Vec::new();
    if !args.no_resources {
        for (v, variant) in variants.iter().enumerate() {
            // A peer's clients live in a namespace of its own: the resource figures
            // (which measure from the client namespace) are for TUN proxies.
            let Some(command) = variant
                .command
                .as_ref()
                .filter(|_| variant.udp && variant.peer.is_none())
            else {
                continue;
            };
            eprintln!("resources of {}...", variant.label);
            let result = resources(&topo, command, server, &settings, &log);
            if let Some(e) = &result.error {
                eprintln!("resources of {}: {e}", variant.label);
            }
            figures.push((v, result));
        }
    }

    let date = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let context = report::Context {
        machine: procfs::machine(),
        unix_time: date,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        seconds: settings.duration.as_secs_f64(),
        rounds,
        udp_rate: settings.udp_rate,
        flood_rate: settings.flood.rate,
        flood_size: settings.flood.size,
        flood_batch: settings.flood.batch,
        flood_wire_bytes: wire_bytes as u64,
        line_rate: line_rate as u64,
        shaping: shaping.as_ref().map(|s| (s.name.clone(), s.tbf())),
        family: if args.ipv6 { "IPv6" } else { "IPv4" },
        smoke: args.smoke,
    };
    let summary = report::summarize(&scenarios, &variants, &runs);
    print!(
        "{}",
        report::markdown(&context, &variants, &summary, &figures)
    );

    let json = report::json(&context, &variants, &runs, &summary, &figures);
    fs::write(out_dir.join("results.json"), json).expect("write results.json");
    let charts = report::charts(&context, &variants, &summary, &figures);
    for (name, svg) in &charts {
        let name = name.as_str();
        fs::write(out_dir.join(name), svg).expect("write chart");
        if let Some(dir) = &args.charts {
            fs::create_dir_all(dir).expect("create charts directory");
            fs::write(dir.join(name), svg).expect("write chart");
        }
    }
    eprintln!(
        "raw results and charts in {}; proxy output in {}",
        out_dir.display(),
        log_path.display()
    );
    drop(log);
    if let Some(mut child) = socks.take() {
        let _ = child.kill();
        let _ = child.wait();
        cleanup_list().1.retain(|&p| p != child.id());
    }
    drop(topo);
    cleanup_list().0.clear();

    // A smoke run proves the harness: every run must have worked without a single
    // failed operation. A peer's failed operations are its own (pasta's 2023 package
    // loses a stream of a multi-stream upload now and then): reported, not failing.
    let failed = runs
        .iter()
        .filter(|run| match &run.outcome {
            Err(_) => true,
            Ok(m) => {
                let peer = variants[run.variant].peer.is_some();
                args.smoke && ((m.sample.errors > 0 && !peer) || m.sample.units == 0)
            }
        })
        .count()
        + figures.iter().filter(|(_, r)| r.error.is_some()).count();
    if failed > 0 {
        eprintln!("e2e: {failed} runs failed (see above)");
        std::process::exit(1);
    }
}
