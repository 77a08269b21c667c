//! The control socket's protocol: the one-line request, and the `status` reply a client
//! parses (any text, without a panic). Flow rows built from the fuzzer's bytes, written
//! as the proxy writes them, parse back to the same rows.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use uringproxy::control::Request;
use uringproxy::control::wire::{self, FlowRow, Proto, State};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            for full in [false, true] {
                let request = Request::parse(rest, full);
                // A request is a line: without a newline there is none yet.
                if !rest.contains(&b'\n') {
                    assert!(matches!(request, Request::Incomplete | Request::Invalid(_)));
                    assert_eq!(request == Request::Incomplete, !full);
                }
            }
        }
        1 => {
            let text = String::from_utf8_lossy(rest);
            if let Ok(reply) = wire::parse(&text) {
                assert!(text.starts_with(wire::MAGIC));
                for name in [&reply.tun, &reply.interface, &reply.offload] {
                    assert!(name.len() <= 64 && name.bytes().all(|b| b.is_ascii_graphic()));
                }
            }
        }
        _ => round_trip(rest),
    }
});

/// Rows of 48 bytes each: the reply of the proxy listing them parses back to them.
fn round_trip(bytes: &[u8]) {
    let rows: Vec<FlowRow> = bytes.chunks_exact(48).map(row).collect();
    let mut text = format!("{}\ntun upx0\nuptime_s 7\n", wire::MAGIC);
    for row in &rows {
        wire::write_flow(&mut text, row).unwrap();
    }
    wire::write_end(&mut text, rows.len() as u64).unwrap();
    let reply = wire::parse(&text).unwrap_or_else(|err| panic!("{err}: {text}"));
    assert_eq!(reply.flows, rows);
    assert_eq!((reply.tun.as_str(), reply.uptime_s), ("upx0", 7));
}

fn row(b: &[u8]) -> FlowRow {
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let addr = |at: usize| {
        let port = u16::from_le_bytes([b[at + 1], b[at + 2]]);
        let ip = if b[at] & 1 == 0 {
            IpAddr::V4(Ipv4Addr::new(b[at + 3], b[at + 4], b[at + 5], b[at + 6]))
        } else {
            let mut octets = [0u8; 16];
            octets[..4].copy_from_slice(&b[at + 3..at + 7]);
            octets[15] = b[at];
            IpAddr::V6(Ipv6Addr::from(octets))
        };
        SocketAddr::new(ip, port)
    };
    FlowRow {
        proto: [Proto::Tcp, Proto::Udp, Proto::Icmp][usize::from(b[0]) % 3],
        state: [State::Connecting, State::Open, State::Closing][usize::from(b[1]) % 3],
        client: addr(2),
        server: addr(9),
        bytes_up: u64_at(16),
        bytes_down: u64_at(24),
        age_s: u64_at(32),
        idle_s: u64_at(40),
        // A fake address's name (`--dns fake`), on some rows.
        name: (b[1] & 4 != 0).then(|| format!("n{}.fake.test", b[2])),
    }
}
