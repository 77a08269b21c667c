//! Addresses with a prefix length, as given on the command line: interface addresses
//! (`--tun-addr`) and destination networks (`--route`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address with its prefix length, such as `198.18.0.1/30` (an interface address)
/// or `10.0.0.0/8` (a network).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// An interface address: a unicast host address; host bits are its point.
impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let cidr = Cidr::parse(text)?;
        if cidr.addr.is_unspecified() || cidr.addr.is_multicast() {
            return Err(format!("'{text}': address must be unicast"));
        }
        Ok(cidr)
    }
}

impl Cidr {
    /// A destination network: any prefix length (`0.0.0.0/0`, `0.0.0.0/1`, `::/1`...),
    /// host bits zero. Set host bits are refused rather than masked: `10.1.2.3/24` is
    /// more likely a typo for an address than a way of writing `10.1.2.0/24`.
    pub fn network(text: &str) -> Result<Cidr, String> {
        let cidr = Cidr::parse(text)?;
        let network = cidr.masked();
        if network != cidr {
            return Err(format!(
                "'{text}' has host bits set: the network is {network}"
            ));
        }
        if cidr.addr.is_multicast() {
            return Err(format!("'{text}': multicast is not relayed"));
        }
        Ok(cidr)
    }

    /// The single address `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            prefix: Cidr::max_prefix(addr),
        }
    }

    /// The network this address is in: host bits cleared.
    fn masked(self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Cidr { addr, ..self }
    }

    fn max_prefix(addr: IpAddr) -> u8 {
        if addr.is_ipv4() { 32 } else { 128 }
    }

    /// `ADDRESS/PREFIX` with a prefix that fits the family, nothing more.
    fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || format!("'{text}': expected ADDRESS/PREFIX, e.g. 198.18.0.1/30");
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = Cidr::max_prefix(addr);
        if prefix > max {
            return Err(format!("'{text}': prefix longer than {max}"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_and_ipv6_interface_addresses() {
        let v4: Cidr = "198.18.0.1/30".parse().unwrap();
        assert_eq!(v4.addr, "198.18.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(v4.prefix, 30);
        let v6: Cidr = "fd7a:7072:7879::1/64".parse().unwrap();
        assert_eq!(v6.prefix, 64);
        assert_eq!(v6.to_string(), "fd7a:7072:7879::1/64");
    }

    #[test]
    fn rejects_malformed_and_non_unicast_interface_addresses() {
        for bad in [
            "",
            "1.2.3.4",
            "1.2.3.4/",
            "1.2.3.4/33",
            "::1/129",
            "x/24",
            "1.2.3/24",
            "0.0.0.0/8",
            "::/64",
            "224.0.0.1/4",
            "ff02::1/64",
            "1.2.3.4/-1",
            "1.2.3.4/24/1",
            " 1.2.3.4/24",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn networks_of_every_prefix_length_are_accepted() {
        for (text, prefix) in [
            ("0.0.0.0/0", 0),
            ("0.0.0.0/1", 1),
            ("128.0.0.0/1", 1),
            ("10.0.0.0/8", 8),
            ("0.0.0.0/8", 8),
            ("10.1.2.3/32", 32),
            ("::/0", 0),
            ("::/1", 1),
            ("8000::/1", 1),
            ("2001:db8::/32", 32),
            ("2001:db8::7/128", 128),
        ] {
            let network = Cidr::network(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(network.prefix, prefix);
            assert_eq!(network.to_string(), text);
        }
    }

    #[test]
    fn networks_with_host_bits_name_the_network_meant() {
        for (text, meant) in [
            ("10.1.2.3/24", "10.1.2.0/24"),
            ("1.2.3.4/0", "0.0.0.0/0"),
            ("192.168.1.1/1", "128.0.0.0/1"),
            ("2001:db8::1/64", "2001:db8::/64"),
            ("::1/1", "::/1"),
        ] {
            let err = Cidr::network(text).unwrap_err();
            assert!(
                err.contains("host bits") && err.ends_with(meant),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn malformed_and_multicast_networks_are_refused() {
        for bad in [
            "nonsense",
            "10.0.0.0",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/x",
            "224.0.0.0/4",
            "ff00::/8",
        ] {
            assert!(Cidr::network(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn host_and_masked() {
        let host = Cidr::host("198.18.0.1".parse().unwrap());
        assert_eq!(host.to_string(), "198.18.0.1/32");
        assert_eq!(Cidr::host("::1".parse().unwrap()).prefix, 128);
        let cidr: Cidr = "fd7a:7072:7879::1/64".parse().unwrap();
        assert_eq!(cidr.masked().to_string(), "fd7a:7072:7879::/64");
        assert_eq!(host.masked(), host);
    }
}
