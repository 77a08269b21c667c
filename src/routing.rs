//! Policy routing for `--route`, `--lan`, `--exclude`, `--uid` and `--exclude-uid`:
//! which rules send new connections into the TUN while traffic whose source address is
//! already set keeps the main table, and their life cycle (leftovers of a killed run
//! removed at start-up, our own rules removed at exit). `rules` plans them from the
//! configuration alone; the rtnetlink encoding is `sys::netlink`'s.
//!
//! Per family, with T = `--table`, all rules tagged `proto 117`, in the order the kernel
//! tries them:
//!
//! | priority | rule | matches |
//! | --- | --- | --- |
//! | 30059 | `iif LAN to EXCLUDE lookup main`, per `--lan` and `--exclude` | LAN traffic to an excluded network |
//! | 30060 | `iif LAN lookup main suppress_prefixlength 0`, per `--lan` | LAN traffic to anything main has a route for other than its default: the LAN itself, other LANs, a management network |
//! | 30061 | `iif LAN lookup T`, per `--lan` | all other LAN traffic: new connections to the world |
//! | 30062 | `from <TUN address> lookup T` | relayed flows looking up again (see below) |
//! | T - 1 | `not from 0.0.0.0/32 lookup main`; IPv6: `from ::/1` and `from 8000::/1 lookup main` | a source is set: replies of the host's servers, kernel RSTs and ICMP errors, sockets bound to an address, forwarded traffic of other interfaces |
//! | T - 1 | `to EXCLUDE lookup main`, per `--exclude`; `uidrange A-B lookup main`, per `--exclude-uid` | the host's connections that must stay direct |
//! | T | `to CIDR lookup T`, per `--route` (times `uidrange A-B`, per `--uid`) | the host's new connections: no source chosen yet |
//!
//! and table T holds `default dev TUN`. The host part (30062 to T) exists in the
//! families `--route` names, the LAN part in the families the TUN has an address of.
//!
//! Host: an unbound connect's first lookup has no source, so it meets the `to CIDR` rule
//! and takes the TUN's address from the TUN route. Its next lookups (IPv4's second one
//! in connect, any after a route change) carry that address, hence the TUN-source rule.
//! The two IPv6 halves of the bypass: an IPv6 source selector matches only lookups that
//! have a source, which is the point, while IPv4 compares bits (`0.0.0.0/1` would match
//! a lookup with no source) and needs the inverted `/32`.
//!
//! LAN: the router's own addresses need no rule: the local table (priority 0) answers
//! them before any of ours. Networks reached through other interfaces are not listed
//! either: `suppress_prefixlength 0` looks them up in main as it is at that moment and
//! ignores only main's default route, so a LAN added, renumbered or brought up later is
//! forwarded directly with no rule to update, where rules naming networks or addresses
//! would go stale. The price: a route through `-i` more specific than the default (the
//! uplink's own subnet, the modem) is direct too. Strict rp_filter keeps working without
//! touching any sysctl: the kernel validates a forwarded packet's source with a lookup
//! whose input interface is the packet's output interface, so a reply coming out of the
//! TUN towards the LAN is validated through `iif LAN lookup T` (the TUN: accepted), and
//! the LAN's own packets through main (the LAN: accepted).
//!
//! Ordering: every instance's LAN and TUN-source rules sit below 30063, before the
//! bypass of any instance (the lowest T - 1 is 30063): after it, another instance's
//! bypass would send this one's LAN traffic and relayed flows out through main. Rules
//! name no host address: nothing to track when the host's addresses change.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use log::warn;
use nix::libc;

use crate::error::Error;
use crate::sys::netlink::{self, Family, Rule};
use crate::wire::Cidr;

/// `--table` unless given; also the priority of the `to CIDR` rules.
pub const DEFAULT_TABLE: u32 = 30064;
/// Tables whose priorities fall between the shared TUN-source rules (30062) and the
/// main table's rule (32766).
pub const TABLES: RangeInclusive<u32> = 30064..=32765;
const LAN_EXCLUDE_PRIORITY: u32 = 30059;
const LAN_DIRECT_PRIORITY: u32 = 30060;
const LAN_PRIORITY: u32 = 30061;
const TUN_SOURCE_PRIORITY: u32 = 30062;
/// Our tag on rules and routes (unused in iproute2's rt_protos), so that leftovers can
/// be told from anyone else's rules.
const PROTOCOL: u8 = 117;
const MAIN_TABLE: u32 = 254;

/// The bypass selectors: "a source is set".
const V4_BYPASS: [(Cidr, bool); 1] = [(
    Cidr {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        prefix: 32,
    },
    true,
)];
const V6_BYPASS: [(Cidr, bool); 2] = [
    (
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            prefix: 1,
        },
        false,
    ),
    (
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(0x8000, 0, 0, 0, 0, 0, 0, 0)),
            prefix: 1,
        },
        false,
    ),
];

/// What the rules are for: the routing part of the configuration.
#[derive(Clone, Copy, Debug)]
pub struct Plan<'a> {
    pub table: u32,
    pub tun_addrs: &'a [Cidr],
    /// `--route`: the host's destinations.
    pub routes: &'a [Cidr],
    /// `--lan`: interfaces whose forwarded traffic goes in.
    pub lans: &'a [String],
    /// `--exclude`, and the upstream's address.
    pub excludes: &'a [Cidr],
    /// `--uid`: if any, only these users' host connections go in.
    pub uids: &'a [UidRange],
    /// `--exclude-uid`: these users' host connections stay direct.
    pub exclude_uids: &'a [UidRange],
}

/// A range of user ids, `N` or `N-M`, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl std::str::FromStr for UidRange {
    type Err = String;

    /// `N` or `N-M` with N <= M. u32::MAX is the kernel's "no uid" and never a user.
    fn from_str(text: &str) -> Result<UidRange, String> {
        let number = |t: &str| {
            t.parse::<u32>()
                .ok()
                .filter(|&n| n < u32::MAX && t.bytes().all(|b| b.is_ascii_digit()))
        };
        let range = match text.split_once('-') {
            None => number(text).map(|n| UidRange { first: n, last: n }),
            Some((a, b)) => number(a)
                .zip(number(b))
                .map(|(first, last)| UidRange { first, last }),
        };
        match range {
            Some(r) if r.first <= r.last => Ok(r),
            Some(r) => Err(format!(
                "'{text}': the range is reversed (did you mean {}-{}?)",
                r.last, r.first
            )),
            None => Err(format!(
                "'{text}': expected a user id or a range such as 1000-1999 (0 to 4294967294)"
            )),
        }
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl Plan<'_> {
    /// The families with rules: those `--route` names, and with `--lan` those the TUN
    /// has an address of; IPv4 first.
    fn families(&self) -> Vec<Family> {
        let lan = self.tun_addrs.iter().filter(|_| !self.lans.is_empty());
        let mut families: Vec<Family> = (self.routes.iter().chain(lan))
            .map(|c| Family::of(c.addr))
            .collect();
        families.sort_unstable();
        families.dedup();
        families
    }
}

fn of_family(cidrs: &[Cidr], family: Family) -> impl Iterator<Item = Cidr> + '_ {
    cidrs
        .iter()
        .copied()
        .filter(move |c| Family::of(c.addr) == family)
}

fn bypass(family: Family, table: u32) -> impl Iterator<Item = Rule> {
    let selectors: &[(Cidr, bool)] = match family {
        Family::V4 => &V4_BYPASS,
        Family::V6 => &V6_BYPASS,
    };
    selectors.iter().map(move |&(src, invert)| Rule {
        src: Some(src),
        invert,
        ..Rule::new(family, table.saturating_sub(1), MAIN_TABLE, PROTOCOL)
    })
}

/// The rules for `plan`, in install order: per family everything that keeps traffic
/// out of the TUN (or concerns only relayed flows) before anything that sends traffic
/// in, so that no moment has traffic in the TUN that an exclude or a bypass should have
/// kept out. Duplicates give one rule.
fn rules(plan: &Plan) -> Vec<Rule> {
    let (table, main) = (plan.table, MAIN_TABLE);
    let mut rules: Vec<Rule> = Vec::new();
    for family in plan.families() {
        let rule = |priority, table| Rule::new(family, priority, table, PROTOCOL);
        let hosted = of_family(plan.routes, family).next().is_some();
        let mut out: Vec<Rule> = Vec::new();
        let mut tun_bound: Vec<Rule> = Vec::new();
        if hosted {
            out.extend(of_family(plan.tun_addrs, family).map(|a| Rule {
                src: Some(Cidr::host(a.addr)),
                ..rule(TUN_SOURCE_PRIORITY, table)
            }));
            out.extend(bypass(family, table));
            out.extend(of_family(plan.excludes, family).map(|c| Rule {
                dst: Some(c),
                ..rule(table.saturating_sub(1), main)
            }));
            out.extend(plan.exclude_uids.iter().map(|u| Rule {
                uids: Some((u.first, u.last)),
                ..rule(table.saturating_sub(1), main)
            }));
            let uids: Vec<Option<(u32, u32)>> = if plan.uids.is_empty() {
                vec![None]
            } else {
                plan.uids.iter().map(|u| Some((u.first, u.last))).collect()
            };
            for dst in of_family(plan.routes, family) {
                tun_bound.extend(uids.iter().map(|&uids| Rule {
                    dst: Some(dst).filter(|c| c.prefix > 0),
                    uids,
                    ..rule(table, table)
                }));
            }
        }
        for lan in plan.lans {
            let iif = Some(lan.clone());
            out.extend(of_family(plan.excludes, family).map(|c| Rule {
                dst: Some(c),
                iif: iif.clone(),
                ..rule(LAN_EXCLUDE_PRIORITY, main)
            }));
            out.push(Rule {
                iif: iif.clone(),
                suppress_prefixlen: Some(0),
                ..rule(LAN_DIRECT_PRIORITY, main)
            });
            tun_bound.push(Rule {
                iif,
                ..rule(LAN_PRIORITY, table)
            });
        }
        for rule in out.into_iter().chain(tun_bound) {
            if !rules.contains(&rule) {
                rules.push(rule);
            }
        }
    }
    rules
}

/// Whether `rule` has the shape of one of ours through `table` with `lans`, whatever
/// its addresses and users: what a killed run with this table left behind. Tag,
/// priority, table and selector kinds must all match; a rule is never judged by its
/// priority alone. The LAN rules that look up main are told apart by their interface
/// (one proxy per LAN interface); left over from a run with other `--lan`s they would
/// only send traffic to main, where it goes anyway.
fn is_ours(rule: &Rule, table: u32, lans: &[String]) -> bool {
    let plain = rule.protocol == PROTOCOL && !rule.invert && rule.suppress_prefixlen.is_none();
    let host = plain && rule.iif.is_none();
    let tun_source = host
        && rule.uids.is_none()
        && rule.priority == TUN_SOURCE_PRIORITY
        && rule.table == table
        && rule.dst.is_none()
        && rule.src.is_some_and(|src| Cidr::host(src.addr) == src);
    let destination = host && rule.priority == table && rule.table == table && rule.src.is_none();
    let excluded = host
        && rule.priority == table.saturating_sub(1)
        && rule.table == MAIN_TABLE
        && rule.src.is_none()
        && (rule.dst.is_some() != rule.uids.is_some());
    let lan = rule.protocol == PROTOCOL
        && !rule.invert
        && rule.src.is_none()
        && rule.uids.is_none()
        && rule.iif.as_ref().is_some_and(|iif| {
            let direct = rule.table == MAIN_TABLE && lans.contains(iif);
            match (rule.priority, rule.dst, rule.suppress_prefixlen) {
                (LAN_EXCLUDE_PRIORITY, Some(_), None) => direct,
                (LAN_DIRECT_PRIORITY, None, Some(0)) => direct,
                (LAN_PRIORITY, None, None) => rule.table == table,
                _ => false,
            }
        });
    tun_source
        || destination
        || excluded
        || lan
        || bypass(rule.family, table).any(|ours| ours == *rule)
}

/// The rules this process installed, deleted again on drop (the route in the table goes
/// with the TUN device).
pub struct Routes {
    socket: netlink::Socket,
    installed: Vec<Rule>,
}

impl Routes {
    /// Claims the plan's table (its default route becomes interface `ifindex`), removes
    /// rules a killed run left for it, then installs the plan's rules. On failure
    /// nothing of ours stays installed.
    pub fn install(plan: &Plan, ifindex: u32) -> Result<Routes, Error> {
        let table = plan.table;
        let io = |err| Error::from_io("install the routing rules", err);
        let mut socket = netlink::Socket::open().map_err(io)?;
        let families = plan.families();
        for &family in &families {
            socket
                .add_default_route(family, table, ifindex, PROTOCOL)
                .map_err(|err| match err.raw_os_error() {
                    Some(libc::EEXIST) => taken(table),
                    _ => io(err),
                })?;
        }
        // Our leftovers' routes went with their TUN, so claiming the table succeeded:
        // in these families no running instance owns rules for it.
        let leftovers: Vec<Rule> = socket
            .rules()
            .map_err(io)?
            .into_iter()
            .filter(|rule| families.contains(&rule.family) && is_ours(rule, table, plan.lans))
            .collect();
        for rule in &leftovers {
            match socket.delete_rule(rule) {
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
                result => result.map_err(io)?,
            }
        }
        if !leftovers.is_empty() {
            warn!(
                "removed {} policy rules for table {table} left by a uringproxy that was killed before it could remove them",
                leftovers.len()
            );
        }
        let mut installed = Routes {
            socket,
            installed: Vec::new(),
        };
        for rule in rules(plan) {
            installed.socket.add_rule(&rule).map_err(io)?;
            installed.installed.push(rule);
        }
        Ok(installed)
    }

    /// The installed rules as `status` lists them: `IPv4 30061: from all iif br-lan
    /// lookup 30064`, in the order the kernel tries them.
    pub fn describe(&self) -> Vec<String> {
        describe(&self.installed)
    }
}

fn describe(rules: &[Rule]) -> Vec<String> {
    let mut sorted: Vec<&Rule> = rules.iter().collect();
    sorted.sort_by_key(|rule| (rule.family, rule.priority));
    sorted
        .into_iter()
        .map(|rule| {
            let family = match rule.family {
                Family::V4 => "IPv4",
                Family::V6 => "IPv6",
            };
            format!("{family} {rule}")
        })
        .collect()
}

/// `table` already has a default route: another instance or another program uses it.
fn taken(table: u32) -> Error {
    let other = if table < *TABLES.end() {
        table + 1
    } else {
        table - 1
    };
    Error::Usage(format!(
        "routing table {table} already has a default route (another uringproxy or another program uses it): pass another table, e.g. --table {other}"
    ))
}

impl Drop for Routes {
    /// Destinations first, so nothing is routed into the TUN without the bypass.
    fn drop(&mut self) {
        for rule in self.installed.drain(..).rev() {
            let _ = self.socket.delete_rule(&rule);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(texts: &[&str]) -> Vec<Cidr> {
        texts.iter().map(|t| Cidr::network(t).unwrap()).collect()
    }

    fn tun() -> Vec<Cidr> {
        ["198.18.0.1/30", "fd7a:7072:7879::1/64"]
            .iter()
            .map(|t| t.parse().unwrap())
            .collect()
    }

    fn plan<'a>(table: u32, tun_addrs: &'a [Cidr], routes: &'a [Cidr]) -> Plan<'a> {
        Plan {
            table,
            tun_addrs,
            routes,
            lans: &[],
            excludes: &[],
            uids: &[],
            exclude_uids: &[],
        }
    }

    /// A rule the way `ip rule` prints it (plus the family and tag), to compare sets at
    /// a glance.
    fn show(rule: &Rule) -> String {
        format!("{:?} {rule} proto {}", rule.family, rule.protocol)
    }

    fn shown(rules: &[Rule]) -> Vec<String> {
        rules.iter().map(show).collect()
    }

    #[test]
    fn everything_keeps_sourced_traffic_on_main() {
        let (tun, routes) = (tun(), cidrs(&["0.0.0.0/0", "::/0"]));
        let rules = rules(&plan(30064, &tun, &routes));
        assert_eq!(
            shown(&rules),
            [
                "V4 30062: from 198.18.0.1/32 lookup 30064 proto 117",
                "V4 30063: not from 0.0.0.0/32 lookup main proto 117",
                "V4 30064: from all lookup 30064 proto 117",
                "V6 30062: from fd7a:7072:7879::1/128 lookup 30064 proto 117",
                "V6 30063: from ::/1 lookup main proto 117",
                "V6 30063: from 8000::/1 lookup main proto 117",
                "V6 30064: from all lookup 30064 proto 117",
            ]
        );
    }

    #[test]
    fn split_default_and_other_tables() {
        let (tun, routes) = (
            tun(),
            cidrs(&["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]),
        );
        let shown = shown(&rules(&plan(30070, &tun, &routes)));
        assert_eq!(shown.len(), 9);
        assert_eq!(
            shown[0],
            "V4 30062: from 198.18.0.1/32 lookup 30070 proto 117"
        );
        assert_eq!(
            shown[1],
            "V4 30069: not from 0.0.0.0/32 lookup main proto 117"
        );
        assert_eq!(
            shown[2],
            "V4 30070: from all to 0.0.0.0/1 lookup 30070 proto 117"
        );
        assert_eq!(
            shown[3],
            "V4 30070: from all to 128.0.0.0/1 lookup 30070 proto 117"
        );
        assert_eq!(
            shown[8],
            "V6 30070: from all to 8000::/1 lookup 30070 proto 117"
        );
    }

    #[test]
    fn only_routed_families_and_no_duplicates() {
        let mut tun_addrs = tun();
        tun_addrs.push("198.18.0.9/30".parse().unwrap());
        let routes = cidrs(&["10.0.0.0/8", "192.0.2.0/24", "10.0.0.0/8"]);
        let rules = rules(&plan(30064, &tun_addrs, &routes));
        assert_eq!(
            shown(&rules),
            [
                "V4 30062: from 198.18.0.1/32 lookup 30064 proto 117",
                "V4 30062: from 198.18.0.9/32 lookup 30064 proto 117",
                "V4 30063: not from 0.0.0.0/32 lookup main proto 117",
                "V4 30064: from all to 10.0.0.0/8 lookup 30064 proto 117",
                "V4 30064: from all to 192.0.2.0/24 lookup 30064 proto 117",
            ]
        );
        assert!(super::rules(&plan(30064, &tun(), &[])).is_empty());
    }

    #[test]
    fn a_lan_goes_in_after_its_excludes_and_main_s_specific_routes() {
        let tun = tun();
        let lans = ["br-lan".to_string()];
        let excludes = cidrs(&["192.0.2.0/24", "2001:db8::/32"]);
        let plan = Plan {
            lans: &lans,
            excludes: &excludes,
            ..plan(30064, &tun, &[])
        };
        // No --route: the host's traffic is left alone, both families of the LAN go in.
        assert_eq!(
            shown(&rules(&plan)),
            [
                "V4 30059: from all to 192.0.2.0/24 iif br-lan lookup main proto 117",
                "V4 30060: from all iif br-lan lookup main suppress_prefixlength 0 proto 117",
                "V4 30061: from all iif br-lan lookup 30064 proto 117",
                "V6 30059: from all to 2001:db8::/32 iif br-lan lookup main proto 117",
                "V6 30060: from all iif br-lan lookup main suppress_prefixlength 0 proto 117",
                "V6 30061: from all iif br-lan lookup 30064 proto 117",
            ]
        );
        // A TUN with only an IPv4 address: the LAN's IPv6 is forwarded as before.
        let v4 = &tun[..1];
        let shown = shown(&rules(&Plan {
            tun_addrs: v4,
            ..plan
        }));
        assert_eq!(shown.len(), 3);
        assert!(shown.iter().all(|r| r.starts_with("V4 ")), "{shown:?}");
    }

    #[test]
    fn excludes_and_users_for_the_host_with_two_lans() {
        let tun = tun();
        let routes = cidrs(&["0.0.0.0/0"]);
        let lans = ["eth1".to_string(), "wlan0".to_string()];
        let excludes = cidrs(&["203.0.113.7/32"]);
        let uids = [UidRange {
            first: 1000,
            last: 1000,
        }];
        let exclude_uids = [UidRange {
            first: 34,
            last: 35,
        }];
        let rules = rules(&Plan {
            table: 30070,
            tun_addrs: &tun[..1],
            routes: &routes,
            lans: &lans,
            excludes: &excludes,
            uids: &uids,
            exclude_uids: &exclude_uids,
        });
        assert_eq!(
            shown(&rules),
            [
                "V4 30062: from 198.18.0.1/32 lookup 30070 proto 117",
                "V4 30069: not from 0.0.0.0/32 lookup main proto 117",
                "V4 30069: from all to 203.0.113.7/32 lookup main proto 117",
                "V4 30069: from all uidrange 34-35 lookup main proto 117",
                "V4 30059: from all to 203.0.113.7/32 iif eth1 lookup main proto 117",
                "V4 30060: from all iif eth1 lookup main suppress_prefixlength 0 proto 117",
                "V4 30059: from all to 203.0.113.7/32 iif wlan0 lookup main proto 117",
                "V4 30060: from all iif wlan0 lookup main suppress_prefixlength 0 proto 117",
                "V4 30070: from all uidrange 1000-1000 lookup 30070 proto 117",
                "V4 30061: from all iif eth1 lookup 30070 proto 117",
                "V4 30061: from all iif wlan0 lookup 30070 proto 117",
            ]
        );
        // Listed in the order the kernel tries them.
        let listed = describe(&rules);
        assert_eq!(
            listed[0],
            "IPv4 30059: from all to 203.0.113.7/32 iif eth1 lookup main"
        );
        assert_eq!(
            listed[10],
            "IPv4 30070: from all uidrange 1000-1000 lookup 30070"
        );
    }

    #[test]
    fn every_rule_we_install_is_recognised_as_ours_and_only_for_its_table() {
        let routes = cidrs(&["0.0.0.0/0", "10.1.0.0/16", "::/0", "2001:db8::/32"]);
        let excludes = cidrs(&["10.1.2.0/24", "2001:db8:1::/48"]);
        let lans = ["br-lan".to_string()];
        let uids = [UidRange { first: 5, last: 9 }];
        let tun = tun();
        for table in [30064, 30065, 30066, 32765] {
            let plan = Plan {
                lans: &lans,
                excludes: &excludes,
                uids: &uids,
                exclude_uids: &uids,
                ..plan(table, &tun, &routes)
            };
            for rule in rules(&plan) {
                assert!(is_ours(&rule, table, &lans), "{}", show(&rule));
                assert!(!is_ours(&rule, table, &[]) || rule.iif.is_none() || rule.table == table);
                // Adjacent tables share priorities (T - 1 of one is T of the other):
                // still never each other's, but for the LAN rules that look up main.
                for other in [table - 1, table + 1, table + 2] {
                    let main_lan = rule.iif.is_some() && rule.table == MAIN_TABLE;
                    assert_eq!(
                        is_ours(&rule, other, &lans),
                        main_lan,
                        "{} for {other}",
                        show(&rule)
                    );
                }
                let untagged = Rule {
                    protocol: 0,
                    ..rule.clone()
                };
                assert!(!is_ours(&untagged, table, &lans), "{}", show(&untagged));
            }
        }
    }

    #[test]
    fn rules_of_other_shapes_are_not_ours() {
        let base = Rule::new(Family::V4, 30064, 30064, PROTOCOL);
        let net: Cidr = Cidr::network("10.0.0.0/8").unwrap();
        let lan = Some("br-lan".to_string());
        let lans = ["br-lan".to_string()];
        for rule in [
            // A destination rule with a source too, or inverted.
            Rule {
                src: Some(net),
                ..base.clone()
            },
            Rule {
                invert: true,
                ..base.clone()
            },
            // A TUN-source rule naming a network, or with a destination.
            Rule {
                priority: TUN_SOURCE_PRIORITY,
                src: Some(net),
                ..base.clone()
            },
            Rule {
                priority: TUN_SOURCE_PRIORITY,
                src: Some(Cidr::host("198.18.0.1".parse().unwrap())),
                dst: Some(net),
                ..base.clone()
            },
            // A bypass that is not inverted, or looks up another table.
            Rule {
                priority: 30063,
                src: V4_BYPASS[0].0.into(),
                table: MAIN_TABLE,
                ..base.clone()
            },
            Rule {
                priority: 30063,
                src: V4_BYPASS[0].0.into(),
                invert: true,
                table: 30064,
                ..base.clone()
            },
            // `lookup main` at our destination priority.
            Rule {
                table: MAIN_TABLE,
                ..base.clone()
            },
            // An exclude with both a destination and users, or with neither.
            Rule {
                priority: 30063,
                table: MAIN_TABLE,
                dst: Some(net),
                uids: Some((1, 2)),
                ..base.clone()
            },
            Rule {
                priority: 30063,
                table: MAIN_TABLE,
                ..base.clone()
            },
            // LAN rules of another interface, another table, or another shape.
            Rule {
                priority: LAN_DIRECT_PRIORITY,
                table: MAIN_TABLE,
                iif: Some("eth9".into()),
                suppress_prefixlen: Some(0),
                ..base.clone()
            },
            Rule {
                priority: LAN_PRIORITY,
                iif: lan.clone(),
                table: 30065,
                ..base.clone()
            },
            Rule {
                priority: LAN_DIRECT_PRIORITY,
                table: MAIN_TABLE,
                iif: lan.clone(),
                suppress_prefixlen: Some(8),
                ..base.clone()
            },
            Rule {
                priority: LAN_EXCLUDE_PRIORITY,
                table: MAIN_TABLE,
                iif: lan.clone(),
                ..base.clone()
            },
            Rule {
                priority: LAN_PRIORITY,
                iif: lan.clone(),
                src: Some(net),
                ..base.clone()
            },
            // A destination rule that only takes one interface's traffic.
            Rule {
                iif: lan.clone(),
                ..base.clone()
            },
        ] {
            assert!(!is_ours(&rule, 30064, &lans), "{}", show(&rule));
        }
        assert!(is_ours(&base, 30064, &lans));
    }

    #[test]
    fn uid_ranges_parse_and_refuse_nonsense() {
        let range = |first, last| UidRange { first, last };
        for (text, expected) in [
            ("0", range(0, 0)),
            ("1000", range(1000, 1000)),
            ("1000-1999", range(1000, 1999)),
            ("0-4294967294", range(0, u32::MAX - 1)),
        ] {
            assert_eq!(text.parse::<UidRange>(), Ok(expected), "{text}");
        }
        for (text, why) in [
            ("", "expected a user id"),
            ("-5", "expected a user id"),
            ("5-", "expected a user id"),
            ("+5", "expected a user id"),
            ("1-2-3", "expected a user id"),
            ("alice", "expected a user id"),
            ("4294967295", "expected a user id"),
            ("2000-1000", "reversed (did you mean 1000-2000?)"),
        ] {
            let err = text.parse::<UidRange>().unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn a_taken_table_names_another() {
        for (table, other) in [(30064, "--table 30065"), (32765, "--table 32764")] {
            let text = taken(table).to_string();
            assert!(
                text.contains(&format!("table {table}")) && text.ends_with(other),
                "{text}"
            );
            assert!(!text.contains('\n'));
        }
    }
}
