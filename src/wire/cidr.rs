//! Addresses with a prefix length, as given on the command line (`--tun-addr`, `--route`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

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

    #[test]
    fn route_networks_include_everything() {
        assert_eq!(Cidr::network("0.0.0.0/0").unwrap().prefix, 0);
        assert!(Cidr::network("::/0").unwrap().addr.is_ipv6());
        assert_eq!(Cidr::network("10.0.0.0/8").unwrap().prefix, 8);
        assert!(Cidr::network("0.0.0.0/8").is_err());
        assert!(Cidr::network("nonsense").is_err());
    }
}
