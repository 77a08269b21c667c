//! The `status` reply on the control socket: lines of space-separated fields, written
//! by the proxy a few records at a time (a header, then flows in slices, then `end`) and
//! parsed by `uringproxy status`, which sorts and renders them.
//!
//! ```text
//! uringproxy-status 1
//! tun uringproxy0
//! interface eth0
//! offload tso
//! uptime_s 3600
//! rule IPv4 30061: from all iif br-lan lookup 30064
//! counter tcp_bytes_up 123456
//! gauge tcp_flows_open 1
//! flow tcp 10.0.0.2:41000 93.184.215.14:443 open 5120 104857 12 0
//! end 1
//! ```
//!
//! A rule line is one policy rule the proxy installed, as `ip rule` shows it. A flow line is: protocol, client, server (IPv6 as `[addr]:port`), state, bytes up,
//! bytes down, age and idle seconds. Records of unknown kinds are skipped, so later
//! versions may add some; `error WHY` instead of the header is a refusal.

use std::fmt::{self, Write};
use std::net::SocketAddr;

use super::counters::{self, Info, Kind, Snapshot};

/// The first line of a reply: the format and its version.
pub const MAGIC: &str = "uringproxy-status 1";

/// What a flow relays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP echo (ping); the client's port is the echo identifier.
    Icmp,
}

/// Where a flow is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// TCP: the outbound connect is in flight.
    Connecting,
    Open,
    /// Ending: waiting for what is in flight before its socket closes.
    Closing,
}

macro_rules! names {
    ($type:ident { $($variant:ident = $name:literal),* }) => {
        impl $type {
            pub fn name(self) -> &'static str {
                match self {
                    $($type::$variant => $name,)*
                }
            }

            fn parse(text: &str) -> Option<$type> {
                match text {
                    $($name => Some($type::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

names!(Proto { Tcp = "tcp", Udp = "udp", Icmp = "icmp" });
names!(State { Connecting = "connecting", Open = "open", Closing = "closing" });

/// One live flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRow {
    pub proto: Proto,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub state: State,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub age_s: u64,
    /// Seconds since bytes last moved either way.
    pub idle_s: u64,
    /// The name a flow to a fake address (`--dns fake`) connected to.
    pub name: Option<String>,
}

/// Writes the header: identity and every counter and gauge.
pub fn write_header(out: &mut impl Write, info: &Info, snapshot: &Snapshot) -> fmt::Result {
    writeln!(out, "{MAGIC}")?;
    writeln!(out, "tun {}", info.tun)?;
    writeln!(out, "interface {}", info.interface)?;
    writeln!(out, "offload {}", info.offload)?;
    writeln!(out, "uptime_s {}", info.uptime_s)?;
    for rule in info.rules {
        writeln!(out, "rule {rule}")?;
    }
    for (entry, value) in counters::samples(snapshot) {
        let kind = match entry.family.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        writeln!(out, "{kind} {} {value}", entry.key)?;
    }
    Ok(())
}

pub fn write_flow(out: &mut impl Write, flow: &FlowRow) -> fmt::Result {
    write!(
        out,
        "flow {} {} {} {} {} {} {} {}",
        flow.proto.name(),
        flow.client,
        flow.server,
        flow.state.name(),
        flow.bytes_up,
        flow.bytes_down,
        flow.age_s,
        flow.idle_s
    )?;
    // Names come from DNS queries: one that would break the line is left out.
    match flow.name.as_deref().and_then(host_name) {
        Some(name) => writeln!(out, " {name}"),
        None => writeln!(out),
    }
}

/// A host name as a flow line carries it: printable ASCII, at most 255 bytes.
fn host_name(text: &str) -> Option<&str> {
    (!text.is_empty() && text.len() <= 255 && text.bytes().all(|b| b.is_ascii_graphic()))
        .then_some(text)
}

/// The last line: how many flows the reply listed.
pub fn write_end(out: &mut impl Write, flows: u64) -> fmt::Result {
    writeln!(out, "end {flows}")
}

/// A refusal, instead of a reply.
pub fn write_error(out: &mut impl Write, why: &str) -> fmt::Result {
    writeln!(out, "error {why}")
}

/// A parsed reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub tun: String,
    pub interface: String,
    pub offload: String,
    pub uptime_s: u64,
    /// The policy rules the proxy installed.
    pub rules: Vec<String>,
    pub counters: Vec<(String, u64)>,
    pub gauges: Vec<(String, u64)>,
    pub flows: Vec<FlowRow>,
}

/// Why a reply could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The proxy refused (its `error` line).
    Refused(String),
    /// Not a status reply at all (another kind of socket, another version).
    NotStatus,
    /// Line `line` (from 1) is not what it should be.
    Malformed { line: usize, why: &'static str },
    /// The reply ended before its `end` line (the proxy closed it: its deadline, or exit).
    Truncated,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Refused(why) => write!(f, "the proxy refused: {why}"),
            Error::NotStatus => write!(f, "not a uringproxy status reply"),
            Error::Malformed { line, why } => write!(f, "malformed reply, line {line}: {why}"),
            Error::Truncated => write!(f, "the reply ended early (incomplete)"),
        }
    }
}

/// Parses a whole reply.
pub fn parse(text: &str) -> Result<Reply, Error> {
    let mut lines = text.split('\n').enumerate();
    match lines.next() {
        Some((_, MAGIC)) => {}
        Some((_, first)) => {
            return Err(match first.strip_prefix("error ") {
                Some(why) => {
                    Error::Refused(why.chars().filter(|c| !c.is_control()).take(200).collect())
                }
                None => Error::NotStatus,
            });
        }
        None => return Err(Error::NotStatus),
    }
    let mut reply = Reply::default();
    for (index, line) in lines {
        let malformed = |why| Error::Malformed {
            line: index + 1,
            why,
        };
        let mut fields = line.split(' ');
        let kind = fields.next().unwrap_or_default();
        let rest: Vec<&str> = fields.collect();
        let number = |text: &str| text.parse::<u64>().map_err(|_| malformed("not a number"));
        match (kind, &rest[..]) {
            ("tun", [name]) => reply.tun = name_field(name).ok_or(malformed("bad name"))?,
            ("interface", [name]) => {
                reply.interface = name_field(name).ok_or(malformed("bad name"))?;
            }
            ("offload", [name]) => {
                reply.offload = name_field(name).ok_or(malformed("bad name"))?;
            }
            ("uptime_s", [seconds]) => reply.uptime_s = number(seconds)?,
            ("counter" | "gauge", [key, value]) => {
                let key = name_field(key).ok_or(malformed("bad name"))?;
                let list = if kind == "counter" {
                    &mut reply.counters
                } else {
                    &mut reply.gauges
                };
                list.push((key, number(value)?));
            }
            ("rule", fields) => reply.rules.push(rule(fields).ok_or(malformed("bad rule"))?),
            ("flow", fields) => reply.flows.push(flow(fields).ok_or(malformed("bad flow"))?),
            ("end", [count]) => {
                if number(count)? != reply.flows.len() as u64 {
                    return Err(malformed("flow count does not match"));
                }
                return Ok(reply);
            }
            ("tun" | "interface" | "offload" | "uptime_s" | "counter" | "gauge" | "end", _) => {
                return Err(malformed("wrong number of fields"));
            }
            _ => {}
        }
    }
    Err(Error::Truncated)
}

/// A name as the proxy writes them (interfaces, keys): printable ASCII, at most 64 bytes.
fn name_field(text: &str) -> Option<String> {
    (!text.is_empty() && text.len() <= 64 && text.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| text.to_string())
}

/// A rule's words (interface names, addresses, numbers): printable ASCII, at most 200
/// bytes in all, so a hostile reply cannot write escape sequences to a terminal.
fn rule(fields: &[&str]) -> Option<String> {
    let text = fields.join(" ");
    (!fields.is_empty() && text.len() <= 200 && fields.iter().all(|f| name_field(f).is_some()))
        .then_some(text)
}

fn flow(fields: &[&str]) -> Option<FlowRow> {
    let (fields, name) = match fields {
        [fields @ .., name] if fields.len() == 8 => (fields, Some(host_name(name)?.to_string())),
        _ => (fields, None),
    };
    let [proto, client, server, state, up, down, age, idle] = fields else {
        return None;
    };
    Some(FlowRow {
        proto: Proto::parse(proto)?,
        client: client.parse().ok()?,
        server: server.parse().ok()?,
        state: State::parse(state)?,
        bytes_up: up.parse().ok()?,
        bytes_down: down.parse().ok()?,
        age_s: age.parse().ok()?,
        idle_s: idle.parse().ok()?,
        name,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::control::counters::tests::snapshot_with;

    pub fn info() -> Info<'static> {
        Info {
            tun: "upx0",
            interface: "eth0",
            offload: "tso",
            uptime_s: 61,
            // Leaked: test data that lives as long as the test binary.
            rules: Box::leak(Box::new([
                "IPv4 30060: from all iif br-lan lookup main suppress_prefixlength 0".to_string(),
                "IPv4 30061: from all iif br-lan lookup 30064".to_string(),
            ])),
        }
    }

    pub fn rows() -> Vec<FlowRow> {
        vec![
            FlowRow {
                proto: Proto::Tcp,
                client: "10.0.0.2:41000".parse().unwrap(),
                server: "10.0.0.1:443".parse().unwrap(),
                state: State::Open,
                bytes_up: 5,
                bytes_down: 1 << 20,
                age_s: 12,
                idle_s: 0,
                name: Some("www.example.com".into()),
            },
            FlowRow {
                proto: Proto::Udp,
                client: "[fd00::2]:5353".parse().unwrap(),
                server: "[fd00::1]:53".parse().unwrap(),
                state: State::Closing,
                bytes_up: 40,
                bytes_down: 0,
                age_s: 1,
                idle_s: 1,
                name: None,
            },
        ]
    }

    pub fn reply_text() -> String {
        let mut text = String::new();
        snapshot_with(|snapshot| write_header(&mut text, &info(), snapshot)).unwrap();
        for row in rows() {
            write_flow(&mut text, &row).unwrap();
        }
        write_end(&mut text, 2).unwrap();
        text
    }

    #[test]
    fn a_reply_round_trips() {
        let text = reply_text();
        assert!(
            text.contains("flow udp [fd00::2]:5353 [fd00::1]:53 closing 40 0 1 1\n"),
            "{text}"
        );
        let reply = parse(&text).unwrap();
        assert_eq!(
            (reply.tun.as_str(), reply.interface.as_str()),
            ("upx0", "eth0")
        );
        assert_eq!((reply.offload.as_str(), reply.uptime_s), ("tso", 61));
        assert_eq!(reply.flows, rows());
        assert_eq!(reply.rules, info().rules);
        assert!(reply.counters.contains(&("tcp_bytes_up".into(), 1000)));
        assert!(reply.gauges.contains(&("tcp_flows_open".into(), 2)));
    }

    #[test]
    fn unknown_records_are_skipped() {
        let text = reply_text().replace("end 2", "future thing 1 2 3\nend 2");
        assert_eq!(parse(&text).unwrap().flows.len(), 2);
    }

    #[test]
    fn hostile_and_truncated_replies_are_errors_not_panics() {
        let text = reply_text();
        // Every prefix: an error (truncated, or a line cut short), never a panic.
        for cut in 0..text.len() - 1 {
            let prefix = &text[..cut];
            assert!(parse(prefix).is_err(), "prefix of {cut} bytes parsed");
        }
        assert_eq!(parse(""), Err(Error::NotStatus));
        assert_eq!(parse("HTTP/1.1 200 OK\r\n"), Err(Error::NotStatus));
        assert_eq!(
            parse("error too many clients\n"),
            Err(Error::Refused("too many clients".into()))
        );
        for (bad, why) in [
            ("end 3", "flow count does not match"),
            ("end x", "not a number"),
            ("end", "wrong number of fields"),
            ("flow tcp 10.0.0.1:1 10.0.0.2:2 open 1 2 3", "bad flow"),
            ("flow tcp 10.0.0.1 10.0.0.2:2 open 1 2 3 4", "bad flow"),
            ("flow tcp [::1]:1 ::1:2 open 1 2 3 4", "bad flow"),
            ("flow sctp 10.0.0.1:1 10.0.0.2:2 open 1 2 3 4", "bad flow"),
            ("flow tcp 10.0.0.1:1 10.0.0.2:2 dancing 1 2 3 4", "bad flow"),
            ("flow tcp 10.0.0.1:1 10.0.0.2:2 open -1 2 3 4", "bad flow"),
            (
                "flow tcp 10.0.0.1:1 10.0.0.2:2 open 99999999999999999999 2 3 4",
                "bad flow",
            ),
            ("counter a\u{1b}[31m 1", "bad name"),
            ("counter a 1 2", "wrong number of fields"),
            ("tun ", "bad name"),
            ("rule", "bad rule"),
            ("rule 30061: from all iif \u{1b}[2J", "bad rule"),
        ] {
            let text = format!("{MAGIC}\n{bad}\nend 0\n");
            match parse(&text) {
                Err(Error::Malformed { line: 2, why: got }) => assert_eq!(got, why, "{bad}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
