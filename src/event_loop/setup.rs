//! Everything before the loop: the checks against the host, the signal mask, the
//! kernel check, then (as root) the TUN, the control socket and metrics endpoint, the
//! routes, pinning, the fd limit, the loop's own state, the drop to `--user`, and
//! finally a check that pings can be relayed.

use std::net::SocketAddr;
use std::time::Duration;

use log::{info, warn};
use smoltcp::time::Instant;
use socket2::{Domain, Protocol, Socket, Type};

use super::control::Control;
use super::datagrams::Datagrams;
use super::host;
use super::outbound::Upstream;
use super::signals::Signals;
use super::tcp::TcpFlows;
use super::tun_io::TunIo;
use super::{Proxy, shutdown};
use crate::config::Config;
use crate::error::Error;
use crate::flow::budget::Budget;
use crate::flow::tcp::Settings;
use crate::flow::tcp::admission::Limits;
use crate::routing::{Plan, Routes};
use crate::stack::Stack;
use crate::sys;
use crate::tun::{self, Tun};
use crate::uring::{Features, Ring};
use crate::wire::Cidr;

/// Sets the proxy up and runs it until a stopping signal or a fatal error; returns
/// only once its TUN is gone, so a restart with the same name can follow at once.
pub fn run(config: Config) -> Result<(), Error> {
    let host = host::check(&config)?;
    // Before anything is created: a SIGHUP or SIGTERM during set-up then waits for the
    // loop, which stops cleanly (removing the rules), instead of killing the process
    // with its rules installed.
    let signals = Signals::new()?;
    let dns = super::dns::Dns::new(&config)?;
    for warning in config
        .override_warnings()
        .into_iter()
        .chain(host::forwarding_warnings(&config))
    {
        warn!("{warning}");
    }
    // The ring next: a kernel that cannot run the proxy is refused before anything
    // (TUN, rules) has been created.
    let mut ring = Ring::new().map_err(Error::from_ring_setup)?;
    let features = ring.probe(config.uring_cap).map_err(Error::Kernel)?;
    let tun = Tun::create(&tun::Spec {
        name: config.tun_name.clone(),
        addrs: config.tun_addrs.clone(),
        mtu: config.mtu,
        offload_cap: config.offload_cap,
    })?;
    let tun_name = tun.name().to_string();
    // Held for the whole run: dropping it (normal exit, error, panic) removes the rules.
    // The fake ranges of --dns fake are routed into the TUN like --route networks: the
    // proxy hands their addresses out, nothing else could reach them.
    let routed: Vec<_> = config
        .routes
        .iter()
        .copied()
        .chain(
            config
                .dns
                .iter()
                .flat_map(|dns| [Some(dns.v4), dns.v6])
                .flatten(),
        )
        .collect();
    let routes = if routed.is_empty() && config.lans.is_empty() {
        None
    } else {
        let index = sys::interface_index(&tun_name)
            .ok_or_else(|| Error::Io("look up the new TUN", std::io::ErrorKind::NotFound.into()))?;
        if !config.lans.is_empty() {
            forward_on_tun(&tun_name)?;
        }
        // The upstream's own address never goes in: whoever reaches it directly (the
        // LAN, the host) would otherwise be relayed to it through itself.
        let excludes: Vec<Cidr> = (config.excludes.iter().copied())
            .chain(host.upstream.map(|server| Cidr::host(server.ip())))
            .collect();
        Some(Routes::install(
            &Plan {
                table: config.table,
                tun_addrs: &config.tun_addrs,
                routes: &routed,
                lans: &config.lans,
                excludes: &excludes,
                uids: &config.uids,
                exclude_uids: &config.exclude_uids,
            },
            index,
        )?)
    };
    // As root still: the control socket is handed to --user. After the TUN and the
    // rules, so that a TUN name or a table in use is the one error named.
    let control = Control::new(&config, host.user.as_ref(), &mut ring)?;
    if let Some(cpu) = config.cpu {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu)
            .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set))
            .map_err(|err| Error::Io("pin to --cpu", err.into()))?;
    }
    // Each flow holds one outbound socket, a UDP flow through an upstream two (its
    // control connection); leave room for the ring, TUN and stdio.
    let udp_sockets = config.udp.max_flows * if config.upstream.is_some() { 2 } else { 1 };
    let fd_limit = sys::raise_fd_limit((config.max_flows + udp_sockets) as u64 + 64);
    let (tun, tx) = TunIo::new(tun, features, &mut ring, config.mtu as usize)?;
    let udp = Datagrams::new(
        config.udp.clone(),
        config.interface.clone(),
        upstream(&config, host.upstream),
        &mut ring,
    )?;
    let epoch = std::time::Instant::now();
    let tcp = TcpFlows::new(
        Limits {
            max_flows: config.max_flows,
            max_half_open: config.max_half_open,
        },
        Settings {
            buffer: config.flow_buffer,
            mtu: config.mtu,
        },
        config.connect_timeout,
        config.interface.clone(),
        upstream(&config, host.upstream),
        Budget::new(config.memory_limit),
    );
    let mut proxy = Proxy {
        ring,
        tun,
        stack: Stack::new(tx, Instant::ZERO, random_seed()),
        tcp,
        udp,
        dns,
        timers: Default::default(),
        signals,
        housekeeping: Default::default(),
        control,
        stats: Default::default(),
        completions: Vec::with_capacity(super::MAX_COMPLETIONS_PER_TURN),
        epoch,
        last_report: epoch,
        stop: false,
        fatal: None,
        config,
        rules: routes.as_ref().map_or_else(Vec::new, Routes::describe),
    };
    // Everything that needs root is done: the TUN, the rules, the ring, the fd limit.
    if let Some(user) = &host.user {
        sys::drop_privileges(user).map_err(|err| Error::Io("drop privileges (--user)", err))?;
        info!(
            "running as {} with CAP_NET_ADMIN and CAP_NET_RAW only",
            user.name
        );
    }
    log_start(&proxy, features, fd_limit, host.upstream);
    // Through an upstream pings are refused: no raw socket is needed.
    if proxy.config.upstream.is_none() {
        check_echo_sockets(&proxy.config.interface);
    }
    let result = proxy.run();
    shutdown::finish(proxy, Duration::from_secs(1));
    drop(routes);
    result
}

/// Lets the kernel forward what comes out of our TUN (the LAN's replies): the TUN's
/// own setting, which it took from the host's default when it was created. The host's
/// settings stay as they are.
fn forward_on_tun(tun: &str) -> Result<(), Error> {
    for family in ["ipv4", "ipv6"] {
        let path = format!("/proc/sys/net/{family}/conf/{tun}/forwarding");
        match std::fs::write(&path, "1") {
            // IPv6 disabled on this host: nothing of it to forward.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            result => result.map_err(|err| Error::Io("enable forwarding on the TUN", err))?,
        }
    }
    Ok(())
}

/// The SOCKS5 upstream of `config`, at `server`, as the flows use it.
fn upstream(config: &Config, server: Option<SocketAddr>) -> Option<Upstream> {
    let socks5 = config.upstream.as_ref()?;
    Some(Upstream::new(server?, socks5, config.connect_timeout))
}

fn log_start(proxy: &Proxy, features: Features, fd_limit: u64, upstream: Option<SocketAddr>) {
    info!("TUN offload: {}", proxy.tun.tun.offload());
    if features.read_multishot {
        info!("io_uring: multishot TUN reads");
    } else {
        info!(
            "io_uring: multishot reads unavailable (kernel {}), using chains of {} single reads",
            crate::uring::features::release(),
            proxy.tun.read_limit()
        );
    }
    let config = &proxy.config;
    info!(
        "relaying from {} ({}) via {}, mtu {}, up to {} TCP flows (fd limit {fd_limit})",
        proxy.tun.tun.name(),
        config
            .tun_addrs
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        config.interface,
        config.mtu,
        config.max_flows,
    );
    if let (Some(socks5), Some(server)) = (&config.upstream, upstream) {
        // The address only: the credentials are never logged.
        info!(
            "through the SOCKS5 upstream {server}{} (TCP by CONNECT, UDP by UDP ASSOCIATE; pings are refused)",
            if socks5.credentials.is_some() {
                " with a user name and password"
            } else {
                ""
            }
        );
    }
}

/// Pings are relayed through raw ICMP sockets, which need CAP_NET_RAW (binding to the
/// interface does not: since Linux 5.7 only re-binding a bound socket does). Without
/// them TCP and UDP still work, so say once why pings will not, rather than only
/// counting socket errors.
fn check_echo_sockets(interface: &str) {
    let failures: Vec<(&str, std::io::Error)> = [
        ("IPv4", Domain::IPV4, Protocol::ICMPV4),
        ("IPv6", Domain::IPV6, Protocol::ICMPV6),
    ]
    .into_iter()
    .filter_map(|(family, domain, protocol)| {
        Socket::new(domain, Type::RAW.cloexec(), Some(protocol))
            .and_then(|socket| socket.bind_device(Some(interface.as_bytes())))
            .err()
            .map(|err| (family, err))
    })
    .collect();
    let Some((_, err)) = failures.first() else {
        return;
    };
    let families = failures
        .iter()
        .map(|&(family, _)| family)
        .collect::<Vec<_>>()
        .join(" and ");
    let why = if err.kind() == std::io::ErrorKind::PermissionDenied {
        "raw ICMP sockets need CAP_NET_RAW".to_string()
    } else {
        format!("no raw ICMP socket bound to {interface}")
    };
    warn!("ping (ICMP echo) relaying is off for {families}: {why} ({err})");
}

/// smoltcp's initial sequence numbers and ports derive from this; it must not repeat
/// across runs.
fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut bytes))
        .is_ok()
    {
        return u64::from_ne_bytes(bytes);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()) << 32
}
