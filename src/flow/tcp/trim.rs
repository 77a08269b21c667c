//! Which parts of a flow's ring buffers hold nothing, so their pages can go back.

use std::ops::Range;

/// The parts of `ring` (a ring buffer's place in the flow's region) outside the
/// `kept` bytes starting at `from` (wrapping around its end) and outside `busy` (a
/// linear range an operation in flight writes, if any).
pub fn free_spans(
    ring: Range<usize>,
    from: usize,
    kept: usize,
    busy: Option<Range<usize>>,
) -> impl Iterator<Item = Range<usize>> {
    let size = ring.len();
    let base = ring.start;
    let empty = base..base;
    // Everything after the kept bytes, around to where they start: at most two pieces.
    let spans = if size == 0 || kept >= size {
        [empty.clone(), empty.clone()]
    } else {
        let start = from.saturating_sub(base) % size;
        let end = start + kept;
        if end < size {
            [base + end..base + size, base..base + start]
        } else {
            [base + end - size..base + start, empty.clone()]
        }
    };
    let busy = busy.unwrap_or(empty);
    spans
        .into_iter()
        .flat_map(move |span| without(span, busy.clone()))
        .filter(|span| !span.is_empty())
}

/// `span` less `hole`: what lies before it and what lies after.
fn without(span: Range<usize>, hole: Range<usize>) -> [Range<usize>; 2] {
    if hole.is_empty() || hole.end <= span.start || hole.start >= span.end {
        return [span.clone(), span.end..span.end];
    }
    [
        span.start..hole.start.max(span.start),
        hole.end.min(span.end)..span.end,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(
        ring: Range<usize>,
        from: usize,
        kept: usize,
        busy: Option<Range<usize>>,
    ) -> Vec<(usize, usize)> {
        free_spans(ring, from, kept, busy)
            .map(|span| (span.start, span.end))
            .collect()
    }

    #[test]
    fn kept_bytes_in_the_middle_leave_both_ends() {
        assert_eq!(spans(100..200, 120, 30, None), [(150, 200), (100, 120)]);
    }

    #[test]
    fn kept_bytes_that_wrap_leave_the_middle() {
        assert_eq!(spans(100..200, 180, 40, None), [(120, 180)]);
        // Ending exactly at the ring's end.
        assert_eq!(spans(100..200, 150, 50, None), [(100, 150)]);
    }

    #[test]
    fn nothing_kept_frees_all_and_all_kept_frees_nothing() {
        assert_eq!(spans(100..200, 130, 0, None), [(130, 200), (100, 130)]);
        assert_eq!(
            spans(100..200, 130, 100, None),
            Vec::<(usize, usize)>::new()
        );
        assert_eq!(
            spans(100..200, 130, 500, None),
            Vec::<(usize, usize)>::new()
        );
        // A start at the ring's end is its beginning.
        assert_eq!(spans(100..200, 200, 10, None), [(110, 200)]);
    }

    #[test]
    fn a_write_in_flight_is_kept_too() {
        assert_eq!(
            spans(100..200, 120, 30, Some(150..170)),
            [(170, 200), (100, 120)]
        );
        assert_eq!(
            spans(100..200, 120, 0, Some(100..110)),
            [(120, 200), (110, 120)]
        );
        assert_eq!(
            spans(100..200, 150, 10, Some(170..180)),
            [(160, 170), (180, 200), (100, 150)]
        );
    }
}
