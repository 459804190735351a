//! `cpu-here`: op costs measured on this machine, single-rank, and the overlap experiments' link.
//!
//! [`measure_inference`] runs one rank's shard of the model (TP: rank 0's heads and expert columns; EP: rank 0's
//! block of experts, [`Model::expert_block`], on rank 0's sequence, so its expert bank and rows per expert are a
//! rank's, with each rank's expert rows from routing the experiment's batch with the whole model) on a [`SingleRank`]
//! with a trace, with the threads a LocalWorld rank of that world gets and `world` copies side by side (the cores and
//! memory are shared as in the run predicted; no data moves between the copies, but they meet at every collective, so
//! that they compute the same op at the same time and wait together as the run's ranks do:
//! `FARSKIP_CALIBRATE_LOCKSTEP=0` lets them run apart), and keeps each op's median and fastest pass. With more ranks
//! than cores, one copy per core: the costs are a rank's time on a core of its own, the operating system's time slice
//! is measured too ([`measure_time_slice`]), and the simulator time-slices the cores among the ranks computing at
//! once ([`super::sim::simulate_sliced`]; without a measured slice it shares them as a fluid,
//! [`super::sim::simulate_shared`]), so a rank that waits for a collective leaves its core to the others and ranks
//! drift apart as the kernel's slices let them. [`measure_training`] does the same for an EP training step.
//! [`Measured`] turns such a table into a [`CostModel`] whose collectives last `comm_ratio` × their depth-1 FarSkip
//! window — the rule the overlap experiments calibrate their link with — so the planner predicts a LocalWorld run
//! from a single-rank one.

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;
use farskip_model::{Connectivity, Model};
use serde::{Deserialize, Serialize};

use crate::balance::{ExpertLoads, Placement, rank_loads};
use crate::comm::{LinkModel, LocalWorldConfig, SingleRank};
use crate::dispatch::ExpertSharding;
use crate::experiment::{Parallel, median, placement_batch, random_ids};
use crate::schedule::{EpRank, TpRank, ops};
use crate::trace::{Phase, Stream, Trace};
use crate::training::{EpTrainRank, bwd_ops};

use super::cost::CostModel;
use super::desc::{MLP_BWD, OpKey, Schedule, Split, Step};
use super::lockstep::{Lockstep, StepBarrier};
use super::sim::{self, Lane};
use super::{Mode, PlanError};

/// The [`Calibration::version`] this code measures.
pub const CALIBRATION_VERSION: u32 = 7;

/// One op's measured cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpTime {
    /// Op name.
    pub op: String,
    /// Layer (`None`: embedding/head, or EP's combine after the wait).
    pub layer: Option<usize>,
    /// `true` for the backward pass.
    pub backward: bool,
    /// Median ms over every timed pass (all spans of this op and layer in one pass added): the op's cost.
    pub ms: f64,
    /// Fastest pass of a round, ms (the median round's): what the overlap experiments calibrate their link on
    /// (the minimum of their free passes), so the windows are built from it.
    pub min_ms: f64,
    /// Spread of the samples within a round (the median round's): standard deviation over mean (0 when the op
    /// never varied). The simulator draws each rank's cost with this spread, so ranks drift apart as they do
    /// when run side by side.
    #[serde(default)]
    pub spread: f64,
}

/// A calibration: what was measured and the op costs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Model preset or path.
    pub model: String,
    /// `prefill` or `train`.
    pub mode: String,
    /// ep or tp.
    pub parallel: Parallel,
    /// The world whose rank was measured.
    pub world: usize,
    /// Tokens per rank.
    pub tokens: usize,
    /// Threads the measured rank ran on.
    pub threads: usize,
    /// Cores of the machine measured (0: not recorded). With more ranks than cores the ops are measured on a
    /// core per copy and the simulator shares the cores among the ranks that compute at once.
    #[serde(default)]
    pub cores: usize,
    /// Per-op costs.
    pub ops: Vec<OpTime>,
    /// What an op of one micro-batch of a two-micro-batch schedule costs: inference, each op's total over both
    /// halves of the executor's two-micro-batch pass, halved; training, the step on one of the rank's two
    /// sequences. Empty: half of [`Calibration::ops`].
    #[serde(default)]
    pub ops_half: Vec<OpTime>,
    /// With more ranks than cores: how long the operating system lets a thread run while another waits for its
    /// core (ms, measured: [`measure_time_slice`]); the simulator then time-slices the cores instead of sharing
    /// them as a fluid. `None`: not measured (older calibrations, or as many cores as ranks).
    #[serde(default)]
    pub slice_ms: Option<f64>,
    /// What a collective of the run costs beyond its link time (ms, measured: [`measure_collective_latency`], and
    /// with more ranks than cores [`measure_shared_latency`]): the LocalWorld's rendezvous, a comm thread waking
    /// to compute the result and the rank waking to take it (and the scheduler's run queues). A rank waiting for
    /// a collective resumes this long after it arrives ([`CostModel::wake_ms`]). `None`: not measured.
    #[serde(default)]
    pub latency_ms: Option<f64>,
    /// Each rank's speed: the op costs of rank r are `rank_speed[r]` × theirs. The side-by-side copy pinned where
    /// the run pins rank r, its passes over the median pass (the median over the rounds): the cores of a virtual
    /// machine need not be alike — one may share its physical core with another guest's work — and the slowest
    /// rank sets the pace of every collective. Empty: every rank alike (one copy, or ranks the run does not pin).
    #[serde(default)]
    pub rank_speed: Vec<f64>,
    /// Each round's copy speeds (each copy's mean pass over the round's median pass), the rounds in order: which
    /// core was slow, and by how much, changes from round to round, and holds through a run; the simulator's
    /// draws take them in turn as the ranks' speeds. Empty: [`Calibration::rank_speed`] for every draw.
    #[serde(default)]
    pub round_speeds: Vec<Vec<f64>>,
    /// EP: per layer, the expert rows each rank of `world` receives (contiguous placement) over the rows of the
    /// measured pass, from routing the experiment's own batch single-rank. Empty: every rank as measured.
    #[serde(default)]
    pub expert_share: Vec<Vec<f64>>,
    /// When it was measured (seconds since the Unix epoch; `None`: not recorded). This machine's speed drifts over
    /// minutes, so a cache is only as good as it is fresh: [`Calibration::age`].
    #[serde(default)]
    pub measured_unix_s: Option<u64>,
    /// What the figures were measured as ([`CALIBRATION_VERSION`] for this code): 0 (older files) timed an EP
    /// rank's experts as the whole expert bank on the rank's rows (too slow per row), 1 as the rank's block
    /// ([`Model::expert_block`]), 2 also takes an inference micro-batch's op costs from the executor's own
    /// two-micro-batch pass, 3 samples in rounds a pause apart ([`Passes`]) and keeps the median round's
    /// fastest pass, 4 also measures a collective's latency, 5 takes the spread within a round, 6 pins the copies
    /// as the run pins its ranks and measures each copy's speed in each round (the spread then of each copy over it),
    /// 7 has the copies meet at every collective, as the run's ranks do.
    /// [`Calibration::matches`] turns down any other version, so it is measured again.
    #[serde(default)]
    pub version: u32,
}

impl Calibration {
    /// Reads a calibration written by [`Calibration::save`].
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let err = |message: String| PlanError::Calibration {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// Writes the calibration as JSON.
    pub fn save(&self, path: &Path) -> Result<(), PlanError> {
        let err = |message: String| PlanError::Calibration {
            path: path.display().to_string(),
            message,
        };
        let text = serde_json::to_string_pretty(self).map_err(|e| err(e.to_string()))?;
        std::fs::write(path, text).map_err(|e| err(e.to_string()))
    }

    /// How long ago it was measured; `None` when that was not recorded (or lies in the future of this clock).
    pub fn age(&self) -> Option<std::time::Duration> {
        let then = std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.measured_unix_s?);
        std::time::SystemTime::now().duration_since(then).ok()
    }

    /// Whether this calibration measured the given setting.
    pub fn matches(
        &self,
        model: &str,
        mode: Mode,
        parallel: Parallel,
        world: usize,
        tokens: usize,
    ) -> bool {
        let m = if mode == Mode::Train {
            "train"
        } else {
            "prefill"
        };
        self.model == model
            && self.mode == m
            && self.parallel == parallel
            && self.world == world
            && self.tokens == tokens
            && self.version == CALIBRATION_VERSION
    }
}

/// Seconds since the Unix epoch, now (`None` on a clock before it).
fn now_unix_s() -> Option<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// Per (op, layer, backward) ms of one pass.
type OpTable = BTreeMap<(String, Option<usize>, bool), f64>;

/// The [`OpTable`] of one trace's compute spans.
fn op_table(trace: &Trace) -> OpTable {
    let mut t = BTreeMap::new();
    for s in trace.spans() {
        if s.stream == Stream::Compute {
            *t.entry((s.op.to_string(), s.layer, s.phase == Phase::Backward))
                .or_insert(0.0) += s.duration().as_secs_f64() * 1e3;
        }
    }
    t
}

/// One round of a calibration: each side-by-side copy's op tables, one per timed pass.
type Round = Vec<Vec<OpTable>>;

/// Standard deviation over mean (0 for no samples or a zero mean).
fn relative_std(v: &[f64]) -> f64 {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    if mean > 0.0 { var.sqrt() / mean } else { 0.0 }
}

/// Each side-by-side copy's speed in each round (`rounds[r][copy]`: its passes): the copy's mean pass (every op
/// added) over the median pass of all copies of the round. Empty with fewer than two copies, or when they were
/// not `pinned` where the run pins its ranks (a copy is then no rank's core).
fn round_speeds(rounds: &[Round], pinned: bool) -> Vec<Vec<f64>> {
    let copies = rounds.iter().map(Vec::len).min().unwrap_or(0);
    if copies < 2 || !pinned {
        return Vec::new();
    }
    let total = |p: &OpTable| p.values().sum::<f64>();
    rounds
        .iter()
        .map(|r| {
            let m = median(r.iter().flatten().map(total).collect());
            r.iter()
                .take(copies)
                .map(|c| {
                    let mean = c.iter().map(total).sum::<f64>() / c.len().max(1) as f64;
                    if m > 0.0 && mean > 0.0 { mean / m } else { 1.0 }
                })
                .collect()
        })
        .collect()
}

/// Each copy's speed over the rounds: the median of its [`round_speeds`].
fn rank_speed(round_speeds: &[Vec<f64>]) -> Vec<f64> {
    let copies = round_speeds.iter().map(Vec::len).min().unwrap_or(0);
    (0..copies)
        .map(|c| median(round_speeds.iter().map(|r| r[c]).collect()))
        .collect()
}

/// Each op's cost over the passes of every round (`rounds[r]`: round r's op tables, every copy's passes): the
/// median over all of them (`ms`), the median round's spread (each copy's samples over its speed in that round,
/// `speeds[r][copy]`, when given: [`round_speeds`]), and `min_ms`, the median over the rounds of each round's
/// fastest — a round holds as many samples as the experiments' link calibration takes
/// its minimum over, so `min_ms` is their minimum's typical value, and a few slow or fast seconds on this
/// machine move neither.
fn medians(rounds: &[Round], speeds: &[Vec<f64>]) -> Vec<OpTime> {
    let mut keys: Vec<_> = rounds
        .iter()
        .flatten()
        .flatten()
        .flat_map(|p| p.keys().cloned())
        .collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|k| {
            let cost = |p: &OpTable| p.get(&k).copied().unwrap_or(0.0);
            let all: Vec<f64> = rounds.iter().flatten().flatten().map(cost).collect();
            // Each round's samples per copy, with each copy's over its speed in the round.
            let rounds: Vec<(Vec<Vec<f64>>, Vec<f64>)> = rounds
                .iter()
                .enumerate()
                .filter(|(_, r)| r.iter().any(|c| !c.is_empty()))
                .map(|(i, r)| {
                    let raw: Vec<Vec<f64>> =
                        r.iter().map(|c| c.iter().map(cost).collect()).collect();
                    let relative = raw
                        .iter()
                        .enumerate()
                        .flat_map(|(c, samples)| {
                            let speed = speeds
                                .get(i)
                                .and_then(|r| r.get(c))
                                .copied()
                                .filter(|s| *s > 0.0)
                                .unwrap_or(1.0);
                            samples.iter().map(move |x| x / speed)
                        })
                        .collect();
                    (raw, relative)
                })
                .collect();
            let fastest = rounds
                .iter()
                .map(|(r, _)| r.iter().flatten().copied().fold(f64::INFINITY, f64::min))
                .collect();
            // The spread within a round (side-by-side copies and back-to-back passes: how a rank's ops vary in
            // one run), the median round's, with each copy's samples over its speed in the round: which core is
            // slow, and by how much, holds through a run and is drawn as the rank's speed
            // ([`Measured::with_jitter`]); the drift from round to round moves every rank of a run alike.
            let spread = rounds.iter().map(|(_, rel)| relative_std(rel)).collect();
            OpTime {
                min_ms: median(fastest),
                spread: median(spread),
                ms: median(all),
                op: k.0,
                layer: k.1,
                backward: k.2,
            }
        })
        .collect()
}

/// How many passes a calibration times: `rounds` rounds, `ROUND_PAUSE` apart, each a warm-up and then
/// `per_round` timed passes of every side-by-side copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Passes {
    /// Rounds (at least one).
    pub rounds: usize,
    /// Timed passes of each copy in a round: the overlap experiments take their link's windows from the
    /// fastest of two free passes on every rank, so two here make a round's fastest sample comparable.
    pub per_round: usize,
}

/// Pause between two calibration rounds: the rounds sample the machine over a few seconds, so a short slow (or
/// fast) stretch moves one round, not the medians.
const ROUND_PAUSE: std::time::Duration = std::time::Duration::from_millis(300);

/// `rounds` rounds of `measure` (each round's samples kept apart), `ROUND_PAUSE` between them.
fn in_rounds<T>(
    rounds: usize,
    mut measure: impl FnMut() -> Result<T, PlanError>,
) -> Result<Vec<T>, PlanError> {
    (0..rounds.max(1))
        .map(|r| {
            if r > 0 {
                std::thread::sleep(ROUND_PAUSE);
            }
            measure()
        })
        .collect()
}

/// A pool of `threads` threads, each pinned to its core of `cores` (none pinned when `cores` is empty).
fn pool(threads: usize, cores: Vec<usize>) -> Result<rayon::ThreadPool, PlanError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .start_handler(move |i| {
            if let Some(&core) = cores.get(i) {
                crate::comm::local::pin_current_thread(core);
            }
        })
        .build()
        .map_err(|e| PlanError::Calibration {
            path: "(thread pool)".into(),
            message: e.to_string(),
        })
}

/// The threads a LocalWorld rank of `world` gets on this machine.
pub fn threads_per_rank(world: usize) -> usize {
    (available_cores() / world.max(1)).max(1)
}

/// The cores this process may run on.
fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// How long the operating system lets a thread compute while another one waits for the same core (ms): two
/// threads pinned to one core spin for a while, each noting its runs (stretches in which consecutive clock
/// reads are less than 50 µs apart); the median run. `None` where the threads cannot be pinned or no run
/// ended (one thread was never descheduled).
pub fn measure_time_slice() -> Option<f64> {
    use std::time::{Duration, Instant};
    const SPIN: Duration = Duration::from_millis(400);
    const GAP: Duration = Duration::from_micros(50);
    let core = *crate::comm::local::allowed_cores()?.first()?;
    let runs = || -> Vec<f64> {
        crate::comm::local::pin_current_thread(core);
        let start = Instant::now();
        let (mut run_start, mut last) = (start, start);
        let mut runs = Vec::new();
        while last - start < SPIN {
            let now = Instant::now();
            if now - last > GAP {
                runs.push((last - run_start).as_secs_f64() * 1e3);
                run_start = now;
            }
            last = now;
        }
        runs
    };
    let mut all = std::thread::scope(|s| {
        let a = s.spawn(runs);
        let b = s.spawn(runs);
        let mut v = a.join().unwrap_or_default();
        v.extend(b.join().unwrap_or_default());
        v
    });
    // The first run of each thread started before the other was pinned beside it.
    all.retain(|&ms| ms > 0.0);
    (all.len() >= 4).then(|| median(all))
}

/// What a collective costs a LocalWorld run of `world` ranks beyond its link time (ms): the ranks all-reduce
/// `floats` values back to back over a link on which each takes `link_ms`; the median time from issuing one to
/// holding its result, less the link's. That is the rendezvous, a comm thread waking to sum the payloads, and the
/// rank waking to take the result — late, after a sleep on this machine's timers, when the link took time — the
/// α of this machine's link. `None` when the world cannot run.
pub fn measure_collective_latency(world: usize, floats: usize, link_ms: f64) -> Option<f64> {
    use crate::comm::{CollectiveTag, Communicator, LinkModel, LocalWorld};
    use std::time::{Duration, Instant};
    let link_ms = if link_ms.is_finite() {
        link_ms.max(0.0)
    } else {
        0.0
    };
    // About a second of collectives, 20 to 100 of them.
    let rounds = ((1000.0 / link_ms.max(1.0)) as usize).clamp(20, 100);
    let link = Duration::from_secs_f64(link_ms / 1e3);
    // A world of one still hands every collective to its comm thread and waits for the answer.
    let ranks = LocalWorld::run(
        world,
        LinkModel::fixed_time_per_op(move |_, _| link),
        |comm| {
            let mut ms = Vec::with_capacity(rounds);
            for i in 0..=rounds {
                let t = Instant::now();
                comm.all_reduce(
                    CollectiveTag::new(format!("latency {i}")),
                    vec![1.0; floats.max(1)],
                )
                .wait()?;
                // The first round also waits for the peers' threads to start.
                if i > 0 {
                    ms.push(t.elapsed().as_secs_f64() * 1e3 - link_ms);
                }
            }
            Ok::<_, crate::comm::CommError>(ms)
        },
    )
    .ok()?;
    let mut all = Vec::new();
    for r in ranks {
        all.extend(r.ok()?);
    }
    Some(median(all).max(0.0))
}

/// What a collective costs a LocalWorld run of `world` ranks on `cores` cores beyond its link time (ms). With as
/// many cores as ranks, [`measure_collective_latency`] over a link lasting `segment_ms` (the run's links, at
/// comm ratio 1, last about a rank's compute between two collectives). With more ranks than cores, with the work
/// the run does between its collectives: each rank computes `segment_ms` (its time alone on a core)
/// before each all-reduce of `floats` values over an instant link, as a blocking schedule does; what the world's
/// wall time exceeds the ideal by (every segment `world / cores` × its time alone: the cores never idle), per
/// collective. That is the rendezvous and wake-ups, and the scheduler's: a rank woken by its collective queues on
/// a core that is busy while the other idles until the kernel balances its run queues. `None` when the world
/// cannot run.
pub fn measure_shared_latency(
    world: usize,
    cores: usize,
    floats: usize,
    segment_ms: f64,
) -> Option<f64> {
    use crate::comm::{CollectiveTag, Communicator, LinkModel, LocalWorld};
    use std::hint::black_box;
    use std::time::Instant;
    const SEGMENTS: usize = 30;
    const GROUPS: usize = 3;
    if world <= cores || cores == 0 || !(segment_ms.is_finite() && segment_ms > 0.0) {
        // The run's links last about a segment at ratio 1.
        return measure_collective_latency(world, floats, segment_ms);
    }
    // Busy work of a known length on one core: a dependent chain of float operations.
    let work = |n: u64| {
        let mut x = black_box(1.0f64);
        for i in 0..n {
            x = black_box(x * 1.000_000_1 + (i & 7) as f64 * 1e-9);
        }
        black_box(x);
    };
    let probe = 2_000_000u64;
    let t = Instant::now();
    work(probe);
    let per_ms = probe as f64 / (t.elapsed().as_secs_f64() * 1e3).max(1e-6);
    let n = (segment_ms * per_ms) as u64;
    let t = Instant::now();
    work(n);
    let alone_ms = t.elapsed().as_secs_f64() * 1e3;
    let ideal = SEGMENTS as f64 * alone_ms * world as f64 / cores as f64;
    // A few worlds, the median: one slow stretch of this machine moves one of them.
    let mut excess = Vec::with_capacity(GROUPS);
    for _ in 0..GROUPS {
        let start = Instant::now();
        let ranks = LocalWorld::run(world, LinkModel::instant(), |comm| {
            for i in 0..SEGMENTS {
                work(n);
                comm.all_reduce(
                    CollectiveTag::new(format!("shared latency {i}")),
                    vec![1.0; floats.max(1)],
                )
                .wait()?;
            }
            Ok::<_, crate::comm::CommError>(())
        })
        .ok()?;
        let wall = start.elapsed().as_secs_f64() * 1e3;
        for r in ranks {
            r.ok()?;
        }
        excess.push(((wall - ideal) / SEGMENTS as f64).max(0.0));
    }
    Some(median(excess))
}

/// A rank's compute between two of its collectives, ms: every op of a pass (`ops`' costs) over `collectives`.
fn segment_ms(ops: &[OpTime], collectives: usize) -> f64 {
    ops.iter().map(|o| o.ms).sum::<f64>() / collectives.max(1) as f64
}

/// The model a calibration times for an EP rank of `world` (rank 0's block of every MoE layer's experts:
/// [`Model::expert_block`]), and the rows per token its routers choose.
fn rank_expert_block(model: &Model, world: usize) -> Result<(Model, usize), PlanError> {
    let Some(m) = model.config().moe.as_ref() else {
        return Ok((model.clone(), 0));
    };
    let range = ExpertSharding::new(m.num_experts, world.max(1))
        .map_err(failed)?
        .local_range(0);
    let block = model.expert_block(range).map_err(failed)?;
    let top_k = block.config().moe.as_ref().map_or(0, |m| m.top_k);
    Ok((block, top_k))
}

/// Per-op costs of a two-micro-batch pass as the cost of one micro-batch's op: each total over both halves,
/// halved.
fn halved(ops: Vec<OpTime>) -> Vec<OpTime> {
    ops.into_iter()
        .map(|o| OpTime {
            ms: o.ms / 2.0,
            min_ms: o.min_ms / 2.0,
            ..o
        })
        .collect()
}

fn failed(e: impl std::fmt::Display) -> PlanError {
    PlanError::Calibration {
        path: "(measurement)".into(),
        message: e.to_string(),
    }
}

/// Runs `pass` (a warm-up, then `repeats` timed) on `copies` threads at once, each on its own pool of `threads`
/// (as LocalWorld ranks run), copy `c` pinned to `cores[c]` as a LocalWorld pins rank `c` ([`rank_cores`];
/// empty: nothing pinned), so the measured rank shares the cores and memory bandwidth as it will in the run
/// predicted. No data moves between the copies, but each copy's collectives ([`Lockstep`]) wait for every copy
/// to reach them, as a run's ranks meet at theirs; a copy that fails releases the others with its error. Returns
/// each copy's op tables (each pass of each copy is a sample of what a rank may take, the fastest of them is what
/// the experiments' link calibration keeps, and a copy's passes against the others' are its core's speed).
fn side_by_side(
    copies: usize,
    threads: usize,
    cores: &[Vec<usize>],
    repeats: usize,
    pass: &(dyn Fn(&Lockstep, &Trace) -> Result<(), PlanError> + Sync),
) -> Result<Round, PlanError> {
    // The copies meet at every collective, as the run's ranks do (`FARSKIP_CALIBRATE_LOCKSTEP=0`: they run
    // apart).
    let apart = std::env::var("FARSKIP_CALIBRATE_LOCKSTEP").is_ok_and(|v| v.trim() == "0");
    let barrier = StepBarrier::new(if apart { 1 } else { copies.max(1) });
    let run = |copy: usize| -> Result<Vec<OpTable>, PlanError> {
        let comm = Lockstep::new(barrier.clone());
        let tables = pool(threads, cores.get(copy).cloned().unwrap_or_default()).and_then(|pool| {
            pool.install(|| {
                let mut tables = Vec::new();
                for i in 0..=repeats {
                    let trace = Trace::new();
                    pass(&comm, &trace)?;
                    if i > 0 {
                        tables.push(op_table(&trace));
                    }
                }
                Ok(tables)
            })
        });
        // A copy that stops early must not leave the others waiting for it at their next collective.
        if let Err(e) = &tables {
            barrier.leave(&e.to_string());
        }
        tables
    };
    std::thread::scope(|s| {
        let others: Vec<_> = (1..copies.max(1))
            .map(|copy| s.spawn(move || run(copy)))
            .collect();
        let mut all = vec![run(0)?];
        for h in others {
            all.push(
                h.join()
                    .map_err(|_| failed("a side-by-side pass panicked"))??,
            );
        }
        Ok(all)
    })
}

/// The cores a LocalWorld of `world` ranks of `threads` threads pins its ranks to on this machine (as
/// [`crate::comm::LocalWorld::run`] does by default: empty when the ranks do not fit the cores, or
/// `FARSKIP_PIN_RANKS=0`).
fn rank_cores(world: usize, threads: usize) -> Vec<Vec<usize>> {
    let pin = LocalWorldConfig::new(LinkModel::instant()).pin_ranks;
    crate::comm::local::rank_cores(world, threads, pin)
}

/// Rows routed to each expert of each layer (`[layer][expert]`) when `model` (as it is connected) routes `ids`,
/// on one rank.
fn routed_loads(model: &Model, ids: &Tensor<2, Int>) -> Result<Vec<Vec<usize>>, PlanError> {
    let loads = ExpertLoads::new();
    let rank = EpRank::new(model, 0, 1)
        .map_err(failed)?
        .with_loads(loads.clone());
    rank.forward(&SingleRank::new(), &Trace::disabled(), ids.clone())
        .map_err(failed)?;
    Ok(loads.snapshot())
}

/// The placement of `model`'s experts the overlap experiments' `balance` option gives `world` EP ranks for an
/// experiment drawn with `seed`: balanced ([`Placement::balanced`]) for the rows the FarSkip model routes on
/// their placement batch ([`placement_batch`]), routed on one rank.
/// Apply it ([`Placement::apply`]) to the model a calibration measures, so that rank 0's block and every rank's
/// rows are the balanced run's.
///
/// # Errors
/// If the model has no experts, `world` is 0, or the forward fails.
pub fn balanced_placement(
    model: &Model,
    world: usize,
    tokens: usize,
    seed: u64,
) -> Result<Placement, PlanError> {
    if model.config().moe.is_none() {
        return Err(failed("a model without experts has no expert placement"));
    }
    let device = model.device();
    let ids = placement_batch(
        world.max(1),
        tokens,
        model.config().vocab_size,
        seed,
        &device,
    );
    let farskip = model.clone().with_connectivity(Connectivity::farskip())?;
    Placement::balanced(&routed_loads(&farskip, &ids)?, world).map_err(failed)
}

/// Per layer, the rows each of `world` contiguous EP ranks receives when `model` routes `ids` (every rank's
/// rows), over `measured_rows` (the rows of the timed single-rank pass).
fn expert_share(
    model: &Model,
    ids: &Tensor<2, Int>,
    world: usize,
    measured_rows: f64,
) -> Result<Vec<Vec<f64>>, PlanError> {
    routed_loads(model, ids)?
        .iter()
        .map(|l| {
            if l.is_empty() {
                return Ok(Vec::new());
            }
            let order: Vec<usize> = (0..l.len()).collect();
            let rows = rank_loads(l, &order, world).map_err(failed)?;
            Ok(rows.iter().map(|&r| r as f64 / measured_rows).collect())
        })
        .collect()
}

/// The expert-load imbalance `model`'s router gives `ep` contiguous EP ranks on `tokens` random tokens per rank
/// (seeded): the busiest rank's rows over the mean, averaged over the MoE layers (1 without experts).
pub fn routing_imbalance(
    model: &Model,
    ep: usize,
    tokens: usize,
    seed: u64,
) -> Result<f64, PlanError> {
    let device = model.device();
    let Some(top_k) = model.config().moe.as_ref().map(|m| m.top_k) else {
        return Ok(1.0);
    };
    let ids = random_ids(ep.max(1), tokens, model.config().vocab_size, seed, &device);
    let shares = expert_share(model, &ids, ep.max(1), (tokens * top_k) as f64)?;
    let per_layer: Vec<f64> = shares
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let mean = s.iter().sum::<f64>() / s.len() as f64;
            let max = s.iter().copied().fold(0.0, f64::max);
            if mean > 0.0 { max / mean } else { 1.0 }
        })
        .collect();
    Ok(if per_layer.is_empty() {
        1.0
    } else {
        per_layer.iter().sum::<f64>() / per_layer.len() as f64
    })
}

/// Measures the FarSkip prefill of one rank of `world` (`tokens` per sequence; `passes` of the plain and of the
/// two-micro-batch forward, alternating by round) on the batch the overlap experiment draws with `seed` (EP: one
/// sequence per rank, rank 0's is timed).
pub fn measure_inference(
    model: &Model,
    name: &str,
    parallel: Parallel,
    world: usize,
    tokens: usize,
    passes: Passes,
    seed: u64,
) -> Result<Calibration, PlanError> {
    let model = model.clone().with_connectivity(Connectivity::farskip())?;
    let device = model.device();
    let batch = if parallel == Parallel::Expert {
        world
    } else {
        1
    };
    let all = random_ids(batch, tokens, model.config().vocab_size, seed, &device);
    let ids = all.clone().narrow(0, 0, 1);
    // EP: the timed model is rank 0's block of experts; each rank's share of the rows comes from routing every
    // rank's sequence with the whole model.
    let (block, top_k) = if parallel == Parallel::Expert {
        rank_expert_block(&model, world)?
    } else {
        (model.clone(), 0)
    };
    let expert_share = if top_k > 0 {
        expert_share(&model, &all, world, (tokens * top_k) as f64)?
    } else {
        Vec::new()
    };
    let threads = threads_per_rank(world);
    let cores = available_cores();
    let pinned = rank_cores(world, threads);
    // `two`: the executor's two-micro-batch forward instead of the plain one.
    let timed = |ids: &Tensor<2, Int>, two: bool| {
        side_by_side(
            world.min(cores),
            threads,
            &pinned,
            passes.per_round,
            &|comm: &Lockstep, trace: &Trace| {
                let ids = ids.clone();
                let out = match parallel {
                    Parallel::Expert => {
                        let rank = EpRank::new(&block, 0, 1).map_err(failed)?;
                        if two {
                            rank.forward_tbo(comm, trace, ids)
                        } else {
                            rank.forward(comm, trace, ids)
                        }
                    }
                    Parallel::Tensor => {
                        let rank = TpRank::new(&model, 0, world).map_err(failed)?;
                        if two {
                            rank.forward_tbo(comm, trace, ids)
                        } else {
                            rank.forward(comm, trace, ids)
                        }
                    }
                };
                out.map(|_| ()).map_err(failed)
            },
        )
    };
    // A two-micro-batch schedule's half: the average of the two halves of the executor's own two-micro-batch
    // pass (each op's spans over both halves, halved) — the second half's attention also reads the first
    // half's keys, so it costs more than the first. A one-token sequence has no halves: the whole.
    let (plain, two): (Vec<_>, Vec<_>) = in_rounds(passes.rounds, || {
        let plain = timed(&ids, false)?;
        let two = if tokens >= 2 {
            Some(timed(&ids, true)?)
        } else {
            None
        };
        Ok((plain, two))
    })?
    .into_iter()
    .unzip();
    let speeds = round_speeds(&plain, !pinned.is_empty());
    let ops = medians(&plain, &speeds);
    let two: Vec<_> = two.into_iter().flatten().collect();
    let ops_half = if two.is_empty() {
        ops.clone()
    } else {
        halved(medians(&two, &speeds))
    };
    Ok(Calibration {
        model: name.to_string(),
        mode: "prefill".into(),
        parallel,
        world,
        tokens,
        threads,
        cores,
        slice_ms: (world > cores).then(measure_time_slice).flatten(),
        latency_ms: measure_shared_latency(
            world,
            cores,
            tokens * model.config().hidden_size,
            segment_ms(&ops, 2 * model.layers.len()),
        ),
        rank_speed: rank_speed(&speeds),
        round_speeds: speeds,
        ops,
        ops_half,
        expert_share,
        measured_unix_s: now_unix_s(),
        version: CALIBRATION_VERSION,
    })
}

/// Measures one rank's FarSkip EP training step (cross-entropy, `tokens` per rank as two sequences; rank 0's
/// block of experts, as [`measure_inference`]) on rank 0's windows of the first step the training experiment
/// draws with `seed`.
pub fn measure_training(
    model: &Model,
    name: &str,
    world: usize,
    tokens: usize,
    passes: Passes,
    seed: u64,
) -> Result<Calibration, PlanError> {
    let model = model.clone().with_connectivity(Connectivity::farskip())?;
    let device = model.device();
    // As the training experiment draws them: two sequences of `tokens / 2` per rank.
    let seq = (tokens / 2).max(1);
    let all = random_ids(2 * world, seq + 1, model.config().vocab_size, seed, &device);
    let windows = all.clone().narrow(0, 0, 2);
    let (block, top_k) = rank_expert_block(&model, world)?;
    let expert_share = if top_k > 0 {
        let inputs = all.narrow(1, 0, seq);
        expert_share(&model, &inputs, world, (tokens * top_k) as f64)?
    } else {
        Vec::new()
    };
    let threads = threads_per_rank(world);
    let cores = available_cores();
    let pinned = rank_cores(world, threads);
    let timed = |windows: &Tensor<2, Int>| {
        side_by_side(
            world.min(cores),
            threads,
            &pinned,
            passes.per_round,
            &|comm: &Lockstep, trace: &Trace| {
                EpTrainRank::new(&block, 0, 1)
                    .map_err(failed)?
                    .step(comm, trace, windows.clone())
                    .map(|_| ())
                    .map_err(failed)
            },
        )
    };
    // A two-micro-batch step's half: one of the two sequences; the whole step and the half alternate by round.
    let (whole, half): (Vec<_>, Vec<_>) = in_rounds(passes.rounds, || {
        Ok((timed(&windows)?, timed(&windows.clone().narrow(0, 0, 1))?))
    })?
    .into_iter()
    .unzip();
    let speeds = round_speeds(&whole, !pinned.is_empty());
    let ops = medians(&whole, &speeds);
    Ok(Calibration {
        model: name.to_string(),
        mode: "train".into(),
        parallel: Parallel::Expert,
        world,
        tokens,
        threads,
        cores,
        slice_ms: (world > cores).then(measure_time_slice).flatten(),
        // A training step's collectives per layer: dispatch and combine forward and backward, the gradients'.
        latency_ms: measure_shared_latency(
            world,
            cores,
            tokens * model.config().hidden_size,
            segment_ms(&ops, 5 * model.layers.len()),
        ),
        ops_half: medians(&half, &speeds),
        rank_speed: rank_speed(&speeds),
        round_speeds: speeds,
        ops,
        expert_share,
        measured_unix_s: now_unix_s(),
        version: CALIBRATION_VERSION,
    })
}

/// Jitter seeds of the two simulated free passes that time-sliced windows are taken from (apart from the
/// prediction's own draws, which count from 0).
const FREE_PASS_SEEDS: [u64; 2] = [u64::MAX - 1, u64::MAX - 2];

/// Measured op costs with the overlap experiments' link: each collective lasts `comm_ratio` × its window, plus
/// the measured latency of a LocalWorld collective.
#[derive(Clone, Debug)]
pub struct Measured {
    /// The cores the ranks share, when there are fewer than ranks.
    cores: Option<usize>,
    /// The operating system's time slice on those cores (ms), when measured.
    slice_ms: Option<f64>,
    ops: BTreeMap<(&'static str, Option<usize>, Phase), f64>,
    /// The ops on half the batch (a two-micro-batch schedule's), when measured.
    ops_half: BTreeMap<(&'static str, Option<usize>, Phase), f64>,
    spread: BTreeMap<(&'static str, Option<usize>, Phase), f64>,
    seed: Option<u64>,
    expert_share: Vec<Vec<f64>>,
    windows: BTreeMap<(&'static str, Option<usize>, Phase), f64>,
    comm_ratio: f64,
    /// A waiting rank's delay after every collective: [`Calibration::latency_ms`].
    latency_ms: f64,
    /// [`Calibration::rank_speed`].
    rank_speed: Vec<f64>,
    /// [`Calibration::round_speeds`].
    round_speeds: Vec<Vec<f64>>,
    /// The ranks of the run ([`Calibration::world`]).
    world: usize,
}

/// Every compute op name the schedules use, to map a calibration's strings back to them (with the collectives'
/// host work, [`ops::host_work_name`]).
const NAMES: [&str; 20] = [
    ops::ATTN_1,
    ops::ATTN_2,
    ops::ATTN,
    ops::ROUTER,
    ops::EXPERTS,
    ops::SHARED,
    ops::MLP,
    ops::HEAD,
    ops::DISPATCH,
    ops::COMBINE,
    ops::AR_ATTN,
    ops::AR_MOE,
    bwd_ops::JOIN,
    bwd_ops::ATTN,
    bwd_ops::SHARED,
    bwd_ops::EXPERTS,
    bwd_ops::ROUTER,
    bwd_ops::HEAD,
    bwd_ops::COMBINE_BWD,
    MLP_BWD,
];

impl Measured {
    /// The cost model of `calibration` for a model of `layers` layers, split `split`, with collectives at
    /// `comm_ratio` × their window. A trace adds every span of an op and layer in one pass; `schedule` (the
    /// description the costs are for) says how many steps share that total (EP's combine after the wait and the
    /// embedding/head run once per layer or twice, without a layer).
    pub fn new(
        calibration: &Calibration,
        schedule: &Schedule,
        layers: usize,
        split: Split,
        comm_ratio: f64,
    ) -> Self {
        let mut count: BTreeMap<(&'static str, Option<usize>, Phase), f64> = BTreeMap::new();
        for s in &schedule.steps {
            // A collective's host work runs once per issue (pack) and once per wait (unpack).
            let (op, k) = match s {
                Step::Compute(k) => (Some(k.op), k),
                Step::Issue { key, .. } => (ops::pack(key.op), key),
                Step::Wait(k) => (ops::unpack(k.op), k),
            };
            if let Some(op) = op {
                *count.entry((op, k.layer, k.phase)).or_insert(0.0) += 1.0;
            }
        }
        let named = |o: &OpTime| {
            let name = NAMES
                .iter()
                .copied()
                .find(|n| *n == o.op)
                .or_else(|| ops::host_work_name(&o.op))?;
            let phase = if o.backward {
                Phase::Backward
            } else {
                Phase::Forward
            };
            let n = count.get(&(name, o.layer, phase)).copied().unwrap_or(1.0);
            Some(((name, o.layer, phase), n))
        };
        let mut ops = BTreeMap::new();
        let mut fastest = BTreeMap::new();
        let mut fastest_step = BTreeMap::new();
        let mut spread = BTreeMap::new();
        for o in &calibration.ops {
            if let Some((key, n)) = named(o) {
                ops.insert(key, o.ms / n);
                fastest.insert(key, o.min_ms);
                fastest_step.insert(key, o.min_ms / n);
                spread.insert(key, o.spread);
            }
        }
        let ops_half = calibration
            .ops_half
            .iter()
            .filter_map(|o| named(o).map(|(key, n)| (key, o.ms / n)))
            .collect();
        // Windows add every span of an op and layer, from the fastest pass (the experiments' rule). With more
        // ranks than cores, the experiments' free pass runs every rank at once: each op at its share of a core.
        let shared = calibration.cores > 0 && calibration.world > calibration.cores;
        let slowdown = if shared {
            calibration.world as f64 / calibration.cores as f64
        } else {
            1.0
        };
        // With time slices the experiments' free passes are simulated as they run them (every rank at once on
        // the shared cores, collectives instant, each op around its fastest) and a window is the op's spans on
        // the rank and pass with the least of them, their rule: a rank that kept its core through an op shows
        // its time alone.
        let slice_ms = calibration.slice_ms.filter(|_| shared);
        let latency_ms = calibration.latency_ms.unwrap_or(0.0);
        let simulated = slice_ms.and_then(|len| {
            let mut free = Measured {
                cores: Some(calibration.cores),
                slice_ms: Some(len),
                ops: fastest_step,
                ops_half: BTreeMap::new(),
                spread: spread.clone(),
                seed: None,
                expert_share: calibration.expert_share.clone(),
                windows: BTreeMap::new(),
                comm_ratio: 0.0,
                latency_ms,
                rank_speed: Vec::new(),
                round_speeds: Vec::new(),
                world: calibration.world,
            };
            let mut least: BTreeMap<(&'static str, Option<usize>, Phase), f64> = BTreeMap::new();
            // Two passes, as the experiments run, each rank's ops drawn around the fastest with the measured
            // spread: the least of their spans is an extreme of noisy samples there, too.
            for seed in FREE_PASS_SEEDS {
                free.seed = Some(seed);
                let timeline = sim::simulate_sliced(
                    schedule,
                    calibration.world,
                    calibration.cores,
                    len,
                    &|r, k| free.compute(r, k, 1),
                    &|_| 0.0,
                )
                .ok()?;
                for rank in &timeline.ranks {
                    let mut sums: BTreeMap<(&'static str, Option<usize>, Phase), f64> =
                        BTreeMap::new();
                    for i in rank.iter().filter(|i| i.lane == Lane::Compute) {
                        *sums
                            .entry((i.key.op, i.key.layer, i.key.phase))
                            .or_default() += i.len();
                    }
                    for (k, v) in sums {
                        least.entry(k).and_modify(|m| *m = m.min(v)).or_insert(v);
                    }
                }
            }
            Some(least)
        });
        let window_time = |key: (&'static str, Option<usize>, Phase)| match &simulated {
            Some(least) => least.get(&key).copied().unwrap_or(0.0),
            None => fastest.get(&key).copied().unwrap_or(0.0) * slowdown,
        };
        let t = |op: &'static str, l: usize, phase: Phase| window_time((op, Some(l), phase));
        let f = Phase::Forward;
        let b = Phase::Backward;
        let mut w = BTreeMap::new();
        for k in 0..layers {
            let next = |op| if k + 1 < layers { t(op, k + 1, f) } else { 0.0 };
            match split {
                Split::Expert | Split::Hybrid => {
                    w.insert((ops::DISPATCH, Some(k), f), t(ops::ATTN_2, k, f));
                    w.insert(
                        (ops::COMBINE, Some(k), f),
                        t(ops::SHARED, k, f) + next(ops::ATTN_1),
                    );
                }
                Split::Tensor => {
                    w.insert(
                        (ops::AR_ATTN, Some(k), f),
                        t(ops::EXPERTS, k, f) + t(ops::ROUTER, k, f),
                    );
                    let moe = if k + 1 < layers {
                        next(ops::ATTN) + next(ops::ATTN_1)
                    } else {
                        0.0
                    };
                    w.insert((ops::AR_MOE, Some(k), f), moe);
                }
            }
            if calibration.mode == "train" {
                let layer_bwd = |l: usize| {
                    [
                        bwd_ops::JOIN,
                        bwd_ops::ATTN,
                        bwd_ops::EXPERTS,
                        bwd_ops::SHARED,
                        bwd_ops::ROUTER,
                    ]
                    .iter()
                    .map(|op| t(op, l, b))
                    .sum::<f64>()
                };
                w.insert((bwd_ops::COMBINE_BWD, Some(k), b), t(bwd_ops::ATTN, k, b));
                w.insert(
                    (bwd_ops::DISPATCH_BWD, Some(k), b),
                    t(bwd_ops::SHARED, k, b),
                );
                let below = if k > 0 {
                    layer_bwd(k - 1)
                } else {
                    window_time((bwd_ops::HEAD, None, b)) / 2.0
                };
                w.insert((bwd_ops::GRAD_ALLREDUCE, Some(k), b), below);
            }
        }
        Self {
            cores: shared.then_some(calibration.cores),
            slice_ms,
            ops,
            ops_half,
            spread,
            seed: None,
            expert_share: calibration.expert_share.clone(),
            windows: w,
            comm_ratio,
            latency_ms,
            rank_speed: calibration.rank_speed.clone(),
            round_speeds: calibration.round_speeds.clone(),
            world: calibration.world,
        }
    }

    /// The same costs with each rank's op costs drawn around the median with the measured spread (a
    /// log-normal factor of mean 1, fixed by `seed`, the rank and the op), so that ranks drift apart as they do
    /// on this machine; `None` gives every rank the median.
    pub fn with_jitter(mut self, seed: Option<u64>) -> Self {
        self.seed = seed;
        self
    }

    /// The sum of the windows (one rank's worth), ms.
    pub fn window_ms(&self) -> f64 {
        self.windows.values().sum()
    }
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Two numbers uniform in (0, 1), fixed by `parts` (SplitMix64 hashing).
fn uniforms(parts: &[u64]) -> (f64, f64) {
    let h = parts.iter().fold(0u64, |acc, &p| mix(acc ^ p));
    let unit = |x: u64| ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (unit(mix(h)), unit(mix(h ^ 1)))
}

/// What fixes one draw for op `key` on `rank`: the seed, the rank and every field of the key (its op name
/// hashed).
fn draw_parts(seed: u64, rank: usize, key: &OpKey) -> [u64; 6] {
    let name = key
        .op
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    [
        seed,
        rank as u64,
        name,
        key.layer.map_or(u64::MAX, |l| l as u64),
        key.phase as u64,
        key.micro as u64,
    ]
}

/// A standard normal number fixed by `parts` (Box–Muller on [`uniforms`]).
fn normal(parts: &[u64]) -> f64 {
    let (u1, u2) = uniforms(parts);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl Measured {
    /// Rank `rank`'s speed: a draw's, the copy's speed in one of the calibration's rounds (draw `seed` takes round
    /// `seed` mod rounds); without a draw, its median over the rounds; 1 when not measured.
    fn speed(&self, rank: usize) -> f64 {
        let round = match self.seed {
            Some(seed) if !self.round_speeds.is_empty() => self
                .round_speeds
                .get((seed % self.round_speeds.len() as u64) as usize),
            _ => None,
        };
        round
            .unwrap_or(&self.rank_speed)
            .get(rank)
            .copied()
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(1.0)
    }

    /// The draw of `key` on `rank` around 1, with the spread measured for op `measured` (the op whose time it
    /// takes a share of).
    fn jitter(&self, rank: usize, key: &OpKey, measured: &'static str) -> f64 {
        let Some(seed) = self.seed else { return 1.0 };
        let sigma = self
            .spread
            .get(&(measured, key.layer, key.phase))
            .copied()
            .unwrap_or(0.0)
            .clamp(0.0, 1.0);
        if sigma == 0.0 {
            return 1.0;
        }
        let z = normal(&draw_parts(seed, rank, key));
        // Log-normal with mean 1 and coefficient of variation ≈ sigma.
        let s2 = (1.0 + sigma * sigma).ln();
        (s2.sqrt() * z - s2 / 2.0).exp()
    }
}

impl CostModel for Measured {
    fn cores(&self) -> Option<usize> {
        self.cores
    }

    fn time_slice_ms(&self) -> Option<f64> {
        self.slice_ms
    }

    fn compute(&self, rank: usize, key: &OpKey, micro: usize) -> f64 {
        // The calibration runs the experts whole: each part of a cut step (half the rows) takes half.
        let (op, part) = match key.op {
            ops::EXPERTS_1 | ops::EXPERTS_2 => (ops::EXPERTS, 0.5),
            op => (op, 1.0),
        };
        // EP ranks' experts run the rows routed to them: the measured pass's cost scaled by each rank's share.
        let share = match (op, key.layer) {
            (ops::EXPERTS | bwd_ops::EXPERTS, Some(l)) => self
                .expert_share
                .get(l)
                .and_then(|s| s.get(rank))
                .copied()
                .unwrap_or(1.0),
            _ => 1.0,
        };
        // A half batch's op as measured on half the batch (smaller products run less efficiently than half of
        // the whole); without that measurement, or for more micro-batches, the whole's share.
        let k = (op, key.layer, key.phase);
        let cost = match self.ops_half.get(&k) {
            Some(&half) if micro == 2 => half,
            _ => self.ops.get(&k).copied().unwrap_or(0.0) / micro.max(1) as f64,
        };
        part * share * self.speed(rank) * self.jitter(rank, key, op) * cost
    }

    fn collective(&self, key: &OpKey, micro: usize) -> f64 {
        // A micro-batch's collective carries its share of the rows (the experiments' TBO link does the same).
        self.windows
            .get(&(key.op, key.layer, key.phase))
            .copied()
            .unwrap_or(0.0)
            * self.comm_ratio
            / micro.max(1) as f64
    }

    fn wake_ms(&self, rank: usize, key: &OpKey) -> f64 {
        // Every collective also pays the rendezvous and wake-ups of this machine's LocalWorld (and with more
        // ranks than cores, its scheduler's run queues) before a rank waiting for it goes on. The latency is the
        // world's: its last rank's. A draw holds each rank back a share of it, uniform in 0..=(n+1)/n × the
        // latency for n ranks, so that the last of them is held back the latency on average and the ranks leave
        // the collective apart, as the host wakes them one by one.
        let Some(seed) = self.seed else {
            return self.latency_ms;
        };
        let n = self.world.max(1) as f64;
        let (u, _) = uniforms(&draw_parts(seed ^ 0x5741_4B45, rank, key));
        self.latency_ms * u * (n + 1.0) / n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ms: f64) -> OpTable {
        BTreeMap::from([(("experts".to_string(), Some(0), false), ms)])
    }

    #[test]
    fn one_slow_round_moves_neither_the_cost_nor_the_fastest() {
        // Five rounds of two copies × two passes; round 2 ran 60 % slow throughout.
        let rounds: Vec<Round> = [10.0, 11.0, 16.0, 10.5, 9.5]
            .iter()
            .map(|&base| {
                (0..2)
                    .map(|c| {
                        (0..2)
                            .map(|i| table(base + 0.2 * c as f64 + 0.1 * i as f64))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let [op] = medians(&rounds, &round_speeds(&rounds, true))
            .try_into()
            .unwrap();
        // Rounds' fastest: 10, 11, 16, 10.5, 9.5 → median 10.5 (the minimum over all would be 9.5, the
        // fastest of 20 samples where the experiments' link takes its minimum over 4).
        assert!((op.min_ms - 10.5).abs() < 1e-9, "{}", op.min_ms);
        // Median of the 20 samples: round 2's do not pull it up.
        assert!(op.ms > 10.5 && op.ms < 11.0, "{}", op.ms);
        // The spread is the passes' within a round with each copy over its speed (0.05 ms of ~10.6), not the
        // copies' steady difference (0.011 with it) nor the rounds' drift (0.20 over all 20 samples).
        assert!(op.spread > 0.004 && op.spread < 0.006, "{}", op.spread);
        // Copy 1 runs 0.2 ms behind copy 0 in every round: 1.9 % apart.
        let [fast, slow] = rank_speed(&round_speeds(&rounds, true)).try_into().unwrap();
        assert!(fast < 1.0 && slow > 1.0, "{fast} {slow}");
        assert!(
            (slow / fast - 1.0 - 0.2 / 10.55).abs() < 1e-3,
            "{fast} {slow}"
        );
    }

    #[test]
    fn a_slow_core_is_a_ranks_speed_not_its_spread() {
        // Copy 1 runs 30 % slower than copy 0 throughout, in every round; each copy's passes alike.
        let rounds: Vec<Round> = (0..3)
            .map(|_| {
                vec![
                    vec![table(10.0), table(10.0)],
                    vec![table(13.0), table(13.0)],
                ]
            })
            .collect();
        let speeds = round_speeds(&rounds, true);
        let speed = rank_speed(&speeds);
        let [op] = medians(&rounds, &speeds).try_into().unwrap();
        assert_eq!(op.spread, 0.0);
        // The median of an even count is the upper middle sample, for the cost and the speeds alike: each rank's
        // cost × speed is its copy's time.
        assert_eq!(op.ms, 13.0);
        assert_eq!(op.min_ms, 10.0);
        assert_eq!(speed, vec![10.0 / 13.0, 1.0]);
        // Without the speeds, the copies' difference is the spread.
        let [op] = medians(&rounds, &[]).try_into().unwrap();
        assert!((op.spread - 1.5 / 11.5).abs() < 1e-12, "{}", op.spread);
        // One copy: no speeds to tell apart.
        assert!(round_speeds(&[vec![vec![table(10.0)]]], true).is_empty());
        // Copies the run's ranks are not pinned like: no core to give a speed to.
        assert!(round_speeds(&rounds, false).is_empty());
        // The slow core changes sides in the middle round: each round keeps its own speeds, and the spread
        // (each copy over its speed in its round) stays 0.
        let flip: Vec<Round> = [(10.0, 13.0), (13.0, 10.0), (10.0, 13.0)]
            .iter()
            .map(|&(a, b)| vec![vec![table(a), table(a)], vec![table(b), table(b)]])
            .collect();
        let speeds = round_speeds(&flip, true);
        assert_eq!(speeds[1], vec![1.0, 10.0 / 13.0]);
        assert_eq!(rank_speed(&speeds), vec![10.0 / 13.0, 1.0]);
        let [op] = medians(&flip, &speeds).try_into().unwrap();
        assert_eq!(op.spread, 0.0);
    }

    #[test]
    fn a_collectives_latency_is_measured_between_ranks() {
        // One rank: its comm thread's round trip.
        let one = measure_collective_latency(1, 16, 0.0).expect("a world of one runs");
        assert!(one.is_finite() && one > 0.0 && one < 1000.0, "{one}");
        let ms = measure_collective_latency(2, 1024, 0.0).expect("a world of two runs");
        // Over a 2 ms link: the excess over it, well under the link itself.
        let slow = measure_collective_latency(2, 1024, 2.0).expect("a world of two runs");
        assert!(slow.is_finite() && (0.0..2.0).contains(&slow), "{slow}");
        // A rendezvous of two threads: more than nothing, far less than a second.
        assert!(ms.is_finite() && ms > 0.0 && ms < 1000.0, "{ms}");
    }

    #[test]
    fn a_shared_worlds_latency_includes_its_compute_turns() {
        // Two ranks said to share one core, each computing 1 ms between all-reduces: a finite, non-negative
        // excess over the ideal turns (the world's wall time against 2 × the segments).
        let ms = measure_shared_latency(2, 1, 1024, 1.0).expect("a world of two runs");
        assert!(ms.is_finite() && (0.0..1000.0).contains(&ms), "{ms}");
        // As many cores as ranks, or no compute between: the plain rendezvous latency.
        let plain = measure_shared_latency(2, 2, 1024, 1.0).expect("a world of two runs");
        assert!(
            plain.is_finite() && plain > 0.0 && plain < 1000.0,
            "{plain}"
        );
        assert!(measure_shared_latency(1, 1, 16, 1.0).is_some_and(|ms| ms > 0.0));
    }

    #[test]
    fn rounds_are_measured_apart_and_every_error_surfaces() {
        let mut n = 0;
        let out = in_rounds(3, || {
            n += 1;
            Ok(n)
        })
        .unwrap();
        assert_eq!(out, vec![1, 2, 3]);
        let err = in_rounds(3, || -> Result<(), PlanError> { Err(failed("boom")) }).unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
    }

    #[test]
    fn side_by_side_copies_meet_and_a_failing_copy_releases_the_other() {
        use crate::comm::{CollectiveTag, Communicator};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::time::{Duration, Instant};
        // Two copies, three passes each with two collectives: every pass of both copies completes.
        let collectives = AtomicUsize::new(0);
        let round = side_by_side(2, 1, &[], 2, &|comm: &Lockstep, _trace: &Trace| {
            for _ in 0..2 {
                comm.all_reduce(CollectiveTag::new("step"), vec![1.0])
                    .wait()
                    .map_err(failed)?;
                collectives.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(round.len(), 2);
        assert!(
            round.iter().all(|copy| copy.len() == 2),
            "two timed passes each"
        );
        assert_eq!(collectives.load(Ordering::SeqCst), 2 * 3 * 2);
        // One copy gives up before its first collective; the other, waiting for it there, fails instead of
        // hanging, and the error names the cause.
        let calls = AtomicUsize::new(0);
        let start = Instant::now();
        let err = side_by_side(2, 1, &[], 0, &|comm: &Lockstep, _trace: &Trace| {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(failed("copy gave up"));
            }
            comm.all_reduce(CollectiveTag::new("never met"), vec![1.0])
                .wait()
                .map_err(failed)?;
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("copy gave up"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            start.elapsed()
        );
    }
}
