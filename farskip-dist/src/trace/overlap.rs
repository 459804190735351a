//! The overlap metric of DESIGN.md §4 and the per-rank times it is reported with.
//!
//! overlap% = Σ over comm spans of (time covered by the union of the same rank's compute spans)
//! / Σ comm span time × 100. Comm spans are filtered by phase; the compute that hides them may
//! be of either phase (it is the same rank's hardware). Overlapping compute spans count once.

use std::time::Duration;

use super::{Phase, Span, Stream, Trace};

/// Sorted, disjoint union of intervals.
fn union(mut intervals: Vec<(Duration, Duration)>) -> Vec<(Duration, Duration)> {
    intervals.retain(|(s, e)| e > s);
    intervals.sort();
    let mut merged: Vec<(Duration, Duration)> = Vec::with_capacity(intervals.len());
    for (s, e) in intervals {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

fn covered(by: &[(Duration, Duration)], start: Duration, end: Duration) -> Duration {
    by.iter()
        .map(|&(s, e)| end.min(e).saturating_sub(start.max(s)))
        .sum()
}

fn compute_union(spans: &[Span], rank: usize, phase: Option<Phase>) -> Vec<(Duration, Duration)> {
    union(
        spans
            .iter()
            .filter(|s| s.rank == rank && s.stream == Stream::Compute)
            .filter(|s| phase.is_none_or(|p| s.phase == p))
            .map(|s| (s.start, s.end))
            .collect(),
    )
}

fn comm_spans(spans: &[Span], phase: Phase) -> impl Iterator<Item = &Span> {
    spans
        .iter()
        .filter(move |s| s.stream == Stream::Comm && s.phase == phase)
}

/// (hidden, total) comm time of `phase`, over `ranks` (all ranks if `None`).
fn hidden_and_total(spans: &[Span], phase: Phase, rank: Option<usize>) -> (Duration, Duration) {
    let mut ranks: Vec<usize> = comm_spans(spans, phase)
        .map(|s| s.rank)
        .filter(|r| rank.is_none_or(|x| x == *r))
        .collect();
    ranks.sort_unstable();
    ranks.dedup();
    let (mut hidden, mut total) = (Duration::ZERO, Duration::ZERO);
    for r in ranks {
        let compute = compute_union(spans, r, None);
        for c in comm_spans(spans, phase).filter(|s| s.rank == r) {
            hidden += covered(&compute, c.start, c.end);
            total += c.duration();
        }
    }
    (hidden, total)
}

/// Percentage (0–100) of the comm time of `phase`, summed over all ranks, during which the same
/// rank was computing. `None` when the phase has no comm time.
pub fn overlap_pct(trace: &Trace, phase: Phase) -> Option<f64> {
    let (hidden, total) = hidden_and_total(&trace.spans(), phase, None);
    (!total.is_zero()).then(|| 100.0 * hidden.as_secs_f64() / total.as_secs_f64())
}

/// Busy time of `rank`'s compute stream in `phase`: the length of the union of its compute
/// spans (overlapping spans count once).
pub fn compute_time(trace: &Trace, rank: usize, phase: Phase) -> Duration {
    compute_union(&trace.spans(), rank, Some(phase))
        .iter()
        .map(|(s, e)| *e - *s)
        .sum()
}

/// Σ of `rank`'s comm span durations in `phase` (the denominator of [`overlap_pct`]).
pub fn comm_time(trace: &Trace, rank: usize, phase: Phase) -> Duration {
    comm_spans(&trace.spans(), phase)
        .filter(|s| s.rank == rank)
        .map(Span::duration)
        .sum()
}

/// The part of [`comm_time`] during which `rank` was computing (the numerator of
/// [`overlap_pct`] for one rank).
pub fn hidden_comm_time(trace: &Trace, rank: usize, phase: Phase) -> Duration {
    hidden_and_total(&trace.spans(), phase, Some(rank)).0
}

/// Comm time of `phase` during which the same rank was not computing, summed over all ranks (the part
/// [`overlap_pct`] does not count as hidden).
pub fn exposed_comm_time(trace: &Trace, phase: Phase) -> Duration {
    let (hidden, total) = hidden_and_total(&trace.spans(), phase, None);
    total.saturating_sub(hidden)
}

/// Σ over `rank`'s comm spans in `phase` of the time between its issuing the collective and the last rank's
/// issuing it ([`Span::all_issued`]): how long its collectives waited for a later peer (zero for the last rank to
/// join, and for spans without issue times). On the faster of two ranks this time comes out of its overlap window, so at
/// `comm_ratio` 1 — a link time equal to the window — the comm time left uncovered (`comm_time −
/// hidden_comm_time`) is about this much: exposed time that is skew between the ranks, not a schedule with
/// nothing to overlap.
pub fn peer_wait_time(trace: &Trace, rank: usize, phase: Phase) -> Duration {
    comm_spans(&trace.spans(), phase)
        .filter(|s| s.rank == rank)
        .filter_map(Span::peer_wait)
        .sum()
}

/// From the first start to the last end of `phase`'s spans on any rank (zero if none). Compare
/// it with `compute + comm` (nothing hidden) and `compute` alone (everything hidden).
pub fn wall_time(trace: &Trace, phase: Phase) -> Duration {
    let spans = trace.spans();
    let of_phase = || spans.iter().filter(|s| s.phase == phase);
    match (
        of_phase().map(|s| s.start).min(),
        of_phase().map(|s| s.end).max(),
    ) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn span(rank: usize, stream: Stream, phase: Phase, start: u64, end: u64) -> Span {
        Span {
            rank,
            stream,
            layer: Some(0),
            op: "op".into(),
            phase,
            start: ms(start),
            end: ms(end),
            issued: None,
            all_issued: None,
        }
    }

    fn comp(rank: usize, start: u64, end: u64) -> Span {
        span(rank, Stream::Compute, Phase::Forward, start, end)
    }

    fn comm(rank: usize, start: u64, end: u64) -> Span {
        span(rank, Stream::Comm, Phase::Forward, start, end)
    }

    fn pct(spans: Vec<Span>) -> Option<f64> {
        overlap_pct(&Trace::from_spans(spans), Phase::Forward)
    }

    #[test]
    fn fully_hidden() {
        assert_eq!(pct(vec![comp(0, 0, 10), comm(0, 2, 8)]), Some(100.0));
    }

    #[test]
    fn partially_hidden() {
        // comm 5..15 (10 ms), compute covers 5..10 → 50 %.
        assert_eq!(pct(vec![comp(0, 0, 10), comm(0, 5, 15)]), Some(50.0));
    }

    #[test]
    fn not_hidden() {
        assert_eq!(pct(vec![comp(0, 0, 10), comm(0, 10, 20)]), Some(0.0));
    }

    #[test]
    fn overlapping_compute_counts_once() {
        // Two compute spans both covering 2..6 of the comm 0..10: covered = 0..6 → 60 %.
        let spans = vec![comp(0, 0, 6), comp(0, 2, 6), comp(0, 1, 4), comm(0, 0, 10)];
        assert_eq!(pct(spans), Some(60.0));
        let trace = Trace::from_spans(vec![comp(0, 0, 6), comp(0, 2, 6), comp(0, 8, 9)]);
        assert_eq!(compute_time(&trace, 0, Phase::Forward), ms(7));
    }

    #[test]
    fn other_ranks_compute_does_not_hide() {
        // Rank 1 computes during rank 0's comm; rank 0 has no compute then.
        let spans = vec![comp(1, 0, 10), comm(0, 0, 10), comm(1, 0, 10)];
        assert_eq!(pct(spans), Some(50.0));
    }

    #[test]
    fn weighted_by_comm_time_over_ranks() {
        // Rank 0: comm 0..10 fully hidden; rank 1: comm 0..30, 0..15 hidden.
        // (10 + 15) / (10 + 30) = 62.5 %.
        let spans = vec![
            comp(0, 0, 10),
            comm(0, 0, 10),
            comp(1, 0, 15),
            comm(1, 0, 30),
        ];
        let trace = Trace::from_spans(spans);
        assert_eq!(overlap_pct(&trace, Phase::Forward), Some(62.5));
        assert_eq!(comm_time(&trace, 1, Phase::Forward), ms(30));
        assert_eq!(hidden_comm_time(&trace, 1, Phase::Forward), ms(15));
        assert_eq!(wall_time(&trace, Phase::Forward), ms(30));
    }

    #[test]
    fn phases_are_separate_and_empty_is_none() {
        let spans = vec![
            comp(0, 0, 10),
            comm(0, 0, 10),
            span(0, Stream::Comm, Phase::Backward, 20, 30),
        ];
        let trace = Trace::from_spans(spans);
        assert_eq!(overlap_pct(&trace, Phase::Forward), Some(100.0));
        assert_eq!(overlap_pct(&trace, Phase::Backward), Some(0.0));
        assert_eq!(pct(vec![comp(0, 0, 10)]), None);
    }

    #[test]
    fn compute_of_either_phase_hides_comm() {
        let spans = vec![
            span(0, Stream::Compute, Phase::Backward, 0, 4),
            comm(0, 0, 8),
        ];
        assert_eq!(pct(spans), Some(50.0));
    }

    #[test]
    fn peer_wait_is_own_issue_to_last_issue() {
        let issued = |rank: usize, at: u64, start: u64, end: u64| Span {
            issued: Some(ms(at)),
            all_issued: Some(ms(5)),
            ..comm(rank, start, end)
        };
        // Rank 0 issued at 2, rank 1 at 5: the transfer runs 5..9 on both; rank 0 waited 3 ms for rank 1.
        // Rank 0 computed 2..6 (its window), so 6..9 of its transfer is exposed: about its wait.
        let trace = Trace::from_spans(vec![
            comp(0, 2, 6),
            issued(0, 2, 5, 9),
            comp(1, 5, 9),
            issued(1, 5, 5, 9),
            comm(1, 10, 12),
        ]);
        assert_eq!(peer_wait_time(&trace, 0, Phase::Forward), ms(3));
        assert_eq!(peer_wait_time(&trace, 1, Phase::Forward), ms(0));
        assert_eq!(peer_wait_time(&trace, 0, Phase::Backward), ms(0));
        let exposed =
            comm_time(&trace, 0, Phase::Forward) - hidden_comm_time(&trace, 0, Phase::Forward);
        assert_eq!(exposed, ms(3));
        // Rank 1's 5..9 is covered, its 10..12 is not: 3 + 2 ms over both ranks.
        assert_eq!(exposed_comm_time(&trace, Phase::Forward), ms(5));
    }
}
