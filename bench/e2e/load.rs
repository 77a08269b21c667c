//! Load generators: each scenario's server runs in the server namespace and its clients
//! in the client namespace, on plain blocking sockets, bounded in time and count.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};

use crate::common::{is_timeout, join};
use crate::peer::Ends;
use crate::procfs;

/// Write/read size of bulk streams.
const BULK_CHUNK: usize = 256 * 1024;
/// Bound on every blocking socket call, so a broken path ends a run instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often blocked readers look at the clock.
const POLL: Duration = Duration::from_millis(200);
/// A download stream without a byte for this long at the end of a run has stalled.
const STALL: Duration = Duration::from_secs(1);
/// Latency samples kept per client thread; a run stops early when they are full.
const MAX_SAMPLES: usize = 4_000_000;
/// Datagrams sent back to back when the paced UDP sender has fallen behind.
const UDP_BURST: u64 = 64;
/// UDP flows opened (one datagram each) before waiting for their echoes.
const UDP_FLOW_BATCH: usize = 64;
/// How long echoes may keep arriving after the last datagram was sent.
const UDP_DRAIN: Duration = Duration::from_secs(1);
/// Payload of each udp-echo datagram, and the flows they are spread over.
pub const UDP_ECHO_SIZE: usize = 1024;
pub const UDP_ECHO_FLOWS: usize = 8;
/// Payload of each udp-up/udp-down datagram: a full-sized one that still fits the
/// 1500-byte MTU over IPv6 (1448 bytes with headers).
pub const FLOOD_SIZE: usize = 1400;
/// With `--udp-gso`: the datagrams QUIC stacks send on Linux, 1,350 bytes, 44 to a
/// `sendmsg` with a UDP_SEGMENT control message (one 59,400-byte super-datagram).
pub const GSO_FLOOD_SIZE: usize = 1350;
pub const GSO_BATCH: usize = 44;
/// Socket buffers of the flood's sender and receiver (forced past rmem_max/wmem_max):
/// ~90 ms of 1 Gbit/s at ~2.3 KiB of kernel memory per datagram, so that a receiver
/// descheduled for a moment on these shared cores is not counted as the path's loss
/// (with 4 MiB the receiver did drop some, through the proxy, at load average 3).
const FLOOD_SOCKET_BUFFER: usize = 16 << 20;
/// A flood's receiver stops once nothing has arrived for this long after the last send
/// (the shaper's queue holds at most 20 ms), and in any case this long after it.
const FLOOD_QUIET: Duration = Duration::from_millis(300);
const FLOOD_DRAIN_MAX: Duration = Duration::from_secs(3);
/// The stalled downloads' server sockets: a fixed send buffer, so that 500 of them
/// cannot autotune to 4 MiB each of this machine's memory.
const STALLED_SEND_BUFFER: usize = 256 * 1024;

/// What one run of a scenario measured, from the application's point of view.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Completed units: bytes (bulk), transactions (rr, crr) or echoed datagrams.
    pub units: u64,
    /// Application bytes carried, both directions.
    pub bytes: u64,
    pub elapsed: Duration,
    /// Per-transaction latencies in nanoseconds (rr, crr).
    pub latencies: Vec<u32>,
    /// Datagrams the sender's kernel took (udp-echo, udp-up, udp-down).
    pub offered: u64,
    /// Datagrams the pacing wanted to send (udp-up, udp-down): `offered` below it means
    /// the sender, not the path, fell short of the target rate.
    pub due: u64,
    /// Operations that failed: connects, resets and timeouts mid-run, bad echoes.
    pub errors: u64,
    /// Where the kernel dropped datagrams (udp-up, udp-down).
    pub drops: Option<Drops>,
    /// Queries answered SERVFAIL (dns-fake): every entry of the proxy's fake table was
    /// handed out too recently to go to another name. Counted in `units` too.
    pub servfail: u64,
}

/// Datagrams of a flood the kernel dropped, by place: how much of the loss these
/// explain, and where.
#[derive(Clone, Copy, Debug, Default)]
pub struct Drops {
    /// The receiving socket's buffer was full.
    pub receiver: u64,
    /// The proxy's own sockets' receive buffers were full (None on the direct path).
    pub proxy_sockets: Option<u64>,
    /// The TUN's queue towards the proxy was full (None on the direct path).
    pub tun_queue: Option<u64>,
}

impl Drops {
    pub fn add(&mut self, other: &Drops) {
        let sum = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        self.receiver += other.receiver;
        self.proxy_sockets = sum(self.proxy_sockets, other.proxy_sockets);
        self.tun_queue = sum(self.tun_queue, other.tun_queue);
    }
}

impl Sample {
    pub fn per_second(&self) -> f64 {
        self.units as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The proxy's CPU time between the start of a run's load and its end (set-up excluded),
/// with the wall time it was measured over, and how the proxy got there: its wake-ups
/// and the packets it wrote to and read from its device (TUN or tap).
#[derive(Clone)]
pub struct Meter {
    pid: Option<u32>,
    /// Another process whose CPU time is counted with the proxy's.
    helper: Option<u32>,
    /// The namespace and name of the device the proxy's clients send through.
    device: Option<(String, String)>,
    /// At start and at stop.
    samples: Arc<Mutex<[Option<MeterSample>; 2]>>,
}

#[derive(Clone, Copy)]
struct MeterSample {
    at: Instant,
    cpu_seconds: f64,
    switches: u64,
    device: Option<procfs::DeviceCounters>,
}

/// What the proxy did over a run beside using CPU: wake-ups (context switches of its
/// threads) and its device's counters (the device receives what the proxy writes).
#[derive(Clone, Copy, Debug)]
pub struct Activity {
    pub wakeups: u64,
    pub device: Option<procfs::DeviceCounters>,
}

impl Meter {
    /// Meters process `pid`; with None (the direct path) it measures nothing.
    pub fn new(pid: Option<u32>) -> Meter {
        Meter {
            pid,
            helper: None,
            device: None,
            samples: Arc::new(Mutex::new([None, None])),
        }
    }

    /// Counts `helper`'s CPU time too.
    pub fn with(self, helper: Option<u32>) -> Meter {
        Meter { helper, ..self }
    }

    /// Also reads the counters of device `dev` in namespace `ns`.
    pub fn with_device(self, ns: &str, dev: &str) -> Meter {
        Meter {
            device: Some((ns.into(), dev.into())),
            ..self
        }
    }

    fn sample(&self, which: usize) {
        let helper = self.helper.map_or(Some(0.0), procfs::cpu_seconds);
        let device = self.device.clone().and_then(|(ns, dev)| {
            crate::common::in_netns(&ns, move || procfs::device_counters(&dev))
                .join()
                .ok()
                .flatten()
        });
        let now = self
            .pid
            .and_then(|pid| Some((procfs::cpu_seconds(pid)?, pid)))
            .zip(helper)
            .map(|((cpu, pid), helper)| MeterSample {
                at: Instant::now(),
                cpu_seconds: cpu + helper,
                switches: procfs::context_switches(pid).values().sum(),
                device,
            });
        self.samples.lock().expect("meter")[which] = now;
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn start(&self) {
        self.sample(0);
    }

    fn stop(&self) {
        self.sample(1);
    }

    /// (CPU seconds, wall time) between start and stop.
    pub fn cpu(&self) -> Option<(f64, Duration)> {
        let [start, stop] = *self.samples.lock().expect("meter");
        let (start, stop) = (start?, stop?);
        Some((
            stop.cpu_seconds - start.cpu_seconds,
            stop.at.saturating_duration_since(start.at),
        ))
    }

    /// Wake-ups and device packets between start and stop.
    pub fn activity(&self) -> Option<Activity> {
        let [start, stop] = *self.samples.lock().expect("meter");
        let (start, stop) = (start?, stop?);
        Some(Activity {
            wakeups: stop.switches.saturating_sub(start.switches),
            device: stop.device.zip(start.device).map(|(b, a)| b.since(&a)),
        })
    }
}

/// A listener on a free port of `ip` in the server namespace. Every run gets its own
/// port, so nothing left of an earlier run can be in the way.
fn listen(topo: &Ends, ip: IpAddr) -> (TcpListener, SocketAddr) {
    let listener = join(topo.in_server(move || {
        TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"))
    }));
    socket2::SockRef::from(&listener)
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("accept timeout");
    let addr = listener.local_addr().expect("listener address");
    (listener, addr)
}

/// Connects from the client namespace; the socket stays there whatever thread uses it.
fn connect_from_client(topo: &Ends, addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    join(topo.in_client(move || {
        (0..count)
            .map(|i| {
                let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
                    .unwrap_or_else(|e| panic!("connect #{i} to {addr}: {e}"));
                configure(&stream);
                stream
            })
            .collect()
    }))
}

fn configure(stream: &TcpStream) {
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
}

/// Accepts `count` connections on a thread of its own.
fn accept_all(listener: TcpListener, count: usize) -> thread::JoinHandle<Vec<TcpStream>> {
    thread::spawn(move || {
        (0..count)
            .map(|i| {
                let (stream, _) = listener
                    .accept()
                    .unwrap_or_else(|e| panic!("accept #{i}: {e}"));
                configure(&stream);
                stream
            })
            .collect()
    })
}

/// `count` connections from the client to the server namespace: (client ends, server
/// ends).
fn connection_pairs(topo: &Ends, ip: IpAddr, count: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let (listener, addr) = listen(topo, ip);
    let acceptor = accept_all(listener, count);
    let clients = connect_from_client(topo, addr, count);
    (clients, join(acceptor))
}

/// Bulk transfer on `streams` connections for `duration`: client to server (`upload`)
/// or server to client. Units are bytes, counted by the receiving side; a stream that
/// fails or stalls before the end counts as an error.
pub fn bulk(
    topo: &Ends,
    ip: IpAddr,
    streams: usize,
    upload: bool,
    duration: Duration,
    meter: &Meter,
) -> Sample {
    let (clients, servers) = connection_pairs(topo, ip, streams);
    let (senders, receivers) = if upload {
        (clients, servers)
    } else {
        (servers, clients)
    };
    let start_line = Arc::new(Barrier::new(2 * streams + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    // Errors are counted by receivers only: a failing sender always shows there as a
    // reset, an early end or a stall, and one broken stream is one error.
    for mut stream in senders {
        let (start_line, stop) = (start_line.clone(), stop.clone());
        handles.push(thread::spawn(move || {
            let chunk = vec![0x5a_u8; BULK_CHUNK];
            start_line.wait();
            while !stop.load(Ordering::SeqCst) {
                if stream.write_all(&chunk).is_err() {
                    return None;
                }
            }
            let _ = stream.shutdown(Shutdown::Write);
            None
        }));
    }
    for mut stream in receivers {
        stream.set_read_timeout(Some(POLL)).expect("timeout");
        let (start_line, stop) = (start_line.clone(), stop.clone());
        let (received, errors) = (received.clone(), errors.clone());
        handles.push(thread::spawn(move || {
            let mut buf = vec![0_u8; BULK_CHUNK];
            start_line.wait();
            let mut last_byte = Instant::now();
            let mut failed = false;
            // An upload's receiver reads until EOF, a download's until told to stop.
            while upload || !stop.load(Ordering::SeqCst) {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        failed = !stop.load(Ordering::SeqCst);
                        break;
                    }
                    Ok(n) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                        last_byte = Instant::now();
                    }
                    Err(e) if is_timeout(&e) && last_byte.elapsed() < IO_TIMEOUT => {}
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            // A download that went quiet well before the end stalled, however short
            // the run.
            failed |= !upload && last_byte.elapsed() > STALL;
            if failed {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            Some(last_byte)
        }));
    }
    start_line.wait();
    let start = Instant::now();
    meter.start();
    thread::sleep(duration);
    stop.store(true, Ordering::SeqCst);
    // A download's clients stop counting now; an upload's server counts what is still
    // in flight, until its last byte.
    let mut elapsed = start.elapsed();
    if !upload {
        meter.stop();
    }
    let last_bytes: Vec<Instant> = handles.into_iter().filter_map(join).collect();
    if upload {
        meter.stop();
        if let Some(last) = last_bytes.into_iter().max() {
            elapsed = last.saturating_duration_since(start);
        }
    }
    let bytes = received.load(Ordering::Relaxed);
    Sample {
        units: bytes,
        bytes,
        elapsed,
        errors: errors.load(Ordering::Relaxed),
        ..Sample::default()
    }
}

/// Request/response of `size` bytes each way on `conns` connections for `duration`.
/// Units are transactions; every response must equal its request.
pub fn request_response(
    topo: &Ends,
    ip: IpAddr,
    conns: usize,
    size: usize,
    duration: Duration,
    meter: &Meter,
) -> Sample {
    let (clients, servers) = connection_pairs(topo, ip, conns);
    let echoes: Vec<_> = servers
        .into_iter()
        .map(|mut stream| {
            thread::spawn(move || {
                let mut buf = vec![0_u8; size];
                while stream.read_exact(&mut buf).is_ok() && stream.write_all(&buf).is_ok() {}
            })
        })
        .collect();
    let start_line = Arc::new(Barrier::new(conns + 1));
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut stream)| {
            let start_line = start_line.clone();
            thread::spawn(move || {
                let mut request = vec![0_u8; size];
                let mut response = vec![0_u8; size];
                let mut latencies = Vec::with_capacity(1 << 20);
                let mut errors = 0;
                start_line.wait();
                let deadline = Instant::now() + duration;
                for n in 0_u64.. {
                    let t0 = Instant::now();
                    if t0 >= deadline || latencies.len() == MAX_SAMPLES {
                        break;
                    }
                    request.fill((n as u8) ^ (i as u8));
                    let ok = stream.write_all(&request).is_ok()
                        && stream.read_exact(&mut response).is_ok();
                    if !ok || response != request {
                        errors += 1;
                        break;
                    }
                    latencies.push(nanos(t0.elapsed()));
                }
                (latencies, errors)
            })
        })
        .collect();
    start_line.wait();
    let start = Instant::now();
    meter.start();
    let mut sample = Sample::default();
    for handle in handles {
        let (latencies, errors) = join(handle);
        sample.latencies.extend(latencies);
        sample.errors += errors;
    }
    sample.elapsed = start.elapsed();
    meter.stop();
    // The clients' sockets closed with their threads: every echo thread sees EOF.
    echoes.into_iter().for_each(join);
    sample.units = sample.latencies.len() as u64;
    sample.bytes = sample.units * 2 * size as u64;
    sample
}

/// Connect, one 1-byte request and response, close, in a loop for `duration`. The
/// server closes first, as an HTTP/1.0 server would, so client ports do not pile up in
/// TIME-WAIT. Units are connections.
pub fn connect_request_response(
    topo: &Ends,
    ip: IpAddr,
    duration: Duration,
    meter: &Meter,
) -> Sample {
    let (listener, addr) = listen(topo, ip);
    socket2::SockRef::from(&listener)
        .set_read_timeout(Some(POLL))
        .expect("accept timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    continue;
                };
                configure(&stream);
                answer_one_byte(&mut stream);
            }
        })
    };
    let meter = meter.clone();
    let client = topo.in_client(move || {
        let mut latencies = Vec::with_capacity(1 << 20);
        let mut errors = 0_u64;
        let start = Instant::now();
        meter.start();
        let deadline = start + duration;
        for n in 0_u64.. {
            let t0 = Instant::now();
            if t0 >= deadline || latencies.len() == MAX_SAMPLES {
                break;
            }
            let request = [n as u8];
            let mut response = [0_u8; 1];
            let ok = TcpStream::connect_timeout(&addr, IO_TIMEOUT).is_ok_and(|mut stream| {
                configure(&stream);
                stream.write_all(&request).is_ok()
                    && stream.read_exact(&mut response).is_ok()
                    && response == request
                    && stream.read(&mut response).is_ok_and(|eof| eof == 0)
            });
            if ok {
                latencies.push(nanos(t0.elapsed()));
            } else {
                errors += 1;
            }
        }
        let elapsed = start.elapsed();
        meter.stop();
        (latencies, errors, elapsed)
    });
    let (latencies, errors, elapsed) = join(client);
    stop.store(true, Ordering::Relaxed);
    join(server);
    Sample {
        units: latencies.len() as u64,
        bytes: 2 * latencies.len() as u64,
        elapsed,
        latencies,
        errors,
        ..Sample::default()
    }
}

/// Reads one byte and sends it back (crr's server side, and the start-up probe's);
/// the caller closes the connection.
pub fn answer_one_byte(stream: &mut TcpStream) {
    let mut byte = [0_u8; 1];
    if stream.read_exact(&mut byte).is_ok() {
        let _ = stream.write_all(&byte);
    }
}

/// A UDP socket in the server namespace that echoes every datagram until `stop`.
fn udp_echo_server(
    topo: &Ends,
    ip: IpAddr,
    stop: &Arc<AtomicBool>,
) -> (SocketAddr, thread::JoinHandle<()>) {
    let server = join(topo.in_server(move || UdpSocket::bind((ip, 0)).expect("bind udp")));
    server.set_read_timeout(Some(POLL)).expect("timeout");
    let addr = server.local_addr().expect("udp address");
    let stop = stop.clone();
    let echo = thread::spawn(move || {
        let mut buf = vec![0_u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], from);
            }
        }
    });
    (addr, echo)
}

/// A UDP socket in the calling thread's namespace, connected to `addr`.
fn udp_client(addr: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind((unspecified(addr.ip()), 0)).expect("bind udp client");
    socket.connect(addr).expect("connect udp");
    socket
}

/// UDP echo: `UDP_ECHO_FLOWS` client sockets offer `rate` datagrams/s of
/// `UDP_ECHO_SIZE` bytes in total for `duration`. Units are datagrams echoed back
/// intact; `offered` counts those the client's kernel accepted.
pub fn udp_echo(topo: &Ends, ip: IpAddr, rate: u64, duration: Duration, meter: &Meter) -> Sample {
    let (flows, size) = (UDP_ECHO_FLOWS, UDP_ECHO_SIZE);
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, echo) = udp_echo_server(topo, ip, &stop);
    let sockets = join(topo.in_client(move || {
        (0..flows)
            .map(|_| {
                let socket = udp_client(addr);
                socket.set_read_timeout(Some(POLL)).expect("timeout");
                socket
            })
            .collect::<Vec<_>>()
    }));
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let sent_all = Arc::new(AtomicBool::new(false));
    let receivers: Vec<_> = sockets
        .iter()
        .enumerate()
        .map(|(flow, socket)| {
            let socket = socket.try_clone().expect("clone udp");
            let sent_all = sent_all.clone();
            thread::spawn(move || {
                let mut buf = vec![0_u8; 65536];
                let (mut good, mut bad) = (0_u64, 0_u64);
                let mut quiet_since: Option<Instant> = None;
                // Echoes still in flight when sending ends get UDP_DRAIN to arrive.
                while quiet_since.is_none_or(|since| since.elapsed() < UDP_DRAIN) {
                    match socket.recv(&mut buf) {
                        Ok(n) if datagram_seq(&buf[..n], flow, size).is_some() => good += 1,
                        Ok(_) => bad += 1,
                        // An ICMP error from the path: counted, and it ends nothing.
                        Err(e) if !is_timeout(&e) => bad += 1,
                        Err(_) => {}
                    }
                    if sent_all.load(Ordering::Relaxed) && quiet_since.is_none() {
                        quiet_since = Some(Instant::now());
                    }
                }
                (good, bad)
            })
        })
        .collect();
    let mut datagram = vec![0_u8; size];
    let start = Instant::now();
    meter.start();
    let (mut due_sent, mut offered, mut refused) = (0_u64, 0_u64, 0_u64);
    while due_sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        if due <= due_sent {
            thread::sleep(Duration::from_micros(50));
            continue;
        }
        for _ in 0..(due - due_sent).min(UDP_BURST) {
            let flow = (due_sent % flows as u64) as usize;
            fill_datagram(&mut datagram, flow, due_sent);
            // MSG_DONTWAIT: a full socket buffer loses the datagram instead of stalling
            // the pacing; only datagrams the kernel took count as offered.
            let sent = socket2::SockRef::from(&sockets[flow])
                .send_with_flags(&datagram, nix::libc::MSG_DONTWAIT);
            match sent {
                Ok(_) => offered += 1,
                Err(e) if is_timeout(&e) || e.raw_os_error() == Some(nix::libc::ENOBUFS) => {}
                // ECONNREFUSED and the like: the path reported an error.
                Err(_) => refused += 1,
            }
            due_sent += 1;
        }
    }
    let elapsed = start.elapsed();
    sent_all.store(true, Ordering::Relaxed);
    let mut sample = Sample {
        offered,
        elapsed,
        errors: refused,
        ..Sample::default()
    };
    for handle in receivers {
        let (good, bad) = join(handle);
        sample.units += good;
        sample.errors += bad;
    }
    meter.stop();
    stop.store(true, Ordering::Relaxed);
    join(echo);
    sample.bytes = 2 * sample.units * size as u64;
    sample
}

/// What udp-up and udp-down send: `rate` datagrams/s of `size` bytes, `batch` to a send
/// (more than one: a UDP_SEGMENT super-datagram).
#[derive(Clone, Copy)]
pub struct Flood {
    pub rate: u64,
    pub size: usize,
    pub batch: usize,
}

/// One-way UDP at `flood.rate` datagrams/s for `duration` on one flow: client to server
/// (`upload`) or back. The sender paces with a token bucket and never blocks: a send its
/// own socket has no room for is not made (and `offered` falls short of `due`), one a
/// local queue drops (ENOBUFS) counts as sent and lost. With `flood.batch` > 1 the
/// sender waits until a whole batch is due and sends it as one super-datagram (the
/// kernel takes all of it or none); the receiver is a plain socket either way. Units
/// are distinct intact datagrams received; duplicates and corrupt ones are errors.
pub fn udp_flood(
    topo: &Ends,
    ip: IpAddr,
    upload: bool,
    flood: Flood,
    duration: Duration,
    meter: &Meter,
) -> Sample {
    let Flood { rate, size, batch } = flood;
    let server = join(topo.in_server(move || UdpSocket::bind((ip, 0)).expect("bind udp")));
    let addr = server.local_addr().expect("udp address");
    let client = join(topo.in_client(move || udp_client(addr)));
    for socket in [&server, &client] {
        setsockopt(socket, sockopt::RcvBufForce, &FLOOD_SOCKET_BUFFER).expect("SO_RCVBUFFORCE");
        setsockopt(socket, sockopt::SndBufForce, &FLOOD_SOCKET_BUFFER).expect("SO_SNDBUFFORCE");
        socket
            .set_read_timeout(Some(FLOOD_QUIET / 3))
            .expect("timeout");
    }
    let (sender, receiver) = if upload {
        (client, server)
    } else {
        // The server learns the client's address (through a proxy: the proxy's outbound
        // socket) from a first datagram, which also opens the proxy's UDP flow.
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut buf = [0_u8; 64];
        let peer = loop {
            assert!(
                Instant::now() < deadline,
                "udp-down: no hello from the client"
            );
            let _ = client.send(b"hello");
            if let Ok((n, from)) = server.recv_from(&mut buf)
                && &buf[..n] == b"hello"
            {
                break from;
            }
        };
        server.connect(peer).expect("connect udp server");
        (server, client)
    };
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let sent_all = Arc::new(AtomicBool::new(false));
    let receiver_inode = nix::sys::stat::fstat(&receiver).expect("fstat").st_ino;
    // Should the sender never say it is done (it panicked), the receiver still ends.
    let give_up = Instant::now() + duration + IO_TIMEOUT;
    let receiving = {
        let sent_all = sent_all.clone();
        thread::spawn(move || {
            let mut seen = vec![0_u64; (total as usize).div_ceil(64)];
            let mut buf = vec![0_u8; 65536];
            let (mut good, mut bad) = (0_u64, 0_u64);
            let mut last = Instant::now();
            let mut ended: Option<Instant> = None;
            while Instant::now() < give_up
                && ended
                    .is_none_or(|t| t.elapsed() < FLOOD_DRAIN_MAX && last.elapsed() < FLOOD_QUIET)
            {
                match receiver.recv(&mut buf) {
                    Ok(n) => {
                        last = Instant::now();
                        match datagram_seq(&buf[..n], 0, size).filter(|&s| s < total) {
                            Some(seq) => {
                                let (word, bit) = ((seq / 64) as usize, 1_u64 << (seq % 64));
                                if seen[word] & bit == 0 {
                                    seen[word] |= bit;
                                    good += 1;
                                } else {
                                    bad += 1;
                                }
                            }
                            // The client's extra hellos of udp-down are no datagrams of
                            // the flood.
                            None if &buf[..n] == b"hello" => {}
                            None => bad += 1,
                        }
                    }
                    Err(e) if !is_timeout(&e) => bad += 1,
                    Err(_) => {}
                }
                if ended.is_none() && sent_all.load(Ordering::Relaxed) {
                    ended = Some(Instant::now());
                    last = last.max(Instant::now());
                }
            }
            // The socket stays open until its drops are read.
            (good, bad, receiver)
        })
    };
    let mut datagrams = vec![0_u8; size * batch];
    let start = Instant::now();
    meter.start();
    let (mut seq, mut offered, mut errors) = (0_u64, 0_u64, 0_u64);
    let batch = batch as u64;
    // Bounded in time too: a sender that cannot keep up stops at the end of the run.
    while seq < total && start.elapsed() < duration {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        // A batch leaves whole, except the last, shorter one.
        if due <= seq || (due < seq + batch && due < total) {
            thread::sleep(Duration::from_micros(50));
            continue;
        }
        for _ in 0..(due - seq).div_ceil(batch).min(UDP_BURST) {
            let count = (due - seq).min(batch);
            let len = count as usize * size;
            for (i, datagram) in datagrams[..len].chunks_mut(size).enumerate() {
                fill_datagram(datagram, 0, seq + i as u64);
            }
            let sent = if batch > 1 {
                send_segmented(&sender, &datagrams[..len], size)
            } else {
                socket2::SockRef::from(&sender)
                    .send_with_flags(&datagrams[..len], nix::libc::MSG_DONTWAIT)
            };
            match sent {
                Ok(_) => offered += count,
                // A queue on the way (the shaper's) was full: the path lost it.
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => offered += count,
                // The sender's own socket was full: not sent.
                Err(e) if is_timeout(&e) => {}
                // ECONNREFUSED and the like: the path reported an error.
                Err(_) => errors += 1,
            }
            seq += count;
        }
    }
    let elapsed = start.elapsed();
    meter.stop();
    sent_all.store(true, Ordering::Relaxed);
    let (good, bad, receiver) = join(receiving);
    let drops = flood_drops(topo, upload, receiver_inode, meter.pid());
    drop(receiver);
    Sample {
        drops: Some(drops),
        units: good,
        bytes: good * size as u64,
        elapsed,
        offered,
        due: ((elapsed.as_secs_f64() * rate as f64) as u64).min(total),
        errors: errors + bad,
        ..Sample::default()
    }
}

/// Sends `buf` on connected `socket` without blocking as datagrams of `size` bytes (the
/// last may be shorter) in one `sendmsg` with a UDP_SEGMENT control message.
fn send_segmented(socket: &UdpSocket, buf: &[u8], size: usize) -> std::io::Result<usize> {
    use nix::libc::{SOL_UDP, UDP_SEGMENT, c_int, cmsghdr};
    let segment = u16::try_from(size).expect("datagram size fits UDP_SEGMENT");
    // One control message laid out as CMSG_LEN/CMSG_SPACE do on Linux: the header
    // (length, level, type), then the u16, padded to the header's alignment.
    const HEADER: usize = size_of::<cmsghdr>();
    let mut control = [0_u8; HEADER + size_of::<usize>()];
    let len = HEADER + size_of::<u16>();
    control[..size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
    let level = size_of::<usize>();
    control[level..level + 4].copy_from_slice(&(SOL_UDP as c_int).to_ne_bytes());
    control[level + 4..level + 8].copy_from_slice(&(UDP_SEGMENT as c_int).to_ne_bytes());
    control[HEADER..HEADER + 2].copy_from_slice(&segment.to_ne_bytes());
    let iov = [std::io::IoSlice::new(buf)];
    let msg = socket2::MsgHdr::new()
        .with_buffers(&iov)
        .with_control(&control);
    socket2::SockRef::from(socket).sendmsg(&msg, nix::libc::MSG_DONTWAIT)
}

/// What the kernel counted as dropped at the end of a flood, by place. The proxy and
/// its TUN are new for each run, so their counters are the run's.
fn flood_drops(topo: &Ends, upload: bool, receiver: u64, proxy: Option<u32>) -> Drops {
    let proxy_inodes = proxy.map(procfs::socket_inodes).unwrap_or_default();
    let tun = topo.tun_name().to_string();
    let (client, tun_queue) =
        join(topo.in_client(move || (procfs::sockets("udp"), procfs::tx_drops(&tun))));
    // A peer's sockets are not in its clients' namespace.
    let proxy_side = join(topo.in_proxy_ns(|| procfs::sockets("udp")));
    let server = join(topo.in_server(|| procfs::sockets("udp")));
    let receiving_side = if upload { &server } else { &client };
    Drops {
        receiver: receiving_side
            .iter()
            .filter(|row| row.inode == receiver)
            .map(|row| row.drops)
            .sum(),
        proxy_sockets: proxy.map(|_| {
            proxy_side
                .iter()
                .filter(|row| proxy_inodes.contains(&row.inode))
                .map(|row| row.drops)
                .sum()
        }),
        tun_queue: proxy.and(tun_queue),
    }
}

/// Datagram layout: flow index, sequence number, then a byte pattern of both.
fn fill_datagram(buf: &mut [u8], flow: usize, seq: u64) {
    buf[..8].copy_from_slice(&(flow as u64).to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    let pattern = (flow as u8) ^ (seq as u8);
    buf[16..].fill(pattern);
}

/// The sequence number of an intact datagram of `flow`, or None.
fn datagram_seq(buf: &[u8], flow: usize, size: usize) -> Option<u64> {
    if buf.len() != size || size < 16 || buf[..8] != (flow as u64).to_le_bytes() {
        return None;
    }
    let seq = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let pattern = (flow as u8) ^ (seq as u8);
    buf[16..].iter().all(|&b| b == pattern).then_some(seq)
}

fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::from([0, 0, 0, 0]),
        IpAddr::V6(_) => IpAddr::from([0_u16; 8]),
    }
}

fn nanos(d: Duration) -> u32 {
    u32::try_from(d.as_nanos()).unwrap_or(u32::MAX)
}

/// Opens `count` connections that the server's kernel establishes but its application
/// never accepts: idle flows through the proxy that hold no fd on the server side (this
/// process could not hold both ends of 10,000 flows within its fd limit). The server
/// namespace's somaxconn must allow the backlog. Dropping both results closes them.
pub fn idle_tcp(topo: &Ends, ip: IpAddr, count: usize) -> (TcpListener, Vec<TcpStream>) {
    let listener = join(topo.in_server(move || {
        let addr = SocketAddr::new(ip, 0);
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .expect("socket");
        socket.bind(&addr.into()).expect("bind idle listener");
        let backlog = i32::try_from(count + 64).unwrap_or(i32::MAX);
        socket.listen(backlog).expect("listen");
        TcpListener::from(socket)
    }));
    let addr = listener.local_addr().expect("listener address");
    let clients = connect_from_client(topo, addr, count);
    (listener, clients)
}

/// `count` UDP flows, each one datagram echoed; returns the sockets (holding the flows
/// open in the proxy until dropped) and how many were answered.
pub fn udp_flows(topo: &Ends, ip: IpAddr, count: usize) -> (Vec<UdpSocket>, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, echo) = udp_echo_server(topo, ip, &stop);
    let (sockets, answered) = join(topo.in_client(move || {
        // Flows open a batch at a time: a burst of all of them would overflow the one
        // echo socket's receive buffer, which is not what this measures.
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut sockets = Vec::with_capacity(count);
        let mut answered = 0;
        let mut buf = [0_u8; 64];
        while sockets.len() < count {
            let batch = (count - sockets.len()).min(UDP_FLOW_BATCH);
            let opened = sockets.len();
            for _ in 0..batch {
                let socket = udp_client(addr);
                socket.send(b"flow").expect("send");
                sockets.push(socket);
            }
            for socket in &sockets[opened..] {
                // Lost datagrams share one deadline rather than a timeout each.
                let left = deadline.saturating_duration_since(Instant::now());
                socket
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .expect("timeout");
                answered += u64::from(socket.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"flow"));
            }
        }
        (sockets, answered)
    }));
    stop.store(true, Ordering::Relaxed);
    join(echo);
    (sockets, answered)
}

/// What [`stalled_downloads`] saw.
pub struct Stalled {
    /// Bytes the servers' kernels took, in total.
    pub bytes: u64,
    /// Server sockets that failed (reset by the path) before the end.
    pub failed: u64,
    /// At the end, bytes received but unread in the kernel: by the proxy's sockets
    /// (its outbound ones: memory the proxy holds outside its RSS) and by the clients'.
    pub proxy_unread: u64,
    pub clients_unread: u64,
}

/// `count` downloads whose clients never read while their servers keep writing, for
/// `duration`; `tick` is called about once a second with the time since the start, and
/// at the end with `duration` before anything closes (to sample the proxy's memory as
/// it fills). Bounded by `duration` however the path behaves: the servers write without
/// blocking.
pub fn stalled_downloads(
    topo: &Ends,
    ip: IpAddr,
    count: usize,
    duration: Duration,
    proxy: u32,
    mut tick: impl FnMut(Duration),
) -> Stalled {
    let (clients, servers) = connection_pairs(topo, ip, count);
    for stream in &servers {
        stream.set_nonblocking(true).expect("nonblocking");
        socket2::SockRef::from(stream)
            .set_send_buffer_size(STALLED_SEND_BUFFER)
            .expect("SO_SNDBUF");
    }
    let chunk = vec![0x5a_u8; BULK_CHUNK];
    let mut live = vec![true; servers.len()];
    let mut stalled = Stalled {
        bytes: 0,
        failed: 0,
        proxy_unread: 0,
        clients_unread: 0,
    };
    let start = Instant::now();
    let mut next_tick = Duration::from_secs(1);
    while start.elapsed() < duration {
        let mut progress = false;
        for (mut stream, live) in servers.iter().zip(&mut live) {
            if !*live {
                continue;
            }
            match stream.write(&chunk) {
                Ok(n) => {
                    stalled.bytes += n as u64;
                    progress = true;
                }
                Err(e) if is_timeout(&e) => {}
                Err(_) => {
                    *live = false;
                    stalled.failed += 1;
                }
            }
        }
        if start.elapsed() >= next_tick && next_tick < duration {
            tick(next_tick);
            next_tick += Duration::from_secs(1);
        }
        if !progress {
            thread::sleep(Duration::from_millis(2));
        }
    }
    tick(duration);
    // Every TCP socket of the client namespace is the proxy's or a client's.
    let proxy_inodes = procfs::socket_inodes(proxy);
    for row in join(topo.in_client(|| procfs::sockets("tcp"))) {
        if proxy_inodes.contains(&row.inode) {
            stalled.proxy_unread += row.rx_queue;
        } else {
            stalled.clients_unread += row.rx_queue;
        }
    }
    // Clients with unread data close with RST, which tears every flow down at once.
    drop(clients);
    stalled
}

/// Queries a dns run keeps outstanding: enough to keep the proxy busy on one flow, few
/// enough that none is lost to a socket buffer.
pub const DNS_WINDOW: usize = 64;
/// Names the cached variant cycles through: far fewer than the fake table holds, so
/// after the first round every query finds its name.
pub const DNS_CACHED_NAMES: u64 = 256;

/// The TUN's peer address with the proxy's default --tun-addr: the documented resolver
/// address, routed into the TUN by the TUN's own prefix. (The server's address would
/// not do: the upstream runs there, and the proxy keeps its upstream's address out of
/// the TUN.)
pub const DNS_RESOLVER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 2));

/// A DNS query for type A of name number `name` (`q<hex>.bench.test`), with `id`.
fn dns_query(buf: &mut Vec<u8>, id: u16, name: u64) {
    buf.clear();
    // Header: id, flags RD, one question, no other records.
    buf.extend_from_slice(&id.to_be_bytes());
    buf.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    let label = format!("q{name:x}");
    buf.push(label.len() as u8);
    buf.extend_from_slice(label.as_bytes());
    for label in ["bench", "test"] {
        buf.push(label.len() as u8);
        buf.extend_from_slice(label.as_bytes());
    }
    // Root label, QTYPE A, QCLASS IN.
    buf.extend_from_slice(&[0, 0, 1, 0, 1]);
}

/// DNS response code of a server failure.
const SERVFAIL: u8 = 2;

/// How `reply` answers `query` (same id and question, a response): NOERROR with at
/// least one answer record (`Some(true)`), SERVFAIL (`Some(false)`); otherwise None.
fn dns_answer(query: &[u8], reply: &[u8]) -> Option<bool> {
    let matches = reply.len() >= query.len()
        && reply[..2] == query[..2]
        && reply[2] & 0x80 != 0
        && reply[4..6] == [0, 1]
        && reply[12..query.len()] == query[12..];
    if !matches {
        return None;
    }
    match reply[3] & 0x0f {
        0 if u16::from_be_bytes([reply[6], reply[7]]) >= 1 => Some(true),
        SERVFAIL => Some(false),
        _ => None,
    }
}

/// UDP DNS queries for type A to `DNS_RESOLVER`:53 for `duration`, `DNS_WINDOW` outstanding: each
/// answer sends the next query. Names are all distinct (`cached` false: the proxy's
/// fake table fills, then reuses its oldest entries) or cycle through
/// `DNS_CACHED_NAMES`. Units are queries answered, with an address or SERVFAIL (also
/// counted apart: the table had no entry free to reuse); a wrong answer, or a query
/// left unanswered for `POLL`, counts as an error (the window is then refilled).
pub fn dns_queries(topo: &Ends, cached: bool, duration: Duration, meter: &Meter) -> Sample {
    let meter = meter.clone();
    join(topo.in_client(move || {
        let socket = udp_client(SocketAddr::new(DNS_RESOLVER, 53));
        socket.set_read_timeout(Some(POLL)).expect("timeout");
        // By id: (when sent, name number) of each outstanding query.
        let mut outstanding: Vec<Option<(Instant, u64)>> = vec![None; 1 << 16];
        let mut in_flight = 0;
        let (mut next, mut errors, mut servfail) = (0_u64, 0_u64, 0_u64);
        let mut latencies = Vec::new();
        let (mut query, mut reply) = (Vec::with_capacity(512), vec![0_u8; 65536]);
        let name_of = |seq: u64| if cached { seq % DNS_CACHED_NAMES } else { seq };
        let start = Instant::now();
        meter.start();
        while start.elapsed() < duration && latencies.len() < MAX_SAMPLES {
            while in_flight < DNS_WINDOW {
                let (id, name) = (next as u16, name_of(next));
                dns_query(&mut query, id, name);
                next += 1;
                match socket.send(&query) {
                    Ok(_) => {
                        outstanding[usize::from(id)] = Some((Instant::now(), name));
                        in_flight += 1;
                    }
                    Err(_) => errors += 1,
                }
            }
            match socket.recv(&mut reply) {
                Ok(n) => {
                    let reply = &reply[..n];
                    let id = reply.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
                    let Some((sent, name)) = id.and_then(|id| outstanding[usize::from(id)].take())
                    else {
                        errors += 1;
                        continue;
                    };
                    in_flight -= 1;
                    dns_query(&mut query, id.unwrap_or_default(), name);
                    match dns_answer(&query, reply) {
                        Some(address) => {
                            servfail += u64::from(!address);
                            let nanos = sent.elapsed().as_nanos();
                            latencies.push(nanos.min(u32::MAX.into()) as u32);
                        }
                        None => errors += 1,
                    }
                }
                Err(e) if is_timeout(&e) => {
                    // Nothing for POLL: whatever is outstanding was lost.
                    errors += in_flight as u64;
                    outstanding.iter_mut().for_each(|slot| *slot = None);
                    in_flight = 0;
                }
                Err(_) => errors += 1,
            }
        }
        let elapsed = start.elapsed();
        meter.stop();
        Sample {
            units: latencies.len() as u64,
            bytes: 0,
            elapsed,
            latencies,
            errors,
            servfail,
            ..Sample::default()
        }
    }))
}
