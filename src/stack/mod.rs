//! Glue between smoltcp and the TUN: the in-memory device the interface is polled with,
//! the pool of transmit buffers, and the 4-tuple parser that picks a packet's flow.

pub mod device;
pub mod offload;
pub mod packet;

pub use device::{StackDevice, TxPool};
pub use packet::{FlowKey, Parsed, parse};

use smoltcp::iface::{Config, Interface};
use smoltcp::time::Instant;
use smoltcp::wire::HardwareAddress;

/// An interface that accepts packets for any destination address: every flow routed
/// into the TUN is ours to terminate, whatever address it was meant for.
pub fn new_interface(device: &mut StackDevice<'_>, now: Instant, seed: u64) -> Interface {
    let mut config = Config::new(HardwareAddress::Ip);
    config.random_seed = seed;
    let mut iface = Interface::new(config, device, now);
    iface.set_any_ip(true);
    iface
}
