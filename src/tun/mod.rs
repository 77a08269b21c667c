//! The TUN device: created and configured in-process (name, addresses, MTU, link up).

use std::fs::OpenOptions;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::libc;
use socket2::{Domain, Socket, Type};

use crate::config::Config;
use crate::error::Error;
use crate::sys;

/// Packets the kernel may queue for us to read. The default (500) overflows while the
/// proxy is busy with a burst, and a dropped window update from a client costs a
/// zero-window-probe backoff of seconds; 4096 MTU packets are ~10 MB at most.
const TX_QUEUE_LEN: u32 = 4096;

/// An open TUN device. The kernel removes the (non-persistent) interface when it closes.
pub struct Tun {
    fd: OwnedFd,
    name: String,
}

impl Tun {
    /// Creates TUN `config.tun_name`, assigns `config.tun_addrs` and the MTU, brings it up.
    pub fn create(config: &Config) -> Result<Tun, Error> {
        // Refuse to attach to an interface someone else made: we would then configure
        // and, on exit, tear down state we do not own.
        if sys::interface_index(&config.tun_name).is_some() {
            return Err(Error::TunExists(config.tun_name.clone()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|err| match err.kind() {
                io::ErrorKind::PermissionDenied => Error::NotPermitted("open /dev/net/tun"),
                _ => Error::NoTun(err),
            })?;
        let fd = OwnedFd::from(file);
        sys::tun_set_iff(
            fd.as_raw_fd(),
            &config.tun_name,
            libc::IFF_TUN | libc::IFF_NO_PI,
        )
        .map_err(|err| Error::from_io("create the TUN device (TUNSETIFF)", err))?;
        let tun = Tun {
            fd,
            name: config.tun_name.clone(),
        };
        tun.configure(config)?;
        Ok(tun)
    }

    fn configure(&self, config: &Config) -> Result<(), Error> {
        let ctl4 = Socket::new(Domain::IPV4, Type::DGRAM, None)
            .map_err(|err| Error::Io("open control socket", err))?;
        sys::set_mtu(&ctl4, &self.name, config.mtu)
            .map_err(|err| Error::from_io("set the TUN MTU", err))?;
        sys::set_tx_queue_len(&ctl4, &self.name, TX_QUEUE_LEN)
            .map_err(|err| Error::from_io("set the TUN queue length", err))?;
        let index = sys::interface_index(&self.name)
            .ok_or_else(|| Error::Io("look up the new TUN", io::ErrorKind::NotFound.into()))?;
        for cidr in &config.tun_addrs {
            match cidr.addr {
                IpAddr::V4(addr) => sys::set_ipv4(&ctl4, &self.name, addr, cidr.prefix)
                    .map_err(|err| Error::from_io("assign the TUN IPv4 address", err))?,
                IpAddr::V6(addr) => {
                    let ctl6 = Socket::new(Domain::IPV6, Type::DGRAM, None)
                        .map_err(|err| Error::Io("open IPv6 control socket", err))?;
                    sys::set_ipv6(&ctl6, index, addr, cidr.prefix)
                        .map_err(|err| Error::from_io("assign the TUN IPv6 address", err))?
                }
            }
        }
        sys::set_up(&ctl4, &self.name).map_err(|err| Error::from_io("bring the TUN up", err))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
