//! The client end of the TUN for in-process tests and the fuzz targets: a smoltcp
//! interface on a device that only queues packets, addressed as the host is on the TUN.

use std::collections::VecDeque;

use smoltcp::iface::{Config, Interface};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address, Ipv6Address};

/// The client's device: what it sends piles up in `sent`, what is for it in `inbox`.
pub struct QueueDevice {
    pub inbox: VecDeque<Vec<u8>>,
    pub sent: VecDeque<Vec<u8>>,
    mtu: usize,
    /// The proxy writes partial TCP checksums (checksum offload; the kernel would
    /// finish them), so the client must not verify what it receives.
    partial_checksums: bool,
}

impl QueueDevice {
    pub fn new(mtu: usize, partial_checksums: bool) -> QueueDevice {
        QueueDevice {
            inbox: VecDeque::new(),
            sent: VecDeque::new(),
            mtu,
            partial_checksums,
        }
    }
}

pub struct QueueRx(Vec<u8>);
pub struct QueueTx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for QueueRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for QueueTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0u8; len];
        let result = f(&mut packet);
        self.0.push_back(packet);
        result
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = QueueRx;
    type TxToken<'a> = QueueTx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(QueueRx, QueueTx<'_>)> {
        let packet = self.inbox.pop_front()?;
        Some((QueueRx(packet), QueueTx(&mut self.sent)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<QueueTx<'_>> {
        Some(QueueTx(&mut self.sent))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        if self.partial_checksums {
            let mut checksum = ChecksumCapabilities::default();
            checksum.tcp = Checksum::Tx;
            caps.checksum = checksum;
        }
        caps
    }
}

/// The client's interface on `device`: 198.18.0.1/30 (fd00::1/64 if `v6`), everything
/// routed to the TUN's peer address.
pub fn interface(device: &mut QueueDevice, v6: bool, now: Instant) -> Interface {
    let mut iface = Interface::new(Config::new(HardwareAddress::Ip), device, now);
    iface.update_ip_addrs(|addrs| {
        let cidr = if v6 {
            IpCidr::new(IpAddress::v6(0xfd00, 0, 0, 0, 0, 0, 0, 1), 64)
        } else {
            IpCidr::new(IpAddress::v4(198, 18, 0, 1), 30)
        };
        addrs.push(cidr).expect("one address");
    });
    let routes = iface.routes_mut();
    if v6 {
        let gateway = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
        routes.add_default_ipv6_route(gateway).expect("one route");
    } else {
        let gateway = Ipv4Address::new(198, 18, 0, 2);
        routes.add_default_ipv4_route(gateway).expect("one route");
    }
    iface
}
