//! Whether a new TCP flow may open: the flow limit, and a bound on flows still waiting
//! for their outbound connect, past which the oldest is reset to make room, so a SYN
//! flood cannot lock real clients out.

use std::collections::VecDeque;

use crate::flow::table::Id;

/// The limits from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_flows: usize,
    pub max_half_open: usize,
}

/// What a new SYN gets, once its socket and memory are secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Reset the oldest connecting flow (`evict_oldest`) and admit; if none is left to
    /// reset and one was `required` (at the flow limit), refuse after all.
    AdmitEvicting {
        required: bool,
    },
    /// At the limit with no connecting flow to reset: RST.
    Refuse,
}

/// The connecting flows, oldest first.
pub struct Admission {
    limits: Limits,
    /// Flows in the order they started connecting; entries of flows that have connected
    /// (or ended) since are skipped when met, and pruned when they pile up.
    queue: VecDeque<Id>,
    half_open: usize,
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission {
            limits,
            queue: VecDeque::new(),
            half_open: 0,
        }
    }

    pub fn half_open(&self) -> usize {
        self.half_open
    }

    /// Before a new flow's socket and memory are taken: false when it would be refused
    /// whatever happens. At the limit a connecting flow can still make room; evicted
    /// flows linger until their cancel completes, hence the hard bound above the limit.
    pub fn may_open(&self, open: usize) -> bool {
        let at_limit = open >= self.limits.max_flows;
        !(at_limit && self.half_open == 0)
            && open < self.limits.max_flows + self.limits.max_half_open
    }

    /// Once the new flow's resources are secured (evicting earlier would reset a
    /// connecting flow for a SYN that is refused anyway, e.g. out of fds).
    pub fn verdict(&self, open: usize) -> Verdict {
        let at_limit = open >= self.limits.max_flows;
        if at_limit && self.half_open == 0 {
            Verdict::Refuse
        } else if at_limit || self.half_open >= self.limits.max_half_open {
            Verdict::AdmitEvicting { required: at_limit }
        } else {
            Verdict::Admit
        }
    }

    /// Resets the longest-connecting flow for which `evict` succeeds (it returns false
    /// for ids that stopped connecting or are gone). False when none is left.
    pub fn evict_oldest(&mut self, mut evict: impl FnMut(Id) -> bool) -> bool {
        while let Some(id) = self.queue.pop_front() {
            if evict(id) {
                self.half_open -= 1;
                return true;
            }
        }
        false
    }

    /// A flow started connecting; `still_connecting` tells, when the queue is pruned,
    /// which of the queued ones still are.
    pub fn opened(&mut self, id: Id, still_connecting: impl Fn(Id) -> bool) {
        self.half_open += 1;
        self.queue.push_back(id);
        if self.queue.len() > 2 * self.limits.max_half_open {
            self.queue.retain(|&queued| still_connecting(queued));
        }
    }

    /// A flow stopped connecting (connected, failed or ended) without being evicted.
    pub fn left(&mut self) {
        self.half_open = self.half_open.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(slot: u32) -> Id {
        Id {
            slot,
            generation: 0,
        }
    }

    #[test]
    fn below_the_limits_flows_are_admitted() {
        let mut admission = Admission::new(Limits {
            max_flows: 4,
            max_half_open: 2,
        });
        assert!(admission.may_open(0));
        assert_eq!(admission.verdict(0), Verdict::Admit);
        admission.opened(id(0), |_| true);
        admission.opened(id(1), |_| true);
        assert_eq!(
            admission.verdict(2),
            Verdict::AdmitEvicting { required: false },
            "two connecting: the oldest makes room"
        );
    }

    #[test]
    fn the_oldest_still_connecting_flow_is_evicted() {
        let mut admission = Admission::new(Limits {
            max_flows: 10,
            max_half_open: 3,
        });
        for slot in 0..3 {
            admission.opened(id(slot), |_| true);
        }
        // Flow 0 has connected meanwhile: skipped, flow 1 goes.
        admission.left();
        let mut evicted = Vec::new();
        assert!(admission.evict_oldest(|candidate| {
            let connecting = candidate != id(0);
            if connecting {
                evicted.push(candidate);
            }
            connecting
        }));
        assert_eq!(evicted, [id(1)]);
        assert_eq!(admission.half_open(), 1);
        assert!(admission.evict_oldest(|_| true));
        assert!(!admission.evict_oldest(|_| true), "none left");
    }

    #[test]
    fn at_the_flow_limit_only_eviction_makes_room() {
        let mut admission = Admission::new(Limits {
            max_flows: 2,
            max_half_open: 2,
        });
        assert_eq!(admission.verdict(2), Verdict::Refuse, "nothing to evict");
        assert!(!admission.may_open(2));
        admission.opened(id(0), |_| true);
        assert!(admission.may_open(2));
        assert_eq!(
            admission.verdict(2),
            Verdict::AdmitEvicting { required: true }
        );
        assert!(
            !admission.may_open(4),
            "evicted flows still winding down count against a hard bound"
        );
    }

    #[test]
    fn the_queue_is_pruned_of_flows_that_connected() {
        let mut admission = Admission::new(Limits {
            max_flows: 100,
            max_half_open: 2,
        });
        for slot in 0..5 {
            admission.opened(id(slot), |queued| queued.slot >= 3);
            if slot < 3 {
                admission.left();
            }
        }
        assert!(admission.queue.len() <= 4);
        assert!(admission.queue.iter().all(|queued| queued.slot >= 3));
    }
}
