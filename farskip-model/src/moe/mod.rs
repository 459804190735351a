//! The MoE block: router, stacked routed experts and an optional shared expert.
//!
//! Named sub-steps ([`MoeBlock::route`], [`MoeBlock::slot_inputs`], [`ExpertBank::forward_grouped`],
//! [`MoeBlock::combine_slots`], [`MoeBlock::shared`]) let the distributed schedules run the same maths with
//! an all-to-all between them. [`MoeBlock::forward`] runs them in order on one rank.

mod backward;
pub mod experts;
pub mod router;

use burn::module::{Module, Param};
use burn::prelude::*;

pub use experts::{ExpertBank, GroupedParts, SlotPlan, index_tensor};
pub use router::{Router, Routing};

use crate::ModelError;
use crate::config::{MoeConfig, WeightOn};
use crate::matvec;
use crate::mlp::{Mlp, SharedExpert};

/// One MoE feed-forward block.
#[derive(Module, Debug)]
pub struct MoeBlock {
    /// The router.
    pub router: Router,
    /// Routed experts.
    pub experts: ExpertBank,
    /// Shared expert (DeepSeek, Qwen2-MoE, Llama-4).
    pub shared: Option<SharedExpert>,
}

/// What an MoE block produced: the routed part `r` and the shared part `s` (kept apart for FarSkip).
#[derive(Clone, Debug)]
pub struct MoeOutput {
    /// `Routed(x)`, `[tokens, hidden]`.
    pub routed: Tensor<2>,
    /// `Shared(x)`, `[tokens, hidden]`, if the block has a shared expert.
    pub shared: Option<Tensor<2>>,
}

impl MoeBlock {
    /// Random-initialised block.
    pub fn new(cfg: &MoeConfig, hidden: usize, device: &Device) -> Self {
        Self {
            router: Router::new(&cfg.router, hidden, cfg.num_experts, cfg.top_k, device),
            experts: ExpertBank::new(
                cfg.num_experts,
                hidden,
                cfg.expert_intermediate_size,
                device,
            ),
            shared: cfg.shared.as_ref().map(|s| SharedExpert {
                mlp: Mlp::new(hidden, s.intermediate_size, device),
                gate: s.gated.then(|| {
                    burn::nn::LinearConfig::new(hidden, 1)
                        .with_bias(false)
                        .init(device)
                }),
            }),
        }
    }

    /// The same block with its experts relabelled: new expert `i` is old expert `order[i]`. The router's
    /// scores (gate columns, DeepSeek-V3 correction bias) move with their experts, so the block computes the
    /// same function; expert-parallel placement uses this to put experts on ranks by load (see
    /// `farskip_dist::balance`).
    ///
    /// # Errors
    /// If `order` is not a permutation of the experts, or (group-limited routing) it splits a group: every
    /// new group must hold exactly the members of one old group, so group scores are unchanged.
    pub fn permute_experts(&self, order: &[usize]) -> Result<Self, ModelError> {
        let n = self.experts.num_experts();
        let mut seen = vec![false; n];
        let is_permutation = order.len() == n
            && order
                .iter()
                .all(|&e| e < n && !std::mem::replace(&mut seen[e], true));
        if !is_permutation {
            return Err(ModelError::InvalidInput(format!(
                "expert order {order:?} is not a permutation of 0..{n}"
            )));
        }
        if let Some(g) = &self.router.cfg.group_limit {
            let size = n / g.num_groups.max(1);
            for (new_group, members) in order.chunks(size.max(1)).enumerate() {
                let old = members[0] / size;
                if members.iter().any(|&e| e / size != old) {
                    return Err(ModelError::InvalidInput(format!(
                        "expert order {order:?} splits a routing group: new group {new_group} mixes old groups \
                         (group-limited routing needs whole groups moved together)"
                    )));
                }
            }
        }
        let device = self.experts.gate_up.device();
        let idx = index_tensor(order, &device);
        let mut out = self.clone();
        out.router.gate.weight =
            Param::from_tensor(self.router.gate.weight.val().select(1, idx.clone()));
        out.router.correction_bias = self
            .router
            .correction_bias
            .as_ref()
            .map(|b| Param::from_tensor(b.val().select(0, idx)));
        out.experts = self.experts.select(order);
        Ok(out)
    }

    /// Routes, runs the experts and the shared expert on one rank.
    ///
    /// # Shapes
    /// - `x`: `[tokens, hidden]`
    pub fn forward(&self, x: Tensor<2>) -> MoeOutput {
        if let Some(routed) = self.routed_few_tokens(&x) {
            return MoeOutput {
                routed,
                shared: self.shared(x),
            };
        }
        let routing = self.route(x.clone());
        let plan = SlotPlan::from_experts(&routing.experts, self.experts.num_experts());
        MoeOutput {
            routed: self.routed(x.clone(), &routing, &plan),
            shared: self.shared(x),
        }
    }

    /// The routed output of a few tokens (decoding) computed on the host: the router's product and choice
    /// ([`Router::route_host`]), the chosen experts through [`matvec::expert_rows`] and the weighted sum in
    /// slot order, the same steps as [`Self::route`] + [`Self::routed`] without a burn op between them. `None`
    /// (the caller takes the tensor path) for more than [`matvec::MAX_ROWS`] tokens, with autodiff, or off flex.
    fn routed_few_tokens(&self, x: &Tensor<2>) -> Option<Tensor<2>> {
        let [n, h] = x.dims();
        if n == 0 || n > matvec::MAX_ROWS || x.is_autodiff() || self.experts.gate_up.is_autodiff() {
            return None;
        }
        let gate = matvec::flex_primitive(&self.router.gate.weight.val())?;
        let gate_up = matvec::flex_primitive(&self.experts.gate_up.val())?;
        let down = matvec::flex_primitive(&self.experts.down.val())?;
        let xs = matvec::host_f32(x)?;
        crate::host_reads::note_read();
        let e = self.experts.num_experts();
        let inter = self.experts.intermediate_size();
        let mut logits = matvec::rows_times(&xs, n, matvec::Weights::of(&gate)?, h, e);
        if let Some(b) = &self.router.gate.bias {
            let b = matvec::host_f32(&b.val())?;
            for row in logits.chunks_mut(e) {
                row.iter_mut().zip(&b).for_each(|(l, &b)| *l += b);
            }
        }
        let (weights, experts) = self.router.route_host(&logits, n)?;
        let k = self.router.top_k();
        let plan = SlotPlan::new(experts, k, e);
        let on_input = self.router.config().weight_on == WeightOn::Input;
        let mut rows = Vec::with_capacity(plan.sorted_slots.len() * h);
        for &s in &plan.sorted_slots {
            let xr = &xs[(s / k) * h..(s / k + 1) * h];
            match on_input {
                true => rows.extend(xr.iter().map(|&v| v * weights[s])),
                false => rows.extend_from_slice(xr),
            }
        }
        let segments: Vec<(usize, usize)> = plan.counts.iter().copied().enumerate().collect();
        let ys = matvec::expert_rows(
            &rows,
            &segments,
            matvec::Weights::of(&gate_up)?,
            matvec::Weights::of(&down)?,
            h,
            inter,
        );
        let inverse = plan.inverse();
        let slot = |s: usize| &ys[inverse[s] * h..(inverse[s] + 1) * h];
        let mut out = vec![0.0f32; n * h];
        for (t, acc) in out.chunks_mut(h).enumerate() {
            for j in 0..k {
                let s = t * k + j;
                let w = weights[s];
                for (a, &y) in acc.iter_mut().zip(slot(s)) {
                    let y = match on_input {
                        true => y,
                        false => y * w,
                    };
                    *a = match j {
                        0 => y,
                        _ => *a + y,
                    };
                }
            }
        }
        Some(Tensor::from_data(TensorData::new(out, [n, h]), &x.device()))
    }

    /// Router sub-step.
    pub fn route(&self, x: Tensor<2>) -> Routing {
        self.router.route(x)
    }

    /// Shared-expert sub-step.
    pub fn shared(&self, x: Tensor<2>) -> Option<Tensor<2>> {
        self.shared.as_ref().map(|s| s.forward(x))
    }

    /// Routed output on one rank: gather rows by expert, run the bank, put rows back in slot order, combine.
    pub fn routed(&self, x: Tensor<2>, routing: &Routing, plan: &SlotPlan) -> Tensor<2> {
        let device = x.device();
        let sorted = index_tensor(&plan.sorted_slots, &device);
        let mut xs = x.select(0, index_tensor(&plan.sorted_tokens(), &device));
        if self.router.config().weight_on == WeightOn::Input {
            let w = routing
                .weights
                .clone()
                .reshape([plan.slot_experts.len()])
                .select(0, sorted);
            xs = xs * w.unsqueeze_dim::<2>(1);
        }
        let ys = self.experts.forward_grouped(xs, &plan.counts);
        let slot_out = ys.select(0, index_tensor(&plan.inverse(), &device));
        self.combine_slots(slot_out, routing)
    }

    /// Rows each slot sends to its expert, in slot order (`x[token]`, times the weight for [`WeightOn::Input`]).
    ///
    /// # Shapes
    /// - `x`: `[tokens, hidden]` -> `[tokens * top_k, hidden]`
    pub fn slot_inputs(&self, x: Tensor<2>, routing: &Routing) -> Tensor<2> {
        let [n, k] = routing.weights.dims();
        let h = x.dims()[1];
        let xs = x
            .unsqueeze_dim::<3>(1)
            .expand([n, k, h])
            .reshape([n * k, h]);
        match self.router.config().weight_on {
            WeightOn::Input => xs * routing.weights.clone().reshape([n * k, 1]),
            WeightOn::Output => xs,
        }
    }

    /// Weighted sum of each token's expert outputs, slot 0 first (the order every schedule uses, so expert
    /// parallelism is bit-exact against one rank).
    ///
    /// # Shapes
    /// - `slot_outputs`: `[tokens * top_k, hidden]` in slot order -> `[tokens, hidden]`
    pub fn combine_slots(&self, slot_outputs: Tensor<2>, routing: &Routing) -> Tensor<2> {
        let [n, k] = routing.weights.dims();
        let h = slot_outputs.dims()[1];
        let ys = match self.router.config().weight_on {
            WeightOn::Output => slot_outputs * routing.weights.clone().reshape([n * k, 1]),
            WeightOn::Input => slot_outputs,
        };
        let ys = ys.reshape([n, k, h]);
        let mut acc = ys.clone().narrow(1, 0, 1);
        for j in 1..k {
            acc = acc + ys.clone().narrow(1, j, 1);
        }
        acc.reshape([n, h])
    }
}
