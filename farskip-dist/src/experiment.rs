//! The overlap experiment behind `examples/overlap_inference`: the same prefill run three ways on one world —
//! standard connectivity with blocking collectives, FarSkip with the overlapped schedule, and single-rank
//! FarSkip as the reference — with the link calibrated so that each collective lasts `comm_ratio` times the
//! compute the FarSkip schedule can hide it behind (its overlap window).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::prelude::*;
use farskip_model::{Connectivity, Model};
use serde::Serialize;

mod backend;

pub use backend::Backend;
#[cfg(feature = "mpi")]
pub use backend::MpiBackend;

use crate::balance::{ExpertLoads, Placement};
use crate::comm::{
    CollectiveTag, CommError, Communicator, LinkModel, LocalComm, LocalWorld, LocalWorldConfig,
    RankError,
};
use crate::schedule::{EpRank, ScheduleError, TpRank, ops, tbo_ops};
use crate::trace::{
    Phase, Span, Stream, Trace, comm_time, compute_time, exposed_comm_time, hidden_comm_time,
    overlap_pct, peer_wait_time,
};

/// How the model is split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Parallel {
    /// Expert parallelism: experts sharded, tokens exchanged by all-to-all.
    #[serde(rename = "ep")]
    Expert,
    /// Tensor parallelism: heads and expert columns sharded, partial sums all-reduced.
    #[serde(rename = "tp")]
    Tensor,
}

impl FromStr for Parallel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ep" => Ok(Self::Expert),
            "tp" => Ok(Self::Tensor),
            other => Err(format!("unknown parallelism `{other}` (expected ep or tp)")),
        }
    }
}

/// Errors of a distributed run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The world could not be started.
    #[error(transparent)]
    World(#[from] CommError),
    /// A rank failed; the first failure is reported.
    #[error("rank {rank}: {message}")]
    Rank {
        /// The failing rank.
        rank: usize,
        /// What it reported.
        message: String,
    },
    /// A setting is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The model could not be prepared.
    #[error(transparent)]
    Model(#[from] farskip_model::ModelError),
}

/// Runs the model's forward on `world` LocalWorld ranks and gathers the logits of the whole batch.
///
/// EP splits the batch rows across ranks (the batch must divide evenly); TP runs every row on every rank and
/// returns rank 0's logits. Returns the logits and the wall time.
pub fn run_forward(
    model: &Model,
    parallel: Parallel,
    world: usize,
    input_ids: &Tensor<2, Int>,
    link: LinkModel,
    trace: &Trace,
) -> Result<(Tensor<3>, Duration), RunError> {
    run_forward_with(model, parallel, world, input_ids, link, trace, None)
}

/// Like [`run_forward`]; EP ranks also add the rows routed to each expert into `loads`.
pub fn run_forward_with(
    model: &Model,
    parallel: Parallel,
    world: usize,
    input_ids: &Tensor<2, Int>,
    link: LinkModel,
    trace: &Trace,
    loads: Option<&ExpertLoads>,
) -> Result<(Tensor<3>, Duration), RunError> {
    run_forward_on(
        &Backend::Local,
        model,
        parallel,
        world,
        input_ids,
        link,
        trace,
        loads,
    )
}

/// Checks that `world` ranks can run on `backend` (MPI: the job's size) and split the batch.
fn check_world(backend: &Backend, world: usize) -> Result<(), RunError> {
    match backend.fixed_world() {
        Some(n) if n != world => Err(RunError::Invalid(format!(
            "the {} backend has {n} ranks (one per process) but the experiment asks for {world}",
            backend.name()
        ))),
        _ => Ok(()),
    }
}

/// Which schedule a rank's forward runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardSchedule {
    /// The model's connectivity decides: blocking for standard, overlapped for FarSkip at any depth.
    Connectivity,
    /// Two-micro-batch overlap ([`EpRank::forward_tbo`], [`TpRank::forward_tbo`]; standard connectivity, or
    /// FarSkip at skip depth 1: `farskip+tbo`).
    TwoMicroBatch,
}

/// One rank's forward: this rank's rows (EP) or all rows (TP), after a start barrier; returns the logits
/// and when the forward started and ended on this rank.
fn forward_rank(
    model: &Model,
    schedule: ForwardSchedule,
    parallel: Parallel,
    comm: &dyn Communicator,
    input_ids: &Tensor<2, Int>,
    trace: &Trace,
    loads: Option<&ExpertLoads>,
) -> Result<(Tensor<3>, Instant, Instant), ScheduleError> {
    let (r, world) = (comm.rank(), comm.world_size());
    let rows = match parallel {
        Parallel::Expert => input_ids.dims()[0] / world,
        Parallel::Tensor => input_ids.dims()[0],
    };
    let ids = match parallel {
        Parallel::Expert => input_ids.clone().narrow(0, r * rows, rows),
        Parallel::Tensor => input_ids.clone(),
    };
    enum AnyRank {
        Ep(EpRank),
        Tp(TpRank),
    }
    let rank = match parallel {
        Parallel::Expert => {
            let mut rank = EpRank::new(model, r, world)?;
            if let Some(l) = loads {
                rank = rank.with_loads(l.clone());
            }
            AnyRank::Ep(rank)
        }
        Parallel::Tensor => AnyRank::Tp(TpRank::new(model, r, world)?),
    };
    // Every rank has its weights: start together, so set-up time is neither measured nor skews the
    // first collective.
    comm.barrier(CollectiveTag::new("start")).wait()?;
    let started = Instant::now();
    let out = match (&rank, schedule) {
        (AnyRank::Ep(rank), ForwardSchedule::Connectivity) => rank.forward(comm, trace, ids)?,
        (AnyRank::Tp(rank), ForwardSchedule::Connectivity) => rank.forward(comm, trace, ids)?,
        (AnyRank::Ep(rank), ForwardSchedule::TwoMicroBatch) => {
            rank.forward_tbo(comm, trace, ids)?
        }
        (AnyRank::Tp(rank), ForwardSchedule::TwoMicroBatch) => {
            rank.forward_tbo(comm, trace, ids)?
        }
    };
    // The forward ends when the rank has its logits (dropping the rank's weight copy and the thread pool
    // afterwards is set-up cost, not the forward).
    let ended = Instant::now();
    drop(rank);
    Ok((out, started, ended))
}

/// Like [`run_forward_with`] on `backend`. Under MPI `world` must be the job's size; every process gets the
/// whole batch's logits and every rank's spans in `trace`.
#[allow(clippy::too_many_arguments)]
pub fn run_forward_on(
    backend: &Backend,
    model: &Model,
    parallel: Parallel,
    world: usize,
    input_ids: &Tensor<2, Int>,
    link: LinkModel,
    trace: &Trace,
    loads: Option<&ExpertLoads>,
) -> Result<(Tensor<3>, Duration), RunError> {
    run_forward_scheduled(
        backend,
        model,
        ForwardSchedule::Connectivity,
        parallel,
        world,
        input_ids,
        link,
        trace,
        loads,
    )
}

/// [`run_forward_on`] with an explicit schedule (e.g. two-micro-batch overlap on the standard model).
#[allow(clippy::too_many_arguments)]
pub fn run_forward_scheduled(
    backend: &Backend,
    model: &Model,
    schedule: ForwardSchedule,
    parallel: Parallel,
    world: usize,
    input_ids: &Tensor<2, Int>,
    link: LinkModel,
    trace: &Trace,
    loads: Option<&ExpertLoads>,
) -> Result<(Tensor<3>, Duration), RunError> {
    let [batch, seq] = input_ids.dims();
    if parallel == Parallel::Expert && !batch.is_multiple_of(world) {
        return Err(RunError::Invalid(format!(
            "expert parallelism splits the batch across ranks: batch {batch} does not divide by world {world}"
        )));
    }
    check_world(backend, world)?;
    #[cfg(feature = "mpi")]
    if let Backend::Mpi(mpi) = backend {
        return run_forward_mpi(
            mpi, model, schedule, parallel, input_ids, link, trace, loads,
        );
    }
    let config = LocalWorldConfig::new(link).with_trace(trace.clone());
    let results = LocalWorld::run_with(world, config, |comm: &LocalComm| {
        forward_rank(model, schedule, parallel, comm, input_ids, trace, loads)
    })?;
    let mut logits = Vec::with_capacity(world);
    let (mut started, mut ended) = (None::<Instant>, None::<Instant>);
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok((l, s, e)) => {
                logits.push(l);
                started = Some(started.map_or(s, |t| t.min(s)));
                ended = Some(ended.map_or(e, |t| t.max(e)));
            }
            Err(e) => {
                let message = match e {
                    RankError::Failed(e) => e.to_string(),
                    other => other.to_string(),
                };
                return Err(RunError::Rank { rank, message });
            }
        }
    }
    let wall = match (started, ended) {
        (Some(s), Some(e)) => e.saturating_duration_since(s),
        _ => Duration::ZERO,
    };
    let out = match parallel {
        Parallel::Expert => Tensor::cat(logits, 0),
        Parallel::Tensor => logits.swap_remove(0),
    };
    debug_assert_eq!(out.dims()[..2], [batch, seq]);
    Ok((out, wall))
}

/// [`run_forward_on`] for this process's rank of an MPI job: the collectives run on the job's data
/// communicator behind `link`; logits, wall times and spans are gathered afterwards on the untraced one.
#[cfg(feature = "mpi")]
#[allow(clippy::too_many_arguments)]
fn run_forward_mpi(
    mpi: &MpiBackend,
    model: &Model,
    schedule: ForwardSchedule,
    parallel: Parallel,
    input_ids: &Tensor<2, Int>,
    link: LinkModel,
    trace: &Trace,
    loads: Option<&ExpertLoads>,
) -> Result<(Tensor<3>, Duration), RunError> {
    use crate::comm::LinkedComm;
    let rank = mpi.rank();
    let failed = |e: ScheduleError| RunError::Rank {
        rank,
        message: e.to_string(),
    };
    let linked = LinkedComm::new(&mpi.data, link, trace.clone())?;
    let result = forward_rank(model, schedule, parallel, &linked, input_ids, trace, loads);
    drop(linked);
    let (out, started, ended) = result.map_err(failed)?;
    // The wall time runs from the earliest start to the latest end; the start barrier makes the starts
    // agree, so it is the longest rank's.
    let wall_ms = backend::gather_f64(&mpi.plain, "wall", ms(ended - started))?
        .into_iter()
        .fold(0.0, f64::max);
    backend::mpi_ranks::gather_trace(&mpi.plain, trace)?;
    let out = match parallel {
        Parallel::Expert => {
            let dims = out.dims();
            let device = out.device();
            let mine = out
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| RunError::Invalid(format!("logits: {e:?}")))?;
            let all = backend::mpi_ranks::gather_equal(&mpi.plain, "logits", mine)?;
            let world = mpi.world.size();
            Tensor::from_data(
                TensorData::new(all, [dims[0] * world, dims[1], dims[2]]),
                &device,
            )
        }
        // TP ranks hold the same logits (rank-order sums are identical on every rank).
        Parallel::Tensor => out,
    };
    Ok((out, Duration::from_secs_f64(wall_ms / 1e3)))
}

/// Settings of the overlap experiment.
#[derive(Clone, Debug)]
pub struct OverlapConfig {
    /// Ranks.
    pub world: usize,
    /// EP or TP.
    pub parallel: Parallel,
    /// Collective time as a multiple of its overlap window.
    pub comm_ratio: f64,
    /// Tokens per sequence (EP: one sequence per rank; TP: one sequence).
    pub tokens: usize,
    /// Repeats: each calibrates the link afresh and times FarSkip and the blocking baseline back to back; each
    /// figure reported is its median over the repeats (one forward's overlap varies by tens of points here).
    pub repeats: usize,
    /// Seed of the random input ids.
    pub seed: u64,
    /// EP: place experts by their load on a separate calibration batch ([`crate::balance`]) instead of in
    /// contiguous blocks.
    pub balance: bool,
    /// The overlapped run's connectivity (`farskip`, `farskip-d2`, a range, ...); the link is always calibrated
    /// on the depth-1 FarSkip windows, so every depth and the baseline run over the same link.
    pub connectivity: Connectivity,
}

/// What the experiment measured (the example prints it as JSON). Each time and overlap is its median over the
/// repeats (for the FarSkip run's compute, comm, exposed and peer-wait times, over its repeats); each logit
/// difference is the largest over every repeat.
#[derive(Clone, Debug, Serialize)]
pub struct OverlapReport {
    /// Ranks.
    pub world: usize,
    /// EP or TP.
    pub parallel: Parallel,
    /// Collective time / overlap window.
    pub comm_ratio: f64,
    /// Tokens per rank.
    pub tokens: usize,
    /// Standard connectivity, blocking collectives: wall ms.
    pub blocking_ms: f64,
    /// FarSkip, overlapped schedule: wall ms.
    pub farskip_ms: f64,
    /// `blocking_ms / farskip_ms`.
    pub speedup: f64,
    /// FarSkip: share of comm time covered by the same rank's compute.
    pub overlap_pct: f64,
    /// The blocking baseline's own overlap (near 0).
    pub blocking_overlap_pct: f64,
    /// The busiest rank's compute time in the FarSkip run (the bound when every collective is hidden).
    pub compute_ms: f64,
    /// The busiest rank's total collective time in the FarSkip run.
    pub comm_ms: f64,
    /// Sum of the calibrated overlap windows (one rank's worth).
    pub window_ms: f64,
    /// `farskip_ms / compute_ms`.
    pub wall_over_compute: f64,
    /// The FarSkip run's comm time not covered by compute, summed over ranks (in each repeat `100 − overlap_pct`
    /// of the total).
    pub exposed_ms: f64,
    /// How long the FarSkip run's collectives waited for a later peer, summed over ranks
    /// ([`peer_wait_time`]): when it is close to `exposed_ms`, the uncovered time is skew between the ranks
    /// (one had more expert rows, or its core ran slower), not a window the schedule failed to use.
    pub peer_wait_ms: f64,
    /// Max |distributed FarSkip logits − single-rank FarSkip logits| (over every repeat).
    pub max_abs_diff: f64,
    /// Two-micro-batch overlap on the standard model (the schedule-only baseline), same link: wall ms.
    pub tbo_ms: f64,
    /// Two-micro-batch overlap: share of comm time covered by the same rank's compute.
    pub tbo_overlap_pct: f64,
    /// Max |TBO logits − single-rank standard logits|.
    pub tbo_max_abs_diff: f64,
    /// FarSkip (skip depth 1, all layers) with two-micro-batch overlap on top (`farskip+tbo`): the median wall
    /// time over the same repeats, ms.
    pub farskip_tbo_ms: f64,
    /// `farskip+tbo`: share of comm time covered by the same rank's compute.
    pub farskip_tbo_overlap_pct: f64,
    /// Max |`farskip+tbo` logits − single-rank FarSkip logits|.
    pub farskip_tbo_max_abs_diff: f64,
    /// The overlapped run's connectivity.
    pub connectivity: String,
    /// Max |distributed standard logits − single-rank standard logits|.
    pub blocking_max_abs_diff: f64,
    /// EP: `balanced` (experts placed by load) or `contiguous`; TP: `none`.
    pub expert_placement: &'static str,
    /// EP: rows of the busiest rank over the mean, averaged over layers, on the measured batch, with
    /// contiguous placement and with the placement used.
    pub load_imbalance: Option<(f64, f64)>,
    #[serde(skip)]
    /// The trace of the FarSkip repeat with the median wall time (the one `farskip_ms` reports).
    pub trace: Trace,
    #[serde(skip)]
    /// The trace of the blocking repeat with the median wall time.
    pub blocking_trace: Trace,
}

/// Max |a − b| over two tensors of the same shape ([`farskip_model::compare`]: infinite on NaN/inf or a shape
/// mismatch, so a report or test never reads a broken run as exact).
pub fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f64 {
    farskip_model::compare::max_abs_diff_tensors(a, b)
}

/// Uniform random ids from a seeded LCG (no `rand` dependency).
pub fn random_ids(
    batch: usize,
    seq: usize,
    vocab: usize,
    seed: u64,
    device: &Device,
) -> Tensor<2, Int> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let v: Vec<i64> = (0..batch * seq)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab as u64) as i64
        })
        .collect();
    Tensor::from_data(TensorData::new(v, [batch, seq]), device)
}

type Windows = HashMap<(&'static str, usize), Duration>;

/// Per-(collective, layer) overlap windows from a trace of the FarSkip schedule: the compute the schedule runs
/// while the collective is in flight, on the rank with the least of it (a collective spans all ranks, so this is
/// the window every rank can offer).
fn windows(trace: &Trace, parallel: Parallel, world: usize, num_layers: usize) -> Windows {
    let spans = trace.spans();
    let time = |op: &str, layer: usize| -> Duration {
        (0..world)
            .map(|r| {
                spans
                    .iter()
                    .filter(|s: &&Span| {
                        s.rank == r
                            && s.stream == Stream::Compute
                            && s.layer == Some(layer)
                            && s.op == op
                    })
                    .map(Span::duration)
                    .sum::<Duration>()
            })
            .min()
            .unwrap_or_default()
    };
    let mut w = Windows::new();
    for k in 0..num_layers {
        match parallel {
            Parallel::Expert => {
                w.insert((ops::DISPATCH, k), time(ops::ATTN_2, k));
                let next = if k + 1 < num_layers {
                    time(ops::ATTN_1, k + 1)
                } else {
                    Duration::ZERO
                };
                w.insert((ops::COMBINE, k), time(ops::SHARED, k) + next);
            }
            Parallel::Tensor => {
                w.insert(
                    (ops::AR_ATTN, k),
                    time(ops::EXPERTS, k) + time(ops::ROUTER, k),
                );
                // The last layer's routed all-reduce has no next attention to hide behind: like EP's last
                // combine (without a shared expert) its window, and so its link time, is zero.
                let window = if k + 1 < num_layers {
                    time(ops::ATTN, k + 1) + time(ops::ATTN_1, k + 1)
                } else {
                    Duration::ZERO
                };
                w.insert((ops::AR_MOE, k), window);
            }
        }
    }
    w
}

/// The per-key minimum of several calibration passes: the window the schedule offers even on its fastest
/// pass, so that a link with `comm_ratio` ≤ 1 can really be hidden completely (DESIGN.md §4); with the median,
/// half the passes would be too short for R = 1.
fn min_windows(runs: &[Windows]) -> Windows {
    let mut out = Windows::new();
    if let Some(first) = runs.first() {
        for key in first.keys() {
            if let Some(min) = runs.iter().filter_map(|w| w.get(key).copied()).min() {
                out.insert(*key, min);
            }
        }
    }
    out
}

/// Each collective lasts `ratio ×` its depth-1 FarSkip window. A two-micro-batch collective (`dispatch.mb0`,
/// ...) carries half the rows of the full one and lasts half its time, so TBO moves the same bytes over the same
/// link as the other schedules.
fn calibrated_link(windows: Arc<Windows>, ratio: f64) -> LinkModel {
    LinkModel::fixed_time_per_op(move |call, _bytes| {
        let name = call.tag.name.as_ref();
        let (op, share) = match tbo_ops::full_op(name) {
            Some(full) => (full, 0.5),
            None => (name, 1.0),
        };
        let layer = call.tag.layer.unwrap_or(usize::MAX);
        windows
            .iter()
            .find(|((o, l), _)| *o == op && *l == layer)
            .map_or(Duration::ZERO, |(_, d)| d.mul_f64(ratio * share))
    })
}

/// [`peer_wait_time`] of `phase`, summed over ranks, in ms.
fn peer_wait_ms(trace: &Trace, world: usize, phase: Phase) -> f64 {
    (0..world)
        .map(|r| peer_wait_time(trace, r, phase))
        .sum::<Duration>()
        .as_secs_f64()
        * 1e3
}

fn max_over_ranks(world: usize, f: impl Fn(usize) -> Duration) -> Duration {
    (0..world).map(f).max().unwrap_or_default()
}

/// Added to an experiment's seed for the batch its `balance` placement is computed on ([`placement_batch`]).
pub const BALANCE_SEED: u64 = 0x5EED;

/// The batch an experiment drawn with `seed` computes its `balance` placement on: `world` sequences of `tokens`,
/// other tokens than the measured ones (as a deployment places experts by past traffic).
pub fn placement_batch(
    world: usize,
    tokens: usize,
    vocab: usize,
    seed: u64,
    device: &Device,
) -> Tensor<2, Int> {
    random_ids(
        world,
        tokens,
        vocab,
        seed.wrapping_add(BALANCE_SEED),
        device,
    )
}

/// A placement of `model`'s experts over `world` EP ranks balanced for the loads its FarSkip forward routes
/// on `ids` (`[world × rows, seq]`, split by rows as in [`run_forward`]).
///
/// # Errors
/// If the forward fails or the model has no experts to place.
pub fn balanced_placement(
    model: &Model,
    world: usize,
    ids: &Tensor<2, Int>,
) -> Result<Placement, RunError> {
    balanced_placement_on(&Backend::Local, model, world, ids)
}

/// [`balanced_placement`] on `backend` (every MPI rank gets the same placement).
pub fn balanced_placement_on(
    backend: &Backend,
    model: &Model,
    world: usize,
    ids: &Tensor<2, Int>,
) -> Result<Placement, RunError> {
    let loads = expert_loads_on(backend, model, world, ids)?;
    Placement::balanced(&loads, world).map_err(|e| RunError::Invalid(e.to_string()))
}

/// Rows routed to each expert of each layer (`[layer][expert]`) by `model`'s FarSkip forward on `ids`, run on
/// `world` EP ranks.
///
/// # Errors
/// If the forward fails.
pub fn expert_loads(
    model: &Model,
    world: usize,
    ids: &Tensor<2, Int>,
) -> Result<Vec<Vec<usize>>, RunError> {
    expert_loads_on(&Backend::Local, model, world, ids)
}

/// [`expert_loads`] on `backend`; under MPI each process counts its own rank's rows and the counts are summed
/// over the job, so every process gets the same loads.
pub fn expert_loads_on(
    backend: &Backend,
    model: &Model,
    world: usize,
    ids: &Tensor<2, Int>,
) -> Result<Vec<Vec<usize>>, RunError> {
    let loads = ExpertLoads::new();
    let farskip = model.clone().with_connectivity(Connectivity::farskip())?;
    run_forward_on(
        backend,
        &farskip,
        Parallel::Expert,
        world,
        ids,
        LinkModel::instant(),
        &Trace::disabled(),
        Some(&loads),
    )?;
    let mine = loads.snapshot();
    #[cfg(feature = "mpi")]
    if let Backend::Mpi(mpi) = backend {
        // Row counts stay far below 2^24, where f32 sums are exact.
        let flat: Vec<f32> = mine.iter().flatten().map(|c| *c as f32).collect();
        let sum = mpi
            .plain
            .all_reduce(CollectiveTag::new("expert_loads"), flat)
            .wait()?;
        let mut it = sum.into_iter();
        return Ok(mine
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|_| it.next().unwrap_or(0.0) as usize)
                    .collect()
            })
            .collect());
    }
    Ok(mine)
}

/// Runs the experiment on `model` (its own connectivity is ignored: the config's connectivity overlapped, the
/// standard model blocking and the standard model with two-micro-batch overlap are run).
pub fn overlap_inference(model: &Model, cfg: &OverlapConfig) -> Result<OverlapReport, RunError> {
    overlap_inference_on(&Backend::Local, model, cfg)
}

/// [`overlap_inference`] on `backend`. Under MPI every process runs it as its rank (`cfg.world` must be the
/// job's size) and gets the same report, built from every rank's spans.
pub fn overlap_inference_on(
    backend: &Backend,
    model: &Model,
    cfg: &OverlapConfig,
) -> Result<OverlapReport, RunError> {
    check_world(backend, cfg.world)?;
    if cfg.world == 0 || cfg.tokens < 2 || cfg.repeats == 0 {
        return Err(RunError::Invalid(format!(
            "world and repeats must be > 0 and tokens >= 2 (two-micro-batch overlap splits them in two), got \
             world {}, tokens {}, repeats {}",
            cfg.world, cfg.tokens, cfg.repeats
        )));
    }
    if !(cfg.comm_ratio.is_finite() && cfg.comm_ratio >= 0.0) {
        return Err(RunError::Invalid(format!(
            "comm_ratio {} must be finite and >= 0",
            cfg.comm_ratio
        )));
    }
    let device = model.device();
    let batch = if cfg.parallel == Parallel::Expert {
        cfg.world
    } else {
        1
    };
    let ids = random_ids(
        batch,
        cfg.tokens,
        model.config().vocab_size,
        cfg.seed,
        &device,
    );
    // The references come from the model as given: expert placement must not change the function.
    let reference = model
        .clone()
        .with_connectivity(cfg.connectivity.clone())?
        .forward_unchecked(ids.clone(), None);
    let reference_std = model
        .clone()
        .with_connectivity(Connectivity::Standard)?
        .forward_unchecked(ids.clone(), None);
    let reference_farskip = model
        .clone()
        .with_connectivity(Connectivity::farskip())?
        .forward_unchecked(ids.clone(), None);
    let ep = cfg.parallel == Parallel::Expert && model.config().moe.is_some();
    let (model, expert_placement, load_imbalance) = if ep {
        // The imbalance is reported on the measured batch.
        let measured = expert_loads_on(backend, model, cfg.world, &ids)?;
        let invalid = |e: crate::DispatchError| RunError::Invalid(e.to_string());
        if cfg.balance && cfg.world > 1 {
            // Loads from a different batch than the one measured (as a deployment would use past traffic).
            let calibration = placement_batch(
                batch,
                cfg.tokens,
                model.config().vocab_size,
                cfg.seed,
                &device,
            );
            let placement = balanced_placement_on(backend, model, cfg.world, &calibration)?;
            let imbalance = placement.imbalance(&measured, cfg.world).map_err(invalid)?;
            let placed = placement
                .apply(model)
                .map_err(|e| RunError::Invalid(e.to_string()))?;
            (placed, "balanced", Some(imbalance))
        } else {
            let imbalance = Placement::contiguous(&measured)
                .imbalance(&measured, cfg.world)
                .map_err(invalid)?;
            (model.clone(), "contiguous", Some(imbalance))
        }
    } else {
        (model.clone(), "none", None)
    };
    let model = &model;
    let standard = model.clone().with_connectivity(Connectivity::Standard)?;
    let farskip = model.clone().with_connectivity(Connectivity::farskip())?;
    let measured = model.clone().with_connectivity(cfg.connectivity.clone())?;
    let layers = model.layers.len();

    // The link is calibrated on the FarSkip schedule with a free link — each collective's window on the rank with
    // the least of it, the minimum over two passes — afresh before every repeat, and each repeat runs FarSkip and
    // the blocking baseline back to back on that link: this machine's speed drifts between runs (the same span
    // 18–24 % apart a few seconds later), so a link calibrated once would be too long or too short for later
    // runs, and baseline and FarSkip measured apart would compare different speeds.
    let free_pass = || -> Result<Windows, RunError> {
        let t = Trace::new();
        run_forward_on(
            backend,
            &farskip,
            cfg.parallel,
            cfg.world,
            &ids,
            LinkModel::instant(),
            &t,
            None,
        )?;
        Ok(windows(&t, cfg.parallel, cfg.world, layers))
    };
    free_pass()?; // warm-up
    /// One repeat of one schedule: its wall time, trace, logits and link.
    struct Repeat {
        wall_ms: f64,
        trace: Trace,
        logits: Tensor<3>,
        window_ms: f64,
    }
    let (mut farskip_runs, mut blocking_runs, mut tbo_runs, mut farskip_tbo_runs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.repeats {
        let win = min_windows(&[free_pass()?, free_pass()?]);
        let window_ms = win.values().map(Duration::as_secs_f64).sum::<f64>() * 1e3;
        let win = Arc::new(win);
        // FarSkip, the blocking baseline, two-micro-batch overlap and FarSkip + two micro-batches back to back on
        // this repeat's link.
        for (m, schedule, out) in [
            (&measured, ForwardSchedule::Connectivity, &mut farskip_runs),
            (&standard, ForwardSchedule::Connectivity, &mut blocking_runs),
            (&standard, ForwardSchedule::TwoMicroBatch, &mut tbo_runs),
            (
                &farskip,
                ForwardSchedule::TwoMicroBatch,
                &mut farskip_tbo_runs,
            ),
        ] {
            let trace = Trace::new();
            let (logits, wall) = run_forward_scheduled(
                backend,
                m,
                schedule,
                cfg.parallel,
                cfg.world,
                &ids,
                calibrated_link(win.clone(), cfg.comm_ratio),
                &trace,
                None,
            )?;
            out.push(Repeat {
                wall_ms: ms(wall),
                trace,
                logits,
                window_ms,
            });
        }
    }
    // Each figure is its median over the repeats: one forward's overlap swings by tens of points on a machine
    // whose cores change speed within a second (EP at R = 0.5: 57–97 % within one run of seven repeats), the
    // median of seven within a few. The traces are the repeats with the median wall time; the busiest rank's
    // compute and comm times, the exposed comm and the peer wait are each the median of the FarSkip repeats';
    // the logits' differences are the worst over every repeat.
    let wall = |runs: &[Repeat]| median_by(runs, |r| r.wall_ms);
    let overlap = |runs: &[Repeat]| {
        median_by(runs, |r| {
            overlap_pct(&r.trace, Phase::Forward).unwrap_or(0.0)
        })
    };
    let (blocking_ms, farskip_ms) = (wall(&blocking_runs), wall(&farskip_runs));
    let on_farskip = |f: &dyn Fn(&Trace) -> f64| median_by(&farskip_runs, |r| f(&r.trace));
    let compute_ms = on_farskip(&|t| {
        ms(max_over_ranks(cfg.world, |r| {
            compute_time(t, r, Phase::Forward)
        }))
    });
    let comm_ms = on_farskip(&|t| {
        ms(max_over_ranks(cfg.world, |r| {
            comm_time(t, r, Phase::Forward)
        }))
    });
    let exposed_ms = on_farskip(&|t| ms(exposed_comm_time(t, Phase::Forward)));
    let peer_wait = on_farskip(&|t| peer_wait_ms(t, cfg.world, Phase::Forward));
    let window_ms = median_by(&farskip_runs, |r| r.window_ms);
    // Logits: the largest difference over every repeat.
    let worst = |runs: &[Repeat], reference: &Tensor<3>| {
        worst_of(
            runs.iter()
                .map(|r| max_abs_diff(r.logits.clone(), reference.clone())),
        )
    };
    let median_trace = |runs: &mut [Repeat]| median_item(runs, |r| r.wall_ms).trace.clone();
    Ok(OverlapReport {
        world: cfg.world,
        parallel: cfg.parallel,
        comm_ratio: cfg.comm_ratio,
        tokens: cfg.tokens,
        blocking_ms,
        farskip_ms,
        speedup: blocking_ms / farskip_ms,
        overlap_pct: overlap(&farskip_runs),
        blocking_overlap_pct: overlap(&blocking_runs),
        compute_ms,
        comm_ms,
        window_ms,
        wall_over_compute: farskip_ms / compute_ms,
        exposed_ms,
        peer_wait_ms: peer_wait,
        max_abs_diff: worst(&farskip_runs, &reference),
        connectivity: cfg.connectivity.to_string(),
        blocking_max_abs_diff: worst(&blocking_runs, &reference_std),
        tbo_ms: wall(&tbo_runs),
        tbo_overlap_pct: overlap(&tbo_runs),
        tbo_max_abs_diff: worst(&tbo_runs, &reference_std),
        farskip_tbo_ms: wall(&farskip_tbo_runs),
        farskip_tbo_overlap_pct: overlap(&farskip_tbo_runs),
        farskip_tbo_max_abs_diff: worst(&farskip_tbo_runs, &reference_farskip),
        expert_placement,
        load_imbalance,
        trace: median_trace(&mut farskip_runs),
        blocking_trace: median_trace(&mut blocking_runs),
    })
}

/// How a training step is scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TrainSchedule {
    /// The model's connectivity decides (standard: blocking; FarSkip: overlapped at its depth).
    Connectivity,
    /// Two-micro-batch overlap (standard connectivity): one sequence computes while the other's collectives
    /// are in flight.
    TwoMicroBatch,
}

/// Settings of the overlapped-training experiment.
#[derive(Clone, Debug)]
pub struct TrainingConfig {
    /// Ranks.
    pub world: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Collective time as a multiple of its overlap window (forward and backward).
    pub comm_ratio: f64,
    /// Tokens per rank per step: two sequences of `tokens / 2` per rank, so that two-micro-batch overlap can
    /// run one sequence while the other's collectives are in flight (every schedule trains the same windows).
    pub tokens: usize,
    /// Repeats: each calibrates the link afresh and trains FarSkip, the blocking baseline and two-micro-batch
    /// overlap back to back on it (`steps` steps each); each figure reported is its median over the repeats, each
    /// repeat's figure its step with the median wall time.
    pub repeats: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Seed of the token windows.
    pub seed: u64,
    /// Place experts by their load on a calibration batch ([`crate::balance`]) instead of in contiguous
    /// blocks; the single-rank reference runs the same relabelled model.
    pub balance: bool,
    /// The overlapped run's connectivity: all-layer FarSkip at any skip depth (`farskip`, `farskip-d2`). The
    /// link is calibrated on the depth-1 FarSkip windows whatever it is.
    pub connectivity: Connectivity,
}

/// What the training experiment measured. Each time and overlap is its median over the repeats (each repeat's:
/// its step with the median wall time); each loss and gradient difference is the largest over every repeat.
#[derive(Clone, Debug, Serialize)]
pub struct TrainingReport {
    /// Ranks.
    pub world: usize,
    /// Collective time / overlap window.
    pub comm_ratio: f64,
    /// Steps run.
    pub steps: usize,
    /// Tokens per rank per step.
    pub tokens: usize,
    /// FarSkip forward: share of comm time covered by compute.
    pub fwd_overlap_pct: f64,
    /// FarSkip backward: share of comm time covered by compute.
    pub bwd_overlap_pct: f64,
    /// Blocking baseline's forward and backward overlap.
    pub blocking_overlap_pct: f64,
    /// Standard connectivity, blocking collectives: the median step's wall time (the slowest rank's), ms.
    pub blocking_step_ms: f64,
    /// FarSkip, overlapped schedule: the median step's wall time, ms.
    pub farskip_step_ms: f64,
    /// Two-micro-batch overlap on standard connectivity (the schedule-only baseline): the median step, ms.
    pub tbo_step_ms: f64,
    /// Two-micro-batch overlap: share of comm time covered by compute, forward and backward together.
    pub tbo_overlap_pct: f64,
    /// Two-micro-batch overlap: forward share.
    pub tbo_fwd_overlap_pct: f64,
    /// Two-micro-batch overlap: backward share.
    pub tbo_bwd_overlap_pct: f64,
    /// Max |TBO loss − single-rank standard loss| over the steps.
    pub tbo_loss_max_abs_diff: f64,
    /// [`TrainingReport::grad_max_rel_diff`] of two-micro-batch overlap against the single-rank standard model.
    pub tbo_grad_max_rel_diff: f64,
    /// Repeats run (see [`TrainingConfig::repeats`]).
    pub repeats: usize,
    /// The busiest rank's compute in that FarSkip step.
    pub compute_step_ms: f64,
    /// `blocking_step_ms / farskip_step_ms`.
    pub speedup: f64,
    /// Link time of the replicated-gradient all-reduces in the blocking baseline's median step (the busiest
    /// rank's). Standard connectivity could hide these behind the backward of the layers below, as DDP does;
    /// the blocking baseline waits for them like every other collective.
    pub blocking_grad_allreduce_ms: f64,
    /// `(blocking_step_ms − blocking_grad_allreduce_ms) / farskip_step_ms`: the speedup over standard
    /// connectivity whose gradient all-reduces are hidden and whose all-to-alls block — what FarSkip's own
    /// overlap of the expert all-to-alls buys.
    pub speedup_excluding_grad_allreduce: f64,
    /// `farskip_step_ms / compute_step_ms`.
    pub wall_over_compute: f64,
    /// The reported FarSkip step's forward comm time not covered by compute, summed over ranks.
    pub fwd_exposed_ms: f64,
    /// How long its forward collectives waited for a later peer, summed over ranks ([`peer_wait_time`]; see
    /// [`OverlapReport::peer_wait_ms`]).
    pub fwd_peer_wait_ms: f64,
    /// The same two for the backward.
    pub bwd_exposed_ms: f64,
    /// See `fwd_peer_wait_ms`.
    pub bwd_peer_wait_ms: f64,
    /// Max |EP loss − single-rank loss| over the steps.
    pub loss_max_abs_diff: f64,
    /// Max over parameters of max|g_EP − g_1| / max(max|g_1|, [`GRAD_SCALE_FLOOR`]) after the last step's backward.
    pub grad_max_rel_diff: f64,
    /// The parameter where `grad_max_rel_diff` was found.
    pub grad_max_rel_diff_param: String,
    /// Single-rank losses per step.
    pub losses: Vec<f64>,
    /// The overlapped run's connectivity.
    pub connectivity: String,
    #[serde(skip)]
    /// Trace of the FarSkip step with the median wall time (of the repeat with the median of those).
    pub trace: Trace,
    #[serde(skip)]
    /// Trace of the blocking step with the median wall time.
    pub blocking_trace: Trace,
}

/// Gradients by parameter name.
type NamedGrads = Vec<(String, Vec<f32>)>;

/// Per-parameter gradients by structural name, for comparing a rank's (sliced) model with the full one.
/// The module path of every float parameter (`layers.0.attention.q_proj.weight`, …), by id.
fn param_paths(model: &Model) -> HashMap<burn::module::ParamId, String> {
    use burn::module::{Module, ModuleVisitor, ParamId};
    struct Paths(HashMap<ParamId, String>, Vec<String>);
    impl ModuleVisitor for Paths {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            if !container_type.starts_with("Enum:") {
                self.1.push(name.to_owned());
            }
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            if !container_type.starts_with("Enum:") {
                self.1.pop();
            }
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            self.0.insert(param.id, self.1.join("."));
        }
    }
    let mut paths = Paths(HashMap::new(), Vec::new());
    model.visit(&mut paths);
    paths.0
}

fn named_grads(model: &Model, grads: &burn::optim::GradientsParams) -> Vec<(String, Vec<f32>)> {
    use farskip_model::model::Ffn;
    let paths = param_paths(model);
    let mut out = Vec::new();
    let read = |t: Tensor<3>| {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default()
    };
    for (id, dims) in crate::training::param_list(model) {
        let v = match dims.len() {
            1 => grads.get::<1>(id).map(|t| {
                t.into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap_or_default()
            }),
            2 => grads.get::<2>(id).map(|t| {
                t.into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap_or_default()
            }),
            _ => None,
        };
        if let Some(v) = v {
            out.push((
                paths.get(&id).cloned().unwrap_or_else(|| format!("{id:?}")),
                v,
            ));
        }
    }
    for (i, layer) in model.layers.iter().enumerate() {
        if let Ffn::Moe(moe) = &layer.ffn {
            for (name, p) in [
                ("gate_up", &moe.experts.gate_up),
                ("down", &moe.experts.down),
            ] {
                // A bank whose experts received no rows has no gradient: zeros, so that every rank lists
                // the same parameters (the MPI gather lines them up by position).
                let g = grads
                    .get::<3>(p.id)
                    .map_or_else(|| vec![0.0; p.val().shape().num_elements()], read);
                out.push((format!("experts:layers.{i}.{name}"), g));
            }
        }
    }
    out
}

fn windows_training(trace: &Trace, world: usize, num_layers: usize) -> Windows {
    use crate::training::bwd_ops;
    let mut w = windows(trace, Parallel::Expert, world, num_layers);
    let spans = trace.spans();
    let time = |op: &str, layer: Option<usize>| -> Duration {
        (0..world)
            .map(|r| {
                spans
                    .iter()
                    .filter(|s| {
                        s.rank == r && s.stream == Stream::Compute && s.layer == layer && s.op == op
                    })
                    .map(Span::duration)
                    .sum::<Duration>()
            })
            .min()
            .unwrap_or_default()
    };
    let layer_bwd = |k: usize| {
        [
            bwd_ops::JOIN,
            bwd_ops::ATTN,
            bwd_ops::EXPERTS,
            bwd_ops::SHARED,
            bwd_ops::ROUTER,
        ]
        .iter()
        .map(|op| time(op, Some(k)))
        .sum::<Duration>()
    };
    for k in 0..num_layers {
        w.insert((bwd_ops::COMBINE_BWD, k), time(bwd_ops::ATTN, Some(k)));
        w.insert((bwd_ops::DISPATCH_BWD, k), time(bwd_ops::SHARED, Some(k)));
        let below = if k > 0 {
            layer_bwd(k - 1)
        } else {
            time(bwd_ops::HEAD, None) / 2
        };
        w.insert((bwd_ops::GRAD_ALLREDUCE, k), below);
    }
    w
}

/// Adam's ε in the training comparison: burn's default. With ε = 1e-8, gradients at float-rounding level
/// (~1e-9, where the EP and single-rank sums round differently) become whole `lr`-sized steps of either
/// sign, and three steps later the two runs differ by much more than rounding; ε = 1e-5 keeps such noise
/// at the noise level.
const ADAM_EPSILON: f32 = 1e-5;

/// One training step's wall time (ms, the slowest rank's) and its trace.
type TimedStep = (f64, Trace);

/// Runs `steps` EP training steps on `world` ranks; returns per-step global losses, the last step's
/// gradients of every rank (by name) and the step with the median wall time, whole: its wall time (the slowest
/// rank's) and its trace, so that the overlap, the compute time and the wall time of a report describe one step.
fn ep_train(
    backend: &Backend,
    model: &Model,
    cfg: &TrainingConfig,
    windows_per_step: &[Tensor<2, Int>],
    link: LinkModel,
    schedule: TrainSchedule,
) -> Result<(Vec<f64>, Vec<NamedGrads>, TimedStep), RunError> {
    #[cfg(feature = "mpi")]
    if let Backend::Mpi(mpi) = backend {
        return ep_train_mpi(mpi, model, cfg, windows_per_step, link, schedule);
    }
    let _ = backend;
    let world = cfg.world;
    // The ranks record into one trace, cleared at every step; each step's spans are copied out after it.
    let trace = &Trace::new();
    let config = LocalWorldConfig::new(link).with_trace(trace.clone());
    let step_traces: Mutex<Vec<Trace>> = Mutex::new(Vec::new());
    // Replicated gradients are all-reduced on a second communicator (their own comm thread per rank),
    // as a data-parallel group next to the expert-parallel one.
    let grad_comms: Vec<Mutex<Option<LocalComm>>> = LocalWorld::with_config(world, config.clone())?
        .into_iter()
        .map(|c| Mutex::new(Some(c)))
        .collect();
    let results = LocalWorld::run_with(world, config, |comm: &LocalComm| {
        let r = comm.rank();
        let grad_comm = grad_comms[r]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                ScheduleError::Comm(CommError::InvalidArgument(format!(
                    "the gradient communicator of rank {r} was already taken"
                )))
            })?;
        train_rank(
            model,
            cfg,
            windows_per_step,
            comm,
            &grad_comm,
            trace,
            schedule,
            || {
                // Every rank's spans of this step are in (the loss all-reduce follows them all): keep a copy
                // before any rank clears the trace for the next step.
                if r == 0 {
                    step_traces
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Trace::from_spans(trace.spans()));
                }
                Ok(())
            },
        )
    })?;
    let mut all = Vec::new();
    let mut losses = Vec::new();
    // Per step, the slowest rank's wall time.
    let mut walls: Vec<f64> = Vec::new();
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok((l, g, w)) => {
                losses = l;
                all.push(g);
                walls.resize(w.len().max(walls.len()), 0.0);
                for (slot, ms) in walls.iter_mut().zip(w) {
                    *slot = slot.max(ms);
                }
            }
            Err(e) => {
                return Err(RunError::Rank {
                    rank,
                    message: e.to_string(),
                });
            }
        }
    }
    let traces = step_traces.into_inner().unwrap_or_else(|e| e.into_inner());
    median_step(losses, all, walls, traces)
}

/// The largest of `diffs` (0 when empty), NaN if any is: a broken repeat is never hidden by a sound one.
fn worst_of(diffs: impl Iterator<Item = f64>) -> f64 {
    worst_by(diffs, |d| *d).unwrap_or(0.0)
}

/// The item of `items` with the largest `key` (`None` when empty); the last whose key is NaN if any is (no sound
/// item displaces a NaN one).
fn worst_by<T>(items: impl Iterator<Item = T>, key: impl Fn(&T) -> f64) -> Option<T> {
    items.reduce(|a, b| {
        let kb = key(&b);
        if kb.is_nan() || kb > key(&a) { b } else { a }
    })
}

/// Milliseconds of `d`.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The median of `f` over `items` (see [`median`]).
fn median_by<T>(items: &[T], f: impl Fn(&T) -> f64) -> f64 {
    median(items.iter().map(f).collect())
}

/// The item of `items` (not empty) with the median `key`, the upper middle of an even count (sorts `items`).
fn median_item<T>(items: &mut [T], key: impl Fn(&T) -> f64) -> &T {
    items.sort_by(|a, b| key(a).total_cmp(&key(b)));
    &items[items.len() / 2]
}

/// The median of `v` (the upper middle of an even count; 0 when empty).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The step with the median wall time, whole (see [`ep_train`]).
fn median_step(
    losses: Vec<f64>,
    grads: Vec<NamedGrads>,
    walls: Vec<f64>,
    traces: Vec<Trace>,
) -> Result<(Vec<f64>, Vec<NamedGrads>, TimedStep), RunError> {
    let mut steps: Vec<(f64, Trace)> = walls.into_iter().zip(traces).collect();
    steps.sort_by(|a, b| a.0.total_cmp(&b.0));
    if steps.is_empty() {
        return Err(RunError::Invalid("no training step ran".into()));
    }
    let median_step = steps.swap_remove(steps.len() / 2);
    Ok((losses, grads, median_step))
}

/// One rank's training steps: per step the global loss, the rank's wall time, and (last step) its gradients
/// by name. `after_step` runs once every rank's spans of the step are recorded, before the next step clears
/// the trace.
#[allow(clippy::too_many_arguments)]
fn train_rank<C: Communicator + ?Sized, G: Communicator + ?Sized>(
    model: &Model,
    cfg: &TrainingConfig,
    windows_per_step: &[Tensor<2, Int>],
    comm: &C,
    grad_comm: &G,
    trace: &Trace,
    schedule: TrainSchedule,
    mut after_step: impl FnMut() -> Result<(), ScheduleError>,
) -> Result<(Vec<f64>, NamedGrads, Vec<f64>), ScheduleError> {
    use burn::optim::AdamWConfig;
    let (r, world) = (comm.rank(), comm.world_size());
    let mut rank = crate::training::EpTrainRank::new(model, r, world)?;
    let mut optim = AdamWConfig::new().with_epsilon(ADAM_EPSILON).init();
    let mut losses = Vec::new();
    let mut walls = Vec::new();
    let mut last = Vec::new();
    for (s, w) in windows_per_step.iter().enumerate() {
        trace.clear();
        comm.barrier(CollectiveTag::new("step_start")).wait()?;
        let t0 = Instant::now();
        let rows = w.dims()[0] / world;
        let mine = w.clone().narrow(0, r * rows, rows);
        let objective = crate::training::Objective::CrossEntropy;
        let step = match schedule {
            TrainSchedule::Connectivity => {
                rank.step_on(comm, grad_comm, trace, mine, &objective)?
            }
            TrainSchedule::TwoMicroBatch => {
                rank.step_tbo_on(comm, grad_comm, trace, mine, &objective)?
            }
        };
        walls.push(ms(t0.elapsed()));
        let total = comm
            .all_reduce(CollectiveTag::new("loss"), vec![step.loss as f32])
            .wait()?;
        losses.push(total[0] as f64);
        after_step()?;
        comm.barrier(CollectiveTag::new("step_end")).wait()?;
        if s + 1 == windows_per_step.len() {
            last = named_grads(rank.model(), &step.grads);
        }
        let m = optim.step(cfg.lr, rank.model().clone(), step.grads);
        rank.set_model(m);
    }
    Ok((losses, last, walls))
}

/// [`ep_train`] for this process's rank of an MPI job: the expert-parallel and the gradient collectives run
/// on the job's two communicators behind `link`; each step's spans, the wall times and the last step's
/// gradients of every rank are gathered on the untraced one.
#[cfg(feature = "mpi")]
fn ep_train_mpi(
    mpi: &MpiBackend,
    model: &Model,
    cfg: &TrainingConfig,
    windows_per_step: &[Tensor<2, Int>],
    link: LinkModel,
    schedule: TrainSchedule,
) -> Result<(Vec<f64>, Vec<NamedGrads>, TimedStep), RunError> {
    use crate::comm::LinkedComm;
    let rank = mpi.rank();
    let trace = &Trace::new();
    let comm = LinkedComm::new(&mpi.data, link.clone(), trace.clone())?;
    let grad_comm = LinkedComm::new(&mpi.grads, link, trace.clone())?;
    let mut traces = Vec::new();
    let result = train_rank(
        model,
        cfg,
        windows_per_step,
        &comm,
        &grad_comm,
        trace,
        schedule,
        || {
            backend::mpi_ranks::gather_trace(&mpi.plain, trace)?;
            traces.push(Trace::from_spans(trace.spans()));
            Ok(())
        },
    );
    drop((comm, grad_comm));
    let (losses, grads, walls) = result.map_err(|e| RunError::Rank {
        rank,
        message: e.to_string(),
    })?;
    let mut slowest = Vec::with_capacity(walls.len());
    for ms in walls {
        let all = backend::gather_f64(&mpi.plain, "step_wall", ms)?;
        slowest.push(all.into_iter().fold(0.0, f64::max));
    }
    let all = gather_grads(mpi, cfg.world, grads)?;
    median_step(losses, all, slowest, traces)
}

/// Every rank's named gradients, from this rank's: the ranks hold the same parameters (their own slice of
/// each expert bank, of the same size on every rank because the world divides the experts, zeros where it got
/// no rows), so the lists line up; ranks whose lists still differ are reported.
#[cfg(feature = "mpi")]
fn gather_grads(
    mpi: &MpiBackend,
    world: usize,
    mine: NamedGrads,
) -> Result<Vec<NamedGrads>, RunError> {
    // Names and lengths come from this rank's list; a name missing on another rank is a protocol error.
    let names: Vec<(String, usize)> = mine.iter().map(|(n, v)| (n.clone(), v.len())).collect();
    let lens: Vec<f32> = names.iter().map(|(_, l)| *l as f32).collect();
    let all_lens =
        backend::mpi_ranks::gather_equal(&mpi.plain, "grad_count", vec![lens.len() as f32])?;
    if all_lens.iter().any(|n| *n as usize != names.len()) {
        return Err(RunError::Invalid(format!(
            "ranks have different numbers of gradients ({all_lens:?}): an expert received no rows on some rank"
        )));
    }
    let all_sizes = backend::mpi_ranks::gather_equal(&mpi.plain, "grad_sizes", lens)?;
    let flat: Vec<f32> = mine.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    let total = flat.len();
    let totals = backend::mpi_ranks::gather_equal(&mpi.plain, "grad_total", vec![total as f32])?;
    if totals.iter().any(|t| *t as usize != total) {
        return Err(RunError::Invalid(format!(
            "ranks hold gradients of different sizes ({totals:?})"
        )));
    }
    let values = backend::mpi_ranks::gather_equal(&mpi.plain, "grads", flat)?;
    let mut out = Vec::with_capacity(world);
    for r in 0..world {
        let block = &values[r * total..(r + 1) * total];
        let sizes = &all_sizes[r * names.len()..(r + 1) * names.len()];
        let mut at = 0;
        let mut grads = Vec::with_capacity(names.len());
        for ((name, _), len) in names.iter().zip(sizes) {
            let len = *len as usize;
            grads.push((name.clone(), block[at..at + len].to_vec()));
            at += len;
        }
        out.push(grads);
    }
    Ok(out)
}

/// Single-rank FarSkip training on the whole batch: losses per step and the last step's gradients by name.
fn reference_train(
    model: &Model,
    cfg: &TrainingConfig,
    windows_per_step: &[Tensor<2, Int>],
) -> (Vec<f64>, Vec<(String, Vec<f32>)>) {
    use burn::optim::{AdamWConfig, GradientsParams};
    let device = model.device();
    let mut m = model.clone().train().fork(&device.autodiff());
    let mut optim = AdamWConfig::new().with_epsilon(ADAM_EPSILON).init();
    let mut losses = Vec::new();
    let mut last = Vec::new();
    for (s, w) in windows_per_step.iter().enumerate() {
        let [b, t1] = w.dims();
        let t = t1 - 1;
        let logits = m.forward_unchecked(w.clone().narrow(1, 0, t), None);
        let v = logits.dims()[2];
        let logp = burn::tensor::activation::log_softmax(logits.reshape([b * t, v]), 1);
        let loss = logp
            .gather(1, w.clone().narrow(1, 1, t).reshape([b * t, 1]))
            .neg()
            .mean();
        losses.push(loss.clone().into_scalar::<f64>());
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        if s + 1 == windows_per_step.len() {
            last = named_grads(&m, &grads);
        }
        m = optim.step(cfg.lr, m, grads);
    }
    (losses, last)
}

/// Gradient magnitude below which [`TrainingReport::grad_max_rel_diff`] compares absolutely (differences over
/// this floor instead of over the parameter's largest gradient).
pub const GRAD_SCALE_FLOOR: f32 = 1e-6;

/// Compares rank gradients (replicated ones by id on every rank, experts as the owner's slice) with the
/// single-rank ones: max over parameters of max|Δ| / max(max|g|, [`GRAD_SCALE_FLOOR`]).
fn grad_rel_diff(
    model: &Model,
    world: usize,
    reference: &[(String, Vec<f32>)],
    ranks: &[Vec<(String, Vec<f32>)>],
) -> (f64, String) {
    let sharding = model
        .config()
        .moe
        .as_ref()
        .map(|m| crate::dispatch::ExpertSharding::new(m.num_experts, world));
    let mut worst = (0.0f64, String::new());
    for (name, g_ref) in reference {
        // A gradient that is zero up to rounding has no relative error (e.g. the router of a top-1 router
        // with renormalised weights: its weight is always 1, so its gradient is 0 analytically and ~1e-14 in
        // f32): below GRAD_SCALE_FLOOR, differences are measured against the floor.
        let scale = g_ref
            .iter()
            .fold(0.0f32, |a, b| a.max(b.abs()))
            .max(GRAD_SCALE_FLOOR) as f64;
        if name.starts_with("experts:") {
            // Experts: concatenate the owners' slices in rank order. A rank whose experts received no rows in
            // that layer has no gradient for them: zeros.
            let per_expert = sharding
                .as_ref()
                .and_then(|s| s.as_ref().ok())
                .map(|s| (s, g_ref.len() / s.num_experts().max(1)));
            let joined: Vec<f32> = ranks
                .iter()
                .enumerate()
                .flat_map(|(rank, r)| {
                    r.iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_else(|| match per_expert {
                            Some((s, len)) => vec![0.0; len * s.num_local(rank)],
                            None => Vec::new(),
                        })
                })
                .collect();
            // Infinite on NaN/inf or a length mismatch.
            let d = farskip_model::compare::max_abs_diff(&joined, g_ref) / scale;
            if d > worst.0 {
                worst = (d, name.clone());
            }
        } else {
            for r in ranks {
                let d = match r.iter().find(|(n, _)| n == name) {
                    Some((_, v)) => farskip_model::compare::max_abs_diff(v, g_ref) / scale,
                    None => f64::INFINITY,
                };
                if d > worst.0 {
                    worst = (d, name.clone());
                }
            }
        }
    }
    worst
}

/// Runs the training experiment: single-rank training of the config's connectivity (the reference), EP training
/// of it overlapped, and EP standard connectivity blocking.
pub fn overlap_training(model: &Model, cfg: &TrainingConfig) -> Result<TrainingReport, RunError> {
    overlap_training_on(&Backend::Local, model, cfg)
}

/// [`overlap_training`] on `backend`. Under MPI every process runs it as its rank (`cfg.world` must be the
/// job's size) and gets the same report.
pub fn overlap_training_on(
    backend: &Backend,
    model: &Model,
    cfg: &TrainingConfig,
) -> Result<TrainingReport, RunError> {
    check_world(backend, cfg.world)?;
    if cfg.world == 0
        || cfg.steps == 0
        || cfg.repeats == 0
        || cfg.tokens < 2
        || !cfg.tokens.is_multiple_of(2)
    {
        return Err(RunError::Invalid(format!(
            "world, steps and repeats must be > 0 and tokens even and >= 2 (two sequences per rank), got world \
             {}, steps {}, repeats {}, tokens {}",
            cfg.world, cfg.steps, cfg.repeats, cfg.tokens
        )));
    }
    let device = model.device();
    let vocab = model.config().vocab_size;
    // Two sequences per rank (rows r·2 and r·2 + 1 go to rank r).
    let windows_per_step: Vec<Tensor<2, Int>> = (0..cfg.steps)
        .map(|s| {
            random_ids(
                2 * cfg.world,
                cfg.tokens / 2 + 1,
                vocab,
                cfg.seed + s as u64,
                &device,
            )
        })
        .collect();
    let placed;
    let model = if cfg.balance && cfg.world > 1 && model.config().moe.is_some() {
        let calibration = placement_batch(cfg.world, cfg.tokens, vocab, cfg.seed, &device);
        placed = balanced_placement_on(backend, model, cfg.world, &calibration)?
            .apply(model)
            .map_err(|e| RunError::Invalid(e.to_string()))?;
        &placed
    } else {
        model
    };
    let farskip = model.clone().with_connectivity(Connectivity::farskip())?;
    let measured = model.clone().with_connectivity(cfg.connectivity.clone())?;
    let standard = model.clone().with_connectivity(Connectivity::Standard)?;
    let (ref_losses, ref_grads) = reference_train(&measured, cfg, &windows_per_step);
    let (std_losses, std_grads) = reference_train(&standard, cfg, &windows_per_step);

    // Every repeat calibrates the link afresh — each collective's depth-1 FarSkip window with a free link, the
    // minimum over two one-step passes — and trains FarSkip, the blocking baseline and two-micro-batch overlap
    // back to back on it, so the three compare at the same machine speed. The embedding/head gradient
    // all-reduce has no window in the FarSkip schedule (it is waited for at the end of the step), so it gets no
    // link time in any schedule: it is charged equally (zero) to all three.
    let calib = &windows_per_step[..1];
    let one = TrainingConfig {
        steps: 1,
        ..cfg.clone()
    };
    let calibrate_pass = || -> Result<Windows, RunError> {
        let (_, _, (_, step)) = ep_train(
            backend,
            &farskip,
            &one,
            calib,
            LinkModel::instant(),
            TrainSchedule::Connectivity,
        )?;
        Ok(windows_training(&step, cfg.world, model.layers.len()))
    };
    calibrate_pass()?; // warm-up
    struct Repeat {
        step_ms: f64,
        trace: Trace,
        losses: Vec<f64>,
        /// The gradients' largest relative difference from the reference (and its parameter); the gradients
        /// themselves are dropped after each run (every rank's, a model's worth per run).
        grad_diff: (f64, String),
    }
    let (mut farskip_runs, mut blocking_runs, mut tbo_runs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.repeats {
        let win = Arc::new(min_windows(&[calibrate_pass()?, calibrate_pass()?]));
        for (m, schedule, reference, out) in [
            (
                &measured,
                TrainSchedule::Connectivity,
                Some(&ref_grads),
                &mut farskip_runs,
            ),
            (
                &standard,
                TrainSchedule::Connectivity,
                None,
                &mut blocking_runs,
            ),
            (
                &standard,
                TrainSchedule::TwoMicroBatch,
                Some(&std_grads),
                &mut tbo_runs,
            ),
        ] {
            let (losses, grads, (step_ms, trace)) = ep_train(
                backend,
                m,
                cfg,
                &windows_per_step,
                calibrated_link(win.clone(), cfg.comm_ratio),
                schedule,
            )?;
            let grad_diff = reference.map_or((0.0, String::new()), |r| {
                grad_rel_diff(model, cfg.world, r, &grads)
            });
            out.push(Repeat {
                step_ms,
                trace,
                losses,
                grad_diff,
            });
        }
    }
    // Each figure is its median over the repeats (each repeat's figure is its median step's), as the inference
    // experiment's: one step's overlap is a noisy sample on a machine whose cores change speed within a second.
    // The losses and gradients compared are the worst over every repeat; the traces are the repeats with the
    // median step.
    let both_phases = |t: &Trace| {
        let (mut hidden, mut total) = (Duration::ZERO, Duration::ZERO);
        for r in 0..cfg.world {
            for p in [Phase::Forward, Phase::Backward] {
                hidden += hidden_comm_time(t, r, p);
                total += comm_time(t, r, p);
            }
        }
        if total.is_zero() {
            0.0
        } else {
            100.0 * hidden.as_secs_f64() / total.as_secs_f64()
        }
    };
    let on_trace = |runs: &[Repeat], f: &dyn Fn(&Trace) -> f64| median_by(runs, |r| f(&r.trace));
    let phase_overlap = |p: Phase| move |t: &Trace| overlap_pct(t, p).unwrap_or(0.0);
    let farskip_step_ms = median_by(&farskip_runs, |r| r.step_ms);
    let blocking_step_ms = median_by(&blocking_runs, |r| r.step_ms);
    let tbo_step_ms = median_by(&tbo_runs, |r| r.step_ms);
    let compute_step_ms = on_trace(&farskip_runs, &|t| {
        ms(max_over_ranks(cfg.world, |r| {
            compute_time(t, r, Phase::Forward) + compute_time(t, r, Phase::Backward)
        }))
    });
    let blocking_grad_allreduce_ms = on_trace(&blocking_runs, &|t| {
        let spans = t.spans();
        ms(max_over_ranks(cfg.world, |r| {
            spans
                .iter()
                .filter(|s| {
                    s.rank == r
                        && s.stream == Stream::Comm
                        && s.op == crate::training::bwd_ops::GRAD_ALLREDUCE
                })
                .map(Span::duration)
                .sum()
        }))
    });
    let worst_grads = |runs: &[Repeat]| {
        worst_by(runs.iter().map(|r| r.grad_diff.clone()), |g| g.0).unwrap_or((0.0, String::new()))
    };
    let worst_losses = |runs: &[Repeat], reference: &[f64]| {
        worst_of(
            runs.iter()
                .map(|r| farskip_model::compare::max_abs_diff(&r.losses, reference)),
        )
    };
    let median_trace = |runs: &mut [Repeat]| median_item(runs, |r| r.step_ms).trace.clone();
    let (fwd, bwd) = (
        phase_overlap(Phase::Forward),
        phase_overlap(Phase::Backward),
    );
    let (grad_max_rel_diff, grad_max_rel_diff_param) = worst_grads(&farskip_runs);
    Ok(TrainingReport {
        world: cfg.world,
        comm_ratio: cfg.comm_ratio,
        steps: cfg.steps,
        tokens: cfg.tokens,
        fwd_overlap_pct: on_trace(&farskip_runs, &fwd),
        bwd_overlap_pct: on_trace(&farskip_runs, &bwd),
        blocking_overlap_pct: on_trace(&blocking_runs, &both_phases),
        blocking_step_ms,
        farskip_step_ms,
        tbo_step_ms,
        tbo_overlap_pct: on_trace(&tbo_runs, &both_phases),
        tbo_fwd_overlap_pct: on_trace(&tbo_runs, &fwd),
        tbo_bwd_overlap_pct: on_trace(&tbo_runs, &bwd),
        tbo_loss_max_abs_diff: worst_losses(&tbo_runs, &std_losses),
        tbo_grad_max_rel_diff: worst_grads(&tbo_runs).0,
        repeats: cfg.repeats,
        compute_step_ms,
        speedup: blocking_step_ms / farskip_step_ms,
        blocking_grad_allreduce_ms,
        speedup_excluding_grad_allreduce: (blocking_step_ms - blocking_grad_allreduce_ms)
            / farskip_step_ms,
        wall_over_compute: farskip_step_ms / compute_step_ms,
        fwd_exposed_ms: on_trace(&farskip_runs, &|t| ms(exposed_comm_time(t, Phase::Forward))),
        fwd_peer_wait_ms: on_trace(&farskip_runs, &|t| {
            peer_wait_ms(t, cfg.world, Phase::Forward)
        }),
        bwd_exposed_ms: on_trace(&farskip_runs, &|t| {
            ms(exposed_comm_time(t, Phase::Backward))
        }),
        bwd_peer_wait_ms: on_trace(&farskip_runs, &|t| {
            peer_wait_ms(t, cfg.world, Phase::Backward)
        }),
        loss_max_abs_diff: worst_losses(&farskip_runs, &ref_losses),
        grad_max_rel_diff,
        grad_max_rel_diff_param,
        losses: ref_losses,
        connectivity: cfg.connectivity.to_string(),
        trace: median_trace(&mut farskip_runs),
        blocking_trace: median_trace(&mut blocking_runs),
    })
}

#[cfg(test)]
mod tests {
    use super::{median, median_by, median_item, worst_by, worst_of};

    #[test]
    fn the_worst_repeat_is_reported_and_nan_is_never_hidden() {
        assert_eq!(worst_of([1e-7, 3e-6, 0.0].into_iter()), 3e-6);
        assert!(worst_of([1e-7, f64::NAN, 3e-6].into_iter()).is_nan());
        assert!(worst_of([f64::NAN, 1.0].into_iter()).is_nan());
        assert_eq!(worst_of(std::iter::empty()), 0.0);
        // With a payload (the parameter a gradient difference is of): no sound item displaces a NaN one.
        let grads = [(1e-6, "a"), (f64::NAN, "b"), (5e-6, "c")];
        assert_eq!(worst_by(grads.into_iter(), |g| g.0).unwrap().1, "b");
        let grads = [(1e-6, "a"), (f64::NAN, "b"), (5e-6, "c"), (f64::NAN, "d")];
        assert_eq!(worst_by(grads.into_iter(), |g| g.0).unwrap().1, "d");
        assert_eq!(
            worst_by([(1e-6, "a"), (5e-6, "c")].into_iter(), |g| g.0)
                .unwrap()
                .1,
            "c"
        );
        assert!(worst_by(std::iter::empty::<(f64, &str)>(), |g| g.0).is_none());
        assert_eq!(median(vec![9.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(Vec::new()), 0.0);
        let mut items = [(5.0, 'a'), (1.0, 'b'), (3.0, 'c'), (2.0, 'd')];
        assert_eq!(median_item(&mut items, |i| i.0).1, 'c');
        assert_eq!(median_by(&items, |i| i.0 * 2.0), 6.0);
    }
}
