//! The little HTTP the metrics endpoint speaks: one HTTP/1.0 or 1.1 request per
//! connection, `GET /metrics` answered with the exposition, anything else with a 4xx,
//! then the connection is closed. The request head must fit a bounded buffer; bodies
//! are refused.

use std::fmt::{self, Write};

/// What to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    ContentTooLarge,
    HeaderFieldsTooLarge,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::ContentTooLarge => "413 Content Too Large",
            Status::HeaderFieldsTooLarge => "431 Request Header Fields Too Large",
        }
    }

    /// The body of an error reply.
    pub fn explanation(self) -> &'static str {
        match self {
            Status::Ok => "",
            Status::BadRequest => "bad request\n",
            Status::NotFound => "not found: the metrics are at /metrics\n",
            Status::MethodNotAllowed => "only GET is served\n",
            Status::ContentTooLarge => "requests with a body are not served\n",
            Status::HeaderFieldsTooLarge => "request head too large\n",
        }
    }
}

/// The request head as far as it has arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// No blank line yet: wait for more.
    Incomplete,
    Respond(Status),
}

/// Parses the bytes received so far; `full` says the buffer holding them has no room
/// left (the head is then too large).
pub fn parse(bytes: &[u8], full: bool) -> Parsed {
    let Some(head) = head(bytes) else {
        return if full {
            Parsed::Respond(Status::HeaderFieldsTooLarge)
        } else {
            Parsed::Incomplete
        };
    };
    Parsed::Respond(respond(head))
}

/// The head (request line and header lines, without the blank line), if complete.
/// Lines may end in CRLF or a lone LF (RFC 9112 section 2.2).
fn head(bytes: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    while let Some(newline) = bytes[at..].iter().position(|&b| b == b'\n') {
        let line = &bytes[at..at + newline];
        if line.is_empty() || line == b"\r" {
            return Some(&bytes[..at]);
        }
        at += newline + 1;
    }
    None
}

fn respond(head: &[u8]) -> Status {
    let Ok(head) = std::str::from_utf8(head) else {
        return Status::BadRequest;
    };
    let mut lines = head
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line));
    let Some(request_line) = lines.next() else {
        return Status::BadRequest;
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Status::BadRequest;
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Status::BadRequest,
    };
    if !is_token(method)
        || !target.starts_with('/')
        || !target.bytes().all(|b| b.is_ascii_graphic())
    {
        return Status::BadRequest;
    }
    let mut host = false;
    let mut content_length = None;
    for line in lines.filter(|line| !line.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Status::BadRequest;
        };
        let value = value.trim_matches([' ', '\t']);
        if !is_token(name) || value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Status::BadRequest;
        }
        if name.eq_ignore_ascii_case("host") {
            host = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            let Ok(length) = value.parse::<u64>() else {
                return Status::BadRequest;
            };
            if content_length.is_some_and(|other| other != length) {
                return Status::BadRequest;
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Status::ContentTooLarge;
        }
    }
    // RFC 9112 section 3.2: a 1.1 request without Host is a bad one.
    if http11 && !host {
        return Status::BadRequest;
    }
    if content_length.is_some_and(|length| length > 0) {
        return Status::ContentTooLarge;
    }
    if method != "GET" {
        return Status::MethodNotAllowed;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if path == "/metrics" {
        Status::Ok
    } else {
        Status::NotFound
    }
}

/// RFC 9110 token characters (methods, header names).
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Writes the response head for a body of `length` bytes. Every response closes the
/// connection.
pub fn write_head(out: &mut impl Write, status: Status, length: usize) -> fmt::Result {
    let content_type = match status {
        Status::Ok => "text/plain; version=0.0.4; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    };
    write!(out, "HTTP/1.1 {}\r\n", status.line())?;
    if status == Status::MethodNotAllowed {
        out.write_str("Allow: GET\r\n")?;
    }
    write!(
        out,
        "Content-Type: {content_type}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(request: &str) -> Parsed {
        parse(request.as_bytes(), false)
    }

    #[test]
    fn get_metrics_is_served_and_other_requests_get_a_4xx() {
        use Status::*;
        for (request, expected) in [
            ("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Ok),
            ("GET /metrics HTTP/1.0\r\n\r\n", Ok),
            ("GET /metrics?name[]=up HTTP/1.0\n\n", Ok),
            (
                "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\nContent-Length: 0\r\n\r\n",
                Ok,
            ),
            ("GET / HTTP/1.0\r\n\r\n", NotFound),
            ("GET /metricsx HTTP/1.0\r\n\r\n", NotFound),
            ("POST /metrics HTTP/1.0\r\n\r\n", MethodNotAllowed),
            ("HEAD /metrics HTTP/1.0\r\n\r\n", MethodNotAllowed),
            (
                "GET /metrics HTTP/1.0\r\nContent-Length: 5\r\n\r\n",
                ContentTooLarge,
            ),
            (
                "GET /metrics HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                ContentTooLarge,
            ),
            ("GET /metrics HTTP/1.1\r\n\r\n", BadRequest),
            ("GET /metrics HTTP/2.0\r\n\r\n", BadRequest),
            ("GET /metrics\r\n\r\n", BadRequest),
            ("GET  /metrics HTTP/1.0\r\n\r\n", BadRequest),
            ("GET /metrics HTTP/1.0 extra\r\n\r\n", BadRequest),
            ("G(T /metrics HTTP/1.0\r\n\r\n", BadRequest),
            ("GET metrics HTTP/1.0\r\n\r\n", BadRequest),
            ("GET /met\u{7f}rics HTTP/1.0\r\n\r\n", BadRequest),
            ("GET /metrics HTTP/1.0\r\nno colon\r\n\r\n", BadRequest),
            ("GET /metrics HTTP/1.0\r\nBad Name: x\r\n\r\n", BadRequest),
            ("GET /metrics HTTP/1.0\r\nX: a\u{1}b\r\n\r\n", BadRequest),
            (
                "GET /metrics HTTP/1.0\r\nContent-Length: -1\r\n\r\n",
                BadRequest,
            ),
            (
                "GET /metrics HTTP/1.0\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n",
                BadRequest,
            ),
            ("\r\n\r\n", BadRequest),
            ("\u{1}\u{2}\u{3}\n\n", BadRequest),
        ] {
            assert_eq!(status(request), Parsed::Respond(expected), "{request:?}");
        }
        assert_eq!(
            parse(b"GET /metrics HTTP/1.0\r\n\xff: x\r\n\r\n", false),
            Parsed::Respond(BadRequest)
        );
    }

    #[test]
    fn an_unfinished_head_waits_until_the_buffer_is_full() {
        let request = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 0..request.len() - 1 {
            let prefix = &request.as_bytes()[..cut];
            assert_eq!(parse(prefix, false), Parsed::Incomplete, "{cut}");
            assert_eq!(
                parse(prefix, true),
                Parsed::Respond(Status::HeaderFieldsTooLarge),
                "{cut}"
            );
        }
        assert_eq!(
            parse(&[b'x'; 9000], true),
            Parsed::Respond(Status::HeaderFieldsTooLarge)
        );
    }

    #[test]
    fn responses_carry_length_type_and_close() {
        let mut head = String::new();
        write_head(&mut head, Status::Ok, 42).unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: 42\r\nConnection: close\r\n\r\n"
        );
        let mut head = String::new();
        write_head(&mut head, Status::MethodNotAllowed, 3).unwrap();
        assert!(head.starts_with("HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\n"));
    }
}
