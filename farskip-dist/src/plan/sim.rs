//! The event simulator: walks a [`Schedule`] on every rank at once with a cost model, and measures the
//! resulting timeline with the overlap metric of DESIGN.md §4.
//!
//! Every rank runs the same steps (only costs differ, e.g. the busiest expert rank). A compute op occupies the
//! rank's compute lane; a collective starts on its comm lane once every rank has issued it and each rank's lane
//! is free (one stream per lane runs collectives in issue order, as the executors' comm thread does), and lasts
//! its cost; a wait holds the compute lane until the collective has finished. A collective's host work (its send
//! buffer packed before the issue, what arrived unpacked after the wait: [`ops::pack`], [`ops::unpack`]) runs on
//! the compute lane at the cost `compute` gives it (zero: none).

use std::collections::HashMap;

use std::time::Duration;

use crate::trace::{Phase, Span, Stream, Trace};

use super::desc::{OpKey, Schedule, Step};
use crate::schedule::ops;

/// Which lane an interval ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// The compute stream.
    Compute,
    /// A comm stream (0: activations, 1: gradients).
    Comm(u8),
}

/// One op's interval on one rank, in ms from the start of the step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    /// The op.
    pub key: OpKey,
    /// Its lane.
    pub lane: Lane,
    /// Start (ms). For a collective: when the transfer began (every rank had issued it and every rank's lane
    /// was free), as the executors' traces record it.
    pub start: f64,
    /// End (ms).
    pub end: f64,
    /// A collective's wait for the last rank to issue it (ms): from this rank's issue to the last one's.
    pub peer_wait: f64,
    /// When this rank issued the collective (ms; a compute op's start).
    pub issued: f64,
}

impl Interval {
    /// Length in ms.
    pub fn len(&self) -> f64 {
        self.end - self.start
    }
    /// Whether the interval is empty.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Per-rank intervals of a simulated step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    /// `ranks[r]`: rank r's intervals in the order they started on their lane.
    pub ranks: Vec<Vec<Interval>>,
}

/// Errors of a simulation.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SimError {
    /// A wait names a collective that was not issued before it.
    #[error("the schedule waits for {op} (layer {layer:?}) before issuing it")]
    WaitBeforeIssue {
        /// The collective.
        op: &'static str,
        /// Its layer.
        layer: Option<usize>,
    },
    /// A cost is negative or not a number.
    #[error("op {op} (layer {layer:?}) has cost {cost} ms; costs must be finite and >= 0")]
    BadCost {
        /// The op.
        op: &'static str,
        /// Its layer.
        layer: Option<usize>,
        /// The cost given.
        cost: f64,
    },
    /// No ranks.
    #[error("a simulation needs at least one rank")]
    NoRanks,
}

fn checked(k: &OpKey, cost: f64) -> Result<f64, SimError> {
    if cost.is_finite() && cost >= 0.0 {
        Ok(cost)
    } else {
        Err(SimError::BadCost {
            op: k.op,
            layer: k.layer,
            cost,
        })
    }
}

/// Simulates `schedule` on `world` ranks. `compute(rank, op)` and `collective(op)` give costs in ms.
pub fn simulate(
    schedule: &Schedule,
    world: usize,
    compute: &dyn Fn(usize, &OpKey) -> f64,
    collective: &dyn Fn(&OpKey) -> f64,
) -> Result<Timeline, SimError> {
    if world == 0 {
        return Err(SimError::NoRanks);
    }
    let mut t = vec![0.0f64; world];
    let mut lane_free: HashMap<u8, Vec<f64>> = HashMap::new();
    let mut done: HashMap<OpKey, f64> = HashMap::new();
    let mut ranks: Vec<Vec<Interval>> = vec![Vec::new(); world];
    // Runs `k` on every rank's compute lane; a collective's host work (`host`) leaves no interval where it
    // costs nothing.
    let run = |ranks: &mut Vec<Vec<Interval>>,
               t: &mut Vec<f64>,
               k: OpKey,
               host: bool|
     -> Result<(), SimError> {
        for r in 0..world {
            let c = checked(&k, compute(r, &k))?;
            if host && c == 0.0 {
                continue;
            }
            ranks[r].push(Interval {
                key: k,
                lane: Lane::Compute,
                start: t[r],
                end: t[r] + c,
                peer_wait: 0.0,
                issued: t[r],
            });
            t[r] += c;
        }
        Ok(())
    };
    let host = |ranks: &mut Vec<Vec<Interval>>,
                t: &mut Vec<f64>,
                op: Option<&'static str>,
                key: OpKey| match op {
        Some(op) => run(ranks, t, OpKey { op, ..key }, true),
        None => Ok(()),
    };
    for step in &schedule.steps {
        match *step {
            Step::Compute(k) => run(&mut ranks, &mut t, k, false)?,
            Step::Issue { key, channel } => {
                host(&mut ranks, &mut t, ops::pack(key.op), key)?;
                let free = lane_free.entry(channel).or_insert_with(|| vec![0.0; world]);
                // Costs are checked finite, so these maxima are numbers.
                let all_issued = t.iter().copied().fold(0.0, f64::max);
                let start = free.iter().copied().fold(all_issued, f64::max);
                let end = start + checked(&key, collective(&key))?;
                for r in 0..world {
                    free[r] = end;
                    ranks[r].push(Interval {
                        key,
                        lane: Lane::Comm(channel),
                        start,
                        end,
                        peer_wait: all_issued - t[r],
                        issued: t[r],
                    });
                }
                done.insert(key, end);
            }
            Step::Wait(k) => {
                let end = *done.get(&k).ok_or(SimError::WaitBeforeIssue {
                    op: k.op,
                    layer: k.layer,
                })?;
                for tr in t.iter_mut() {
                    *tr = tr.max(end);
                }
                host(&mut ranks, &mut t, ops::unpack(k.op), k)?;
            }
        }
    }
    Ok(Timeline { ranks })
}

/// What a timeline measures (ms; `phase` filters the overlap figures when given).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    /// Wall time: the last interval's end on any rank.
    pub wall_ms: f64,
    /// The busiest rank's compute time.
    pub compute_ms: f64,
    /// The busiest rank's collective time.
    pub comm_ms: f64,
    /// Share of collective time covered by the same rank's compute, over all ranks (100 when there is none).
    pub overlap_pct: f64,
    /// Collective time not covered by compute, summed over ranks.
    pub exposed_ms: f64,
    /// Collectives' wait for a later peer, summed over ranks.
    pub peer_wait_ms: f64,
}

/// Time of `comm` covered by the compute intervals `compute` (sorted, disjoint).
fn covered(compute: &[(f64, f64)], comm: (f64, f64)) -> f64 {
    let first = compute.partition_point(|c| c.1 <= comm.0);
    compute[first..]
        .iter()
        .take_while(|c| c.0 < comm.1)
        .map(|c| (c.1.min(comm.1) - c.0.max(comm.0)).max(0.0))
        .sum()
}

impl Timeline {
    /// The metrics of the whole step, or of one pass.
    pub fn metrics(&self, phase: Option<Phase>) -> Metrics {
        let in_phase = |i: &&Interval| phase.is_none_or(|p| i.key.phase == p);
        let mut m = Metrics {
            wall_ms: 0.0,
            compute_ms: 0.0,
            comm_ms: 0.0,
            overlap_pct: 100.0,
            exposed_ms: 0.0,
            peer_wait_ms: 0.0,
        };
        let (mut comm_total, mut hidden_total) = (0.0, 0.0);
        for rank in &self.ranks {
            let compute: Vec<(f64, f64)> = rank
                .iter()
                .filter(|i| i.lane == Lane::Compute && !i.is_empty())
                .map(|i| (i.start, i.end))
                .collect();
            let (mut comp, mut comm) = (0.0, 0.0);
            for i in rank.iter().filter(in_phase) {
                m.wall_ms = m.wall_ms.max(i.end);
                match i.lane {
                    Lane::Compute => comp += i.len(),
                    Lane::Comm(_) => {
                        comm += i.len();
                        let h = covered(&compute, (i.start, i.end));
                        hidden_total += h;
                        m.exposed_ms += i.len() - h;
                        m.peer_wait_ms += i.peer_wait;
                    }
                }
            }
            comm_total += comm;
            m.compute_ms = m.compute_ms.max(comp);
            m.comm_ms = m.comm_ms.max(comm);
        }
        if comm_total > 0.0 {
            m.overlap_pct = (100.0 * hidden_total / comm_total).min(100.0);
        }
        m
    }

    /// The span of one pass: from its first interval's start to its last interval's end, on any rank.
    pub fn phase_ms(&self, phase: Phase) -> f64 {
        let it = self.ranks.iter().flatten().filter(|i| i.key.phase == phase);
        let start = it.clone().map(|i| i.start).fold(f64::INFINITY, f64::min);
        let end = it.map(|i| i.end).fold(f64::NEG_INFINITY, f64::max);
        if end >= start { end - start } else { 0.0 }
    }
}

impl Timeline {
    /// The timeline as a [`Trace`] (for its SVG and Chrome exports), keeping the ops of `layers` (all when
    /// `None`) and shifting time so that the first kept interval starts at zero.
    pub fn to_trace(&self, layers: Option<std::ops::RangeInclusive<usize>>) -> Trace {
        let keep = |i: &&Interval| match (&layers, i.key.layer) {
            (None, _) => true,
            (Some(r), Some(l)) => r.contains(&l),
            (Some(_), None) => false,
        };
        let t0 = self
            .ranks
            .iter()
            .flatten()
            .filter(keep)
            .map(|i| i.start)
            .fold(f64::INFINITY, f64::min);
        let t0 = if t0.is_finite() { t0 } else { 0.0 };
        let at = |ms: f64| Duration::from_secs_f64(((ms - t0) / 1e3).max(0.0));
        let mut spans = Vec::new();
        for (rank, intervals) in self.ranks.iter().enumerate() {
            for i in intervals.iter().filter(keep) {
                let comm = matches!(i.lane, Lane::Comm(_));
                spans.push(Span {
                    rank,
                    stream: if comm { Stream::Comm } else { Stream::Compute },
                    layer: i.key.layer,
                    op: i.key.op.into(),
                    phase: i.key.phase,
                    start: at(i.start),
                    end: at(i.end),
                    issued: comm.then(|| at(i.issued)),
                    all_issued: comm.then(|| at(i.issued + i.peer_wait)),
                });
            }
        }
        Trace::from_spans(spans)
    }
}
