//! The pieces of one expert-parallel MoE layer, shared by every EP schedule: [`route`] (router and slot gather),
//! [`dispatch`] (the async all-to-all of the slot rows to the experts' owners) and [`experts`] (the routed experts
//! on their owner). The description walkers (`schedule::walk`, the training step) call them one step at a time.
//!
//! Training differs from inference only in how tensors enter the layer: a [`Cut`] makes each input of a
//! segment a fresh autodiff leaf (the boundaries of the segmented backward), inference passes them through.

use burn::prelude::*;
use farskip_model::moe::{MoeBlock, Routing as ModelRouting, SlotPlan};

use super::Result;
use crate::balance::ExpertLoads;
use crate::comm::{CollectiveTag, Communicator, Pending};
use crate::dispatch::{DispatchPlan, ExpertInputs, ExpertSharding, Routing, dispatch_start_traced};
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
