//! The pieces of one expert-parallel MoE layer, shared by every EP schedule: [`route`] (router and slot gather),
//! [`dispatch`] (the async all-to-all of the slot rows to the experts' owners) and [`experts`] (the routed experts
//! on their owner). The description walkers (`schedule::walk`, the training step) call them one step at a time;
//! the two-micro-batch training step uses them through [`begin`] (route + dispatch, span `router`) and [`end`]
//! (wait, experts, combine, shared expert).
//!
//! Training differs from inference only in how tensors enter the layer: a [`Cut`] makes each input of a
//! segment a fresh autodiff leaf (the boundaries of the segmented backward), inference passes them through.

use burn::prelude::*;
use farskip_model::moe::{MoeBlock, Routing as ModelRouting, SlotPlan};

use super::Result;
use crate::balance::ExpertLoads;
use crate::comm::{CollectiveTag, Communicator, Pending};
use crate::dispatch::{
    DispatchPlan, ExpertInputs, ExpertSharding, Routing, combine_start_traced,
    dispatch_start_traced,
};
use crate::schedule::ops;
use crate::trace::{Phase, Trace};

/// How a tensor enters the layer's graph.
pub(crate) trait Cut {
    /// The tensor as the layer reads it.
    fn cut(&self, t: &Tensor<2>) -> Tensor<2>;
}

/// Inference: tensors pass through.
pub(crate) struct Through;

impl Cut for Through {
    fn cut(&self, t: &Tensor<2>) -> Tensor<2> {
        t.clone()
    }
}

/// Where and as what a step runs: its rank's comm and trace, the layer, the pass.
pub(crate) struct At<'a, C: Communicator + ?Sized> {
    pub comm: &'a C,
    pub trace: &'a Trace,
    pub layer: usize,
    pub phase: Phase,
}

impl<C: Communicator + ?Sized> At<'_, C> {
    fn span<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> T {
        let g = self
            .trace
            .compute(self.comm.rank(), Some(self.layer), op, self.phase);
        let out = f();
        g.finish();
        out
    }
}

/// What [`begin`] leaves for [`end`] and for a backward.
pub(crate) struct Begun {
    /// The router's input as the layer read it (a leaf in training).
    pub router_in: Tensor<2>,
    /// Expert ids and weights of every token.
    pub routing: ModelRouting,
    /// The slot rows, token-major, `top_k` per token.
    pub slots: Tensor<2>,
    /// Global expert id of every slot row.
    pub slot_experts: Vec<usize>,
    /// The dispatch in flight.
    pub dispatched: Pending<(ExpertInputs, DispatchPlan)>,
}

/// The router's result on a layer's normalised MoE input.
pub(crate) struct Routed {
    /// The router's input as the layer read it (a leaf in training).
    pub router_in: Tensor<2>,
    /// Expert ids and weights of every token.
    pub routing: ModelRouting,
    /// The slot rows, token-major, `top_k` per token.
    pub slots: Tensor<2>,
    /// Global expert id of every slot row.
    pub slot_experts: Vec<usize>,
}

/// Router and slot gather on `normed` (`[tokens, hidden]`) of layer `layer`, its rows per expert added to
/// `loads` when given. No trace span: the caller's `router` span covers it.
pub(crate) fn route(
    moe: &MoeBlock,
    sharding: &ExpertSharding,
    loads: Option<&ExpertLoads>,
    layer: usize,
    normed: &Tensor<2>,
    cut: &impl Cut,
) -> Routed {
    let router_in = cut.cut(normed);
    let routing = moe.route(router_in.clone());
    let plan = SlotPlan::from_experts(&routing.experts, sharding.num_experts());
    let slots = moe.slot_inputs(router_in.clone(), &routing);
    if let Some(loads) = loads {
        loads.record(layer, &plan.counts);
    }
    Routed {
        router_in,
        routing,
        slots,
        slot_experts: plan.slot_experts,
    }
}

/// Starts the dispatch of the slot rows to their experts' owners, tagged `tag`. Slot rows travel one by one
/// (top_k = 1, weight 1): the routing weights stay home and are applied by the combine, as on one rank.
pub(crate) fn dispatch<C: Communicator + ?Sized>(
    at: &At<'_, C>,
    sharding: &ExpertSharding,
    slots: &Tensor<2>,
    slot_experts: &[usize],
    tag: &'static str,
) -> Result<Pending<(ExpertInputs, DispatchPlan)>> {
    let ones = Tensor::<2>::ones([slot_experts.len(), 1], &slots.device());
    let slot_routing = Routing::new(slot_experts.to_vec(), ones)?;
    Ok(dispatch_start_traced(
        at.comm,
        sharding,
        slots.clone().detach().without_autodiff(),
        &slot_routing,
        CollectiveTag::new(tag)
            .at_layer(at.layer)
            .in_phase(at.phase),
        at.trace,
    )?)
}

/// The routed experts of this rank on the rows dispatched to it: (input as read, output). No trace span.
pub(crate) fn experts(
    moe: &MoeBlock,
    inputs: &ExpertInputs,
    cut: &impl Cut,
) -> (Tensor<2>, Tensor<2>) {
    let expert_in = cut.cut(&inputs.tokens);
    let expert_out = moe
        .experts
        .forward_grouped(expert_in.clone(), &inputs.counts);
    (expert_in, expert_out)
}

/// Router and slot gather on `normed` (span `router`), then the async dispatch of the slot rows, tagged `tag`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn begin<C: Communicator + ?Sized>(
    at: &At<'_, C>,
    moe: &MoeBlock,
    sharding: &ExpertSharding,
    loads: Option<&ExpertLoads>,
    normed: &Tensor<2>,
    cut: &impl Cut,
    tag: &'static str,
) -> Result<Begun> {
    let r = at.span(ops::ROUTER, || {
        route(moe, sharding, loads, at.layer, normed, cut)
    });
    let dispatched = dispatch(at, sharding, &r.slots, &r.slot_experts, tag)?;
    Ok(Begun {
        router_in: r.router_in,
        routing: r.routing,
        slots: r.slots,
        slot_experts: r.slot_experts,
        dispatched,
    })
}

/// What [`end`] leaves for the combine's wait and for a backward.
pub(crate) struct Ended {
    /// The expert bank's input rows as the layer read them (a leaf in training).
    pub expert_in: Tensor<2>,
    /// The expert bank's output rows (before they travel back).
    pub expert_out: Tensor<2>,
    /// The shared expert's input (a leaf in training).
    pub shared_in: Tensor<2>,
    /// The shared expert's output, if the layer has one.
    pub shared_out: Option<Tensor<2>>,
    /// The combine in flight.
    pub combine: Pending<Tensor<2>>,
}

/// Waits for the dispatch, runs the routed experts on their owner, starts the combine (tagged `tag`) and runs
/// the shared expert on `shared_src` (the normalised MoE input).
pub(crate) fn end<C: Communicator + ?Sized>(
    at: &At<'_, C>,
    moe: &MoeBlock,
    dispatched: Pending<(ExpertInputs, DispatchPlan)>,
    shared_src: &Tensor<2>,
    cut: &impl Cut,
    tag: &'static str,
) -> Result<Ended> {
    let (inputs, plan) = dispatched.wait()?;
    let (expert_in, expert_out) = at.span(ops::EXPERTS, || experts(moe, &inputs, cut));
    let tag = CollectiveTag::new(tag)
        .at_layer(at.layer)
        .in_phase(at.phase);
    let combine = combine_start_traced(at.comm, expert_out.clone().detach(), plan, tag, at.trace)?;
    let (shared_in, shared_out) = at.span(ops::SHARED, || {
        let shared_in = cut.cut(shared_src);
        let shared_out = moe.shared(shared_in.clone());
        (shared_in, shared_out)
    });
    Ok(Ended {
        expert_in,
        expert_out,
        shared_in,
        shared_out,
        combine,
    })
}
