//! Every number the proxy reports, named once: one table gives each its Prometheus family
//! and labels (`/metrics`), its flat key (`uringproxy status` and its JSON) and its line
//! and label in the SIGUSR1 report, so the three views cannot drift apart.

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

macro_rules! lines {
    ($($variant:ident = $name:literal,)*) => {
        /// The lines of the SIGUSR1 report: what is open and held now, then the counters,
        /// `drops` last (the test harness takes it to end a report).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Line {
            $($variant,)*
        }

        impl Line {
            /// In the order they are printed.
            pub const ALL: &[Line] = &[$(Line::$variant,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $(Line::$variant => $name,)*
                }
            }
        }
    };
}

lines! {
    FlowStates = "flow states",
    TunBuffers = "tun buffers",
    Memory = "memory",
    Flows = "flows",
    Failures = "failures",
    Relayed = "relayed",
    Tun = "tun",
    Offload = "offload",
    Udp = "udp",
    Icmp = "icmp",
    Upstream = "upstream",
    Dns = "dns",
    Control = "control",
    Metrics = "metrics",
    Drops = "drops",
}

/// One number: its family and labels, its status key (unique), its SIGUSR1 line and
/// label (unique within the line), and where its value comes from.
#[derive(Debug)]
pub struct Entry {
    pub family: &'static Family,
    pub labels: &'static [(&'static str, &'static str)],
    pub key: &'static str,
    pub line: Line,
    pub label: &'static str,
    value: fn(&Snapshot) -> Option<u64>,
}

impl Entry {
    /// Its value in `snapshot`; `None` when it could not be had (the resident memory,
    /// when /proc cannot be read): the number is then left out.
    pub fn value(&self, snapshot: &Snapshot) -> Option<u64> {
        (self.value)(snapshot)
    }
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
    /// The policy rules the proxy installed, as `routing` describes them.
    pub rules: &'a [String],
}

mod families;

use families::*;

const TCP: (&str, &str) = ("protocol", "tcp");
const UDP: (&str, &str) = ("protocol", "udp");
const ICMP: (&str, &str) = ("protocol", "icmp");
const UP: (&str, &str) = ("direction", "up");
const DOWN: (&str, &str) = ("direction", "down");
const READ: &[(&str, &str)] = &[("direction", "read")];
const WRITE: &[(&str, &str)] = &[("direction", "write")];
const CONTROL: (&str, &str) = ("listener", "control");
const METRICS: (&str, &str) = ("listener", "metrics");

/// The table: `family labels, key, line label: |snapshot| value;` for each entry.
macro_rules! table {
    ($($family:ident $labels:expr, $key:literal, $line:ident $label:literal, |$s:ident| $value:expr;)*) => {
        /// Every number, a family's entries in one run (the exposition format wants a
        /// family's samples together); within a SIGUSR1 line, entries print in this order.
        pub static TABLE: &[Entry] = &[$(Entry {
            family: &$family,
            labels: $labels,
            key: $key,
            line: Line::$line,
            label: $label,
            value: |$s| $value.into(),
        }),*];
    };
}

// UDP and ping share the datagram relay, whose counts include the ping flows' share:
// UDP's own is what is left.
table! {
    FLOWS_OPENED &[TCP], "tcp_flows_opened", Flows "opened", |s| s.stats.flows_opened;
    FLOWS_OPENED &[UDP], "udp_flows_opened", Udp "flows opened",
        |s| s.stats.udp.flows_opened.saturating_sub(s.stats.udp.echo_flows_opened);
    FLOWS_OPENED &[ICMP], "icmp_flows_opened", Icmp "flows opened",
        |s| s.stats.udp.echo_flows_opened;
    FLOWS_CLOSED &[TCP], "tcp_flows_closed", Flows "closed", |s| s.stats.flows_closed;

    FLOWS_FAILED &[TCP, ("cause", "connect_refused")], "tcp_connect_refused",
        Failures "connect-refused", |s| s.stats.connect_refused;
    FLOWS_FAILED &[TCP, ("cause", "connect_unreachable")], "tcp_connect_unreachable",
        Failures "connect-unreachable", |s| s.stats.connect_unreachable;
    FLOWS_FAILED &[TCP, ("cause", "connect_timeout")], "tcp_connect_timeout",
        Failures "connect-timeout", |s| s.stats.connect_timeout;
    FLOWS_FAILED &[TCP, ("cause", "connect_other")], "tcp_connect_other",
        Failures "connect-other", |s| s.stats.connect_other;
    FLOWS_FAILED &[TCP, ("cause", "server_reset")], "tcp_server_resets",
        Failures "server-reset", |s| s.stats.server_resets;
    FLOWS_FAILED &[TCP, ("cause", "client_reset")], "tcp_client_resets",
        Failures "client-reset", |s| s.stats.client_resets;
    FLOWS_FAILED &[TCP, ("cause", "half_open_evicted")], "tcp_half_open_evicted",
        Flows "half-open-evicted", |s| s.stats.half_open_evicted;
    FLOWS_REFUSED &[TCP, ("cause", "limit")], "tcp_refused_at_limit",
        Flows "refused-at-limit", |s| s.stats.refused_limit;
    FLOWS_REFUSED &[TCP, ("cause", "socket_error")], "tcp_socket_errors",
        Flows "socket-errors", |s| s.stats.socket_errors;
    FLOWS_REFUSED &[TCP, ("cause", "out_of_memory")], "tcp_out_of_memory",
        Flows "out-of-memory", |s| s.stats.memory_refusals;

    DATAGRAM_FLOWS_ENDED &[("cause", "expired")], "datagram_flows_expired",
        Udp "expired", |s| s.stats.udp.flows_expired;
    DATAGRAM_FLOWS_ENDED &[("cause", "evicted")], "datagram_flows_evicted",
        Udp "evicted", |s| s.stats.udp.flows_evicted;

    BYTES &[TCP, UP], "tcp_bytes_up", Relayed "bytes-up", |s| s.stats.bytes_up;
    BYTES &[TCP, DOWN], "tcp_bytes_down", Relayed "bytes-down", |s| s.stats.bytes_down;
    BYTES &[UDP, UP], "udp_bytes_up", Udp "bytes-up",
        |s| s.stats.udp.bytes_up.saturating_sub(s.stats.udp.echo_bytes_up);
    BYTES &[UDP, DOWN], "udp_bytes_down", Udp "bytes-down",
        |s| s.stats.udp.bytes_down.saturating_sub(s.stats.udp.echo_bytes_down);
    BYTES &[ICMP, UP], "icmp_bytes_up", Icmp "bytes-up", |s| s.stats.udp.echo_bytes_up;
    BYTES &[ICMP, DOWN], "icmp_bytes_down", Icmp "bytes-down", |s| s.stats.udp.echo_bytes_down;
    DATAGRAMS &[UDP, UP], "udp_datagrams_up", Udp "datagrams-up",
        |s| s.stats.udp.datagrams_up.saturating_sub(s.stats.udp.echo_datagrams_up);
    DATAGRAMS &[UDP, DOWN], "udp_datagrams_down", Udp "datagrams-down",
        |s| s.stats.udp.datagrams_down.saturating_sub(s.stats.udp.echo_replies);
    DATAGRAMS &[ICMP, UP], "icmp_echo_requests", Icmp "echo-requests",
        |s| s.stats.udp.echo_datagrams_up;
    DATAGRAMS &[ICMP, DOWN], "icmp_echo_replies", Icmp "echo-replies", |s| s.stats.udp.echo_replies;
    UDP_SUPER_SENDS &[], "udp_super_sends_up", Udp "super-sends-up",
        |s| s.stats.udp.super_sends_up;
    UDP_SUPER_SEND_SEGMENTS &[], "udp_super_send_segments_up", Udp "super-send-segments-up",
        |s| s.stats.udp.super_send_segments_up;
    UDP_GSO_FALLBACKS &[], "udp_gso_fallbacks", Udp "gso-fallbacks",
        |s| s.stats.udp.gso_fallbacks;
    DATAGRAM_ERRORS &[("op", "socket")], "datagram_socket_errors", Udp "socket-errors",
        |s| s.stats.udp.socket_errors;
    DATAGRAM_ERRORS &[("op", "send")], "datagram_send_errors", Udp "send-errors",
        |s| s.stats.udp.send_errors;
    DATAGRAM_ERRORS &[("op", "recv")], "datagram_recv_errors", Udp "recv-errors",
        |s| s.stats.udp.recv_errors;

    TUN_PACKETS READ, "tun_reads", Tun "reads", |s| s.stats.tun_reads;
    TUN_PACKETS WRITE, "tun_writes", Tun "writes", |s| s.stats.tun_writes;
    TUN_BYTES READ, "tun_read_bytes", Tun "read-bytes", |s| s.stats.tun_read_bytes;
    TUN_BYTES WRITE, "tun_write_bytes", Tun "write-bytes", |s| s.stats.tun_write_bytes;
    TUN_WRITE_ERRORS &[], "tun_write_errors", Tun "write-errors", |s| s.stats.tun_write_errors;
    TUN_SUPER_PACKETS READ, "tun_super_packets_read", Offload "super-packets in",
        |s| s.stats.segmented_reads;
    TUN_SUPER_PACKETS WRITE, "tun_super_packets_written", Offload "out", |s| s.stats.tx.segmented;
    TUN_SUPER_PACKET_BYTES READ, "tun_super_packet_bytes_read", Offload "bytes-in",
        |s| s.stats.segmented_read_bytes;
    TUN_SUPER_PACKET_BYTES WRITE, "tun_super_packet_bytes_written", Offload "bytes-out",
        |s| s.stats.tx.segmented_bytes;
    UDP_SUPER_PACKETS &[DOWN], "udp_super_packets_down", Offload "udp-super-packets-out",
        |s| s.stats.udp.super_packets_down;
    UDP_SUPER_PACKET_DATAGRAMS &[DOWN], "udp_super_packet_datagrams_down",
        Offload "udp-datagrams-in-super-packets-out", |s| s.stats.udp.super_packet_datagrams_down;
    UDP_GATHERED_WRITES &[DOWN], "udp_gathered_writes_down", Offload "udp-gathered-out",
        |s| s.stats.udp.gathered_down;
    UDP_COALESCED_RECEIVES &[], "udp_coalesced_receives", Offload "udp-coalesced-receives",
        |s| s.stats.udp.coalesced_receives;
    UDP_PER_DATAGRAM_FALLBACKS &[DOWN], "udp_per_datagram_fallbacks_down",
        Offload "udp-per-datagram-fallbacks-out", |s| s.stats.udp.per_datagram_fallbacks;

    UPSTREAM_FAILURES &[("cause", "connect_failed")], "upstream_connect_failed",
        Upstream "connect-failed", |s| s.stats.upstream.connect_failed;
    UPSTREAM_FAILURES &[("cause", "timeout")], "upstream_timeouts", Upstream "timeout",
        |s| s.stats.upstream.timeouts;
    UPSTREAM_FAILURES &[("cause", "closed")], "upstream_closed", Upstream "closed",
        |s| s.stats.upstream.closed;
    UPSTREAM_FAILURES &[("cause", "protocol_error")], "upstream_protocol_errors",
        Upstream "protocol-error", |s| s.stats.upstream.protocol_errors;
    UPSTREAM_FAILURES &[("cause", "no_acceptable_method")], "upstream_no_acceptable_method",
        Upstream "no-acceptable-method", |s| s.stats.upstream.no_acceptable_method;
    UPSTREAM_FAILURES &[("cause", "auth_rejected")], "upstream_auth_rejected",
        Upstream "auth-rejected", |s| s.stats.upstream.auth_rejected;
    UPSTREAM_FAILURES &[("cause", "general_failure")], "upstream_general_failure",
        Upstream "general-failure", |s| s.stats.upstream.general_failure;
    UPSTREAM_FAILURES &[("cause", "not_allowed")], "upstream_not_allowed",
        Upstream "not-allowed", |s| s.stats.upstream.not_allowed;
    UPSTREAM_FAILURES &[("cause", "other_reply")], "upstream_other_reply",
        Upstream "other-reply", |s| s.stats.upstream.other_reply;
    UPSTREAM_FAILURES &[("cause", "unreachable")], "upstream_unreachable",
        Upstream "unreachable", |s| s.stats.upstream.unreachable;
    UPSTREAM_ASSOCIATIONS &[("event", "opened")], "upstream_associations",
        Upstream "udp associations", |s| s.stats.upstream.associations;
    UPSTREAM_ASSOCIATIONS &[("event", "ended")], "upstream_associations_ended",
        Upstream "ended", |s| s.stats.upstream.associations_ended;

    DROPS &[("reason", "malformed")], "drops_malformed", Drops "malformed",
        |s| s.stats.malformed;
    DROPS &[("reason", "bad_vnet_header")], "drops_bad_vnet_header", Drops "bad-vnet-header",
        |s| s.stats.bad_vnet_header;
    DROPS &[("reason", "fragment")], "drops_fragments", Drops "fragments",
        |s| s.stats.fragments;
    DROPS &[("reason", "unsupported")], "drops_unsupported", Drops "unsupported",
        |s| s.stats.unsupported;
    DROPS &[("reason", "no_flow")], "drops_no_flow", Drops "no-flow", |s| s.stats.no_flow;
    DROPS &[("reason", "beyond_window")], "drops_beyond_window", Drops "beyond-window",
        |s| s.stats.beyond_window;
    DROPS &[("reason", "reply_without_buffer")], "drops_replies_without_buffer",
        Drops "replies-without-buffer", |s| s.stats.tx.dropped_replies;
    DROPS &[("reason", "datagram_no_send_slot")], "drops_datagram_no_send_slot",
        Drops "udp-no-send-slot", |s| s.stats.udp.no_send_slot;
    DROPS &[("reason", "datagram_reply_without_buffer")], "drops_datagram_replies_without_buffer",
        Drops "udp-replies-without-buffer", |s| s.stats.udp.reply_drops;
    DROPS &[("reason", "datagram_socket_full")], "drops_datagram_socket_full",
        Udp "socket-drops", |s| s.stats.udp.socket_drops;
    DROPS &[("reason", "upstream_fragment")], "drops_upstream_fragments",
        Upstream "fragments", |s| s.stats.upstream.udp_fragments;
    DROPS &[("reason", "upstream_malformed")], "drops_upstream_malformed",
        Upstream "malformed", |s| s.stats.upstream.udp_malformed;
    DROPS &[("reason", "upstream_too_big")], "drops_upstream_too_big",
        Upstream "too-big", |s| s.stats.upstream.udp_too_big;
    DROPS &[("reason", "upstream_not_held")], "drops_upstream_not_held",
        Upstream "not-held", |s| s.stats.upstream.udp_not_held;
    DROPS &[("reason", "echo_through_upstream")], "drops_echo_through_upstream",
        Upstream "echo-refused", |s| s.stats.upstream.echo_refused;
    DROPS &[("reason", "echo_no_identifier")], "drops_echo_no_identifier",
        Drops "echo-no-ident", |s| s.stats.udp.echo_no_ident;

    DROPS &[("reason", "dns_reply_without_buffer")], "drops_dns_replies_without_buffer",
        Dns "replies-without-buffer", |s| s.stats.dns.reply_drops;

    DROPS &[("reason", "dns_forward_busy")], "drops_dns_forward_busy",
        Dns "forward-busy", |s| s.stats.dns.forward_busy;
    DROPS &[("reason", "dns_forward_failed")], "drops_dns_forward_failed",
        Dns "forward-failed", |s| s.stats.dns.forward_failed;

    DROPS &[("reason", "dns_tcp_refused")], "drops_dns_tcp_refused",
        Dns "tcp-refused", |s| s.stats.dns.tcp_refused;
    DROPS &[("reason", "dns_tcp_malformed")], "drops_dns_tcp_malformed",
        Dns "tcp-malformed", |s| s.stats.dns.tcp_malformed;
    DROPS &[("reason", "dns_tcp_overflow")], "drops_dns_tcp_overflow",
        Dns "tcp-overflow", |s| s.stats.dns.tcp_overflow;

    DNS_QUERIES &[("type", "a")], "dns_queries_a", Dns "a", |s| s.stats.dns.resolver.a;
    DNS_QUERIES &[("type", "aaaa")], "dns_queries_aaaa", Dns "aaaa",
        |s| s.stats.dns.resolver.aaaa;
    DNS_QUERIES &[("type", "https_svcb")], "dns_queries_https_svcb", Dns "https-svcb",
        |s| s.stats.dns.resolver.https_svcb;
    DNS_QUERIES &[("type", "ptr")], "dns_queries_ptr", Dns "ptr",
        |s| s.stats.dns.resolver.ptr;
    DNS_QUERIES &[("type", "other")], "dns_queries_other", Dns "other",
        |s| s.stats.dns.resolver.other;
    DNS_RESULTS &[("result", "answered")], "dns_answered", Dns "answered",
        |s| s.stats.dns.resolver.answered;
    DNS_RESULTS &[("result", "forwarded")], "dns_forwarded", Dns "forwarded",
        |s| s.stats.dns.resolver.forwarded;
    DNS_RESULTS &[("result", "refused")], "dns_refused", Dns "refused",
        |s| s.stats.dns.resolver.refused;
    DNS_RESULTS &[("result", "formerr")], "dns_formerr", Dns "formerr",
        |s| s.stats.dns.resolver.formerr;
    DNS_RESULTS &[("result", "servfail")], "dns_servfail", Dns "servfail",
        |s| s.stats.dns.resolver.servfail;
    DNS_RESULTS &[("result", "dropped")], "dns_dropped", Dns "dropped",
        |s| s.stats.dns.resolver.dropped;
    DNS_RESULTS &[("result", "aaaa_without_range")], "dns_aaaa_without_range",
        Dns "aaaa-without-range", |s| s.stats.dns.resolver.aaaa_without_range;
    FAKE_UNMAPPED &[TCP], "fake_unmapped_tcp", Dns "unmapped-tcp",
        |s| s.stats.dns.unmapped_tcp;
    FAKE_UNMAPPED &[UDP], "fake_unmapped_udp", Dns "unmapped-udp",
        |s| s.stats.dns.unmapped_udp;
    FAKE_EVICTIONS &[], "fake_evictions", Dns "evictions",
        |s| s.stats.dns.resolver.evictions;
    DNS_TCP_EVICTIONS &[], "dns_tcp_evicted", Dns "tcp-evicted",
        |s| s.stats.dns.tcp_evicted;

    CONTROL_CLIENTS &[CONTROL, ("event", "accepted")], "control_accepted",
        Control "accepted", |s| s.control.accepted;
    CONTROL_CLIENTS &[CONTROL, ("event", "refused")], "control_refused",
        Control "refused", |s| s.control.refused;
    CONTROL_CLIENTS &[CONTROL, ("event", "timed_out")], "control_timed_out",
        Control "timed-out", |s| s.control.timed_out;
    CONTROL_CLIENTS &[CONTROL, ("event", "evicted")], "control_evicted",
        Control "evicted", |s| s.control.evicted;
    CONTROL_CLIENTS &[CONTROL, ("event", "bad_request")], "control_bad_requests",
        Control "bad-requests", |s| s.control.bad_requests;
    CONTROL_CLIENTS &[METRICS, ("event", "accepted")], "metrics_accepted",
        Metrics "accepted", |s| s.metrics.accepted;
    CONTROL_CLIENTS &[METRICS, ("event", "refused")], "metrics_refused",
        Metrics "refused", |s| s.metrics.refused;
    CONTROL_CLIENTS &[METRICS, ("event", "timed_out")], "metrics_timed_out",
        Metrics "timed-out", |s| s.metrics.timed_out;
    CONTROL_CLIENTS &[METRICS, ("event", "evicted")], "metrics_evicted",
        Metrics "evicted", |s| s.metrics.evicted;
    CONTROL_CLIENTS &[METRICS, ("event", "bad_request")], "metrics_bad_requests",
        Metrics "bad-requests", |s| s.metrics.bad_requests;

    OPEN_FLOWS &[TCP, ("state", "connecting")], "tcp_flows_connecting",
        FlowStates "connecting", |s| s.gauges.tcp_connecting;
    OPEN_FLOWS &[TCP, ("state", "open")], "tcp_flows_open", FlowStates "open",
        |s| s.gauges.tcp_open;
    OPEN_FLOWS &[TCP, ("state", "closing")], "tcp_flows_closing", FlowStates "closing",
        |s| s.gauges.tcp_closing;
    OPEN_FLOWS &[UDP, ("state", "open")], "udp_flows_open", FlowStates "udp",
        |s| s.gauges.udp_open;
    OPEN_FLOWS &[ICMP, ("state", "open")], "icmp_flows_open", FlowStates "icmp",
        |s| s.gauges.icmp_open;
    TUN_WRITE_BUFFERS_IN_USE &[], "tun_write_buffers_in_use", TunBuffers "write-in-use",
        |s| s.gauges.tun_write_buffers_in_use;
    TUN_WRITE_BUFFERS &[], "tun_write_buffers", TunBuffers "write",
        |s| s.gauges.tun_write_buffers;
    TUN_READ_BUFFERS_CIRCULATING &[], "tun_read_buffers_circulating",
        TunBuffers "read-circulating", |s| s.gauges.tun_read_buffers_circulating;
    TUN_READ_BUFFERS &[], "tun_read_buffers", TunBuffers "read", |s| s.gauges.tun_read_buffers;
    FLOW_BUFFERS_BOUND &[], "memory_flow_buffers_bound_bytes", Memory "flow-buffers-bound-bytes",
        |s| s.gauges.flow_buffers_resident_bound;
    MEMORY_LIMIT &[], "memory_limit_bytes", Memory "limit-bytes", |s| s.gauges.memory_limit;
    RESIDENT_MEMORY &[], "memory_resident_bytes", Memory "resident-bytes", |s| s.gauges.resident;
    FAKE_ENTRIES &[], "fake_entries", Dns "entries", |s| s.stats.dns.resolver.table_size;
}

/// Every entry with its value in `snapshot`, in table order.
pub fn samples<'a>(snapshot: &'a Snapshot<'a>) -> impl Iterator<Item = (&'static Entry, u64)> + 'a {
    TABLE
        .iter()
        .filter_map(|entry| Some((entry, entry.value(snapshot)?)))
}

#[cfg(test)]
pub(crate) mod tests;
