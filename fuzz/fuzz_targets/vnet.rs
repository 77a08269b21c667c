//! The virtio-net header in front of every TUN packet: any bytes parse or are refused
//! without a panic, an accepted header describes only bytes of the packet, and
//! re-emitting it parses back to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uringproxy::wire::vnet::{self, Gso, Header};

fuzz_target!(|data: &[u8]| {
    let Ok((header, packet)) = Header::parse(data) else {
        return;
    };
    assert_eq!(
        packet,
        &data[vnet::LEN..],
        "the packet is what follows the header"
    );
    if header.needs_csum {
        let end = usize::from(header.csum_start) + usize::from(header.csum_offset) + 2;
        assert!(
            end <= packet.len(),
            "checksum field past the packet: {header:?}"
        );
    }
    if header.gso != Gso::None {
        assert!(header.gso_size > 0, "segmentation into empty segments");
    }
    let mut again = data.to_vec();
    header.emit(&mut again);
    let (reparsed, rest) = Header::parse(&again).expect("an emitted header parses");
    assert_eq!(reparsed, header);
    assert_eq!(rest, packet);
});
