//! Every number the proxy reports, named once: each sample has a Prometheus family and
//! labels (for `/metrics`) and a flat key (for `uringproxy status` and its JSON), so the
//! two views cannot drift apart.

use crate::stats::Stats;

/// Prometheus metric types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// A metric family: its name (without the `uringproxy_` prefix), help and type.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
}

/// One number.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub family: &'static Family,
    pub labels: &'static [(&'static str, &'static str)],
    /// Its name in `uringproxy status` (unique).
    pub key: &'static str,
    pub value: u64,
}

/// What the control socket and the metrics endpoint count about their clients.
#[derive(Clone, Copy, Debug, Default)]
pub struct Clients {
    pub accepted: u64,
    /// Closed at once: every client slot was taken, or (control socket) another user.
    pub refused: u64,
    /// Closed at their deadline, before their reply was complete.
    pub timed_out: u64,
    /// Closed before their deadline, still without a request, to make room for a new
    /// client when every slot was taken.
    pub evicted: u64,
    /// Sent a request that got an error reply.
    pub bad_requests: u64,
}

/// The numbers of the moment that are not counters, taken when a request is served.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gauges {
    pub tcp_connecting: u64,
    pub tcp_open: u64,
    pub tcp_closing: u64,
    pub udp_open: u64,
    pub icmp_open: u64,
    pub tun_write_buffers_in_use: u64,
    pub tun_write_buffers: u64,
    pub tun_read_buffers_circulating: u64,
    pub tun_read_buffers: u64,
    pub flow_buffers_resident_bound: u64,
    pub memory_limit: u64,
    /// Resident memory of the process, if /proc/self/status could be read.
    pub resident: Option<u64>,
}

/// Everything a reply reports.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot<'a> {
    pub stats: &'a Stats,
    pub gauges: &'a Gauges,
    pub control: &'a Clients,
    pub metrics: &'a Clients,
}

/// The proxy's identity, for the reply's header and the Prometheus info metric.
#[derive(Clone, Copy, Debug)]
pub struct Info<'a> {
    pub tun: &'a str,
    pub interface: &'a str,
    /// The offload level's short name (`Offload::name`).
    pub offload: &'a str,
    pub uptime_s: u64,
}

macro_rules! family {
    ($ident:ident, $name:literal, $kind:ident, $help:literal) => {
        static $ident: Family = Family {
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

const TCP_UP: &[(&str, &str)] = &[("protocol", "tcp"), ("direction", "up")];
const TCP_DOWN: &[(&str, &str)] = &[("protocol", "tcp"), ("direction", "down")];
const UDP_UP: &[(&str, &str)] = &[("protocol", "udp"), ("direction", "up")];
const UDP_DOWN: &[(&str, &str)] = &[("protocol", "udp"), ("direction", "down")];
const ICMP_UP: &[(&str, &str)] = &[("protocol", "icmp"), ("direction", "up")];
const ICMP_DOWN: &[(&str, &str)] = &[("protocol", "icmp"), ("direction", "down")];
const READ: &[(&str, &str)] = &[("direction", "read")];
const TCP: (&str, &str) = ("protocol", "tcp");
const WRITE: &[(&str, &str)] = &[("direction", "write")];

/// Calls `each` with every sample, families in one run each (the exposition format wants
/// a family's samples together).
pub fn each_sample(snapshot: &Snapshot, mut each: impl FnMut(Sample)) {
    let (stats, gauges) = (snapshot.stats, snapshot.gauges);
    let (udp, tx) = (&stats.udp, &stats.tx);
    let mut sample = |family, labels, key, value| {
        each(Sample {
            family,
            labels,
            key,
            value,
        })
    };
    sample(&BYTES, TCP_UP, "tcp_bytes_up", stats.bytes_up);
    sample(&BYTES, TCP_DOWN, "tcp_bytes_down", stats.bytes_down);
    let udp_bytes_up = udp.bytes_up.saturating_sub(udp.echo_bytes_up);
    let udp_bytes_down = udp.bytes_down.saturating_sub(udp.echo_bytes_down);
    sample(&BYTES, UDP_UP, "udp_bytes_up", udp_bytes_up);
    sample(&BYTES, UDP_DOWN, "udp_bytes_down", udp_bytes_down);
    sample(&BYTES, ICMP_UP, "icmp_bytes_up", udp.echo_bytes_up);
    sample(&BYTES, ICMP_DOWN, "icmp_bytes_down", udp.echo_bytes_down);

    let udp_up = udp.datagrams_up.saturating_sub(udp.echo_datagrams_up);
    let udp_down = udp.datagrams_down.saturating_sub(udp.echo_replies);
    sample(&DATAGRAMS, UDP_UP, "udp_datagrams_up", udp_up);
    sample(&DATAGRAMS, UDP_DOWN, "udp_datagrams_down", udp_down);
    sample(
        &DATAGRAMS,
        ICMP_UP,
        "icmp_echo_requests",
        udp.echo_datagrams_up,
    );
    sample(&DATAGRAMS, ICMP_DOWN, "icmp_echo_replies", udp.echo_replies);

    sample(&TUN_PACKETS, READ, "tun_reads", stats.tun_reads);
    sample(&TUN_PACKETS, WRITE, "tun_writes", stats.tun_writes);
    sample(&TUN_BYTES, READ, "tun_read_bytes", stats.tun_read_bytes);
    sample(&TUN_BYTES, WRITE, "tun_write_bytes", stats.tun_write_bytes);
    sample(
        &TUN_SUPER_PACKETS,
        READ,
        "tun_super_packets_read",
        stats.segmented_reads,
    );
    sample(
        &TUN_SUPER_PACKETS,
        WRITE,
        "tun_super_packets_written",
        tx.segmented,
    );
    sample(
        &TUN_WRITE_ERRORS,
        &[],
        "tun_write_errors",
        stats.tun_write_errors,
    );

    let udp_opened = udp.flows_opened.saturating_sub(udp.echo_flows_opened);
    sample(
        &FLOWS_OPENED,
        &[("protocol", "tcp")],
        "tcp_flows_opened",
        stats.flows_opened,
    );
    sample(
        &FLOWS_OPENED,
        &[("protocol", "udp")],
        "udp_flows_opened",
        udp_opened,
    );
    sample(
        &FLOWS_OPENED,
        &[("protocol", "icmp")],
        "icmp_flows_opened",
        udp.echo_flows_opened,
    );
    sample(
        &FLOWS_CLOSED,
        &[("protocol", "tcp")],
        "tcp_flows_closed",
        stats.flows_closed,
    );

    for (labels, key, value) in [
        (
            &[TCP, ("cause", "connect_refused")],
            "tcp_connect_refused",
            stats.connect_refused,
        ),
        (
            &[TCP, ("cause", "connect_unreachable")],
            "tcp_connect_unreachable",
            stats.connect_unreachable,
        ),
        (
            &[TCP, ("cause", "connect_timeout")],
            "tcp_connect_timeout",
            stats.connect_timeout,
        ),
        (
            &[TCP, ("cause", "connect_other")],
            "tcp_connect_other",
            stats.connect_other,
        ),
        (
            &[TCP, ("cause", "server_reset")],
            "tcp_server_resets",
            stats.server_resets,
        ),
        (
            &[TCP, ("cause", "client_reset")],
            "tcp_client_resets",
            stats.client_resets,
        ),
        (
            &[TCP, ("cause", "half_open_evicted")],
            "tcp_half_open_evicted",
            stats.half_open_evicted,
        ),
    ] {
        sample(&FLOWS_FAILED, labels, key, value);
    }
    for (labels, key, value) in [
        (
            &[TCP, ("cause", "limit")],
            "tcp_refused_at_limit",
            stats.refused_limit,
        ),
        (
            &[TCP, ("cause", "socket_error")],
            "tcp_socket_errors",
            stats.socket_errors,
        ),
        (
            &[TCP, ("cause", "out_of_memory")],
            "tcp_out_of_memory",
            stats.memory_refusals,
        ),
    ] {
        sample(&FLOWS_REFUSED, labels, key, value);
    }

    let (expired, evicted) = (udp.flows_expired, udp.flows_evicted);
    sample(
        &DATAGRAM_FLOWS_ENDED,
        &[("cause", "expired")],
        "datagram_flows_expired",
        expired,
    );
    sample(
        &DATAGRAM_FLOWS_ENDED,
        &[("cause", "evicted")],
        "datagram_flows_evicted",
        evicted,
    );
    sample(
        &DATAGRAM_ERRORS,
        &[("op", "socket")],
        "datagram_socket_errors",
        udp.socket_errors,
    );
    sample(
        &DATAGRAM_ERRORS,
        &[("op", "send")],
        "datagram_send_errors",
        udp.send_errors,
    );
    sample(
        &DATAGRAM_ERRORS,
        &[("op", "recv")],
        "datagram_recv_errors",
        udp.recv_errors,
    );

    for (labels, key, value) in [
        (
            &[("reason", "malformed")],
            "drops_malformed",
            stats.malformed,
        ),
        (
            &[("reason", "bad_vnet_header")],
            "drops_bad_vnet_header",
            stats.bad_vnet_header,
        ),
        (
            &[("reason", "fragment")],
            "drops_fragments",
            stats.fragments,
        ),
        (
            &[("reason", "unsupported")],
            "drops_unsupported",
            stats.unsupported,
        ),
        (&[("reason", "no_flow")], "drops_no_flow", stats.no_flow),
        (
            &[("reason", "beyond_window")],
            "drops_beyond_window",
            stats.beyond_window,
        ),
        (
            &[("reason", "reply_without_buffer")],
            "drops_replies_without_buffer",
            tx.dropped_replies,
        ),
        (
            &[("reason", "datagram_no_send_slot")],
            "drops_datagram_no_send_slot",
            udp.no_send_slot,
        ),
        (
            &[("reason", "datagram_reply_without_buffer")],
            "drops_datagram_replies_without_buffer",
            udp.reply_drops,
        ),
        (
            &[("reason", "datagram_socket_full")],
            "drops_datagram_socket_full",
            udp.socket_drops,
        ),
        (
            &[("reason", "upstream_fragment")],
            "drops_upstream_fragments",
            stats.upstream.udp_fragments,
        ),
        (
            &[("reason", "upstream_malformed")],
            "drops_upstream_malformed",
            stats.upstream.udp_malformed,
        ),
        (
            &[("reason", "upstream_too_big")],
            "drops_upstream_too_big",
            stats.upstream.udp_too_big,
        ),
        (
            &[("reason", "upstream_not_held")],
            "drops_upstream_not_held",
            stats.upstream.udp_not_held,
        ),
        (
            &[("reason", "echo_through_upstream")],
            "drops_echo_through_upstream",
            stats.upstream.echo_refused,
        ),
        (
            &[("reason", "echo_no_identifier")],
            "drops_echo_no_identifier",
            udp.echo_no_ident,
        ),
    ] {
        sample(&DROPS, labels, key, value);
    }

    let upstream = &stats.upstream;
    for (labels, key, value) in [
        (
            &[("cause", "connect_failed")],
            "upstream_connect_failed",
            upstream.connect_failed,
        ),
        (
            &[("cause", "timeout")],
            "upstream_timeouts",
            upstream.timeouts,
        ),
        (&[("cause", "closed")], "upstream_closed", upstream.closed),
        (
            &[("cause", "protocol_error")],
            "upstream_protocol_errors",
            upstream.protocol_errors,
        ),
        (
            &[("cause", "no_acceptable_method")],
            "upstream_no_acceptable_method",
            upstream.no_acceptable_method,
        ),
        (
            &[("cause", "auth_rejected")],
            "upstream_auth_rejected",
            upstream.auth_rejected,
        ),
        (
            &[("cause", "general_failure")],
            "upstream_general_failure",
            upstream.general_failure,
        ),
        (
            &[("cause", "not_allowed")],
            "upstream_not_allowed",
            upstream.not_allowed,
        ),
        (
            &[("cause", "other_reply")],
            "upstream_other_reply",
            upstream.other_reply,
        ),
        (
            &[("cause", "unreachable")],
            "upstream_unreachable",
            upstream.unreachable,
        ),
    ] {
        sample(&UPSTREAM_FAILURES, labels, key, value);
    }
    sample(
        &UPSTREAM_ASSOCIATIONS,
        &[("event", "opened")],
        "upstream_associations",
        upstream.associations,
    );
    sample(
        &UPSTREAM_ASSOCIATIONS,
        &[("event", "ended")],
        "upstream_associations_ended",
        upstream.associations_ended,
    );
    for (labels, key, value) in [
        (
            &[("listener", "control"), ("event", "accepted")],
            "control_accepted",
            snapshot.control.accepted,
        ),
        (
            &[("listener", "control"), ("event", "refused")],
            "control_refused",
            snapshot.control.refused,
        ),
        (
            &[("listener", "control"), ("event", "timed_out")],
            "control_timed_out",
            snapshot.control.timed_out,
        ),
        (
            &[("listener", "control"), ("event", "evicted")],
            "control_evicted",
            snapshot.control.evicted,
        ),
        (
            &[("listener", "control"), ("event", "bad_request")],
            "control_bad_requests",
            snapshot.control.bad_requests,
        ),
        (
            &[("listener", "metrics"), ("event", "accepted")],
            "metrics_accepted",
            snapshot.metrics.accepted,
        ),
        (
            &[("listener", "metrics"), ("event", "refused")],
            "metrics_refused",
            snapshot.metrics.refused,
        ),
        (
            &[("listener", "metrics"), ("event", "timed_out")],
            "metrics_timed_out",
            snapshot.metrics.timed_out,
        ),
        (
            &[("listener", "metrics"), ("event", "evicted")],
            "metrics_evicted",
            snapshot.metrics.evicted,
        ),
        (
            &[("listener", "metrics"), ("event", "bad_request")],
            "metrics_bad_requests",
            snapshot.metrics.bad_requests,
        ),
    ] {
        sample(&CONTROL_CLIENTS, labels, key, value);
    }

    for (labels, key, value) in [
        (
            &[TCP, ("state", "connecting")],
            "tcp_flows_connecting",
            gauges.tcp_connecting,
        ),
        (&[TCP, ("state", "open")], "tcp_flows_open", gauges.tcp_open),
        (
            &[TCP, ("state", "closing")],
            "tcp_flows_closing",
            gauges.tcp_closing,
        ),
        (
            &[("protocol", "udp"), ("state", "open")],
            "udp_flows_open",
            gauges.udp_open,
        ),
        (
            &[("protocol", "icmp"), ("state", "open")],
            "icmp_flows_open",
            gauges.icmp_open,
        ),
    ] {
        sample(&OPEN_FLOWS, labels, key, value);
    }
    let tun_in_use = gauges.tun_write_buffers_in_use;
    sample(
        &TUN_WRITE_BUFFERS_IN_USE,
        &[],
        "tun_write_buffers_in_use",
        tun_in_use,
    );
    sample(
        &TUN_WRITE_BUFFERS,
        &[],
        "tun_write_buffers",
        gauges.tun_write_buffers,
    );
    let circulating = gauges.tun_read_buffers_circulating;
    sample(
        &TUN_READ_BUFFERS_CIRCULATING,
        &[],
        "tun_read_buffers_circulating",
        circulating,
    );
    sample(
        &TUN_READ_BUFFERS,
        &[],
        "tun_read_buffers",
        gauges.tun_read_buffers,
    );
    let bound = gauges.flow_buffers_resident_bound;
    sample(
        &FLOW_BUFFERS_BOUND,
        &[],
        "memory_flow_buffers_bound_bytes",
        bound,
    );
    sample(
        &MEMORY_LIMIT,
        &[],
        "memory_limit_bytes",
        gauges.memory_limit,
    );
    if let Some(resident) = gauges.resident {
        sample(&RESIDENT_MEMORY, &[], "memory_resident_bytes", resident);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashSet;

    use super::*;

    pub fn snapshot_with<R>(f: impl FnOnce(&Snapshot) -> R) -> R {
        let mut stats = Stats {
            bytes_up: 1000,
            bytes_down: 2000,
            flows_opened: 3,
            malformed: 4,
            ..Stats::default()
        };
        stats.udp.bytes_up = 500;
        stats.udp.echo_bytes_up = 64;
        stats.udp.flows_opened = 5;
        stats.udp.echo_flows_opened = 2;
        let gauges = Gauges {
            tcp_open: 2,
            resident: Some(4096),
            ..Gauges::default()
        };
        let clients = Clients {
            accepted: 7,
            ..Clients::default()
        };
        f(&Snapshot {
            stats: &stats,
            gauges: &gauges,
            control: &clients,
            metrics: &Clients::default(),
        })
    }

    pub fn samples(snapshot: &Snapshot) -> Vec<Sample> {
        let mut all = Vec::new();
        each_sample(snapshot, |sample| all.push(sample));
        all
    }

    #[test]
    fn keys_are_unique_and_families_come_in_one_run() {
        let all = snapshot_with(samples);
        let keys: HashSet<&str> = all.iter().map(|s| s.key).collect();
        assert_eq!(keys.len(), all.len(), "a key used twice");
        let mut seen = HashSet::new();
        let mut last = "";
        for sample in &all {
            if sample.family.name != last {
                assert!(
                    seen.insert(sample.family.name),
                    "{} split",
                    sample.family.name
                );
                last = sample.family.name;
            }
        }
        let label_sets: HashSet<(&str, Vec<(&str, &str)>)> = all
            .iter()
            .map(|s| (s.family.name, s.labels.to_vec()))
            .collect();
        assert_eq!(
            label_sets.len(),
            all.len(),
            "two samples with the same labels"
        );
    }

    #[test]
    fn ping_is_told_apart_from_udp() {
        let all = snapshot_with(samples);
        let value = |key: &str| all.iter().find(|s| s.key == key).unwrap().value;
        assert_eq!(value("udp_bytes_up"), 436);
        assert_eq!(value("icmp_bytes_up"), 64);
        assert_eq!(value("udp_flows_opened"), 3);
        assert_eq!(value("icmp_flows_opened"), 2);
        assert_eq!(value("control_accepted"), 7);
        assert_eq!(value("memory_resident_bytes"), 4096);
    }
}
