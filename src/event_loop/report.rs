//! The counters, printed on SIGUSR1 and at exit whatever the log level (they answer
//! the user), and logged every 10 s at debug level (with every flow's state at trace
//! level).

use std::time::Duration;

use log::{debug, trace};

use super::Proxy;
use crate::control::report;
use crate::logger;

/// How often counters are logged at debug level.
const INTERVAL: Duration = Duration::from_secs(10);

impl Proxy {
    /// Brings the copies of the transmit pool's and the datagram relay's counters up
    /// to date. UDP socket drops are then those of closed flows only: summing the open
    /// flows' costs a system call each, too much for every metrics scrape.
    pub(super) fn refresh_counters(&mut self) {
        self.stats.tx = self.stack.tx.counters.clone();
        self.stats.udp = self.udp.flows.counters.clone();
        self.stats.upstream.udp_not_held = self.udp.not_held;
        if let Some(dns) = &self.dns {
            self.stats.dns = dns.counters();
        }
    }

    fn gather(&mut self) {
        self.refresh_counters();
        self.stats.udp.socket_drops = self.udp.socket_drops();
    }

    /// The report (`control::report`), counters brought up to date first.
    fn report(&mut self) -> String {
        self.gather();
        let mut text = String::new();
        // A String takes whatever is written.
        let _ = self.with_report(|info, snapshot| report::write(&mut text, info, snapshot));
        text
    }

    pub(super) fn print_counters(&mut self) {
        for line in self.report().lines() {
            logger::line(format_args!("{line}"));
        }
    }

    pub(super) fn log_counters(&mut self) {
        let now = std::time::Instant::now();
        if now - self.last_report < INTERVAL || !log::log_enabled!(log::Level::Debug) {
            return;
        }
        self.last_report = now;
        for line in self.report().lines() {
            debug!("{line}");
        }
        if log::log_enabled!(log::Level::Trace) {
            for (id, entry) in self.tcp.table.iter() {
                trace!(
                    "flow {id:?} {:?}: {}",
                    entry.flow.key(),
                    entry.flow.describe()
                );
            }
        }
    }
}
