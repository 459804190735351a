//! Schedule descriptions: the op order of one rank, with the collectives it issues and where it waits for
//! them. A description knows no costs; [`super::sim`] walks it with a cost model.
//!
//! Every executor walks its description one step at a time: `EpRank::forward` and `TpRank::forward` walk
//! [`inference`], their `forward_tbo` its [`two_micro_batches`] form, `training::EpTrainRank::step_on`
//! [`training`] and `step_tbo_on` [`training_tbo`] (forward and backward), so the planner simulates exactly the
//! order they run. A test runs them on a small model and compares the op sequence of each trace (with the
//! collectives' host work, [`ops::pack`] and [`ops::unpack`]) with the description's.

use farskip_model::config::FfnKind;
use farskip_model::connectivity::FarSkipVariant;
use farskip_model::{Connectivity, ModelConfig};

use crate::schedule::ops;
use crate::trace::Phase;
use crate::training::bwd_ops;

/// Which collective family a step belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// Expert parallelism: dispatch/combine all-to-alls.
    Expert,
    /// Tensor parallelism: all-reduces of partial sums.
    Tensor,
    /// Attention split by heads over TP groups, experts over EP groups: an all-reduce after attention and the
    /// EP all-to-alls for the MoE (each TP rank dispatches its share of the group's tokens). The executors run
    /// EP or TP; this one is the planner's.
    Hybrid,
}

/// One op of a schedule: a name from [`ops`]/[`bwd_ops`], its layer (`None`: embedding/head), the pass and the
/// micro-batch (0 unless the schedule is two-micro-batch overlap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpKey {
    /// Op name (the executors' trace name).
    pub op: &'static str,
    /// Layer, or `None` for the embedding and head.
    pub layer: Option<usize>,
    /// Forward or backward.
    pub phase: Phase,
    /// Micro-batch (TBO: 0 or 1).
    pub micro: u8,
}

/// One step of a rank's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Run an op on the compute lane.
    Compute(OpKey),
    /// Issue a collective on comm lane `channel` (0: activations, 1: gradient all-reduce); does not block.
    Issue {
        /// The collective.
        key: OpKey,
        /// Comm lane (each is one stream that runs its collectives in issue order).
        channel: u8,
    },
    /// Block the compute lane until the collective has finished.
    Wait(OpKey),
}

/// The schedule family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Standard connectivity, every collective waited for by the next op that reads it.
    Blocking,
    /// The connectivity's own schedule (FarSkip at its depth).
    FarSkip,
    /// Standard connectivity, two micro-batches interleaved so that one's compute hides the other's comm.
    Tbo,
}

/// A rank's schedule: its steps in program order.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Steps in order.
    pub steps: Vec<Step>,
}

fn key(op: &'static str, layer: Option<usize>, phase: Phase) -> OpKey {
    OpKey {
        op,
        layer,
        phase,
        micro: 0,
    }
}

/// The FarSkip depth a connectivity runs with overlap (0: none — standard, or a variant whose order the
/// executors keep stock).
pub fn overlap_depth(conn: &Connectivity) -> usize {
    match conn {
        Connectivity::FarSkip(f) if f.variant == FarSkipVariant::Full => f.depth.max(1),
        _ => 0,
    }
}

fn is_moe(config: &ModelConfig, i: usize) -> bool {
    matches!(config.layers[i].ffn, FfnKind::Moe)
}

fn has_shared(config: &ModelConfig) -> bool {
    config.moe.as_ref().is_some_and(|m| m.shared.is_some())
}

/// One converted MoE layer at skip depth ≥ 2 in the EP dispatch-ahead order, shared by the inference and
/// training descriptions: router, dispatch, the second half of the previous layer's experts and its combine
/// (`prev_held`: the previous layer held them back), the whole attention, the experts — only their first half
/// (`experts_1`) when the next layer holds the rest and the combine, else all of them and this layer's combine
/// (`issue_own`) — and the shared expert.
///
/// Cutting the experts balances the two collectives' windows. Layer i's dispatch is issued before its attention
/// and read by its experts; its combine is read by the router and attention of layer i + 2, which run right after
/// attention i + 1. Run whole, the experts leave the dispatch one attention and give the combine an attention
/// and the experts; cut at half their rows, the second half of layer i − 1's experts runs inside dispatch i's
/// window and the first half of layer i's inside combine i − 1's: each gets an attention and half the experts.
/// That is the slack a rank has for its peer's lateness (skew between ranks, which one attention does not cover
/// on a busy machine).
fn dispatch_ahead_layer(
    s: &mut Vec<Step>,
    config: &ModelConfig,
    i: usize,
    prev_held: bool,
    issue_own: bool,
) {
    let (l, f) = (Some(i), Phase::Forward);
    s.push(Step::Compute(key(ops::ROUTER, l, f)));
    let d = key(ops::DISPATCH, l, f);
    s.push(Step::Issue { key: d, channel: 0 });
    if prev_held {
        s.push(Step::Compute(key(ops::EXPERTS_2, Some(i - 1), f)));
        s.push(Step::Issue {
            key: key(ops::COMBINE, Some(i - 1), f),
            channel: 0,
        });
    }
    s.push(Step::Compute(key(ops::ATTN_1, l, f)));
    s.push(Step::Compute(key(ops::ATTN_2, l, f)));
    s.push(Step::Wait(d));
    if issue_own {
        s.push(Step::Compute(key(ops::EXPERTS, l, f)));
        s.push(Step::Issue {
            key: key(ops::COMBINE, l, f),
            channel: 0,
        });
    } else {
        s.push(Step::Compute(key(ops::EXPERTS_1, l, f)));
    }
    if has_shared(config) {
        s.push(Step::Compute(key(ops::SHARED, l, f)));
    }
}

/// The inference forward of one rank under `conn` (`Connectivity::Standard` is the blocking baseline).
pub fn inference(config: &ModelConfig, conn: &Connectivity, split: Split) -> Schedule {
    let depth = overlap_depth(conn);
    let converted = |i: usize| depth > 0 && conn.is_converted(i);
    let f = Phase::Forward;
    let mut s = Vec::new();
    let layers = config.layers.len();
    // Routed collectives in flight, newest first.
    let mut queue: Vec<usize> = Vec::new();
    let a2a = split != Split::Tensor;
    let routed_op = if a2a { ops::COMBINE } else { ops::AR_MOE };
    let resolve = |s: &mut Vec<Step>, k: usize| {
        s.push(Step::Wait(key(routed_op, Some(k), f)));
        if a2a {
            // combine_slots runs after the wait (traced without a layer).
            s.push(Step::Compute(key(ops::COMBINE, None, f)));
        }
    };
    // At depth ≥ 2 an EP rank routes and dispatches a converted MoE layer before its attention, and issues the
    // previous layer's combine (held back) right after that dispatch.
    let ahead = |i: usize| {
        split == Split::Expert && depth >= 2 && i < layers && converted(i) && is_moe(config, i)
    };
    s.push(Step::Compute(key(ops::HEAD, None, f)));
    for i in 0..layers {
        let conv = converted(i);
        if !conv {
            for k in std::mem::take(&mut queue) {
                resolve(&mut s, k);
            }
        }
        let mut in_flight = std::mem::take(&mut queue);
        let l = Some(i);
        if ahead(i) {
            if in_flight.len() >= depth {
                for k in in_flight.split_off(depth - 1) {
                    resolve(&mut s, k);
                }
            }
            dispatch_ahead_layer(&mut s, config, i, i > 0 && ahead(i - 1), !ahead(i + 1));
            queue.push(i);
            queue.append(&mut in_flight);
            continue;
        }
        s.push(Step::Compute(key(ops::ATTN_1, l, f)));
        let attn_coll = key(ops::AR_ATTN, l, f);
        if split == Split::Tensor {
            s.push(Step::Compute(key(ops::ATTN, l, f)));
            s.push(Step::Issue {
                key: attn_coll,
                channel: 0,
            });
        }
        // A converted layer's MoE reads S plus the oldest in-flight output once `depth` are queued (depth 1:
        // the previous layer's, waited for after attention part 1); a dense layer settles the rest after its MLP.
        if conv && in_flight.len() >= depth {
            for k in in_flight.split_off(depth - 1) {
                resolve(&mut s, k);
            }
        }
        let finish_attention = |s: &mut Vec<Step>, wait: bool| match split {
            Split::Expert => s.push(Step::Compute(key(ops::ATTN_2, l, f))),
            Split::Tensor => s.push(Step::Wait(attn_coll)),
            Split::Hybrid => {
                s.push(Step::Compute(key(ops::ATTN_2, l, f)));
                s.push(Step::Issue {
                    key: attn_coll,
                    channel: 0,
                });
                if wait {
                    s.push(Step::Wait(attn_coll));
                }
            }
        };
        match (is_moe(config, i), conv) {
            (true, _) => {
                if !conv {
                    finish_attention(&mut s, true);
                }
                s.push(Step::Compute(key(ops::ROUTER, l, f)));
                match split {
                    Split::Expert | Split::Hybrid => {
                        let d = key(ops::DISPATCH, l, f);
                        s.push(Step::Issue { key: d, channel: 0 });
                        if conv {
                            finish_attention(&mut s, false);
                        }
                        s.push(Step::Wait(d));
                        s.push(Step::Compute(key(ops::EXPERTS, l, f)));
                        s.push(Step::Issue {
                            key: key(ops::COMBINE, l, f),
                            channel: 0,
                        });
                        if has_shared(config) {
                            s.push(Step::Compute(key(ops::SHARED, l, f)));
                        }
                        if conv && split == Split::Hybrid {
                            // The post-attention stream is needed once the layer's output is formed.
                            s.push(Step::Wait(attn_coll));
                        }
                    }
                    Split::Tensor => {
                        s.push(Step::Compute(key(ops::EXPERTS, l, f)));
                        if conv {
                            finish_attention(&mut s, true);
                        }
                        s.push(Step::Issue {
                            key: key(ops::AR_MOE, l, f),
                            channel: 0,
                        });
                    }
                }
                queue.push(i);
                queue.append(&mut in_flight);
                // Without overlap every routed output is waited for at once.
                if depth == 0 || (depth == 1 && !converted(i + 1)) {
                    for k in std::mem::take(&mut queue) {
                        resolve(&mut s, k);
                    }
                }
            }
            (false, _) => {
                finish_attention(&mut s, true);
                s.push(Step::Compute(key(ops::MLP, l, f)));
                for k in in_flight {
                    resolve(&mut s, k);
                }
            }
        }
    }
    for k in queue {
        resolve(&mut s, k);
    }
    s.push(Step::Compute(key(ops::HEAD, None, f)));
    Schedule { steps: s }
}

/// The expert-parallel training step of one rank (forward, then backward with the gradient all-reduces on
/// their own lane): FarSkip at the connectivity's depth d (depth 1: the previous combine joins after attention
/// part 1; depth ≥ 2: the oldest of d combines joins before the router, which runs ahead of attention), every
/// collective waited for at issue for the standard model. Dense layers run attention and their MLP with no collective.
pub fn training(config: &ModelConfig, conn: &Connectivity) -> Schedule {
    let depth = overlap_depth(conn);
    let farskip = depth > 0;
    let (f, b) = (Phase::Forward, Phase::Backward);
    let mut s = Vec::new();
    let issue = |s: &mut Vec<Step>, k: OpKey, channel: u8| {
        s.push(Step::Issue { key: k, channel });
        if !farskip {
            s.push(Step::Wait(k));
        }
    };
    let layers = config.layers.len();
    s.push(Step::Compute(key(ops::HEAD, None, f)));
    // Combines in flight, newest first: the oldest joins once `depth` are queued.
    let mut inflight: Vec<usize> = Vec::new();
    let join = |s: &mut Vec<Step>, k: usize| {
        if farskip {
            s.push(Step::Wait(key(ops::COMBINE, Some(k), f)));
        }
        s.push(Step::Compute(key(ops::COMBINE, Some(k), f)));
    };
    for i in 0..layers {
        let l = Some(i);
        if depth >= 2 && is_moe(config, i) {
            // M_i does not read layer i's attention: route and dispatch first, attention while the dispatch is in
            // flight, the previous layer's combine issued behind the dispatch (held back until then).
            if inflight.len() >= depth
                && let Some(k) = inflight.pop()
            {
                join(&mut s, k);
            }
            let prev_held = i > 0 && is_moe(config, i - 1);
            let issue_own = i + 1 == layers || !is_moe(config, i + 1);
            dispatch_ahead_layer(&mut s, config, i, prev_held, issue_own);
            inflight.insert(0, i);
            continue;
        }
        s.push(Step::Compute(key(ops::ATTN_1, l, f)));
        if farskip
            && inflight.len() >= depth
            && let Some(k) = inflight.pop()
        {
            join(&mut s, k);
        }
        if !is_moe(config, i) {
            s.push(Step::Compute(key(ops::ATTN_2, l, f)));
            s.push(Step::Compute(key(ops::MLP, l, f)));
            continue;
        }
        if !farskip {
            s.push(Step::Compute(key(ops::ATTN_2, l, f)));
        }
        s.push(Step::Compute(key(ops::ROUTER, l, f)));
        let d = key(ops::DISPATCH, l, f);
        s.push(Step::Issue { key: d, channel: 0 });
        if farskip {
            s.push(Step::Compute(key(ops::ATTN_2, l, f)));
        }
        s.push(Step::Wait(d));
        s.push(Step::Compute(key(ops::EXPERTS, l, f)));
        issue(&mut s, key(ops::COMBINE, l, f), 0);
        if has_shared(config) {
            s.push(Step::Compute(key(ops::SHARED, l, f)));
        }
        if farskip {
            inflight.insert(0, i);
        } else {
            join(&mut s, i);
        }
    }
    // The final norm reads every routed output still in flight, the oldest joined first.
    while let Some(k) = inflight.pop() {
        join(&mut s, k);
    }
    s.push(Step::Compute(key(ops::HEAD, None, f)));
    s.push(Step::Compute(key(bwd_ops::HEAD, None, b)));
    // At depth ≥ 2 a routed output's gradient is complete once the layer it joined has run its backward (the
    // last d outputs: at the head), d − 1 layers before its own: its join backward and the combine backward go
    // out then, with those layers to hide them; attention's backward hides the dispatch backward instead.
    // The last layer has no layer behind it to hide its own: it keeps the depth-1 order.
    let early = |i: usize| depth >= 2 && i + 1 < layers;
    let join_bwd = |s: &mut Vec<Step>, k: usize| {
        s.push(Step::Compute(key(bwd_ops::JOIN, Some(k), b)));
        s.push(Step::Issue {
            key: key(bwd_ops::COMBINE_BWD, Some(k), b),
            channel: 0,
        });
    };
    // The outputs the head read go out right behind the last layer's own combine backward (not ahead of it on
    // the comm stream, where they would delay the one collective that has only attention to hide it).
    let head_joins = |s: &mut Vec<Step>| {
        if depth >= 2 {
            for k in (layers.saturating_sub(depth)..layers).rev() {
                if early(k) && is_moe(config, k) {
                    join_bwd(s, k);
                }
            }
        }
    };
    let mut grads = Vec::new();
    for i in (0..layers).rev() {
        let l = Some(i);
        if !is_moe(config, i) {
            if i + 1 == layers {
                head_joins(&mut s);
            }
            s.push(Step::Compute(key(MLP_BWD, l, b)));
            s.push(Step::Compute(key(bwd_ops::ATTN, l, b)));
        } else {
            if !early(i) {
                join_bwd(&mut s, i);
            }
            if i + 1 == layers {
                head_joins(&mut s);
            }
            let cb = key(bwd_ops::COMBINE_BWD, l, b);
            if farskip && !early(i) {
                s.push(Step::Compute(key(bwd_ops::ATTN, l, b)));
            }
            s.push(Step::Wait(cb));
            s.push(Step::Compute(key(bwd_ops::EXPERTS, l, b)));
            let db = key(bwd_ops::DISPATCH_BWD, l, b);
            issue(&mut s, db, 0);
            if early(i) {
                s.push(Step::Compute(key(bwd_ops::ATTN, l, b)));
            }
            if has_shared(config) {
                s.push(Step::Compute(key(bwd_ops::SHARED, l, b)));
            }
            if farskip {
                s.push(Step::Wait(db));
            }
            s.push(Step::Compute(key(bwd_ops::ROUTER, l, b)));
            if !farskip {
                s.push(Step::Compute(key(bwd_ops::ATTN, l, b)));
            }
            if depth >= 2
                && let Some(k) = i.checked_sub(depth)
                && is_moe(config, k)
            {
                join_bwd(&mut s, k);
            }
        }
        let g = key(bwd_ops::GRAD_ALLREDUCE, l, b);
        issue(&mut s, g, 1);
        grads.push(g);
    }
    s.push(Step::Compute(key(bwd_ops::HEAD, None, b)));
    let outer = key(bwd_ops::GRAD_ALLREDUCE, None, b);
    s.push(Step::Issue {
        key: outer,
        channel: 1,
    });
    if farskip {
        for g in grads {
            s.push(Step::Wait(g));
        }
    }
    s.push(Step::Wait(outer));
    Schedule { steps: s }
}

/// The expert-parallel training step with two-micro-batch overlap (`EpTrainRank::step_tbo_on`, standard
/// connectivity): each rank's two sequences are the micro-batches, interleaved per layer as the executor does —
/// forward `attn(0) begin(0) join(1) of the layer below attn(1) begin(1) end(0) end(1) join(0)`, the head per
/// micro-batch; backward `end-bwd(1) begin-bwd(1) join-bwd(1) of the layer below end-bwd(0) begin-bwd(0)`, the
/// layer's gradient all-reduce, `join-bwd(0) of the layer below`. Every layer is MoE (as the executor requires);
/// a dense layer is planned as attention + MLP per micro-batch with no collective.
pub fn training_tbo(config: &ModelConfig) -> Schedule {
    let (f, b) = (Phase::Forward, Phase::Backward);
    let k = |op: &'static str, layer: Option<usize>, phase: Phase, micro: u8| OpKey {
        op,
        layer,
        phase,
        micro,
    };
    let layers = config.layers.len();
    let shared = has_shared(config);
    let mut s = Vec::new();
    // The embedding runs once on the whole batch: both micro-batches' share of it.
    s.push(Step::Compute(k(ops::HEAD, None, f, 0)));
    s.push(Step::Compute(k(ops::HEAD, None, f, 1)));
    let join = |s: &mut Vec<Step>, i: usize, m: u8| {
        s.push(Step::Wait(k(ops::COMBINE, Some(i), f, m)));
        s.push(Step::Compute(k(ops::COMBINE, Some(i), f, m)));
    };
    let mut held: Option<usize> = None;
    for i in 0..layers {
        let l = Some(i);
        let moe = is_moe(config, i);
        let begin = |s: &mut Vec<Step>, m: u8| {
            s.push(Step::Compute(k(ops::ATTN_1, l, f, m)));
            s.push(Step::Compute(k(ops::ATTN_2, l, f, m)));
            if moe {
                s.push(Step::Compute(k(ops::ROUTER, l, f, m)));
                s.push(Step::Issue {
                    key: k(ops::DISPATCH, l, f, m),
                    channel: 0,
                });
            } else {
                s.push(Step::Compute(k(ops::MLP, l, f, m)));
            }
        };
        let end = |s: &mut Vec<Step>, m: u8| {
            s.push(Step::Wait(k(ops::DISPATCH, l, f, m)));
            s.push(Step::Compute(k(ops::EXPERTS, l, f, m)));
            s.push(Step::Issue {
                key: k(ops::COMBINE, l, f, m),
                channel: 0,
            });
            if shared {
                s.push(Step::Compute(k(ops::SHARED, l, f, m)));
            }
        };
        begin(&mut s, 0);
        if let Some(j) = held.take() {
            join(&mut s, j, 1);
        }
        begin(&mut s, 1);
        if moe {
            end(&mut s, 0);
            end(&mut s, 1);
            join(&mut s, i, 0);
            held = Some(i);
        }
    }
    s.push(Step::Compute(k(ops::HEAD, None, f, 0)));
    if let Some(j) = held.take() {
        join(&mut s, j, 1);
    }
    s.push(Step::Compute(k(ops::HEAD, None, f, 1)));
    // Backward.
    let join_bwd = |s: &mut Vec<Step>, i: usize, m: u8| {
        s.push(Step::Compute(k(bwd_ops::JOIN, Some(i), b, m)));
        s.push(Step::Issue {
            key: k(bwd_ops::COMBINE_BWD, Some(i), b, m),
            channel: 0,
        });
    };
    let last_moe = |below: usize| (0..below).rev().find(|&j| is_moe(config, j));
    let mut grads = Vec::new();
    s.push(Step::Compute(k(bwd_ops::HEAD, None, b, 1)));
    if let Some(j) = last_moe(layers) {
        join_bwd(&mut s, j, 1);
    }
    s.push(Step::Compute(k(bwd_ops::HEAD, None, b, 0)));
    if let Some(j) = last_moe(layers) {
        join_bwd(&mut s, j, 0);
    }
    for i in (0..layers).rev() {
        let l = Some(i);
        if !is_moe(config, i) {
            for m in [1, 0] {
                s.push(Step::Compute(k(MLP_BWD, l, b, m)));
                s.push(Step::Compute(k(bwd_ops::ATTN, l, b, m)));
            }
        } else {
            let half = |s: &mut Vec<Step>, m: u8| {
                s.push(Step::Wait(k(bwd_ops::COMBINE_BWD, l, b, m)));
                s.push(Step::Compute(k(bwd_ops::EXPERTS, l, b, m)));
                s.push(Step::Issue {
                    key: k(bwd_ops::DISPATCH_BWD, l, b, m),
                    channel: 0,
                });
                if shared {
                    s.push(Step::Compute(k(bwd_ops::SHARED, l, b, m)));
                }
                s.push(Step::Wait(k(bwd_ops::DISPATCH_BWD, l, b, m)));
                s.push(Step::Compute(k(bwd_ops::ROUTER, l, b, m)));
                s.push(Step::Compute(k(bwd_ops::ATTN, l, b, m)));
            };
            half(&mut s, 1);
            if let Some(j) = last_moe(i) {
                join_bwd(&mut s, j, 1);
            }
            half(&mut s, 0);
        }
        let g = k(bwd_ops::GRAD_ALLREDUCE, l, b, 0);
        s.push(Step::Issue { key: g, channel: 1 });
        grads.push(g);
        if is_moe(config, i)
            && let Some(j) = last_moe(i)
        {
            join_bwd(&mut s, j, 0);
        }
    }
    s.push(Step::Compute(k(bwd_ops::HEAD, None, b, 0)));
    s.push(Step::Compute(k(bwd_ops::HEAD, None, b, 1)));
    let outer = k(bwd_ops::GRAD_ALLREDUCE, None, b, 0);
    s.push(Step::Issue {
        key: outer,
        channel: 1,
    });
    for g in grads {
        s.push(Step::Wait(g));
    }
    s.push(Step::Wait(outer));
    Schedule { steps: s }
}

/// Backward of a dense layer's MLP (the executors' training runs MoE layers only; the planner costs dense
/// layers too).
pub const MLP_BWD: &str = "mlp_bwd";

/// Two-micro-batch overlap of a schedule: each micro-batch's steps are cut before every wait and the pieces
/// interleaved (A₀ B₀ A₁ B₁ …), so each collective of one micro-batch is in flight while the other computes.
pub fn two_micro_batches(one: &Schedule) -> Schedule {
    let pieces = |micro: u8| -> Vec<Vec<Step>> {
        let mut out: Vec<Vec<Step>> = vec![Vec::new()];
        for step in &one.steps {
            let step = match *step {
                Step::Compute(k) => Step::Compute(OpKey { micro, ..k }),
                Step::Issue { key, channel } => Step::Issue {
                    key: OpKey { micro, ..key },
                    channel,
                },
                Step::Wait(k) => Step::Wait(OpKey { micro, ..k }),
            };
            if matches!(step, Step::Wait(_)) && out.last().is_some_and(|p| !p.is_empty()) {
                out.push(Vec::new());
            }
            if let Some(p) = out.last_mut() {
                p.push(step);
            }
        }
        out
    };
    let (a, b) = (pieces(0), pieces(1));
    let mut steps = Vec::with_capacity(2 * one.steps.len());
    for i in 0..a.len().max(b.len()) {
        for p in [a.get(i), b.get(i)].into_iter().flatten() {
            steps.extend_from_slice(p);
        }
    }
    Schedule { steps }
}
