//! The metrics endpoint's HTTP request parser on any bytes: no panic, an answer only
//! once the head is complete (or the buffer full), and the answer depends on the head
//! alone, so bytes after the blank line, or more arriving, never change it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uringproxy::control::http::{self, Parsed, Status};

fuzz_target!(|data: &[u8]| {
    let answer = http::parse(data, false);
    let full = http::parse(data, true);
    match answer {
        Parsed::Incomplete => {
            assert_eq!(full, Parsed::Respond(Status::HeaderFieldsTooLarge));
            // Still incomplete with any prefix of it.
            for cut in [0, data.len() / 2, data.len().saturating_sub(1)] {
                assert_eq!(http::parse(&data[..cut], false), Parsed::Incomplete);
            }
        }
        Parsed::Respond(status) => {
            assert_eq!(full, answer, "a complete head is answered alike when full");
            let mut more = data.to_vec();
            more.extend_from_slice(b"GET /metrics HTTP/1.0\r\n\r\n");
            assert_eq!(
                http::parse(&more, false),
                answer,
                "bytes after the head count"
            );
            if status == Status::Ok {
                assert!(data.starts_with(b"GET /metrics"), "200 for {data:?}");
            }
            let mut head = String::new();
            http::write_head(&mut head, status, data.len()).unwrap();
            assert!(head.starts_with("HTTP/1.1 ") && head.ends_with("\r\n\r\n"));
        }
    }
});
