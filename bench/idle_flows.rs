//! Does per-packet cost grow with the number of flows? Bulk throughput through the proxy
//! with no other flows vs with 5,000 established idle flows, interleaved in one run.
//!
//! Run as root: `cargo bench --bench idle_flows` (IDLE_FLOWS, ROUNDS, SECONDS_PER_RUN override
//! the defaults 5000, 3 and 3). It builds its own two namespaces and removes them after.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Topology, join};

const IDLE_PORT: u16 = 7001;
const BULK_PORT: u16 = 7002;
const CHUNK: usize = 256 * 1024;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends as fast as possible for `seconds` over one connection through the proxy;
/// returns Gbit/s as counted by the receiving server.
fn bulk(topo: &Topology, server: SocketAddr, seconds: u64) -> f64 {
    let sink = topo.in_server(move || {
        let listener = TcpListener::bind(server).expect("bind bulk listener");
        let (mut stream, _) = listener.accept().expect("accept bulk");
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        let start = Instant::now();
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
    });
    std::thread::sleep(Duration::from_millis(100));
    let source = topo.in_client(move || {
        let mut stream = TcpStream::connect(server).expect("connect bulk");
        stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let buf = vec![0x5au8; CHUNK];
        let deadline = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < deadline {
            stream.write_all(&buf).expect("bulk write");
        }
        stream.shutdown(Shutdown::Write).ok();
    });
    join(source);
    join(sink)
}

/// Opens `count` connections through the proxy to a server that accepts and holds them.
fn open_idle(
    topo: &Topology,
    server: SocketAddr,
    count: usize,
) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let acceptor = topo.in_server(move || {
        let listener = TcpListener::bind(server).expect("bind idle listener");
        ready_tx.send(()).unwrap();
        (0..count)
            .map(|_| listener.accept().expect("accept idle").0)
            .collect::<Vec<_>>()
    });
    ready_rx.recv().unwrap();
    let clients = join(topo.in_client(move || {
        (0..count)
            .map(|i| TcpStream::connect(server).unwrap_or_else(|e| panic!("idle #{i}: {e}")))
            .collect::<Vec<_>>()
    }));
    (clients, join(acceptor))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("idle_flows: needs root (network namespaces); skipped");
        return;
    }
    let idle = env_or("IDLE_FLOWS", 5000) as usize;
    let rounds = env_or("ROUNDS", 3) as usize;
    let seconds = env_or("SECONDS_PER_RUN", 3);
    // Client and server ends of every idle flow live in this process.
    let want = (2 * idle + 1024) as u64;
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, want);

    let topo = Topology::new();
    let proxy = topo.start_proxy(&[]);
    let bulk_addr = SocketAddr::new(topo.server_v4(), BULK_PORT);
    let idle_addr = SocketAddr::new(topo.server_v4(), IDLE_PORT);

    let mut ratios = Vec::new();
    println!("| round | no idle flows (Gbit/s) | {idle} idle flows (Gbit/s) | ratio |");
    println!("| --- | --- | --- | --- |");
    for round in 1..=rounds {
        let base = bulk(&topo, bulk_addr, seconds);
        let held = open_idle(&topo, idle_addr, idle);
        eprintln!(
            "round {round}: {} idle flows open, proxy fds {}, proxy RSS {} KiB",
            held.0.len(),
            proxy.fd_count(),
            proxy.rss_kib()
        );
        let loaded = bulk(&topo, bulk_addr, seconds);
        drop(held);
        // Let the proxy tear the idle flows down before the next baseline.
        common::wait_until(Duration::from_secs(10), || proxy.fd_count() < 64);
        eprintln!(
            "round {round}: idle flows closed, proxy RSS {} KiB",
            proxy.rss_kib()
        );
        let ratio = loaded / base;
        ratios.push(ratio);
        println!("| {round} | {base:.2} | {loaded:.2} | {ratio:.3} |");
    }
    println!(
        "\nmedian ratio (with {idle} idle flows / without): {:.3}",
        median(&mut ratios)
    );
}
