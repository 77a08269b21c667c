//! `--dns fake` and its flags: the fake ranges, the table size and the server forwarded
//! to, checked against the TUN's addresses without asking the host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::wire::Cidr;

/// `--fake-entries` unless given and the IPv4 range holds as many: a /16 holds 65,534.
pub const DEFAULT_ENTRIES: usize = 65_536;
/// The default IPv4 range is the first /16 of the RFC 2544 benchmarking range (where
/// the default TUN address lives too) that does not overlap a TUN address's network.
const DEFAULT_V4: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 0), Ipv4Addr::new(198, 19, 0, 0)];
/// The subnet id of the default IPv6 range inside the TUN address's /48 (its ULA prefix),
/// and the one taken if the TUN's own /64 is that one.
const DEFAULT_V6_SUBNETS: [u16; 2] = [0xfa4e, 0xfa4f];

/// Fake-IP DNS (`--dns fake`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeDns {
    /// Fake IPv4 addresses are handed out from here.
    pub v4: Cidr,
    /// Fake IPv6 addresses, if the TUN has an IPv6 address (else AAAA gets no answer).
    pub v6: Option<Cidr>,
    /// Names the table holds at most.
    pub entries: usize,
    /// Queries of other types go here over TCP through the upstream; `None`: REFUSED.
    pub server: Option<SocketAddr>,
}

/// The command line's DNS flags, as given.
pub struct Flags<'a> {
    pub dns: Option<&'a str>,
    pub ranges: &'a [String],
    pub entries: Option<usize>,
    pub server: Option<&'a str>,
    pub upstream: bool,
}

/// Validates the DNS flags against the TUN's addresses: `None` without `--dns`.
pub fn parse(flags: &Flags, tun_addrs: &[Cidr]) -> Result<Option<FakeDns>, String> {
    let Some(mode) = flags.dns else {
        for (given, flag) in [
            (!flags.ranges.is_empty(), "--fake-range"),
            (flags.entries.is_some(), "--fake-entries"),
            (flags.server.is_some(), "--dns-server"),
        ] {
            if given {
                return Err(format!("{flag} needs --dns fake"));
            }
        }
        return Ok(None);
    };
    if mode != "fake" {
        return Err(format!("--dns '{mode}': expected fake"));
    }
    if !flags.upstream {
        return Err(
            "--dns fake needs --upstream socks5://...: flows to fake addresses connect by name through it"
                .into(),
        );
    }
    let (mut v4, mut v6) = (None, None);
    for text in flags.ranges {
        let range = Cidr::network(text).map_err(|err| format!("--fake-range {err}"))?;
        let (slot, least) = match range.addr {
            IpAddr::V4(_) => (&mut v4, 8),
            IpAddr::V6(_) => (&mut v6, 64),
        };
        if slot.is_some() {
            return Err(format!(
                "--fake-range {range}: at most one IPv4 and one IPv6 range"
            ));
        }
        // Shorter prefixes would swallow too much of the address space into the TUN.
        if range.prefix < least {
            return Err(format!(
                "--fake-range {range}: at most a /{least} of this family"
            ));
        }
        if range.addr.is_ipv4() && range.prefix > 30 {
            return Err(format!(
                "--fake-range {range}: at least a /30 (the first and last address are not handed out)"
            ));
        }
        // As for --route: the TUN lends relayed connections its address of the family.
        if !tun_addrs
            .iter()
            .any(|tun| tun.addr.is_ipv4() == range.addr.is_ipv4())
        {
            return Err(format!(
                "--fake-range {range} needs a --tun-addr of its family"
            ));
        }
        if let Some(tun) = tun_addrs.iter().find(|tun| overlaps(range, **tun)) {
            return Err(format!("--fake-range {range} overlaps --tun-addr {tun}"));
        }
        *slot = Some(range);
    }
    let v4 = match v4 {
        Some(range) => range,
        None => default_v4(tun_addrs).ok_or(
            "--dns fake: the TUN's addresses cover 198.18.0.0/15: give an IPv4 --fake-range",
        )?,
    };
    let v6 = v6.or_else(|| default_v6(tun_addrs));
    // The range's first and last addresses (network, broadcast) are never handed out.
    let room = (1usize << (32 - u32::from(v4.prefix))) - 2;
    let entries = match flags.entries {
        Some(0) => return Err("--fake-entries 0: at least 1".into()),
        Some(n) if n > room => {
            return Err(format!(
                "--fake-entries {n}: more than the {room} addresses of --fake-range {v4}"
            ));
        }
        Some(n) => n,
        None => DEFAULT_ENTRIES.min(room),
    };
    let server = match flags.server {
        None => None,
        Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
            format!("--dns-server '{text}': expected ADDR:PORT such as 192.0.2.53:53 or [2001:db8::53]:53")
        })?),
    };
    Ok(Some(FakeDns {
        v4,
        v6,
        entries,
        server,
    }))
}

/// Whether two networks share an address (one contains the other's start).
fn overlaps(a: Cidr, b: Cidr) -> bool {
    let prefix = a.prefix.min(b.prefix);
    match (a.addr, b.addr) {
        (IpAddr::V4(x), IpAddr::V4(y)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(x) & mask == u32::from(y) & mask
        }
        (IpAddr::V6(x), IpAddr::V6(y)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(x) & mask == u128::from(y) & mask
        }
        _ => false,
    }
}

fn default_v4(tun_addrs: &[Cidr]) -> Option<Cidr> {
    DEFAULT_V4
        .iter()
        .map(|&addr| Cidr {
            addr: IpAddr::V4(addr),
            prefix: 16,
        })
        .find(|range| !tun_addrs.iter().any(|tun| overlaps(*range, *tun)))
}

/// A /64 in the /48 of the TUN's first IPv6 address (the default's ULA prefix).
fn default_v6(tun_addrs: &[Cidr]) -> Option<Cidr> {
    let tun = tun_addrs.iter().find_map(|tun| match tun.addr {
        IpAddr::V6(addr) => Some(addr),
        IpAddr::V4(_) => None,
    })?;
    let site = u128::from(tun) & (u128::MAX << 80);
    DEFAULT_V6_SUBNETS
        .iter()
        .map(|&subnet| Cidr {
            addr: IpAddr::V6(Ipv6Addr::from(site | u128::from(subnet) << 64)),
            prefix: 64,
        })
        .find(|range| !tun_addrs.iter().any(|tun| overlaps(*range, *tun)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tun(texts: &[&str]) -> Vec<Cidr> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn flags<'a>(ranges: &'a [String], entries: Option<usize>) -> Flags<'a> {
        Flags {
            dns: Some("fake"),
            ranges,
            entries,
            server: None,
            upstream: true,
        }
    }

    const DEFAULT_TUN: [&str; 2] = crate::config::DEFAULT_TUN_ADDRS;

    #[test]
    fn defaults_avoid_the_tun_networks() {
        let dns = parse(&flags(&[], None), &tun(&DEFAULT_TUN))
            .unwrap()
            .unwrap();
        assert_eq!(dns.v4.to_string(), "198.19.0.0/16");
        assert_eq!(dns.v6.unwrap().to_string(), "fd7a:7072:7879:fa4e::/64");
        assert_eq!(dns.entries, 65_534, "a /16 less its first and last address");
        assert_eq!(dns.server, None);
        let dns = parse(
            &flags(&[], None),
            &tun(&["198.19.3.1/24", "fd7a:7072:7879:fa4e::1/64"]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(dns.v4.to_string(), "198.18.0.0/16");
        assert_eq!(dns.v6.unwrap().to_string(), "fd7a:7072:7879:fa4f::/64");
        let dns = parse(&flags(&[], None), &tun(&["10.0.0.1/30"]))
            .unwrap()
            .unwrap();
        assert_eq!(dns.v6, None, "no IPv6 TUN address, no IPv6 range");
    }

    #[test]
    fn ranges_are_checked_and_bound_the_table() {
        let given = ["10.64.0.0/24".to_string(), "fd00:1:2:3::/64".to_string()];
        let dns = parse(&flags(&given, None), &tun(&DEFAULT_TUN))
            .unwrap()
            .unwrap();
        assert_eq!(dns.v4.to_string(), "10.64.0.0/24");
        assert_eq!(dns.entries, 254, "the default shrinks to the range");
        let dns = parse(&flags(&given, Some(200)), &tun(&DEFAULT_TUN))
            .unwrap()
            .unwrap();
        assert_eq!(dns.entries, 200);
        let cases: [(&[&str], Option<usize>, &str); 9] = [
            (&["10.64.0.0/31"], None, "at least a /30"),
            (
                &["10.64.0.0/24"],
                Some(255),
                "--fake-entries 255: more than the 254",
            ),
            (&[], Some(0), "--fake-entries 0"),
            (
                &["10.0.0.0/24", "10.1.0.0/24"],
                None,
                "at most one IPv4 and one IPv6",
            ),
            (
                &["198.18.0.0/24"],
                None,
                "overlaps --tun-addr 198.18.0.1/30",
            ),
            (
                &["fd7a:7072:7879::/64"],
                None,
                "overlaps --tun-addr fd7a:7072:7879::1/64",
            ),
            (&["0.0.0.0/0"], None, "at most a /8"),
            (&["fd00::/48"], None, "at most a /64"),
            (&["10.0.0.1/24"], None, "host bits set"),
        ];
        for (ranges, entries, needle) in cases {
            let ranges: Vec<String> = ranges.iter().map(|s| s.to_string()).collect();
            let err = parse(&flags(&ranges, entries), &tun(&DEFAULT_TUN)).unwrap_err();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
            assert!(!err.contains('\n'));
        }
        let v6 = ["fd00:1:2:3::/64".to_string()];
        let err = parse(&flags(&v6, None), &tun(&["10.0.0.1/30"])).unwrap_err();
        assert!(err.contains("needs a --tun-addr of its family"), "{err}");
        let err = parse(&flags(&[], None), &tun(&["198.18.0.1/15"])).unwrap_err();
        assert!(err.contains("give an IPv4 --fake-range"), "{err}");
    }

    #[test]
    fn fake_dns_needs_the_upstream_and_its_own_flags_need_it() {
        let ranges = ["10.0.0.0/24".to_string()];
        let cases = [
            (
                Flags {
                    upstream: false,
                    ..flags(&[], None)
                },
                "--dns fake needs --upstream",
            ),
            (
                Flags {
                    dns: Some("real"),
                    ..flags(&[], None)
                },
                "--dns 'real': expected fake",
            ),
            (
                Flags {
                    dns: None,
                    ..flags(&ranges, None)
                },
                "--fake-range needs --dns fake",
            ),
            (
                Flags {
                    dns: None,
                    ..flags(&[], Some(5))
                },
                "--fake-entries needs --dns fake",
            ),
            (
                Flags {
                    dns: None,
                    server: Some("192.0.2.1:53"),
                    ..flags(&[], None)
                },
                "--dns-server needs --dns fake",
            ),
            (
                Flags {
                    server: Some("dns.example:53"),
                    ..flags(&[], None)
                },
                "--dns-server 'dns.example:53': expected ADDR:PORT",
            ),
        ];
        for (flags, start) in cases {
            let err = parse(&flags, &tun(&DEFAULT_TUN)).unwrap_err();
            assert!(
                err.starts_with(start),
                "{err:?} does not start with {start:?}"
            );
        }
        let server = Flags {
            server: Some("[2001:db8::53]:53"),
            ..flags(&[], None)
        };
        let dns = parse(&server, &tun(&DEFAULT_TUN)).unwrap().unwrap();
        assert_eq!(dns.server, Some("[2001:db8::53]:53".parse().unwrap()));
        let none = Flags {
            dns: None,
            ..flags(&[], None)
        };
        assert_eq!(parse(&none, &tun(&DEFAULT_TUN)), Ok(None));
    }
}
