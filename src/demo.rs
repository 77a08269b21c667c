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

use crate::error::Error;

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 2);
const TCP_PORT: u16 = 5001;
const UDP_PORT: u16 = 5002;
const TCP_BYTES: usize = 256 << 20;
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

pub fn run() -> Result<(), Error> {
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
    let (c, s) = (ns.client.as_str(), ns.server.as_str());
    println!("demo: namespaces {c} (client + proxy) and {s} (server), veth 10.199.0.0/24");
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
    let proxy = Command::new("ip")
        .args(["netns", "exec", c])
        .arg(&exe)
        .args(["-i", "updc0", "--tun", "updtun0", "--route", &route])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| Error::Io("start the proxy", err))?;
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
    println!("demo: proxy running in {c}, routing {route} into its TUN");

    // Servers: TCP echo-with-hash and UDP echo.
    let tcp_server = in_netns(s, || {
        let listener = TcpListener::bind((SERVER_IP, TCP_PORT)).expect("bind TCP");
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(IO_TIMEOUT)).ok();
        let mut hash = FNV_START;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => hash = fnv(hash, &buf[..n]),
            }
        }
        stream.write_all(&hash.to_be_bytes()).ok();
        hash
    });
    let udp_done = Arc::new(AtomicBool::new(false));
    let udp_stop = Arc::clone(&udp_done);
    let udp_server = in_netns(s, move || {
        let socket = UdpSocket::bind((SERVER_IP, UDP_PORT)).expect("bind UDP");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .ok();
        let mut buf = [0u8; 2048];
        // Until the client is done, however long its TCP part takes.
        while !udp_stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                socket.send_to(&buf[..n], from).ok();
            }
        }
    });
    thread::sleep(Duration::from_millis(100));

    let client = in_netns(c, || {
        let started = Instant::now();
        let mut stream = TcpStream::connect_timeout(
            &SocketAddr::new(IpAddr::V4(SERVER_IP), TCP_PORT),
            IO_TIMEOUT,
        )
        .expect("connect through the proxy");
        stream.set_read_timeout(Some(IO_TIMEOUT)).ok();
        stream.set_write_timeout(Some(IO_TIMEOUT)).ok();
        let mut hash = FNV_START;
        let chunk: Vec<u8> = (0..1 << 16).map(pattern).collect();
        for _ in 0..TCP_BYTES / chunk.len() {
            stream.write_all(&chunk).expect("send");
            hash = fnv(hash, &chunk);
        }
        stream.shutdown(Shutdown::Write).ok();
        let mut reply = [0u8; 8];
        stream.read_exact(&mut reply).expect("server's hash");
        let seconds = started.elapsed().as_secs_f64();
        let same = u64::from_be_bytes(reply) == hash;

        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind UDP");
        socket.connect((SERVER_IP, UDP_PORT)).expect("connect UDP");
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
        (seconds, same, echoed)
    });
    let client = client.join();
    udp_done.store(true, Ordering::Relaxed);
    let Ok((seconds, same, echoed)) = client else {
        return Err(Error::Usage(format!(
            "demo client failed; the proxy said:\n{}",
            proxy.stop_and_report()
        )));
    };
    let server_hash = tcp_server.join().ok();
    udp_server.join().ok();
    // Both ends hash every byte here, so this is no throughput figure (see bench/).
    println!(
        "demo: TCP  {} MiB client -> server in {seconds:.2} s, hash {}",
        TCP_BYTES >> 20,
        if same && server_hash.is_some() {
            "matches"
        } else {
            "DIFFERS"
        }
    );
    println!("demo: UDP  {echoed} of 100 datagrams echoed");
    let ping = Command::new("ip")
        .args([
            "netns", "exec", c, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "1",
        ])
        .arg(SERVER_IP.to_string())
        .output();
    match ping {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let summary = text
                .lines()
                .filter(|l| l.contains("received") || l.contains("rtt"))
                .collect::<Vec<_>>();
            println!("demo: ping {}", summary.join("; "));
        }
        Err(_) => println!("demo: ping not installed (iputils-ping); skipped"),
    }

    // The proxy's own account, then a clean stop.
    let report = proxy.stop_and_report();
    println!("demo: the proxy's counters:");
    for line in report.lines().filter(|l| l.contains("uringproxy: info:")) {
        println!("  {}", line.trim_start_matches("uringproxy: info: "));
    }
    drop(ns);
    println!("demo: namespaces removed");
    let relayed = report.contains("flows: opened 1 ");
    if same && echoed > 90 && relayed {
        Ok(())
    } else {
        Err(Error::Usage(
            "demo traffic did not get through intact".into(),
        ))
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
