//! The command line: the flags of the proxy, of `demo` and of `status`, parsed by argh,
//! with argh's parse errors turned into one-line start-up errors. Only parsing: the
//! values are validated in `config`, and the commands run elsewhere.

use argh::{EarlyExit, FromArgs};
use log::LevelFilter;

use crate::error::Error;
use crate::logger;

/// The TUN created unless `--tun` names another (and the one `status` asks by default).
pub const DEFAULT_TUN: &str = "uringproxy0";

/// uringproxy: a transparent TUN proxy that relays every TCP and UDP flow (and ping)
/// routed into its TUN device through ordinary kernel sockets bound to one physical
/// interface. `uringproxy demo` (as root) shows it working between two network
/// namespaces without touching the host's routing; `uringproxy status` shows a running
/// proxy's counters and flows.
#[derive(FromArgs, Debug)]
#[argh(
    usage = "-i <interface> [<options>]\n       uringproxy demo [--bytes <bytes>] [--no-offload]\n       uringproxy status [--tun <name> | --control <path>] [--json] [--top <n>]",
    help_triggers("-h", "--help", "help")
)]
pub struct Args {
    /// outbound interface that relayed connections leave through (SO_BINDTODEVICE);
    /// required
    // Optional for argh, so that `--version` needs no `-i`; `config` requires it.
    #[argh(option, short = 'i')]
    pub interface: Option<String>,

    /// name of the TUN device to create (default: uringproxy0)
    #[argh(option, default = "String::from(DEFAULT_TUN)")]
    pub tun: String,

    /// address of the TUN device as CIDR, repeatable, IPv4 and/or IPv6
    /// (default: 198.18.0.1/30 and fd7a:7072:7879::1/64)
    #[argh(option)]
    pub tun_addr: Vec<String>,

    /// route new connections to this network into the TUN (policy rules, removed at
    /// exit), repeatable, IPv4 and/or IPv6; 0.0.0.0/0 and ::/0 route everything, and the
    /// host's own servers keep answering their clients directly
    #[argh(option)]
    pub route: Vec<String>,

    /// on a router: send new connections forwarded from this interface (a LAN, e.g.
    /// br-lan) into the TUN, IPv4 and IPv6, repeatable; traffic to the router itself and
    /// to networks with a route of their own in the main table (other LANs) stays direct
    #[argh(option)]
    pub lan: Vec<String>,

    /// destinations that never go into the TUN, for the host's and the LAN's traffic,
    /// as CIDR, repeatable; beats --route (an --upstream's address is excluded always)
    #[argh(option)]
    pub exclude: Vec<String>,

    /// with --route: only this user's connections go into the TUN, a uid or a range
    /// N-M, repeatable (default: every user)
    #[argh(option)]
    pub uid: Vec<String>,

    /// with --route: this user's connections stay direct, a uid or a range N-M,
    /// repeatable
    #[argh(option)]
    pub exclude_uid: Vec<String>,

    /// routing table for --route and --lan, also the priority of --route's rules; one per running
    /// proxy, 30064..=32765 (default: 30064)
    #[argh(option, default = "crate::routing::DEFAULT_TABLE")]
    pub table: u32,

    /// MTU of the TUN device (default: 1500)
    #[argh(option, default = "1500")]
    pub mtu: u32,

    /// pin the proxy's thread to this CPU core
    #[argh(option)]
    pub cpu: Option<usize>,

    /// after set-up, run as this user, keeping only CAP_NET_ADMIN and CAP_NET_RAW
    #[argh(option)]
    pub user: Option<String>,

    /// disable checksum and segmentation offload on the TUN device
    #[argh(switch)]
    pub no_offload: bool,

    /// most TCP flows relayed at once; further SYNs are answered with RST (default: 16384)
    #[argh(option, default = "16384")]
    pub max_flows: usize,

    /// most TCP flows waiting for their outbound connect; past it the oldest is reset to
    /// make room, so a SYN flood cannot lock out real clients (default: 1024)
    #[argh(option, default = "1024")]
    pub max_half_open: usize,

    /// bytes of receive and of send buffer for each relayed flow: the most it may grow
    /// to (default: 1048576)
    #[argh(option, default = "1048576")]
    pub flow_buffer: usize,

    /// memory for the buffers of all flows together, e.g. 64M or 1G; flows start with
    /// 16 KiB each way and grow within it (default: 64M)
    #[argh(option, default = "String::from(\"64M\")")]
    pub memory_limit: String,

    /// seconds to wait for an outbound connect (through --upstream: the connect and the
    /// SOCKS5 handshake) before the client gets RST (default: 10)
    #[argh(option, default = "10")]
    pub connect_timeout: u64,

    /// where relayed flows go: direct (default), or socks5://[user:pass@]HOST:PORT, a
    /// SOCKS5 proxy reached through -i that relays TCP by CONNECT and UDP by UDP
    /// ASSOCIATE; ping is then refused
    #[argh(option)]
    pub upstream: Option<UpstreamUrl>,

    /// answer DNS queries entering the TUN (UDP and TCP, port 53, any address) with
    /// fake addresses; flows to them connect by name through --upstream, so names are
    /// resolved by the upstream, never here: fake (needs --upstream)
    #[argh(option)]
    pub dns: Option<String>,

    /// range fake addresses are taken from, routed into the TUN; at most one IPv4 and
    /// one IPv6 (default: a /16 of 198.18.0.0/15 off --tun-addr, and a /64 in the TUN
    /// address's /48)
    #[argh(option)]
    pub fake_range: Vec<String>,

    /// names the fake-address table holds; past it the least recently used name no
    /// flow uses is forgotten (default: 65536, or as many as the IPv4 range holds: 65534
    /// in a /16)
    #[argh(option)]
    pub fake_entries: Option<usize>,

    /// DNS server (ADDR:PORT) queries of other types than A, AAAA, HTTPS, SVCB and PTR
    /// go to, over TCP through --upstream (default: none, they are refused)
    #[argh(option)]
    pub dns_server: Option<String>,

    /// seconds a UDP flow may stay idle before its socket is closed (default: 60)
    #[argh(option, default = "60")]
    pub udp_timeout: u64,

    /// seconds a UDP flow to port 53 (DNS) may stay idle (default: 10)
    #[argh(option, default = "10")]
    pub dns_timeout: u64,

    /// most UDP flows at once; the longest idle is closed to make room (default: 4096)
    #[argh(option, default = "4096")]
    pub max_udp_flows: usize,

    /// unix socket `uringproxy status` asks, or `none`; only the proxy's user (see
    /// --user) and root may connect (default: /run/uringproxy/TUN.sock)
    #[argh(option)]
    pub control: Option<String>,

    /// serve Prometheus metrics at http://ADDR:PORT/metrics, e.g. 127.0.0.1:9100;
    /// a non-loopback address serves anyone who can reach it (default: off)
    #[argh(option)]
    pub metrics: Option<String>,

    /// log level, overriding RUST_LOG: off, error, warn, info, debug or trace
    /// (default: info)
    #[argh(option, from_str_fn(logger::parse_level))]
    pub log_level: Option<LevelFilter>,

    /// print the version and exit
    #[argh(switch, short = 'V')]
    pub version: bool,
}

/// The text of `--upstream`, which may hold a password: its `Debug` does not show it
/// (the parsed arguments are printed in debugging output).
pub struct UpstreamUrl(pub String);

impl std::str::FromStr for UpstreamUrl {
    type Err = std::convert::Infallible;

    /// Never fails here: `config` checks the URL, in errors that do not repeat it.
    fn from_str(text: &str) -> Result<UpstreamUrl, Self::Err> {
        Ok(UpstreamUrl(text.to_string()))
    }
}

impl std::fmt::Debug for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamUrl(<redacted>)")
    }
}

/// Shows uringproxy relaying TCP (both ways, hash-checked), UDP and ping between two
/// network namespaces it creates and removes again, without touching the host's routing.
/// Needs root.
#[derive(FromArgs, Debug)]
#[argh(help_triggers("-h", "--help", "help"))]
pub struct DemoArgs {
    /// bytes of TCP to move each way (default: 268435456, i.e. 256 MiB)
    #[argh(option, default = "256 << 20")]
    pub bytes: u64,

    /// run the proxy with --no-offload
    #[argh(switch)]
    pub no_offload: bool,
}

/// Shows a running proxy: its TUN, interface, offload and uptime, its counters, and
/// every live flow (protocol, client and server, state, bytes each way, age and idle
/// time), most bytes first. Asks over the proxy's control socket.
#[derive(FromArgs, Debug)]
#[argh(help_triggers("-h", "--help", "help"))]
pub struct StatusArgs {
    /// the proxy's --tun: its control socket is /run/uringproxy/NAME.sock
    /// (default: uringproxy0)
    #[argh(option)]
    pub tun: Option<String>,

    /// the proxy's control socket, for one started with --control PATH
    #[argh(option)]
    pub control: Option<String>,

    /// print one JSON object instead of text
    #[argh(switch)]
    pub json: bool,

    /// list only the N flows that moved the most bytes
    #[argh(option)]
    pub top: Option<usize>,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Args>),
    Demo(DemoArgs),
    Status(StatusArgs),
    /// Help or the version: text for stdout, nothing else to do.
    Print(String),
}

/// Parses the process's arguments.
pub fn from_env() -> Result<Command, Error> {
    let args = std::env::args_os()
        .skip(1)
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| Error::Usage(format!("argument {arg:?} is not valid UTF-8")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    parse(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Parses `args` (without the program name). `demo` or `status` as the first argument
/// selects the demo or the status client, whose flags are their own.
pub fn parse(args: &[&str]) -> Result<Command, Error> {
    match args.split_first() {
        Some((&"demo", rest)) => {
            return match DemoArgs::from_args(&["uringproxy", "demo"], rest) {
                Ok(args) => Ok(Command::Demo(args)),
                Err(exit) => early_exit(exit, "uringproxy demo --help"),
            };
        }
        Some((&"status", rest)) => {
            return match StatusArgs::from_args(&["uringproxy", "status"], rest) {
                Ok(args) => Ok(Command::Status(args)),
                Err(exit) => early_exit(exit, "uringproxy status --help"),
            };
        }
        _ => {}
    }
    match Args::from_args(&["uringproxy"], args) {
        Ok(args) if args.version => Ok(Command::Print(format!(
            "uringproxy {}\n",
            env!("CARGO_PKG_VERSION")
        ))),
        Ok(args) => Ok(Command::Run(Box::new(args))),
        Err(exit) => early_exit(exit, "--help"),
    }
}

/// argh stopped early: help to print, or a parse error made one line.
fn early_exit(exit: EarlyExit, help: &str) -> Result<Command, Error> {
    match exit.status {
        Ok(()) => Ok(Command::Print(exit.output)),
        Err(()) => Err(Error::Usage(format!(
            "{} (see {help})",
            one_line(&exit.output)
        ))),
    }
}

/// argh's error text as one line in the style of our own (`--mtu abc: invalid digit
/// found in string`): its lines joined, the first letter lower-case, no final stop.
fn one_line(output: &str) -> String {
    let text = output.split_whitespace().collect::<Vec<_>>().join(" ");
    // argh: "Error parsing option '{flag}' with value '{value}': {reason}".
    let text = text
        .strip_prefix("Error parsing option '")
        .and_then(|rest| rest.split_once("' with value '"))
        .and_then(|(flag, rest)| {
            let (value, reason) = rest.split_once("': ")?;
            Some(format!("{flag} {value}: {reason}"))
        })
        .unwrap_or(text);
    let text = text.strip_suffix('.').unwrap_or(&text);
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_lowercase().chain(chars).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(args: &[&str]) -> String {
        match parse(args) {
            Err(Error::Usage(text)) => text,
            other => panic!("{args:?}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn parse_errors_are_one_line_naming_the_flag() {
        for (args, expected) in [
            (
                &["--mtu", "abc"][..],
                "--mtu abc: invalid digit found in string (see --help)",
            ),
            (
                &["-i", "eth0", "--bogus"],
                "unrecognized argument: --bogus (see --help)",
            ),
            (&["-i"], "no value provided for option '-i' (see --help)"),
            (
                &["--log-level", "loud"],
                "--log-level loud: 'loud' is not one of off, error, warn, info, debug, trace (see --help)",
            ),
            (
                &["demo", "--bytes", "x"],
                "--bytes x: invalid digit found in string (see uringproxy demo --help)",
            ),
        ] {
            assert_eq!(error(args), expected, "{args:?}");
        }
    }

    #[test]
    fn help_and_version_print_and_list_the_demo() {
        for flag in ["-h", "--help", "help"] {
            let Ok(Command::Print(text)) = parse(&[flag]) else {
                panic!("{flag} printed no help");
            };
            assert!(
                text.starts_with("Usage: uringproxy -i <interface>"),
                "{text}"
            );
            assert!(text.contains("\n       uringproxy demo "), "{text}");
            assert!(text.contains("\n       uringproxy status "), "{text}");
            assert!(text.contains("-V, --version"), "{text}");
            assert!(text.contains("--log-level"), "{text}");
        }
        for flag in ["-V", "--version"] {
            let Ok(Command::Print(text)) = parse(&[flag]) else {
                panic!("{flag} printed no version");
            };
            assert_eq!(text, format!("uringproxy {}\n", env!("CARGO_PKG_VERSION")));
        }
        let Ok(Command::Print(text)) = parse(&["demo", "-h"]) else {
            panic!("demo -h printed no help");
        };
        assert!(text.contains("--bytes"), "{text}");
    }

    #[test]
    fn status_takes_its_own_flags() {
        let Ok(Command::Status(args)) = parse(&["status", "--json", "--top", "5", "--tun", "t0"])
        else {
            panic!("not the status client");
        };
        assert!(args.json);
        assert_eq!((args.top, args.tun.as_deref()), (Some(5), Some("t0")));
        assert_eq!(
            error(&["status", "--top", "many"]),
            "--top many: invalid digit found in string (see uringproxy status --help)"
        );
        assert_eq!(
            error(&["status", "-i", "eth0"]),
            "unrecognized argument: -i (see uringproxy status --help)"
        );
        let Ok(Command::Print(text)) = parse(&["status", "--help"]) else {
            panic!("status --help printed nothing");
        };
        assert!(text.contains("--json") && text.contains("--top"), "{text}");
    }

    #[test]
    fn the_upstream_url_is_not_shown_in_debug_output() {
        let Ok(Command::Run(args)) = parse(&["-i", "eth0", "--upstream", "socks5://u:hunter2@h:1"])
        else {
            panic!("--upstream not parsed");
        };
        let shown = format!("{args:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn demo_is_only_a_first_argument() {
        assert!(matches!(parse(&["demo"]), Ok(Command::Demo(_))));
        assert!(matches!(
            parse(&["-i", "demo"]),
            Ok(Command::Run(args)) if args.interface.as_deref() == Some("demo")
        ));
    }
}
