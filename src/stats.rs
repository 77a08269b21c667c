//! Counters of what the proxy did and dropped, printed in human-readable groups.

use std::fmt;

use crate::stack::device::TxCounters;
use crate::wire::vnet;

/// Mean of `total` over `count`, 0 when there is nothing to average.
fn mean(total: u64, count: u64) -> u64 {
    total.checked_div(count).unwrap_or(0)
}

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
    /// TCP segments with bytes beyond the window advertised to their client.
    pub beyond_window: u64,
    pub flows_opened: u64,
    pub flows_closed: u64,
    pub refused_limit: u64,
    /// Connecting flows dropped for newer SYNs when too many were half open.
    pub half_open_evicted: u64,
    pub socket_errors: u64,
    /// SYNs refused because the flow's buffers could not be allocated.
    pub memory_refusals: u64,
    pub connect_refused: u64,
    pub connect_timeout: u64,
    pub connect_other: u64,
    pub connect_unreachable: u64,
    pub server_resets: u64,
    pub client_resets: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub bad_vnet_header: u64,
    /// Super-packets read (a GSO type in the virtio-net header), and their bytes.
    pub segmented_reads: u64,
    pub segmented_read_bytes: u64,
    /// Copied from the transmit pool when printed.
    pub tx: TxCounters,
    /// Copied from the UDP relay when printed.
    pub udp: crate::flow::datagram::Counters,
    pub upstream: crate::flow::upstream::Counters,
    pub fragments: u64,
}

impl Stats {
    /// Counts the virtio-net header of a packet read from the TUN.
    pub fn count_read_header(&mut self, header: &vnet::Header, packet_len: usize) {
        if header.gso != vnet::Gso::None {
            self.segmented_reads += 1;
            self.segmented_read_bytes += packet_len as u64;
        }
    }

    /// Counts the failure a finished flow ended with.
    pub fn count_failure(&mut self, failure: crate::flow::tcp::Failure) {
        use crate::flow::tcp::Failure;
        let counter = match failure {
            Failure::ConnectRefused => &mut self.connect_refused,
            Failure::ConnectTimeout => &mut self.connect_timeout,
            Failure::ConnectOther => &mut self.connect_other,
            Failure::HostUnreachable | Failure::NetUnreachable => &mut self.connect_unreachable,
            Failure::ServerReset => &mut self.server_resets,
            Failure::Evicted => &mut self.half_open_evicted,
            Failure::ClientReset => &mut self.client_resets,
            Failure::Upstream(fault) => return self.upstream.count(fault),
        };
        *counter += 1;
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "flows: opened {} closed {} refused-at-limit {} half-open-evicted {} socket-errors {} out-of-memory {}",
            self.flows_opened,
            self.flows_closed,
            self.refused_limit,
            self.half_open_evicted,
            self.socket_errors,
            self.memory_refusals
        )?;
        writeln!(
            f,
            "failures: connect-refused {} connect-unreachable {} connect-timeout {} connect-other {} server-reset {} client-reset {}",
            self.connect_refused,
            self.connect_unreachable,
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
            "tun: reads {} (mean {} B) writes {} (mean {} B) write-errors {}",
            self.tun_reads,
            mean(self.tun_read_bytes, self.tun_reads),
            self.tun_writes,
            mean(self.tun_write_bytes, self.tun_writes),
            self.tun_write_errors
        )?;
        writeln!(
            f,
            "offload: super-packets in {} (mean {} B) out {} (mean {} B)",
            self.segmented_reads,
            mean(self.segmented_read_bytes, self.segmented_reads),
            self.tx.segmented,
            mean(self.tx.segmented_bytes, self.tx.segmented)
        )?;
        let udp = &self.udp;
        writeln!(
            f,
            "udp: flows opened {} expired {} evicted {} socket-errors {}; up {} datagrams ({} B) down {} ({} B); send-errors {} recv-errors {} socket-drops {}",
            udp.flows_opened,
            udp.flows_expired,
            udp.flows_evicted,
            udp.socket_errors,
            udp.datagrams_up,
            udp.bytes_up,
            udp.datagrams_down,
            udp.bytes_down,
            udp.send_errors,
            udp.recv_errors,
            udp.socket_drops
        )?;
        let up = &self.upstream;
        writeln!(
            f,
            "upstream: connect-failed {} timeout {} closed {} protocol-error {} no-acceptable-method {} auth-rejected {} general-failure {} not-allowed {} other-reply {} unreachable {}; udp associations {} ended {} fragments {} malformed {} too-big {} not-held {}; echo-refused {}",
            up.connect_failed,
            up.timeouts,
            up.closed,
            up.protocol_errors,
            up.no_acceptable_method,
            up.auth_rejected,
            up.general_failure,
            up.not_allowed,
            up.other_reply,
            up.unreachable,
            up.associations,
            up.associations_ended,
            up.udp_fragments,
            up.udp_malformed,
            up.udp_too_big,
            up.udp_not_held,
            up.echo_refused
        )?;
        write!(
            f,
            "drops: malformed {} bad-vnet-header {} fragments {} unsupported {} no-flow {} beyond-window {} replies-without-buffer {} udp-no-send-slot {} udp-replies-without-buffer {} echo-no-ident {}",
            self.malformed,
            self.bad_vnet_header,
            self.fragments,
            self.unsupported,
            self.no_flow,
            self.beyond_window,
            self.tx.dropped_replies,
            udp.no_send_slot,
            udp.reply_drops,
            udp.echo_no_ident
        )
    }
}
