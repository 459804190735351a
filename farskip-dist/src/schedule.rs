//! Distributed inference schedules. They drive the model's named sub-steps (`Attention::project` /
//! `attend`, `MoeBlock::route` / `slot_inputs` / `combine_slots` / `shared`, `ExpertBank::forward_grouped`) in a
//! different order; no layer is re-implemented here.
//!
//! - Expert parallelism ([`EpRank`]): every rank holds the replicated non-expert weights and a contiguous block
//!   of each MoE layer's experts, and runs its own sequences. Token slots travel to the experts' owners
//!   (dispatch, an all-to-all) and back (combine).
//! - Tensor parallelism ([`TpRank`]): attention heads and every expert's intermediate columns are split; each
//!   sub-block ends in an all-reduce of partial sums. Shared experts and dense MLPs are replicated.
//!
//! With standard connectivity every collective is waited for as soon as it is issued (the blocking baseline).
//! With FarSkip, a converted layer's attention reads the routed-free stream, so the previous layer's combine
//! (EP) or routed all-reduce (TP) stays in flight while attention computes, and EP's dispatch hides behind the
//! second half of attention — the paper's schedule (DESIGN.md §1). Results equal the single-rank model: EP
//! bit-for-bit (same per-row maths, same slot order), TP within float rounding (partial sums).

use burn::prelude::*;
use farskip_model::attention::ProjectedQkv;
use farskip_model::connectivity::{FarSkipVariant, FfnInput, Residual};
use farskip_model::model::Ffn;
use farskip_model::moe::{MoeBlock, Routing as ModelRouting, SlotPlan};
use farskip_model::{Connectivity, DecoderLayer, Model, ModelError};

use crate::balance::ExpertLoads;
use crate::comm::{CollectiveTag, CommError, Communicator, Pending};
use crate::dispatch::{DispatchError, DispatchPlan, ExpertSharding, combine_start};
use crate::trace::{Phase, Trace};

pub(crate) mod ep_moe;
mod tbo;
pub use tbo::tbo_ops;

/// Errors of a distributed schedule.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// A collective failed (a peer died, a timeout, a mismatch).
    #[error(transparent)]
    Comm(#[from] CommError),
    /// Dispatch or combine was given inconsistent data.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// The model could not be split or run.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Result alias of the schedules.
pub type Result<T, E = ScheduleError> = std::result::Result<T, E>;

/// Names of the compute and comm intervals in traces (and the calibration keys of the link model).
pub mod ops {
    /// Attention part 1 (projections, rope).
    pub const ATTN_1: &str = "attn_1";
    /// Attention part 2 (scores, softmax, output projection).
    pub const ATTN_2: &str = "attn_2";
    /// Whole attention (TP).
    pub const ATTN: &str = "attn";
    /// Norm + router + slot gathering.
    pub const ROUTER: &str = "router";
    /// Routed experts.
    pub const EXPERTS: &str = "experts";
    /// Shared expert.
    pub const SHARED: &str = "shared";
    /// Dense MLP layer.
    pub const MLP: &str = "mlp";
    /// Embedding, final norm and LM head.
    pub const HEAD: &str = "embed_head";
    /// EP token dispatch (all-to-all).
    pub const DISPATCH: &str = "dispatch";
    /// EP combine (all-to-all).
    pub const COMBINE: &str = "combine";
    /// TP all-reduce of the attention output.
    pub const AR_ATTN: &str = "allreduce_attn";
    /// TP all-reduce of the routed output.
    pub const AR_MOE: &str = "allreduce_moe";
}

/// Shared bookkeeping of one rank's forward pass.
struct Ctx<'a, C: Communicator + ?Sized> {
    comm: &'a C,
    trace: &'a Trace,
    phase: Phase,
    /// Keep each MoE layer's routed collective unissued until [`RankSchedule::launch`] (the depth ≥ 2
    /// dispatch-ahead order, which issues it after the next layer's dispatch).
    hold_routed: bool,
}

impl<C: Communicator + ?Sized> Ctx<'_, C> {
    fn compute<T>(&self, layer: Option<usize>, op: &'static str, f: impl FnOnce() -> T) -> T {
        let g = self.trace.compute(self.comm.rank(), layer, op, self.phase);
        let out = f();
        g.finish();
        out
    }
    fn tag(&self, name: &'static str, layer: usize) -> CollectiveTag {
        CollectiveTag::new(name)
            .at_layer(layer)
            .in_phase(self.phase)
    }
}

/// Whether layer `i` reads the routed-free stream with attention and the pre-attention stream with its MoE:
/// the layers whose incoming collective can stay in flight during attention.
fn overlappable(conn: &Connectivity, i: usize) -> bool {
    matches!(conn, Connectivity::FarSkip(f) if f.variant == FarSkipVariant::Full)
        && conn.is_converted(i)
}

fn flat(x: Tensor<3>) -> (Tensor<2>, [usize; 3]) {
    let dims = x.dims();
    (x.reshape([dims[0] * dims[1], dims[2]]), dims)
}

fn to_host(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}

/// An MoE output whose routed part may still be in flight.
struct PendingMoe<P> {
    post_attention: Tensor<3>,
    shared: Option<Tensor<3>>,
    routed: P,
}

/// The state between layers: resolved, or waiting on an MoE collective.
enum Flow<P> {
    Ready(Residual),
    Waiting(PendingMoe<P>),
}

/// The schedule of one rank, generic over how attention and the MoE exchange data (EP or TP). The order of
/// sub-steps, and therefore what hides what, is decided here once for both.
trait RankSchedule {
    /// Attention in progress (EP: projected q/k/v; TP: the all-reduce of partial outputs).
    type Attn;
    /// What travels while an MoE result is pending.
    type Pending;
    fn model(&self) -> &Model;
    /// Attention part 1 on the normalised input.
    fn attn_begin<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        layer: &DecoderLayer,
        normed: Tensor<3>,
    ) -> Result<Self::Attn>;
    /// Attention part 2: the finished attention output.
    fn attn_end<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        layer: &DecoderLayer,
        a: Self::Attn,
    ) -> Result<Tensor<3>>;
    /// Runs the MoE on the normalised input `x`. `finish_attention` returns the post-attention stream; the
    /// schedule calls it while its first collective is in flight.
    fn moe<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        layer: &DecoderLayer,
        moe: &MoeBlock,
        x: Tensor<3>,
        finish_attention: &mut dyn FnMut() -> Result<Tensor<3>>,
    ) -> Result<PendingMoe<Self::Pending>>;
    /// Waits for the routed output.
    fn moe_finish<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        p: Self::Pending,
    ) -> Result<Tensor<3>>;

    /// Whether, at skip depth ≥ 2, a converted MoE layer routes and dispatches before its attention: its input
    /// `M_i = S_i (+ r_{i−d})` does not read the layer's attention, so the dispatch can stay in flight during the
    /// whole attention, and the previous layer's routed collective is issued after it (held back by
    /// `hold_routed`, launched by [`RankSchedule::launch`]) so that it does not queue ahead of the dispatch.
    /// EP: yes. TP: no (its attention ends in an all-reduce that the experts hide).
    const DISPATCH_AHEAD: bool = false;

    /// Issues a routed collective that was held back (see `hold_routed`); a no-op once issued.
    fn launch<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        _p: &mut Self::Pending,
    ) -> Result<()> {
        Ok(())
    }

    /// Waits for a pending MoE output and forms the layer's output state.
    fn resolve<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        conn: &Connectivity,
        p: PendingMoe<Self::Pending>,
    ) -> Result<Residual> {
        let routed = self.moe_finish(ctx, p.routed)?;
        Ok(conn.moe_output(p.post_attention, routed, p.shared, Vec::new()))
    }

    /// The forward pass at skip depth ≥ 2 (see [`run_deep`]).
    fn run_deep<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        conn: &Connectivity,
        depth: usize,
        input_ids: Tensor<2, Int>,
    ) -> Result<Tensor<3>> {
        run_deep(self, ctx, conn, depth, input_ids)
    }

    /// The forward pass of this rank's tokens under the model's connectivity.
    fn run<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        input_ids: Tensor<2, Int>,
    ) -> Result<Tensor<3>> {
        let ctx = Ctx {
            comm,
            trace,
            phase: Phase::Forward,
            hold_routed: false,
        };
        let model = self.model();
        let conn = model.connectivity().clone();
        if let Some(depth) = conn.depth().filter(|&d| d > 1) {
            return self.run_deep(&ctx, &conn, depth, input_ids);
        }
        let blocking = !conn.keeps_routed_free_stream();
        let mut flow = Flow::Ready(Residual::Plain(
            ctx.compute(None, ops::HEAD, || model.embed(input_ids)),
        ));
        for (i, layer) in model.layers.iter().enumerate() {
            // A converted layer's attention reads the routed-free stream, known while the previous routed output
            // is still in flight: keep that collective pending until attention part 1 is done.
            let (state, pending_in) = match flow {
                Flow::Waiting(p) if overlappable(&conn, i) => {
                    let routed_free = match &p.shared {
                        Some(s) => p.post_attention.clone() + s.clone(),
                        None => p.post_attention.clone(),
                    };
                    // `full` is a placeholder: only attention's input is read before the pair is resolved.
                    let pair = Residual::Pair {
                        full: routed_free.clone(),
                        routed_free,
                    };
                    (pair, Some(p))
                }
                Flow::Waiting(p) => (self.resolve(&ctx, &conn, p)?, None),
                Flow::Ready(r) => (r, None),
            };
            let inputs = conn.layer_inputs(i, state);
            let normed = ctx.compute(Some(i), ops::ATTN_1, || {
                layer.input_norm.forward(inputs.attn_in)
            });
            let attn = self.attn_begin(&ctx, layer, normed)?;
            let (residual, ffn_in) = match pending_in {
                Some(p) => {
                    let li = conn.layer_inputs(i, self.resolve(&ctx, &conn, p)?);
                    (li.residual, li.ffn_in)
                }
                None => (inputs.residual, inputs.ffn_in),
            };
            let mut attn = Some(attn);
            let mut finish_attention = |residual: &Tensor<3>| -> Result<Tensor<3>> {
                let a =
                    self.attn_end(&ctx, layer, attn.take().expect("attention finishes once"))?;
                Ok(residual.clone() + a)
            };
            flow = match (&layer.ffn, ffn_in) {
                (Ffn::Moe(moe), FfnInput::PreAttention(m)) => {
                    // Parallel block: route and exchange first, finish attention while the exchange is in flight.
                    let x = ctx.compute(Some(i), ops::ROUTER, || layer.post_norm.forward(m));
                    let p = self.moe(&ctx, layer, moe, x, &mut || finish_attention(&residual))?;
                    if blocking {
                        Flow::Ready(self.resolve(&ctx, &conn, p)?)
                    } else {
                        Flow::Waiting(p)
                    }
                }
                (Ffn::Moe(moe), FfnInput::PostAttention) => {
                    let post_attention = finish_attention(&residual)?;
                    let x = ctx.compute(Some(i), ops::ROUTER, || {
                        layer.post_norm.forward(post_attention.clone())
                    });
                    let p = self.moe(&ctx, layer, moe, x, &mut || Ok(post_attention.clone()))?;
                    if blocking || !overlappable(&conn, i + 1) {
                        Flow::Ready(self.resolve(&ctx, &conn, p)?)
                    } else {
                        Flow::Waiting(p)
                    }
                }
                (Ffn::Dense(mlp), ffn_in) => {
                    let post_attention = finish_attention(&residual)?;
                    let m = match ffn_in {
                        FfnInput::PostAttention => post_attention.clone(),
                        FfnInput::PreAttention(m) => m,
                    };
                    let out = ctx.compute(Some(i), ops::MLP, || {
                        mlp.forward(layer.post_norm.forward(m))
                    });
                    Flow::Ready(conn.dense_output(post_attention, out, Vec::new()))
                }
            };
        }
        let full = match flow {
            Flow::Ready(r) => r.full(),
            Flow::Waiting(p) => self.resolve(&ctx, &conn, p)?.full(),
        };
        Ok(ctx.compute(None, ops::HEAD, || model.logits(full)))
    }
}

/// The forward pass at skip depth `depth` ≥ 2 (the rules of `Connectivity::layer_inputs`): each MoE layer's
/// routed collective stays in flight until the layer that first reads it — a converted layer's MoE once `depth`
/// outputs are queued, a stock or dense layer at once, the final norm at the end. The additions are the
/// model's, in the model's order, so EP equals the single-rank model bit for bit.
fn run_deep<S: RankSchedule + ?Sized, C: Communicator + ?Sized>(
    schedule: &S,
    ctx: &Ctx<'_, C>,
    conn: &Connectivity,
    depth: usize,
    input_ids: Tensor<2, Int>,
) -> Result<Tensor<3>> {
    // The dispatch-ahead order holds each routed collective back until the next layer has dispatched.
    let ahead_ctx = Ctx {
        comm: ctx.comm,
        trace: ctx.trace,
        phase: ctx.phase,
        hold_routed: S::DISPATCH_AHEAD,
    };
    let ctx = &ahead_ctx;
    let model = schedule.model();
    let resolve_all = |queue: Vec<S::Pending>| -> Result<Vec<Tensor<3>>> {
        queue
            .into_iter()
            .map(|p| schedule.moe_finish(ctx, p))
            .collect()
    };
    let add_all = |x: Tensor<3>, ps: Vec<Tensor<3>>| ps.into_iter().fold(x, |acc, p| acc + p);
    // S, and the routed collectives in flight, newest first (at most `depth`).
    let mut settled = ctx.compute(None, ops::HEAD, || model.embed(input_ids));
    let mut queue: Vec<S::Pending> = Vec::with_capacity(depth);
    // A converted MoE layer's input does not read its attention: with `DISPATCH_AHEAD` it routes and dispatches
    // first, and its attention runs while the dispatch is in flight.
    let routes_ahead = |i: usize| {
        S::DISPATCH_AHEAD
            && conn.is_converted(i)
            && model
                .layers
                .get(i)
                .is_some_and(|l| matches!(l.ffn, Ffn::Moe(_)))
    };
    for (i, layer) in model.layers.iter().enumerate() {
        let converted = conn.is_converted(i);
        // What attention reads: S (converted) or, for a stock layer, R = S + ΣP once everything has landed.
        let (attn_in, mut in_flight) = if converted {
            (settled.clone(), std::mem::take(&mut queue))
        } else {
            let r = add_all(settled.clone(), resolve_all(std::mem::take(&mut queue))?);
            (r, Vec::new())
        };
        if let (true, Ffn::Moe(moe)) = (routes_ahead(i), &layer.ffn) {
            let m = if in_flight.len() >= depth {
                let oldest = resolve_all(in_flight.split_off(depth - 1))?;
                add_all(settled.clone(), oldest)
            } else {
                settled.clone()
            };
            let x = ctx.compute(Some(i), ops::ROUTER, || layer.post_norm.forward(m.clone()));
            let mut p = schedule.moe(ctx, layer, moe, x, &mut || {
                // The previous layer's routed collective goes out behind this layer's dispatch.
                for q in in_flight.iter_mut() {
                    schedule.launch(ctx, q)?;
                }
                let normed = ctx.compute(Some(i), ops::ATTN_1, || {
                    layer.input_norm.forward(attn_in.clone())
                });
                let qkv = schedule.attn_begin(ctx, layer, normed)?;
                Ok(m.clone() + schedule.attn_end(ctx, layer, qkv)?)
            })?;
            if !routes_ahead(i + 1) {
                schedule.launch(ctx, &mut p.routed)?;
            }
            settled = match p.shared {
                Some(s) => p.post_attention + s,
                None => p.post_attention,
            };
            queue.push(p.routed);
            queue.append(&mut in_flight);
            continue;
        }
        let normed = ctx.compute(Some(i), ops::ATTN_1, || {
            layer.input_norm.forward(attn_in.clone())
        });
        let attn = schedule.attn_begin(ctx, layer, normed)?;
        // The MoE's input: S plus the oldest in-flight output once `depth` are queued (it settles), else S;
        // a stock layer's MoE reads the post-attention stream.
        let m = if !converted {
            None
        } else if in_flight.len() >= depth {
            let oldest = resolve_all(in_flight.split_off(depth - 1))?;
            Some(add_all(settled.clone(), oldest))
        } else {
            Some(settled.clone())
        };
        let mut attn = Some(attn);
        let mut finish_attention = |residual: &Tensor<3>| -> Result<Tensor<3>> {
            let a = schedule.attn_end(ctx, layer, attn.take().expect("attention finishes once"))?;
            Ok(residual.clone() + a)
        };
        match (&layer.ffn, m) {
            (Ffn::Moe(moe), Some(m)) => {
                let x = ctx.compute(Some(i), ops::ROUTER, || layer.post_norm.forward(m.clone()));
                let mut p = schedule.moe(ctx, layer, moe, x, &mut || finish_attention(&m))?;
                schedule.launch(ctx, &mut p.routed)?;
                settled = match p.shared {
                    Some(s) => p.post_attention + s,
                    None => p.post_attention,
                };
                queue.push(p.routed);
                queue.append(&mut in_flight);
            }
            (Ffn::Moe(moe), None) => {
                let post_attention = finish_attention(&attn_in)?;
                let x = ctx.compute(Some(i), ops::ROUTER, || {
                    layer.post_norm.forward(post_attention.clone())
                });
                let mut p = schedule.moe(ctx, layer, moe, x, &mut || Ok(post_attention.clone()))?;
                schedule.launch(ctx, &mut p.routed)?;
                settled = match p.shared {
                    Some(s) => p.post_attention + s,
                    None => p.post_attention,
                };
                queue.push(p.routed);
            }
            (Ffn::Dense(mlp), m) => {
                let residual = m.clone().unwrap_or_else(|| attn_in.clone());
                let post_attention = finish_attention(&residual)?;
                let x = m.unwrap_or_else(|| post_attention.clone());
                let out = ctx.compute(Some(i), ops::MLP, || {
                    mlp.forward(layer.post_norm.forward(x))
                });
                // Everything still in flight joins the stream: R + a + MLP(x).
                settled = add_all(post_attention, resolve_all(in_flight)?) + out;
            }
        }
    }
    let full = add_all(settled, resolve_all(queue)?);
    Ok(ctx.compute(None, ops::HEAD, || model.logits(full)))
}

/// One expert-parallel rank: replicated non-expert weights, a contiguous block of every MoE layer's experts.
pub struct EpRank {
    model: Model,
    sharding: Option<ExpertSharding>,
    loads: Option<ExpertLoads>,
}

/// What an EP layer has in flight: the combine.
pub struct EpPending {
    combine: Combine,
    routing: ModelRouting,
    moe: MoeBlock,
    dims: [usize; 3],
}

/// A combine, issued or held back until launched (the depth ≥ 2 dispatch-ahead order issues a layer's combine
/// after the next layer's dispatch, so that it does not queue ahead of it on the rank's comm stream).
pub(crate) enum Combine {
    InFlight(Pending<Tensor<2>>),
    /// The expert outputs, their plan and the collective's tag.
    Held(Box<(Tensor<2>, DispatchPlan, CollectiveTag)>),
    /// Moved out by a launch that failed.
    Taken,
}

impl Combine {
    /// Issues the combine of `rows` now, or holds it back (`hold`) until [`Combine::launch`].
    pub(crate) fn start<C: Communicator + ?Sized>(
        comm: &C,
        rows: Tensor<2>,
        plan: DispatchPlan,
        tag: CollectiveTag,
        hold: bool,
    ) -> Result<Self> {
        Ok(if hold {
            Self::Held(Box::new((rows, plan, tag)))
        } else {
            Self::InFlight(combine_start(comm, rows, plan, tag)?)
        })
    }

    /// Issues a held combine; a no-op once issued.
    pub(crate) fn launch<C: Communicator + ?Sized>(&mut self, comm: &C) -> Result<()> {
        *self = match std::mem::replace(self, Self::Taken) {
            Self::Held(held) => {
                let (rows, plan, tag) = *held;
                Self::InFlight(combine_start(comm, rows, plan, tag)?)
            }
            other => other,
        };
        Ok(())
    }

    /// Waits for the combine now (the blocking baseline), keeping it as a finished one whose wait returns the
    /// result.
    pub(crate) fn settled<C: Communicator + ?Sized>(mut self, comm: &C) -> Result<Self> {
        self.launch(comm)?;
        Ok(match self {
            Self::InFlight(p) => {
                let op = p.op().to_owned();
                Self::InFlight(Pending::ready(op, p.wait()))
            }
            other => other,
        })
    }

    /// Issues the combine if it was held, and waits for it.
    pub(crate) fn wait<C: Communicator + ?Sized>(mut self, comm: &C) -> Result<Tensor<2>> {
        self.launch(comm)?;
        match self {
            Self::InFlight(p) => Ok(p.wait()?),
            Self::Held(_) | Self::Taken => Err(ScheduleError::Comm(CommError::InvalidArgument(
                "a combine whose launch failed was waited for".into(),
            ))),
        }
    }
}

impl EpRank {
    /// Rank `rank` of `world`: keeps only its experts of every MoE layer.
    pub fn new(model: &Model, rank: usize, world: usize) -> Result<Self> {
        let sharding = match &model.config().moe {
            Some(m) => Some(ExpertSharding::new(m.num_experts, world)?),
            None => None,
        };
        let mut model = model.clone();
        if let Some(s) = &sharding {
            for layer in model.layers.iter_mut() {
                if let Ffn::Moe(moe) = &mut layer.ffn {
                    moe.experts = moe.experts.slice(s.local_range(rank));
                }
            }
        }
        Ok(Self {
            model,
            sharding,
            loads: None,
        })
    }

    /// The same rank, adding the rows its tokens route to each expert (global ids) into `loads` on every
    /// forward — the input of [`Placement::balanced`](crate::balance::Placement::balanced).
    pub fn with_loads(mut self, loads: ExpertLoads) -> Self {
        self.loads = Some(loads);
        self
    }

    /// The forward pass of this rank's sequences; the schedule follows the model's connectivity.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]` (this rank's rows) -> `[batch, seq, vocab]`
    pub fn forward<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        input_ids: Tensor<2, Int>,
    ) -> Result<Tensor<3>> {
        self.run(comm, trace, input_ids)
    }
}

impl EpRank {
    /// Where layer `i`'s EP MoE step runs, in `ctx`.
    fn at<'a, C: Communicator + ?Sized>(&self, ctx: &Ctx<'a, C>, i: usize) -> ep_moe::At<'a, C> {
        ep_moe::At {
            comm: ctx.comm,
            trace: ctx.trace,
            layer: i,
            phase: ctx.phase,
        }
    }

    /// [`ep_moe::begin`] on this rank's experts, recording the loads when asked to.
    fn moe_begin<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        i: usize,
        moe: &MoeBlock,
        x: &Tensor<2>,
        tag: &'static str,
    ) -> Result<ep_moe::Begun> {
        let sharding = self.sharding.expect("an MoE layer implies an MoE config");
        ep_moe::begin(
            &self.at(ctx, i),
            moe,
            &sharding,
            self.loads.as_ref(),
            x,
            &ep_moe::Through,
            tag,
        )
    }
}

impl RankSchedule for EpRank {
    type Attn = ProjectedQkv;
    type Pending = EpPending;
    fn model(&self) -> &Model {
        &self.model
    }

    fn attn_begin<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        layer: &DecoderLayer,
        normed: Tensor<3>,
    ) -> Result<ProjectedQkv> {
        Ok(ctx.compute(Some(layer.index()), ops::ATTN_1, || {
            layer.attention.project(normed, 0, None)
        }))
    }

    fn attn_end<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        layer: &DecoderLayer,
        qkv: ProjectedQkv,
    ) -> Result<Tensor<3>> {
        Ok(ctx.compute(Some(layer.index()), ops::ATTN_2, || {
            layer.attention.attend(qkv)
        }))
    }

    fn moe<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        layer: &DecoderLayer,
        moe: &MoeBlock,
        x: Tensor<3>,
        finish_attention: &mut dyn FnMut() -> Result<Tensor<3>>,
    ) -> Result<PendingMoe<EpPending>> {
        let i = layer.index();
        let (x2, dims) = flat(x);
        let begun = self.moe_begin(ctx, i, moe, &x2, ops::DISPATCH)?;
        let post_attention = finish_attention()?;
        let ended = ep_moe::end(
            &self.at(ctx, i),
            moe,
            begun.dispatched,
            &x2,
            &ep_moe::Through,
            ops::COMBINE,
            false,
            ctx.hold_routed,
        )?;
        let (routing, combine, shared) = (begun.routing, ended.combine, ended.shared_out);
        let [b, t, h] = dims;
        Ok(PendingMoe {
            post_attention,
            shared: shared.map(|s| s.reshape([b, t, h])),
            routed: EpPending {
                combine,
                routing,
                moe: moe.clone(),
                dims,
            },
        })
    }

    const DISPATCH_AHEAD: bool = true;

    fn launch<C: Communicator + ?Sized>(&self, ctx: &Ctx<'_, C>, p: &mut EpPending) -> Result<()> {
        p.combine.launch(ctx.comm)
    }

    fn moe_finish<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        p: EpPending,
    ) -> Result<Tensor<3>> {
        let slot_out = p.combine.wait(ctx.comm)?;
        let [b, t, h] = p.dims;
        let layer = None;
        Ok(ctx.compute(layer, ops::COMBINE, || {
            p.moe.combine_slots(slot_out, &p.routing).reshape([b, t, h])
        }))
    }
}

/// One tensor-parallel rank: its attention heads and its slice of every expert's intermediate columns.
pub struct TpRank {
    model: Model,
}

/// What a TP layer has in flight: the all-reduce of the routed partial sums.
pub struct TpPending {
    reduce: Pending<Vec<f32>>,
    dims: [usize; 3],
    device: Device,
}

impl TpRank {
    /// Rank `rank` of `world`.
    pub fn new(model: &Model, rank: usize, world: usize) -> Result<Self> {
        let mut model = model.clone();
        for layer in model.layers.iter_mut() {
            layer.attention = layer.attention.shard_heads(rank, world)?;
            if let Ffn::Moe(moe) = &mut layer.ffn {
                moe.experts = moe.experts.shard_intermediate(rank, world)?;
            }
        }
        Ok(Self { model })
    }

    /// The forward pass (every rank runs the same tokens).
    pub fn forward<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        input_ids: Tensor<2, Int>,
    ) -> Result<Tensor<3>> {
        self.run(comm, trace, input_ids)
    }
}

fn all_reduce_tensor<C: Communicator + ?Sized>(
    comm: &C,
    tag: CollectiveTag,
    x: Tensor<3>,
) -> Pending<Vec<f32>> {
    let (x2, _) = flat(x);
    comm.all_reduce(tag, to_host(x2))
}

fn from_host(v: Vec<f32>, dims: [usize; 3], device: &Device) -> Tensor<3> {
    Tensor::from_data(TensorData::new(v, dims), device)
}

impl RankSchedule for TpRank {
    type Attn = (Pending<Vec<f32>>, [usize; 3], Device);
    type Pending = TpPending;
    fn model(&self) -> &Model {
        &self.model
    }

    fn attn_begin<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        layer: &DecoderLayer,
        normed: Tensor<3>,
    ) -> Result<Self::Attn> {
        let i = layer.index();
        let dims = normed.dims();
        let device = normed.device();
        let partial = ctx.compute(Some(i), ops::ATTN, || {
            layer.attention.forward(normed, 0, None)
        });
        Ok((
            all_reduce_tensor(ctx.comm, ctx.tag(ops::AR_ATTN, i), partial),
            dims,
            device,
        ))
    }

    fn attn_end<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        _layer: &DecoderLayer,
        (reduce, dims, device): Self::Attn,
    ) -> Result<Tensor<3>> {
        Ok(from_host(reduce.wait()?, dims, &device))
    }

    fn moe<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        layer: &DecoderLayer,
        moe: &MoeBlock,
        x: Tensor<3>,
        finish_attention: &mut dyn FnMut() -> Result<Tensor<3>>,
    ) -> Result<PendingMoe<TpPending>> {
        let i = layer.index();
        let (x2, dims) = flat(x);
        let [b, t, h] = dims;
        let device = x2.device();
        let (routed, shared) = ctx.compute(Some(i), ops::EXPERTS, || {
            let routing = moe.route(x2.clone());
            let plan = SlotPlan::from_experts(&routing.experts, moe.experts.num_experts());
            (
                moe.routed(x2.clone(), &routing, &plan),
                moe.shared(x2.clone()),
            )
        });
        let post_attention = finish_attention()?;
        let reduce = ctx
            .comm
            .all_reduce(ctx.tag(ops::AR_MOE, i), to_host(routed));
        Ok(PendingMoe {
            post_attention,
            shared: shared.map(|s| s.reshape([b, t, h])),
            routed: TpPending {
                reduce,
                dims,
                device,
            },
        })
    }

    fn moe_finish<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        p: TpPending,
    ) -> Result<Tensor<3>> {
        Ok(from_host(p.reduce.wait()?, p.dims, &p.device))
    }
}
