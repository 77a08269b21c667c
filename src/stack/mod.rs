//! Glue between smoltcp and the TUN: the in-memory device the interface is polled with,
//! the pool of transmit buffers that become TUN writes, and the receive window the
//! device holds each flow's segments to.

#[cfg(any(test, fuzzing))]
pub mod client;
pub mod device;
#[cfg(test)]
mod fuzz;
mod gather;
pub mod window;

pub use device::{Claim, StackDevice, TxPool, Write};

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpVersion};

/// An interface that accepts packets for any destination address: every flow routed
/// into the TUN is ours to terminate, whatever address it was meant for.
pub fn new_interface(device: &mut StackDevice<'_>, now: Instant, seed: u64) -> Interface {
    let mut config = Config::new(HardwareAddress::Ip);
    config.random_seed = seed;
    let mut iface = Interface::new(config, device, now);
    iface.set_any_ip(true);
    iface
}

/// One interface per IP version: they differ in how segmentation offload is set up
/// (see `TxPool::capabilities`). Interfaces hold no sockets, so this costs nothing.
pub struct Interfaces {
    v4: Interface,
    v6: Interface,
}

impl Interfaces {
    pub fn new(tx: &mut TxPool, now: Instant, seed: u64) -> Interfaces {
        let mut v4 = StackDevice::for_interface(tx, IpVersion::Ipv4);
        let v4 = new_interface(&mut v4, now, seed);
        let mut v6 = StackDevice::for_interface(tx, IpVersion::Ipv6);
        let v6 = new_interface(&mut v6, now, seed.rotate_left(32));
        Interfaces { v4, v6 }
    }

    /// The interface for flows with this server address.
    pub fn serving(&mut self, addr: &IpAddress) -> &mut Interface {
        match addr {
            IpAddress::Ipv4(_) => &mut self.v4,
            IpAddress::Ipv6(_) => &mut self.v6,
        }
    }
}

/// The proxy's side of smoltcp: the interfaces, the TUN transmit buffers, and an empty
/// socket set that answers packets of no known flow (with RST, as a closed port would).
pub struct Stack {
    pub ifaces: Interfaces,
    pub tx: TxPool,
    no_flow: SocketSet<'static>,
}

impl Stack {
    pub fn new(mut tx: TxPool, now: Instant, seed: u64) -> Stack {
        Stack {
            ifaces: Interfaces::new(&mut tx, now, seed),
            tx,
            no_flow: SocketSet::new(Vec::new()),
        }
    }

    /// A TCP packet for no flow: smoltcp answers it (RST unless it is one).
    pub fn reject(&mut self, now: Instant, server: &IpAddress, packet: &[u8]) {
        let iface = self.ifaces.serving(server);
        let mut device = StackDevice::ingress(packet, &mut self.tx, None);
        iface.poll_ingress_single(now, &mut device, &mut self.no_flow);
    }
}
