//! Results: medians per scenario and path, the Markdown table, JSON and SVG charts.

use std::fmt::Write;
use std::time::Duration;

use crate::load::{
    DNS_CACHED_NAMES, DNS_RESOLVER, DNS_WINDOW, Drops, Sample, UDP_ECHO_FLOWS, UDP_ECHO_SIZE,
};
use crate::{Measured, Resources, Run, Scenario, Variant};

pub struct Context {
    pub machine: String,
    pub unix_time: u64,
    pub command: String,
    pub seconds: f64,
    pub rounds: usize,
    pub udp_rate: u64,
    /// udp-up and udp-down: datagrams/s offered, and bytes each takes on the wire.
    pub flood_rate: u64,
    pub flood_wire_bytes: u64,
    /// udp-up and udp-down: payload of each datagram, and datagrams per send (1
    /// without `--udp-gso`).
    pub flood_size: usize,
    pub flood_batch: usize,
    /// Bits/s the flood's load is a share of: `--rate`, or 1 Gbit/s.
    pub line_rate: u64,
    /// `--rate` as given, and the qdisc put on both veth ends.
    pub shaping: Option<(String, String)>,
    pub family: &'static str,
    pub smoke: bool,
}

/// Medians over the rounds of one scenario on one path.
#[derive(Default)]
pub struct Cell {
    pub value: Option<f64>,
    /// `value` over the direct path's.
    pub ratio: Option<f64>,
    /// p50, p99, p99.9 in microseconds (rr, crr).
    pub latency_us: Option<[f64; 3]>,
    /// Proxy CPU time over wall time, in % of one core.
    pub cpu_pct: Option<f64>,
    pub cpu_s_per_gb: Option<f64>,
    /// Proxy CPU time per transaction, connection or datagram, microseconds.
    pub cpu_us_per_op: Option<f64>,
    /// Highest of the runs' peaks.
    pub peak_rss_kib: Option<u64>,
    /// Share of offered datagrams echoed back (udp-echo).
    pub answered_pct: Option<f64>,
    /// Share of sent datagrams that did not arrive (udp-up, udp-down).
    pub loss_pct: Option<f64>,
    /// Datagrams sent, % of those due at the target rate (udp-up, udp-down).
    pub sent_pct: Option<f64>,
    /// Share of answers that were SERVFAIL: no table entry free for a new name (dns).
    pub servfail_pct: Option<f64>,
    /// Median latency added to the direct path's, microseconds (rr, crr).
    pub p50_added_us: Option<f64>,
    /// Kernel drops by place, summed over the rounds (udp-up, udp-down).
    pub drops: Option<Drops>,
    /// Per MB of payload (bulk scenarios through a proxy or peer): wake-ups, packets
    /// written to the device (TUN or tap), their mean size in bytes, packets read from
    /// it (on downloads mostly the clients' ACKs).
    pub per_mb: Option<PerMb>,
    /// Failed operations summed over the runs, and messages of runs that failed.
    pub errors: u64,
    pub failures: Vec<String>,
}

#[derive(Clone, Copy, Default)]
pub struct PerMb {
    pub wakeups: f64,
    pub writes: f64,
    pub mean_write: f64,
    pub reads: f64,
}

fn per_mb(scenario: Scenario, m: &Measured) -> Option<PerMb> {
    let mb = m.sample.bytes as f64 / 1e6;
    let activity = m.activity.filter(|_| scenario.is_bulk() && mb > 0.0)?;
    let device = activity.device.unwrap_or_default();
    Some(PerMb {
        wakeups: activity.wakeups as f64 / mb,
        writes: device.rx_packets as f64 / mb,
        mean_write: device.rx_bytes as f64 / (device.rx_packets.max(1)) as f64,
        reads: device.tx_packets as f64 / mb,
    })
}

pub struct Summary {
    pub scenarios: Vec<Scenario>,
    /// Indexed [scenario][variant].
    pub cells: Vec<Vec<Cell>>,
}

pub fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// p50, p99 and p99.9 of latencies in nanoseconds, as microseconds.
fn percentiles(latencies: &[u32]) -> Option<[f64; 3]> {
    if latencies.is_empty() {
        return None;
    }
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| {
        let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
        f64::from(sorted[index]) / 1e3
    };
    Some([at(0.5), at(0.99), at(0.999)])
}

fn cpu_pct(m: &Measured) -> Option<f64> {
    let (seconds, window) = m.cpu?;
    Some(seconds / window.as_secs_f64().max(1e-9) * 100.0)
}

/// Only for bulk scenarios: for a few bytes per transaction the figure says nothing.
fn cpu_s_per_gb(scenario: Scenario, m: &Measured) -> Option<f64> {
    let gb = m.sample.bytes as f64 / 1e9;
    (scenario.is_bulk() && gb > 0.0).then_some(m.cpu?.0 / gb)
}

fn cpu_us_per_op(scenario: Scenario, m: &Measured) -> Option<f64> {
    if scenario.is_bulk() || m.sample.units == 0 {
        return None;
    }
    Some(m.cpu?.0 / m.sample.units as f64 * 1e6)
}

fn answered_pct(scenario: Scenario, sample: &Sample) -> Option<f64> {
    (scenario == Scenario::UdpEcho && sample.offered > 0)
        .then(|| sample.units as f64 / sample.offered as f64 * 100.0)
}

fn servfail_pct(scenario: Scenario, sample: &Sample) -> Option<f64> {
    (scenario.is_dns() && sample.units > 0)
        .then(|| sample.servfail as f64 / sample.units as f64 * 100.0)
}

fn loss_pct(scenario: Scenario, sample: &Sample) -> Option<f64> {
    (scenario.is_flood() && sample.offered > 0)
        .then(|| sample.offered.saturating_sub(sample.units) as f64 / sample.offered as f64 * 100.0)
}

fn sent_pct(scenario: Scenario, sample: &Sample) -> Option<f64> {
    (scenario.is_flood() && sample.due > 0)
        .then(|| sample.offered as f64 / sample.due as f64 * 100.0)
}

/// A sender that fell this far short of its target rate is said to have.
const SENDER_SHORT_PCT: f64 = 99.0;

/// "X% lost", whether the sender reached its target, and where the kernel dropped
/// datagrams: the figures of a flood.
fn flood_text(loss: Option<f64>, sent: Option<f64>, drops: Option<&Drops>) -> String {
    let mut text = loss.map_or_else(String::new, |l| format!("{l:.1}% lost"));
    if let Some(sent) = sent.filter(|&s| s < SENDER_SHORT_PCT) {
        let _ = write!(text, ", sender reached only {sent:.0}% of the target");
    }
    if let Some(drops) = drops {
        let mut places = Vec::new();
        if drops.receiver > 0 {
            places.push(format!("receiver {}", drops.receiver));
        }
        if let Some(n) = drops.proxy_sockets.filter(|&n| n > 0) {
            places.push(format!("proxy's socket {n}"));
        }
        if let Some(n) = drops.tun_queue.filter(|&n| n > 0) {
            places.push(format!("TUN queue {n}"));
        }
        if !places.is_empty() {
            let _ = write!(text, "; dropped at {}", places.join(", "));
        }
    }
    text
}

pub fn summarize(scenarios: &[Scenario], variants: &[Variant], runs: &[Run]) -> Summary {
    let cells = scenarios
        .iter()
        .map(|&scenario| {
            let mut row: Vec<Cell> = (0..variants.len())
                .map(|v| {
                    let of_cell = || {
                        runs.iter()
                            .filter(move |r| r.scenario == scenario && r.variant == v)
                    };
                    let measured: Vec<&Measured> =
                        of_cell().filter_map(|r| r.outcome.as_ref().ok()).collect();
                    let med = |f: &dyn Fn(&Measured) -> Option<f64>| {
                        median(&mut measured.iter().filter_map(|m| f(m)).collect::<Vec<_>>())
                    };
                    let latencies: Vec<[f64; 3]> = measured
                        .iter()
                        .filter_map(|m| percentiles(&m.sample.latencies))
                        .collect();
                    let latency_us = (!latencies.is_empty()).then(|| {
                        [0, 1, 2].map(|i| {
                            median(&mut latencies.iter().map(|l| l[i]).collect::<Vec<_>>())
                                .unwrap_or(0.0)
                        })
                    });
                    Cell {
                        value: med(&|m| Some(scenario.value(&m.sample))),
                        ratio: None,
                        latency_us,
                        cpu_pct: med(&cpu_pct),
                        cpu_s_per_gb: med(&|m| cpu_s_per_gb(scenario, m)),
                        cpu_us_per_op: med(&|m| cpu_us_per_op(scenario, m)),
                        peak_rss_kib: measured.iter().filter_map(|m| m.peak_rss_kib).max(),
                        answered_pct: med(&|m| answered_pct(scenario, &m.sample)),
                        loss_pct: med(&|m| loss_pct(scenario, &m.sample)),
                        sent_pct: med(&|m| sent_pct(scenario, &m.sample)),
                        servfail_pct: med(&|m| servfail_pct(scenario, &m.sample)),
                        p50_added_us: None,
                        drops: measured.iter().filter_map(|m| m.sample.drops).reduce(
                            |mut sum, d| {
                                sum.add(&d);
                                sum
                            },
                        ),
                        per_mb: {
                            let figures: Vec<PerMb> = measured
                                .iter()
                                .filter_map(|m| per_mb(scenario, m))
                                .collect();
                            let med = |f: fn(&PerMb) -> f64| {
                                median(&mut figures.iter().map(f).collect::<Vec<_>>())
                            };
                            (!figures.is_empty()).then(|| PerMb {
                                wakeups: med(|p| p.wakeups).unwrap_or(0.0),
                                writes: med(|p| p.writes).unwrap_or(0.0),
                                mean_write: med(|p| p.mean_write).unwrap_or(0.0),
                                reads: med(|p| p.reads).unwrap_or(0.0),
                            })
                        },
                        errors: measured.iter().map(|m| m.sample.errors).sum(),
                        failures: of_cell()
                            .filter_map(|r| r.outcome.as_ref().err().cloned())
                            .collect(),
                    }
                })
                .collect();
            let direct = row
                .iter()
                .zip(variants)
                .find(|(_, v)| v.command.is_none())
                .map(|(cell, _)| (cell.value, cell.latency_us.map(|l| l[0])));
            let (direct_value, direct_p50) = direct.unwrap_or_default();
            for cell in &mut row {
                cell.ratio = cell.value.zip(direct_value).map(|(v, d)| v / d);
                cell.p50_added_us = cell
                    .latency_us
                    .zip(direct_p50)
                    .map(|(l, direct)| l[0] - direct);
            }
            row
        })
        .collect();
    Summary {
        scenarios: scenarios.to_vec(),
        cells,
    }
}

/// One line of progress about a finished run.
pub fn describe(scenario: Scenario, outcome: &Result<Measured, String>) -> String {
    match outcome {
        Err(e) => format!("failed: {e}"),
        Ok(m) => {
            let size = m.sample.bytes.checked_div(m.sample.units).unwrap_or(0);
            let mut text = format_value(scenario, scenario.value(&m.sample), size as usize);
            if let Some(pct) = answered_pct(scenario, &m.sample) {
                let _ = write!(text, " ({pct:.1}% answered)");
            }
            if let Some(pct) = servfail_pct(scenario, &m.sample) {
                let _ = write!(text, " ({pct:.1}% SERVFAIL)");
            }
            if scenario.is_flood() {
                let figures = flood_text(
                    loss_pct(scenario, &m.sample),
                    sent_pct(scenario, &m.sample),
                    m.sample.drops.as_ref(),
                );
                let _ = write!(text, " ({figures})");
            }
            if let Some(cpu) = cpu_pct(m) {
                let _ = write!(text, ", proxy CPU {cpu:.0}%");
            }
            if m.sample.errors > 0 {
                let _ = write!(text, ", {} errors", m.sample.errors);
            }
            text
        }
    }
}

/// `flood_size`: payload bytes of each udp-up/udp-down datagram.
fn format_value(scenario: Scenario, value: f64, flood_size: usize) -> String {
    if scenario.is_bulk() {
        format!("{value:.2} Gbit/s")
    } else if scenario.is_flood() {
        let gbit = value * flood_size as f64 * 8.0 / 1e9;
        format!(
            "{} {} ({gbit:.2} Gbit/s)",
            thousands(value),
            scenario.unit()
        )
    } else {
        format!("{} {}", thousands(value), scenario.unit())
    }
}

fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn date(unix_time: u64) -> String {
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let days = (unix_time / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

pub fn markdown(
    context: &Context,
    variants: &[Variant],
    summary: &Summary,
    resources: &[(usize, Resources)],
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## uringproxy end-to-end benchmark\n");
    if context.smoke {
        let _ = writeln!(md, "**Smoke run: the numbers below mean nothing.**\n");
    }
    let _ = writeln!(
        md,
        "{}; {}; {}; {:.1} s per run, median of {} round(s); udp-echo offers {} datagrams/s \
         of {} bytes over {} flows. `{}`\n",
        date(context.unix_time),
        context.machine,
        context.family,
        context.seconds,
        context.rounds,
        thousands(context.udp_rate as f64),
        UDP_ECHO_SIZE,
        UDP_ECHO_FLOWS,
        context.command
    );
    let line_rate = match &context.shaping {
        Some((rate, tbf)) => {
            let _ = writeln!(
                md,
                "Line rate {rate}: `{tbf}` on both veth ends, for every path (the resource \
                 figures run unshaped).\n"
            );
            rate.as_str()
        }
        None => "1 Gbit/s, unshaped",
    };
    let _ = writeln!(
        md,
        "udp-up and udp-down send {} datagrams/s of {} bytes ({} bytes on the wire, \
         {:.0}% of {line_rate}) on one flow, {}; lost = sent but not received intact.\n",
        thousands(context.flood_rate as f64),
        context.flood_size,
        context.flood_wire_bytes,
        (context.flood_rate * context.flood_wire_bytes * 8) as f64 / context.line_rate as f64
            * 100.0,
        if context.flood_batch > 1 {
            format!(
                "{} per send with UDP_SEGMENT (`--udp-gso`)",
                context.flood_batch
            )
        } else {
            "one per send".to_string()
        },
    );
    let _ = writeln!(
        md,
        "dns-fake and dns-fake-cached ask the fake-IP resolver ({DNS_RESOLVER}:53) for A \
         records from one UDP socket, {DNS_WINDOW} queries outstanding: all names distinct \
         (the table fills; an entry goes to a new name only after 2 s unused, SERVFAIL until \
         then), or {DNS_CACHED_NAMES} names over and over. The direct path has no resolver: \
         absolute figures, no ratio.\n",
    );
    for variant in variants {
        if let Some(command) = &variant.command {
            let _ = writeln!(md, "- {}: `{command}`", variant.label);
        }
    }
    let _ = writeln!(
        md,
        "\n| scenario | path | result | vs direct | latency p50 / p99 / p99.9 (µs) | \
         proxy CPU (% of a core) | proxy CPU-s per GB | proxy CPU µs per op | \
         proxy peak RSS (highest run) |"
    );
    let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for (scenario, row) in summary.scenarios.iter().zip(&summary.cells) {
        for (variant, cell) in variants.iter().zip(row) {
            if !variant.runs(*scenario) {
                // Not run: UDP does not go through that path, or it has no resolver.
                continue;
            }
            let mut result = cell.value.map_or_else(
                || "failed".into(),
                |v| format_value(*scenario, v, context.flood_size),
            );
            if let Some(pct) = cell.answered_pct {
                let _ = write!(result, " ({pct:.1}% answered)");
            }
            if let Some(pct) = cell.servfail_pct {
                let _ = write!(result, " ({pct:.1}% SERVFAIL)");
            }
            if scenario.is_flood() {
                let figures = flood_text(cell.loss_pct, cell.sent_pct, cell.drops.as_ref());
                let _ = write!(result, " ({figures})");
            }
            if cell.errors > 0 || !cell.failures.is_empty() {
                let _ = write!(
                    result,
                    " ({} errors, {} failed runs)",
                    cell.errors,
                    cell.failures.len()
                );
            }
            let proxied = variant.command.is_some();
            let mut latency = cell.latency_us.map_or_else(
                || "".into(),
                |[p50, p99, p999]| format!("{p50:.0} / {p99:.0} / {p999:.0}"),
            );
            if let Some(added) = cell.p50_added_us.filter(|_| proxied) {
                let _ = write!(latency, " (p50 {added:+.0})");
            }
            let _ = writeln!(
                md,
                "| {} | {} | {result} | {} | {latency} | {} | {} | {} | {} |",
                scenario.name(),
                variant.label,
                opt(cell.ratio, 2),
                if proxied {
                    opt(cell.cpu_pct, 0)
                } else {
                    "".into()
                },
                if proxied {
                    opt(cell.cpu_s_per_gb, 2)
                } else {
                    "".into()
                },
                if proxied {
                    opt(cell.cpu_us_per_op, 1)
                } else {
                    "".into()
                },
                if proxied {
                    mib(cell.peak_rss_kib)
                } else {
                    "".into()
                },
            );
        }
    }
    let per_mb_rows: Vec<String> = summary
        .scenarios
        .iter()
        .zip(&summary.cells)
        .flat_map(|(scenario, row)| {
            row.iter().zip(variants).filter_map(move |(cell, variant)| {
                let p = cell.per_mb?;
                Some(format!(
                    "| {} | {} | {:.1} | {:.1} | {} | {:.1} |\n",
                    scenario.name(),
                    variant.label,
                    p.wakeups,
                    p.writes,
                    thousands(p.mean_write),
                    p.reads
                ))
            })
        })
        .collect();
    if !per_mb_rows.is_empty() {
        let _ = writeln!(
            md,
            "\nPer MB of payload (medians): the proxy's wake-ups (context switches), packets \
             it wrote to its device (TUN or tap) and their mean size, packets it read from \
             it (on downloads mostly the clients' ACKs).\n\n\
             | scenario | path | wake-ups/MB | device writes/MB | mean write (B) | device reads/MB |\n\
             |---|---|--:|--:|--:|--:|"
        );
        md.extend(per_mb_rows);
    }
    if resources.is_empty() {
        return md;
    }
    let _ = write!(md, "\n| resource |");
    for (v, _) in resources {
        let _ = write!(md, " {} |", variants[*v].label);
    }
    let _ = write!(md, "\n|---|");
    for _ in resources {
        let _ = write!(md, "--:|");
    }
    md.push('\n');
    let mut row = |name: String, cell: &dyn Fn(&Resources) -> String| {
        let _ = write!(md, "| {name} |");
        for (_, figures) in resources {
            let _ = write!(md, " {} |", cell(figures));
        }
        md.push('\n');
    };
    let first = &resources[0].1;
    row("start-up to a working TUN".into(), &|r| {
        r.startup
            .map_or_else(|| "-".into(), |d| format!("{} ms", d.as_millis()))
    });
    row("RSS idle".into(), &|r| mib(r.idle_rss_kib));
    row(
        format!("wake-ups in {} s idle", first.wakeup_window.as_secs()),
        &|r| r.wakeups.map_or_else(|| "-".into(), |w| w.to_string()),
    );
    for (i, &(flows, _)) in first.tcp_flows_rss.iter().enumerate() {
        row(
            format!("RSS with {} idle TCP flows", thousands(flows as f64)),
            &|r| {
                let Some(&(flows, rss)) = r.tcp_flows_rss.get(i) else {
                    return "-".into();
                };
                match rss.zip(r.idle_rss_kib) {
                    Some((rss, idle)) => format!(
                        "{} ({:.0} B/flow)",
                        mib(Some(rss)),
                        (rss as f64 - idle as f64) * 1024.0 / flows as f64
                    ),
                    None => "-".into(),
                }
            },
        );
    }
    row("peak RSS, 8 streams up then down".into(), &|r| {
        mib(r.load_peak_rss_kib)
    });
    row(
        format!("RSS {} s after that load", first.after_load_wait.as_secs()),
        &|r| mib(r.after_load_rss_kib),
    );
    row(
        format!(
            "then RSS with {} UDP flows",
            thousands(first.udp_flows as f64)
        ),
        &|r| format!("{} ({} answered)", mib(r.udp_flows_rss_kib), r.udp_answered),
    );
    // The RSS halfway through shows whether it still rises at the end.
    let halfway = Duration::from_secs(first.stalled_window.as_secs() / 2);
    let mut label = format!(
        "then RSS with {} stalled downloads after {} s",
        thousands(first.stalled_flows as f64),
        first.stalled_window.as_secs(),
    );
    if !halfway.is_zero() {
        let _ = write!(label, " (after {} s)", halfway.as_secs());
    }
    row(label, &|r| {
        let at = |t: Duration| {
            r.stalled_rss_kib
                .iter()
                .find(|&&(at, _)| at >= t)
                .and_then(|&(_, rss)| rss)
        };
        let mut text = mib(at(r.stalled_window));
        if !halfway.is_zero() {
            let _ = write!(text, " ({})", mib(at(halfway)));
        }
        let _ = write!(
            text,
            ", servers wrote {}",
            mib(Some(r.stalled_bytes / 1024))
        );
        if r.stalled_failed > 0 {
            let _ = write!(text, ", {} flows reset", r.stalled_failed);
        }
        if let Some((proxy, clients)) = r.stalled_unread {
            let _ = write!(
                text,
                "; unread in the kernel: {} in the proxy's sockets, {} in the clients'",
                mib(Some(proxy / 1024)),
                mib(Some(clients / 1024))
            );
        }
        text
    });
    row(
        "one bulk download beside them, vs right before them".to_string(),
        &|r| match (r.bulk_beside_stalled_gbps, r.bulk_alone_gbps) {
            (Some(beside), Some(alone)) => {
                format!("{beside:.2} vs {alone:.2} Gbit/s ({:.2})", beside / alone)
            }
            _ => "-".into(),
        },
    );
    for (v, figures) in resources {
        if let Some(e) = &figures.error {
            let _ = writeln!(md, "\n{}: {e}", variants[*v].label);
        }
    }
    md
}

fn json_str(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_num(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v}"),
        _ => "null".into(),
    }
}

fn json_int(value: Option<u64>) -> String {
    value.map_or_else(|| "null".into(), |v| v.to_string())
}

fn json_drops(drops: Option<&Drops>) -> String {
    drops.map_or_else(
        || "null".into(),
        |d| {
            format!(
                r#"{{"receiver":{},"proxy_sockets":{},"tun_queue":{}}}"#,
                d.receiver,
                json_int(d.proxy_sockets),
                json_int(d.tun_queue)
            )
        },
    )
}

fn json_latency(latency: Option<[f64; 3]>) -> String {
    latency.map_or_else(
        || "null".into(),
        |[p50, p99, p999]| format!(r#"{{"p50":{p50},"p99":{p99},"p999":{p999}}}"#),
    )
}

pub fn json(
    context: &Context,
    variants: &[Variant],
    runs: &[Run],
    summary: &Summary,
    resources: &[(usize, Resources)],
) -> String {
    let mut out = String::from("{\n");
    let _ = writeln!(
        out,
        r#""machine":{},"unix_time":{},"command":{},"seconds_per_run":{},"rounds":{},"udp_rate":{},"flood_rate":{},"flood_size":{},"flood_batch":{},"flood_wire_bytes":{},"rate":{},"qdisc":{},"family":{},"smoke":{},"#,
        json_str(&context.machine),
        context.unix_time,
        json_str(&context.command),
        context.seconds,
        context.rounds,
        context.udp_rate,
        context.flood_rate,
        context.flood_size,
        context.flood_batch,
        context.flood_wire_bytes,
        context
            .shaping
            .as_ref()
            .map_or_else(|| "null".into(), |(rate, _)| json_str(rate)),
        context
            .shaping
            .as_ref()
            .map_or_else(|| "null".into(), |(_, tbf)| json_str(tbf)),
        json_str(context.family),
        context.smoke
    );
    let list = |items: Vec<String>| format!("[\n{}\n]", items.join(",\n"));
    let variant_items = variants
        .iter()
        .map(|v| {
            let command = v.command.as_deref().map_or_else(|| "null".into(), json_str);
            format!(r#"{{"label":{},"command":{command}}}"#, json_str(&v.label))
        })
        .collect();
    let _ = writeln!(out, r#""variants":{},"#, list(variant_items));
    let run_items = runs
        .iter()
        .map(|run| {
            let head = format!(
                r#""scenario":{},"variant":{},"round":{}"#,
                json_str(run.scenario.name()),
                json_str(&variants[run.variant].label),
                run.round + 1
            );
            match &run.outcome {
                Err(e) => format!(r#"{{{head},"error":{}}}"#, json_str(e)),
                Ok(m) => format!(
                    r#"{{{head},"value":{},"unit":{},"units":{},"bytes":{},"elapsed_s":{},"offered":{},"due":{},"drops":{},"errors":{},"latency_us":{},"cpu_seconds":{},"peak_rss_kib":{}}}"#,
                    json_num(Some(run.scenario.value(&m.sample))),
                    json_str(run.scenario.unit()),
                    m.sample.units,
                    m.sample.bytes,
                    m.sample.elapsed.as_secs_f64(),
                    m.sample.offered,
                    m.sample.due,
                    json_drops(m.sample.drops.as_ref()),
                    m.sample.errors,
                    json_latency(percentiles(&m.sample.latencies)),
                    json_num(m.cpu.map(|(seconds, _)| seconds)),
                    json_int(m.peak_rss_kib),
                ),
            }
        })
        .collect();
    let _ = writeln!(out, r#""runs":{},"#, list(run_items));
    let mut summary_items = Vec::new();
    for (scenario, row) in summary.scenarios.iter().zip(&summary.cells) {
        for (variant, cell) in variants.iter().zip(row) {
            summary_items.push(format!(
                r#"{{"scenario":{},"variant":{},"value":{},"unit":{},"ratio":{},"latency_us":{},"cpu_pct":{},"cpu_s_per_gb":{},"cpu_us_per_op":{},"peak_rss_kib":{},"answered_pct":{},"servfail_pct":{},"loss_pct":{},"sent_pct":{},"p50_added_us":{},"per_mb":{},"drops":{},"errors":{},"failed_runs":{}}}"#,
                json_str(scenario.name()),
                json_str(&variant.label),
                json_num(cell.value),
                json_str(scenario.unit()),
                json_num(cell.ratio),
                json_latency(cell.latency_us),
                json_num(cell.cpu_pct),
                json_num(cell.cpu_s_per_gb),
                json_num(cell.cpu_us_per_op),
                json_int(cell.peak_rss_kib),
                json_num(cell.answered_pct),
                json_num(cell.servfail_pct),
                json_num(cell.loss_pct),
                json_num(cell.sent_pct),
                json_num(cell.p50_added_us),
                cell.per_mb.map_or_else(
                    || "null".to_string(),
                    |p| format!(
                        r#"{{"wakeups":{:.2},"device_writes":{:.2},"mean_write_bytes":{:.0},"device_reads":{:.2}}}"#,
                        p.wakeups, p.writes, p.mean_write, p.reads
                    )
                ),
                json_drops(cell.drops.as_ref()),
                cell.errors,
                cell.failures.len(),
            ));
        }
    }
    let _ = writeln!(out, r#""summary":{},"#, list(summary_items));
    let resource_items = resources
        .iter()
        .map(|(v, r)| {
            let tcp: Vec<String> = r
                .tcp_flows_rss
                .iter()
                .map(|&(flows, rss)| format!(r#"{{"flows":{flows},"rss_kib":{}}}"#, json_int(rss)))
                .collect();
            let stalled: Vec<String> = r
                .stalled_rss_kib
                .iter()
                .map(|&(at, rss)| {
                    format!(r#"{{"at_s":{},"rss_kib":{}}}"#, at.as_secs_f64(), json_int(rss))
                })
                .collect();
            format!(
                r#"{{"variant":{},"startup_ms":{},"idle_rss_kib":{},"wakeups":{},"wakeup_window_s":{},"tcp_idle_flows":[{}],"udp_flows":{},"udp_answered":{},"udp_flows_rss_kib":{},"load_peak_rss_kib":{},"after_load_rss_kib":{},"after_load_wait_s":{},"stalled_flows":{},"stalled_window_s":{},"stalled_rss":[{}],"stalled_bytes":{},"stalled_failed":{},"stalled_proxy_unread":{},"stalled_clients_unread":{},"bulk_alone_gbps":{},"bulk_beside_stalled_gbps":{},"error":{}}}"#,
                json_str(&variants[*v].label),
                json_num(r.startup.map(|d| d.as_secs_f64() * 1e3)),
                json_int(r.idle_rss_kib),
                json_int(r.wakeups),
                r.wakeup_window.as_secs_f64(),
                tcp.join(","),
                r.udp_flows,
                r.udp_answered,
                json_int(r.udp_flows_rss_kib),
                json_int(r.load_peak_rss_kib),
                json_int(r.after_load_rss_kib),
                r.after_load_wait.as_secs_f64(),
                r.stalled_flows,
                r.stalled_window.as_secs_f64(),
                stalled.join(","),
                r.stalled_bytes,
                r.stalled_failed,
                json_int(r.stalled_unread.map(|(proxy, _)| proxy)),
                json_int(r.stalled_unread.map(|(_, clients)| clients)),
                json_num(r.bulk_alone_gbps),
                json_num(r.bulk_beside_stalled_gbps),
                r.error.as_deref().map_or_else(|| "null".into(), json_str),
            )
        })
        .collect();
    let _ = writeln!(out, r#""resources":{}"#, list(resource_items));
    out.push_str("}\n");
    out
}

/// One bar of a chart: which series (colour) it belongs to, its length and its label.
struct Bar {
    series: usize,
    value: f64,
    label: String,
}

struct Group {
    name: String,
    bars: Vec<Bar>,
}

const COLOURS: [&str; 6] = [
    "#8c8c8c", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728",
];
const BAR: f64 = 14.0;
const LEFT: f64 = 120.0;
const WIDTH: f64 = 760.0;
const LABEL_ROOM: f64 = 170.0;

/// A horizontal grouped bar chart; bar lengths are relative to the largest value.
fn bar_chart(title: &str, series: &[&str], groups: &[Group]) -> String {
    let max = groups
        .iter()
        .flat_map(|g| &g.bars)
        .map(|b| b.value)
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let scale = (WIDTH - LEFT - LABEL_ROOM) / max;
    // Colours stay tied to the path across charts; the legend lists the paths shown.
    let shown: Vec<usize> = (0..series.len())
        .filter(|&i| groups.iter().flat_map(|g| &g.bars).any(|b| b.series == i))
        .collect();
    let legend_rows = shown.len().div_ceil(3) as f64;
    let mut y = 40.0 + legend_rows * 18.0;
    let mut body = String::new();
    for group in groups {
        let height = group.bars.len() as f64 * (BAR + 2.0);
        let _ = writeln!(
            body,
            r#"<text x="{}" y="{:.1}" text-anchor="end" dominant-baseline="middle">{}</text>"#,
            LEFT - 8.0,
            y + height / 2.0,
            xml(&group.name)
        );
        for bar in &group.bars {
            let length = if bar.value.is_finite() {
                bar.value * scale
            } else {
                0.0
            };
            let _ = writeln!(
                body,
                r#"<rect x="{LEFT}" y="{y:.1}" width="{length:.1}" height="{BAR}" fill="{}"/><text x="{:.1}" y="{:.1}" dominant-baseline="middle" font-size="11">{}</text>"#,
                COLOURS[bar.series % COLOURS.len()],
                LEFT + length + 4.0,
                y + BAR / 2.0,
                xml(&bar.label)
            );
            y += BAR + 2.0;
        }
        y += 10.0;
    }
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{:.0}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="14" font-weight="bold">{}</text>
"#,
        y + 10.0,
        xml(title)
    );
    for (slot, &i) in shown.iter().enumerate() {
        let (x, ly) = (
            10.0 + (slot % 3) as f64 * 250.0,
            34.0 + (slot / 3) as f64 * 18.0,
        );
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{ly}" width="12" height="12" fill="{}"/><text x="{}" y="{}" dominant-baseline="middle">{}</text>"#,
            COLOURS[i % COLOURS.len()],
            x + 16.0,
            ly + 6.0,
            xml(series[i])
        );
    }
    svg.push_str(&body);
    svg.push_str("</svg>\n");
    svg
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Throughput relative to direct, proxy CPU, and proxy memory, as (file name, SVG).
/// With `--rate` the throughput and CPU charts are named after the rate
/// (`cpu-1gbit.svg`), so that a line-rate run does not overwrite the unshaped charts.
pub fn charts(
    context: &Context,
    variants: &[Variant],
    summary: &Summary,
    resources: &[(usize, Resources)],
) -> Vec<(String, String)> {
    let labels: Vec<&str> = variants.iter().map(|v| v.label.as_str()).collect();
    let per_scenario = |bar: &dyn Fn(Scenario, usize, &Cell) -> Option<Bar>| -> Vec<Group> {
        summary
            .scenarios
            .iter()
            .zip(&summary.cells)
            .map(|(&scenario, row)| Group {
                name: scenario.name().into(),
                bars: row
                    .iter()
                    .enumerate()
                    .filter(|&(v, _)| variants[v].runs(scenario))
                    .filter_map(|(v, cell)| bar(scenario, v, cell))
                    .collect(),
            })
            .collect()
    };
    let throughput = per_scenario(&|scenario, v, cell| {
        Some(Bar {
            series: v,
            value: cell.ratio.unwrap_or(0.0),
            label: match (cell.value, cell.ratio) {
                (Some(value), Some(ratio)) => {
                    format!(
                        "{} ({ratio:.2})",
                        format_value(scenario, value, context.flood_size)
                    )
                }
                (Some(value), None) => {
                    format!(
                        "{} (no direct baseline)",
                        format_value(scenario, value, context.flood_size)
                    )
                }
                (None, _) => "failed".into(),
            },
        })
    });
    let cpu = per_scenario(&|_, v, cell| {
        variants[v].command.as_ref()?;
        Some(Bar {
            series: v,
            value: cell.cpu_pct.unwrap_or(0.0),
            label: match (cell.cpu_pct, cell.cpu_us_per_op, cell.cpu_s_per_gb) {
                (Some(pct), Some(per_op), _) => format!("{pct:.0}% ({per_op:.1} µs/op)"),
                (Some(pct), None, Some(per_gb)) => format!("{pct:.0}% ({per_gb:.2} CPU-s/GB)"),
                (Some(pct), None, None) => format!("{pct:.0}%"),
                _ => "-".into(),
            },
        })
    });
    let mut memory = Vec::new();
    if let Some((_, first)) = resources.first() {
        let mut figure = |name: String, kib: &dyn Fn(&Resources) -> Option<u64>| {
            memory.push(Group {
                name,
                bars: resources
                    .iter()
                    .map(|(v, r)| Bar {
                        series: *v,
                        value: kib(r).unwrap_or(0) as f64,
                        label: mib(kib(r)),
                    })
                    .collect(),
            });
        };
        figure("idle".into(), &|r| r.idle_rss_kib);
        for (i, &(flows, _)) in first.tcp_flows_rss.iter().enumerate() {
            figure(format!("{} TCP flows", thousands(flows as f64)), &|r| {
                r.tcp_flows_rss.get(i)?.1
            });
        }
        figure("peak, 8 streams".into(), &|r| r.load_peak_rss_kib);
        figure(
            format!("{} s after load", first.after_load_wait.as_secs()),
            &|r| r.after_load_rss_kib,
        );
        figure(
            format!("{} UDP flows", thousands(first.udp_flows as f64)),
            &|r| r.udp_flows_rss_kib,
        );
        figure(
            format!("{} stalled", thousands(first.stalled_flows as f64)),
            &|r| r.stalled_rss_kib.last()?.1,
        );
    }
    let (suffix, at_rate) = match &context.shaping {
        Some((rate, _)) => (format!("-{rate}"), format!(" at {rate}")),
        None => (String::new(), String::new()),
    };
    let mut charts = vec![
        (
            format!("throughput{suffix}.svg"),
            bar_chart(
                &format!("Throughput relative to the direct path{at_rate} (higher is better)"),
                &labels,
                &throughput,
            ),
        ),
        (
            format!("cpu{suffix}.svg"),
            bar_chart(
                &format!("Proxy CPU{at_rate}, % of one core (lower is better)"),
                &labels,
                &cpu,
            ),
        ),
    ];
    if !memory.is_empty() {
        charts.push((
            "memory.svg".into(),
            bar_chart("Proxy resident memory (RSS)", &labels, &memory),
        ));
    }
    charts
}
