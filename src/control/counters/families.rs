//! The metric families the counters table's entries belong to: name, type and help.

use super::{Family, Kind};

macro_rules! family {
    ($ident:ident, $name:literal, $kind:ident, $help:literal) => {
        pub(super) static $ident: Family = Family {
            name: $name,
            help: $help,
            kind: Kind::$kind,
        };
    };
}

family!(
    BYTES,
    "bytes_total",
    Counter,
    "Payload bytes relayed, by protocol and direction (up: client to server)."
);
family!(
    DATAGRAMS,
    "datagrams_total",
    Counter,
    "UDP datagrams and ICMP echo messages relayed, by protocol and direction (TCP is a byte stream: see uringproxy_bytes_total)."
);
family!(
    TUN_PACKETS,
    "tun_packets_total",
    Counter,
    "Packets read from and written to the TUN, all protocols; a segmentation super-packet counts once."
);
family!(
    TUN_BYTES,
    "tun_bytes_total",
    Counter,
    "Bytes of the packets read from and written to the TUN."
);
family!(
    TUN_SUPER_PACKETS,
    "tun_super_packets_total",
    Counter,
    "Segmentation super-packets (up to 64 KiB) read from and written to the TUN."
);
family!(
    TUN_SUPER_PACKET_BYTES,
    "tun_super_packet_bytes_total",
    Counter,
    "Bytes of the segmentation super-packets read from and written to the TUN."
);
family!(
    UDP_SUPER_PACKETS,
    "udp_super_packets_total",
    Counter,
    "UDP super-packets (USO) the kernel split into datagrams: written to the TUN (down)."
);
family!(
    UDP_SUPER_PACKET_DATAGRAMS,
    "udp_super_packet_datagrams_total",
    Counter,
    "Server datagrams in the UDP super-packets (also in datagrams_total); over udp_super_packets_total, the mean per coalesced receive."
);
family!(
    UDP_COALESCED_RECEIVES,
    "udp_coalesced_receives_total",
    Counter,
    "Receives from servers that brought several UDP datagrams at once (UDP_GRO)."
);
family!(
    UDP_GATHERED_WRITES,
    "udp_gathered_writes_total",
    Counter,
    "UDP super-packets written to the TUN from the buffer they were received into, without copying them (the rest of uringproxy_udp_super_packets_total were copied)."
);
family!(
    UDP_PER_DATAGRAM_FALLBACKS,
    "udp_per_datagram_fallbacks_total",
    Counter,
    "Coalesced receives written to the TUN one datagram at a time (no USO on the TUN, or datagrams of unequal size)."
);
family!(
    TUN_WRITE_ERRORS,
    "tun_write_errors_total",
    Counter,
    "Writes to the TUN that failed."
);
family!(
    FLOWS_OPENED,
    "flows_opened_total",
    Counter,
    "Flows opened, by protocol."
);
family!(
    FLOWS_CLOSED,
    "flows_closed_total",
    Counter,
    "TCP flows that ended, failed ones included."
);
family!(
    FLOWS_FAILED,
    "flows_failed_total",
    Counter,
    "TCP flows that ended in failure, by cause."
);
family!(
    FLOWS_REFUSED,
    "flows_refused_total",
    Counter,
    "TCP SYNs refused with RST before a flow was opened, by cause."
);
family!(
    DATAGRAM_FLOWS_ENDED,
    "datagram_flows_ended_total",
    Counter,
    "UDP and ping flows closed, by cause (expired idle, or evicted for a new flow at --max-udp-flows)."
);
family!(
    DATAGRAM_ERRORS,
    "datagram_errors_total",
    Counter,
    "Errors of UDP and ping flows' sockets, by operation (socket: none could be opened for a new flow)."
);
family!(
    UDP_SUPER_SENDS,
    "udp_super_sends_total",
    Counter,
    "Sends to servers carrying more than one client datagram (one sendmsg with UDP_SEGMENT)."
);
family!(
    UDP_SUPER_SEND_SEGMENTS,
    "udp_super_send_segments_total",
    Counter,
    "Client datagrams in those sends (mean per send: this over uringproxy_udp_super_sends_total)."
);
family!(
    UDP_GSO_FALLBACKS,
    "udp_gso_fallbacks_total",
    Counter,
    "Segmented sends the kernel refused (EIO: egress without checksum offload on older kernels; EMSGSIZE: a path MTU below the segment size): sent again one datagram at a time, and that socket sends no more segmented."
);
family!(
    DROPS,
    "drops_total",
    Counter,
    "Packets dropped, by reason (datagram_socket_full: by the kernel, at the full socket of a UDP or ping flow, counted as the flow closes)."
);
family!(
    UPSTREAM_FAILURES,
    "upstream_failures_total",
    Counter,
    "TCP flows and UDP associations the SOCKS5 upstream (--upstream) failed, by cause (unreachable: a UDP ASSOCIATE refused with reply code 3 to 5; those to a CONNECT are counted as the direct path's are)."
);
family!(
    UPSTREAM_ASSOCIATIONS,
    "upstream_associations_total",
    Counter,
    "UDP associations with the SOCKS5 upstream set up, and ended by the upstream."
);
family!(
    CONTROL_CLIENTS,
    "control_clients_total",
    Counter,
    "Clients of the control socket and the metrics endpoint, by listener and event."
);
family!(
    OPEN_FLOWS,
    "open_flows",
    Gauge,
    "Flows open now, by protocol and state."
);
family!(
    TUN_WRITE_BUFFERS_IN_USE,
    "tun_write_buffers_in_use",
    Gauge,
    "TUN write buffers holding a packet (queued or being written)."
);
family!(
    TUN_WRITE_BUFFERS,
    "tun_write_buffers",
    Gauge,
    "TUN write buffers in the pool."
);
family!(
    TUN_READ_BUFFERS_CIRCULATING,
    "tun_read_buffers_circulating",
    Gauge,
    "TUN read buffers the kernel may fill now (more circulate under load)."
);
family!(
    TUN_READ_BUFFERS,
    "tun_read_buffers",
    Gauge,
    "TUN read buffers registered."
);
family!(
    FLOW_BUFFERS_BOUND,
    "flow_buffers_resident_bound_bytes",
    Gauge,
    "Bound on the resident memory of all flow buffers."
);
family!(
    MEMORY_LIMIT,
    "memory_limit_bytes",
    Gauge,
    "The --memory-limit for flow buffers."
);
family!(
    RESIDENT_MEMORY,
    "resident_memory_bytes",
    Gauge,
    "Resident memory of the proxy process (RSS), read when asked."
);

family!(
    DNS_QUERIES,
    "dns_queries_total",
    Counter,
    "DNS queries answered by the proxy (--dns fake), by question type (https_svcb: HTTPS and SVCB)."
);
family!(
    DNS_RESULTS,
    "dns_results_total",
    Counter,
    "What became of the DNS queries (--dns fake): answered, forwarded to --dns-server, refused, formerr (malformed), servfail (the table full of names in use), dropped, aaaa_without_range (no record: the TUN has no IPv6 address)."
);
family!(
    FAKE_UNMAPPED,
    "fake_unmapped_total",
    Counter,
    "Flows to a fake address no name is mapped to (after a restart, or evicted), refused at once: TCP with RST, UDP with ICMP port unreachable."
);
family!(
    FAKE_EVICTIONS,
    "fake_evictions_total",
    Counter,
    "Fake-address table entries given to another name (the least recently used, held by no flow)."
);
family!(
    DNS_TCP_EVICTIONS,
    "dns_tcp_evictions_total",
    Counter,
    "Idle DNS-over-TCP connections closed to admit a new one when every slot was taken (RFC 7766 6.2.3)."
);
family!(
    FAKE_ENTRIES,
    "fake_entries",
    Gauge,
    "Names in the fake-address table (at most --fake-entries)."
);
