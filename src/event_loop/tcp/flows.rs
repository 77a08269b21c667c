//! The loop's table of TCP flows: each flow with what the loop keeps for it, the queue of
//! flows with work, and the memory of ended flows kept for new ones.

use std::rc::Rc;
use std::time::Duration;

use smoltcp::time::Instant;
use socket2::Socket;

use super::super::outbound::Upstream;
use crate::control::wire::{FlowRow, Proto, State};
use crate::flow::budget::Budget;
use crate::flow::tcp::admission::{Admission, Limits};
use crate::flow::tcp::{Actions, Flow, Phase, Settings};
use crate::flow::{Id, Table};
use crate::uring::Region;
use crate::wire::FlowKey;

/// Memory of ended flows kept for new ones: mapping a fresh region and faulting its
/// first pages in cost ~5% of the CPU of a connection in crr.
const SPARE_REGIONS: usize = 64;
/// What a spare region keeps resident at the start of each buffer, where the bytes of
/// short exchanges land (smoltcp starts an empty send buffer over at its beginning).
const SPARE_KEEP: usize = 16 * 1024;

/// A flow and what the loop keeps for it.
pub struct Entry {
    pub flow: Flow,
    /// `None` once its close has been submitted.
    pub socket: Option<Socket>,
    /// Already on this turn's work list.
    pub(super) queued: bool,
    /// On the list of flows waiting for a TUN write buffer.
    pub(super) starved: bool,
    /// The live entry of this flow in the timer heap, if any.
    pub(super) timer_at: Option<Instant>,
    /// For the control socket: when it opened, when bytes last moved either way (and
    /// whether they moved since it last ran), how many each way, and the phase it is
    /// counted in.
    pub(super) opened_at: Instant,
    pub(super) active_at: Instant,
    pub(super) moved: bool,
    pub(super) bytes_up: u64,
    pub(super) bytes_down: u64,
    pub(super) counted: Phase,
    /// The name a flow to a fake address connected to (`--dns fake`), held in the table.
    pub(super) name: Option<Rc<str>>,
}

impl Entry {
    /// What `uringproxy status` lists of it at `now`.
    pub fn row(&self, now: Instant) -> FlowRow {
        let key = self.flow.key();
        let state = match self.counted {
            Phase::Connecting => State::Connecting,
            Phase::Open => State::Open,
            Phase::Closing(_) => State::Closing,
        };
        FlowRow {
            proto: Proto::Tcp,
            client: key.client_addr(),
            server: key.server_addr(),
            state,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            age_s: (now - self.opened_at).secs(),
            idle_s: (now - self.active_at).secs(),
            name: self.name.as_deref().map(str::to_string),
        }
    }
}

/// Index of a phase in `TcpFlows::phases`.
pub(super) fn phase_index(phase: Phase) -> usize {
    match phase {
        Phase::Connecting => 0,
        Phase::Open => 1,
        Phase::Closing(_) => 2,
    }
}

pub struct TcpFlows {
    /// Boxed: after a peak the slab can shrink only past its last live entry, while the
    /// boxes of closed flows go back to the heap (and, trimmed, to the kernel).
    pub table: Table<FlowKey, Box<Entry>>,
    pub(super) admission: Admission,
    pub(super) settings: Settings,
    pub(super) connect_timeout: Duration,
    pub(super) interface: String,
    /// The SOCKS5 proxy flows are connected through; `None`: straight to their servers.
    pub(super) upstream: Option<Upstream>,
    /// Flows to run this turn.
    pub(super) work: Vec<Id>,
    /// Flows that found no TUN write buffer, run again once one is free.
    pub(super) starved: Vec<Id>,
    pub(super) actions: Actions,
    /// What the flows' buffers may hold together.
    pub budget: Budget,
    /// Memory of ended flows, for new ones (last in, first out: the warmest).
    pub(super) spare: Vec<Region>,
    /// When running out of sockets was last logged.
    pub(super) last_socket_warning: Option<std::time::Instant>,
    /// Flows connecting, open and closing, as of each one's last run.
    pub(super) phases: [usize; 3],
}

impl TcpFlows {
    pub fn new(
        limits: Limits,
        settings: Settings,
        connect_timeout: Duration,
        interface: String,
        upstream: Option<Upstream>,
        budget: Budget,
    ) -> Self {
        TcpFlows {
            table: Table::default(),
            admission: Admission::new(limits),
            settings,
            connect_timeout,
            interface,
            upstream,
            work: Vec::new(),
            starved: Vec::new(),
            actions: Actions::default(),
            budget,
            spare: Vec::new(),
            last_socket_warning: None,
            phases: [0; 3],
        }
    }

    /// Flows connecting, open and closing.
    pub fn phases(&self) -> [usize; 3] {
        self.phases
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn has_work(&self) -> bool {
        !self.work.is_empty()
    }

    pub fn closed_since_peak(&self) -> usize {
        self.table.closed_since_peak()
    }

    /// Memory for a new flow: a spare region, or a new one (`None`: out of memory).
    pub(super) fn region(&mut self) -> Option<Region> {
        self.spare
            .pop()
            .or_else(|| Region::new(Flow::memory_needed(self.settings)))
    }

    /// Keeps an ended flow's memory for a new one, all but the start of each of its
    /// buffers given back to the kernel: as far as the flow touched them (`touched`,
    /// bytes from the start of each), so a short exchange costs no system call here.
    pub(super) fn keep_spare(&mut self, region: Region, touched: [usize; 2]) {
        if self.spare.len() < SPARE_REGIONS {
            let half = self.settings.buffer;
            for (start, touched) in [0, half].into_iter().zip(touched) {
                let keep = SPARE_KEEP.min(half);
                if touched > keep {
                    region.discard(start + keep..start + touched.min(half));
                }
            }
            self.spare.push(region);
        }
    }

    /// Idle: the spare regions go back to the kernel.
    pub fn drop_spares(&mut self) {
        self.spare.clear();
    }

    /// Puts flow `id` on this turn's work list once.
    pub(super) fn enqueue(&mut self, id: Id) {
        if let Some(entry) = self.table.get_mut(id)
            && !entry.queued
        {
            entry.queued = true;
            self.work.push(id);
        }
    }

    /// A TUN write buffer is free again: the flows that found none can go on.
    pub fn wake_starved(&mut self) {
        let mut starved = std::mem::take(&mut self.starved);
        for id in starved.drain(..) {
            if let Some(entry) = self.table.get_mut(id) {
                entry.starved = false;
                entry.flow.on_tx_buffer();
            }
            self.enqueue(id);
        }
        // Keep the list's memory for the next time.
        self.starved = starved;
    }

    /// Timer entry `at` of flow `id` came up: run the flow if it is the live one.
    pub fn timer_fired(&mut self, id: Id, at: Instant) {
        if let Some(entry) = self.table.get_mut(id)
            && entry.timer_at == Some(at)
        {
            entry.timer_at = None;
            self.enqueue(id);
        }
    }

    /// Whether `at` is flow `id`'s live timer (for pruning the heap).
    pub fn timer_is(&self, id: Id, at: Instant) -> bool {
        self.table
            .get(id)
            .is_some_and(|entry| entry.timer_at == Some(at))
    }
}
