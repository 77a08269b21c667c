//! The proxy's identity and numbers as the status reply, /metrics and SIGUSR1 report them.

use crate::control::counters::{Gauges, Info, Snapshot};
use crate::event_loop::{Proxy, tun_io};

impl Proxy {
    /// Runs `report` on the proxy's identity and numbers (counters refreshed first).
    pub(in crate::event_loop) fn with_report<R>(
        &self,
        report: impl FnOnce(&Info, &Snapshot) -> R,
    ) -> R {
        let [tcp_connecting, tcp_open, tcp_closing] = self.tcp.phases().map(|n| n as u64);
        let (udp_open, icmp_open) = self.udp.flows.open_by_kind();
        let (write_in_use, write_buffers) = self.stack.tx.buffer_use();
        let (read_circulating, read_buffers) = self.ring.buffer_use(tun_io::READ_GROUP);
        let gauges = Gauges {
            tcp_connecting,
            tcp_open,
            tcp_closing,
            udp_open: udp_open as u64,
            icmp_open: icmp_open as u64,
            tun_write_buffers_in_use: write_in_use as u64,
            tun_write_buffers: write_buffers as u64,
            tun_read_buffers_circulating: u64::from(read_circulating),
            tun_read_buffers: u64::from(read_buffers),
            flow_buffers_resident_bound: self.tcp.budget.resident_bound() as u64,
            memory_limit: self.tcp.budget.limit() as u64,
            resident: resident_bytes(),
        };
        let tun = &self.tun.tun;
        let info = Info {
            tun: tun.name(),
            interface: &self.config.interface,
            offload: tun.offload().name(),
            uptime_s: self.epoch.elapsed().as_secs(),
            rules: &self.rules,
        };
        let [control, metrics] = &self.control.counters;
        report(
            &info,
            &Snapshot {
                stats: &self.stats,
                gauges: &gauges,
                control,
                metrics,
            },
        )
    }
}

/// The process's resident memory (VmRSS of /proc/self/status), read when asked.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
