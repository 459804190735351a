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
//! The order is not written here: a rank walks its schedule description
//! ([`plan::desc::inference`](crate::plan::desc::inference)), the same one the planner simulates, step by step
//! (`walk`). With standard connectivity every collective is waited for as soon as it is issued (the blocking
//! baseline). With FarSkip, a converted layer's attention reads the routed-free stream, so the previous layer's
//! combine (EP) or routed all-reduce (TP) stays in flight while attention computes, and EP's dispatch hides
//! behind the second half of attention — the paper's schedule (DESIGN.md §1); at skip depth d ≥ 2 up to d
//! routed outputs stay in flight and EP routes and dispatches a layer before its attention. Results equal the
//! single-rank model: EP bit-for-bit (same per-row maths, same slot order, the model's order of additions), TP
//! within float rounding (partial sums).

use burn::prelude::*;
use farskip_model::attention::ProjectedQkv;
use farskip_model::model::Ffn;
use farskip_model::moe::{MoeBlock, Routing as ModelRouting, SlotPlan};
use farskip_model::{Model, ModelError};

use crate::balance::ExpertLoads;
use crate::comm::{CollectiveTag, CommError, Communicator, Pending};
use crate::dispatch::{DispatchError, ExpertSharding};
use crate::plan::desc::{OpKey, Split};
use crate::trace::{HostSpans, Phase, Trace};
use walk::out_of_order;

pub(crate) mod ep_moe;
mod tbo;
pub(crate) mod walk;
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
    /// A schedule description asked for a step this rank cannot run (a bug in the description or the walker).
    #[error("schedule description: {0}")]
    Description(String),
}

/// Result alias of the schedules.
pub type Result<T, E = ScheduleError> = std::result::Result<T, E>;

/// Names of the compute and comm intervals in traces (and the calibration keys of the link model).
pub mod ops {
    use crate::training::bwd_ops;

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
    /// The routed experts holding the first half of the rows (an EP rank's experts cut at the expert boundary
    /// nearest half its rows; see `desc::inference` at depth ≥ 2).
    pub const EXPERTS_1: &str = "experts_1";
    /// The routed experts holding the rest of the rows, after [`EXPERTS_1`].
    pub const EXPERTS_2: &str = "experts_2";
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
    /// Host work of the dispatch on its rank before it goes out: the slot rows copied to a send buffer in
    /// destination order.
    pub const DISPATCH_PACK: &str = "dispatch_pack";
    /// Host work after the dispatch arrived: the received rows grouped by local expert into a tensor.
    pub const DISPATCH_UNPACK: &str = "dispatch_unpack";
    /// Host work of the combine before it goes out: the expert outputs copied back to the received layout.
    pub const COMBINE_PACK: &str = "combine_pack";
    /// Host work after the combine arrived: the rows put back in slot order and summed per token.
    pub const COMBINE_UNPACK: &str = "combine_unpack";
    /// Host work of the attention all-reduce: the partial output copied to a send buffer.
    pub const AR_ATTN_PACK: &str = "allreduce_attn_pack";
    /// Host work after the attention all-reduce: the sum back into a tensor.
    pub const AR_ATTN_UNPACK: &str = "allreduce_attn_unpack";
    /// Host work of the routed all-reduce: the partial sum copied to a send buffer.
    pub const AR_MOE_PACK: &str = "allreduce_moe_pack";
    /// Host work after the routed all-reduce: the sum back into a tensor.
    pub const AR_MOE_UNPACK: &str = "allreduce_moe_unpack";

    /// Every collective with host work of its own: (collective, its pack span, its unpack span if any).
    ///
    /// A collective's bytes leave and arrive as host buffers: building them is work of the rank (a GPU's
    /// permute kernels), traced as compute so that a collective in flight while its successor is packed
    /// counts as hidden and the planner costs it.
    const HOST_WORK: [(&str, &str, Option<&str>); 7] = [
        (DISPATCH, DISPATCH_PACK, Some(DISPATCH_UNPACK)),
        (COMBINE, COMBINE_PACK, Some(COMBINE_UNPACK)),
        (AR_ATTN, AR_ATTN_PACK, Some(AR_ATTN_UNPACK)),
        (AR_MOE, AR_MOE_PACK, Some(AR_MOE_UNPACK)),
        (
            bwd_ops::COMBINE_BWD,
            bwd_ops::COMBINE_BWD_PACK,
            Some(bwd_ops::COMBINE_BWD_UNPACK),
        ),
        (
            bwd_ops::DISPATCH_BWD,
            bwd_ops::DISPATCH_BWD_PACK,
            Some(bwd_ops::DISPATCH_BWD_UNPACK),
        ),
        (bwd_ops::GRAD_ALLREDUCE, bwd_ops::GRAD_ALLREDUCE_PACK, None),
    ];

    /// The row of [`HOST_WORK`] of collective `op` (a two-micro-batch collective, `"dispatch.mb0"`, as its
    /// full one).
    fn host_work(op: &str) -> Option<&'static (&'static str, &'static str, Option<&'static str>)> {
        let full = super::tbo_ops::full_op(op).unwrap_or(op);
        HOST_WORK.iter().find(|(c, _, _)| *c == full)
    }

    /// The compute span that packs collective `op`'s send buffer on its rank, or `None` for a collective
    /// without one.
    pub fn pack(op: &str) -> Option<&'static str> {
        host_work(op).map(|(_, pack, _)| *pack)
    }

    /// The compute span that unpacks what collective `op` delivered (see [`pack`]).
    pub fn unpack(op: &str) -> Option<&'static str> {
        host_work(op).and_then(|(_, _, unpack)| *unpack)
    }

    /// Whether `op` is a collective's host work ([`pack`] or [`unpack`] of one).
    pub fn is_host_work(op: &str) -> bool {
        host_work_name(op).is_some()
    }

    /// The static name of host-work span `op` ([`pack`] or [`unpack`] of a collective), or `None`.
    pub fn host_work_name(op: &str) -> Option<&'static str> {
        HOST_WORK.iter().find_map(|(_, pack, unpack)| {
            if *pack == op {
                Some(*pack)
            } else {
                unpack.filter(|u| *u == op)
            }
        })
    }
}

/// Shared bookkeeping of one rank's forward pass.
pub(crate) struct Ctx<'a, C: Communicator + ?Sized> {
    pub(crate) comm: &'a C,
    pub(crate) trace: &'a Trace,
    pub(crate) phase: Phase,
}

impl<C: Communicator + ?Sized> Ctx<'_, C> {
    pub(crate) fn compute<T>(
        &self,
        layer: Option<usize>,
        op: &'static str,
        f: impl FnOnce() -> T,
    ) -> T {
        let g = self.trace.compute(self.comm.rank(), layer, op, self.phase);
        let out = f();
        g.finish();
        out
    }
    pub(crate) fn tag(&self, name: &'static str, layer: usize) -> CollectiveTag {
        CollectiveTag::new(name)
            .at_layer(layer)
            .in_phase(self.phase)
    }
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

/// One expert-parallel rank: replicated non-expert weights, a contiguous block of every MoE layer's experts.
pub struct EpRank {
    model: Model,
    sharding: Option<ExpertSharding>,
    loads: Option<ExpertLoads>,
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
        let ctx = Ctx {
            comm,
            trace,
            phase: Phase::Forward,
        };
        walk::walk(self, &ctx, input_ids)
    }
}

/// An EP MoE layer between its router and its combine.
pub(crate) struct EpMoe {
    moe: MoeBlock,
    dims: [usize; 3],
    /// The normalised MoE input `[tokens, hidden]` (the shared expert's input).
    x: Tensor<2>,
    routing: Option<ModelRouting>,
    flight: ep_moe::Flight,
    shared: Option<Tensor<3>>,
}

/// An EP combine in flight, and what joins its result.
pub(crate) struct EpRouted {
    combine: Pending<Tensor<2>>,
    join: EpJoin,
}

/// What joins a combine's slot rows into the routed output.
pub(crate) struct EpJoin {
    moe: MoeBlock,
    routing: ModelRouting,
    dims: [usize; 3],
}

impl walk::Exec for EpRank {
    type Attn = ProjectedQkv;
    type Moe = EpMoe;
    type Routed = EpRouted;
    type Waited = (Tensor<2>, EpJoin);
    const SPLIT: Split = Split::Expert;
    const JOIN_STEP: bool = true;

    fn model(&self) -> &Model {
        &self.model
    }

    fn attn_1<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        i: usize,
        x: Tensor<3>,
        pos: walk::Pos<'_>,
    ) -> Result<ProjectedQkv> {
        let layer = &self.model.layers[i];
        Ok(ctx.compute(Some(i), ops::ATTN_1, || {
            layer
                .attention
                .project(layer.input_norm.forward(x), pos.offset, pos.cache)
        }))
    }

    fn attn_step<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        qkv: ProjectedQkv,
        _pos: walk::Pos<'_>,
    ) -> Result<walk::Attention<ProjectedQkv>> {
        if key.op != ops::ATTN_2 {
            return Err(walk::bad_step(
                key,
                "expert parallelism runs attention as attn_1, attn_2",
            ));
        }
        let layer = &self.model.layers[key.layer.unwrap_or_default()];
        Ok(walk::Attention::Done(ctx.compute(
            key.layer,
            ops::ATTN_2,
            || layer.attention.attend(qkv),
        )))
    }

    fn router<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        i: usize,
        m: Tensor<3>,
    ) -> Result<EpMoe> {
        let layer = &self.model.layers[i];
        let Ffn::Moe(moe) = &layer.ffn else {
            return Err(ScheduleError::Description(format!(
                "layer {i} is dense but its description routes it"
            )));
        };
        let sharding = self.sharding.expect("an MoE layer implies an MoE config");
        let (x, dims, r) = ctx.compute(Some(i), ops::ROUTER, || {
            let (x, dims) = flat(layer.post_norm.forward(m));
            let r = ep_moe::route(moe, &sharding, self.loads.as_ref(), i, &x, &ep_moe::Through);
            (x, dims, r)
        });
        Ok(EpMoe {
            moe: moe.clone(),
            dims,
            x,
            routing: Some(r.routing),
            flight: ep_moe::Flight::new(r.slots, r.slot_experts),
            shared: None,
        })
    }

    fn moe_step<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        m: &mut EpMoe,
    ) -> Result<()> {
        match key.op {
            ops::EXPERTS => {
                let (inputs, plan) = m.flight.arrived(key)?;
                let (_, out) = ctx.compute(key.layer, ops::EXPERTS, || {
                    ep_moe::experts(&m.moe, &inputs, &ep_moe::Through)
                });
                m.flight.set_expert_out(out, plan);
            }
            ops::EXPERTS_1 => {
                let (inputs, plan) = m.flight.arrived(key)?;
                let (_, parts) = ctx.compute(key.layer, ops::EXPERTS_1, || {
                    ep_moe::experts_first(&m.moe, &inputs, &ep_moe::Through)
                });
                m.flight.set_first_part(parts, plan);
            }
            ops::EXPERTS_2 => {
                let (parts, plan) = m.flight.first_part(key)?;
                let out = ctx.compute(key.layer, ops::EXPERTS_2, || {
                    m.moe.experts.forward_grouped_rest(parts)
                });
                m.flight.set_expert_out(out, plan);
            }
            ops::SHARED => {
                let [b, t, h] = m.dims;
                m.shared = ctx.compute(key.layer, ops::SHARED, || {
                    m.moe.shared(m.x.clone()).map(|s| s.reshape([b, t, h]))
                });
            }
            _ => return Err(walk::bad_step(key, "is not an MoE step")),
        }
        Ok(())
    }

    fn dispatch_issue<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        m: &mut EpMoe,
    ) -> Result<()> {
        let sharding = self.sharding.expect("an MoE layer implies an MoE config");
        m.flight.dispatch_issue(ctx, &sharding, key)
    }

    fn dispatch_wait<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        key: &OpKey,
        m: &mut EpMoe,
    ) -> Result<()> {
        m.flight.dispatch_wait(key)
    }

    fn take_shared(m: &mut EpMoe) -> Option<Tensor<3>> {
        m.shared.take()
    }

    fn routed_issue<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        m: &mut EpMoe,
    ) -> Result<EpRouted> {
        let routing = m
            .routing
            .take()
            .ok_or_else(|| out_of_order(key, "the routing"))?;
        Ok(EpRouted {
            combine: m.flight.combine_issue(ctx, key)?,
            join: EpJoin {
                moe: m.moe.clone(),
                routing,
                dims: m.dims,
            },
        })
    }

    fn routed_wait<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        r: EpRouted,
    ) -> Result<(Tensor<2>, EpJoin)> {
        Ok((r.combine.wait()?, r.join))
    }

    fn join<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        _layer: usize,
        (slot_out, r): (Tensor<2>, EpJoin),
    ) -> Result<Tensor<3>> {
        let [b, t, h] = r.dims;
        Ok(ctx.compute(None, ops::COMBINE, || {
            r.moe.combine_slots(slot_out, &r.routing).reshape([b, t, h])
        }))
    }
}

/// One tensor-parallel rank: its attention heads and its slice of every expert's intermediate columns.
pub struct TpRank {
    model: Model,
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
        let ctx = Ctx {
            comm,
            trace,
            phase: Phase::Forward,
        };
        walk::walk(self, &ctx, input_ids)
    }
}

/// A TP all-reduce of a tensor in flight; its copies to and from the host are traced as the collective's host
/// work.
pub(crate) struct TpReduce {
    pending: Pending<Vec<f32>>,
    host: HostSpans,
    dims: [usize; 3],
    device: Device,
}

impl TpReduce {
    /// Starts the all-reduce, tagged `tag`, of `x` (`[tokens, hidden]`, the rows of a `dims` tensor).
    fn start<C: Communicator + ?Sized>(
        ctx: &Ctx<'_, C>,
        tag: CollectiveTag,
        x: Tensor<2>,
        dims: [usize; 3],
    ) -> Self {
        let host = HostSpans::new(ctx.trace, ctx.comm.rank(), &tag);
        let device = x.device();
        let data = host.pack(|| to_host(x));
        Self {
            pending: ctx.comm.all_reduce(tag, data),
            host,
            dims,
            device,
        }
    }

    /// The sum over ranks, `dims`.
    fn wait(self) -> Result<Tensor<3>> {
        let v = self.pending.wait()?;
        Ok(self.host.unpack(|| from_host(v, self.dims, &self.device)))
    }
}

fn from_host(v: Vec<f32>, dims: [usize; 3], device: &Device) -> Tensor<3> {
    Tensor::from_data(TensorData::new(v, dims), device)
}

/// TP attention between its steps.
pub(crate) enum TpAttn {
    /// The normalised input (after `attn_1`).
    Normed(Tensor<3>),
    /// This rank's partial output (after `attn`).
    Partial(Tensor<3>),
    /// The all-reduce of the partial outputs in flight.
    Reducing(TpReduce),
}

/// A TP MoE layer between its router and its all-reduce.
pub(crate) struct TpMoe {
    moe: MoeBlock,
    x: Tensor<2>,
    dims: [usize; 3],
    routed: Option<Tensor<2>>,
    shared: Option<Tensor<3>>,
}

impl walk::Exec for TpRank {
    type Attn = TpAttn;
    type Moe = TpMoe;
    type Routed = TpReduce;
    type Waited = Tensor<3>;
    const SPLIT: Split = Split::Tensor;
    const JOIN_STEP: bool = false;

    fn model(&self) -> &Model {
        &self.model
    }

    fn attn_1<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        i: usize,
        x: Tensor<3>,
        _pos: walk::Pos<'_>,
    ) -> Result<TpAttn> {
        let layer = &self.model.layers[i];
        Ok(TpAttn::Normed(ctx.compute(Some(i), ops::ATTN_1, || {
            layer.input_norm.forward(x)
        })))
    }

    fn attn_step<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        a: TpAttn,
        pos: walk::Pos<'_>,
    ) -> Result<walk::Attention<TpAttn>> {
        match (key.op, a) {
            (ops::ATTN, TpAttn::Normed(x)) => {
                let layer = &self.model.layers[key.layer.unwrap_or_default()];
                Ok(walk::Attention::Running(TpAttn::Partial(ctx.compute(
                    key.layer,
                    ops::ATTN,
                    || layer.attention.forward(x, pos.offset, pos.cache),
                ))))
            }
            _ => Err(walk::bad_step(
                key,
                "tensor parallelism runs attention as attn_1, attn, its all-reduce",
            )),
        }
    }

    fn attn_issue<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        a: TpAttn,
    ) -> Result<TpAttn> {
        let TpAttn::Partial(partial) = a else {
            return Err(out_of_order(key, "attention's partial output"));
        };
        let (x, dims) = flat(partial);
        let tag = ctx.tag(key.op, key.layer.unwrap_or_default());
        Ok(TpAttn::Reducing(TpReduce::start(ctx, tag, x, dims)))
    }

    fn attn_wait<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        key: &OpKey,
        a: TpAttn,
    ) -> Result<Tensor<3>> {
        let TpAttn::Reducing(reduce) = a else {
            return Err(out_of_order(key, "attention's all-reduce"));
        };
        reduce.wait()
    }

    fn router<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        i: usize,
        m: Tensor<3>,
    ) -> Result<TpMoe> {
        let layer = &self.model.layers[i];
        let Ffn::Moe(moe) = &layer.ffn else {
            return Err(ScheduleError::Description(format!(
                "layer {i} is dense but its description routes it"
            )));
        };
        let (x, dims) = ctx.compute(Some(i), ops::ROUTER, || flat(layer.post_norm.forward(m)));
        Ok(TpMoe {
            moe: moe.clone(),
            x,
            dims,
            routed: None,
            shared: None,
        })
    }

    fn moe_step<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        m: &mut TpMoe,
    ) -> Result<()> {
        if key.op != ops::EXPERTS {
            return Err(walk::bad_step(
                key,
                "tensor parallelism runs the routed and shared experts in one step",
            ));
        }
        let [b, t, h] = m.dims;
        let (routed, shared) = ctx.compute(key.layer, ops::EXPERTS, || {
            let routing = m.moe.route(m.x.clone());
            let plan = SlotPlan::from_experts(&routing.experts, m.moe.experts.num_experts());
            (
                m.moe.routed(m.x.clone(), &routing, &plan),
                m.moe.shared(m.x.clone()).map(|s| s.reshape([b, t, h])),
            )
        });
        m.routed = Some(routed);
        m.shared = shared;
        Ok(())
    }

    fn dispatch_issue<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        key: &OpKey,
        _m: &mut TpMoe,
    ) -> Result<()> {
        Err(walk::bad_step(key, "tensor parallelism does not dispatch"))
    }

    fn dispatch_wait<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        key: &OpKey,
        _m: &mut TpMoe,
    ) -> Result<()> {
        Err(walk::bad_step(key, "tensor parallelism does not dispatch"))
    }

    fn take_shared(m: &mut TpMoe) -> Option<Tensor<3>> {
        m.shared.take()
    }

    fn routed_issue<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        m: &mut TpMoe,
    ) -> Result<TpReduce> {
        let routed = m
            .routed
            .take()
            .ok_or_else(|| out_of_order(key, "the routed partial sums"))?;
        let tag = ctx.tag(key.op, key.layer.unwrap_or_default());
        Ok(TpReduce::start(ctx, tag, routed, m.dims))
    }

    fn routed_wait<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        r: TpReduce,
    ) -> Result<Tensor<3>> {
        r.wait()
    }

    fn join<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        _layer: usize,
        w: Tensor<3>,
    ) -> Result<Tensor<3>> {
        Ok(w)
    }
}
