//! The demultiplexer every TUN packet goes through: any bytes classify without a panic,
//! what it names lies inside the packet, and a UDP reply built for the flow it found
//! parses back as that flow reversed, with the same payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uringproxy::wire::{self, FlowKey, Parsed, udp};

fuzz_target!(|data: &[u8]| {
    match wire::parse(data) {
        Parsed::Tcp { key, opens, mss } => {
            assert!(key.client.port != 0 && key.server.port != 0);
            assert!(
                opens || mss.is_none(),
                "MSS read from a segment that opens nothing"
            );
        }
        Parsed::Udp {
            key,
            payload_start,
            payload_len,
        } => {
            assert!(key.client.port != 0 && key.server.port != 0);
            let payload = data
                .get(payload_start..payload_start + payload_len)
                .expect("UDP payload outside the packet");
            reply_round_trips(key, payload);
            // The datagrams of a USO super-packet of this payload, at any segment size.
            let size = u16::from_le_bytes([data[0], data[data.len() - 1]]);
            let parts: Vec<&[u8]> = udp::datagrams(payload, Some(size), 65507).collect();
            if size == 0 && !payload.is_empty() {
                assert!(parts.is_empty(), "no packet has segment size 0");
            } else {
                assert_eq!(parts.concat(), payload, "the datagrams are the payload");
                let chunk = usize::from(size.max(1));
                assert_eq!(parts.len(), payload.len().div_ceil(chunk).max(1));
                assert!(parts.iter().all(|part| part.len() <= chunk));
            }
        }
        Parsed::Echo {
            data_start,
            data_len,
            key,
            ..
        } => {
            assert_eq!(key.server.port, 0);
            assert!(
                data_start + data_len <= data.len(),
                "echo data outside the packet"
            );
        }
        Parsed::Fragment | Parsed::Unsupported | Parsed::Malformed => {}
    }
});

/// A reply from the server to the client of `key` parses back as `key` reversed.
fn reply_round_trips(key: FlowKey, payload: &[u8]) {
    let mut buf = vec![0u8; payload.len() + 100];
    let Some(len) = udp::reply(&mut buf, key, payload) else {
        // Only a payload too big for one IP packet has no reply.
        assert!(
            payload.len() + 8 > 65535 - 20,
            "no reply for {} bytes",
            payload.len()
        );
        return;
    };
    let Parsed::Udp {
        key: back,
        payload_start,
        payload_len,
    } = wire::parse(&buf[..len])
    else {
        panic!("the reply is not UDP: {:?}", wire::parse(&buf[..len]));
    };
    assert_eq!((back.client, back.server), (key.server, key.client));
    assert_eq!(&buf[payload_start..payload_start + payload_len], payload);
}
