//! The numbers as lines of text for people, one per line of the table in `counters`:
//! what SIGUSR1 and the exit print, and the debug log every 10 s.
//!
//! ```text
//! proxy: uringproxy0 via eth0, offload tso, up 1m05s
//! flow states: connecting 0 open 2 closing 0 udp 1 icmp 0
//! ...
//! drops: malformed 0 bad-vnet-header 0 fragments 0 ...
//! ```

use std::fmt::{self, Write};

use super::counters::{Entry, Info, Line, Snapshot, TABLE};
use super::render::human_duration;

pub fn write(out: &mut impl Write, info: &Info, snapshot: &Snapshot) -> fmt::Result {
    writeln!(
        out,
        "proxy: {} via {}, offload {}, up {}",
        info.tun,
        info.interface,
        info.offload,
        human_duration(info.uptime_s)
    )?;
    write_lines(out, |entry| entry.value(snapshot))
}

/// Each line: its name, then `label value` for each of its entries, in table order.
fn write_lines(out: &mut impl Write, value: impl Fn(&Entry) -> Option<u64>) -> fmt::Result {
    for &line in Line::ALL {
        out.write_str(line.name())?;
        out.write_char(':')?;
        for entry in TABLE.iter().filter(|entry| entry.line == line) {
            if let Some(value) = value(entry) {
                write!(out, " {} {value}", entry.label)?;
            }
        }
        out.write_char('\n')?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::counters::tests::snapshot_with;
    use crate::control::wire::tests::info;

    /// A value per entry that no other entry has: 1000 plus its place in the table.
    fn distinct(entry: &Entry) -> Option<u64> {
        let index = TABLE.iter().position(|e| std::ptr::eq(e, entry)).unwrap();
        Some(1000 + index as u64)
    }

    #[test]
    fn every_entry_is_printed_once_on_its_line_and_nothing_else_is() {
        let mut text = String::new();
        write_lines(&mut text, distinct).unwrap();
        let lines: Vec<String> = text.lines().map(|line| format!("{line} ")).collect();
        assert_eq!(lines.len(), Line::ALL.len(), "{text}");
        for (entry, value) in TABLE.iter().map(|entry| (entry, distinct(entry).unwrap())) {
            let pair = format!(" {} {value} ", entry.label);
            let on: Vec<&String> = lines.iter().filter(|l| l.contains(&pair)).collect();
            assert_eq!(on.len(), 1, "{} on {} lines:\n{text}", entry.key, on.len());
            assert_eq!(on[0].matches(&pair).count(), 1, "{}", entry.key);
            let name = format!("{}: ", entry.line.name());
            assert!(
                on[0].starts_with(&name),
                "{} not on {name}\n{text}",
                entry.key
            );
        }
        // Labels have no digits, so every number printed is some entry's value.
        let numbers = text
            .split_whitespace()
            .filter(|word| word.parse::<u64>().is_ok())
            .count();
        assert_eq!(numbers, TABLE.len(), "{text}");
        // The test harness waits for this line to know that a report is complete.
        assert_eq!(text.matches("drops:").count(), 1, "{text}");
        assert!(lines.last().unwrap().starts_with("drops: "), "{text}");
    }

    #[test]
    fn labels_on_a_line_cannot_be_taken_for_one_another() {
        for a in TABLE {
            for b in TABLE
                .iter()
                .filter(|b| b.line == a.line && !std::ptr::eq(*b, a))
            {
                assert!(
                    !format!(" {} ", b.label).contains(&format!(" {} ", a.label)),
                    "{:?} line: label {:?} within {:?}",
                    a.line,
                    a.label,
                    b.label
                );
            }
        }
    }

    #[test]
    fn the_report_starts_with_the_proxy_and_reads_the_snapshot() {
        let mut text = String::new();
        snapshot_with(|snapshot| write(&mut text, &info(), snapshot)).unwrap();
        assert!(
            text.starts_with("proxy: upx0 via eth0, offload tso, up 1m01s\nflow states: "),
            "{text}"
        );
        assert!(
            text.contains("\nrelayed: bytes-up 1000 bytes-down 2000\n"),
            "{text}"
        );
        assert!(text.contains("\nudp: flows opened 3 "), "{text}");
        assert!(text.contains("\nicmp: flows opened 2 "), "{text}");
        assert!(text.contains(" resident-bytes 4096\n"), "{text}");
    }
}
