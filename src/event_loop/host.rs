//! The start-up checks that ask the host, run on a valid `Config` before anything is
//! created: `--cpu` is in the process's affinity mask, the `--user` and the `-i`
//! interface exist, and the `--upstream` host has an address. Each failure is one
//! start-up error, as the command line's are.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use nix::unistd::User;

use crate::config::{Config, Socks5};
use crate::error::Error;
use crate::sys;

/// What the host said about the configuration.
pub struct Host {
    /// The `--user` to run as once set up.
    pub user: Option<User>,
    /// The address of the `--upstream` server (looked up once, now).
    pub upstream: Option<SocketAddr>,
}

/// Checks `config` against the host.
pub fn check(config: &Config) -> Result<Host, Error> {
    if let Some(cpu) = config.cpu {
        let allowed = allowed_cpus()
            .map_err(|err| Error::Io("read the CPU affinity (sched_getaffinity)", err.into()))?;
        check_cpu(cpu, &allowed).map_err(Error::Usage)?;
    }
    let user = match &config.user {
        None => None,
        Some(name) => Some(
            User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| Error::Usage(format!("--user {name}: no such user")))?,
        ),
    };
    if sys::interface_index(&config.interface).is_none() {
        return Err(Error::UnknownInterface(config.interface.clone()));
    }
    if let Some(lan) = config
        .lans
        .iter()
        .find(|lan| sys::interface_index(lan).is_none())
    {
        return Err(Error::Usage(format!(
            "--lan {lan}: no such interface (see `ip link` for the names)"
        )));
    }
    let upstream = match &config.upstream {
        Some(socks5) => Some(resolve(socks5).map_err(Error::Usage)?),
        None => None,
    };
    Ok(Host { user, upstream })
}

/// One line per family that `--lan` proxies while the host does not forward it: its
/// clients' traffic then never reaches the TUN. A warning, not an error: the proxy
/// does not change the host's forwarding itself, and a router's firewall service (or
/// an administrator) commonly turns it on after the proxy has started.
pub fn forwarding_warnings(config: &Config) -> Vec<String> {
    if config.lans.is_empty() {
        return Vec::new();
    }
    let families = [
        (true, "IPv4", "net.ipv4.ip_forward"),
        (false, "IPv6", "net.ipv6.conf.all.forwarding"),
    ];
    families
        .into_iter()
        .filter(|(v4, ..)| config.tun_addrs.iter().any(|a| a.addr.is_ipv4() == *v4))
        .filter_map(|(_, family, key)| {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            let on = std::fs::read_to_string(&path).is_ok_and(|value| value.trim() != "0");
            (!on).then(|| {
                format!(
                    "{key} is not 1: the host does not forward {family}, so --lan clients' {family} traffic reaches neither the TUN nor anywhere else (sysctl -w {key}=1)"
                )
            })
        })
        .collect()
}

/// The upstream's address: its host as written if that is an address, else the first
/// the resolver gives for the name.
fn resolve(socks5: &Socks5) -> Result<SocketAddr, String> {
    let (host, port) = (socks5.host.as_str(), socks5.port);
    match host.parse::<IpAddr>() {
        Ok(addr) => Ok(SocketAddr::new(addr, port)),
        Err(_) => (host, port)
            .to_socket_addrs()
            .map_err(|err| format!("--upstream: cannot resolve '{host}': {err}"))?
            .next()
            .ok_or_else(|| format!("--upstream: '{host}' has no address")),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        Config::from_args(argh::FromArgs::from_args(&["uringproxy"], args).unwrap()).unwrap()
    }

    fn error(args: &[&str]) -> String {
        match check(&config(args)) {
            Err(err) => err.to_string(),
            Ok(_) => panic!("{args:?} passed the host checks"),
        }
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
    fn each_check_names_what_the_host_lacks() {
        assert_eq!(
            error(&["-i", "nosuchif0"]),
            "unknown interface 'nosuchif0' (see `ip link` for the names)"
        );
        assert_eq!(
            error(&["-i", "lo", "--user", "nosuchuser0"]),
            "--user nosuchuser0: no such user"
        );
        assert!(
            error(&["-i", "lo", "--cpu", "100000"]).starts_with("--cpu 100000: not among"),
            "a CPU id no machine has was taken"
        );
        assert_eq!(
            error(&["-i", "lo", "--lan", "nosuchif0"]),
            "--lan nosuchif0: no such interface (see `ip link` for the names)"
        );
        let host = check(&config(&["-i", "lo", "--user", "root"])).unwrap();
        assert_eq!(host.user.map(|user| user.uid.as_raw()), Some(0));
        assert!(host.upstream.is_none());
    }

    #[test]
    fn upstream_hosts_are_addresses_or_names_looked_up() {
        let server = |url: &str| {
            check(&config(&["-i", "lo", "--upstream", url]))
                .unwrap()
                .upstream
                .unwrap()
        };
        assert_eq!(
            server("socks5://192.0.2.1:1080"),
            "192.0.2.1:1080".parse().unwrap()
        );
        assert_eq!(
            server("socks5://[2001:db8::1]:1080"),
            "[2001:db8::1]:1080".parse().unwrap()
        );
        let named = server("socks5://localhost:9050");
        assert!(named.ip().is_loopback() && named.port() == 9050, "{named}");
    }
}
