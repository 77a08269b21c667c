//! The Prometheus text exposition format (version 0.0.4) of every sample: each family
//! with its `# HELP` and `# TYPE` lines, names prefixed `uringproxy_`, plus an info
//! metric naming the TUN, the interface and the offload, and the uptime.

use std::fmt::{self, Write};

use super::counters::{self, Info, Kind, Snapshot};

const PREFIX: &str = "uringproxy_";

pub fn write(out: &mut impl Write, info: &Info, snapshot: &Snapshot) -> fmt::Result {
    writeln!(
        out,
        "# HELP {PREFIX}info The proxy: its version, TUN, outbound interface and TUN offload.\n\
         # TYPE {PREFIX}info gauge"
    )?;
    write!(out, "{PREFIX}info{{version=")?;
    label_value(out, env!("CARGO_PKG_VERSION"))?;
    for (name, value) in [
        ("tun", info.tun),
        ("interface", info.interface),
        ("offload", info.offload),
    ] {
        write!(out, ",{name}=")?;
        label_value(out, value)?;
    }
    writeln!(out, "}} 1")?;
    writeln!(
        out,
        "# HELP {PREFIX}uptime_seconds Seconds since the proxy started.\n\
         # TYPE {PREFIX}uptime_seconds gauge\n\
         {PREFIX}uptime_seconds {}",
        info.uptime_s
    )?;
    let mut family = "";
    for (entry, value) in counters::samples(snapshot) {
        let name = entry.family.name;
        if name != family {
            family = name;
            let kind = match entry.family.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            writeln!(out, "# HELP {PREFIX}{name} {}", entry.family.help)?;
            writeln!(out, "# TYPE {PREFIX}{name} {kind}")?;
        }
        write!(out, "{PREFIX}{name}")?;
        for (i, (label, value)) in entry.labels.iter().enumerate() {
            out.write_char(if i == 0 { '{' } else { ',' })?;
            write!(out, "{label}=")?;
            label_value(out, value)?;
        }
        if !entry.labels.is_empty() {
            out.write_char('}')?;
        }
        writeln!(out, " {value}")?;
    }
    Ok(())
}

/// A quoted label value: backslash, double quote and newline escaped.
fn label_value(out: &mut impl Write, value: &str) -> fmt::Result {
    out.write_char('"')?;
    for c in value.chars() {
        match c {
            '\\' => out.write_str("\\\\")?,
            '"' => out.write_str("\\\"")?,
            '\n' => out.write_str("\\n")?,
            c => out.write_char(c)?,
        }
    }
    out.write_char('"')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::counters::tests::snapshot_with;
    use crate::control::out::Out;
    use crate::control::wire::tests::info;

    fn exposition() -> String {
        let mut text = String::new();
        snapshot_with(|snapshot| write(&mut text, &info(), snapshot)).unwrap();
        text
    }

    #[test]
    fn families_have_help_and_type_and_samples_their_labels() {
        let text = exposition();
        assert!(
            text.contains(
                "# TYPE uringproxy_bytes_total counter\n\
             uringproxy_bytes_total{protocol=\"tcp\",direction=\"up\"} 1000\n\
             uringproxy_bytes_total{protocol=\"tcp\",direction=\"down\"} 2000\n"
            ),
            "{text}"
        );
        assert!(text.contains("uringproxy_open_flows{protocol=\"tcp\",state=\"open\"} 2\n"));
        assert!(text.contains("uringproxy_tun_write_errors_total 0\n"));
        assert!(text.contains("uringproxy_resident_memory_bytes 4096\n"));
        assert!(text.contains("uringproxy_info{version=\""), "{text}");
        // Every sample line belongs to the family announced just before it.
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_string();
                assert!(family.starts_with("uringproxy_"));
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, family, "{line}");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<u64>().is_ok(), "{line}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut text = String::new();
        label_value(&mut text, "a\"b\\c\nd").unwrap();
        assert_eq!(text, r#""a\"b\\c\nd""#);
    }

    #[test]
    fn the_exposition_fits_the_reply_buffer_with_room_to_spare() {
        let len = exposition().len();
        let mut buf = vec![0u8; 2 * len];
        let fits = snapshot_with(|snapshot| {
            Out::new(&mut buf).record(|out| write(out, &info(), snapshot))
        });
        assert!(fits);
        assert!(
            len * 2 < crate::control::REPLY_BUFFER,
            "{len} bytes: the metrics reply buffer needs to grow"
        );
    }
}
