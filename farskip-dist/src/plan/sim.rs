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

/// Simulates `schedule` on `world` ranks, each with hardware of its own. `compute(rank, op)` and
/// `collective(op)` give costs in ms.
pub fn simulate(
    schedule: &Schedule,
    world: usize,
    compute: &dyn Fn(usize, &OpKey) -> f64,
    collective: &dyn Fn(&OpKey) -> f64,
) -> Result<Timeline, SimError> {
    simulate_shared(schedule, world, world, compute, collective)
}

/// One rank's work item in [`simulate_shared`]: a description step with its collective's host work split out.
#[derive(Clone, Copy)]
enum Item {
    /// A compute op (`true`: a collective's host work, skipped when free).
    Compute(OpKey, bool),
    Issue(OpKey, u8),
    Wait(OpKey),
}

/// [`simulate`] for ranks that share `cores` cores (more ranks than cores, as a CPU run with oversubscribed
/// ranks): whenever `n` ranks compute at once and `n > cores`, each advances at `cores / n` of its speed
/// (processor sharing), so a rank that waits for a collective leaves its share to the others. Compute costs are
/// a rank's time on a core of its own; with `cores ≥ world` every rank runs at full speed.
pub fn simulate_shared(
    schedule: &Schedule,
    world: usize,
    cores: usize,
    compute: &dyn Fn(usize, &OpKey) -> f64,
    collective: &dyn Fn(&OpKey) -> f64,
) -> Result<Timeline, SimError> {
    simulate_with_wake(
        schedule,
        world,
        cores,
        None,
        compute,
        collective,
        &|_, _| 0.0,
    )
}

/// [`simulate_shared`] with the cores time-sliced as an operating system's scheduler does instead of shared
/// as a fluid: at most `cores` ranks compute at once, each at full speed; a rank that must compute while every
/// core is taken queues for one. A rank keeps its core until it waits for a collective that has not arrived
/// (it sleeps and the core goes to the next in the queue), finishes its steps, or has held it for `slice_ms`
/// while another rank queues (it is preempted to the back of the queue): round robin, except that a rank woken
/// by its collective takes a core at once — a free one, else the one whose holder has run longest, which goes to
/// the front of the queue. (Linux's scheduler lets a woken thread preempt: on this project's 2-core VMs a thread
/// sleeping 2 ms while two or three others spin on both cores wakes 66 µs late at the median, as on an idle
/// machine, not a slice late.)
///
/// Fluid sharing keeps every rank at the same pace; time slices let ranks drift apart by up to a slice per op,
/// and a collective then waits for the rank that was descheduled — the skew a CPU run with more ranks than cores
/// shows. With `cores ≥ world` both are [`simulate`].
pub fn simulate_sliced(
    schedule: &Schedule,
    world: usize,
    cores: usize,
    slice_ms: f64,
    compute: &dyn Fn(usize, &OpKey) -> f64,
    collective: &dyn Fn(&OpKey) -> f64,
) -> Result<Timeline, SimError> {
    simulate_with_wake(
        schedule,
        world,
        cores,
        Some(slice_ms),
        compute,
        collective,
        &|_, _| 0.0,
    )
}

/// [`simulate_shared`] (`slice: None`) or [`simulate_sliced`] (`slice: Some(ms)`), with rank `r` waiting for
/// collective `k` resuming `wake(r, k)` ms after it arrives: the host's delay in waking the rank (rendezvous,
/// wake-ups, a run queue), which is not link time — the collective's interval ends when its data arrives. The
/// engine of all three.
pub fn simulate_with_wake(
    schedule: &Schedule,
    world: usize,
    cores: usize,
    slice: Option<f64>,
    compute: &dyn Fn(usize, &OpKey) -> f64,
    collective: &dyn Fn(&OpKey) -> f64,
    wake: &dyn Fn(usize, &OpKey) -> f64,
) -> Result<Timeline, SimError> {
    if world == 0 {
        return Err(SimError::NoRanks);
    }
    let cores = cores.max(1);
    // Time slices only matter when ranks outnumber the cores.
    let slice = slice.filter(|len| len.is_finite() && *len > 0.0 && world > cores);
    let mut items = Vec::with_capacity(schedule.steps.len());
    let mut issued_before = std::collections::HashSet::new();
    for step in &schedule.steps {
        match *step {
            Step::Compute(k) => items.push(Item::Compute(k, false)),
            Step::Issue { key, channel } => {
                if let Some(op) = ops::pack(key.op) {
                    items.push(Item::Compute(OpKey { op, ..key }, true));
                }
                items.push(Item::Issue(key, channel));
                issued_before.insert(key);
            }
            Step::Wait(k) => {
                if !issued_before.contains(&k) {
                    return Err(SimError::WaitBeforeIssue {
                        op: k.op,
                        layer: k.layer,
                    });
                }
                items.push(Item::Wait(k));
                if let Some(op) = ops::unpack(k.op) {
                    items.push(Item::Compute(OpKey { op, ..k }, true));
                }
            }
        }
    }
    struct Rank {
        pc: usize,
        /// The op being computed: its key, the work left (ms on a core of its own) and its start.
        running: Option<(OpKey, f64, f64)>,
    }
    let mut state: Vec<Rank> = (0..world)
        .map(|_| Rank {
            pc: 0,
            running: None,
        })
        .collect();
    // Time slices: the rank on each core and since when, and the ranks queued for one.
    let mut on_core: Vec<Option<(usize, f64)>> = vec![None; cores];
    let mut queue: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
    // Ranks asleep in a wait (they gave their core up): when their collective arrives they preempt.
    let mut asleep = vec![false; world];
    let mut ranks: Vec<Vec<Interval>> = vec![Vec::new(); world];
    let mut issue_times: HashMap<OpKey, Vec<Option<f64>>> = HashMap::new();
    let mut done: HashMap<OpKey, Vec<f64>> = HashMap::new();
    let mut lane_free: HashMap<u8, f64> = HashMap::new();
    let mut now = 0.0f64;
    loop {
        // Everything that takes no time, until every rank computes, waits or is done.
        let mut moved = true;
        while moved {
            moved = false;
            for r in 0..world {
                if state[r].running.is_some() {
                    continue;
                }
                let Some(&item) = items.get(state[r].pc) else {
                    continue;
                };
                match item {
                    Item::Compute(k, host) => {
                        let c = checked(&k, compute(r, &k))?;
                        if c == 0.0 {
                            if !host {
                                ranks[r].push(Interval {
                                    key: k,
                                    lane: Lane::Compute,
                                    start: now,
                                    end: now,
                                    peer_wait: 0.0,
                                    issued: now,
                                });
                            }
                            state[r].pc += 1;
                        } else {
                            state[r].running = Some((k, c, now));
                        }
                    }
                    Item::Issue(k, channel) => {
                        let times = issue_times.entry(k).or_insert_with(|| vec![None; world]);
                        times[r] = Some(now);
                        state[r].pc += 1;
                        if times.iter().all(Option::is_some) {
                            let times: Vec<f64> = times.iter().map(|t| t.unwrap_or(now)).collect();
                            let all_issued = times.iter().copied().fold(0.0, f64::max);
                            let free = lane_free.entry(channel).or_insert(0.0);
                            let start = free.max(all_issued);
                            let end = start + checked(&k, collective(&k))?;
                            *free = end;
                            for (q, &t) in times.iter().enumerate() {
                                ranks[q].push(Interval {
                                    key: k,
                                    lane: Lane::Comm(channel),
                                    start,
                                    end,
                                    peer_wait: all_issued - t,
                                    issued: t,
                                });
                            }
                            // A rank waiting for it resumes once the host has woken it.
                            let ready = (0..world)
                                .map(|q| Ok(end + checked(&k, wake(q, &k))?))
                                .collect::<Result<Vec<f64>, SimError>>()?;
                            done.insert(k, ready);
                        }
                    }
                    Item::Wait(k) => match done.get(&k) {
                        Some(ready) if ready[r] <= now => state[r].pc += 1,
                        _ => continue,
                    },
                }
                moved = true;
            }
        }
        // Each computing rank's speed: a share of the cores (fluid), or all of one core for the ranks that hold
        // one and nothing for the queued (time slices).
        let computing = state.iter().filter(|s| s.running.is_some()).count();
        let mut rates = vec![0.0f64; world];
        match slice {
            None => {
                let rate = if computing > cores {
                    cores as f64 / computing as f64
                } else {
                    1.0
                };
                for (r, s) in state.iter().enumerate() {
                    if s.running.is_some() {
                        rates[r] = rate;
                    }
                }
            }
            Some(_) => {
                // Cores of ranks that stopped computing (asleep in a wait, or done) are free again.
                for c in on_core.iter_mut() {
                    if let Some((r, _)) = *c
                        && state[r].running.is_none()
                    {
                        asleep[r] = matches!(items.get(state[r].pc), Some(Item::Wait(_)));
                        *c = None;
                    }
                }
                // Ranks that started computing queue for a core, except one woken from a wait: it takes a free
                // core, or the core of the rank that has run longest, which goes to the front of the queue (a
                // woken thread preempts at once, as Linux's scheduler does: a thread woken while every core
                // spins runs within the timer's slack, not after a slice).
                for (r, s) in state.iter().enumerate() {
                    let held = on_core.iter().flatten().any(|&(q, _)| q == r);
                    if s.running.is_none() || held || queue.contains(&r) {
                        continue;
                    }
                    if !std::mem::take(&mut asleep[r]) {
                        queue.push_back(r);
                        continue;
                    }
                    let core = match on_core.iter().position(Option::is_none) {
                        Some(c) => c,
                        None => {
                            let (c, &(q, _)) = on_core
                                .iter()
                                .enumerate()
                                .filter_map(|(c, h)| h.as_ref().map(|h| (c, h)))
                                .min_by(|a, b| a.1.1.total_cmp(&b.1.1))
                                .expect("every core is held");
                            queue.push_front(q);
                            c
                        }
                    };
                    on_core[core] = Some((r, now));
                }
                for c in on_core.iter_mut() {
                    if c.is_none()
                        && let Some(r) = queue.pop_front()
                    {
                        *c = Some((r, now));
                    }
                }
                for &(r, _) in on_core.iter().flatten() {
                    rates[r] = 1.0;
                }
            }
        }
        // The next event: a computation ending, a collective a rank waits for arriving, or a time slice ending
        // while a rank queues.
        let mut next = f64::INFINITY;
        if let Some(len) = slice
            && !queue.is_empty()
        {
            for &(_, since) in on_core.iter().flatten() {
                next = next.min(since + len);
            }
        }
        for (r, s) in state.iter().enumerate() {
            match (&s.running, items.get(s.pc)) {
                (Some(_), _) if rates[r] == 0.0 => {}
                (Some((_, left, _)), _) => next = next.min(now + left / rates[r]),
                (None, Some(Item::Wait(k))) => {
                    if let Some(ready) = done.get(k) {
                        next = next.min(ready[r]);
                    }
                }
                (None, Some(_)) => unreachable!("rank {r} would have moved"),
                (None, None) => {}
            }
        }
        if !next.is_finite() {
            if state.iter().all(|s| s.pc >= items.len()) {
                break;
            }
            // Every rank left waits for a collective some rank has not issued: the ranks' steps disagree.
            let k = state
                .iter()
                .find_map(|s| match items.get(s.pc) {
                    Some(Item::Wait(k)) => Some(*k),
                    _ => None,
                })
                .expect("a rank that is not done waits");
            return Err(SimError::WaitBeforeIssue {
                op: k.op,
                layer: k.layer,
            });
        }
        let dt = next - now;
        for (r, s) in state.iter_mut().enumerate() {
            let rate = rates[r];
            if rate == 0.0 {
                continue;
            }
            if let Some((k, left, start)) = s.running {
                if now + left / rate <= next {
                    ranks[r].push(Interval {
                        key: k,
                        lane: Lane::Compute,
                        start,
                        end: next,
                        peer_wait: 0.0,
                        issued: start,
                    });
                    s.running = None;
                    s.pc += 1;
                } else {
                    s.running = Some((k, left - dt * rate, start));
                }
            }
        }
        // A rank whose slice ended while others queue goes to the back of the queue.
        if let Some(len) = slice
            && !queue.is_empty()
        {
            for c in on_core.iter_mut() {
                if let Some((r, since)) = *c
                    && state[r].running.is_some()
                    && since + len <= next + 1e-9
                {
                    queue.push_back(r);
                    *c = None;
                }
            }
        }
        now = next;
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
