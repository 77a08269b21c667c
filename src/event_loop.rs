//! The single-threaded event loop: TUN packets and outbound socket I/O all complete on
//! one io_uring ring; each turn drains completions, runs smoltcp for the flows that have
//! work, queues the resulting writes and sleeps until the next completion or timer.
#![allow(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::time::Duration;

use io_uring::{opcode, squeue, types};
use log::{debug, info, warn};
use nix::libc;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use slab::Slab;
use smoltcp::iface::{Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::Instant;
use smoltcp::wire::{IpAddress, IpEndpoint, IpListenEndpoint};
use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};

use crate::config::Config;
use crate::error::Error;
use crate::relay::datagram::{Datagram, DatagramRelay};
use crate::relay::{Failure, Phase, Relay, Teardown};
use crate::stack::device::MAX_SEGMENTATION_PACKET;
use crate::stack::unreachable::{self, Quote, Reason};
use crate::stack::{self, FlowKey, Interfaces, Parsed, StackDevice, TxPool};
use crate::stats::Stats;
use crate::sys::{self, Mapping};
use crate::tun::{Tun, vnet};
use crate::uring::{self, BufRing, Completion, Features, Op, Ring, Token};

/// TUN read buffers (kernel-provided ring); each holds one packet, up to 64 KiB with
/// segmentation offload.
const TUN_READ_BUFFERS: u16 = 512;
const TUN_READ_BUFFERS_TSO: u16 = 256;
/// Buffer group id of the TUN read buffers.
const TUN_READ_GROUP: u16 = 0;
/// Most single-shot TUN reads kept in flight where the kernel has no multishot read
/// (before 6.7): each delivers one packet, so this bounds the packets taken per turn.
const TUN_SINGLE_READS: u16 = 64;
/// TUN write buffers; when all are in flight smoltcp holds data back.
const TUN_WRITE_BUFFERS: u16 = 1024;
const TUN_WRITE_BUFFERS_TSO: u16 = 256;
/// Completions handled per turn before smoltcp runs and writes go out.
const MAX_COMPLETIONS_PER_TURN: usize = 1024;
/// Packets one flow may emit per turn, so one bulk flow cannot starve the rest.
const EGRESS_BUDGET: usize = 256;
/// Timers fired per turn.
const MAX_TIMERS_PER_TURN: usize = 1024;
/// Once this many TCP flows have closed since the most that were open, freed flow memory
/// goes back to the kernel: glibc keeps the freed heap (each flow's state and smoltcp
/// socket, ~2.7 KiB) mapped, and 10,000 closed flows left RSS 27 MiB above idle.
const TRIM_AFTER_CLOSED_FLOWS: usize = 1024;
/// How often idle datagram flows are looked for and a heap trim is considered.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// Bytes of server data staged per flow between a recv and the smoltcp send buffer.
const STAGING_BYTES: usize = 128 * 1024;
/// Idle time before either side of a flow is probed for liveness, the probe interval,
/// and (smoltcp side) how long a silent client is tolerated: a client or server that
/// vanished without FIN or RST is detected in about three minutes instead of never.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_PROBES: u32 = 6;
const CLIENT_SILENCE_LIMIT: Duration = Duration::from_secs(180);
/// Routing table and rule priority of `--route`: numbers unlikely to be in use already.
const ROUTE_TABLE: u32 = 0x7570;
const ROUTE_PRIORITY: u32 = 0x7570;
/// How long a server may leave bytes of a finished client unacknowledged.
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long into smoltcp's 10 s TIME-WAIT egress (ACKs) keeps running; past it egress
/// stops so smoltcp's close timer cannot clear bytes still owed to the server.
const TIME_WAIT_EGRESS: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(9);
/// How long SIGINT/SIGTERM may take to reset every flow before the process exits.
const SHUTDOWN_LIMIT: Duration = Duration::from_millis(800);
/// Size of `struct signalfd_siginfo`.
const SIGINFO_LEN: usize = 128;
/// Shortest time between two warnings about the same resource running out.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// How often counters are logged at debug level.
const STATS_INTERVAL: Duration = Duration::from_secs(10);

/// Sets up the TUN, the ring and the stack, then runs until a fatal error.
pub fn run(config: Config) -> Result<(), Error> {
    // The ring first: a kernel that cannot run the proxy is refused before anything
    // (TUN, rules) has been created.
    let ring = Ring::new().map_err(Error::from_ring_setup)?;
    let features = Features::probe(ring.inner(), config.uring_cap).map_err(Error::Kernel)?;
    check_bind_permission(&config.interface)?;
    let tun = Tun::create(&config, config.offload_cap)?;
    // Held for the whole run: dropping it (normal exit, error, panic) removes the rules.
    let _routes = if config.routes.is_empty() {
        None
    } else {
        let index = crate::sys::interface_index(tun.name())
            .ok_or_else(|| Error::Io("look up the new TUN", std::io::ErrorKind::NotFound.into()))?;
        Some(
            crate::sys::netlink::Routes::install(
                &config.routes,
                index,
                ROUTE_TABLE,
                ROUTE_PRIORITY,
            )
            .map_err(|err| Error::from_io("install --route rules", err))?,
        )
    };
    if let Some(cpu) = config.cpu {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu)
            .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set))
            .map_err(|err| Error::Io("pin to --cpu", err.into()))?;
    }
    // Each flow holds one outbound socket; leave room for the ring, TUN and stdio.
    let fd_limit =
        crate::sys::raise_fd_limit((config.max_flows + config.udp.max_flows) as u64 + 64);
    // Signals arrive through the ring like any other event: block them for the thread
    // and read them from a signalfd.
    let mut mask = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGUSR1] {
        mask.add(signal);
    }
    mask.thread_block()
        .map_err(|err| Error::Io("block signals", err.into()))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC)
        .map_err(|err| Error::Io("create signalfd", err.into()))?;
    let mut proxy = Proxy::new(config, tun, signals, ring, features)?;
    // Everything that needs root is done: the TUN, the rules, the ring, the fd limit.
    if let Some(user) = &proxy.config.user {
        crate::sys::drop_privileges(user)
            .map_err(|err| Error::Io("drop privileges (--user)", err))?;
        info!(
            "running as {} with CAP_NET_ADMIN and CAP_NET_RAW only",
            user.name
        );
    }
    info!("TUN offload: {}", proxy.tun.offload());
    if features.read_multishot {
        info!("io_uring: multishot TUN reads");
    } else {
        info!(
            "io_uring: multishot reads unavailable (kernel {}), using {} single reads",
            crate::uring::features::release(),
            proxy.tun_read_depth.limit
        );
    }
    info!(
        "relaying from {} ({}) via {}, mtu {}, up to {} TCP flows (fd limit {})",
        proxy.tun.name(),
        proxy
            .config
            .tun_addrs
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        proxy.config.interface,
        proxy.config.mtu,
        proxy.config.max_flows,
        fd_limit
    );
    proxy.run()
}

/// SO_BINDTODEVICE needs CAP_NET_RAW: find out at start-up, not on the first flow.
fn check_bind_permission(interface: &str) -> Result<(), Error> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|err| Error::Io("create a TCP socket", err))?;
    socket
        .bind_device(Some(interface.as_bytes()))
        .map_err(|err| Error::from_io("bind sockets to the interface (SO_BINDTODEVICE)", err))
}

/// One relayed TCP connection. Boxed in the slab so the buffers and the address that
/// in-flight operations point into never move.
struct Flow {
    key: FlowKey,
    generation: u32,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    /// `None` once the close has been submitted.
    outbound: Option<Socket>,
    /// Read by the kernel when the connect is submitted.
    server_addr: SockAddr,
    /// The client's SYN, quoted in the ICMP error if the server proves unreachable.
    syn: Quote,
    /// Largest TCP payload per packet towards the client (its MSS, capped by our MTU);
    /// the kernel segments bigger IPv6 writes to this.
    segment_size: u16,
    relay: Relay,
    /// Backs the socket buffers and the relay's staging buffer; declared after both so
    /// it is unmapped only once they are gone.
    _memory: Mapping,
    /// Already on the work list for this turn.
    queued: bool,
    /// Waiting for a TUN write buffer.
    starved: bool,
    /// The live entry of this flow in the timer heap, if any.
    timer_at: Option<Instant>,
    teardown_started: bool,
    /// TCP_USER_TIMEOUT was set because the client finished with bytes still owed.
    orphaned: bool,
    /// When smoltcp's socket entered TIME-WAIT.
    time_wait_since: Option<Instant>,
    /// Still waiting for the outbound connect, and counted in `half_open_count`.
    half_open: bool,
}

impl Flow {
    fn fd(&self) -> types::Fd {
        types::Fd(self.outbound.as_ref().map_or(-1, |s| s.as_raw_fd()))
    }
}

struct Proxy {
    /// Declared first so it is dropped first: it points into the buffers below.
    ring: Ring,
    tun_reads: BufRing,
    tx: TxPool,
    tun: Tun,
    ifaces: Interfaces,
    flows: Slab<Box<Flow>>,
    by_key: HashMap<FlowKey, usize>,
    /// Most TCP flows open at once since the heap was last trimmed.
    flows_high_water: usize,
    /// The last housekeeping trimmed: trim once more for flows that closed since, so
    /// the tail of a mass closure that straddled it is not kept.
    trim_follow_up: bool,
    /// Packets for no known flow go through an empty set: smoltcp answers with RST.
    no_flow: SocketSet<'static>,
    datagrams: DatagramRelay,
    next_housekeeping: std::time::Instant,
    work: Vec<usize>,
    starved: Vec<usize>,
    /// Flows in the order they started connecting, for evicting the oldest; entries of
    /// flows that have connected since are skipped (and pruned).
    half_open: std::collections::VecDeque<(usize, u32)>,
    half_open_count: usize,
    timers: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    completions: Vec<Completion>,
    next_generation: u32,
    /// The kernel copies it when a connect's linked timeout is submitted.
    connect_timeout: Box<types::Timespec>,
    features: Features,
    tun_read_depth: ReadDepth,
    signals: SignalFd,
    /// One `signalfd_siginfo`, filled by the pending signal read.
    signal_info: Box<[u8; SIGINFO_LEN]>,
    signal_armed: bool,
    /// Set by SIGINT/SIGTERM: the loop ends after this turn.
    stop: bool,
    /// Set when the TUN itself fails; the loop ends with it.
    fatal: Option<Error>,
    stats: Stats,
    epoch: std::time::Instant,
    last_stats: std::time::Instant,
    /// When running out of sockets was last logged.
    last_socket_warning: Option<std::time::Instant>,
    config: Config,
}

impl Proxy {
    fn new(
        config: Config,
        tun: Tun,
        signals: SignalFd,
        ring: Ring,
        features: Features,
    ) -> Result<Proxy, Error> {
        let mtu = config.mtu as usize;
        let offload = tun.offload();
        let header = if offload.vnet_header() { vnet::LEN } else { 0 };
        let (read_buffers, write_buffers, max_packet) = if offload.tso() {
            (
                TUN_READ_BUFFERS_TSO,
                TUN_WRITE_BUFFERS_TSO,
                MAX_SEGMENTATION_PACKET,
            )
        } else {
            (TUN_READ_BUFFERS, TUN_WRITE_BUFFERS, mtu)
        };
        let tun_reads = BufRing::new(
            ring.inner(),
            TUN_READ_GROUP,
            read_buffers,
            header + max_packet,
        )
        .map_err(|err| Error::Io("register TUN read buffers", err))?;
        let mut tx = TxPool::new(write_buffers, mtu, offload);
        let datagrams = DatagramRelay::new(&ring, config.udp.clone(), config.interface.clone())
            .map_err(|err| Error::Io("set up UDP buffers", err))?;
        let epoch = std::time::Instant::now();
        let ifaces = Interfaces::new(&mut tx, Instant::ZERO, random_seed());
        Ok(Proxy {
            ring,
            tun_reads,
            tx,
            tun,
            ifaces,
            flows: Slab::new(),
            by_key: HashMap::new(),
            flows_high_water: 0,
            trim_follow_up: false,
            no_flow: SocketSet::new(Vec::new()),
            datagrams,
            next_housekeeping: std::time::Instant::now(),
            work: Vec::new(),
            starved: Vec::new(),
            half_open: std::collections::VecDeque::new(),
            half_open_count: 0,
            timers: BinaryHeap::new(),
            completions: Vec::with_capacity(MAX_COMPLETIONS_PER_TURN),
            next_generation: 0,
            connect_timeout: Box::new(types::Timespec::from(config.connect_timeout)),
            features,
            tun_read_depth: ReadDepth::new(if features.read_multishot {
                1
            } else {
                TUN_SINGLE_READS.min(read_buffers)
            }),
            signals,
            signal_info: Box::new([0; SIGINFO_LEN]),
            signal_armed: false,
            stop: false,
            fatal: None,
            stats: Stats::default(),
            epoch,
            last_stats: epoch,
            last_socket_warning: None,
            config,
        })
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn run(&mut self) -> Result<(), Error> {
        loop {
            self.arm_tun_reads();
            if !self.signal_armed {
                self.arm_signal_read();
            }
            self.flush_tun_writes();
            let timeout = self.next_timeout();
            self.ring
                .submit_and_wait(timeout)
                .map_err(|err| Error::Io("io_uring_enter", err))?;

            let mut completions = std::mem::take(&mut self.completions);
            self.ring.drain(&mut completions, MAX_COMPLETIONS_PER_TURN);
            for completion in &completions {
                self.on_completion(*completion);
            }
            self.completions = completions;
            self.tun_reads.publish();
            if let Some(err) = self.fatal.take() {
                return Err(err);
            }
            if self.stop {
                self.shut_down();
                return Ok(());
            }

            self.fire_timers();
            self.housekeeping();
            self.service_work();
            self.compact_timers();
            self.log_stats();
        }
    }

    /// Keeps the TUN reads armed: re-arms a multishot read that ended (ENOBUFS) and
    /// replaces each completed single read.
    fn arm_tun_reads(&mut self) {
        let fd = types::Fd(self.tun.as_raw_fd());
        let group = self.tun_reads.group();
        for _ in 0..self.tun_read_depth.arm_now() {
            let read = if self.features.read_multishot {
                opcode::ReadMulti::new(fd, 0, group).build()
            } else {
                let len = u32::try_from(self.tun_reads.buf_size()).unwrap_or(u32::MAX);
                opcode::Read::new(fd, std::ptr::null_mut(), len)
                    .buf_group(group)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT)
            };
            let read = read.user_data(Token::new(Op::TunRead, 0, 0).encode());
            // SAFETY: the read only uses buffers of the registered ring, which lives as
            // long as the ring.
            unsafe { self.ring.push(&[read]) };
        }
    }

    fn arm_signal_read(&mut self) {
        let read = opcode::Read::new(
            types::Fd(self.signals.as_raw_fd()),
            self.signal_info.as_mut_ptr(),
            SIGINFO_LEN as u32,
        )
        .build()
        .user_data(Token::new(Op::Signal, 0, 0).encode());
        // SAFETY: the boxed buffer lives as long as the proxy and only this read uses it.
        unsafe { self.ring.push(&[read]) };
        self.signal_armed = true;
    }

    fn on_signal(&mut self, result: i32) {
        self.signal_armed = false;
        if result != SIGINFO_LEN as i32 {
            return;
        }
        let signo = u32::from_ne_bytes([
            self.signal_info[0],
            self.signal_info[1],
            self.signal_info[2],
            self.signal_info[3],
        ]) as i32;
        match Signal::try_from(signo) {
            Ok(Signal::SIGUSR1) => self.print_stats(),
            Ok(signal) => {
                info!("{signal}: resetting {} flows and exiting", self.flows.len());
                self.stop = true;
            }
            Err(_) => {}
        }
    }

    /// Resets every flow (RST to the client and to the server), sends what that
    /// produces to the TUN, and prints the counters.
    fn shut_down(&mut self) {
        for (_, flow) in &mut self.flows {
            if let Some(socket) = &flow.outbound {
                let _ = socket.set_linger(Some(Duration::ZERO));
            }
            flow.sockets.get_mut::<tcp::Socket>(flow.handle).abort();
        }
        // More RSTs may be owed than there are TUN write buffers: send in rounds, reaping
        // write completions in between, until every reset is out or time is up.
        let deadline = std::time::Instant::now() + SHUTDOWN_LIMIT;
        let mut completions = std::mem::take(&mut self.completions);
        while std::time::Instant::now() < deadline {
            let now = self.now();
            let mut owed = false;
            for (_, flow) in &mut self.flows {
                let iface = self.ifaces.serving(&flow.key.server.addr);
                let mut device = StackDevice::egress(&mut self.tx);
                iface.poll_egress(now, &mut device, &mut flow.sockets);
                owed |= iface.poll_at(now, &flow.sockets).is_some();
            }
            self.tx.take_exhausted();
            self.flush_tun_writes();
            let _ = self.ring.submit_and_wait(Some(Duration::from_millis(10)));
            self.ring.drain(&mut completions, MAX_COMPLETIONS_PER_TURN);
            for completion in &completions {
                if let Some(token) = Token::decode(completion.user_data)
                    && token.op == Op::TunWrite
                {
                    self.tx.release(token.key as u16);
                }
            }
            if !owed {
                break;
            }
        }
        self.completions = completions;
        self.print_stats();
    }

    fn print_stats(&mut self) {
        self.stats.tx = self.tx.counters.clone();
        self.stats.udp = self.datagrams.counters.clone();
        let (mut connecting, mut open, mut closing) = (0, 0, 0);
        for (_, flow) in &self.flows {
            match flow.relay.phase() {
                Phase::Connecting => connecting += 1,
                Phase::Open => open += 1,
                Phase::Closing(_) => closing += 1,
            }
        }
        info!(
            "active flows {}, TUN offload {}",
            self.flows.len(),
            self.tun.offload()
        );
        info!(
            "flow states: connecting {connecting} open {open} closing {closing}; udp/ping flows {}",
            self.datagrams.active()
        );
        for line in self.stats.to_string().lines() {
            info!("{line}");
        }
    }

    fn flush_tun_writes(&mut self) {
        let fd = types::Fd(self.tun.as_raw_fd());
        let ring = &mut self.ring;
        self.tx.take_ready(|index, packet| {
            let write = opcode::Write::new(fd, packet.as_ptr(), packet.len() as u32)
                .build()
                .user_data(Token::new(Op::TunWrite, 0, usize::from(index)).encode());
            // SAFETY: the buffer stays in the pool, unused, until this write's completion
            // releases it (`on_completion`, Op::TunWrite).
            unsafe { ring.push(&[write]) };
        });
    }

    fn next_timeout(&self) -> Option<Duration> {
        if !self.work.is_empty() {
            return Some(Duration::ZERO);
        }
        // Idle datagram flows must expire, and a pending heap trim must not wait for
        // traffic that may never come.
        let trim_due = self.trim_due();
        let housekeeping = (self.datagrams.active() > 0 || trim_due).then(|| {
            self.next_housekeeping
                .saturating_duration_since(std::time::Instant::now())
        });
        let timer = self.timers.peek().map(|Reverse((at, _, _))| {
            let now = self.now();
            if *at > now {
                Duration::from_micros((*at - now).total_micros())
            } else {
                Duration::ZERO
            }
        });
        match (timer, housekeeping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_completion(&mut self, completion: Completion) {
        let Some(token) = Token::decode(completion.user_data) else {
            return;
        };
        let result = completion.result;
        match token.op {
            Op::TunRead => self.on_tun_read(result, completion.flags),
            Op::TunWrite => {
                self.tx.release(token.key as u16);
                if result < 0 {
                    self.stats.tun_write_errors += 1;
                } else {
                    self.stats.tun_writes += 1;
                    self.stats.tun_write_bytes += result as u64;
                }
                // Flows that found no buffer can make progress again.
                for key in self.starved.drain(..) {
                    if let Some(flow) = self.flows.get_mut(key) {
                        flow.starved = false;
                        enqueue(&mut self.work, flow, key);
                    }
                }
            }
            Op::Ignore => {}
            Op::Signal => self.on_signal(result),
            Op::UdpSend => self.datagrams.on_sent(token.key, result),
            Op::UdpRecv => {
                let datagrams = &mut self.datagrams;
                let completion = (
                    result,
                    uring::buffer_id(completion.flags),
                    uring::more(completion.flags),
                );
                datagrams.on_received(&mut self.ring, &mut self.tx, token, completion);
            }
            Op::Connect | Op::Send | Op::Recv => {
                let key = token.key as usize;
                let Some(flow) = self.flows.get_mut(key) else {
                    return;
                };
                if flow.generation != token.generation {
                    return;
                }
                let socket = flow.sockets.get_mut::<tcp::Socket>(flow.handle);
                match token.op {
                    Op::Connect => flow.relay.on_connected(socket, result),
                    Op::Send => {
                        self.stats.bytes_up += result.max(0) as u64;
                        flow.relay.on_sent(socket, result);
                    }
                    _ => {
                        self.stats.bytes_down += result.max(0) as u64;
                        flow.relay.on_received(socket, result);
                    }
                }
                enqueue(&mut self.work, flow, key);
            }
        }
    }

    fn on_tun_read(&mut self, result: i32, flags: u32) {
        self.tun_read_depth
            .completed(uring::more(flags), result > 0);
        let Some(bid) = uring::buffer_id(flags) else {
            // ENOBUFS: every buffer was in use; re-armed after they are recycled.
            // Anything else (EBADFD from a TUN deleted under us) will not get better by
            // retrying.
            if result < 0 && result != -libc::ENOBUFS {
                self.fatal.get_or_insert(Error::Io(
                    "read from the TUN",
                    std::io::Error::from_raw_os_error(-result),
                ));
            }
            return;
        };
        if result > 0 {
            self.stats.tun_reads += 1;
            self.stats.tun_read_bytes += result as u64;
            self.on_tun_packet(bid, result as usize);
        }
        self.tun_reads.recycle(bid);
    }

    fn on_tun_packet(&mut self, bid: u16, len: usize) {
        let Some((offset, udp_segment)) = self.check_vnet_header(bid, len) else {
            return;
        };
        let Some(packet) = self.tun_reads.packet(bid, len) else {
            return;
        };
        let packet = &packet[offset..];
        let (key, opens, mss) = match stack::parse(packet) {
            Parsed::Tcp { key, opens, mss } => (key, opens, mss),
            Parsed::Udp {
                key,
                payload_start,
                payload_len,
            } => {
                let datagram = Datagram::Udp {
                    payload: &packet[payload_start..payload_start + payload_len],
                    segment_size: udp_segment,
                    quote: Quote::of(packet),
                };
                let now = std::time::Instant::now();
                self.datagrams
                    .on_datagram(&mut self.ring, key, datagram, now);
                return;
            }
            Parsed::Echo {
                key,
                seq,
                data_start,
                data_len,
            } => {
                let datagram = Datagram::Echo {
                    seq,
                    data: &packet[data_start..data_start + data_len],
                };
                let now = std::time::Instant::now();
                self.datagrams
                    .on_datagram(&mut self.ring, key, datagram, now);
                return;
            }
            Parsed::Fragment => {
                self.stats.fragments += 1;
                return;
            }
            Parsed::Unsupported => {
                self.stats.unsupported += 1;
                return;
            }
            Parsed::Malformed => {
                self.stats.malformed += 1;
                return;
            }
        };
        let slot = match self.by_key.get(&key) {
            Some(&slot) => Some(slot),
            None if opens => {
                let syn = Quote::of(packet);
                self.open_flow(key, mss, syn)
            }
            None => None,
        };
        let now = self.now();
        let Some(packet) = self.tun_reads.packet(bid, len) else {
            return;
        };
        let iface = self.ifaces.serving(&key.server.addr);
        match slot.and_then(|slot| self.flows.get_mut(slot).map(|flow| (slot, flow))) {
            Some((slot, flow)) => {
                self.tx.set_ipv6_segment_size(flow.segment_size);
                let mut device = StackDevice::ingress(&packet[offset..], &mut self.tx);
                iface.poll_ingress_single(now, &mut device, &mut flow.sockets);
                enqueue(&mut self.work, flow, slot);
            }
            None => {
                self.stats.no_flow += 1;
                let mut device = StackDevice::ingress(&packet[offset..], &mut self.tx);
                iface.poll_ingress_single(now, &mut device, &mut self.no_flow);
            }
        }
    }

    /// Checks and counts the virtio-net header of TUN read buffer `bid`; returns where
    /// the IP packet starts, or `None` (counted) when the buffer or header is malformed.
    /// Also returns the datagram size of a UDP segmentation super-packet.
    fn check_vnet_header(&mut self, bid: u16, len: usize) -> Option<(usize, Option<u16>)> {
        let Some(buffer) = self.tun_reads.packet(bid, len) else {
            self.stats.malformed += 1;
            return None;
        };
        if !self.tun.offload().vnet_header() {
            return Some((0, None));
        }
        match vnet::Header::parse(buffer) {
            Ok((header, packet)) => {
                self.stats.count_read_header(&header, packet.len());
                let udp_segment = (header.gso == vnet::Gso::UdpL4).then_some(header.gso_size);
                Some((vnet::LEN, udp_segment))
            }
            Err(_) => {
                self.stats.bad_vnet_header += 1;
                None
            }
        }
    }

    /// Starts a flow for a new SYN: a held-back listening socket plus an outbound connect.
    /// `None` (the SYN is then answered with RST) when a limit is hit.
    fn open_flow(&mut self, key: FlowKey, mss: Option<u16>, syn: Quote) -> Option<usize> {
        // At the flow limit a connecting flow can still make room (evicted flows linger
        // until their cancel completes, hence the hard bound above the limit).
        let at_limit = self.flows.len() >= self.config.max_flows;
        if (at_limit && self.half_open_count == 0)
            || self.flows.len() >= self.config.max_flows + self.config.max_half_open
        {
            self.stats.refused_limit += 1;
            return None;
        }
        let outbound = match outbound_socket(key.server, &self.config.interface) {
            Ok(socket) => socket,
            Err(err) => {
                self.stats.socket_errors += 1;
                // Usually fd exhaustion: worth saying, but not once per refused SYN.
                let now = std::time::Instant::now();
                if self
                    .last_socket_warning
                    .is_none_or(|at| now - at >= WARNING_INTERVAL)
                {
                    self.last_socket_warning = Some(now);
                    warn!(
                        "cannot open outbound sockets ({err}); new flows are refused with RST \
                         ({} so far)",
                        self.stats.socket_errors
                    );
                }
                return None;
            }
        };
        // One mapping per flow holds both smoltcp buffers and the staging buffer.
        let size = self.config.flow_buffer;
        let Some(mut memory) = Mapping::new(2 * size + STAGING_BYTES) else {
            self.stats.memory_refusals += 1;
            return None;
        };
        // Only now that this flow has its socket and memory: evicting earlier would reset
        // a connecting flow for a SYN that is refused anyway (e.g. out of fds).
        if at_limit || self.half_open_count >= self.config.max_half_open {
            let evicted = self.evict_oldest_half_open();
            if at_limit && !evicted {
                self.stats.refused_limit += 1;
                return None;
            }
        }
        // SAFETY: the slices go only into this flow's socket set and relay, which are
        // declared before `memory` in `Flow` and so are dropped before it is unmapped.
        let whole = unsafe { memory.as_static_mut() };
        let (rx, rest) = whole.split_at_mut(size);
        let (tx, staging) = rest.split_at_mut(size);
        let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        // Nagle would delay small writes a second time: the client's kernel already
        // coalesced them.
        socket.set_nagle_enabled(false);
        socket.set_keep_alive(Some(KEEPALIVE_IDLE.into()));
        socket.set_timeout(Some(CLIENT_SILENCE_LIMIT.into()));
        socket.pause_synack(true);
        let listen = IpListenEndpoint {
            addr: Some(key.server.addr),
            port: key.server.port,
        };
        socket.listen(listen).ok()?;
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(socket);
        // Tokens carry 24 bits of generation; keep the flow's copy comparable.
        let generation = self.next_generation & uring::token::GENERATION_MASK;
        self.next_generation = generation.wrapping_add(1);
        let slot = self.flows.insert(Box::new(Flow {
            key,
            generation,
            sockets,
            handle,
            outbound: Some(outbound),
            server_addr: SockAddr::from(endpoint_to_socket_addr(key.server)),
            syn,
            segment_size: segment_size(key.server.addr, mss, self.config.mtu),
            relay: Relay::new(staging),
            _memory: memory,
            queued: false,
            starved: false,
            timer_at: None,
            teardown_started: false,
            orphaned: false,
            time_wait_since: None,
            half_open: true,
        }));
        self.flows_high_water = self.flows_high_water.max(self.flows.len());
        self.half_open_count += 1;
        self.half_open.push_back((slot, generation));
        if self.half_open.len() > 2 * self.config.max_half_open {
            let flows = &self.flows;
            self.half_open.retain(|&(slot, generation)| {
                flows
                    .get(slot)
                    .is_some_and(|f| f.generation == generation && f.half_open)
            });
        }
        self.by_key.insert(key, slot);
        self.stats.flows_opened += 1;

        let flow = &self.flows[slot];
        let connect = opcode::Connect::new(
            flow.fd(),
            flow.server_addr.as_ptr().cast(),
            flow.server_addr.len(),
        )
        .build()
        .flags(squeue::Flags::IO_LINK)
        .user_data(Token::new(Op::Connect, generation, slot).encode());
        let timeout = opcode::LinkTimeout::new(&*self.connect_timeout)
            .build()
            .user_data(Token::new(Op::Ignore, 0, 0).encode());
        // SAFETY: the address lives in the boxed flow, which is freed only after all its
        // operations completed; the timespec lives as long as the proxy.
        unsafe { self.ring.push(&[connect, timeout]) };
        Some(slot)
    }

    /// Once a second: expires idle datagram flows and returns the memory of many closed
    /// flows to the kernel.
    fn housekeeping(&mut self) {
        let now = std::time::Instant::now();
        if now < self.next_housekeeping {
            return;
        }
        self.next_housekeeping = now + HOUSEKEEPING_INTERVAL;
        self.datagrams.expire(&mut self.ring, now);
        let trim = self.trim_due();
        self.trim_follow_up = trim && self.closed_since_trim() >= TRIM_AFTER_CLOSED_FLOWS;
        if trim {
            self.by_key.shrink_to_fit();
            sys::release_free_heap();
            self.flows_high_water = self.flows.len();
        }
    }

    /// TCP flows closed since the most that were open after the last trim.
    fn closed_since_trim(&self) -> usize {
        self.flows_high_water.saturating_sub(self.flows.len())
    }

    fn trim_due(&self) -> bool {
        let closed = self.closed_since_trim();
        closed >= TRIM_AFTER_CLOSED_FLOWS || (self.trim_follow_up && closed > 0)
    }

    fn fire_timers(&mut self) {
        let now = self.now();
        for _ in 0..MAX_TIMERS_PER_TURN {
            match self.timers.peek() {
                Some(Reverse((at, _, _))) if *at <= now => {}
                _ => break,
            }
            let Some(Reverse((at, key, generation))) = self.timers.pop() else {
                break;
            };
            if let Some(flow) = self.flows.get_mut(key)
                && flow.generation == generation
                && flow.timer_at == Some(at)
            {
                flow.timer_at = None;
                enqueue(&mut self.work, flow, key);
            }
        }
    }

    fn service_work(&mut self) {
        let mut work = std::mem::take(&mut self.work);
        for &key in &work {
            self.service(key);
        }
        work.clear();
        // Flows whose egress budget ran out were re-queued into `self.work` meanwhile.
        std::mem::swap(&mut work, &mut self.work);
        self.work.extend(work);
    }

    /// Runs one flow: relay I/O, smoltcp egress, teardown, timer.
    fn service(&mut self, key: usize) {
        let now = self.now();
        let Some(flow) = self.flows.get_mut(key) else {
            return;
        };
        flow.queued = false;
        submit_relay_io(&mut self.ring, flow, key);

        let socket = flow.sockets.get_mut::<tcp::Socket>(flow.handle);
        let state = socket.state();
        if matches!(
            state,
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        ) {
            // The client closed: acknowledge at once, so no ACK is still owed when the
            // flow is freed.
            socket.set_ack_delay(None);
        }
        let client_done =
            matches!(state, State::TimeWait | State::Closed) && flow.relay.owes_server(socket);
        if client_done && !flow.orphaned {
            // The client is gone but bytes are still owed to the server. Like the
            // kernel with an orphaned socket, bound how long a server that stops reading
            // may hold the flow: the outbound connection then fails and the flow ends.
            flow.orphaned = true;
            if let Some(outbound) = &flow.outbound {
                let _ = outbound.set_tcp_user_timeout(Some(ORPHAN_TIMEOUT));
            }
        }
        // smoltcp ends TIME-WAIT (and clears the receive buffer) from its egress timer,
        // 10 s after entering it. Keep egress (ACKs) running until shortly before that,
        // then hold it off while client bytes are still going to the server.
        if state == State::TimeWait {
            flow.time_wait_since.get_or_insert(now);
        }
        let holding_time_wait = state == State::TimeWait
            && flow.relay.owes_server(socket)
            && flow
                .time_wait_since
                .is_some_and(|since| now - since >= TIME_WAIT_EGRESS);

        let iface = self.ifaces.serving(&flow.key.server.addr);
        let mut budget_left = true;
        if !holding_time_wait {
            self.tx.set_ipv6_segment_size(flow.segment_size);
            let mut device = StackDevice::egress(&mut self.tx);
            for sent in 0.. {
                if sent == EGRESS_BUDGET {
                    budget_left = false;
                    break;
                }
                if iface.poll_egress(now, &mut device, &mut flow.sockets) == PollResult::None {
                    break;
                }
            }
        }
        if self.tx.take_exhausted() && !flow.starved {
            flow.starved = true;
            self.starved.push(key);
        }
        if !budget_left {
            enqueue(&mut self.work, flow, key);
        }

        let socket = flow.sockets.get::<tcp::Socket>(flow.handle);
        flow.relay.update_phase(socket);
        if flow.half_open && flow.relay.phase() != Phase::Connecting {
            flow.half_open = false;
            self.half_open_count -= 1;
        }
        match flow.relay.phase() {
            Phase::Closing(teardown) => self.teardown(key, teardown, now),
            Phase::Connecting => {}
            Phase::Open => {
                if !flow.starved && !flow.queued && !holding_time_wait {
                    schedule(&mut self.timers, iface, flow, key, now);
                }
            }
        }
    }

    /// Cancels the flow's outbound I/O and, once nothing is in flight, closes and frees it.
    fn teardown(&mut self, key: usize, teardown: Teardown, now: Instant) {
        let flow = &mut self.flows[key];
        if !flow.teardown_started {
            flow.teardown_started = true;
            let reason = match flow.relay.failure() {
                Some(Failure::HostUnreachable) => Some(Reason::Host),
                Some(Failure::NetUnreachable) => Some(Reason::Network),
                _ => None,
            };
            if let Some(reason) = reason
                && !unreachable::emit(&mut self.tx, &flow.syn, reason)
            {
                self.tx.counters.dropped_replies += 1;
            }
            if teardown == Teardown::Abortive {
                if let Some(socket) = &flow.outbound {
                    // Closing with linger 0 sends RST, which is what the server must see.
                    let _ = socket.set_linger(Some(Duration::ZERO));
                }
                if flow.relay.inflight() > 0 {
                    let cancel =
                        opcode::AsyncCancel2::new(types::CancelBuilder::fd(flow.fd()).all())
                            .build()
                            .user_data(Token::new(Op::Ignore, 0, 0).encode());
                    // SAFETY: a cancel points at no memory.
                    unsafe { self.ring.push(&[cancel]) };
                }
            }
        }
        if flow.relay.inflight() > 0 || flow.starved {
            return;
        }
        // An aborted socket keeps its peer until its RST is out (the tuple is cleared
        // once sent); freeing it earlier would swallow the reset.
        let socket = flow.sockets.get::<tcp::Socket>(flow.handle);
        let iface = self.ifaces.serving(&flow.key.server.addr);
        if socket.state() == State::Closed && iface.poll_at(now, &flow.sockets).is_some() {
            enqueue(&mut self.work, flow, key);
            return;
        }
        if let Some(failure) = flow.relay.failure() {
            self.stats.count_failure(failure);
        }
        if let Some(socket) = flow.outbound.take() {
            let close = opcode::Close::new(types::Fd(socket.into_raw_fd()))
                .build()
                .user_data(Token::new(Op::Ignore, 0, 0).encode());
            // SAFETY: a close points at no memory; the fd is no longer owned by anyone.
            unsafe { self.ring.push(&[close]) };
        }
        let flow_key = flow.key;
        self.by_key.remove(&flow_key);
        self.flows.remove(key);
        self.stats.flows_closed += 1;
    }

    /// Resets the longest-waiting flow that is still connecting. False when none is left.
    fn evict_oldest_half_open(&mut self) -> bool {
        while let Some((slot, generation)) = self.half_open.pop_front() {
            let Some(flow) = self.flows.get_mut(slot) else {
                continue;
            };
            if flow.generation != generation || !flow.half_open {
                continue;
            }
            flow.half_open = false;
            self.half_open_count -= 1;
            let socket = flow.sockets.get_mut::<tcp::Socket>(flow.handle);
            flow.relay.evict(socket);
            enqueue(&mut self.work, flow, slot);
            return true;
        }
        false
    }

    /// Superseded heap entries are skipped when popped; this bounds how many pile up.
    fn compact_timers(&mut self) {
        if self.timers.len() <= 2 * self.flows.len() + 4096 {
            return;
        }
        let flows = &self.flows;
        self.timers.retain(|Reverse((at, key, generation))| {
            flows
                .get(*key)
                .is_some_and(|flow| flow.generation == *generation && flow.timer_at == Some(*at))
        });
    }

    fn log_stats(&mut self) {
        if self.last_stats.elapsed() < STATS_INTERVAL || !log::log_enabled!(log::Level::Debug) {
            return;
        }
        self.last_stats = std::time::Instant::now();
        self.stats.tx = self.tx.counters.clone();
        self.stats.udp = self.datagrams.counters.clone();
        for line in self.stats.to_string().lines() {
            debug!("{line} (active flows {})", self.flows.len());
        }
        if log::log_enabled!(log::Level::Trace) {
            for (_, flow) in &self.flows {
                let state = flow.sockets.get::<tcp::Socket>(flow.handle).state();
                log::trace!("flow {:?}: {state} {:?}", flow.key, flow.relay);
            }
        }
    }
}

/// How many TUN reads to keep armed. A multishot read is one; single reads are kept
/// at twice what the last turn took, up to `limit`: every armed read is woken for each
/// packet (and all but one go back to waiting), so a deep batch only pays off when the
/// TUN is busy.
struct ReadDepth {
    limit: u16,
    armed: u16,
    taken: u16,
}

impl ReadDepth {
    fn new(limit: u16) -> ReadDepth {
        ReadDepth {
            limit,
            armed: 0,
            taken: 0,
        }
    }

    /// A TUN read completed; `armed` says whether it stays armed (multishot).
    fn completed(&mut self, armed: bool, packet: bool) {
        if !armed {
            self.armed = self.armed.saturating_sub(1);
        }
        self.taken = self.taken.saturating_add(u16::from(packet));
    }

    /// Reads to arm now; counts them as armed and starts the next turn's tally.
    fn arm_now(&mut self) -> u16 {
        let target = self.taken.saturating_mul(2).clamp(1, self.limit);
        self.taken = 0;
        let more = target.saturating_sub(self.armed);
        self.armed += more;
        more
    }
}

/// Puts a flow on this turn's work list once.
fn enqueue(work: &mut Vec<usize>, flow: &mut Flow, key: usize) {
    if !flow.queued {
        flow.queued = true;
        work.push(key);
    }
}

/// Starts the outbound sends and receives the relay asks for, and forwards the client's
/// FIN.
fn submit_relay_io(ring: &mut Ring, flow: &mut Flow, key: usize) {
    let fd = flow.fd();
    let generation = flow.generation;
    let socket = flow.sockets.get_mut::<tcp::Socket>(flow.handle);
    let actions = flow.relay.pump(socket);
    let mut entries = [None, None];
    if let Some(data) = actions.send {
        entries[0] = Some(
            opcode::Send::new(fd, data.as_ptr(), data.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(Token::new(Op::Send, generation, key).encode()),
        );
    }
    if let Some(space) = actions.recv {
        entries[1] = Some(
            opcode::Recv::new(fd, space.as_mut_ptr(), space.len() as u32)
                .build()
                .user_data(Token::new(Op::Recv, generation, key).encode()),
        );
    }
    let shutdown = actions.shutdown;
    for entry in entries.into_iter().flatten() {
        // SAFETY: `send` points into the smoltcp receive buffer and `recv` into the
        // relay's staging buffer, both owned by this boxed flow. The relay leaves those
        // bytes alone until the completion (`on_sent`/`on_received`), and the flow is
        // freed only once no operation is in flight.
        unsafe { ring.push(&[entry]) };
    }
    if shutdown {
        // Not on the ring: io_uring never issues IORING_OP_SHUTDOWN inline but hands it
        // to an io-wq worker thread, which (wake-ups included) took 9% of the proxy's
        // CPU in the crr benchmark, against ~5% inline. shutdown(SHUT_WR) of a TCP socket
        // does not block.
        let result = match flow.outbound.as_ref().map(|s| s.shutdown(Shutdown::Write)) {
            Some(Ok(())) => 0,
            Some(Err(e)) => -e.raw_os_error().unwrap_or(libc::EIO),
            None => -libc::EBADF,
        };
        let socket = flow.sockets.get_mut::<tcp::Socket>(flow.handle);
        flow.relay.on_shutdown(socket, result);
    }
}

/// Arms the flow's next smoltcp timer (retransmit, delayed ACK, keep-alive).
fn schedule(
    timers: &mut BinaryHeap<Reverse<(Instant, usize, u32)>>,
    iface: &mut Interface,
    flow: &mut Flow,
    key: usize,
    now: Instant,
) {
    let Some(at) = iface.poll_at(now, &flow.sockets) else {
        return;
    };
    // "Now" after a full egress pass means smoltcp is waiting on something that is not a
    // packet (e.g. a zero window); never spin on it.
    let at = at.max(now + smoltcp::time::Duration::from_millis(1));
    // An earlier live entry stays: it fires, the flow runs and re-arms with the real time.
    if flow.timer_at.is_some_and(|current| current <= at) {
        return;
    }
    flow.timer_at = Some(at);
    timers.push(Reverse((at, key, flow.generation)));
}

/// A TCP socket bound to the outbound interface, so it leaves through `-i` even when
/// policy routing would send its destination back into the TUN.
fn outbound_socket(server: IpEndpoint, interface: &str) -> std::io::Result<Socket> {
    let domain = match server.addr {
        IpAddress::Ipv4(_) => Domain::IPV4,
        IpAddress::Ipv6(_) => Domain::IPV6,
    };
    let socket = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    socket.bind_device(Some(interface.as_bytes()))?;
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    Ok(socket)
}

/// The client's MSS (RFC 9293 defaults when it sent none), capped by what fits our MTU.
fn segment_size(server: IpAddress, client_mss: Option<u16>, mtu: u32) -> u16 {
    let (default_mss, headers) = match server {
        IpAddress::Ipv4(_) => (536, 40),
        IpAddress::Ipv6(_) => (1220, 60),
    };
    let ours = u16::try_from(mtu.saturating_sub(headers)).unwrap_or(u16::MAX);
    client_mss.unwrap_or(default_mss).clamp(1, ours)
}

fn endpoint_to_socket_addr(endpoint: IpEndpoint) -> SocketAddr {
    SocketAddr::new(endpoint.addr.into(), endpoint.port)
}

/// smoltcp's initial sequence numbers and ports derive from this; it must not repeat
/// across runs.
fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut bytes))
        .is_ok()
    {
        return u64::from_ne_bytes(bytes);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()) << 32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_depth_follows_the_packets_each_turn_took() {
        let mut multishot = ReadDepth::new(1);
        assert_eq!(multishot.arm_now(), 1);
        multishot.completed(true, true);
        assert_eq!(multishot.arm_now(), 0, "still armed");
        multishot.completed(false, false); // ENOBUFS ended it
        assert_eq!(multishot.arm_now(), 1);

        // A busy TUN: every armed read finds a packet each turn.
        let mut single = ReadDepth::new(64);
        let mut depths = Vec::new();
        for _ in 0..8 {
            single.arm_now();
            depths.push(single.armed);
            for _ in 0..single.armed {
                single.completed(false, true);
            }
        }
        assert_eq!(depths, [1, 2, 4, 8, 16, 32, 64, 64]);
        // Quiet again: one packet a turn leaves the armed reads waiting, none added.
        single.arm_now();
        single.completed(false, true);
        assert_eq!(single.arm_now(), 0, "63 armed already cover a quiet turn");
        assert_eq!(single.armed, 63);
    }

    #[test]
    fn segment_size_is_the_client_mss_capped_by_our_mtu() {
        let v4 = IpAddress::v4(10, 0, 0, 1);
        let v6 = IpAddress::v6(0xfd00, 0, 0, 0, 0, 0, 0, 1);
        assert_eq!(segment_size(v4, Some(1460), 1500), 1460);
        assert_eq!(segment_size(v6, Some(1440), 1500), 1440);
        assert_eq!(segment_size(v6, Some(8960), 1500), 1440);
        assert_eq!(segment_size(v4, Some(1000), 1500), 1000);
        assert_eq!(segment_size(v4, None, 1500), 536);
        assert_eq!(segment_size(v6, None, 1500), 1220);
        assert_eq!(segment_size(v4, Some(0), 1500), 1);
    }
}
