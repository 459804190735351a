//! Expert-parallel training with two-micro-batch overlap (TBO, the schedule-only baseline; standard
//! connectivity only).
//!
//! Each rank splits its windows by rows into half 0 (the first `batch / 2` rows) and half 1 (the rest) and
//! interleaves the two halves' layers, so that one half's collective is in flight while the other half computes.
//! Per layer i, with `attn` = norm + attention, `begin` = norm + router + slot gather + async dispatch, `end` =
//! wait dispatch + experts + async combine + shared expert, `join` = wait combine + weighted combine + residual:
//!
//! - forward: attn(0) → begin(0) → join(1) of layer i − 1 → attn(1) → begin(1) → end(0) → end(1) → join(0);
//!   half 1's join is held over to the next layer, so its combine hides behind half 0's next attention; after
//!   the last layer: head(0) → join(1) → head(1);
//! - backward: head-bwd(1) → join-bwd(1) of the last layer, its combine-bwd(1) issued → head-bwd(0) →
//!   join-bwd(0), combine-bwd(0) issued; then per layer i, from the last: end-bwd(1) (wait combine-bwd(1),
//!   experts-bwd, dispatch-bwd(1) issued, shared-bwd) → begin-bwd(1) (wait dispatch-bwd(1), router-bwd,
//!   attn-bwd) → join-bwd(1) of layer i − 1, combine-bwd(1) issued → end-bwd(0) → begin-bwd(0) → the layer's
//!   replicated gradients (both halves') all-reduced asynchronously → join-bwd(0) of layer i − 1,
//!   combine-bwd(0) issued. Each half's combine backward hides behind the other half's experts, router and
//!   attention backward (half 1's of the last layer behind half 0's head backward).
//!
//! The embedding runs once on the whole batch; the head runs per half, each half's loss weighted ½ so that
//! the two add up to the whole batch's. The step's loss and gradients equal [`EpTrainRank::step_on`]'s up to
//! float rounding.

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Gradients;
use farskip_model::moe::Routing as ModelRouting;
use farskip_model::{Connectivity, ModelError};

use super::{
    EpTrainRank, Flatten, MoeBegun, Objective, PartialTape, RankStep, Result, absorb, bwd_ops,
    flat3, leaf, seeded, visit_replicated_layer,
};
use crate::comm::{CollectiveTag, CommError, Communicator, Pending};
use crate::dispatch::{DispatchPlan, ExpertInputs, combine_start_traced};
use crate::schedule::{ScheduleError, ops, tbo_ops};
use crate::trace::{Phase, Trace};

/// One half's layer between `begin` and `end`: attention's leaf and output, the post-attention stream and the
/// MoE's first part (its dispatch in flight).
struct Begun {
    attn_in: Tensor<3>,
    attn_out: Tensor<3>,
    post_attention: Tensor<3>,
    moe: MoeBegun,
}

/// One half's layer between `end` and `join`: its combine in flight.
struct Combining {
    layer: usize,
    combine: Pending<Tensor<2>>,
    post_attention: Tensor<3>,
    shared: Option<Tensor<2>>,
    weights: Tensor<2>,
    part: PartialTape,
}

/// The forward record of one half's layer, kept for its backward.
struct HalfTape {
    layer: usize,
    part: PartialTape,
    /// Join segment leaves (post-attention stream, shared output, slot outputs, routing weights) and output.
    residual: Tensor<3>,
    shared: Option<Tensor<3>>,
    slots: Tensor<2>,
    weights: Tensor<2>,
    out: Tensor<3>,
}

/// One half's layer in the backward between `join-bwd` and `end-bwd`: the combine's backward in flight.
struct CombineBwd {
    layer: usize,
    part: PartialTape,
    g_residual: Tensor<3>,
    g_shared: Option<Tensor<3>>,
    g_weights: Tensor<2>,
    to_owner: Pending<(ExpertInputs, DispatchPlan)>,
}

/// One half's layer in the backward between `end-bwd` and `begin-bwd`: the dispatch's backward in flight.
struct DispatchBwd {
    layer: usize,
    part: PartialTape,
    g_residual: Tensor<3>,
    g_weights: Tensor<2>,
    g_shared_in: Option<Tensor<2>>,
    back: Pending<Tensor<2>>,
}

fn invalid(message: String) -> ScheduleError {
    ScheduleError::Model(ModelError::InvalidInput(message))
}

impl EpTrainRank {
    /// Two-micro-batch overlap: this rank's windows `[batch, seq + 1]` (batch even, ≥ 2) are split into rows
    /// `0..batch/2` and `batch/2..batch`; the two halves' layers interleave so that one half's dispatch/combine
    /// (and their backward) is in flight while the other half computes (the module doc gives the order).
    /// Standard connectivity only, with [`Objective::CrossEntropy`] or [`Objective::Distill`]. The same loss and
    /// gradients as [`EpTrainRank::step_on`] on the whole batch, up to float rounding.
    ///
    /// # Errors
    /// FarSkip connectivity, an odd or empty batch, windows shorter than 2, [`Objective::DistillHidden`], an
    /// objective whose teacher tensors do not fit, a `grad_comm` that does not match `comm`, or a failed
    /// collective.
    pub fn step_tbo_on<C: Communicator + ?Sized, G: Communicator + ?Sized>(
        &self,
        comm: &C,
        grad_comm: &G,
        trace: &Trace,
        windows: Tensor<2, Int>,
        objective: &Objective,
    ) -> Result<RankStep> {
        match self.model.connectivity() {
            Connectivity::Standard => {}
            other => {
                return Err(ScheduleError::Model(ModelError::InvalidConnectivity {
                    spec: other.to_string(),
                    message: "two-micro-batch overlap training runs standard connectivity (the \
                              schedule-only baseline)"
                        .into(),
                }));
            }
        }
        if grad_comm.rank() != comm.rank() || grad_comm.world_size() != comm.world_size() {
            return Err(ScheduleError::Comm(CommError::InvalidArgument(format!(
                "the gradient communicator is rank {} of {} but the expert-parallel one is rank {} of {}",
                grad_comm.rank(),
                grad_comm.world_size(),
                comm.rank(),
                comm.world_size()
            ))));
        }
        let [b, t1] = windows.dims();
        if b < 2 || !b.is_multiple_of(2) || t1 < 2 {
            return Err(invalid(format!(
                "two-micro-batch overlap training splits this rank's windows by rows into two halves: they \
                 must be [batch even >= 2, seq + 1 >= 2], got [{b}, {t1}]"
            )));
        }
        if matches!(objective, Objective::DistillHidden { .. }) {
            return Err(invalid(
                "the KL + L2 objective is not supported by two-micro-batch overlap training (use cross-entropy \
                 or KL distillation)"
                    .into(),
            ));
        }
        let t = t1 - 1;
        let config = self.model.config();
        objective.check(
            [b, t],
            config.vocab_size,
            config.hidden_size,
            self.model.layers.len(),
        )?;
        let x_ids = windows.clone().narrow(1, 0, t);
        let y_ids = windows.narrow(1, 1, t);
        let (fwd, bwd) = (Phase::Forward, Phase::Backward);
        let span = |layer: Option<usize>, op: &'static str, phase: Phase| {
            trace.compute(self.rank, layer, op, phase)
        };
        let layers = self.model.layers.len();
        let half = b / 2;

        // ---- forward ----
        let g = span(None, ops::HEAD, fwd);
        let emb = self.model.embed(x_ids);
        let h0 = emb.clone().detach();
        g.finish();
        let mut full = [
            h0.clone().narrow(0, 0, half),
            h0.clone().narrow(0, half, half),
        ];
        let mut tapes: [Vec<HalfTape>; 2] =
            [Vec::with_capacity(layers), Vec::with_capacity(layers)];
        let mut held: Option<Combining> = None;
        for i in 0..layers {
            let begun0 = self.tbo_begin(comm, trace, i, 0, &full[0])?;
            if let Some(p) = held.take() {
                full[1] = self.tbo_join(trace, p, &mut tapes[1])?;
            }
            let begun1 = self.tbo_begin(comm, trace, i, 1, &full[1])?;
            let p0 = self.tbo_end(comm, trace, i, 0, begun0)?;
            held = Some(self.tbo_end(comm, trace, i, 1, begun1)?);
            full[0] = self.tbo_join(trace, p0, &mut tapes[0])?;
        }
        // The head, half by half: half 1's last combine is in flight while half 0's head runs. Each half's loss
        // is its mean weighted ½, so the two add up to the whole batch's.
        let head = |mb: usize, full: &Tensor<3>| -> (Tensor<3>, Tensor<1>) {
            let g = span(None, ops::HEAD, fwd);
            let final_in = leaf(full);
            let logits = self.model.logits(final_in.clone());
            let v = logits.dims()[2];
            let rows = |t3: &Tensor<3>| t3.clone().narrow(0, mb * half, half);
            let objective = match objective {
                Objective::Distill {
                    teacher_logits,
                    temperature,
                } => Objective::Distill {
                    teacher_logits: rows(teacher_logits),
                    temperature: *temperature,
                },
                other => other.clone(),
            };
            let y = y_ids.clone().narrow(0, mb * half, half);
            let loss = self
                .logits_loss(&objective, &logits.reshape([half * t, v]), y)
                .mul_scalar(0.5);
            g.finish();
            (final_in, loss)
        };
        let (final0, loss0) = head(0, &full[0]);
        if let Some(p) = held.take() {
            full[1] = self.tbo_join(trace, p, &mut tapes[1])?;
        }
        let (final1, loss1) = head(1, &full[1]);
        let loss_value = loss0.clone().into_scalar::<f64>() + loss1.clone().into_scalar::<f64>();

        // ---- backward ----
        // Each half's combine backward is issued as soon as its join's backward has run, and waited for
        // after the other half's next block of compute: half 1's behind half 0's head (last layer) or half
        // 0's attention backward of the layer above, half 0's behind half 1's experts, router and attention
        // backward.
        let mut acc = GradientsParams::new();
        let head_bwd = |loss: Tensor<1>, final_in: Tensor<3>, acc: &mut GradientsParams| {
            let g = span(None, bwd_ops::HEAD, bwd);
            let grads = loss.backward();
            let g_final = final_in
                .grad(&grads)
                .expect("final stream is a leaf")
                .detach();
            absorb(acc, grads, &self.model);
            g.finish();
            g_final
        };
        let [mut tapes0, mut tapes1] = tapes;
        let mut pending_grads: Vec<(usize, Vec<bool>, Pending<Vec<f32>>)> = Vec::new();
        let mut g_full1 = head_bwd(loss1, final1, &mut acc);
        let mut held1 = tapes1
            .pop()
            .map(|last| self.tbo_join_bwd(comm, trace, 1, last, &g_full1))
            .transpose()?;
        let mut g_full0 = head_bwd(loss0, final0, &mut acc);
        let mut held0 = tapes0
            .pop()
            .map(|last| self.tbo_join_bwd(comm, trace, 0, last, &g_full0))
            .transpose()?;
        while let Some(c0) = held0.take() {
            let i = c0.layer;
            let c1 = held1
                .take()
                .expect("half 1's combine backward of this layer was issued");
            let d1 = self.tbo_end_bwd(comm, trace, 1, c1, &mut acc)?;
            g_full1 = self.tbo_begin_bwd(trace, d1, &mut acc)?;
            held1 = tapes1
                .pop()
                .map(|tape| self.tbo_join_bwd(comm, trace, 1, tape, &g_full1))
                .transpose()?;
            let d0 = self.tbo_end_bwd(comm, trace, 0, c0, &mut acc)?;
            g_full0 = self.tbo_begin_bwd(trace, d0, &mut acc)?;
            // Both halves' backward of this layer is done: all-reduce its replicated gradients while the
            // layers below run.
            let g = span(Some(i), bwd_ops::GRAD_ALLREDUCE_PACK, bwd);
            let mut f = Flatten {
                grads: &mut acc,
                buffer: Vec::new(),
                present: Vec::new(),
            };
            visit_replicated_layer(&self.model.layers[i], &mut f);
            let (buffer, present) = (f.buffer, f.present);
            g.finish();
            let tag = CollectiveTag::new(bwd_ops::GRAD_ALLREDUCE)
                .at_layer(i)
                .in_phase(bwd);
            pending_grads.push((i, present, grad_comm.all_reduce(tag, buffer)));
            held0 = tapes0
                .pop()
                .map(|tape| self.tbo_join_bwd(comm, trace, 0, tape, &g_full0))
                .transpose()?;
        }
        let g = span(None, bwd_ops::HEAD, bwd);
        let g_emb = Tensor::cat(vec![g_full0, g_full1], 0);
        let grads = (flat3(emb) * flat3(g_emb)).sum().backward();
        absorb(&mut acc, grads, &self.model);
        g.finish();
        self.reduce_replicated(
            grad_comm,
            trace,
            &mut acc,
            pending_grads,
            h0.device().inner(),
        )?;
        Ok(RankStep {
            loss: loss_value,
            grads: acc,
        })
    }

    /// Half `mb`'s attention (stock order: it reads the full stream) and the MoE's first part, its dispatch
    /// left in flight.
    fn tbo_begin<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        i: usize,
        mb: usize,
        full: &Tensor<3>,
    ) -> Result<Begun> {
        let layer = &self.model.layers[i];
        let fwd = Phase::Forward;
        let g = trace.compute(self.rank, Some(i), ops::ATTN_1, fwd);
        let attn_in = leaf(full);
        let qkv = layer
            .attention
            .project(layer.input_norm.forward(attn_in.clone()), 0, None);
        g.finish();
        let g = trace.compute(self.rank, Some(i), ops::ATTN_2, fwd);
        let attn_out = layer.attention.attend(qkv);
        g.finish();
        let post_attention = full.clone() + attn_out.clone().detach();
        let moe = self.moe_begin(comm, trace, i, &post_attention, tbo_ops::DISPATCH[mb])?;
        Ok(Begun {
            attn_in,
            attn_out,
            post_attention,
            moe,
        })
    }

    /// Half `mb`'s MoE second part: waits for its dispatch, runs the experts, starts its combine (left in
    /// flight) and runs the shared expert.
    fn tbo_end<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        i: usize,
        mb: usize,
        begun: Begun,
    ) -> Result<Combining> {
        let Begun {
            attn_in,
            attn_out,
            post_attention,
            moe,
        } = begun;
        let (part, combine) = self.moe_end(
            comm,
            trace,
            i,
            moe,
            (attn_in, attn_out),
            tbo_ops::COMBINE[mb],
        )?;
        Ok(Combining {
            layer: i,
            combine,
            post_attention,
            shared: part.shared_out.clone().map(|s| s.detach()),
            weights: part.weights.clone().detach(),
            part,
        })
    }

    /// Waits for a half's combine and joins its layer: `R' + (r + s)` (the model's additions), recorded as a
    /// segment whose inputs are fresh leaves. Returns the half's next full stream.
    fn tbo_join(
        &self,
        trace: &Trace,
        p: Combining,
        tapes: &mut Vec<HalfTape>,
    ) -> Result<Tensor<3>> {
        let slot_out = p.combine.wait()?;
        let g = trace.compute(self.rank, Some(p.layer), ops::COMBINE, Phase::Forward);
        let shape = p.post_attention.dims();
        let (r, s, y, w) = (
            leaf(&p.post_attention),
            p.shared.as_ref().map(|s| leaf(&s.clone().reshape(shape))),
            leaf(&slot_out),
            leaf(&p.weights),
        );
        let routing = ModelRouting {
            weights: w.clone(),
            experts: Tensor::zeros([1, 1], &w.device()),
        };
        let routed = self
            .moe(p.layer)
            .combine_slots(y.clone(), &routing)
            .reshape(shape);
        let out = match &s {
            Some(s) => r.clone() + (routed + s.clone()),
            None => r.clone() + routed,
        };
        tapes.push(HalfTape {
            layer: p.layer,
            part: p.part,
            residual: r,
            shared: s,
            slots: y,
            weights: w,
            out: out.clone(),
        });
        g.finish();
        Ok(out.detach())
    }

    /// Backward of half `mb`'s join from its output's gradient `g_out`; starts the combine's backward (the
    /// slot-output gradients travel to the experts' owners), left in flight.
    fn tbo_join_bwd<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        mb: usize,
        tape: HalfTape,
        g_out: &Tensor<3>,
    ) -> Result<CombineBwd> {
        let i = tape.layer;
        let bwd = Phase::Backward;
        let g = trace.compute(self.rank, Some(i), bwd_ops::JOIN, bwd);
        let grads = seeded(vec![(flat3(tape.out.clone()), flat3(g_out.clone()))])
            .expect("non-empty")
            .backward();
        let g_residual = tape.residual.grad(&grads).expect("leaf");
        let g_shared = tape.shared.as_ref().and_then(|s| s.grad(&grads));
        let g_slots = tape.slots.grad(&grads).expect("leaf");
        let g_weights = tape.weights.grad(&grads).expect("leaf");
        g.finish();
        let to_owner = self.send_slots(
            comm,
            trace,
            g_slots,
            &tape.part.slot_experts,
            CollectiveTag::new(bwd_ops::COMBINE_BWD_MB[mb])
                .at_layer(i)
                .in_phase(bwd),
        )?;
        Ok(CombineBwd {
            layer: i,
            part: tape.part,
            g_residual,
            g_shared,
            g_weights,
            to_owner,
        })
    }

    /// Waits for half `mb`'s combine backward, runs the experts' backward on their owner, starts the dispatch's
    /// backward (the expert-input gradients return to the tokens' ranks), left in flight, and runs the shared
    /// expert's backward.
    fn tbo_end_bwd<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        mb: usize,
        c: CombineBwd,
        acc: &mut GradientsParams,
    ) -> Result<DispatchBwd> {
        let (i, bwd) = (c.layer, Phase::Backward);
        let (g_rows, back_plan) = c.to_owner.wait()?;
        let g = trace.compute(self.rank, Some(i), bwd_ops::EXPERTS, bwd);
        let g_expert_in = c.part.experts_backward(g_rows.tokens, acc, &self.model);
        g.finish();
        let back = combine_start_traced(
            comm,
            g_expert_in,
            back_plan,
            CollectiveTag::new(bwd_ops::DISPATCH_BWD_MB[mb])
                .at_layer(i)
                .in_phase(bwd),
            trace,
        )?;
        let g = trace.compute(self.rank, Some(i), bwd_ops::SHARED, bwd);
        let g_shared_in = c
            .g_shared
            .as_ref()
            .and_then(|g| c.part.shared_backward(g, acc, &self.model));
        g.finish();
        Ok(DispatchBwd {
            layer: i,
            part: c.part,
            g_residual: c.g_residual,
            g_weights: c.g_weights,
            g_shared_in,
            back,
        })
    }

    /// Waits for a half's dispatch backward, runs the router's and the MoE norm's backward, then attention's
    /// (the MoE read the post-attention stream): the gradient of the half's layer input.
    fn tbo_begin_bwd(
        &self,
        trace: &Trace,
        d: DispatchBwd,
        acc: &mut GradientsParams,
    ) -> Result<Tensor<3>> {
        let (i, bwd) = (d.layer, Phase::Backward);
        let g_slots = d.back.wait()?;
        let g = trace.compute(self.rank, Some(i), bwd_ops::ROUTER, bwd);
        let g_norm_in =
            d.part
                .router_backward(g_slots, d.g_weights, d.g_shared_in, acc, &self.model);
        g.finish();
        let g_post = d.g_residual + g_norm_in;
        let g = trace.compute(self.rank, Some(i), bwd_ops::ATTN, bwd);
        let grads: Gradients = (d.part.attn_out.clone() * g_post.clone()).sum().backward();
        let g_in = d.part.attn_in.grad(&grads).expect("leaf");
        absorb(acc, grads, &self.model);
        g.finish();
        Ok(g_post + g_in)
    }
}

#[cfg(test)]
mod tests {
    use super::bwd_ops;
    use crate::schedule::tbo_ops;

    /// The link model gives a micro-batch's collective half the time of the full one it names.
    #[test]
    fn backward_micro_batch_collectives_are_halves_of_the_backward_exchanges() {
        for mb in 0..2 {
            assert_eq!(
                tbo_ops::full_op(bwd_ops::COMBINE_BWD_MB[mb]),
                Some(bwd_ops::COMBINE_BWD)
            );
            assert_eq!(
                tbo_ops::full_op(bwd_ops::DISPATCH_BWD_MB[mb]),
                Some(bwd_ops::DISPATCH_BWD)
            );
        }
        assert_ne!(bwd_ops::COMBINE_BWD_MB[0], bwd_ops::COMBINE_BWD_MB[1]);
        assert_ne!(bwd_ops::DISPATCH_BWD_MB[0], bwd_ops::DISPATCH_BWD_MB[1]);
    }
}
