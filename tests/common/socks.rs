//! SOCKS5 servers (and other daemons) run in a test's server namespace: microsocks
//! for CONNECT, danted for UDP ASSOCIATE, each stopped with its process group on drop.

use std::fs;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use super::{Topology, join, wait_until};

/// A free TCP (and UDP) port on `ip` in the server namespace.
pub fn free_port(topo: &Topology, ip: IpAddr) -> u16 {
    join(topo.in_server(move || {
        let listener = TcpListener::bind((ip, 0)).expect("bind a free port");
        listener.local_addr().unwrap().port()
    }))
}

/// A SOCKS5 server process in the server namespace, with a scratch directory for its
/// configuration and log; its process group is stopped (SIGTERM, then SIGKILL) and the
/// directory removed on drop.
pub struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    pub addr: SocketAddr,
}

impl Daemon {
    pub fn dir(name: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "upx-socks-{name}-{}-{nanos:08x}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).expect("create the daemon's directory");
        dir
    }

    /// Runs `program args` in the server namespace and waits until `addr` accepts.
    pub fn start(
        topo: &Topology,
        dir: PathBuf,
        addr: SocketAddr,
        program: &str,
        args: &[&str],
    ) -> Daemon {
        let log = fs::File::create(dir.join("log")).expect("create the daemon log");
        let child = Command::new("ip")
            .args(["netns", "exec", topo.server_ns(), program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own group: a daemon that forks is stopped whole.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let mut daemon = Daemon {
            child: Some(child),
            dir,
            addr,
        };
        let up = wait_until(Duration::from_secs(5), || {
            daemon.assert_running();
            join(topo.in_server(move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            }))
        });
        assert!(up, "{program} not listening on {addr}:\n{}", daemon.log());
        daemon
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    pub fn assert_running(&mut self) {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("SOCKS server exited ({status}):\n{}", self.log());
        }
    }

    /// Stops it (as an upstream going away does).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        let exited = wait_until(Duration::from_secs(3), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = child.wait();
        // Its forked helpers leave with the group: give them a moment.
        wait_until(Duration::from_secs(2), || {
            nix::sys::signal::killpg(group, None).is_err()
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("--- SOCKS server log ---\n{}--- end ---", self.log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// microsocks on the server's IPv4 address, with `-u user -P pass` if given.
pub fn microsocks(topo: &Topology, auth: Option<(&str, &str)>) -> Daemon {
    let ip = topo.server_v4();
    let port = free_port(topo, ip);
    let (ip_text, port_text) = (ip.to_string(), port.to_string());
    let mut args = vec!["-i", &ip_text, "-p", &port_text];
    if let Some((user, password)) = auth {
        args.extend(["-u", user, "-P", password]);
    }
    let addr = SocketAddr::new(ip, port);
    Daemon::start(topo, Daemon::dir("microsocks"), addr, "microsocks", &args)
}

/// danted on the server's IPv4 address, relaying CONNECT and UDP for anyone, its
/// configuration written into its own directory.
pub fn danted(topo: &Topology) -> Daemon {
    danted_on(topo, topo.server_v4())
}

/// danted listening (and relaying UDP) on `ip`, one of the server's addresses.
pub fn danted_on(topo: &Topology, ip: IpAddr) -> Daemon {
    let port = free_port(topo, ip);
    let dir = Daemon::dir("danted");
    let config = format!(
        "logoutput: stderr\n\
         internal: {ip} port = {port}\n\
         external: {veth}\n\
         clientmethod: none\n\
         socksmethod: none\n\
         user.privileged: root\n\
         user.unprivileged: nobody\n\
         client pass {{ from: 0/0 to: 0/0 }}\n\
         socks pass {{ from: 0/0 to: 0/0 command: connect udpassociate udpreply }}\n",
        veth = topo.server_veth()
    );
    let path = dir.join("danted.conf");
    fs::write(&path, config).expect("write danted.conf");
    let (path, pid) = (path.to_string_lossy().into_owned(), dir.join("pid"));
    let pid = pid.to_string_lossy().into_owned();
    let addr = SocketAddr::new(ip, port);
    Daemon::start(
        topo,
        dir,
        addr,
        "danted",
        &["-f", &path, "-p", &pid, "-N", "1"],
    )
}

pub fn upstream_arg(addr: SocketAddr, auth: Option<(&str, &str)>) -> String {
    match auth {
        Some((user, password)) => format!("socks5://{user}:{password}@{addr}"),
        None => format!("socks5://{addr}"),
    }
}
