//! Counters of what the proxy did and dropped, as the event loop increments them
//! (`control::counters` names and reports them).

use crate::stack::device::TxCounters;
use crate::wire::vnet;

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
    pub dns: DnsStats,
}

/// Fake-IP DNS (`--dns fake`): the resolver's counters (copied when printed) and what
/// the loop counts beside them.
#[derive(Clone, Copy, Debug, Default)]
pub struct DnsStats {
    pub resolver: crate::flow::dns::DnsCounters,
    /// TCP SYNs to a fake address no name is mapped to (after a restart, or evicted),
    /// answered with RST; UDP datagrams to one, answered with ICMP port unreachable.
    pub unmapped_tcp: u64,
    pub unmapped_udp: u64,
    /// Replies that found no TUN write buffer.
    pub reply_drops: u64,
    /// Queries to forward dropped because `MAX_FORWARDS` were in flight, and forwarded
    /// ones that failed (the upstream or the server refused, closed or was silent).
    pub forward_busy: u64,
    pub forward_failed: u64,
    /// DNS over TCP: flows to port 53 refused (every connection slot busy), idle
    /// connections closed to make room for a new one, streams ended for a bad length
    /// prefix, or for replies their client did not read.
    pub tcp_refused: u64,
    pub tcp_evicted: u64,
    pub tcp_malformed: u64,
    pub tcp_overflow: u64,
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
