//! The echo identifiers the proxy's own pings go out with, unique per pinged host: every
//! ping flow's raw socket is connected to its host and receives all of that host's echo
//! replies, so the identifier alone tells which flow a reply belongs to.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use smoltcp::wire::IpAddress;

/// Echo identifiers there are towards one host.
const PER_HOST: u32 = 1 << 16;
/// Between the first identifiers of hosts seen one after the other (an odd step, so
/// the first identifiers go round the whole space): pings to different hosts do not all
/// start from one value.
const SPREAD: u16 = 0x9e37;
/// Where the first host starts: away from the small identifiers the kernel gives local
/// ping sockets (from 1 up).
const FIRST: u16 = 0x8000;
/// Identifiers looked at for one that no client uses before one that only the new
/// flow's own client does not is taken instead; bounds the search when many clients'
/// identifiers lie in its way.
const PREFERRED_SEARCH: u16 = 64;

/// One host's share of the identifiers.
struct Host {
    /// Identifiers taken towards it.
    taken: u32,
    /// Where the search for a free one starts: just past the last one taken, so an
    /// identifier comes back into use as late as possible (a late reply to a flow gone
    /// rarely finds a new flow with its identifier), and a search steps over each taken
    /// identifier at most once per round of the space.
    next: u16,
}

/// Identifiers in use, by host, and the clients' own identifiers. Entries exist only
/// for open ping flows, so the maps are bounded by the flow table's limit.
pub struct Idents {
    taken: HashSet<(IpAddress, u16)>,
    hosts: HashMap<IpAddress, Host>,
    /// Open ping flows by their client's identifier. A local pinger (ping socket or raw
    /// socket) also receives the replies to the proxy's pings with its identifier, from
    /// any host, and would count them as its own: these are avoided where possible.
    clients: HashMap<u16, u32>,
    /// Where the next host seen starts.
    first: u16,
}

impl Default for Idents {
    fn default() -> Idents {
        Idents {
            taken: HashSet::new(),
            hosts: HashMap::new(),
            clients: HashMap::new(),
            first: FIRST,
        }
    }
}

impl Idents {
    /// A free identifier towards `host` for a ping flow of the client with identifier
    /// `client`: never `client` itself, and one no other ping flow's client uses if one
    /// is found close by; `None` when every other one is taken. It stays free until
    /// `take` takes it.
    pub fn free(&self, host: IpAddress, client: u16) -> Option<u16> {
        if self.exhausted(host, client) {
            return None;
        }
        let next = self.hosts.get(&host).map_or(self.first, |state| state.next);
        let usable = |ident: u16| ident != client && !self.taken.contains(&(host, ident));
        let candidates = (0..=u16::MAX).map(|step| next.wrapping_add(step));
        candidates
            .clone()
            .take(usize::from(PREFERRED_SEARCH))
            .find(|&ident| usable(ident) && !self.clients.contains_key(&ident))
            // At least one is usable: found within one round from the cursor.
            .or_else(|| candidates.clone().find(|&ident| usable(ident)))
    }

    /// Whether no identifier towards `host` is left for a flow of `client` (the client's
    /// own, if free, is never handed out). O(1).
    pub fn exhausted(&self, host: IpAddress, client: u16) -> bool {
        let taken = self.hosts.get(&host).map_or(0, |state| state.taken);
        let avoided = u32::from(!self.taken.contains(&(host, client)));
        taken + avoided >= PER_HOST
    }

    /// Takes `ident` towards `host` for a flow of `client` (one `free` gave); false if it
    /// was already taken.
    pub fn take(&mut self, host: IpAddress, ident: u16, client: u16) -> bool {
        if !self.taken.insert((host, ident)) {
            return false;
        }
        let state = self.hosts.entry(host).or_insert_with(|| {
            let first = self.first;
            self.first = first.wrapping_add(SPREAD);
            Host {
                taken: 0,
                next: first,
            }
        });
        state.taken += 1;
        state.next = ident.wrapping_add(1);
        *self.clients.entry(client).or_default() += 1;
        true
    }

    /// Gives back `ident` towards `host`, taken for a flow of `client`.
    pub fn release(&mut self, host: IpAddress, ident: u16, client: u16) {
        if !self.taken.remove(&(host, ident)) {
            return;
        }
        if let Entry::Occupied(mut state) = self.hosts.entry(host) {
            state.get_mut().taken -= 1;
            if state.get().taken == 0 {
                state.remove();
            }
        }
        if let Entry::Occupied(mut flows) = self.clients.entry(client) {
            *flows.get_mut() -= 1;
            if *flows.get() == 0 {
                flows.remove();
            }
        }
    }

    /// Identifiers taken towards `host`.
    #[cfg(test)]
    pub fn taken(&self, host: IpAddress) -> u32 {
        self.hosts.get(&host).map_or(0, |state| state.taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::Ipv4Address;

    fn host(last: u8) -> IpAddress {
        IpAddress::Ipv4(Ipv4Address::new(192, 0, 2, last))
    }

    #[test]
    fn identifiers_are_unique_per_host_and_reused_late() {
        let mut idents = Idents::default();
        let a = idents.free(host(1), 7).unwrap();
        assert!(idents.take(host(1), a, 7));
        assert!(!idents.take(host(1), a, 7), "taken once");
        let b = idents.free(host(1), 8).unwrap();
        assert_ne!(a, b);
        assert!(idents.take(host(1), b, 8));
        // Another host may use `a` too.
        assert!(idents.take(host(2), a, 9));
        // A released identifier is not the next one given.
        idents.release(host(1), a, 7);
        assert_ne!(idents.free(host(1), 7), Some(a));
        idents.release(host(1), a, 7);
        assert_eq!(idents.taken(host(1)), 1, "released once");
        idents.release(host(1), b, 8);
        assert_eq!(idents.taken(host(1)), 0);
        assert!(
            !idents.hosts.contains_key(&host(1)),
            "the host is forgotten"
        );
        idents.release(host(2), a, 9);
        assert!(idents.clients.is_empty(), "and so are the clients");
    }

    #[test]
    fn clients_identifiers_are_avoided() {
        let mut idents = Idents::default();
        let first = idents.free(host(1), 0).unwrap();
        assert_ne!(
            idents.free(host(1), first),
            Some(first),
            "never the client's own"
        );
        assert!(idents.take(host(1), first, 0));
        // Another client's ping (to any host) uses the identifier after it.
        let next = first.wrapping_add(1);
        assert!(idents.take(host(2), 5, next));
        assert_eq!(idents.free(host(1), 3), Some(next.wrapping_add(1)));
        // When every identifier close by is another client's, one of those is taken
        // rather than the flow refused.
        for client in next.wrapping_add(1)..next.wrapping_add(PREFERRED_SEARCH) {
            assert!(idents.take(host(3), client, client));
        }
        assert_eq!(idents.free(host(1), 3), Some(next));
    }

    #[test]
    fn a_host_with_every_identifier_taken_gets_none_until_one_is_released() {
        let mut idents = Idents::default();
        let avoid = 1234;
        for _ in 0..PER_HOST - 1 {
            let ident = idents.free(host(1), avoid).expect("one is left");
            assert!(idents.take(host(1), ident, avoid));
        }
        assert_eq!(idents.taken(host(1)), PER_HOST - 1);
        assert_eq!(
            idents.free(host(1), avoid),
            None,
            "only the client's is left"
        );
        // Another client's ping may have the last one.
        assert_eq!(idents.free(host(1), 4321), Some(avoid));
        assert!(idents.take(host(1), avoid, 4321));
        assert_eq!(idents.free(host(1), 4321), None, "all 65,536 are taken");
        assert!(
            idents.free(host(2), avoid).is_some(),
            "other hosts have theirs"
        );
        idents.release(host(1), 99, avoid);
        assert_eq!(idents.free(host(1), avoid), Some(99));
    }
}
