//! The server datagrams one receive brings: one, or several coalesced back to back.

use std::ops::Range;

use crate::uring::InBuffer;
use crate::wire::udp::{self, MAX_DATAGRAM};

/// The server datagrams one receive brought, in order: `datagrams` are ranges of
/// `bytes` (one datagram, or several a coalesced receive held back to back).
#[derive(Clone, Copy, Debug)]
pub struct Arrival<'a> {
    pub bytes: &'a [u8],
    pub datagrams: &'a [Range<usize>],
    /// Where `bytes` lie in the receive buffer, when a TUN write may take them from
    /// there (the datagrams are the buffer's bytes as received, no relay header cut out).
    pub received_in: Option<InBuffer>,
}

impl<'a> Arrival<'a> {
    /// Each datagram's bytes (a range outside `bytes` is an empty datagram).
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + Clone + use<'a> {
        let bytes = self.bytes;
        self.datagrams
            .iter()
            .map(move |range| bytes.get(range.clone()).unwrap_or(&[]))
    }

    /// The datagrams are all of `bytes`, back to back and in order: written as they lie,
    /// they are the payload of a super-packet.
    pub fn contiguous(&self) -> bool {
        let mut end = 0;
        for range in self.datagrams {
            if range.start != end {
                return false;
            }
            end = range.end;
        }
        end == self.bytes.len()
    }
}

/// Fills `ranges` with the datagrams in `payload`, what one receive brought: with a
/// UDP_GRO `segment_size`, that many bytes each back to back (the last may be shorter),
/// else the whole payload (an empty one is one empty datagram).
pub fn split(payload: &[u8], segment_size: Option<u16>, ranges: &mut Vec<Range<usize>>) {
    ranges.clear();
    let mut at = 0;
    for datagram in udp::datagrams(payload, segment_size, MAX_DATAGRAM) {
        ranges.push(at..at + datagram.len());
        at += datagram.len();
    }
}

// A one-element list of ranges is one datagram, not a range to collect.
#[allow(clippy::single_range_in_vec_init)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coalesced_receive_splits_at_its_segment_size() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let mut ranges = vec![0..1];
        split(&payload, Some(1350), &mut ranges);
        assert_eq!(ranges, [0..1350, 1350..2700, 2700..3000]);
        let batch = Arrival {
            bytes: &payload,
            datagrams: &ranges,
            received_in: None,
        };
        assert_eq!(batch.iter().collect::<Vec<_>>().concat(), payload);
        split(&payload, None, &mut ranges);
        assert_eq!(ranges, [0..3000], "one datagram without a segment size");
        split(&payload[..1350], Some(1350), &mut ranges);
        assert_eq!(ranges, [0..1350]);
        split(&[], None, &mut ranges);
        assert_eq!(ranges, [0..0], "an empty datagram is one");
        let outside = Arrival {
            bytes: &payload[..10],
            datagrams: &[5..20],
            received_in: None,
        };
        assert_eq!(outside.iter().collect::<Vec<_>>(), [&[][..]]);
    }

    #[test]
    fn only_datagrams_that_are_all_the_bytes_in_order_are_contiguous() {
        let bytes = [0u8; 10];
        let arrival = |datagrams: &'static [Range<usize>]| Arrival {
            bytes: &bytes,
            datagrams,
            received_in: None,
        };
        assert!(arrival(&[0..4, 4..8, 8..10]).contiguous());
        assert!(!arrival(&[0..4, 8..10]).contiguous(), "a gap");
        assert!(!arrival(&[4..8, 0..4, 8..10]).contiguous(), "out of order");
        assert!(!arrival(&[0..4, 4..8]).contiguous(), "short of the end");
        assert!(!arrival(&[2..10]).contiguous(), "not from the start");
    }
}
