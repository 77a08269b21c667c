//! What /proc says about the proxy under test: CPU time, resident memory, wake-ups.

use std::collections::{HashMap, HashSet};
use std::fs;

use crate::common::status_kib;

/// User + system CPU time of the whole process (all threads, including io_uring
/// workers), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields after it may not.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state field (3).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    Some((utime + stime) as f64 / ticks as f64)
}

/// Resident memory now (VmRSS), KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory since start or the last [`reset_peak_rss`] (VmHWM), KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// Resets VmHWM to the current RSS (proc(5), clear_refs value 5).
pub fn reset_peak_rss(pid: u32) {
    let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Voluntary plus involuntary context switches of each of the process's threads, by
/// thread id: each one is a time a thread went to sleep or was preempted, so when idle
/// this counts wake-ups.
pub fn context_switches(pid: u32) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return counts;
    };
    for task in tasks.flatten() {
        // A thread may exit between the listing and the read.
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let switches = status
            .lines()
            .filter_map(|line| {
                line.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|count| count.trim().parse::<u64>().ok())
            .sum();
        counts.insert(task.file_name().to_string_lossy().into_owned(), switches);
    }
    counts
}

/// Context switches between two [`context_switches`] samples, counting only threads
/// still alive at the second (a thread that exited took its counts with it).
pub fn switches_between(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, &count)| count.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// One line describing the machine: CPU model, online CPUs, kernel.
pub fn machine() -> String {
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("model name"))?;
            Some(line.split_once(':')?.1.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kernel = kernel.trim();
    format!("{model}, {cpus} CPUs, Linux {kernel}")
}

/// One socket of /proc/net/{tcp,tcp6,udp,udp6}, as the namespace of the reading thread
/// sees them.
pub struct SocketRow {
    pub inode: u64,
    /// Bytes received but not yet read.
    pub rx_queue: u64,
    /// Datagrams dropped because the receive buffer was full (UDP only).
    pub drops: u64,
}

/// The sockets of `protocol` (`tcp` or `udp`), both families, in the calling thread's
/// network namespace (hence /proc/thread-self: /proc/self is the whole process's).
pub fn sockets(protocol: &str) -> Vec<SocketRow> {
    let mut rows = Vec::new();
    for file in [protocol.to_string(), format!("{protocol}6")] {
        let Ok(table) = fs::read_to_string(format!("/proc/thread-self/net/{file}")) else {
            continue;
        };
        // sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode ref
        // pointer drops (the last only for UDP).
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some((_, rx)) = fields.get(4).and_then(|q| q.split_once(':')) else {
                continue;
            };
            let hex = |text: &str| u64::from_str_radix(text, 16).unwrap_or(0);
            rows.push(SocketRow {
                inode: fields.get(9).and_then(|i| i.parse().ok()).unwrap_or(0),
                rx_queue: hex(rx),
                drops: fields.get(12).and_then(|d| d.parse().ok()).unwrap_or(0),
            });
        }
    }
    rows
}

/// Inodes of the sockets process `pid` holds open.
pub fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    fds.flatten()
        .filter_map(|fd| {
            let target = fs::read_link(fd.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Packets device `dev` dropped on transmit (for a TUN: the kernel's queue towards the
/// process reading it was full), in the calling thread's namespace.
pub fn tx_drops(dev: &str) -> Option<u64> {
    let table = fs::read_to_string("/proc/thread-self/net/dev").ok()?;
    let line = table
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(dev)?.strip_prefix(':'))?;
    // 8 receive counters, then transmit: bytes packets errs drop ...
    line.split_whitespace().nth(11)?.parse().ok()
}

/// Packets and bytes a device received and sent. For a TUN or tap, the device receives
/// what the process behind it writes and sends what that process reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl DeviceCounters {
    pub fn since(&self, earlier: &DeviceCounters) -> DeviceCounters {
        DeviceCounters {
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
        }
    }
}

/// Device `dev`'s counters, in the calling thread's namespace.
pub fn device_counters(dev: &str) -> Option<DeviceCounters> {
    let table = fs::read_to_string("/proc/thread-self/net/dev").ok()?;
    let line = table
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(dev)?.strip_prefix(':'))?;
    // receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes
    // packets ...
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    Some(DeviceCounters {
        rx_bytes: *fields.first()?,
        rx_packets: *fields.get(1)?,
        tx_bytes: *fields.get(8)?,
        tx_packets: *fields.get(9)?,
    })
}
