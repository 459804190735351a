//! The expert-parallel training step, walked from its description ([`desc::training`], the one the planner
//! simulates). The forward is the inference walker ([`walk::walk_forward`]) with a recording [`Exec`]: each
//! segment's input is a fresh autodiff leaf, and each layer records which routed outputs its `R` holds. The
//! backward walks the description's backward steps on those segments.
//!
//! The backward's algebra is the forward's, read backwards. Per layer i (every layer MoE): `R_i = S_i + Σ r_k`
//! over the routed outputs k that joined it; attention reads `S_i` (FarSkip) or `R_i` (standard); the MoE reads
//! `M_i = R_i` (FarSkip) or `R_i + a_i` (standard); `S_{i+1} = R_i + a_i + s_i`. So with `g` the gradient of
//! `S_{i+1}`: attention's output gets `g` (FarSkip) or `g + ∂M` (standard, after the MoE's backward); the shared
//! expert gets `g`; `R_i` gets `g + ∂M (+ ∂a_in)`, which flows on to `S_i` and to every `r_k` that joined it —
//! whose own join backward runs when the walk reaches layer k. Equal to the single-rank gradients within float
//! rounding, at every skip depth.

use std::cell::{Cell, RefCell};

use burn::optim::GradientsParams;
use burn::prelude::*;
use farskip_model::Model;
use farskip_model::attention::ProjectedQkv;
use farskip_model::moe::Routing as ModelRouting;

use super::{
    EpTrainRank, Flatten, Leaves, Objective, PartialTape, RankStep, Result, absorb, bwd_ops, flat3,
    l2_compared_layers, leaf, seeded, visit_replicated_layer,
};
use crate::comm::{CollectiveTag, Communicator, Pending};
use crate::dispatch::{DispatchPlan, ExpertInputs, combine_start_traced};
use crate::plan::desc::{self, OpKey, Split, Step};
use crate::schedule::walk::{self, Attention, Exec, bad_step, out_of_order};
use crate::schedule::{Ctx, ScheduleError, ep_moe, ops};
use crate::trace::{HostSpans, Phase, Trace};

/// What the forward records of one layer.
#[derive(Default)]
struct Rec {
    attn_in: Option<Tensor<3>>,
    attn_out: Option<Tensor<3>>,
    norm_in: Option<Tensor<3>>,
    norm_out: Option<Tensor<2>>,
    router_in: Option<Tensor<2>>,
    slots: Option<Tensor<2>>,
    weights: Option<Tensor<2>>,
    slot_experts: Vec<usize>,
    shared_in: Option<Tensor<2>>,
    shared_out: Option<Tensor<2>>,
    expert_in: Option<Tensor<2>>,
    expert_out: Option<Tensor<2>>,
    /// The layers whose routed outputs joined `R_i`.
    from: Vec<usize>,
    /// `R_i` (KL + L2 compares `R_{i+1}`, layer i's full output, with the teacher's).
    r: Option<Tensor<3>>,
    /// The join of this layer's routed output: slot-output and weight leaves, and the routed output.
    join: Option<(Tensor<2>, Tensor<2>, Tensor<3>)>,
}

impl Rec {
    /// The layer's segments before its join, for the backward.
    fn part(&mut self, i: usize) -> Result<PartialTape> {
        let missing = |what: &str| {
            ScheduleError::Description(format!(
                "layer {i}: the forward recorded no {what} (its description skipped a step)"
            ))
        };
        let norm_out = self.norm_out.take().ok_or_else(|| missing("router"))?;
        Ok(PartialTape {
            attn_in: self.attn_in.take().ok_or_else(|| missing("attention"))?,
            attn_out: self.attn_out.take().ok_or_else(|| missing("attention"))?,
            norm_in: self.norm_in.take().ok_or_else(|| missing("router"))?,
            // Without a shared expert its backward reads nothing.
            shared_in: self.shared_in.take().unwrap_or_else(|| norm_out.clone()),
            norm_out,
            router_in: self.router_in.take().ok_or_else(|| missing("router"))?,
            slots: self.slots.take().ok_or_else(|| missing("router"))?,
            weights: self.weights.take().ok_or_else(|| missing("router"))?,
            shared_out: self.shared_out.take(),
            expert_in: self.expert_in.take().ok_or_else(|| missing("experts"))?,
            expert_out: self.expert_out.take().ok_or_else(|| missing("experts"))?,
            slot_experts: std::mem::take(&mut self.slot_experts),
        })
    }
}

/// The forward's [`Exec`]: expert parallelism with every segment input a fresh leaf, recorded per micro-batch
/// and layer.
struct Recorder<'a> {
    rank: &'a EpTrainRank,
    /// The micro-batch of the step being walked.
    micro: Cell<usize>,
    /// `recs[micro][layer]`.
    recs: RefCell<Vec<Vec<Rec>>>,
    emb: RefCell<Vec<Option<Tensor<3>>>>,
    final_from: RefCell<Vec<Vec<usize>>>,
}

/// A training MoE layer between its router and its combine.
struct TrainMoe {
    dims: [usize; 3],
    /// The normalised MoE input (the shared expert's input).
    x: Tensor<2>,
    weights: Tensor<2>,
    flight: ep_moe::Flight,
    shared: Option<Tensor<3>>,
}

/// A training combine in flight.
struct TrainRouted {
    combine: Pending<Tensor<2>>,
    weights: Tensor<2>,
    dims: [usize; 3],
}

impl Recorder<'_> {
    fn moe(&self, i: usize) -> &farskip_model::moe::MoeBlock {
        self.rank.moe(i)
    }

    /// Records into layer `i`'s record of the current micro-batch.
    fn rec<T>(&self, i: usize, f: impl FnOnce(&mut Rec) -> T) -> T {
        f(&mut self.recs.borrow_mut()[self.micro.get()][i])
    }
}

impl Exec for Recorder<'_> {
    type Attn = ProjectedQkv;
    type Moe = TrainMoe;
    type Routed = TrainRouted;
    type Waited = (Tensor<2>, Tensor<2>, [usize; 3]);
    const SPLIT: Split = Split::Expert;
    const JOIN_STEP: bool = true;

    fn model(&self) -> &Model {
        &self.rank.model
    }

    fn micro(&self, m: usize) {
        self.micro.set(m);
    }

    fn embed<C: Communicator + ?Sized>(&self, ctx: &Ctx<'_, C>, ids: Tensor<2, Int>) -> Tensor<3> {
        let emb = ctx.compute(None, ops::HEAD, || self.rank.model.embed(ids));
        let settled = emb.clone().detach();
        self.emb.borrow_mut()[self.micro.get()] = Some(emb);
        settled
    }

    fn formed_r(&self, at: Option<usize>, from: &[usize], r: &Tensor<3>) {
        match at {
            Some(i) => self.rec(i, |rec| {
                rec.from = from.to_vec();
                rec.r = Some(r.clone());
            }),
            None => self.final_from.borrow_mut()[self.micro.get()] = from.to_vec(),
        }
    }

    fn attn_1<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        i: usize,
        x: Tensor<3>,
        pos: walk::Pos<'_>,
    ) -> Result<ProjectedQkv> {
        let layer = &self.rank.model.layers[i];
        let (attn_in, qkv) = ctx.compute(Some(i), ops::ATTN_1, || {
            let attn_in = leaf(&x);
            let qkv = layer.attention.project(
                layer.input_norm.forward(attn_in.clone()),
                pos.offset,
                pos.cache,
            );
            (attn_in, qkv)
        });
        self.rec(i, |rec| rec.attn_in = Some(attn_in));
        Ok(qkv)
    }

    fn attn_step<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        qkv: ProjectedQkv,
        _pos: walk::Pos<'_>,
    ) -> Result<Attention<ProjectedQkv>> {
        let i = key.layer.unwrap_or_default();
        if key.op != ops::ATTN_2 {
            return Err(bad_step(
                key,
                "expert parallelism runs attention as attn_1, attn_2",
            ));
        }
        let layer = &self.rank.model.layers[i];
        let a = ctx.compute(Some(i), ops::ATTN_2, || layer.attention.attend(qkv));
        self.rec(i, |rec| rec.attn_out = Some(a.clone()));
        Ok(Attention::Done(a.detach()))
    }

    fn router<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        i: usize,
        m: Tensor<3>,
    ) -> Result<TrainMoe> {
        let layer = &self.rank.model.layers[i];
        let dims = m.dims();
        let (norm_in, norm_out, r) = ctx.compute(Some(i), ops::ROUTER, || {
            let norm_in = leaf(&m);
            let norm_out = flat3(layer.post_norm.forward(norm_in.clone()));
            let r = ep_moe::route(
                self.moe(i),
                &self.rank.sharding,
                None,
                i,
                &norm_out,
                &Leaves,
            );
            (norm_in, norm_out, r)
        });
        let moe = TrainMoe {
            dims,
            x: norm_out.clone(),
            weights: r.routing.weights.clone().detach(),
            flight: ep_moe::Flight::new(r.slots.clone().detach(), r.slot_experts.clone()),
            shared: None,
        };
        self.rec(i, |rec| {
            rec.norm_in = Some(norm_in);
            rec.norm_out = Some(norm_out);
            rec.router_in = Some(r.router_in);
            rec.slots = Some(r.slots);
            rec.weights = Some(r.routing.weights);
            rec.slot_experts = r.slot_experts;
        });
        Ok(moe)
    }

    fn moe_step<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        m: &mut TrainMoe,
    ) -> Result<()> {
        let i = key.layer.unwrap_or_default();
        match key.op {
            ops::EXPERTS => {
                let (inputs, plan) = m.flight.arrived(key)?;
                let (expert_in, expert_out) = ctx.compute(Some(i), ops::EXPERTS, || {
                    ep_moe::experts(self.moe(i), &inputs, &Leaves)
                });
                m.flight.set_expert_out(expert_out.clone().detach(), plan);
                self.rec(i, |rec| {
                    rec.expert_in = Some(expert_in);
                    rec.expert_out = Some(expert_out);
                });
            }
            ops::EXPERTS_1 => {
                let (inputs, plan) = m.flight.arrived(key)?;
                let (expert_in, parts) = ctx.compute(Some(i), ops::EXPERTS_1, || {
                    ep_moe::experts_first(self.moe(i), &inputs, &Leaves)
                });
                m.flight.set_first_part(parts, plan);
                self.rec(i, |rec| rec.expert_in = Some(expert_in));
            }
            ops::EXPERTS_2 => {
                let (parts, plan) = m.flight.first_part(key)?;
                let expert_out = ctx.compute(Some(i), ops::EXPERTS_2, || {
                    self.moe(i).experts.forward_grouped_rest(parts)
                });
                m.flight.set_expert_out(expert_out.clone().detach(), plan);
                self.rec(i, |rec| rec.expert_out = Some(expert_out));
            }
            ops::SHARED => {
                let [b, t, h] = m.dims;
                let (shared_in, shared_out) = ctx.compute(Some(i), ops::SHARED, || {
                    let shared_in = leaf(&m.x);
                    let shared_out = self.moe(i).shared(shared_in.clone());
                    (shared_in, shared_out)
                });
                m.shared = shared_out
                    .as_ref()
                    .map(|s| s.clone().detach().reshape([b, t, h]));
                self.rec(i, |rec| {
                    rec.shared_in = Some(shared_in);
                    rec.shared_out = shared_out;
                });
            }
            _ => return Err(bad_step(key, "is not an MoE step")),
        }
        Ok(())
    }

    fn dispatch_issue<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        m: &mut TrainMoe,
    ) -> Result<()> {
        m.flight.dispatch_issue(ctx, &self.rank.sharding, key)
    }

    fn dispatch_wait<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        key: &OpKey,
        m: &mut TrainMoe,
    ) -> Result<()> {
        m.flight.dispatch_wait(key)
    }

    fn take_shared(m: &mut TrainMoe) -> Option<Tensor<3>> {
        m.shared.take()
    }

    fn routed_issue<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        m: &mut TrainMoe,
    ) -> Result<TrainRouted> {
        Ok(TrainRouted {
            combine: m.flight.combine_issue(ctx, key)?,
            weights: m.weights.clone(),
            dims: m.dims,
        })
    }

    fn routed_wait<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        r: TrainRouted,
    ) -> Result<(Tensor<2>, Tensor<2>, [usize; 3])> {
        Ok((r.combine.wait()?, r.weights, r.dims))
    }

    fn join<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        k: usize,
        (slot_out, weights, dims): (Tensor<2>, Tensor<2>, [usize; 3]),
    ) -> Result<Tensor<3>> {
        let (y, w, routed) = ctx.compute(Some(k), ops::COMBINE, || {
            let (y, w) = (leaf(&slot_out), leaf(&weights));
            let routing = ModelRouting {
                weights: w.clone(),
                experts: Tensor::zeros([1, 1], &w.device()),
            };
            let routed = self.moe(k).combine_slots(y.clone(), &routing).reshape(dims);
            (y, w, routed)
        });
        self.rec(k, |rec| rec.join = Some((y, w, routed.clone())));
        Ok(routed.detach())
    }
}

/// One micro-batch's backward state: what its forward recorded and the gradients found so far.
struct MicroBwd {
    /// Its loss, until the head's backward runs.
    loss: Option<Tensor<1>>,
    /// The final stream's leaf.
    final_in: Tensor<3>,
    /// KL + L2: the compared full outputs' leaves.
    hidden_leaves: Vec<Tensor<3>>,
    /// The layers whose routed outputs joined the final stream.
    final_from: Vec<usize>,
    recs: Vec<Rec>,
    /// The embedding's output (with its graph).
    emb: Tensor<3>,
    /// Gradients of S_j (index j = 0..=layers), of the routed outputs, and of the compared full outputs.
    g_settled: Vec<Option<Tensor<3>>>,
    g_routed: Vec<Option<Tensor<3>>>,
    g_hidden: Vec<Option<Tensor<3>>>,
    st: Vec<Bwd>,
}

/// One layer's backward between the description's steps.
#[derive(Default)]
struct Bwd {
    part: Option<PartialTape>,
    g_y: Option<Tensor<2>>,
    g_w: Option<Tensor<2>>,
    to_owner: Option<Pending<(ExpertInputs, DispatchPlan)>>,
    arrived: Option<(ExpertInputs, DispatchPlan)>,
    /// The expert-input gradients and the plan they return by.
    pending_rows: Option<(Tensor<2>, DispatchPlan)>,
    back: Option<Pending<Tensor<2>>>,
    g_slots: Option<Tensor<2>>,
    g_shared_in: Option<Option<Tensor<2>>>,
    g_attn_in: Option<Tensor<3>>,
    g_norm_in: Option<Tensor<3>>,
    done: bool,
}

/// One micro-batch of a training step: its inputs and targets (`[batch, seq]`, checked), its objective (teacher
/// tensors cut to its rows) and the weight of its loss in the step's (its share of the batch).
pub(super) struct Micro {
    pub x_ids: Tensor<2, Int>,
    pub y_ids: Tensor<2, Int>,
    pub objective: Objective,
    pub weight: f64,
}

impl EpTrainRank {
    /// A training step on this rank's micro-batches, walking `schedule` forward and backward: the model's
    /// description ([`desc::training`]) on one micro-batch for [`EpTrainRank::step_on`], the two-micro-batch one
    /// ([`desc::training_tbo`]) on the halves of the batch for [`EpTrainRank::step_tbo_on`].
    pub(super) fn step_walk<C: Communicator + ?Sized, G: Communicator + ?Sized>(
        &self,
        comm: &C,
        grad_comm: &G,
        trace: &Trace,
        micro: Vec<Micro>,
        schedule: &desc::Schedule,
    ) -> Result<RankStep> {
        let conn = self.model.connectivity();
        let depth = desc::overlap_depth(conn);
        let micro_batches = micro.len();
        if depth > 1
            && micro
                .iter()
                .any(|m| matches!(m.objective, Objective::DistillHidden { .. }))
        {
            return Err(ScheduleError::Model(
                farskip_model::ModelError::InvalidInput(format!(
                    "the KL + L2 objective compares full residual streams, which expert-parallel training keeps \
                     at skip depth 1 only (got depth {depth})"
                )),
            ));
        }
        let farskip = depth > 0;
        let (fwd, bwd) = (Phase::Forward, Phase::Backward);
        let layers = self.model.layers.len();
        let ctx = Ctx {
            comm,
            trace,
            phase: fwd,
        };
        let rec = Recorder {
            rank: self,
            micro: Cell::new(0),
            recs: RefCell::new(
                (0..micro_batches)
                    .map(|_| (0..layers).map(|_| Rec::default()).collect())
                    .collect(),
            ),
            emb: RefCell::new(vec![None; micro_batches]),
            final_from: RefCell::new(vec![Vec::new(); micro_batches]),
        };

        // ---- forward: the description up to each micro-batch's head, where its loss is taken ----
        // Per micro-batch: the final stream's leaf, the loss, and (KL + L2) each compared layer's full output
        // R_{i+1} through a fresh leaf, whose gradient joins R_{i+1}'s when the backward forms it.
        let mut final_in: Vec<Option<Tensor<3>>> = vec![None; micro_batches];
        let mut loss: Vec<Option<Tensor<1>>> = vec![None; micro_batches];
        let mut hidden_leaves: Vec<Vec<Tensor<3>>> = vec![Vec::new(); micro_batches];
        let mut loss_value = 0.0;
        let inputs = micro.iter().map(|m| (m.x_ids.clone(), 0)).collect();
        let walked = walk::walk_forward(&rec, &ctx, &schedule.steps, inputs, |m, full| {
            let Micro {
                y_ids,
                objective,
                weight,
                ..
            } = &micro[m];
            let g = trace.compute(self.rank, None, ops::HEAD, fwd);
            let leaf_in = leaf(&full);
            let logits = self.model.logits(leaf_in.clone());
            let [b, t, v] = logits.dims();
            let logits = logits.reshape([b * t, v]);
            let l = match objective {
                Objective::CrossEntropy | Objective::Distill { .. } => {
                    self.logits_loss(objective, &logits, y_ids.clone())
                }
                Objective::DistillHidden {
                    teacher_hidden,
                    l2_weight,
                    ..
                } => {
                    let recs = rec.recs.borrow();
                    for i in 0..l2_compared_layers(layers) {
                        let out = match recs[m].get(i + 1) {
                            Some(next) => next.r.clone().ok_or_else(|| {
                                ScheduleError::Description(format!(
                                    "layer {}'s input stream was never formed",
                                    i + 1
                                ))
                            })?,
                            None => full.clone(),
                        };
                        hidden_leaves[m].push(leaf(&out));
                    }
                    let n_layers = hidden_leaves[m].len() as f64;
                    let mse = hidden_leaves[m]
                        .iter()
                        .zip(teacher_hidden)
                        .map(|(s, th)| (s.clone() - th.clone().detach()).square().mean())
                        .reduce(|acc, layer| acc + layer)
                        .map(|sum| sum.mul_scalar(1.0 / n_layers));
                    let kl = self.logits_loss(objective, &logits, y_ids.clone());
                    match mse {
                        Some(mse) => kl + mse.mul_scalar(*l2_weight / self.world as f64),
                        None => kl,
                    }
                }
            };
            let l = if *weight == 1.0 {
                l
            } else {
                l.mul_scalar(*weight)
            };
            loss_value += l.clone().into_scalar::<f64>();
            final_in[m] = Some(leaf_in);
            loss[m] = Some(l);
            g.finish();
            Ok(())
        })?;
        let Recorder {
            recs,
            emb,
            final_from,
            ..
        } = rec;
        let mut recs = recs.into_inner();
        let emb = emb
            .into_inner()
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ScheduleError::Description("the training description has no embedding".into())
            })?;
        let final_in = final_in
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ScheduleError::Description("the training description has no head".into())
            })?;
        let final_from = final_from.into_inner();

        // ---- backward: the rest of the description ----
        let model = &self.model;
        let span =
            |layer: Option<usize>, op: &'static str| trace.compute(self.rank, layer, op, bwd);
        // A micro-batch's exchanges are its own collectives (`combine_bwd.mb1`, …); the replicated gradients are
        // the whole batch's.
        let tag = |name: &'static str, layer: usize, m: usize| {
            let name = match (micro_batches, name) {
                (2, bwd_ops::COMBINE_BWD) => bwd_ops::COMBINE_BWD_MB[m % 2],
                (2, bwd_ops::DISPATCH_BWD) => bwd_ops::DISPATCH_BWD_MB[m % 2],
                _ => name,
            };
            CollectiveTag::new(name).at_layer(layer).in_phase(bwd)
        };
        let mut acc = GradientsParams::new();
        let mut per: Vec<MicroBwd> = loss
            .into_iter()
            .zip(final_in)
            .zip(hidden_leaves)
            .zip(final_from)
            .zip(recs.drain(..))
            .zip(emb)
            .map(
                |(((((loss, final_in), hidden_leaves), final_from), recs), emb)| MicroBwd {
                    loss,
                    final_in,
                    hidden_leaves,
                    final_from,
                    recs,
                    emb,
                    g_settled: vec![None; layers + 1],
                    g_routed: vec![None; layers],
                    g_hidden: vec![None; layers],
                    st: (0..layers).map(|_| Bwd::default()).collect(),
                },
            )
            .collect();
        let add = |slot: &mut Option<Tensor<3>>, g: Tensor<3>| {
            *slot = Some(match slot.take() {
                Some(x) => x + g,
                None => g,
            });
        };
        let mut pending_grads: Vec<(usize, Vec<bool>, Pending<Vec<f32>>)> = Vec::new();
        let next_g = |g_settled: &[Option<Tensor<3>>], key: &OpKey, i: usize| {
            g_settled[i + 1].clone().ok_or_else(|| {
                bad_step(
                    key,
                    "runs before the gradient of the layer's output is known",
                )
            })
        };
        for step in &schedule.steps[walked..] {
            let key = match step {
                Step::Compute(k) | Step::Issue { key: k, .. } | Step::Wait(k) => k,
            };
            let m = usize::from(key.micro);
            let Some(MicroBwd {
                loss,
                final_in,
                hidden_leaves,
                final_from,
                recs,
                emb,
                g_settled,
                g_routed,
                g_hidden,
                st,
            }) = per.get_mut(m)
            else {
                return Err(bad_step(
                    key,
                    &format!("micro-batch {m} of {micro_batches}"),
                ));
            };
            match step {
                Step::Compute(key) if key.op == bwd_ops::HEAD => {
                    let g = span(None, bwd_ops::HEAD);
                    if let Some(loss) = loss.take() {
                        let grads = loss.backward();
                        let mut g_full = final_in
                            .grad(&grads)
                            .expect("the final stream is a leaf")
                            .detach();
                        for (i, h) in hidden_leaves.iter().enumerate() {
                            g_hidden[i] = h.grad(&grads).map(|g| g.detach());
                        }
                        absorb(&mut acc, grads, model);
                        // The last layer's full output is the final stream itself.
                        if let Some(gh) = g_hidden[layers - 1].take() {
                            g_full = g_full + gh;
                        }
                        for &k in final_from.iter() {
                            add(&mut g_routed[k], g_full.clone());
                        }
                        g_settled[layers] = Some(g_full);
                    } else {
                        let g0 = g_settled[0].take().ok_or_else(|| {
                            bad_step(key, "the embedding's gradient is incomplete")
                        })?;
                        let grads = (flat3(emb.clone()) * flat3(g0)).sum().backward();
                        absorb(&mut acc, grads, model);
                    }
                    g.finish();
                }
                Step::Compute(key) => {
                    let i = key
                        .layer
                        .filter(|&i| i < layers)
                        .ok_or_else(|| bad_step(key, "names no layer of the model"))?;
                    if st[i].part.is_none() {
                        st[i].part = Some(recs[i].part(i)?);
                    }
                    let g = span(Some(i), key.op);
                    match key.op {
                        bwd_ops::JOIN => {
                            let (y, w, routed) = recs[i].join.take().ok_or_else(|| {
                                bad_step(key, "the layer's routed output was never joined")
                            })?;
                            let g_r = g_routed[i].take().ok_or_else(|| {
                                bad_step(key, "runs before every reader of the routed output")
                            })?;
                            let grads = seeded(vec![(flat3(routed), flat3(g_r))])
                                .expect("non-empty")
                                .backward();
                            st[i].g_y = y.grad(&grads);
                            st[i].g_w = w.grad(&grads);
                        }
                        bwd_ops::ATTN => {
                            let g_a = if farskip {
                                next_g(g_settled, key, i)?
                            } else {
                                // Standard: the MoE read R + a, so attention's output also gets ∂M.
                                let g_norm_in = st[i]
                                    .g_norm_in
                                    .clone()
                                    .ok_or_else(|| out_of_order(key, "the router's backward"))?;
                                next_g(g_settled, key, i)? + g_norm_in
                            };
                            let part = st[i].part.as_ref().expect("set above");
                            let grads = (part.attn_out.clone() * g_a).sum().backward();
                            st[i].g_attn_in = part.attn_in.grad(&grads);
                            absorb(&mut acc, grads, model);
                        }
                        bwd_ops::EXPERTS => {
                            let (rows, plan) = st[i]
                                .arrived
                                .take()
                                .ok_or_else(|| out_of_order(key, "the expert-output gradients"))?;
                            let part = st[i].part.as_ref().expect("set above");
                            let g_in = part.experts_backward(rows.tokens, &mut acc, model);
                            st[i].pending_rows = Some((g_in, plan));
                        }
                        bwd_ops::SHARED => {
                            let g_next = next_g(g_settled, key, i)?;
                            let part = st[i].part.as_ref().expect("set above");
                            st[i].g_shared_in =
                                Some(part.shared_backward(&g_next, &mut acc, model));
                        }
                        bwd_ops::ROUTER => {
                            let g_slots = st[i]
                                .g_slots
                                .take()
                                .ok_or_else(|| out_of_order(key, "the slot-row gradients"))?;
                            let g_w = st[i].g_w.take().ok_or_else(|| {
                                out_of_order(key, "the routing weights' gradient")
                            })?;
                            let g_shared_in = st[i].g_shared_in.take().flatten();
                            let part = st[i].part.as_ref().expect("set above");
                            st[i].g_norm_in = Some(part.router_backward(
                                g_slots,
                                g_w,
                                g_shared_in,
                                &mut acc,
                                model,
                            ));
                        }
                        _ => return Err(bad_step(key, "is not a backward step")),
                    }
                    g.finish();
                    // Once attention's and the MoE's backward are both done, R_i's gradient flows on to S_i and
                    // to the routed outputs that joined R_i.
                    let s = &mut st[i];
                    if !s.done
                        && let (Some(g_attn_in), Some(g_norm_in)) = (&s.g_attn_in, &s.g_norm_in)
                    {
                        s.done = true;
                        let g_next = next_g(g_settled, key, i)?;
                        let (mut g_r, g_s) = if farskip {
                            let g_r = g_next + g_norm_in.clone();
                            (g_r.clone(), Some(g_attn_in.clone()))
                        } else {
                            (g_next + g_norm_in.clone() + g_attn_in.clone(), None)
                        };
                        if i > 0
                            && let Some(gh) = g_hidden[i - 1].take()
                        {
                            g_r = g_r + gh;
                        }
                        for &k in &recs[i].from {
                            add(&mut g_routed[k], g_r.clone());
                        }
                        g_settled[i] = Some(match g_s {
                            Some(g_attn) => g_r + g_attn,
                            None => g_r,
                        });
                    }
                }
                Step::Issue { key, .. } => match (key.op, key.layer) {
                    (bwd_ops::COMBINE_BWD, Some(i)) if i < layers => {
                        let g_y = st[i]
                            .g_y
                            .take()
                            .ok_or_else(|| out_of_order(key, "the join's backward"))?;
                        let part = st[i].part.as_ref().expect("the join ran");
                        st[i].to_owner = Some(self.send_slots(
                            comm,
                            trace,
                            g_y,
                            &part.slot_experts,
                            tag(bwd_ops::COMBINE_BWD, i, m),
                        )?);
                    }
                    (bwd_ops::DISPATCH_BWD, Some(i)) if i < layers => {
                        let (g_in, plan) = st[i]
                            .pending_rows
                            .take()
                            .ok_or_else(|| out_of_order(key, "the experts' backward"))?;
                        st[i].back = Some(combine_start_traced(
                            comm,
                            g_in,
                            plan,
                            tag(bwd_ops::DISPATCH_BWD, i, m),
                            trace,
                        )?);
                    }
                    (bwd_ops::GRAD_ALLREDUCE, Some(i)) if i < layers => {
                        let tag = tag(bwd_ops::GRAD_ALLREDUCE, i, m);
                        let (buffer, present) = HostSpans::new(trace, self.rank, &tag).pack(|| {
                            let mut f = Flatten {
                                grads: &mut acc,
                                buffer: Vec::new(),
                                present: Vec::new(),
                            };
                            visit_replicated_layer(&model.layers[i], &mut f);
                            (f.buffer, f.present)
                        });
                        pending_grads.push((i, present, grad_comm.all_reduce(tag, buffer)));
                    }
                    (bwd_ops::GRAD_ALLREDUCE, None) => {
                        // The embedding/head all-reduce, then every layer's is waited for (the remaining
                        // waits of the description).
                        let device = emb.device().inner();
                        let pending = std::mem::take(&mut pending_grads);
                        self.reduce_replicated(grad_comm, trace, &mut acc, pending, device)?;
                    }
                    _ => return Err(bad_step(key, "is not a backward collective")),
                },
                Step::Wait(key) => match (key.op, key.layer) {
                    (bwd_ops::COMBINE_BWD, Some(i)) if i < layers => {
                        let p = st[i]
                            .to_owner
                            .take()
                            .ok_or_else(|| out_of_order(key, "the combine backward"))?;
                        st[i].arrived = Some(p.wait()?);
                    }
                    (bwd_ops::DISPATCH_BWD, Some(i)) if i < layers => {
                        let p = st[i]
                            .back
                            .take()
                            .ok_or_else(|| out_of_order(key, "the dispatch backward"))?;
                        st[i].g_slots = Some(p.wait()?);
                    }
                    (bwd_ops::GRAD_ALLREDUCE, Some(i)) => {
                        // The blocking baseline waits for each layer's all-reduce at once.
                        if let Some(at) = pending_grads.iter().position(|(l, _, _)| *l == i) {
                            let (l, present, p) = pending_grads.remove(at);
                            let op = p.op().to_owned();
                            pending_grads.insert(at, (l, present, Pending::ready(op, p.wait())));
                        }
                    }
                    // Waited for by the outer all-reduce's issue.
                    (bwd_ops::GRAD_ALLREDUCE, None) => {}
                    _ => return Err(bad_step(key, "is not a backward collective")),
                },
            }
        }
        Ok(RankStep {
            loss: loss_value,
            grads: acc,
        })
    }
}
