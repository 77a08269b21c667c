//! `--upstream` as a SOCKS5 server's host, port and credentials: the URL parsed
//! strictly, without looking the host up and without repeating the text in an error.

use crate::wire::socks5::Credentials;

/// A SOCKS5 upstream (`--upstream`). Its `Debug` shows no credential.
#[derive(Clone, Debug)]
pub struct Socks5 {
    /// An address or a name: the name is looked up at start-up, with the other checks
    /// that ask the host.
    pub host: String,
    pub port: u16,
    pub credentials: Option<Credentials>,
}

const UPSTREAM_SYNTAX: &str = "socks5://[user:pass@]HOST:PORT or direct";

/// Parses `--upstream`: `direct`, or a socks5 URL whose host is an address or a name
/// and whose user name and password may be %-encoded. The errors never repeat the text,
/// which may hold a password.
pub fn parse(text: &str) -> Result<Option<Socks5>, String> {
    if text == "direct" {
        return Ok(None);
    }
    let usage = |why: &str| format!("--upstream: {why} (expected {UPSTREAM_SYNTAX})");
    let is_scheme = |scheme: &str| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    };
    let (scheme, rest) = text
        .split_once("://")
        .filter(|(scheme, _)| is_scheme(scheme))
        .ok_or_else(|| usage("not a URL"))?;
    if !scheme.eq_ignore_ascii_case("socks5") {
        return Err(usage(&format!("unsupported scheme '{scheme}'")));
    }
    let (userinfo, host_port) = match rest.rsplit_once('@') {
        Some((userinfo, host_port)) => (Some(userinfo), host_port),
        None => (None, rest),
    };
    let host_port = host_port.strip_suffix('/').unwrap_or(host_port);
    if host_port.contains(['/', '?', '#']) {
        return Err(usage("a path, query or fragment is not allowed"));
    }
    let (host, port) = match host_port.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| usage("unclosed '['"))?;
            (host, after.strip_prefix(':'))
        }
        None => match host_port.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(usage("an IPv6 address goes in brackets"));
            }
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Err(usage("missing host"));
    }
    let port = port.ok_or_else(|| usage("missing port"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(|| {
            // Only digits are shown: `socks5://user:password` with the host forgotten
            // would put the password here.
            if port.bytes().all(|b| b.is_ascii_digit()) {
                format!("--upstream: port '{port}' is not a number in 1..=65535")
            } else {
                "--upstream: the port is not a number in 1..=65535 (credentials go before \
                 the host: user:pass@HOST:PORT)"
                    .to_string()
            }
        })?;
    let credentials = match userinfo {
        None => None,
        Some(userinfo) => {
            let (user, password) = userinfo
                .split_once(':')
                .ok_or_else(|| usage("a user name needs a password (user:pass@)"))?;
            let decode = |part: &str, what: &str| {
                percent_decode(part)
                    .ok_or_else(|| format!("--upstream: a bad %-escape in the {what}"))
            };
            let (user, password) = (decode(user, "user name")?, decode(password, "password")?);
            Some(
                Credentials::new(&user, &password)
                    .map_err(|why| format!("--upstream: {why} (RFC 1929 takes 1 to 255 bytes)"))?,
            )
        }
    };
    Ok(Some(Socks5 {
        host: host.to_string(),
        port,
        credentials,
    }))
}

/// `text` with its %XX escapes decoded; `None` for a `%` not followed by two hex digits.
fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = bytes.get(at + 1..at + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            // Two hex digits: valid UTF-8 and a byte.
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_are_parsed_strictly_and_never_echoed() {
        assert!(parse("direct").unwrap().is_none());
        let plain = parse("socks5://192.0.2.1:1080").unwrap().unwrap();
        assert_eq!((plain.host.as_str(), plain.port), ("192.0.2.1", 1080));
        assert!(plain.credentials.is_none());
        let v6 = parse("SOCKS5://[2001:db8::1]:1080/").unwrap().unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("2001:db8::1", 1080));
        let named = parse("socks5://localhost:9050").unwrap().unwrap();
        assert_eq!((named.host.as_str(), named.port), ("localhost", 9050));
        // %-escapes, and an '@' in the password left raw: the host follows the last one.
        let with = parse("socks5://al%69ce:p%40ss@w@rd@192.0.2.1:1080")
            .unwrap()
            .unwrap();
        assert_eq!(
            with.credentials,
            Some(Credentials::new(b"alice", b"p@ss@w@rd").unwrap())
        );
        let long = "a".repeat(256);
        let cases = [
            ("http://192.0.2.1:3128", "unsupported scheme 'http'"),
            ("192.0.2.1:1080", "not a URL"),
            ("socks5://192.0.2.1", "missing port"),
            ("socks5://192.0.2.1:", "port '' is not a number"),
            ("socks5://192.0.2.1:0", "port '0' is not a number"),
            ("socks5://192.0.2.1:65536", "port '65536'"),
            ("socks5://:1080", "missing host"),
            ("socks5://2001:db8::1:1080", "brackets"),
            ("socks5://[2001:db8::1:1080", "unclosed"),
            ("socks5://192.0.2.1:1080/path", "path"),
            ("socks5://secretuser@192.0.2.1:1080", "needs a password"),
            (
                "socks5://u:sec%zzret@192.0.2.1:1080",
                "bad %-escape in the password",
            ),
            ("socks5://:secret@192.0.2.1:1080", "user name is empty"),
            ("socks5://alice:secret", "the port is not a number"),
            (
                "socks5://u:sec%+1ret@192.0.2.1:1080",
                "bad %-escape in the password",
            ),
            ("socks5://u:@192.0.2.1:1080", "password is empty"),
            // A cut-off escape, one in the user name, a query, a fragment.
            (
                "socks5://u:secret%4@192.0.2.1:1080",
                "bad %-escape in the password",
            ),
            (
                "socks5://us%er:secret@192.0.2.1:1080",
                "bad %-escape in the user name",
            ),
            ("socks5://192.0.2.1:1080?secret", "query"),
            ("socks5://192.0.2.1:1080#secret", "fragment"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.starts_with("--upstream: "), "{err}");
            assert!(err.contains(expected), "{text}: {err}");
            assert!(!err.contains("secret"), "{text}: {err}");
            assert!(!err.contains('\n'));
        }
        let err = parse(&format!("socks5://{long}:p@192.0.2.1:1080")).unwrap_err();
        assert!(err.contains("user name is longer than 255 bytes"), "{err}");
        let err = parse(&format!("socks5://u:{long}@192.0.2.1:1080")).unwrap_err();
        assert!(err.contains("password is longer than 255 bytes"), "{err}");
        assert!(!err.contains(&long));
    }
}
