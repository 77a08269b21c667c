//! User-space network stacks that are not TUN proxies (pasta, slirp4netns): each serves
//! a child namespace of the client namespace through a tap device of its own, and its
//! sockets leave from the client namespace. Also where each run's ends live.

use std::fs::File;
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::{self, Topology, in_netns, wait_until};
use crate::{STARTUP_TIMEOUT, cleanup_list, ip_ok, probe_until_works};

/// The namespaces a run's clients and servers live in. Through a TUN proxy the clients
/// share the client namespace with it; through a peer they live in the child namespace
/// it serves.
pub struct Ends {
    pub client_ns: String,
    server_ns: String,
    /// Where the proxy's (or peer's) own sockets live.
    proxy_ns: String,
    /// The device that carries the clients' packets to the proxy: its TUN, a peer's tap.
    tun: String,
}

impl Ends {
    pub fn of(topo: &Topology) -> Ends {
        Ends {
            client_ns: topo.client_ns().into(),
            server_ns: topo.server_ns().into(),
            proxy_ns: topo.client_ns().into(),
            tun: topo.tun_name().into(),
        }
    }

    pub fn in_client<T, F>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        in_netns(&self.client_ns, f)
    }

    pub fn in_server<T, F>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        in_netns(&self.server_ns, f)
    }

    pub fn in_proxy_ns<T, F>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        in_netns(&self.proxy_ns, f)
    }

    pub fn tun_name(&self) -> &str {
        &self.tun
    }
}

/// The peers the bench knows how to run (`--peer NAME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pasta,
    Slirp4netns,
}

/// The tap device either peer creates in the child namespace.
const TAP: &str = "tap0";

impl Kind {
    pub fn parse(name: &str) -> Result<Kind, String> {
        match name {
            "pasta" => Ok(Kind::Pasta),
            "slirp4netns" => Ok(Kind::Slirp4netns),
            other => Err(format!("unknown peer {other:?} (pasta, slirp4netns)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Pasta => "pasta",
            Kind::Slirp4netns => "slirp4netns",
        }
    }

    /// The command run in the client namespace; `{netns}` is the child namespace's path
    /// and `{iface}` the client's veth. Both give the child slirp's usual addresses
    /// (10.0.2.100/24, gateway 10.0.2.2) and a 65,520-byte MTU; pasta stays in the
    /// foreground and as root (it would drop to nobody and then fail to enter the
    /// namespace) and forwards no ports inwards.
    pub fn command(self) -> &'static str {
        match self {
            Kind::Pasta => {
                "pasta -f -q --runas 0:0 -4 -i {iface} -a 10.0.2.100 -n 24 -g 10.0.2.2 \
                 -I tap0 --config-net -t none -u none -T none -U none --netns {netns}"
            }
            Kind::Slirp4netns => {
                "slirp4netns --configure --mtu=65520 --disable-host-loopback \
                 --netns-type=path {netns} tap0"
            }
        }
    }

    /// Whether the program is installed.
    pub fn installed(self) -> bool {
        Command::new("sh")
            .args(["-c", &format!("command -v {}", self.name())])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

/// A peer started for one run, with the child namespace it serves; both removed on drop.
pub struct Running {
    child: Child,
    namespace: String,
}

impl Running {
    /// Makes a child namespace, starts `kind` in the client namespace to serve it and
    /// waits until a connection from the child to `server` works.
    pub fn start(
        topo: &Topology,
        kind: Kind,
        server: IpAddr,
        log: &File,
    ) -> Result<Running, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let namespace = format!(
            "upx-p-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        if !ip_ok(&format!("netns add {namespace}")) {
            return Err(format!("ip netns add {namespace} failed"));
        }
        let command = kind
            .command()
            .replace("{netns}", &format!("/run/netns/{namespace}"))
            .replace("{iface}", topo.client_veth());
        let child = {
            let mut cleanup = cleanup_list();
            cleanup.0.push(namespace.clone());
            let spawned = Command::new("ip")
                .args(["netns", "exec", topo.client_ns(), "sh", "-c"])
                .arg(format!("exec {command}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log.try_clone().map_err(|e| e.to_string())?)
                .spawn();
            match spawned {
                Ok(child) => {
                    cleanup.1.push(child.id());
                    child
                }
                Err(e) => {
                    drop(cleanup);
                    remove_namespace(&namespace);
                    return Err(format!("spawn `{command}`: {e}"));
                }
            }
        };
        let mut running = Running { child, namespace };
        let ns = running.namespace.clone();
        let configured = wait_until(STARTUP_TIMEOUT, || {
            running.still_running().is_ok()
                && common::try_run("ip", &["-n", &ns, "route", "show", "default"])
                    .is_some_and(|routes| routes.contains(TAP))
        });
        running.still_running()?;
        if !configured {
            return Err(format!(
                "`{command}` set up no {TAP} in {STARTUP_TIMEOUT:?}"
            ));
        }
        probe_until_works(&ns, server, &command)?;
        Ok(running)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The ends of a run through this peer.
    pub fn ends(&self, topo: &Topology) -> Ends {
        Ends {
            client_ns: self.namespace.clone(),
            tun: TAP.into(),
            ..Ends::of(topo)
        }
    }

    /// The peer must still run at the end of a run: otherwise nothing carried it.
    pub fn still_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(format!("the peer exited ({status})")),
            _ => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let pid = self.pid();
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        cleanup_list().1.retain(|&p| p != pid);
        remove_namespace(&self.namespace);
    }
}

fn remove_namespace(namespace: &str) {
    let _ = ip_ok(&format!("netns del {namespace}"));
    cleanup_list().0.retain(|ns| ns != namespace);
}
