//! `uringproxy status` output: a parsed reply as text for people (human units, flows in
//! a table) or as one JSON object, flows sorted by bytes moved, optionally the top N.

use std::fmt::Write;

use super::wire::{FlowRow, Reply};

/// The flows to show: most bytes (both ways together) first, then by client address so
/// the order is stable; `top` keeps only the first so many.
pub fn sorted_flows(reply: &Reply, top: Option<usize>) -> Vec<&FlowRow> {
    let mut flows: Vec<&FlowRow> = reply.flows.iter().collect();
    flows.sort_by(|a, b| {
        let moved = |flow: &FlowRow| flow.bytes_up.saturating_add(flow.bytes_down);
        moved(b)
            .cmp(&moved(a))
            .then_with(|| (a.client, a.server).cmp(&(b.client, b.server)))
    });
    flows.truncate(top.unwrap_or(usize::MAX));
    flows
}

/// `1536` -> `1.5 KiB`; below 1 KiB in bytes.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `3725` -> `1h02m`: the two largest units.
pub fn human_duration(seconds: u64) -> String {
    let (days, hours, minutes) = (seconds / 86_400, seconds / 3600 % 24, seconds / 60 % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m{:02}s", seconds % 60),
        (0, _, _) => format!("{hours}h{minutes:02}m"),
        _ => format!("{days}d{hours:02}h"),
    }
}

/// The reply for people: the proxy, its counters grouped by what they count (zero
/// counters left out), then a table of the flows.
pub fn text(reply: &Reply, top: Option<usize>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "uringproxy on {} via {}, offload {}, up {}",
        reply.tun,
        reply.interface,
        reply.offload,
        human_duration(reply.uptime_s)
    );
    let _ = writeln!(out, "rules: {}", reply.rules.len());
    for rule in &reply.rules {
        let _ = writeln!(out, "  {rule}");
    }
    for (title, values) in [("counters", &reply.counters), ("now", &reply.gauges)] {
        let _ = writeln!(out, "{title}:");
        for (group, line) in grouped(values) {
            let _ = writeln!(out, "  {group:<9}{line}");
        }
    }
    let flows = sorted_flows(reply, top);
    let shown = if flows.len() < reply.flows.len() {
        format!(" (top {} of {})", flows.len(), reply.flows.len())
    } else {
        String::new()
    };
    let _ = writeln!(out, "flows: {}{shown}", reply.flows.len());
    if flows.is_empty() {
        return out;
    }
    let rows: Vec<[String; 8]> = flows
        .iter()
        .map(|flow| {
            [
                flow.proto.name().to_string(),
                flow.client.to_string(),
                match &flow.name {
                    Some(name) => format!("{} ({name})", flow.server),
                    None => flow.server.to_string(),
                },
                flow.state.name().to_string(),
                human_bytes(flow.bytes_up),
                human_bytes(flow.bytes_down),
                human_duration(flow.age_s),
                human_duration(flow.idle_s),
            ]
        })
        .collect();
    let header = [
        "PROTO", "CLIENT", "SERVER", "STATE", "UP", "DOWN", "AGE", "IDLE",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let header = header.map(str::to_string);
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (column, (cell, width)) in row.iter().zip(widths).enumerate() {
            // Text columns left-aligned, numbers right-aligned.
            let _ = if column < 4 {
                write!(line, "{cell:<width$}  ")
            } else {
                write!(line, "{cell:>width$}  ")
            };
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// Non-zero values by the group their key starts with (`tcp_bytes_up` is `tcp`'s
/// `bytes_up`), bytes in human units, as one line per group.
fn grouped(values: &[(String, u64)]) -> Vec<(&str, String)> {
    let mut groups: Vec<(&str, String)> = Vec::new();
    for (key, value) in values.iter().filter(|(_, value)| *value > 0) {
        let (group, name) = key.split_once('_').unwrap_or(("other", key));
        let value = if name.contains("bytes") {
            human_bytes(*value)
        } else {
            value.to_string()
        };
        let item = format!("{name} {value}");
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, line)) => {
                line.push_str(", ");
                line.push_str(&item);
            }
            None => groups.push((group, item)),
        }
    }
    groups
}

/// The reply as one JSON object: the proxy, `counters` and `gauges` objects of every
/// key, and `flows` (sorted, `top` applied) with the fields the README names.
pub fn json(reply: &Reply, top: Option<usize>) -> String {
    let mut out = String::from("{");
    for (key, value) in [
        ("tun", &reply.tun),
        ("interface", &reply.interface),
        ("offload", &reply.offload),
    ] {
        json_string(&mut out, key);
        out.push(':');
        json_string(&mut out, value);
        out.push(',');
    }
    let _ = write!(out, "\"uptime_s\":{},\"rules\":[", reply.uptime_s);
    for (i, rule) in reply.rules.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(&mut out, rule);
    }
    out.push(']');
    for (name, values) in [("counters", &reply.counters), ("gauges", &reply.gauges)] {
        let _ = write!(out, ",\"{name}\":{{");
        for (i, (key, value)) in values.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            json_string(&mut out, key);
            let _ = write!(out, ":{value}");
        }
        out.push('}');
    }
    out.push_str(",\"flows\":[");
    for (i, flow) in sorted_flows(reply, top).into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"proto\":\"{}\",\"client\":\"{}\",\"server\":\"{}\",\"state\":\"{}\",\
             \"bytes_up\":{},\"bytes_down\":{},\"age_s\":{},\"idle_s\":{}}}",
            flow.proto.name(),
            flow.client,
            flow.server,
            flow.state.name(),
            flow.bytes_up,
            flow.bytes_down,
            flow.age_s,
            flow.idle_s
        );
        if let Some(name) = &flow.name {
            // Before the object's closing brace.
            out.pop();
            out.push_str(",\"name\":");
            json_string(&mut out, name);
            out.push('}');
        }
    }
    out.push_str("]}\n");
    out
}

/// `text` as a JSON string literal (RFC 8259: quote, backslash and control characters
/// escaped).
pub fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::wire::tests::reply_text;
    use crate::control::wire::{Proto, State, parse};

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(185), "3m05s");
        assert_eq!(human_duration(3725), "1h02m");
        assert_eq!(human_duration(90_000), "1d01h");
        assert!(human_duration(u64::MAX).ends_with('h'), "no overflow");
    }

    #[test]
    fn flows_are_sorted_by_bytes_and_cut_to_the_top() {
        let reply = parse(&reply_text()).unwrap();
        let flows = sorted_flows(&reply, None);
        assert_eq!(flows[0].proto, Proto::Tcp, "1 MiB before 40 B");
        assert_eq!(sorted_flows(&reply, Some(1)).len(), 1);
        assert_eq!(sorted_flows(&reply, Some(0)).len(), 0);
    }

    #[test]
    fn text_shows_the_proxy_counters_and_a_flow_table() {
        let reply = parse(&reply_text()).unwrap();
        let text = text(&reply, None);
        assert!(text.starts_with("uringproxy on upx0 via eth0, offload tso, up 1m01s\n"));
        assert!(
            text.contains("  tcp      flows_opened 3, bytes_up 1000 B, bytes_down 2.0 KiB\n"),
            "{text}"
        );
        assert!(text.contains("flows: 2\n"), "{text}");
        assert!(
            text.contains("\nrules: 2\n  IPv4 30060: from all iif br-lan lookup main suppress_prefixlength 0\n  IPv4 30061: "),
            "{text}"
        );
        let table: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("PROTO"))
            .collect();
        assert_eq!(table.len(), 3, "{text}");
        assert!(
            table[1].starts_with("tcp    10.0.0.2:41000  10.0.0.1:443 (www.example.com)  open "),
            "{text}"
        );
        assert!(table[1].ends_with("5 B  1.0 MiB  12s    0s"), "{text}");
        assert!(table[2].contains("[fd00::2]:5353"), "{text}");
        let top = super::text(&reply, Some(1));
        assert!(top.contains("flows: 2 (top 1 of 2)"), "{top}");
    }

    #[test]
    fn json_is_one_object_with_escaped_strings() {
        let mut reply = parse(&reply_text()).unwrap();
        reply.tun = "a\"b\\c\n\u{1}".into();
        let json = json(&reply, Some(1));
        assert!(json.starts_with("{\"tun\":\"a\\\"b\\\\c\\n\\u0001\",\"interface\":\"eth0\""));
        assert!(json.contains(
            "\"flows\":[{\"proto\":\"tcp\",\"client\":\"10.0.0.2:41000\",\"server\":\"10.0.0.1:443\",\
             \"state\":\"open\",\"bytes_up\":5,\"bytes_down\":1048576,\"age_s\":12,\"idle_s\":0,\
             \"name\":\"www.example.com\"}]}"
        ), "{json}");
        assert!(
            json.contains("\"uptime_s\":61,\"rules\":[\"IPv4 30060: from all iif br-lan lookup main suppress_prefixlength 0\",\"IPv4 30061: from all iif br-lan lookup 30064\"],\"counters\""),
            "{json}"
        );
        assert!(
            json.contains("\"counters\":{\"tcp_flows_opened\":3,"),
            "{json}"
        );
        assert_eq!(json.matches('{').count(), json.matches('}').count());
        reply.flows[0].state = State::Connecting;
        reply.flows[0].client = "[fd00::9]:7".parse().unwrap();
        assert!(super::json(&reply, None).contains("\"client\":\"[fd00::9]:7\""));
    }
}
