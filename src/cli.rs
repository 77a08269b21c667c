//! Command-line flags, parsed by argh; validation lives in `config`.

use argh::FromArgs;

/// uringproxy: a transparent TUN proxy that relays every TCP and UDP flow (and ping)
/// routed into its TUN device through ordinary kernel sockets bound to one physical
/// interface. `uringproxy demo` (as root) shows it working between two network
/// namespaces without touching the host's routing.
#[derive(FromArgs, Debug)]
pub struct Args {
    /// outbound interface that relayed connections leave through (SO_BINDTODEVICE)
    #[argh(option, short = 'i')]
    pub interface: String,

    /// name of the TUN device to create (default: uringproxy0)
    #[argh(option, default = "String::from(\"uringproxy0\")")]
    pub tun: String,

    /// address of the TUN device as CIDR, repeatable, IPv4 and/or IPv6
    /// (default: 198.18.0.1/30 and fd7a:7072:7879::1/64)
    #[argh(option)]
    pub tun_addr: Vec<String>,

    /// route new connections to this network into the TUN (policy rules, removed at
    /// exit), repeatable, IPv4 and/or IPv6; 0.0.0.0/0 and ::/0 route everything, and the
    /// host's own servers keep answering their clients directly
    #[argh(option)]
    pub route: Vec<String>,

    /// routing table for --route, also the priority of its rules; one per running
    /// proxy, 30064..=32765 (default: 30064)
    #[argh(option, default = "crate::routing::DEFAULT_TABLE")]
    pub table: u32,

    /// MTU of the TUN device (default: 1500)
    #[argh(option, default = "1500")]
    pub mtu: u32,

    /// pin the proxy's thread to this CPU core
    #[argh(option)]
    pub cpu: Option<usize>,

    /// after set-up, run as this user, keeping only CAP_NET_ADMIN and CAP_NET_RAW
    #[argh(option)]
    pub user: Option<String>,

    /// disable checksum and segmentation offload on the TUN device
    #[argh(switch)]
    pub no_offload: bool,

    /// most TCP flows relayed at once; further SYNs are answered with RST (default: 16384)
    #[argh(option, default = "16384")]
    pub max_flows: usize,

    /// most TCP flows waiting for their outbound connect; past it the oldest is reset to
    /// make room, so a SYN flood cannot lock out real clients (default: 1024)
    #[argh(option, default = "1024")]
    pub max_half_open: usize,

    /// bytes of receive and of send buffer for each relayed flow (default: 1048576)
    #[argh(option, default = "1048576")]
    pub flow_buffer: usize,

    /// seconds to wait for an outbound connect before the client gets RST (default: 10)
    #[argh(option, default = "10")]
    pub connect_timeout: u64,

    /// seconds a UDP flow may stay idle before its socket is closed (default: 60)
    #[argh(option, default = "60")]
    pub udp_timeout: u64,

    /// seconds a UDP flow to port 53 (DNS) may stay idle (default: 10)
    #[argh(option, default = "10")]
    pub dns_timeout: u64,

    /// most UDP flows at once; the longest idle is closed to make room (default: 4096)
    #[argh(option, default = "4096")]
    pub max_udp_flows: usize,
}

/// Prints what argh returned instead of arguments: help (stdout, success) or a parse
/// error (stderr, failure).
pub fn early_exit(exit: argh::EarlyExit) -> std::process::ExitCode {
    use std::io::Write;
    // A closed pipe (`--help | head`) is not worth a panic.
    match exit.status {
        Ok(()) => {
            let _ = std::io::stdout().write_all(exit.output.as_bytes());
            std::process::ExitCode::SUCCESS
        }
        Err(()) => {
            let _ = std::io::stderr().write_all(exit.output.as_bytes());
            std::process::ExitCode::FAILURE
        }
    }
}
