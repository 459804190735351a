//! Expert-parallel training at skip depth d ≥ 2 (every layer MoE and converted).
//!
//! The forward keeps up to d combines in flight per rank: layer i's attention reads the settled stream S_i;
//! once d routed outputs are queued, the oldest, r_{i−d}, is waited for and joined into the MoE's input
//! `M_i = S_i + r_{i−d}`; then `S_{i+1} = (M_i + a_i) + s_i` and r_i joins the queue. M_i does not read layer
//! i's attention, so the layer routes and dispatches first and runs its whole attention while the dispatch is in
//! flight; its combine is held back and issued right after the next layer's dispatch, so that it does not queue
//! ahead of that dispatch on the rank's comm stream. The final norm reads
//! `R = S_L + Σ queue` (newest first) — the model's additions in the model's order.
//!
//! The backward is segmented as at depth 1, but the stream additions are linear and handled by hand: the
//! gradient of S_{i+1} is the gradient of a_i, of s_i and (with the MoE input norm's) of M_i; M_i's gradient
//! flows to S_i and to r_{i−d}, whose join backward runs when the backward reaches layer i − d. Each layer's
//! combine backward hides behind its attention backward, as at depth 1.

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Gradients;
use farskip_model::moe::Routing as ModelRouting;

use super::{
    EpTrainRank, Flatten, Objective, PartialTape, RankStep, Result, absorb, bwd_ops, flat3, leaf,
    seeded, visit_replicated_layer,
};
use crate::comm::{CollectiveTag, Communicator, Pending};
use crate::dispatch::combine_start;
use crate::schedule::{Combine, ScheduleError, ops};
use crate::trace::{Phase, Trace};

/// A routed output in flight: its combine and the routing weights it is joined with.
struct InFlight {
    layer: usize,
    combine: Combine,
    weights: Tensor<2>,
}

/// The forward record of one layer at depth ≥ 2.
struct DeepTape {
    part: PartialTape,
    /// The layer whose routed output settled into this layer's MoE input, if any.
    settled_from: Option<usize>,
    /// The join of this layer's routed output (slot-output and weight leaves, and `r` itself), once joined.
    join: Option<(Tensor<2>, Tensor<2>, Tensor<3>)>,
}

impl EpTrainRank {
    /// [`EpTrainRank::step_on`] at skip depth `depth` ≥ 2, on this rank's inputs `x_ids` and targets `y_ids`
    /// (`[batch, seq]`, already checked).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn step_deep<C: Communicator + ?Sized, G: Communicator + ?Sized>(
        &self,
        comm: &C,
        grad_comm: &G,
        trace: &Trace,
        x_ids: Tensor<2, Int>,
        y_ids: Tensor<2, Int>,
        objective: &Objective,
        depth: usize,
    ) -> Result<RankStep> {
        if matches!(objective, Objective::DistillHidden { .. }) {
            return Err(ScheduleError::Model(
                farskip_model::ModelError::InvalidInput(format!(
                    "the KL + L2 objective compares full residual streams, which expert-parallel training keeps \
                     at skip depth 1 only (got depth {depth})"
                )),
            ));
        }
        let (fwd, bwd) = (Phase::Forward, Phase::Backward);
        let rank = self.rank;
        let span = |layer: Option<usize>, op: &'static str, phase: Phase| {
            trace.compute(rank, layer, op, phase)
        };
        let tag = |name: &'static str, layer: usize, phase: Phase| {
            CollectiveTag::new(name).at_layer(layer).in_phase(phase)
        };
        let layers = self.model.layers.len();

        // ---- forward ----
        let g = span(None, ops::HEAD, fwd);
        let emb = self.model.embed(x_ids);
        let h0 = emb.clone().detach();
        g.finish();
        let shape = h0.dims();
        let mut settled = h0.clone();
        // Newest first.
        let mut queue: Vec<InFlight> = Vec::with_capacity(depth);
        let mut tapes: Vec<DeepTape> = Vec::with_capacity(layers);
        // Waits for a routed output, joins it (r = weighted sum of its slot outputs) and records the join.
        let join = |p: InFlight, tapes: &mut Vec<DeepTape>| -> Result<Tensor<3>> {
            let slot_out = p.combine.wait(comm)?;
            let gj = span(Some(p.layer), ops::COMBINE, fwd);
            let (y, w) = (leaf(&slot_out), leaf(&p.weights));
            let routing = ModelRouting {
                weights: w.clone(),
                experts: Tensor::zeros([1, 1], &w.device()),
            };
            let routed = self
                .moe(p.layer)
                .combine_slots(y.clone(), &routing)
                .reshape(shape);
            tapes[p.layer].join = Some((y, w, routed.clone()));
            gj.finish();
            Ok(routed.detach())
        };
        for (i, layer) in self.model.layers.iter().enumerate() {
            // M_i does not read layer i's attention: route and dispatch first, run the whole attention while the
            // dispatch is in flight, and issue the previous layer's combine (held back) behind the dispatch.
            let (m, settled_from) = if queue.len() >= depth {
                let oldest = queue.pop().expect("queue holds depth outputs");
                let from = oldest.layer;
                (settled.clone() + join(oldest, &mut tapes)?, Some(from))
            } else {
                (settled.clone(), None)
            };
            let attn_in = leaf(&settled);
            let (part, combine) = self.moe_forward(
                comm,
                trace,
                i,
                &m,
                attn_in.clone(),
                || {
                    for p in queue.iter_mut() {
                        p.combine.launch(comm)?;
                    }
                    let g = span(Some(i), ops::ATTN_1, fwd);
                    let qkv = layer
                        .attention
                        .project(layer.input_norm.forward(attn_in), 0, None);
                    g.finish();
                    let g = span(Some(i), ops::ATTN_2, fwd);
                    let a = layer.attention.attend(qkv);
                    g.finish();
                    Ok(a)
                },
                false,
                i + 1 < layers,
            )?;
            // S_{i+1} = (M_i + a_i) + s_i.
            let post_attention = m + part.attn_out.clone().detach();
            settled = match &part.shared_out {
                Some(s) => post_attention + s.clone().detach().reshape(shape),
                None => post_attention,
            };
            queue.insert(
                0,
                InFlight {
                    layer: i,
                    combine,
                    weights: part.weights.clone().detach(),
                },
            );
            tapes.push(DeepTape {
                part,
                settled_from,
                join: None,
            });
        }
        // The final norm reads R = S + Σ queue, newest first; the oldest combines are waited for first.
        let in_flight: Vec<usize> = queue.iter().map(|p| p.layer).collect();
        let mut routed = Vec::with_capacity(queue.len());
        while let Some(oldest) = queue.pop() {
            routed.push(join(oldest, &mut tapes)?);
        }
        let full = routed.into_iter().rev().fold(settled, |acc, r| acc + r);
        let g = span(None, ops::HEAD, fwd);
        let final_in = leaf(&full);
        let logits = self.model.logits(final_in.clone());
        let [b, t, v] = logits.dims();
        let loss = self.logits_loss(objective, &logits.reshape([b * t, v]), y_ids);
        let loss_value = loss.clone().into_scalar::<f64>();
        g.finish();

        // ---- backward ----
        let mut acc = GradientsParams::new();
        let absorb = |acc: &mut GradientsParams, grads: Gradients| absorb(acc, grads, &self.model);
        let g = span(None, bwd_ops::HEAD, bwd);
        let grads = loss.backward();
        let g_full = final_in
            .grad(&grads)
            .expect("final stream is a leaf")
            .detach();
        absorb(&mut acc, grads);
        g.finish();
        // Gradients of the routed outputs, filled where each was read (a later MoE input or the final sum).
        let mut g_routed: Vec<Option<Tensor<3>>> = vec![None; layers];
        for &k in &in_flight {
            g_routed[k] = Some(g_full.clone());
        }
        let mut g_settled = g_full;
        let mut pending_grads: Vec<(usize, Vec<bool>, Pending<Vec<f32>>)> = Vec::new();
        for (i, tape) in tapes.into_iter().enumerate().rev() {
            let layer = &self.model.layers[i];
            let g_next = g_settled;
            // Join: the routed output's gradient, back to the slot outputs and the routing weights.
            let gj = span(Some(i), bwd_ops::JOIN, bwd);
            let (y, w, routed) = tape.join.expect("every routed output is joined");
            let g_r = g_routed[i]
                .take()
                .expect("every routed output is read by a later layer or the head");
            let grads = seeded(vec![(flat3(routed), flat3(g_r))])
                .expect("non-empty")
                .backward();
            let g_y = y.grad(&grads).expect("leaf");
            let g_w = w.grad(&grads).expect("leaf");
            gj.finish();
            let to_owner = self.send_slots(
                comm,
                g_y,
                &tape.part.slot_experts,
                tag(bwd_ops::COMBINE_BWD, i, bwd),
            )?;
            // Attention read S_i; its output's gradient is S_{i+1}'s. Its backward hides the exchange.
            let ga = span(Some(i), bwd_ops::ATTN, bwd);
            let grads = (tape.part.attn_out.clone() * g_next.clone())
                .sum()
                .backward();
            let g_attn_in = tape.part.attn_in.grad(&grads).expect("leaf");
            absorb(&mut acc, grads);
            ga.finish();
            let (g_rows, back_plan) = to_owner.wait()?;
            let ge = span(Some(i), bwd_ops::EXPERTS, bwd);
            let g_expert_in = tape
                .part
                .experts_backward(g_rows.tokens, &mut acc, &self.model);
            ge.finish();
            let back = combine_start(
                comm,
                g_expert_in,
                back_plan,
                tag(bwd_ops::DISPATCH_BWD, i, bwd),
            )?;
            let gs = span(Some(i), bwd_ops::SHARED, bwd);
            let g_m = tape.part.shared_backward(&g_next, &mut acc, &self.model);
            gs.finish();
            let g_slots = back.wait()?;
            let gr = span(Some(i), bwd_ops::ROUTER, bwd);
            let g_norm_in = tape
                .part
                .router_backward(g_slots, g_w, g_m, &mut acc, &self.model);
            gr.finish();
            // M_i fed the residual add and the MoE's norm; it is S_i (+ the output that settled into it).
            let g_moe_in = g_next + g_norm_in;
            if let Some(k) = tape.settled_from {
                g_routed[k] = Some(match g_routed[k].take() {
                    Some(g) => g + g_moe_in.clone(),
                    None => g_moe_in.clone(),
                });
            }
            g_settled = g_moe_in + g_attn_in;
            let mut f = Flatten {
                grads: &mut acc,
                buffer: Vec::new(),
                present: Vec::new(),
            };
            visit_replicated_layer(layer, &mut f);
            let (buffer, present) = (f.buffer, f.present);
            pending_grads.push((
                i,
                present,
                grad_comm.all_reduce(tag(bwd_ops::GRAD_ALLREDUCE, i, bwd), buffer),
            ));
        }
        let g = span(None, bwd_ops::HEAD, bwd);
        let grads = (flat3(emb) * flat3(g_settled)).sum().backward();
        absorb(&mut acc, grads);
        g.finish();
        self.reduce_replicated(grad_comm, &mut acc, pending_grads, h0.device().inner())?;
        Ok(RankStep {
            loss: loss_value,
            grads: acc,
        })
    }
}
