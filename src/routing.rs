//! Policy routing for `--route`: which rules send new connections to the chosen
//! destinations into the TUN while traffic whose source address is already set keeps the
//! main table, and their life cycle (leftovers of a killed run removed at start-up, our
//! own rules removed at exit). The rtnetlink encoding is `sys::netlink`'s.
//!
//! Per family, with T = `--table`, all rules tagged `proto 117`:
//!
//! | priority | rule | matches |
//! | --- | --- | --- |
//! | 30062 | `from <TUN address> lookup T` | relayed flows looking up again (see below) |
//! | T - 1 | `not from 0.0.0.0/32 lookup main`; IPv6: `from ::/1` and `from 8000::/1 lookup main` | a source is set: replies of the host's servers, kernel RSTs and ICMP errors, sockets bound to an address |
//! | T | `to CIDR lookup T`, one per `--route` | new connections: no source chosen yet |
//!
//! and table T holds `default dev TUN`. An unbound connect's first lookup has no source,
//! so it meets the `to CIDR` rule and takes the TUN's address from the TUN route. Its
//! next lookups (IPv4's second one in connect, any after a route change) carry that
//! address, hence the TUN-source rule. The rules name no host address: nothing to track
//! when the host's addresses change.
//!
//! The two IPv6 halves: an IPv6 source selector matches only lookups that have a source,
//! which is the point, while IPv4 compares bits (`0.0.0.0/1` would match a lookup with
//! no source) and needs the inverted `/32`.
//!
//! The TUN-source rules of every instance share priority 30062, below every instance's
//! bypass: at T - 2 they would come after the bypass of an instance with a lower table,
//! which would send this instance's relayed flows out through the main table.

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

/// The families `routes` uses, IPv4 first.
fn families(routes: &[Cidr]) -> Vec<Family> {
    let mut families: Vec<Family> = routes.iter().map(|c| Family::of(c.addr)).collect();
    families.sort_unstable();
    families.dedup();
    families
}

fn bypass(family: Family, table: u32) -> impl Iterator<Item = Rule> {
    let selectors: &[(Cidr, bool)] = match family {
        Family::V4 => &V4_BYPASS,
        Family::V6 => &V6_BYPASS,
    };
    selectors.iter().map(move |&(src, invert)| Rule {
        family,
        priority: table.saturating_sub(1),
        src: Some(src),
        dst: None,
        invert,
        table: MAIN_TABLE,
        protocol: PROTOCOL,
    })
}

/// The rules for `routes` through `table`, in install order: per family the TUN-source
/// rules, the bypass, then one rule per destination, so that nothing is routed into the
/// TUN before the bypass is in place. Duplicate destinations give one rule.
fn rules(table: u32, tun_addrs: &[Cidr], routes: &[Cidr]) -> Vec<Rule> {
    let mut rules: Vec<Rule> = Vec::new();
    for family in families(routes) {
        let tun_source = tun_addrs
            .iter()
            .filter(|a| Family::of(a.addr) == family)
            .map(|a| Rule {
                family,
                priority: TUN_SOURCE_PRIORITY,
                src: Some(Cidr::host(a.addr)),
                dst: None,
                invert: false,
                table,
                protocol: PROTOCOL,
            });
        let destinations = routes
            .iter()
            .filter(|c| Family::of(c.addr) == family)
            .map(|&c| Rule {
                family,
                priority: table,
                src: None,
                dst: Some(c).filter(|c| c.prefix > 0),
                invert: false,
                table,
                protocol: PROTOCOL,
            });
        for rule in tun_source.chain(bypass(family, table)).chain(destinations) {
            if !rules.contains(&rule) {
                rules.push(rule);
            }
        }
    }
    rules
}

/// Whether `rule` has the shape of one of ours through `table`, whatever its addresses:
/// what a killed run with this table left behind. Tag, priority, table and selector
/// kinds must all match; a rule is never judged by its priority alone.
fn is_ours(rule: &Rule, table: u32) -> bool {
    let plain = rule.protocol == PROTOCOL && !rule.invert;
    let tun_source = plain
        && rule.priority == TUN_SOURCE_PRIORITY
        && rule.table == table
        && rule.dst.is_none()
        && rule.src.is_some_and(|src| Cidr::host(src.addr) == src);
    let destination = plain && rule.priority == table && rule.table == table && rule.src.is_none();
    tun_source || destination || bypass(rule.family, table).any(|ours| ours == *rule)
}

/// The rules this process installed, deleted again on drop (the route in the table goes
/// with the TUN device).
pub struct Routes {
    socket: netlink::Socket,
    installed: Vec<Rule>,
}

impl Routes {
    /// Claims `table` (its default route becomes interface `ifindex`), removes rules a
    /// killed run left for it, then installs the rules for `routes`. On failure nothing
    /// of ours stays installed.
    pub fn install(
        routes: &[Cidr],
        tun_addrs: &[Cidr],
        table: u32,
        ifindex: u32,
    ) -> Result<Routes, Error> {
        let io = |err| Error::from_io("install --route rules", err);
        let mut socket = netlink::Socket::open().map_err(io)?;
        let families = families(routes);
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
            .filter(|rule| families.contains(&rule.family) && is_ours(rule, table))
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
        for rule in rules(table, tun_addrs, routes) {
            installed.socket.add_rule(&rule).map_err(io)?;
            installed.installed.push(rule);
        }
        Ok(installed)
    }
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

    /// A rule the way `ip rule` prints it (plus the family), to compare sets at a glance.
    fn show(rule: &Rule) -> String {
        let mut text = format!("{:?} {}:", rule.family, rule.priority);
        if rule.invert {
            text += " not";
        }
        match rule.src {
            Some(src) => text += &format!(" from {src}"),
            None => text += " from all",
        }
        if let Some(dst) = rule.dst {
            text += &format!(" to {dst}");
        }
        format!("{text} lookup {} proto {}", rule.table, rule.protocol)
    }

    fn shown(rules: &[Rule]) -> Vec<String> {
        rules.iter().map(show).collect()
    }

    #[test]
    fn everything_keeps_sourced_traffic_on_main() {
        let rules = rules(30064, &tun(), &cidrs(&["0.0.0.0/0", "::/0"]));
        assert_eq!(
            shown(&rules),
            [
                "V4 30062: from 198.18.0.1/32 lookup 30064 proto 117",
                "V4 30063: not from 0.0.0.0/32 lookup 254 proto 117",
                "V4 30064: from all lookup 30064 proto 117",
                "V6 30062: from fd7a:7072:7879::1/128 lookup 30064 proto 117",
                "V6 30063: from ::/1 lookup 254 proto 117",
                "V6 30063: from 8000::/1 lookup 254 proto 117",
                "V6 30064: from all lookup 30064 proto 117",
            ]
        );
    }

    #[test]
    fn split_default_and_other_tables() {
        let rules = rules(
            30070,
            &tun(),
            &cidrs(&["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]),
        );
        let shown = shown(&rules);
        assert_eq!(shown.len(), 9);
        assert_eq!(
            shown[0],
            "V4 30062: from 198.18.0.1/32 lookup 30070 proto 117"
        );
        assert_eq!(
            shown[1],
            "V4 30069: not from 0.0.0.0/32 lookup 254 proto 117"
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
        let rules = rules(
            30064,
            &tun_addrs,
            &cidrs(&["10.0.0.0/8", "192.0.2.0/24", "10.0.0.0/8"]),
        );
        assert_eq!(
            shown(&rules),
            [
                "V4 30062: from 198.18.0.1/32 lookup 30064 proto 117",
                "V4 30062: from 198.18.0.9/32 lookup 30064 proto 117",
                "V4 30063: not from 0.0.0.0/32 lookup 254 proto 117",
                "V4 30064: from all to 10.0.0.0/8 lookup 30064 proto 117",
                "V4 30064: from all to 192.0.2.0/24 lookup 30064 proto 117",
            ]
        );
        assert!(super::rules(30064, &tun(), &[]).is_empty());
    }

    #[test]
    fn every_rule_we_install_is_recognised_as_ours_and_only_for_its_table() {
        let routes = cidrs(&["0.0.0.0/0", "10.1.0.0/16", "::/0", "2001:db8::/32"]);
        for table in [30064, 30065, 30066, 32765] {
            for rule in rules(table, &tun(), &routes) {
                assert!(is_ours(&rule, table), "{}", show(&rule));
                // Adjacent tables share priorities (T - 1 of one is T of the other):
                // still never each other's.
                for other in [table - 1, table + 1, table + 2] {
                    assert!(!is_ours(&rule, other), "{} for {other}", show(&rule));
                }
                let untagged = Rule {
                    protocol: 0,
                    ..rule.clone()
                };
                assert!(!is_ours(&untagged, table), "{}", show(&untagged));
            }
        }
    }

    #[test]
    fn rules_of_other_shapes_are_not_ours() {
        let base = Rule {
            family: Family::V4,
            priority: 30064,
            src: None,
            dst: None,
            invert: false,
            table: 30064,
            protocol: PROTOCOL,
        };
        let net: Cidr = Cidr::network("10.0.0.0/8").unwrap();
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
        ] {
            assert!(!is_ours(&rule, 30064), "{}", show(&rule));
        }
        assert!(is_ours(&base, 30064));
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
