//! The validated configuration the proxy runs with, built from the command line.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use crate::cli::Args;
use crate::error::Error;
use crate::sys;
use crate::tun::Offload;
use crate::uring::{KernelVersion, features};

/// An interface address with its prefix length, such as `198.18.0.1/30`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("bad CIDR '{text}': expected ADDRESS/PREFIX, e.g. 198.18.0.1/30");
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("bad CIDR '{text}': prefix longer than {max}"));
        }
        if addr.is_unspecified() || addr.is_multicast() {
            return Err(format!("bad CIDR '{text}': address must be unicast"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// A destination network for `--route`: like an address, but `0.0.0.0/0` and `::/0`
    /// (everything) are allowed.
    pub fn network(text: &str) -> Result<Cidr, String> {
        match text.split_once('/') {
            Some(("0.0.0.0", "0")) => Ok(Cidr {
                addr: IpAddr::from([0u8; 4]),
                prefix: 0,
            }),
            Some(("::", "0")) => Ok(Cidr {
                addr: IpAddr::from([0u16; 8]),
                prefix: 0,
            }),
            _ => text.parse(),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

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
    /// Use only the io_uring features of this kernel version (URINGPROXY_MAX_URING).
    pub uring_cap: Option<KernelVersion>,
    pub max_flows: usize,
    pub max_half_open: usize,
    pub flow_buffer: usize,
    pub connect_timeout: Duration,
    pub udp: crate::relay::datagram::Limits,
    /// Destinations to route into the TUN (policy rules installed and removed by us).
    pub routes: Vec<Cidr>,
    /// The user to switch to once set up.
    pub user: Option<nix::unistd::User>,
}

/// Environment variable capping the offload probe (none, header, csum, tso, uso).
pub const OFFLOAD_CAP_ENV: &str = "URINGPROXY_MAX_OFFLOAD";

/// Smallest MTU IPv6 allows; IPv4 alone could go lower but no real link does.
const MIN_MTU: u32 = 1280;
/// Longest timeout accepted (a day): bigger values are typos, and would overflow the
/// kernel's timespec arithmetic.
const MAX_TIMEOUT_SECS: u64 = 86_400;
/// smoltcp and the TUN length fields are 16-bit.
const MAX_MTU: u32 = 65535;

impl Config {
    /// Validates `args`: parses addresses, checks ranges and that the interface exists.
    pub fn from_args(args: Args) -> Result<Config, Error> {
        let addr_texts: Vec<String> = if args.tun_addr.is_empty() {
            DEFAULT_TUN_ADDRS.iter().map(|s| s.to_string()).collect()
        } else {
            args.tun_addr
        };
        let tun_addrs = addr_texts
            .iter()
            .map(|text| text.parse::<Cidr>().map_err(Error::Usage))
            .collect::<Result<Vec<_>, _>>()?;
        if !(MIN_MTU..=MAX_MTU).contains(&args.mtu) {
            return Err(Error::Usage(format!(
                "--mtu {} out of range {MIN_MTU}..={MAX_MTU}",
                args.mtu
            )));
        }
        if args.tun.is_empty() || args.tun.len() > 15 || args.tun.contains(['/', ' ', '\0']) {
            return Err(Error::Usage(format!(
                "--tun '{}' is not a valid interface name (1-15 characters)",
                args.tun
            )));
        }
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
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if cpu >= cores {
                return Err(Error::Usage(format!(
                    "--cpu {cpu}: this machine has cores 0..{}",
                    cores - 1
                )));
            }
        }
        // Tests cap the probe to exercise each fallback level on any kernel.
        let offload_cap = match (args.no_offload, std::env::var(OFFLOAD_CAP_ENV)) {
            (true, _) => Offload::None,
            (false, Ok(text)) => Offload::parse(&text).ok_or_else(|| {
                Error::Usage(format!(
                    "{OFFLOAD_CAP_ENV}={text}: expected none, header, csum, tso or uso"
                ))
            })?,
            (false, Err(_)) => Offload::Uso,
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
        if sys::interface_index(&args.interface).is_none() {
            return Err(Error::UnknownInterface(args.interface));
        }
        Ok(Config {
            interface: args.interface,
            tun_name: args.tun,
            tun_addrs,
            mtu: args.mtu,
            cpu: args.cpu,
            offload_cap,
            uring_cap,
            max_flows: args.max_flows,
            // More half-open flows than flows could never be reached.
            max_half_open: args.max_half_open.min(args.max_flows),
            flow_buffer: args.flow_buffer,
            connect_timeout: Duration::from_secs(args.connect_timeout),
            user,
            routes: args
                .route
                .iter()
                .map(|text| Cidr::network(text).map_err(Error::Usage))
                .collect::<Result<Vec<_>, _>>()?,
            udp: crate::relay::datagram::Limits {
                idle_timeout: Duration::from_secs(args.udp_timeout),
                dns_timeout: Duration::from_secs(args.dns_timeout),
                max_flows: args.max_udp_flows,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_and_ipv6_cidrs() {
        let v4: Cidr = "198.18.0.1/30".parse().unwrap();
        assert_eq!(v4.addr, "198.18.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(v4.prefix, 30);
        let v6: Cidr = "fd7a:7072:7879::1/64".parse().unwrap();
        assert_eq!(v6.prefix, 64);
        assert_eq!(v6.to_string(), "fd7a:7072:7879::1/64");
    }

    #[test]
    fn rejects_malformed_cidrs() {
        for bad in [
            "",
            "1.2.3.4",
            "1.2.3.4/",
            "1.2.3.4/33",
            "::1/129",
            "x/24",
            "1.2.3/24",
            "0.0.0.0/8",
            "224.0.0.1/4",
            "1.2.3.4/-1",
            "1.2.3.4/24/1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "accepted {bad:?}");
        }
    }

    fn args(extra: &[&str]) -> Args {
        let mut all = vec!["-i", "lo"];
        all.extend_from_slice(extra);
        argh::FromArgs::from_args(&["uringproxy"], &all).unwrap()
    }

    #[test]
    fn route_networks_include_everything() {
        assert_eq!(Cidr::network("0.0.0.0/0").unwrap().prefix, 0);
        assert!(Cidr::network("::/0").unwrap().addr.is_ipv6());
        assert_eq!(Cidr::network("10.0.0.0/8").unwrap().prefix, 8);
        assert!(Cidr::network("0.0.0.0/8").is_err());
        assert!(Cidr::network("nonsense").is_err());
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
    fn unknown_interface_is_named() {
        let parsed: Args =
            argh::FromArgs::from_args(&["uringproxy"], &["-i", "nosuchif0"]).unwrap();
        let err = Config::from_args(parsed).unwrap_err().to_string();
        assert!(err.contains("nosuchif0"));
    }
}
