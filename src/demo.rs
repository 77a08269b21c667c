//! `uringproxy demo`: shows the proxy working on any Linux box without touching the
//! host's routing. It builds two network namespaces joined by a veth pair, runs the
//! proxy in one with `--route` to the other, moves TCP, UDP and ping traffic through
//! it, prints what the proxy counted, and removes everything again.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::cli::DemoArgs;
use crate::error::Error;

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 2);
const TCP_UPLOAD_PORT: u16 = 5001;
const UDP_PORT: u16 = 5002;
const TCP_DOWNLOAD_PORT: u16 = 5003;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// The two namespaces; deleted on drop, also when the demo fails half-way.
struct Namespaces {
    client: String,
    server: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), Error> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|err| Error::Io("run `ip` (install iproute2)", err))?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open namespace");
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// A 64-bit FNV-1a hash, to show the bytes arrived unchanged.
fn fnv(hash: u64, data: &[u8]) -> u64 {
    data.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Prints a line of the demo's report. A closed stdout (`demo | head`) is not an error
/// of the demo: the rest of the report is dropped, the demo still cleans up.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub fn run(args: DemoArgs) -> Result<(), Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotPermitted(
            "create network namespaces for the demo",
        ));
    }
    let id = std::process::id();
    let ns = Namespaces {
        client: format!("upd-c-{id}"),
        server: format!("upd-s-{id}"),
    };
    interrupt::clean_up_on_signals(&ns)?;
    let (c, s) = (ns.client.as_str(), ns.server.as_str());
    say!("demo: namespaces {c} (client + proxy) and {s} (server), veth 10.199.0.0/24");
    ip(&["netns", "add", c])?;
    ip(&["netns", "add", s])?;
    ip(&[
        "-n", c, "link", "add", "updc0", "type", "veth", "peer", "name", "upds0", "netns", s,
    ])?;
    ip(&["-n", c, "addr", "add", "10.199.0.1/24", "dev", "updc0"])?;
    ip(&["-n", s, "addr", "add", "10.199.0.2/24", "dev", "upds0"])?;
    for (netns, dev) in [(c, "updc0"), (s, "upds0")] {
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        ip(&["-n", netns, "link", "set", dev, "up"])?;
    }

    let exe = std::env::current_exe().map_err(|err| Error::Io("find own binary", err))?;
    let route = format!("{SERVER_IP}/32");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", c])
        .arg(&exe)
        .args(["-i", "updc0", "--tun", "updtun0", "--route", &route])
        // Demos may run side by side (each in namespaces of its own): the default
        // control socket, named after the TUN, would be taken by the first.
        .args(["--control", "none"]);
    if args.no_offload {
        command.arg("--no-offload");
    }
    let proxy = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| Error::Io("start the proxy", err))?;
    interrupt::set_proxy(proxy.id());
    let mut proxy = ProxyProcess::new(proxy);
    // Wait for the proxy's rule: until then the server is reachable directly.
    let started = Instant::now();
    loop {
        let rules = Command::new("ip").args(["-n", c, "rule", "show"]).output();
        if rules.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("lookup 30064")) {
            break;
        }
        if started.elapsed() > Duration::from_secs(5) || proxy.exited() {
            return Err(Error::Usage(format!(
                "the proxy did not come up:\n{}",
                proxy.stop_and_report()
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
    say!("demo: proxy running in {c}, routing {route} into its TUN");

    let bytes = args.bytes;
    let servers = Servers::start(s, bytes);
    thread::sleep(Duration::from_millis(100));
    let client = in_netns(c, move || {
        let up = tcp_upload(bytes);
        let down = tcp_download(bytes);
        (up, down, udp_echoes())
    })
    .join();
    servers.stop();
    let Ok((Ok(up), Ok(down), echoed)) = client else {
        let failed = match &client {
            Ok((Err(err), _, _)) => format!("upload: {err}"),
            Ok((_, Err(err), _)) => format!("download: {err}"),
            _ => "the client panicked".into(),
        };
        return Err(Error::Usage(format!(
            "demo client failed ({failed}); the proxy said:\n{}",
            proxy.stop_and_report()
        )));
    };
    // Both ends hash every byte here, so these are no throughput figures (see bench/).
    for (direction, transfer) in [("client -> server", &up), ("server -> client", &down)] {
        say!(
            "demo: TCP  {} bytes {direction} in {:.2} s, hash {}",
            transfer.bytes,
            transfer.seconds,
            if transfer.intact {
                "matches"
            } else {
                "DIFFERS"
            }
        );
    }
    say!("demo: UDP  {echoed} of 100 datagrams echoed");
    let ping = Command::new("ip")
        .args([
            "netns", "exec", c, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "1",
        ])
        .arg(SERVER_IP.to_string())
        .output();
    let pinged = match ping {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let summary = text
                .lines()
                .filter(|l| l.contains("received") || l.contains("rtt"))
                .collect::<Vec<_>>();
            say!("demo: ping {}", summary.join("; "));
            out.status.success()
        }
        Err(_) => {
            say!("demo: ping not installed (iputils-ping); skipped");
            true
        }
    };

    // The proxy's own account, then a clean stop. A proxy that died took its rule
    // along, and the traffic went around it: that is a failure, whatever the hashes say.
    let died = proxy.exited();
    let report = proxy.stop_and_report();
    if died {
        return Err(Error::Usage(format!(
            "the proxy exited during the demo:\n{report}"
        )));
    }
    say!("demo: the proxy's counters:");
    for line in report
        .lines()
        .filter_map(|l| l.strip_prefix("uringproxy: "))
    {
        say!("  {}", line.trim_start_matches("info: "));
    }
    drop(ns);
    say!("demo: namespaces removed");
    let relayed = report.contains("flows: opened 2 ");
    if up.intact && down.intact && echoed > 90 && pinged && relayed {
        Ok(())
    } else {
        Err(Error::Usage(
            "demo traffic did not get through intact".into(),
        ))
    }
}

/// One TCP transfer as the client saw it.
struct Transfer {
    bytes: u64,
    /// The receiver's hash of the bytes equals the sender's.
    intact: bool,
    seconds: f64,
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let stream =
        TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(SERVER_IP), port), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Sends `bytes` of the pattern, half-closes, and reads back the server's hash of them.
fn tcp_upload(bytes: u64) -> std::io::Result<Transfer> {
    let started = Instant::now();
    let mut stream = connect(TCP_UPLOAD_PORT)?;
    let hash = write_pattern(&mut stream, bytes)?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 8];
    stream.read_exact(&mut reply)?;
    Ok(Transfer {
        bytes,
        intact: u64::from_be_bytes(reply) == hash,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Reads everything the server sends until it closes, hashing it.
fn tcp_download(bytes: u64) -> std::io::Result<Transfer> {
    let started = Instant::now();
    let mut stream = connect(TCP_DOWNLOAD_PORT)?;
    let (received, hash) = read_hashing(&mut stream)?;
    if received != bytes {
        return Err(std::io::Error::other(format!(
            "{received} of {bytes} bytes arrived"
        )));
    }
    Ok(Transfer {
        bytes: received,
        intact: hash == expected_hash(bytes),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// 100 datagrams to the UDP echo server; how many came back unchanged.
fn udp_echoes() -> u32 {
    let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
        return 0;
    };
    if socket.connect((SERVER_IP, UDP_PORT)).is_err() {
        return 0;
    }
    socket.set_read_timeout(Some(Duration::from_secs(1))).ok();
    let mut echoed = 0;
    for i in 0..100u32 {
        let datagram = i.to_be_bytes().repeat(64);
        socket.send(&datagram).ok();
        let mut buf = [0u8; 512];
        if socket.recv(&mut buf).ok() == Some(datagram.len())
            && buf[..datagram.len()] == datagram[..]
        {
            echoed += 1;
        }
    }
    echoed
}

/// Writes `bytes` of the pattern; returns their hash.
fn write_pattern(out: &mut impl Write, bytes: u64) -> std::io::Result<u64> {
    let chunk: Vec<u8> = (0..1 << 16).map(pattern).collect();
    let mut hash = FNV_START;
    let mut left = bytes;
    while left > 0 {
        let part = &chunk[..chunk.len().min(left as usize)];
        out.write_all(part)?;
        hash = fnv(hash, part);
        left -= part.len() as u64;
    }
    Ok(hash)
}

/// The hash of `bytes` of the pattern.
fn expected_hash(bytes: u64) -> u64 {
    write_pattern(&mut std::io::sink(), bytes).unwrap_or(0)
}

/// Reads until EOF (or a timeout or reset: then what arrived so far); returns the byte
/// count and their hash.
fn read_hashing(input: &mut impl Read) -> std::io::Result<(u64, u64)> {
    let mut hash = FNV_START;
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match input.read(&mut buf)? {
            0 => return Ok((total, hash)),
            n => {
                hash = fnv(hash, &buf[..n]);
                total += n as u64;
            }
        }
    }
}

/// The server side: TCP upload (hash what arrives, answer with it), TCP download (send
/// the pattern, then close) and UDP echo, in the server namespace.
struct Servers {
    upload: thread::JoinHandle<()>,
    download: thread::JoinHandle<()>,
    udp: thread::JoinHandle<()>,
    udp_stop: Arc<AtomicBool>,
}

impl Servers {
    fn start(ns: &str, bytes: u64) -> Servers {
        let upload = in_netns(ns, || {
            let Ok(listener) = TcpListener::bind((SERVER_IP, TCP_UPLOAD_PORT)) else {
                return;
            };
            if let Ok((mut stream, _)) = listener.accept() {
                stream.set_read_timeout(Some(IO_TIMEOUT)).ok();
                if let Ok((_, hash)) = read_hashing(&mut stream) {
                    let _ = stream.write_all(&hash.to_be_bytes());
                }
            }
        });
        let download = in_netns(ns, move || {
            let Ok(listener) = TcpListener::bind((SERVER_IP, TCP_DOWNLOAD_PORT)) else {
                return;
            };
            if let Ok((mut stream, _)) = listener.accept() {
                stream.set_write_timeout(Some(IO_TIMEOUT)).ok();
                let _ = write_pattern(&mut stream, bytes);
            }
        });
        let udp_stop = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&udp_stop);
        let udp = in_netns(ns, move || {
            let Ok(socket) = UdpSocket::bind((SERVER_IP, UDP_PORT)) else {
                return;
            };
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .ok();
            let mut buf = [0u8; 2048];
            // Until the client is done, however long its TCP part takes.
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    socket.send_to(&buf[..n], from).ok();
                }
            }
        });
        Servers {
            upload,
            download,
            udp,
            udp_stop,
        }
    }

    /// Waits for the servers to finish.
    fn stop(self) {
        self.udp_stop.store(true, Ordering::Relaxed);
        for server in [self.udp, self.download, self.upload] {
            let _ = server.join();
        }
    }
}

/// The proxy child, with its stderr drained on a thread (a full pipe would block it);
/// killed if the demo ends early.
struct ProxyProcess {
    child: Child,
    stderr: Option<thread::JoinHandle<String>>,
}

impl ProxyProcess {
    fn new(mut child: Child) -> ProxyProcess {
        let stderr = child.stderr.take().map(|mut pipe| {
            thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        });
        ProxyProcess { child, stderr }
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM (the proxy prints its counters and exits; SIGKILL after 3 s), then
    /// everything it wrote to stderr.
    fn stop_and_report(&mut self) -> String {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.exited() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr
            .take()
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ctrl-C, SIGTERM, SIGHUP (the terminal closing) or SIGQUIT in the middle of the demo: the
/// proxy child and both namespaces go, as they do at the end.
mod interrupt {
    use std::process::Command;
    use std::sync::Mutex;
    use std::thread;

    use nix::sys::signal::{SigSet, Signal, kill};
    use nix::unistd::Pid;

    use super::Namespaces;
    use crate::error::Error;

    /// The namespaces and the proxy's pid, once started.
    static STATE: Mutex<(Vec<String>, Option<u32>)> = Mutex::new((Vec::new(), None));

    /// Takes the signals over from their default (dying on the spot). Call before any
    /// other thread exists: they all inherit the blocked mask, so only the watcher
    /// receives them.
    pub fn clean_up_on_signals(ns: &Namespaces) -> Result<(), Error> {
        let mut set = SigSet::empty();
        for signal in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
        ] {
            set.add(signal);
        }
        set.thread_block()
            .map_err(|err| Error::Io("block signals", err.into()))?;
        *lock() = (vec![ns.client.clone(), ns.server.clone()], None);
        thread::spawn(move || {
            let Ok(signal) = set.wait() else {
                return;
            };
            let state = lock();
            if let Some(pid) = state.1 {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            for ns in &state.0 {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
            eprintln!("demo: {signal}: proxy stopped, namespaces removed");
            std::process::exit(128 + signal as i32);
        });
        Ok(())
    }

    pub fn set_proxy(pid: u32) {
        lock().1 = Some(pid);
    }

    fn lock() -> std::sync::MutexGuard<'static, (Vec<String>, Option<u32>)> {
        STATE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
