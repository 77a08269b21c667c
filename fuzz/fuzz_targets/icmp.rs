//! ICMP the proxy writes: destination-unreachable errors quoting any bytes a client sent
//! (at most the quote's length), echo replies from whatever a raw socket delivers, and
//! echo requests. Nothing panics; what is written is a valid packet (checksums right)
//! going back the way the quoted one came, and echoes carry their data unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpEndpoint, Ipv4Packet,
    Ipv6Packet,
};
use uringproxy::wire::FlowKey;
use uringproxy::wire::icmp::{self, EchoReply, QUOTE_LEN, Quote, Reason};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => unreachable(data, selector),
        1 => echo_reply(data, selector),
        _ => echo_request(data, selector),
    }
});

fn unreachable(data: &[u8], selector: u8) {
    let quote = Quote::of(data);
    let reason = [
        Reason::Network,
        Reason::Host,
        Reason::Port,
        Reason::Prohibited,
    ][usize::from(selector >> 2) % 4];
    // The sequence number is read from inside the quote only.
    if let Some(seq) = quote.tcp_seq() {
        let bytes = &data[..data.len().min(QUOTE_LEN)];
        let at = match bytes[0] >> 4 {
            4 => usize::from(bytes[0] & 0x0f) * 4,
            _ => 40,
        };
        assert_eq!(seq.to_be_bytes(), bytes[at + 4..at + 8]);
    }
    let mut buf = [0u8; 1500];
    let Some(len) = icmp::unreachable(&mut buf, &quote, reason) else {
        return;
    };
    assert!(len <= buf.len());
    let packet = &buf[..len];
    match packet[0] >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).expect("a valid IPv4 packet");
            assert!(ip.verify_checksum());
            assert_eq!(
                ip.dst_addr().octets(),
                data[12..16],
                "back to the quoted source"
            );
            assert_eq!(ip.src_addr().octets(), data[16..20]);
            let message = Icmpv4Packet::new_checked(ip.payload()).expect("an ICMP message");
            assert!(message.verify_checksum());
            assert_eq!(
                message.msg_type(),
                smoltcp::wire::Icmpv4Message::DstUnreachable
            );
            // The quote: the client's header (without options), then the 8 bytes after
            // its options.
            let quoted = message.data();
            let header_len = usize::from(data[0] & 0x0f) * 4;
            assert_eq!(quoted[12..20], data[12..20]);
            assert_eq!(quoted[20..28], data[header_len..header_len + 8]);
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).expect("a valid IPv6 packet");
            assert_eq!(
                ip.dst_addr().octets(),
                data[8..24],
                "back to the quoted source"
            );
            assert_eq!(ip.src_addr().octets(), data[24..40]);
            let message = Icmpv6Packet::new_checked(ip.payload()).expect("an ICMPv6 message");
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            assert!(message.verify_checksum(&src, &dst));
            assert_eq!(
                message.msg_type(),
                smoltcp::wire::Icmpv6Message::DstUnreachable
            );
        }
        version => panic!("IP version {version} written"),
    }
}

/// The flow a raw socket's bytes are matched against: IPv4 or IPv6 after the selector.
fn flow(selector: u8) -> FlowKey {
    let (client, server) = if selector & 4 == 0 {
        (IpAddress::v4(10, 0, 0, 1), IpAddress::v4(192, 0, 2, 9))
    } else {
        (
            IpAddress::v6(0xfd00, 0, 0, 0, 0, 0, 0, 1),
            IpAddress::v6(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9),
        )
    };
    FlowKey {
        client: IpEndpoint::new(client, 7),
        server: IpEndpoint::new(server, 0),
    }
}

fn echo_reply(data: &[u8], selector: u8) {
    let key = flow(selector);
    let outbound = 0x8007;
    let mut buf = [0u8; 1500];
    let written = icmp::echo_reply(&mut buf, key, outbound, data);
    // Whose reply it is does not depend on the buffer.
    let ours = icmp::echo_reply(&mut [], key, outbound, data) != EchoReply::NotOurs;
    assert_eq!(ours, written != EchoReply::NotOurs);
    let EchoReply::Written(len) = written else {
        return;
    };
    let caps = ChecksumCapabilities::default();
    match key.client.addr {
        IpAddress::Ipv4(client) => {
            let ip = Ipv4Packet::new_checked(&buf[..len]).expect("a valid IPv4 packet");
            assert!(ip.verify_checksum());
            assert_eq!(ip.dst_addr(), client);
            let message = Icmpv4Packet::new_checked(ip.payload()).unwrap();
            let Ok(Icmpv4Repr::EchoReply {
                ident,
                data: echoed,
                ..
            }) = Icmpv4Repr::parse(&message, &caps)
            else {
                panic!("not a valid echo reply");
            };
            assert_eq!(ident, key.client.port, "the client's own identifier");
            let received = Ipv4Packet::new_checked(data).unwrap();
            assert_eq!(echoed, &received.payload()[8..], "the data unchanged");
        }
        IpAddress::Ipv6(client) => {
            let ip = Ipv6Packet::new_checked(&buf[..len]).expect("a valid IPv6 packet");
            assert_eq!(ip.dst_addr(), client);
            let message = Icmpv6Packet::new_checked(ip.payload()).unwrap();
            let Ok(Icmpv6Repr::EchoReply {
                ident,
                data: echoed,
                ..
            }) = Icmpv6Repr::parse(&ip.src_addr(), &client, &message, &caps)
            else {
                panic!("not a valid echo reply");
            };
            assert_eq!(ident, key.client.port, "the client's own identifier");
            assert_eq!(echoed, &data[8..], "the data unchanged");
        }
    }
}

fn echo_request(data: &[u8], selector: u8) {
    let ipv4 = selector & 4 == 0;
    let (ident, seq) = (u16::from(selector) * 257, 0x1234);
    let mut buf = [0u8; 512];
    let len = icmp::echo_request(&mut buf, ipv4, ident, seq, data);
    assert_eq!(len, (8 + data.len()).min(buf.len()), "data cut only to fit");
    let message = &buf[..len];
    assert_eq!(&message[8..], &data[..len - 8]);
    if ipv4 {
        let packet = Icmpv4Packet::new_checked(message).unwrap();
        let Ok(Icmpv4Repr::EchoRequest {
            ident: got, seq_no, ..
        }) = Icmpv4Repr::parse(&packet, &ChecksumCapabilities::default())
        else {
            panic!("not a valid echo request");
        };
        assert_eq!((got, seq_no), (ident, seq));
    } else {
        assert_eq!((message[0], message[1]), (128, 0));
        assert_eq!(
            message[4..8],
            [ident.to_be_bytes(), 0x1234u16.to_be_bytes()].concat()
        );
    }
}
