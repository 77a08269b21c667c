//! Counters of what the proxy did and dropped, printed in human-readable groups.

use std::fmt;

/// Plain counters; single-threaded, so no atomics.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub tun_reads: u64,
    pub tun_read_bytes: u64,
    pub tun_writes: u64,
    pub tun_write_bytes: u64,
    pub tun_write_errors: u64,
    pub malformed: u64,
    pub unsupported: u64,
    pub no_flow: u64,
    pub flows_opened: u64,
    pub flows_closed: u64,
    pub refused_limit: u64,
    pub socket_errors: u64,
    pub connect_refused: u64,
    pub connect_timeout: u64,
    pub connect_other: u64,
    pub server_resets: u64,
    pub client_resets: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub reply_drops: u64,
}

impl Stats {
    /// Counts the failure a finished flow ended with.
    pub fn count_failure(&mut self, failure: crate::relay::Failure) {
        use crate::relay::Failure;
        let counter = match failure {
            Failure::ConnectRefused => &mut self.connect_refused,
            Failure::ConnectTimeout => &mut self.connect_timeout,
            Failure::ConnectOther => &mut self.connect_other,
            Failure::ServerReset => &mut self.server_resets,
            Failure::ClientReset => &mut self.client_resets,
        };
        *counter += 1;
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "flows: opened {} closed {} refused-at-limit {} socket-errors {}",
            self.flows_opened, self.flows_closed, self.refused_limit, self.socket_errors
        )?;
        writeln!(
            f,
            "failures: connect-refused {} connect-timeout {} connect-other {} server-reset {} client-reset {}",
            self.connect_refused,
            self.connect_timeout,
            self.connect_other,
            self.server_resets,
            self.client_resets
        )?;
        writeln!(
            f,
            "relayed: up {} B down {} B",
            self.bytes_up, self.bytes_down
        )?;
        writeln!(
            f,
            "tun: reads {} ({} B) writes {} ({} B) write-errors {}",
            self.tun_reads,
            self.tun_read_bytes,
            self.tun_writes,
            self.tun_write_bytes,
            self.tun_write_errors
        )?;
        write!(
            f,
            "drops: malformed {} unsupported {} no-flow {} replies-without-buffer {}",
            self.malformed, self.unsupported, self.no_flow, self.reply_drops
        )
    }
}
