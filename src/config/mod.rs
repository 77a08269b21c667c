//! The configuration the proxy runs with, validated from the command line alone: no
//! host I/O here, so what needs the host (the interface, the CPU mask, the user, the
//! upstream's address) is checked by `event_loop` before it creates anything.

mod dns;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use dns::FakeDns;
pub use upstream::Socks5;

use crate::cli::Args;
use crate::error::Error;
pub use crate::routing::UidRange;
use crate::uring::{KernelVersion, features};
use crate::wire::{Cidr, Offload};

/// Default TUN addresses: the RFC 2544 benchmarking range and a ULA prefix, both
/// unlikely to clash with a LAN.
pub const DEFAULT_TUN_ADDRS: [&str; 2] = ["198.18.0.1/30", "fd7a:7072:7879::1/64"];

/// Everything the proxy needs to run, each value checked on its own and against the
/// others.
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
    /// `--lan`: interfaces whose forwarded traffic goes into the TUN.
    pub lans: Vec<String>,
    /// `--exclude`: destinations that never go into the TUN.
    pub excludes: Vec<Cidr>,
    /// `--uid`: the users whose host connections go in (empty: all).
    pub uids: Vec<UidRange>,
    /// `--exclude-uid`: the users whose host connections stay direct.
    pub exclude_uids: Vec<UidRange>,
    /// The name of the user to switch to once set up.
    pub user: Option<String>,
    /// The control socket to serve (`None`: `--control none`).
    pub control: Option<ControlSocket>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The SOCKS5 proxy flows go through; `None`: direct.
    pub upstream: Option<Socks5>,
    /// Fake-IP DNS (`--dns fake`); `None`: DNS is relayed like any UDP.
    pub dns: Option<FakeDns>,
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

    /// Validates `args`: parses addresses, checks ranges and names.
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
        let interface = args.interface.ok_or_else(|| {
            Error::Usage(
                "-i IFACE is required: the interface relayed flows leave through (see --help)"
                    .into(),
            )
        })?;
        let routes = route_networks(&args.route, &tun_addrs)?;
        let lans = lan_interfaces(&args.lan, &args.tun, &interface)?;
        let excludes = args
            .exclude
            .iter()
            .map(|text| match Cidr::network(text) {
                Ok(cidr) if cidr.prefix == 0 => Err(Error::Usage(format!(
                    "--exclude {cidr} excludes everything of its family: leave its --route out instead"
                ))),
                Ok(cidr) => Ok(cidr),
                Err(err) => Err(Error::Usage(format!("--exclude {err}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let uids = uid_ranges("--uid", &args.uid, &routes)?;
        let exclude_uids = uid_ranges("--exclude-uid", &args.exclude_uid, &routes)?;
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
        let upstream = match &args.upstream {
            Some(url) => upstream::parse(&url.0).map_err(Error::Usage)?,
            None => None,
        };
        let dns = dns::parse(
            &dns::Flags {
                dns: args.dns.as_deref(),
                ranges: &args.fake_range,
                entries: args.fake_entries,
                server: args.dns_server.as_deref(),
                upstream: upstream.is_some(),
            },
            &tun_addrs,
        )
        .map_err(Error::Usage)?;
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
            user: args.user,
            control,
            metrics,
            routes,
            lans,
            excludes,
            uids,
            exclude_uids,
            upstream,
            dns,
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

/// The `--lan` interfaces, each once. A LAN is where forwarded traffic comes from: the
/// TUN (whose replies would go round in circles) and `-i` (where relayed flows leave)
/// cannot be one. Whether it exists is asked of the host later.
fn lan_interfaces(texts: &[String], tun: &str, interface: &str) -> Result<Vec<String>, Error> {
    let mut lans: Vec<String> = Vec::new();
    for name in texts {
        check_interface_name(name).map_err(|why| Error::Usage(format!("--lan '{name}': {why}")))?;
        if name == tun {
            return Err(Error::Usage(format!(
                "--lan {name}: that is the proxy's own TUN; name the interface the LAN's clients are on"
            )));
        }
        if name == interface {
            return Err(Error::Usage(format!(
                "--lan {name}: that is -i, where relayed flows leave; a LAN must be another interface"
            )));
        }
        if !lans.contains(name) {
            lans.push(name.clone());
        }
    }
    Ok(lans)
}

/// `--uid` or `--exclude-uid` ranges: they pick among the host's connections that
/// `--route` sends in, so they mean nothing without one.
fn uid_ranges(flag: &str, texts: &[String], routes: &[Cidr]) -> Result<Vec<UidRange>, Error> {
    let ranges = texts
        .iter()
        .map(|text| {
            text.parse()
                .map_err(|why| Error::Usage(format!("{flag} {why}")))
        })
        .collect::<Result<Vec<UidRange>, _>>()?;
    if !ranges.is_empty() && routes.is_empty() {
        return Err(Error::Usage(format!(
            "{flag} selects among the host's connections that --route sends into the TUN: give a --route too"
        )));
    }
    Ok(ranges)
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
        let cases: [(&[&str], &str); 7] = [
            (&["--connect-timeout", "1000000000000"], "--connect-timeout"),
            (
                &["--tun-addr", "198.18.0.1/30", "--tun-addr", "198.18.0.1/24"],
                "--tun-addr 198.18.0.1: the same address is given twice",
            ),
            (&["--max-udp-flows", "0"], "--max-udp-flows"),
            (&["--mtu", "100"], "--mtu"),
            (&["--tun-addr", "10.0.0.1"], "10.0.0.1"),
            (&["--tun", "name-that-is-far-too-long"], "--tun"),
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
    fn nothing_is_asked_of_the_host() {
        // None of these exist; `event_loop`'s host checks say so, not the configuration.
        let parsed: Args = argh::FromArgs::from_args(
            &["uringproxy"],
            &[
                "-i",
                "nosuchif0",
                "--user",
                "nosuchuser0",
                "--cpu",
                "100000",
                "--upstream",
                "socks5://nosuchhost.invalid:1080",
            ],
        )
        .unwrap();
        let config = Config::from_args(parsed).unwrap();
        assert_eq!(config.interface, "nosuchif0");
        assert_eq!(config.user.as_deref(), Some("nosuchuser0"));
        assert_eq!(config.cpu, Some(100000));
        assert_eq!(config.upstream.unwrap().host, "nosuchhost.invalid");
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
    fn lans_excludes_and_users() {
        let config = Config::from_args(args(&[
            "--lan",
            "br-lan",
            "--lan",
            "eth1",
            "--lan",
            "br-lan",
            "--exclude",
            "192.0.2.0/24",
            "--exclude",
            "2001:db8::1/128",
            "--route",
            "0.0.0.0/0",
            "--uid",
            "1000-1999",
            "--exclude-uid",
            "34",
        ]))
        .unwrap();
        assert_eq!(config.lans, ["br-lan", "eth1"]);
        assert_eq!(config.excludes.len(), 2);
        assert_eq!((config.uids[0].first, config.uids[0].last), (1000, 1999));
        assert_eq!(
            (config.exclude_uids[0].first, config.exclude_uids[0].last),
            (34, 34)
        );
        let cases: [(&[&str], &str); 9] = [
            (&["--exclude", "::/0"], "--exclude ::/0 excludes everything"),
            (
                &["--lan", "uringproxy0"],
                "--lan uringproxy0: that is the proxy's own TUN",
            ),
            (
                &["--tun", "t1", "--lan", "t1"],
                "--lan t1: that is the proxy's own TUN",
            ),
            (&["--lan", "lo"], "--lan lo: that is -i"),
            (&["--lan", "a/b"], "--lan 'a/b': '/'"),
            (
                &["--exclude", "192.0.2.1/24"],
                "--exclude '192.0.2.1/24' has host bits set: the network is 192.0.2.0/24",
            ),
            (
                &["--route", "::/0", "--uid", "x"],
                "--uid 'x': expected a user id",
            ),
            (
                &["--route", "::/0", "--exclude-uid", "9-1"],
                "--exclude-uid '9-1': the range is reversed",
            ),
            (
                &["--uid", "1000"],
                "--uid selects among the host's connections that --route sends",
            ),
        ];
        for (extra, start) in cases {
            let err = Config::from_args(args(extra)).unwrap_err().to_string();
            assert!(
                err.starts_with(start),
                "{err:?} does not start with {start:?}"
            );
            assert!(!err.contains('\n'), "{err}");
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
    fn the_upstream_password_is_not_shown() {
        let config = Config::from_args(args(&[
            "--upstream",
            "socks5://alice:hunter2@192.0.2.1:1080",
        ]))
        .unwrap();
        let shown = format!("{config:?}");
        assert!(
            shown.contains("192.0.2.1") && !shown.contains("hunter2"),
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
}
