//! What the control socket, the metrics endpoint and SIGUSR1 say, without any I/O: the
//! numbers the proxy reports (named once, in `counters`), the `status` reply streamed
//! over the control socket and its parser, the Prometheus exposition, the HTTP requests
//! the metrics endpoint answers, the `uringproxy status` client that renders a reply,
//! and the text report SIGUSR1 prints.

pub mod client;
pub mod counters;
pub mod http;
pub mod out;
pub mod prometheus;
pub mod render;
pub mod report;
pub mod wire;

use std::path::PathBuf;

/// Where control sockets live unless `--control` says otherwise.
pub const SOCKET_DIR: &str = "/run/uringproxy";

/// The default control socket of the proxy with TUN `tun`.
pub fn socket_path(tun: &str) -> PathBuf {
    PathBuf::from(format!("{SOCKET_DIR}/{tun}.sock"))
}

/// What a status client asks for on the control socket: one line.
pub const STATUS_REQUEST: &[u8] = b"status\n";
/// The most a control request may take (it is one short line).
pub const CONTROL_REQUEST_LIMIT: usize = 256;
/// The most an HTTP request head may take; larger ones get 431.
pub const HTTP_HEAD_LIMIT: usize = 8 * 1024;
/// Each client's reply buffer: a whole metrics exposition, or one slice of a status
/// reply (its header, or a few hundred flows).
pub const REPLY_BUFFER: usize = 32 * 1024;

/// The start of a control request, as far as it has arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// No newline yet: wait for more.
    Incomplete,
    Status,
    /// Anything else; the reply names why.
    Invalid(&'static str),
}

impl Request {
    /// Parses the bytes a control client sent so far; `full` says the buffer they are
    /// in has no room for more.
    pub fn parse(bytes: &[u8], full: bool) -> Request {
        let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
            return if full {
                Request::Invalid("request too long")
            } else {
                Request::Incomplete
            };
        };
        let line = &bytes[..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line == &STATUS_REQUEST[..STATUS_REQUEST.len() - 1] {
            Request::Status
        } else {
            Request::Invalid("unknown request (the only one is \"status\")")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_requests_are_one_status_line() {
        assert_eq!(Request::parse(b"status\n", false), Request::Status);
        assert_eq!(Request::parse(b"status\r\n", false), Request::Status);
        assert_eq!(Request::parse(b"status\nmore", false), Request::Status);
        assert_eq!(Request::parse(b"stat", false), Request::Incomplete);
        assert_eq!(Request::parse(b"", false), Request::Incomplete);
        for bad in [
            &b"STATUS\n"[..],
            b"status \n",
            b"\n",
            b"\xff\xfe\n",
            b"status\0\n",
        ] {
            assert!(
                matches!(Request::parse(bad, false), Request::Invalid(_)),
                "{bad:?}"
            );
        }
        assert_eq!(
            Request::parse(&[b'a'; 64], true),
            Request::Invalid("request too long")
        );
    }
}
