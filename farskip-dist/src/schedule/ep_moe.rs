//! The pieces of one expert-parallel MoE layer, shared by every EP schedule: [`route`] (router and slot gather),
//! [`dispatch`] (the async all-to-all of the slot rows to the experts' owners) and [`experts`] (the routed experts
//! on their owner), and [`Flight`], the layer's rows between the collectives. The description walkers
//! (`schedule::walk`, the training step) call them one step at a time.
//!
//! Training differs from inference only in how tensors enter the layer: a [`Cut`] makes each input of a
//! segment a fresh autodiff leaf (the boundaries of the segmented backward), inference passes them through.

use burn::prelude::*;
use farskip_model::moe::{ExpertBank, GroupedParts, MoeBlock, Routing as ModelRouting, SlotPlan};

use super::walk::out_of_order;
use super::{Ctx, Result};
use crate::balance::ExpertLoads;
use crate::comm::{CollectiveTag, Communicator, Pending};
use crate::dispatch::{
    DispatchPlan, ExpertInputs, ExpertSharding, Routing, combine_start_traced,
    dispatch_start_traced,
};
use crate::plan::desc::OpKey;
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

/// The first part of [`experts`]: the experts holding about the first half of the rows (cut at the expert
/// boundary nearest half), `(input as read, the step between its parts)`; `forward_grouped_rest` finishes it with
/// the same output (and, in training, the same operation) as [`experts`]. No trace span.
pub(crate) fn experts_first(
    moe: &MoeBlock,
    inputs: &ExpertInputs,
    cut: &impl Cut,
) -> (Tensor<2>, GroupedParts) {
    let expert_in = cut.cut(&inputs.tokens);
    let split = ExpertBank::half_rows_split(&inputs.counts);
    let parts = moe
        .experts
        .forward_grouped_first(expert_in.clone(), &inputs.counts, split);
    (expert_in, parts)
}

/// An EP MoE layer's rows between the walker's steps, the same for every EP executor: the slot rows until the
/// dispatch goes out, the dispatch in flight, the rows it delivered, the expert outputs until the combine goes out.
/// A step whose input is not there (a description out of order) is an error naming it.
pub(crate) struct Flight {
    slots: Option<(Tensor<2>, Vec<usize>)>,
    dispatched: Option<Pending<(ExpertInputs, DispatchPlan)>>,
    arrived: Option<(ExpertInputs, DispatchPlan)>,
    first_part: Option<(GroupedParts, DispatchPlan)>,
    expert_out: Option<(Tensor<2>, DispatchPlan)>,
}

impl Flight {
    /// The router's slot rows (token-major) and their experts' global ids, before the dispatch.
    pub fn new(slots: Tensor<2>, slot_experts: Vec<usize>) -> Self {
        Self {
            slots: Some((slots, slot_experts)),
            dispatched: None,
            arrived: None,
            first_part: None,
            expert_out: None,
        }
    }

    /// Issues the dispatch of step `key` (its name and layer tag the collective).
    pub fn dispatch_issue<C: Communicator + ?Sized>(
        &mut self,
        ctx: &Ctx<'_, C>,
        sharding: &ExpertSharding,
        key: &OpKey,
    ) -> Result<()> {
        let (slots, slot_experts) = self
            .slots
            .take()
            .ok_or_else(|| out_of_order(key, "the slot rows"))?;
        let at = At {
            comm: ctx.comm,
            trace: ctx.trace,
            layer: key.layer.unwrap_or_default(),
            phase: ctx.phase,
        };
        self.dispatched = Some(dispatch(&at, sharding, &slots, &slot_experts, key.op)?);
        Ok(())
    }

    /// Waits for the dispatch.
    pub fn dispatch_wait(&mut self, key: &OpKey) -> Result<()> {
        let d = self
            .dispatched
            .take()
            .ok_or_else(|| out_of_order(key, "the dispatch"))?;
        self.arrived = Some(d.wait()?);
        Ok(())
    }

    /// The rows the dispatch delivered, for the experts of step `key`.
    pub fn arrived(&mut self, key: &OpKey) -> Result<(ExpertInputs, DispatchPlan)> {
        self.arrived
            .take()
            .ok_or_else(|| out_of_order(key, "the dispatched rows"))
    }

    /// The experts' step between its two parts ([`experts_first`]), to go back with `plan` once finished.
    pub fn set_first_part(&mut self, parts: GroupedParts, plan: DispatchPlan) {
        self.first_part = Some((parts, plan));
    }

    /// The step [`Self::set_first_part`] left, for the second part of step `key`.
    pub fn first_part(&mut self, key: &OpKey) -> Result<(GroupedParts, DispatchPlan)> {
        self.first_part
            .take()
            .ok_or_else(|| out_of_order(key, "the experts' first part"))
    }

    /// The experts' output rows, to go back with `plan`.
    pub fn set_expert_out(&mut self, rows: Tensor<2>, plan: DispatchPlan) {
        self.expert_out = Some((rows, plan));
    }

    /// Issues the combine of step `key`: the expert outputs back to their tokens' ranks.
    pub fn combine_issue<C: Communicator + ?Sized>(
        &mut self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
    ) -> Result<Pending<Tensor<2>>> {
        let (rows, plan) = self
            .expert_out
            .take()
            .ok_or_else(|| out_of_order(key, "the expert outputs"))?;
        let tag = ctx.tag(key.op, key.layer.unwrap_or_default());
        Ok(combine_start_traced(ctx.comm, rows, plan, tag, ctx.trace)?)
    }
}
