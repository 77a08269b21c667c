//! Seeded fuzzing of the ingress path on stable Rust: arbitrary bytes and mutated valid
//! packets (TCP, UDP, ICMP echo; IPv4 and IPv6; with and without virtio-net headers) go
//! through header parsing, classification and smoltcp ingress with live flow sockets.
//! Nothing may panic. `FUZZ_CASES=N cargo test --release fuzz` runs longer.

use smoltcp::iface::SocketSet;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{IpEndpoint, IpListenEndpoint, TcpControl};

use super::{Interfaces, StackDevice, TxPool};
use crate::wire::demux::tests::{tcp_packet, udp_packet, v4, v6};
use crate::wire::{Offload, vnet};
use crate::wire::{Parsed, parse};

/// xorshift64*: deterministic, so a failing case can be replayed from its index.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (client, server) in [
        (v4([10, 0, 0, 1], 40000), v4([10, 0, 0, 2], 80)),
        (v6(1, 40000), v6(2, 80)),
    ] {
        for (control, ack) in [
            (TcpControl::Syn, false),
            (TcpControl::None, true),
            (TcpControl::Psh, true),
            (TcpControl::Fin, true),
            (TcpControl::Rst, true),
        ] {
            seeds.push(tcp_packet(client, server, control, ack));
        }
        seeds.push(udp_packet(client, server, b"datagram payload"));
        let mut echo = udp_packet(client, server, b"12345678");
        // Turn the UDP packet into an echo request of the same family.
        let (proto_at, proto, kind) = if echo[0] >> 4 == 4 {
            (9, 1, 8)
        } else {
            (6, 58, 128)
        };
        echo[proto_at] = proto;
        let l4 = if echo[0] >> 4 == 4 { 20 } else { 40 };
        echo[l4] = kind;
        echo[l4 + 1] = 0;
        seeds.push(echo);
    }
    seeds
}

/// Flips bits, overwrites bytes, truncates, extends, or rewrites length fields.
fn mutate(rng: &mut Rng, packet: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !packet.is_empty() => {
                let at = rng.below(packet.len());
                packet[at] ^= 1 << rng.below(8);
            }
            1 if !packet.is_empty() => {
                let at = rng.below(packet.len());
                packet[at] = rng.next() as u8;
            }
            2 => packet.truncate(rng.below(packet.len() + 1)),
            3 => packet.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
            // Length fields: IPv4 total length, IPv6 payload length, IHL.
            4 if packet.len() > 6 => {
                let at = [2, 4, 0][rng.below(3)];
                packet[at] = rng.next() as u8;
            }
            _ => {}
        }
    }
}

fn vnet_header(rng: &mut Rng) -> [u8; vnet::LEN] {
    let mut header = [0u8; vnet::LEN];
    if rng.below(2) == 0 {
        for byte in &mut header {
            *byte = rng.next() as u8;
        }
    } else {
        vnet::Header {
            needs_csum: rng.below(2) == 0,
            gso: [
                vnet::Gso::None,
                vnet::Gso::TcpV4,
                vnet::Gso::TcpV6,
                vnet::Gso::UdpL4,
            ][rng.below(4)],
            ecn: false,
            hdr_len: rng.below(80) as u16,
            gso_size: rng.below(2000) as u16,
            csum_start: rng.below(80) as u16,
            csum_offset: [6, 16, rng.below(100)][rng.below(3)] as u16,
        }
        .emit(&mut header);
    }
    header
}

/// A flow socket like the event loop's: listening on `server`, SYN|ACK held back.
fn listening_set(server: IpEndpoint) -> SocketSet<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; 4096]),
        tcp::SocketBuffer::new(vec![0u8; 4096]),
    );
    socket.pause_synack(true);
    let _ = socket.listen(IpListenEndpoint {
        addr: Some(server.addr),
        port: server.port,
    });
    let mut set = SocketSet::new(Vec::new());
    set.add(socket);
    set
}

#[test]
fn fuzz_ingress_never_panics() {
    let cases: usize = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let seeds = seeds();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for offload in [Offload::None, Offload::Tso] {
        let mut tx = TxPool::new(16, 1500, offload).unwrap();
        let mut ifaces = Interfaces::new(&mut tx, Instant::ZERO, 1);
        let mut no_flow = SocketSet::new(Vec::new());
        let mut flows: Vec<SocketSet<'static>> = Vec::new();
        let mut reached_smoltcp = 0;
        for case in 0..cases {
            let mut packet = if rng.below(5) == 0 {
                (0..rng.below(200)).map(|_| rng.next() as u8).collect()
            } else {
                seeds[rng.below(seeds.len())].clone()
            };
            mutate(&mut rng, &mut packet);
            let mut buffer = Vec::with_capacity(vnet::LEN + packet.len());
            if offload.vnet_header() {
                buffer.extend_from_slice(&vnet_header(&mut rng));
            }
            buffer.extend_from_slice(&packet);
            let ip = if offload.vnet_header() {
                match vnet::Header::parse(&buffer) {
                    Ok((_, ip)) => ip,
                    Err(_) => continue,
                }
            } else {
                &buffer[..]
            };
            let now = Instant::from_millis(case as i64);
            if let Parsed::Tcp { key, opens, .. } = parse(ip) {
                let iface = ifaces.serving(&key.server.addr);
                let set = if opens && flows.len() < 64 {
                    flows.push(listening_set(key.server));
                    flows.last_mut().unwrap()
                } else if !flows.is_empty() && rng.below(2) == 0 {
                    let at = rng.below(flows.len());
                    &mut flows[at]
                } else {
                    &mut no_flow
                };
                iface.poll_ingress_single(now, &mut StackDevice::ingress(ip, &mut tx, None), set);
                reached_smoltcp += 1;
                let released: Vec<u16> = {
                    let mut written = Vec::new();
                    tx.take_ready(|index, _| written.push(index));
                    written
                };
                for index in released {
                    tx.release(index);
                }
            }
        }
        // The mutations must leave enough packets intact to exercise smoltcp itself.
        assert!(
            reached_smoltcp > cases / 20 && !flows.is_empty(),
            "only {reached_smoltcp} of {cases} cases reached smoltcp ({offload:?})"
        );
        eprintln!(
            "fuzz ({offload:?}): {cases} cases, {reached_smoltcp} through smoltcp, {} flows",
            flows.len()
        );
    }
}
