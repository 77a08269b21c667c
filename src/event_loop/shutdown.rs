//! Stopping: every flow reset (RST to both ends, in rounds when more are owed than
//! there are TUN write buffers), then the ring drained before the TUN closes, and the
//! process held until the kernel has removed the TUN, so that an immediate restart
//! with the same `--tun` (what `systemctl restart` does) finds the name free.

use std::time::Duration;

use log::warn;

use super::tun_io;
use super::{MAX_COMPLETIONS_PER_TURN, Proxy};
use crate::sys;
use crate::uring::Token;

/// How long resetting every flow may take before the process exits.
const RESET_LIMIT: Duration = Duration::from_millis(800);

impl Proxy {
    /// Resets every flow: linger 0 on the outbound sockets (closing them sends RST) and
    /// an RST to each client, written to the TUN in rounds until all are out or time
    /// is up.
    pub(super) fn reset_all(&mut self) {
        for (_, entry) in self.tcp.table.iter_mut() {
            if let Some(socket) = &entry.socket {
                let _ = socket.set_linger(Some(Duration::ZERO));
            }
            entry.flow.abort();
        }
        let deadline = std::time::Instant::now() + RESET_LIMIT;
        let mut completions = std::mem::take(&mut self.completions);
        while std::time::Instant::now() < deadline {
            let now = self.now();
            let mut owed = false;
            for (_, entry) in self.tcp.table.iter_mut() {
                let iface = self.stack.ifaces.serving(&entry.flow.key().server.addr);
                owed |= entry.flow.flush(now, iface, &mut self.stack.tx);
            }
            self.stack.tx.take_exhausted();
            self.tun
                .flush_writes(&mut self.ring, &mut self.stack.tx, &mut self.stats);
            let _ = self.ring.submit_and_wait(Some(Duration::from_millis(10)));
            self.ring.drain(&mut completions, MAX_COMPLETIONS_PER_TURN);
            for completion in &completions {
                if let Some(token) = Token::decode(completion.token) {
                    tun_io::release_write(&mut self.stack.tx, token);
                }
            }
            if !owed {
                break;
            }
        }
        self.completions = completions;
    }
}

/// Drains the ring (cancelling everything in flight), then closes the sockets (those
/// set to linger 0 send their RST now) and the TUN, and waits up to `limit` for the
/// kernel to remove the TUN. Should the drain fail, the files still close: what the
/// kernel then holds on to it lets go of when the process exits.
pub fn finish(proxy: Proxy, limit: Duration) {
    let Proxy {
        mut ring,
        tun,
        tcp,
        udp,
        ..
    } = proxy;
    if !ring.cancel_all(limit) {
        warn!("io_uring operations still in flight at exit");
    }
    drop((tcp, udp));
    let name = tun.tun.name().to_string();
    drop(tun);
    let deadline = std::time::Instant::now() + limit;
    while sys::interface_index(&name).is_some() {
        if std::time::Instant::now() >= deadline {
            warn!("TUN {name} still present at exit");
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
