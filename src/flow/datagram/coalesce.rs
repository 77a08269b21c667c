//! Which client datagrams of one flow leave in one segmented send (UDP_SEGMENT).

// The kernel cuts a segmented send into datagrams of the segment size, the last one
// possibly shorter, so only a run of equal datagrams (and one shorter at its end) can go
// together; anything else would change a datagram's boundary. Through a SOCKS5 upstream
// each datagram starts with the flow's own header, the same length for every datagram of
// the flow, so equal lengths there mean equal payloads. One `Batch` per flow: datagrams
// of different flows are never compared, let alone merged.

/// Segments per send: the kernel's UDP_MAX_SEGMENTS (64 before Linux 6.13, 128 since).
pub const MAX_SEGMENTS: usize = 64;

/// What one send may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest datagram the kernel will segment: the path MTU less the IP and UDP
    /// headers (a larger segment size is refused, EINVAL).
    pub max_segment: usize,
    /// Bytes in one send (one send slot; the IPv4 limit on a UDP payload).
    pub max_bytes: usize,
    /// Datagrams in one send; 1 where segmentation is off.
    pub max_segments: usize,
}

impl Limits {
    /// One datagram per send.
    pub const SINGLE: Limits = Limits {
        max_segment: 0,
        max_bytes: usize::MAX,
        max_segments: 1,
    };
}

/// Client datagrams of one flow gathered for one send, back to back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The first datagram's length: the segment size.
    segment: usize,
    segments: usize,
    len: usize,
    /// Nothing may follow: the last datagram was shorter than the segment size, or the
    /// first cannot be segmented (empty, or larger than a segment may be).
    closed: bool,
}

impl Batch {
    /// A send starting with a datagram of `len` bytes.
    pub fn new(len: usize, limits: &Limits) -> Batch {
        Batch {
            segment: len,
            segments: 1,
            len,
            // An empty datagram cannot be a segment: with a segment size of 0 the kernel
            // refuses the send, and after others it would vanish into their bytes.
            closed: len == 0 || len > limits.max_segment.min(usize::from(u16::MAX)),
        }
    }

    /// Whether a next datagram of `len` bytes joins this send (it is then counted in
    /// it); if not, this send must go out first and the datagram starts the next.
    pub fn join(&mut self, len: usize, limits: &Limits) -> bool {
        let joins = !self.closed
            && len > 0
            && len <= self.segment
            && self.segments < limits.max_segments
            && self.len + len <= limits.max_bytes;
        if joins {
            self.segments += 1;
            self.len += len;
            self.closed = len < self.segment;
        }
        joins
    }

    /// Bytes of the send.
    pub fn bytes(&self) -> usize {
        self.len
    }

    /// Datagrams in it.
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// The segment size to send with; `None` for a single datagram (a plain send).
    pub fn segment(&self) -> Option<u16> {
        (self.segments > 1).then(|| u16::try_from(self.segment).ok())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_segment: 1472,
        max_bytes: 65507,
        max_segments: MAX_SEGMENTS,
    };

    /// The sends (datagram lengths in each) a run of datagram lengths of one flow makes.
    fn sends(lengths: &[usize], limits: &Limits) -> Vec<Vec<usize>> {
        let mut sends: Vec<Vec<usize>> = Vec::new();
        let mut batch: Option<Batch> = None;
        for &len in lengths {
            if batch.as_mut().is_some_and(|open| open.join(len, limits)) {
                sends.last_mut().unwrap().push(len);
                continue;
            }
            if let Some(done) = batch {
                check(&done, sends.last().unwrap());
            }
            batch = Some(Batch::new(len, limits));
            sends.push(vec![len]);
        }
        if let Some(done) = batch {
            check(&done, sends.last().unwrap());
        }
        sends
    }

    /// A batch's totals are those of the datagrams in it, and the kernel would cut it
    /// back into exactly those.
    fn check(batch: &Batch, lengths: &[usize]) {
        assert_eq!(batch.segments(), lengths.len());
        assert_eq!(batch.bytes(), lengths.iter().sum::<usize>());
        let Some(segment) = batch.segment() else {
            assert_eq!(lengths.len(), 1, "a plain send carries one datagram");
            return;
        };
        let cut: Vec<usize> = (0..batch.bytes())
            .step_by(usize::from(segment))
            .map(|at| (batch.bytes() - at).min(usize::from(segment)))
            .collect();
        assert_eq!(cut, lengths, "the kernel's segmentation gives them back");
    }

    #[test]
    fn equal_datagrams_go_together_and_the_last_may_be_shorter() {
        assert_eq!(sends(&[1350; 3], &LIMITS), [vec![1350; 3]]);
        assert_eq!(sends(&[1350, 1350, 700], &LIMITS), [vec![1350, 1350, 700]]);
    }

    #[test]
    fn a_shorter_datagram_ends_the_send() {
        // After a shorter one, even an equal one starts a new send: the kernel would
        // take the short one's bytes and the next as one segment.
        assert_eq!(
            sends(&[1350, 700, 1350, 1350], &LIMITS),
            [vec![1350, 700], vec![1350, 1350]]
        );
        assert_eq!(
            sends(&[700, 1350, 1350], &LIMITS),
            [vec![700], vec![1350, 1350]],
            "a longer one never joins"
        );
    }

    #[test]
    fn at_most_64_segments_and_one_slot_of_bytes_go_together() {
        let lengths = vec![1000; 130];
        let counts: Vec<usize> = sends(&lengths, &LIMITS).iter().map(Vec::len).collect();
        assert_eq!(counts, [64, 64, 2]);
        let small = Limits {
            max_bytes: 3500,
            ..LIMITS
        };
        let counts: Vec<usize> = sends(&[1000; 7], &small).iter().map(Vec::len).collect();
        assert_eq!(counts, [3, 3, 1], "3,500 bytes hold three of 1,000");
        let big = Limits {
            max_segment: 65507,
            ..LIMITS
        };
        let counts: Vec<usize> = sends(&[9000; 8], &big).iter().map(Vec::len).collect();
        assert_eq!(counts, [7, 1], "63,000 bytes fit, 72,000 do not");
    }

    #[test]
    fn empty_datagrams_are_never_coalesced() {
        assert_eq!(
            sends(&[0, 0, 1350, 0, 1350], &LIMITS),
            [vec![0], vec![0], vec![1350], vec![0], vec![1350]]
        );
    }

    #[test]
    fn datagrams_beyond_the_segment_limit_or_with_segmentation_off_go_alone() {
        assert_eq!(sends(&[2000; 2], &LIMITS), [vec![2000], vec![2000]]);
        assert_eq!(sends(&[1350; 2], &Limits::SINGLE), [vec![1350], vec![1350]]);
    }

    #[test]
    fn interleaved_flows_each_keep_their_own_send() {
        // Two flows' datagrams arriving alternately, each flow with its own batch.
        let (mut a, mut b) = (Batch::new(1350, &LIMITS), Batch::new(500, &LIMITS));
        for _ in 0..3 {
            assert!(a.join(1350, &LIMITS));
            assert!(b.join(500, &LIMITS));
        }
        assert!(
            !b.join(1350, &LIMITS),
            "flow a's size does not fit flow b's send"
        );
        assert_eq!((a.segments(), a.segment()), (4, Some(1350)));
        assert_eq!((b.segments(), b.segment()), (4, Some(500)));
    }
}
