//! The validated configuration the proxy runs with, built from the command line.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::Args;
use crate::error::Error;
use crate::sys;
use crate::uring::{KernelVersion, features};
use crate::wire::socks5::Credentials;
use crate::wire::{Cidr, Offload};

/// The TUN created unless `--tun` names another.
pub const DEFAULT_TUN: &str = "uringproxy0";

/// Default TUN addresses: the RFC 2544 benchmarking range and a ULA prefix, both
/// unlikely to clash with a LAN.
pub const DEFAULT_TUN_ADDRS: [&str; 2] = ["198.18.0.1/30", "fd7a:7072:7879::1/64"];

/// Everything the proxy needs to run, checked against the host.
#[derive(Clone, Debug)]
pub struct Config {
    pub interface: String,
    pub tun_name: String,
    pub tun_addrs: Vec<Cidr>,
    pub mtu: u32,
    pub cpu: Option<usize>,
    /// The most offload to negotiate; probing steps down from here.
    pub offload_cap: Offload,
    /// `offload_cap` comes from URINGPROXY_MAX_OFFLOAD.
    pub offload_cap_from_env: bool,
    /// Use only the io_uring features of this kernel version (URINGPROXY_MAX_URING).
    pub uring_cap: Option<KernelVersion>,
    pub max_flows: usize,
    pub max_half_open: usize,
    pub flow_buffer: usize,
    /// Bytes all flows' buffers may hold together (`flow::budget`).
    pub memory_limit: usize,
    pub connect_timeout: Duration,
    pub udp: crate::flow::datagram::Limits,
    /// Destinations to route into the TUN (policy rules installed and removed by us).
    pub routes: Vec<Cidr>,
    /// The routing table (and rule priority) of `routes`.
    pub table: u32,
    /// The user to switch to once set up.
    pub user: Option<nix::unistd::User>,
    /// The control socket to serve (`None`: `--control none`).
    pub control: Option<ControlSocket>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The SOCKS5 proxy flows go through; `None`: direct.
    pub upstream: Option<Socks5>,
}

/// Where the control socket goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlSocket {
    pub path: PathBuf,
    /// The default place: its directory (/run/uringproxy) is ours, created 0700 and
    /// handed to `--user`; a `--control` path's directory is left as it is.
    pub owns_dir: bool,
}

/// Longest Unix socket path (`sun_path` less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A SOCKS5 upstream (`--upstream`). Its `Debug` shows no credential.
#[derive(Clone, Debug)]
pub struct Socks5 {
    pub server: SocketAddr,
    pub credentials: Option<Credentials>,
}

const UPSTREAM_SYNTAX: &str = "socks5://[user:pass@]HOST:PORT or direct";

/// Environment variable capping the offload probe (none, header, csum, tso, uso).
pub const OFFLOAD_CAP_ENV: &str = "URINGPROXY_MAX_OFFLOAD";

/// Smallest MTU IPv6 allows; IPv4 alone could go lower but no real link does.
const MIN_MTU: u32 = 1280;
/// Longest timeout accepted (a day): bigger values are typos, and would overflow the
/// kernel's timespec arithmetic.
const MAX_TIMEOUT_SECS: u64 = 86_400;
/// smoltcp and the TUN length fields are 16-bit.
const MAX_MTU: u32 = 65535;
/// IFNAMSIZ less the terminating NUL.
const MAX_INTERFACE_NAME: usize = 15;

impl Config {
    /// The TUN to create.
    pub fn tun_spec(&self) -> crate::tun::Spec {
        crate::tun::Spec {
            name: self.tun_name.clone(),
            addrs: self.tun_addrs.clone(),
            mtu: self.mtu,
            offload_cap: self.offload_cap,
        }
    }

    /// One warning per test override in effect: URINGPROXY_MAX_OFFLOAD and
    /// URINGPROXY_MAX_URING lower features, which left in a service's environment would
    /// otherwise go unnoticed.
    pub fn override_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.offload_cap_from_env {
            warnings.push(format!(
                "{OFFLOAD_CAP_ENV}={} set: TUN offload capped at {}",
                self.offload_cap.name(),
                self.offload_cap
            ));
        }
        if let Some(cap) = self.uring_cap {
            let off = features::capped_off(cap);
            let off = if off.is_empty() {
                "nothing off".to_string()
            } else {
                format!("{} off", off.join(", "))
            };
            warnings.push(format!(
                "{}={cap} set: io_uring features capped to those of Linux {cap} ({off})",
                features::CAP_ENV
            ));
        }
        warnings
    }

    /// Validates `args`: parses addresses, checks ranges and that the interface exists.
    pub fn from_args(args: Args) -> Result<Config, Error> {
        let addr_texts: Vec<String> = if args.tun_addr.is_empty() {
            DEFAULT_TUN_ADDRS.iter().map(|s| s.to_string()).collect()
        } else {
            args.tun_addr
        };
        let tun_addrs = addr_texts
            .iter()
            .map(|text| {
                text.parse::<Cidr>()
                    .map_err(|err| Error::Usage(format!("--tun-addr {err}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The kernel holds an address once per interface (whatever its prefix length).
        if let Some(twice) = tun_addrs.iter().enumerate().find_map(|(i, cidr)| {
            tun_addrs[..i]
                .iter()
                .any(|c| c.addr == cidr.addr)
                .then_some(cidr)
        }) {
            return Err(Error::Usage(format!(
                "--tun-addr {}: the same address is given twice",
                twice.addr
            )));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&args.mtu) {
            return Err(Error::Usage(format!(
                "--mtu {} out of range {MIN_MTU}..={MAX_MTU}",
                args.mtu
            )));
        }
        check_interface_name(&args.tun)
            .map_err(|why| Error::Usage(format!("--tun '{}': {why}", args.tun)))?;
        if args.max_flows == 0 {
            return Err(Error::Usage("--max-flows must be at least 1".into()));
        }
        if args.max_half_open == 0 {
            return Err(Error::Usage("--max-half-open must be at least 1".into()));
        }
        if !(4096..=64 << 20).contains(&args.flow_buffer) {
            return Err(Error::Usage(format!(
                "--flow-buffer {} out of range 4096..=67108864",
                args.flow_buffer
            )));
        }
        for (flag, seconds) in [
            ("--connect-timeout", args.connect_timeout),
            ("--udp-timeout", args.udp_timeout),
            ("--dns-timeout", args.dns_timeout),
        ] {
            if !(1..=MAX_TIMEOUT_SECS).contains(&seconds) {
                return Err(Error::Usage(format!(
                    "{flag} {seconds} out of range 1..={MAX_TIMEOUT_SECS}"
                )));
            }
        }
        if args.max_udp_flows == 0 {
            return Err(Error::Usage("--max-udp-flows must be at least 1".into()));
        }
        if let Some(cpu) = args.cpu {
            let allowed = allowed_cpus().map_err(|err| {
                Error::Io("read the CPU affinity (sched_getaffinity)", err.into())
            })?;
            check_cpu(cpu, &allowed).map_err(Error::Usage)?;
        }
        // Tests cap the probe to exercise each fallback level on any kernel.
        let (offload_cap, offload_cap_from_env) =
            match (args.no_offload, std::env::var(OFFLOAD_CAP_ENV)) {
                (true, _) => (Offload::None, false),
                (false, Ok(text)) => (
                    Offload::parse(&text).ok_or_else(|| {
                        Error::Usage(format!(
                            "{OFFLOAD_CAP_ENV}={text}: expected none, header, csum, tso or uso"
                        ))
                    })?,
                    true,
                ),
                (false, Err(_)) => (Offload::Uso, false),
            };
        let uring_cap = match std::env::var(features::CAP_ENV) {
            Ok(text) => Some(KernelVersion::parse(&text).ok_or_else(|| {
                Error::Usage(format!(
                    "{}={text}: expected a kernel version such as 6.1",
                    features::CAP_ENV
                ))
            })?),
            Err(_) => None,
        };
        let user = match &args.user {
            None => None,
            Some(name) => Some(
                nix::unistd::User::from_name(name)
                    .ok()
                    .flatten()
                    .ok_or_else(|| Error::Usage(format!("--user {name}: no such user")))?,
            ),
        };
        let interface = args.interface.ok_or_else(|| {
            Error::Usage(
                "-i IFACE is required: the interface relayed flows leave through (see --help)"
                    .into(),
            )
        })?;
        let routes = route_networks(&args.route, &tun_addrs)?;
        let control = control_socket(args.control.as_deref(), &args.tun)?;
        let metrics = match &args.metrics {
            None => None,
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                Error::Usage(format!(
                    "--metrics '{text}': expected ADDR:PORT such as 127.0.0.1:9100 or [::1]:9100"
                ))
            })?),
        };
        if !crate::routing::TABLES.contains(&args.table) {
            return Err(Error::Usage(format!(
                "--table {} out of range {}..={} (it is also the priority of the rules, which must come before the main table's at 32766)",
                args.table,
                crate::routing::TABLES.start(),
                crate::routing::TABLES.end()
            )));
        }
        if sys::interface_index(&interface).is_none() {
            return Err(Error::UnknownInterface(interface));
        }
        let upstream = match &args.upstream {
            Some(url) => parse_upstream(&url.0).map_err(Error::Usage)?,
            None => None,
        };
        Ok(Config {
            interface,
            tun_name: args.tun,
            tun_addrs,
            mtu: args.mtu,
            cpu: args.cpu,
            offload_cap,
            offload_cap_from_env,
            uring_cap,
            max_flows: args.max_flows,
            // More half-open flows than flows could never be reached.
            max_half_open: args.max_half_open.min(args.max_flows),
            flow_buffer: args.flow_buffer,
            memory_limit: parse_size(&args.memory_limit).ok_or_else(|| {
                Error::Usage(format!(
                    "--memory-limit '{}': expected a size such as 64M, 512K or 2G (at least 1M)",
                    args.memory_limit
                ))
            })?,
            connect_timeout: Duration::from_secs(args.connect_timeout),
            user,
            control,
            metrics,
            routes,
            upstream,
            table: args.table,
            udp: crate::flow::datagram::Limits {
                idle_timeout: Duration::from_secs(args.udp_timeout),
                dns_timeout: Duration::from_secs(args.dns_timeout),
                max_flows: args.max_udp_flows,
            },
        })
    }
}

/// Why the kernel would refuse `name` for a new interface, or take it as a template
/// (`%d`, which would give the TUN a name we do not know): its `dev_valid_name` wants
/// 1-15 bytes, not `.` or `..`, without `/`, `:` or white space.
fn check_interface_name(name: &str) -> Result<(), &'static str> {
    // The kernel's isspace(): tab to carriage return, space, and Latin-1's no-break space.
    let space = |byte: u8| matches!(byte, b'\t'..=b'\r' | b' ' | 0xa0);
    match name {
        "" => Err("an interface name cannot be empty"),
        "." | ".." => Err("'.' and '..' are not interface names"),
        _ if name.len() > MAX_INTERFACE_NAME => Err("interface names are at most 15 bytes"),
        _ if name.contains('%') => Err("'%' is not allowed (the kernel reads it as a template)"),
        _ if name.contains(['/', ':', '\0']) => {
            Err("'/', ':' and NUL are not allowed in interface names")
        }
        _ if name.bytes().any(space) => Err("white space is not allowed in interface names"),
        _ => Ok(()),
    }
}

/// The control socket `--control` asks for (`none`: none), by default the TUN's under
/// /run/uringproxy.
fn control_socket(flag: Option<&str>, tun: &str) -> Result<Option<ControlSocket>, Error> {
    let socket = match flag {
        Some("none") => return Ok(None),
        Some("") => return Err(Error::Usage("--control needs a path (or none)".into())),
        Some(path) => ControlSocket {
            path: PathBuf::from(path),
            owns_dir: false,
        },
        None => ControlSocket {
            path: crate::control::socket_path(tun),
            owns_dir: true,
        },
    };
    let len = socket.path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::Usage(format!(
            "--control '{}': {len} bytes, a Unix socket path has at most {MAX_SOCKET_PATH}",
            socket.path.display()
        )));
    }
    Ok(Some(socket))
}

/// The `--route` networks. Each family routed needs a TUN address of that family: the
/// TUN would otherwise lend connections another interface's source address, and with it
/// the bypass rule would send them past the TUN.
/// The ids of the CPUs this process may run on: its affinity mask, which taskset or a
/// cpuset cgroup may have narrowed to ids that are not 0..count.
fn allowed_cpus() -> nix::Result<Vec<usize>> {
    let mask = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&cpu| mask.is_set(cpu).unwrap_or(false))
        .collect())
}

/// `--cpu cpu` is usable if the process may run there; the error names where it may.
fn check_cpu(cpu: usize, allowed: &[usize]) -> Result<(), String> {
    if allowed.contains(&cpu) {
        return Ok(());
    }
    Err(format!(
        "--cpu {cpu}: not among the CPUs this process may run on ({})",
        id_ranges(allowed)
    ))
}

/// Ascending ids as the kernel's cpu lists show them: `0,2-3`.
fn id_ranges(ids: &[usize]) -> String {
    let mut text = String::new();
    let mut rest = ids;
    while let [first, ..] = rest {
        let run = rest
            .iter()
            .zip(*first..)
            .take_while(|(id, expected)| **id == *expected)
            .count();
        let last = rest[run - 1];
        if !text.is_empty() {
            text.push(',');
        }
        text.push_str(&if last == *first {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
        rest = &rest[run..];
    }
    text
}

fn route_networks(texts: &[String], tun_addrs: &[Cidr]) -> Result<Vec<Cidr>, Error> {
    let mut routes = Vec::new();
    for text in texts {
        let route = Cidr::network(text).map_err(|err| Error::Usage(format!("--route {err}")))?;
        if !tun_addrs
            .iter()
            .any(|a| a.addr.is_ipv4() == route.addr.is_ipv4())
        {
            let family = if route.addr.is_ipv4() { "IPv4" } else { "IPv6" };
            return Err(Error::Usage(format!(
                "--route {route} needs an {family} --tun-addr"
            )));
        }
        routes.push(route);
    }
    Ok(routes)
}

/// Parses `--upstream`: `direct`, or a socks5 URL whose host is an address or a name
/// (resolved once, now) and whose user name and password may be %-encoded. The errors
/// never repeat the text, which may hold a password.
fn parse_upstream(text: &str) -> Result<Option<Socks5>, String> {
    if text == "direct" {
        return Ok(None);
    }
    let usage = |why: &str| format!("--upstream: {why} (expected {UPSTREAM_SYNTAX})");
    let is_scheme = |scheme: &str| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    };
    let (scheme, rest) = text
        .split_once("://")
        .filter(|(scheme, _)| is_scheme(scheme))
        .ok_or_else(|| usage("not a URL"))?;
    if !scheme.eq_ignore_ascii_case("socks5") {
        return Err(usage(&format!("unsupported scheme '{scheme}'")));
    }
    let (userinfo, host_port) = match rest.rsplit_once('@') {
        Some((userinfo, host_port)) => (Some(userinfo), host_port),
        None => (None, rest),
    };
    let host_port = host_port.strip_suffix('/').unwrap_or(host_port);
    if host_port.contains(['/', '?', '#']) {
        return Err(usage("a path, query or fragment is not allowed"));
    }
    let (host, port) = match host_port.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| usage("unclosed '['"))?;
            (host, after.strip_prefix(':'))
        }
        None => match host_port.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(usage("an IPv6 address goes in brackets"));
            }
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Err(usage("missing host"));
    }
    let port = port.ok_or_else(|| usage("missing port"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(|| {
            // Only digits are shown: `socks5://user:password` with the host forgotten
            // would put the password here.
            if port.bytes().all(|b| b.is_ascii_digit()) {
                format!("--upstream: port '{port}' is not a number in 1..=65535")
            } else {
                "--upstream: the port is not a number in 1..=65535 (credentials go before \
                 the host: user:pass@HOST:PORT)"
                    .to_string()
            }
        })?;
    let credentials = match userinfo {
        None => None,
        Some(userinfo) => {
            let (user, password) = userinfo
                .split_once(':')
                .ok_or_else(|| usage("a user name needs a password (user:pass@)"))?;
            let decode = |part: &str, what: &str| {
                percent_decode(part)
                    .ok_or_else(|| format!("--upstream: a bad %-escape in the {what}"))
            };
            let (user, password) = (decode(user, "user name")?, decode(password, "password")?);
            Some(
                Credentials::new(&user, &password)
                    .map_err(|why| format!("--upstream: {why} (RFC 1929 takes 1 to 255 bytes)"))?,
            )
        }
    };
    let server = match host.parse::<IpAddr>() {
        Ok(addr) => SocketAddr::new(addr, port),
        Err(_) => (host, port)
            .to_socket_addrs()
            .map_err(|err| format!("--upstream: cannot resolve '{host}': {err}"))?
            .next()
            .ok_or_else(|| format!("--upstream: '{host}' has no address"))?,
    };
    Ok(Some(Socks5 {
        server,
        credentials,
    }))
}

/// `text` with its %XX escapes decoded; `None` for a `%` not followed by two hex digits.
fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = bytes.get(at + 1..at + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            // Two hex digits: valid UTF-8 and a byte.
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    Some(out)
}

/// A byte count with an optional K, M or G suffix (powers of 1024), at least 1 MiB.
fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (at, 'k' | 'K') => (&text[..at], 10),
        (at, 'm' | 'M') => (&text[..at], 20),
        (at, 'g' | 'G') => (&text[..at], 30),
        _ => (text, 0),
    };
    let bytes = digits.parse::<usize>().ok()?.checked_mul(1 << shift)?;
    (bytes >= 1 << 20).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes_and_refuse_garbage() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("1024K"), Some(1 << 20));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        for bad in [
            "",
            "M",
            "64X",
            "-1M",
            "1.5G",
            "512K",
            "99999999999999999999G",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
        let err = Config::from_args(args(&["--memory-limit", "lots"]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--memory-limit 'lots'"), "{err}");
    }

    fn args(extra: &[&str]) -> Args {
        let mut all = vec!["-i", "lo"];
        all.extend_from_slice(extra);
        argh::FromArgs::from_args(&["uringproxy"], &all).unwrap()
    }

    #[test]
    fn defaults_give_one_address_of_each_family() {
        let config = Config::from_args(args(&[])).unwrap();
        assert_eq!(config.tun_name, "uringproxy0");
        assert_eq!(config.mtu, 1500);
        assert_eq!(config.offload_cap, Offload::Uso);
        assert!(config.tun_addrs[0].addr.is_ipv4());
        assert!(config.tun_addrs[1].addr.is_ipv6());
    }

    #[test]
    fn rejects_bad_values_with_a_message_naming_them() {
        let cases: [(&[&str], &str); 8] = [
            (&["--connect-timeout", "1000000000000"], "--connect-timeout"),
            (
                &["--tun-addr", "198.18.0.1/30", "--tun-addr", "198.18.0.1/24"],
                "--tun-addr 198.18.0.1: the same address is given twice",
            ),
            (&["--max-udp-flows", "0"], "--max-udp-flows"),
            (&["--mtu", "100"], "--mtu"),
            (&["--tun-addr", "10.0.0.1"], "10.0.0.1"),
            (&["--tun", "name-that-is-far-too-long"], "--tun"),
            (&["--cpu", "100000"], "--cpu"),
            (&["--max-flows", "0"], "--max-flows"),
        ];
        for (extra, needle) in cases {
            let err = Config::from_args(args(extra)).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn test_overrides_are_each_named_with_their_effect() {
        let mut config = Config::from_args(args(&[])).unwrap();
        config.offload_cap_from_env = false;
        config.uring_cap = None;
        assert!(config.override_warnings().is_empty());
        config.offload_cap = Offload::Tso;
        config.offload_cap_from_env = true;
        config.uring_cap = Some(KernelVersion::new(6, 1));
        assert_eq!(
            config.override_warnings(),
            [
                "URINGPROXY_MAX_OFFLOAD=tso set: TUN offload capped at checksum + TCP segmentation",
                "URINGPROXY_MAX_URING=6.1 set: io_uring features capped to those of Linux 6.1 \
                 (multishot TUN reads off)",
            ]
        );
        config.offload_cap_from_env = false;
        config.uring_cap = Some(KernelVersion::new(6, 7));
        assert_eq!(
            config.override_warnings(),
            [
                "URINGPROXY_MAX_URING=6.7 set: io_uring features capped to those of Linux 6.7 \
                 (nothing off)"
            ]
        );
    }

    #[test]
    fn cpus_are_checked_against_their_ids() {
        assert_eq!(id_ranges(&[0]), "0");
        assert_eq!(id_ranges(&[1]), "1");
        assert_eq!(id_ranges(&[0, 2, 3]), "0,2-3");
        assert_eq!(id_ranges(&[0, 1, 2, 3, 5, 7, 8]), "0-3,5,7-8");
        assert_eq!(id_ranges(&[4, 5, 6, 7]), "4-7");
        assert_eq!(check_cpu(1, &[1]), Ok(()));
        assert_eq!(check_cpu(3, &[0, 2, 3]), Ok(()));
        assert_eq!(
            check_cpu(0, &[1]),
            Err("--cpu 0: not among the CPUs this process may run on (1)".to_string())
        );
        assert_eq!(
            check_cpu(1, &[0, 2, 3]),
            Err("--cpu 1: not among the CPUs this process may run on (0,2-3)".to_string())
        );
        // The mask read here is the test's own: it holds the CPU the test runs on.
        let allowed = allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        assert!(allowed.windows(2).all(|w| w[0] < w[1]), "{allowed:?}");
    }

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        for good in ["uringproxy0", "a", "tun-1_x.y", "123456789012345", "é"] {
            assert_eq!(check_interface_name(good), Ok(()), "{good:?}");
        }
        for (bad, why) in [
            ("", "empty"),
            (".", "'.'"),
            ("..", "'.'"),
            ("1234567890123456", "15 bytes"),
            // 8 characters, 16 bytes.
            ("éééééééé", "15 bytes"),
            ("up%d", "'%'"),
            ("a/b", "'/'"),
            ("eth0:1", "':'"),
            ("a b", "white space"),
            ("a\tb", "white space"),
            ("a\u{b}b", "white space"),
            // U+00E0 is C3 A0 in UTF-8: the kernel's isspace() sees 0xA0.
            ("à", "white space"),
        ] {
            let err = check_interface_name(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let err = Config::from_args(args(&["--tun", "up%d"]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--tun 'up%d': '%'"), "{err}");
    }

    #[test]
    fn the_interface_is_required() {
        let parsed: Args = argh::FromArgs::from_args(&["uringproxy"], &[]).unwrap();
        let err = Config::from_args(parsed).unwrap_err().to_string();
        assert!(err.starts_with("-i IFACE is required"), "{err}");
    }

    #[test]
    fn route_networks_and_tables() {
        let config = Config::from_args(args(&[
            "--route",
            "0.0.0.0/1",
            "--route",
            "128.0.0.0/1",
            "--route",
            "::/0",
            "--table",
            "30070",
        ]))
        .unwrap();
        assert_eq!(config.routes.len(), 3);
        assert_eq!(config.table, 30070);
        assert_eq!(Config::from_args(args(&[])).unwrap().table, 30064);
        let cases: [(&[&str], &str); 6] = [
            (
                &["--route", "10.1.2.3/24"],
                "--route '10.1.2.3/24' has host bits set: the network is 10.1.2.0/24",
            ),
            (&["--route", "garbage"], "--route 'garbage': expected"),
            (
                &["--table", "30063"],
                "--table 30063 out of range 30064..=32765",
            ),
            (&["--table", "32766"], "--table 32766 out of range"),
            (
                &["--tun-addr", "198.18.0.1/30", "--route", "::/0"],
                "--route ::/0 needs an IPv6 --tun-addr",
            ),
            (&["--tun-addr", "10.0.0.0/8/1"], "--tun-addr '10.0.0.0/8/1'"),
        ];
        for (extra, start) in cases {
            let err = Config::from_args(args(extra)).unwrap_err().to_string();
            assert!(
                err.starts_with(start),
                "{err:?} does not start with {start:?}"
            );
        }
    }

    #[test]
    fn control_socket_and_metrics_address() {
        let config = Config::from_args(args(&["--tun", "t0"])).unwrap();
        let socket = config.control.unwrap();
        assert_eq!(socket.path, PathBuf::from("/run/uringproxy/t0.sock"));
        assert!(socket.owns_dir);
        assert_eq!(config.metrics, None);
        let config = Config::from_args(args(&["--control", "none"])).unwrap();
        assert_eq!(config.control, None);
        let config = Config::from_args(args(&[
            "--control",
            "/tmp/x.sock",
            "--metrics",
            "[::1]:9100",
        ]))
        .unwrap();
        assert_eq!(
            config.control,
            Some(ControlSocket {
                path: "/tmp/x.sock".into(),
                owns_dir: false
            })
        );
        assert_eq!(config.metrics, Some("[::1]:9100".parse().unwrap()));
        let long = format!("/tmp/{}", "x".repeat(103));
        for (extra, start) in [
            (&["--control", ""][..], "--control needs a path"),
            (&["--control", long.as_str()], "--control '/tmp/xxx"),
            (
                &["--metrics", "9100"],
                "--metrics '9100': expected ADDR:PORT",
            ),
            (
                &["--metrics", "localhost:9100"],
                "--metrics 'localhost:9100'",
            ),
        ] {
            let err = Config::from_args(args(extra)).unwrap_err().to_string();
            assert!(
                err.starts_with(start),
                "{err:?} does not start with {start:?}"
            );
        }
        assert!(Config::from_args(args(&["--control", &long[..107]])).is_ok());
    }

    #[test]
    fn upstream_urls_are_parsed_strictly_and_never_echoed() {
        let parse = |text: &str| parse_upstream(text);
        assert!(parse("direct").unwrap().is_none());
        let plain = parse("socks5://192.0.2.1:1080").unwrap().unwrap();
        assert_eq!(plain.server, "192.0.2.1:1080".parse().unwrap());
        assert!(plain.credentials.is_none());
        let v6 = parse("SOCKS5://[2001:db8::1]:1080/").unwrap().unwrap();
        assert_eq!(v6.server, "[2001:db8::1]:1080".parse().unwrap());
        let named = parse("socks5://localhost:9050").unwrap().unwrap();
        assert!(named.server.ip().is_loopback(), "{named:?}");
        // %-escapes, and an '@' in the password left raw: the host follows the last one.
        let with = parse("socks5://al%69ce:p%40ss@w@rd@192.0.2.1:1080")
            .unwrap()
            .unwrap();
        assert_eq!(
            with.credentials,
            Some(Credentials::new(b"alice", b"p@ss@w@rd").unwrap())
        );
        let long = "a".repeat(256);
        let cases = [
            ("http://192.0.2.1:3128", "unsupported scheme 'http'"),
            ("192.0.2.1:1080", "not a URL"),
            ("socks5://192.0.2.1", "missing port"),
            ("socks5://192.0.2.1:", "port '' is not a number"),
            ("socks5://192.0.2.1:0", "port '0' is not a number"),
            ("socks5://192.0.2.1:65536", "port '65536'"),
            ("socks5://:1080", "missing host"),
            ("socks5://2001:db8::1:1080", "brackets"),
            ("socks5://[2001:db8::1:1080", "unclosed"),
            ("socks5://192.0.2.1:1080/path", "path"),
            ("socks5://secretuser@192.0.2.1:1080", "needs a password"),
            (
                "socks5://u:sec%zzret@192.0.2.1:1080",
                "bad %-escape in the password",
            ),
            ("socks5://:secret@192.0.2.1:1080", "user name is empty"),
            ("socks5://alice:secret", "the port is not a number"),
            (
                "socks5://u:sec%+1ret@192.0.2.1:1080",
                "bad %-escape in the password",
            ),
            ("socks5://u:@192.0.2.1:1080", "password is empty"),
            // A cut-off escape, one in the user name, a query, a fragment.
            (
                "socks5://u:secret%4@192.0.2.1:1080",
                "bad %-escape in the password",
            ),
            (
                "socks5://us%er:secret@192.0.2.1:1080",
                "bad %-escape in the user name",
            ),
            ("socks5://192.0.2.1:1080?secret", "query"),
            ("socks5://192.0.2.1:1080#secret", "fragment"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.starts_with("--upstream: "), "{err}");
            assert!(err.contains(expected), "{text}: {err}");
            assert!(!err.contains("secret"), "{text}: {err}");
            assert!(!err.contains('\n'));
        }
        let err = parse(&format!("socks5://{long}:p@192.0.2.1:1080")).unwrap_err();
        assert!(err.contains("user name is longer than 255 bytes"), "{err}");
        let err = parse(&format!("socks5://u:{long}@192.0.2.1:1080")).unwrap_err();
        assert!(err.contains("password is longer than 255 bytes"), "{err}");
        assert!(!err.contains(&long));
        // The configuration as a whole does not show the password either.
        let config = Config::from_args(args(&[
            "--upstream",
            "socks5://alice:hunter2@192.0.2.1:1080",
        ]))
        .unwrap();
        let shown = format!("{config:?}");
        assert!(
            shown.contains("192.0.2.1:1080") && !shown.contains("hunter2"),
            "{shown}"
        );
        let err = Config::from_args(args(&["--upstream", "ftp://x"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--upstream: unsupported scheme 'ftp'"),
            "{err}"
        );
    }

    #[test]
    fn unknown_interface_is_named() {
        let parsed: Args =
            argh::FromArgs::from_args(&["uringproxy"], &["-i", "nosuchif0"]).unwrap();
        let err = Config::from_args(parsed).unwrap_err().to_string();
        assert!(err.contains("nosuchif0"));
    }
}
