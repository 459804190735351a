//! Expert-parallel training with overlapped forward and backward communication.
//!
//! The all-to-alls cut the autodiff graph (rows travel through host buffers), so every rank runs its part of the
//! step as small graphs ("segments") whose inputs are fresh leaves, and backpropagates them one by one with the
//! gradient of their outputs as seed — the Rust counterpart of the paper's custom autograd functions and hooks.
//! Per MoE layer k (FarSkip, converted):
//!
//! - forward: attention part 1 on A_k → wait Combine(k−1) → join → norm + router → async Dispatch(k) →
//!   attention part 2 → wait → routed experts (on their owner) → async Combine(k) → shared experts;
//! - backward: join → async exchange of the expert-output gradients (the backward of Combine, dispatch-shaped)
//!   hidden behind attention's backward → experts' backward on the owner → async return of the input gradients
//!   (the backward of Dispatch, combine-shaped) hidden behind the shared expert's backward → router and norm.
//!   Expert gradients stay on their owner; the replicated gradients of each layer are all-reduced
//!   asynchronously as soon as they are complete, hidden behind the backward of the layers below.
//!
//! Standard connectivity runs the same segments in the stock order with every collective waited for at once
//! (the blocking baseline). At skip depth d ≥ 2 up to d combines stay in flight (the private `deep` module). Gradients equal
//! single-rank training up to float rounding.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Gradients;
use farskip_model::model::Ffn;
use farskip_model::moe::{MoeBlock, Routing as ModelRouting};
use farskip_model::{Connectivity, DecoderLayer, Model};

use crate::comm::{CollectiveTag, CommError, Communicator, Pending};
use crate::dispatch::{DispatchPlan, ExpertSharding, Routing, combine_start, dispatch_start};
use crate::schedule::{Combine, Result, ScheduleError, ep_moe, ops};
use crate::trace::{Phase, Trace};

mod deep;
mod tbo;

/// Names of the backward intervals in traces.
pub mod bwd_ops {
    /// Join (residual adds and the weighted combine).
    pub const JOIN: &str = "join_bwd";
    /// Attention backward.
    pub const ATTN: &str = "attn_bwd";
    /// Shared expert backward.
    pub const SHARED: &str = "shared_bwd";
    /// Routed experts backward (on the owner).
    pub const EXPERTS: &str = "experts_bwd";
    /// Router, slot gather and norm backward.
    pub const ROUTER: &str = "router_bwd";
    /// LM head, final norm, loss and embedding backward.
    pub const HEAD: &str = "head_bwd";
    /// Gradient exchange: backward of Combine (expert-output gradients to the owners).
    pub const COMBINE_BWD: &str = "combine_bwd";
    /// Gradient exchange: backward of Dispatch (expert-input gradients back to the tokens' ranks).
    pub const DISPATCH_BWD: &str = "dispatch_bwd";
    /// All-reduce of replicated gradients.
    pub const GRAD_ALLREDUCE: &str = "grad_allreduce";
    /// Two-micro-batch overlap: the backward of half 0's / half 1's Combine (each half of [`COMBINE_BWD`]).
    pub const COMBINE_BWD_MB: [&str; 2] = ["combine_bwd.mb0", "combine_bwd.mb1"];
    /// Two-micro-batch overlap: the backward of half 0's / half 1's Dispatch (each half of [`DISPATCH_BWD`]).
    pub const DISPATCH_BWD_MB: [&str; 2] = ["dispatch_bwd.mb0", "dispatch_bwd.mb1"];
}

/// How many layers' output streams the KL + L2 baseline compares with the teacher's: the intermediate ones,
/// every layer but the last (the last layer's output is what the KL term already matches through the head);
/// all of them for a one-layer model.
pub fn l2_compared_layers(num_layers: usize) -> usize {
    if num_layers > 1 {
        num_layers - 1
    } else {
        num_layers
    }
}

/// A fresh autodiff leaf holding `t`'s value: the input of a segment.
fn leaf<const D: usize>(t: &Tensor<D>) -> Tensor<D> {
    t.clone().detach().autodiff().require_grad()
}

/// Training's [`ep_moe::Cut`]: every input of a segment is a fresh autodiff leaf.
struct Leaves;

impl ep_moe::Cut for Leaves {
    fn cut(&self, t: &Tensor<2>) -> Tensor<2> {
        leaf(t)
    }
}

/// `Σ outputs · seeds`: backpropagating it gives the vector-Jacobian product of a segment.
fn seeded(pairs: Vec<(Tensor<2>, Tensor<2>)>) -> Option<Tensor<1>> {
    pairs
        .into_iter()
        .map(|(out, seed)| (out * seed).sum())
        .reduce(|a, b| a + b)
}

/// `pending` itself, or — when `blocking` — the collective already waited for (its result, or its error, is
/// what the later `wait` returns), so nothing overlaps it.
fn settled<T: Send + 'static>(pending: Pending<T>, blocking: bool) -> Pending<T> {
    if blocking {
        let op = pending.op().to_owned();
        Pending::ready(op, pending.wait())
    } else {
        pending
    }
}

fn flat3(x: Tensor<3>) -> Tensor<2> {
    let [b, t, h] = x.dims();
    x.reshape([b * t, h])
}

impl PartialTape {
    /// Backward of the routed experts on their owner: the gradient of the expert input rows from that of the
    /// output rows (`g_out`, `[received rows, hidden]`); the expert weights' gradients go into `acc`.
    fn experts_backward(
        &self,
        g_out: Tensor<2>,
        acc: &mut GradientsParams,
        model: &Model,
    ) -> Tensor<2> {
        if self.expert_in.dims()[0] == 0 {
            // No rows reached this rank's experts in this layer: nothing to differentiate (their weights get no
            // gradient from this layer), and an empty product has no graph to walk.
            return Tensor::zeros(self.expert_in.dims(), &self.expert_in.device().inner());
        }
        let grads = (self.expert_out.clone() * g_out).sum().backward();
        let g = self.expert_in.grad(&grads).expect("leaf");
        absorb(acc, grads, model);
        g
    }

    /// Backward of the shared expert from its output's gradient (`[batch, seq, hidden]`): the gradient of its
    /// input (`None` without a shared expert).
    fn shared_backward(
        &self,
        g_out: &Tensor<3>,
        acc: &mut GradientsParams,
        model: &Model,
    ) -> Option<Tensor<2>> {
        let out = self.shared_out.as_ref()?;
        let grads = (out.clone() * flat3(g_out.clone())).sum().backward();
        let g = self.shared_in.grad(&grads);
        absorb(acc, grads, model);
        g
    }

    /// Backward of the router, the slot gather and the MoE's input norm, from the gradients of the slot rows,
    /// of the routing weights and of the shared expert's input: the gradient of the stream the MoE read.
    fn router_backward(
        &self,
        g_slots: Tensor<2>,
        g_weights: Tensor<2>,
        g_shared_in: Option<Tensor<2>>,
        acc: &mut GradientsParams,
        model: &Model,
    ) -> Tensor<3> {
        let grads = seeded(vec![
            (self.slots.clone(), g_slots),
            (self.weights.clone(), g_weights),
        ])
        .expect("non-empty")
        .backward();
        let g_router_in = self.router_in.grad(&grads).expect("leaf");
        absorb(acc, grads, model);
        let g_m = match g_shared_in {
            Some(a) => a + g_router_in,
            None => g_router_in,
        };
        let grads = (self.norm_out.clone() * g_m).sum().backward();
        let g_norm_in = self.norm_in.grad(&grads).expect("leaf");
        absorb(acc, grads, model);
        g_norm_in
    }
}

/// One rank of expert-parallel training: replicated non-expert weights, a block of each layer's experts.
pub struct EpTrainRank {
    model: Model,
    sharding: ExpertSharding,
    rank: usize,
    world: usize,
}

/// The forward record of one MoE layer, kept for its backward: the segments before the combine, then the join.
struct LayerTape {
    part: PartialTape,
    /// Join segment leaves and outputs.
    join_residual: Tensor<3>,
    join_attn: Tensor<3>,
    join_shared: Option<Tensor<3>>,
    join_slots: Tensor<2>,
    join_weights: Tensor<2>,
    join_full: Tensor<3>,
    join_routed_free: Tensor<3>,
}

/// What a layer's forward leaves pending for the next one.
struct Inflight {
    combine: Combine,
    residual: Tensor<3>,
    attn: Tensor<3>,
    shared: Option<Tensor<2>>,
    weights: Tensor<2>,
    tape: PartialTape,
}

/// Adds one segment's parameter gradients into `acc`.
fn absorb(acc: &mut GradientsParams, grads: Gradients, model: &Model) {
    let gp = GradientsParams::from_grads(grads, model);
    merge(acc, gp, model);
}

/// A tape without its join segment yet.
struct PartialTape {
    attn_in: Tensor<3>,
    attn_out: Tensor<3>,
    norm_in: Tensor<3>,
    norm_out: Tensor<2>,
    router_in: Tensor<2>,
    slots: Tensor<2>,
    weights: Tensor<2>,
    shared_in: Tensor<2>,
    shared_out: Option<Tensor<2>>,
    expert_in: Tensor<2>,
    expert_out: Tensor<2>,
    slot_experts: Vec<usize>,
}

/// An MoE layer's forward up to its dispatch (in flight), kept for [`EpTrainRank::moe_end`].
struct MoeBegun {
    norm_in: Tensor<3>,
    norm_out: Tensor<2>,
    router_in: Tensor<2>,
    slots: Tensor<2>,
    weights: Tensor<2>,
    slot_experts: Vec<usize>,
    dispatched: Pending<(crate::dispatch::ExpertInputs, DispatchPlan)>,
}

/// The result of one rank's step.
pub struct RankStep {
    /// This rank's share of the loss (`local mean / world`); the sum over ranks is the global mean loss.
    pub loss: f64,
    /// Gradients of every parameter this rank holds: replicated ones already all-reduced (global), expert ones
    /// summed over every rank's tokens.
    pub grads: GradientsParams,
}

/// The loss a rank's step minimises. Every variant is a mean over all ranks' tokens: each rank scales its local
/// mean by `1 / world`, so every rank must hold the same number of tokens.
#[derive(Clone, Debug)]
pub enum Objective {
    /// Next-token cross-entropy on the windows (pre-training, SFT).
    CrossEntropy,
    /// FCSD: `T² · KL(softmax(teacher/T) ‖ softmax(student/T))`, mean over tokens — the same arithmetic as
    /// `farskip_train::losses::kl_distill`.
    Distill {
        /// The frozen teacher's logits on this rank's windows, `[batch, seq, vocab]` (any device; no gradient).
        teacher_logits: Tensor<3>,
        /// Softmax temperature, finite and > 0.
        temperature: f64,
    },
    /// The KL + L2 baseline: [`Objective::Distill`] plus `l2_weight ·` the mean over the intermediate layers
    /// ([`l2_compared_layers`]) of the mean squared difference between the student's and the teacher's full
    /// residual stream after the layer (the same arithmetic as `farskip_train::losses::kl_l2`).
    DistillHidden {
        /// The frozen teacher's logits on this rank's windows, `[batch, seq, vocab]`.
        teacher_logits: Tensor<3>,
        /// The teacher's full residual stream after every layer, `[batch, seq, hidden]` each.
        teacher_hidden: Vec<Tensor<3>>,
        /// Softmax temperature, finite and > 0.
        temperature: f64,
        /// Weight of the hidden-state term, finite and ≥ 0.
        l2_weight: f64,
    },
}

impl Objective {
    /// Checks the teacher tensors against this rank's `[batch, seq]` tokens, `vocab`, `hidden` and `layers`.
    fn check(&self, tokens: [usize; 2], vocab: usize, hidden: usize, layers: usize) -> Result<()> {
        let bad = |m: String| {
            Err(ScheduleError::Model(
                farskip_model::ModelError::InvalidInput(m),
            ))
        };
        let [b, t] = tokens;
        let (logits, temperature) = match self {
            Self::CrossEntropy => return Ok(()),
            Self::Distill {
                teacher_logits,
                temperature,
            } => (teacher_logits, *temperature),
            Self::DistillHidden {
                teacher_logits,
                teacher_hidden,
                temperature,
                l2_weight,
            } => {
                if !(l2_weight.is_finite() && *l2_weight >= 0.0) {
                    return bad(format!(
                        "distillation l2_weight must be finite and >= 0, got {l2_weight}"
                    ));
                }
                if teacher_hidden.len() != layers {
                    return bad(format!(
                        "teacher_hidden has {} layers but the student has {layers}",
                        teacher_hidden.len()
                    ));
                }
                for (i, h) in teacher_hidden.iter().enumerate() {
                    if h.dims() != [b, t, hidden] {
                        return bad(format!(
                            "teacher_hidden[{i}] has shape {:?} but this rank's student stream is {:?}",
                            h.dims(),
                            [b, t, hidden]
                        ));
                    }
                }
                (teacher_logits, *temperature)
            }
        };
        if !(temperature.is_finite() && temperature > 0.0) {
            return bad(format!(
                "distillation temperature must be finite and > 0, got {temperature}"
            ));
        }
        if logits.dims() != [b, t, vocab] {
            return bad(format!(
                "teacher_logits has shape {:?} but this rank's student logits are {:?}",
                logits.dims(),
                [b, t, vocab]
            ));
        }
        Ok(())
    }
}

/// This rank's share of the distillation loss: `T² · Σ_tokens KL(teacher ‖ student) / (tokens · world)`.
///
/// The arithmetic is `farskip_train::losses::kl_distill`'s (log-softmax of the logits times `1/T`, the KL summed
/// over every element), with its final scale `T² / tokens` replaced by `T² / (tokens · world)`: with equal tokens
/// per rank, that is the single-rank scale `T² / global tokens` and the sum over ranks is the global mean.
///
/// # Shapes
/// - `student_logits`, `teacher_logits`: `[tokens, vocab]` (the teacher is detached)
/// - output: `[1]`
///
/// # Panics
/// If the shapes differ, there are no tokens, `world` is 0 or `temperature` is not finite and positive
/// ([`EpTrainRank::step_with`] checks its [`Objective`] first and returns an error instead).
pub fn distill_loss(
    student_logits: Tensor<2>,
    teacher_logits: Tensor<2>,
    temperature: f64,
    world: usize,
) -> Tensor<1> {
    assert!(
        student_logits.dims() == teacher_logits.dims() && student_logits.dims()[0] > 0,
        "distill_loss: student logits {:?} and teacher logits {:?} must have the same non-empty shape",
        student_logits.dims(),
        teacher_logits.dims()
    );
    assert!(
        temperature.is_finite() && temperature > 0.0 && world > 0,
        "distill_loss: temperature must be finite and > 0 (got {temperature}) and world > 0 (got {world})"
    );
    let n_tokens = student_logits.dims()[0] as f64;
    let log_p_teacher = burn::tensor::activation::log_softmax(
        teacher_logits.detach().mul_scalar(1.0 / temperature),
        1,
    );
    let log_p_student =
        burn::tensor::activation::log_softmax(student_logits.mul_scalar(1.0 / temperature), 1);
    (log_p_teacher.clone().exp() * (log_p_teacher - log_p_student))
        .sum()
        .mul_scalar(temperature * temperature / (n_tokens * world as f64))
}

/// Collects `(id, dims)` of the float parameters a module holds, in visit order.
#[derive(Default)]
struct ParamList(Vec<(ParamId, Vec<usize>)>);

impl ModuleVisitor for ParamList {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push((param.id, param.dims().to_vec()));
    }
}

/// Moves gradients of listed parameters between `GradientsParams` and a flat buffer.
struct Flatten<'a> {
    grads: &'a mut GradientsParams,
    buffer: Vec<f32>,
    /// Which parameters had a gradient (the others, e.g. a non-trainable bias, get none back).
    present: Vec<bool>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n: usize = param.dims().iter().product();
        self.present.push(self.grads.get::<D>(param.id).is_some());
        match self.grads.remove::<D>(param.id) {
            Some(g) => self.buffer.extend(
                g.into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap_or_else(|_| vec![0.0; n]),
            ),
            None => self.buffer.extend(std::iter::repeat_n(0.0, n)),
        }
    }
}

struct Unflatten<'a> {
    grads: &'a mut GradientsParams,
    buffer: &'a [f32],
    present: &'a [bool],
    index: usize,
    offset: usize,
    device: Device,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let dims = param.dims();
        let n: usize = dims.iter().product();
        let v = self.buffer[self.offset..self.offset + n].to_vec();
        self.offset += n;
        let present = self.present.get(self.index).copied().unwrap_or(false);
        self.index += 1;
        if present {
            self.grads.register::<D>(
                param.id,
                Tensor::from_data(TensorData::new(v, dims), &self.device),
            );
        }
    }
}

/// The replicated (non-expert) parameters of a layer, visited in a fixed order.
fn visit_replicated_layer<V: ModuleVisitor>(layer: &DecoderLayer, v: &mut V) {
    layer.input_norm.visit(v);
    layer.attention.visit(v);
    layer.post_norm.visit(v);
    match &layer.ffn {
        Ffn::Dense(m) => m.visit(v),
        Ffn::Moe(moe) => {
            moe.router.visit(v);
            if let Some(s) = &moe.shared {
                s.visit(v);
            }
        }
    }
}

fn visit_replicated_outer<V: ModuleVisitor>(model: &Model, v: &mut V) {
    model.embed.visit(v);
    model.norm.visit(v);
    if let Some(h) = &model.lm_head {
        h.visit(v);
    }
}

impl EpTrainRank {
    /// Rank `rank` of `world` of a model with every layer MoE, on the autodiff device.
    pub fn new(model: &Model, rank: usize, world: usize) -> Result<Self> {
        let moe = model.config().moe.as_ref().ok_or_else(|| {
            ScheduleError::Model(farskip_model::ModelError::InvalidInput(
                "expert-parallel training needs an MoE model".into(),
            ))
        })?;
        if model.layers.iter().any(|l| !matches!(l.ffn, Ffn::Moe(_))) {
            return Err(ScheduleError::Model(
                farskip_model::ModelError::InvalidInput(
                    "the EP training schedule supports models whose every layer is MoE".into(),
                ),
            ));
        }
        match model.connectivity() {
            Connectivity::Standard => {}
            Connectivity::FarSkip(f)
                if f.start == 0
                    && f.end.is_none()
                    && f.variant == farskip_model::FarSkipVariant::Full => {}
            other => {
                return Err(ScheduleError::Model(
                    farskip_model::ModelError::InvalidInput(format!(
                        "the EP training schedule supports standard or all-layer FarSkip connectivity, not {other}"
                    )),
                ));
            }
        }
        let sharding = ExpertSharding::new(moe.num_experts, world)?;
        let device = model
            .devices()
            .first()
            .cloned()
            .unwrap_or_else(Device::flex);
        let mut model = model.valid();
        for layer in model.layers.iter_mut() {
            if let Ffn::Moe(moe) = &mut layer.ffn {
                moe.experts = moe.experts.slice(sharding.local_range(rank));
            }
        }
        let model = model.train().fork(&device.inner().autodiff());
        Ok(Self {
            model,
            sharding,
            rank,
            world,
        })
    }

    /// This rank's model (replicated weights and its experts).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Replaces this rank's model (after an optimizer step).
    pub fn set_model(&mut self, model: Model) {
        self.model = model;
    }

    /// Replaces this rank's model by `f(model)` (an optimizer step), without keeping a second handle on the
    /// weights alive (so an in-place optimizer does not have to copy them).
    pub fn map_model(self, f: impl FnOnce(Model) -> Model) -> Self {
        Self {
            model: f(self.model),
            ..self
        }
    }

    /// This rank's block of each MoE layer's experts (global expert ids).
    pub fn local_experts(&self) -> std::ops::Range<usize> {
        self.sharding.local_range(self.rank)
    }

    /// One forward + backward on this rank's token windows `[batch, seq + 1]` (cross-entropy; the loss is the
    /// mean over all ranks' tokens, so every rank must hold the same number of tokens).
    pub fn step<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        windows: Tensor<2, Int>,
    ) -> Result<RankStep> {
        self.step_with(comm, trace, windows, &Objective::CrossEntropy)
    }

    /// [`EpTrainRank::step`] with another loss: cross-entropy, FCSD's KL to a teacher, or KL + L2 on the hidden
    /// states. The teacher tensors of `objective` hold this rank's rows; a shape that does not fit is an error.
    pub fn step_with<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        windows: Tensor<2, Int>,
        objective: &Objective,
    ) -> Result<RankStep> {
        self.step_on(comm, comm, trace, windows, objective)
    }

    /// [`EpTrainRank::step_with`] with the replicated-gradient all-reduces on their own communicator
    /// `grad_comm` (a second stream, like a data-parallel process group next to the expert-parallel one),
    /// so a long gradient all-reduce does not hold back the next layer's all-to-all queued behind it.
    /// `grad_comm` must span the same ranks in the same order as `comm`.
    pub fn step_on<C: Communicator + ?Sized, G: Communicator + ?Sized>(
        &self,
        comm: &C,
        grad_comm: &G,
        trace: &Trace,
        windows: Tensor<2, Int>,
        objective: &Objective,
    ) -> Result<RankStep> {
        if grad_comm.rank() != comm.rank() || grad_comm.world_size() != comm.world_size() {
            return Err(ScheduleError::Comm(CommError::InvalidArgument(format!(
                "the gradient communicator is rank {} of {} but the expert-parallel one is rank {} of {}",
                grad_comm.rank(),
                grad_comm.world_size(),
                comm.rank(),
                comm.world_size()
            ))));
        }
        let farskip = self.model.connectivity().keeps_routed_free_stream();
        // Standard connectivity is the blocking baseline: every collective is waited for as soon as it is issued.
        let blocking = !farskip;
        let fwd = Phase::Forward;
        let bwd = Phase::Backward;
        let rank = self.rank;
        let span = |layer: Option<usize>, op: &'static str, phase: Phase| {
            trace.compute(rank, layer, op, phase)
        };
        let tag = |name: &'static str, layer: usize, phase: Phase| {
            CollectiveTag::new(name).at_layer(layer).in_phase(phase)
        };
        let [b, t1] = windows.dims();
        if t1 < 2 || b == 0 {
            return Err(ScheduleError::Model(
                farskip_model::ModelError::InvalidInput(format!(
                    "training windows must be [batch >= 1, seq + 1 >= 2], got [{b}, {t1}]"
                )),
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
        if let Some(depth) = self.model.connectivity().depth().filter(|&d| d > 1) {
            return self.step_deep(comm, grad_comm, trace, x_ids, y_ids, objective, depth);
        }

        // ---- forward ----
        let g = span(None, ops::HEAD, fwd);
        let emb = self.model.embed(x_ids);
        let h0 = emb.clone().detach();
        g.finish();
        let mut full = h0.clone();
        let mut routed_free = h0.clone();
        let mut inflight: Option<(usize, Inflight)> = None;
        let mut tapes: Vec<LayerTape> = Vec::with_capacity(self.model.layers.len());
        let join =
            |i: usize, p: Inflight, tapes: &mut Vec<LayerTape>| -> Result<(Tensor<3>, Tensor<3>)> {
                let slot_out = p.combine.wait(comm)?;
                let gj = span(Some(i), ops::COMBINE, fwd);
                let moe = self.moe(i);
                let shape = p.residual.dims();
                let (r, a, s, y, w) = (
                    leaf(&p.residual),
                    leaf(&p.attn),
                    p.shared.as_ref().map(|s| leaf(&s.clone().reshape(shape))),
                    leaf(&slot_out),
                    leaf(&p.weights),
                );
                let routing = ModelRouting {
                    weights: w.clone(),
                    experts: Tensor::zeros([1, 1], &w.device()),
                };
                let routed = moe.combine_slots(y.clone(), &routing).reshape(shape);
                let post_attention = r.clone() + a.clone();
                let (next_full, next_rf) = match &s {
                    Some(s) => (
                        post_attention.clone() + (routed + s.clone()),
                        post_attention + s.clone(),
                    ),
                    None => (post_attention.clone() + routed, post_attention),
                };
                tapes.push(LayerTape {
                    part: p.tape,
                    join_residual: r,
                    join_attn: a,
                    join_shared: s,
                    join_slots: y,
                    join_weights: w,
                    join_full: next_full.clone(),
                    join_routed_free: next_rf.clone(),
                });
                gj.finish();
                Ok((next_full.detach(), next_rf.detach()))
            };
        for (i, layer) in self.model.layers.iter().enumerate() {
            // Attention part 1 reads A (FarSkip) — known while the previous combine is in flight.
            let g = span(Some(i), ops::ATTN_1, fwd);
            let attn_in = leaf(if farskip { &routed_free } else { &full });
            let qkv = layer
                .attention
                .project(layer.input_norm.forward(attn_in.clone()), 0, None);
            g.finish();
            if let Some((k, p)) = inflight.take() {
                // The routed-free stream was already formed from the same values at the end of layer k.
                let (f, _) = join(k, p, &mut tapes)?;
                full = f;
            }
            let (attn_out, norm_src) = if farskip {
                // MoE reads the pre-attention stream R: route and dispatch before attention part 2.
                (None, full.clone())
            } else {
                let g = span(Some(i), ops::ATTN_2, fwd);
                let a = layer.attention.attend(qkv.clone());
                g.finish();
                let post = full.clone() + a.clone().detach();
                (Some(a), post)
            };
            let (tape, combine) = self.moe_forward(
                comm,
                trace,
                i,
                &norm_src,
                attn_in,
                || match attn_out {
                    Some(a) => Ok(a),
                    None => {
                        let g = span(Some(i), ops::ATTN_2, fwd);
                        let a = layer.attention.attend(qkv);
                        g.finish();
                        Ok(a)
                    }
                },
                blocking,
                false,
            )?;
            // The join adds the MoE output to the stream the MoE read: R (FarSkip: `norm_src` is R) plus
            // attention's output, or the post-attention stream R' (stock: `norm_src` is R' and `attn` zero).
            let p = Inflight {
                combine,
                residual: norm_src,
                attn: if farskip {
                    tape.attn_out.clone().detach()
                } else {
                    Tensor::zeros(full.dims(), &full.device())
                },
                shared: tape.shared_out.clone().map(|s| s.detach()),
                weights: tape.weights.clone().detach(),
                tape,
            };
            if farskip {
                // A_{k+1} = (R + a) + s is known now, before the combine returns (same ops as the join).
                let post_attention = p.residual.clone() + p.attn.clone();
                routed_free = match &p.shared {
                    Some(s) => post_attention + s.clone().reshape(full.dims()),
                    None => post_attention,
                };
                inflight = Some((i, p));
            } else {
                let (f, rf) = join(i, p, &mut tapes)?;
                full = f;
                routed_free = rf;
            }
        }
        if let Some((k, p)) = inflight.take() {
            let (f, _) = join(k, p, &mut tapes)?;
            full = f;
        }
        let g = span(None, ops::HEAD, fwd);
        let final_in = leaf(&full);
        let logits = self.model.logits(final_in.clone());
        let [_, _, v] = logits.dims();
        let logits = logits.reshape([b * t, v]);
        // KL + L2: the hidden-state term reads each layer's full output stream through a fresh leaf, whose
        // gradient joins the stream's gradient when the backward reaches that layer.
        let mut hidden_leaves: Vec<Tensor<3>> = Vec::new();
        let loss = match objective {
            Objective::CrossEntropy | Objective::Distill { .. } => {
                self.logits_loss(objective, &logits, y_ids)
            }
            Objective::DistillHidden {
                teacher_hidden,
                l2_weight,
                ..
            } => {
                hidden_leaves = tapes[..l2_compared_layers(tapes.len())]
                    .iter()
                    .map(|tape| leaf(&tape.join_full))
                    .collect();
                let n_layers = hidden_leaves.len() as f64;
                let mse = hidden_leaves
                    .iter()
                    .zip(teacher_hidden)
                    .map(|(s, th)| (s.clone() - th.clone().detach()).square().mean())
                    .reduce(|acc, layer| acc + layer)
                    .map(|sum| sum.mul_scalar(1.0 / n_layers));
                let kl = self.logits_loss(objective, &logits, y_ids);
                match mse {
                    Some(mse) => kl + mse.mul_scalar(*l2_weight / self.world as f64),
                    None => kl,
                }
            }
        };
        let loss_value = loss.clone().into_scalar::<f64>();
        g.finish();

        // ---- backward ----
        let mut acc = GradientsParams::new();
        let absorb = |acc: &mut GradientsParams, grads: Gradients| absorb(acc, grads, &self.model);
        let g = span(None, bwd_ops::HEAD, bwd);
        let grads = loss.backward();
        let mut g_full = final_in
            .grad(&grads)
            .expect("final stream is a leaf")
            .detach();
        let mut g_hidden: Vec<Option<Tensor<3>>> =
            hidden_leaves.iter().map(|h| h.grad(&grads)).collect();
        absorb(&mut acc, grads);
        g.finish();
        let mut g_rf: Option<Tensor<3>> = None;
        let mut pending_grads: Vec<(usize, Vec<bool>, Pending<Vec<f32>>)> = Vec::new();
        for (i, tape) in tapes.into_iter().enumerate().rev() {
            let layer = &self.model.layers[i];
            if let Some(gh) = g_hidden.get_mut(i).and_then(Option::take) {
                // KL + L2: this layer's output stream also fed the hidden-state term.
                g_full = g_full + gh;
            }
            // Join: seeds are the gradients of the streams it produced.
            let gj = span(Some(i), bwd_ops::JOIN, bwd);
            let mut seed = vec![(flat3(tape.join_full.clone()), flat3(g_full.clone()))];
            if let Some(grf) = &g_rf {
                seed.push((flat3(tape.join_routed_free.clone()), flat3(grf.clone())));
            }
            let grads = seeded(seed).expect("non-empty").backward();
            let g_res = tape.join_residual.grad(&grads).expect("leaf");
            let g_attn = tape.join_attn.grad(&grads).expect("leaf");
            let g_shared = tape.join_shared.as_ref().and_then(|s| s.grad(&grads));
            let g_y = tape.join_slots.grad(&grads).expect("leaf");
            let g_w = tape.join_weights.grad(&grads).expect("leaf");
            gj.finish();
            // Backward of Combine: expert-output gradients travel to the experts' owners.
            let to_owner = self.send_slots(
                comm,
                g_y,
                &tape.part.slot_experts,
                tag(bwd_ops::COMBINE_BWD, i, bwd),
            )?;
            let g_attn_in;
            let mut g_norm_src_extra: Option<Tensor<3>> = None;
            if farskip {
                // Attention's backward hides the exchange.
                let ga = span(Some(i), bwd_ops::ATTN, bwd);
                let grads = (tape.part.attn_out.clone() * g_attn.clone())
                    .sum()
                    .backward();
                g_attn_in = tape.part.attn_in.grad(&grads).expect("leaf");
                absorb(&mut acc, grads);
                ga.finish();
            } else {
                g_attn_in = Tensor::zeros(g_res.dims(), &g_res.device());
            }
            let (g_rows, back_plan) = to_owner.wait()?;
            let ge = span(Some(i), bwd_ops::EXPERTS, bwd);
            let g_expert_in = tape
                .part
                .experts_backward(g_rows.tokens, &mut acc, &self.model);
            ge.finish();
            // Backward of Dispatch: input gradients return to the tokens' ranks.
            let back = settled(
                combine_start(
                    comm,
                    g_expert_in,
                    back_plan,
                    tag(bwd_ops::DISPATCH_BWD, i, bwd),
                )?,
                blocking,
            );
            let gs = span(Some(i), bwd_ops::SHARED, bwd);
            let g_m = g_shared
                .as_ref()
                .and_then(|g| tape.part.shared_backward(g, &mut acc, &self.model));
            gs.finish();
            let g_slots = back.wait()?;
            let gr = span(Some(i), bwd_ops::ROUTER, bwd);
            let g_norm_in = tape
                .part
                .router_backward(g_slots, g_w, g_m, &mut acc, &self.model);
            gr.finish();
            if !farskip {
                // Stock order: the MoE read R' = R + a, so attention's backward waits for it.
                let g_post = g_res.clone() + g_norm_in.clone();
                let ga = span(Some(i), bwd_ops::ATTN, bwd);
                let grads = (tape.part.attn_out.clone() * g_post.clone())
                    .sum()
                    .backward();
                let g_in = tape.part.attn_in.grad(&grads).expect("leaf");
                absorb(&mut acc, grads);
                ga.finish();
                g_norm_src_extra = Some(g_in);
                g_full = g_post;
                g_rf = None;
            } else {
                // R fed the residual add and the norm; A fed attention.
                g_full = g_res + g_norm_in;
                g_rf = Some(g_attn_in);
            }
            if let Some(extra) = g_norm_src_extra {
                g_full = g_full + extra;
            }
            // This layer's replicated gradients are complete: all-reduce them while the layers below run.
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
                settled(
                    grad_comm.all_reduce(tag(bwd_ops::GRAD_ALLREDUCE, i, bwd), buffer),
                    blocking,
                ),
            ));
        }
        // Embedding: its output fed both streams at layer 0.
        let g = span(None, bwd_ops::HEAD, bwd);
        let g_emb = match g_rf {
            Some(grf) => g_full + grf,
            None => g_full,
        };
        let grads = (flat3(emb) * flat3(g_emb)).sum().backward();
        absorb(&mut acc, grads);
        g.finish();
        self.reduce_replicated(grad_comm, &mut acc, pending_grads, h0.device().inner())?;
        Ok(RankStep {
            loss: loss_value,
            grads: acc,
        })
    }

    /// The loss on this rank's logits `[tokens, vocab]`: next-token cross-entropy on `y_ids`, or the KL to the
    /// teacher (for KL + L2, its KL term), as this rank's share of the global mean (÷ world).
    fn logits_loss(
        &self,
        objective: &Objective,
        logits: &Tensor<2>,
        y_ids: Tensor<2, Int>,
    ) -> Tensor<1> {
        let [n, v] = logits.dims();
        let kl = |teacher: &Tensor<3>, temperature: f64| {
            distill_loss(
                logits.clone(),
                teacher.clone().reshape([n, v]),
                temperature,
                self.world,
            )
        };
        match objective {
            Objective::CrossEntropy => {
                let logp = burn::tensor::activation::log_softmax(logits.clone(), 1);
                let nll = logp.gather(1, y_ids.reshape([n, 1])).neg().mean();
                nll.mul_scalar(1.0 / self.world as f64)
            }
            Objective::Distill {
                teacher_logits,
                temperature,
            }
            | Objective::DistillHidden {
                teacher_logits,
                temperature,
                ..
            } => kl(teacher_logits, *temperature),
        }
    }

    /// Starts the embedding/head gradient all-reduce, then waits for every layer's (`pending`, issued during the
    /// backward) and that one, writing the global gradients into `acc`.
    fn reduce_replicated<G: Communicator + ?Sized>(
        &self,
        grad_comm: &G,
        acc: &mut GradientsParams,
        pending: Vec<(usize, Vec<bool>, Pending<Vec<f32>>)>,
        device: Device,
    ) -> Result<()> {
        let mut f = Flatten {
            grads: acc,
            buffer: Vec::new(),
            present: Vec::new(),
        };
        visit_replicated_outer(&self.model, &mut f);
        let (buffer, outer_present) = (f.buffer, f.present);
        let tag = CollectiveTag::new(bwd_ops::GRAD_ALLREDUCE)
            .at_layer(usize::MAX)
            .in_phase(Phase::Backward);
        let outer = grad_comm.all_reduce(tag, buffer);
        for (i, present, p) in pending {
            let buffer = p.wait()?;
            let mut u = Unflatten {
                grads: acc,
                buffer: &buffer,
                present: &present,
                index: 0,
                offset: 0,
                device: device.clone(),
            };
            visit_replicated_layer(&self.model.layers[i], &mut u);
        }
        let buffer = outer.wait()?;
        let mut u = Unflatten {
            grads: acc,
            buffer: &buffer,
            present: &outer_present,
            index: 0,
            offset: 0,
            device,
        };
        visit_replicated_outer(&self.model, &mut u);
        Ok(())
    }

    /// One MoE layer's forward on this rank from the stream its MoE reads (`moe_in`): norm, router and slot
    /// gather (each from a fresh leaf), the async dispatch, `during_dispatch` while it is in flight (attention
    /// part 2 under FarSkip; it returns attention's output), the routed experts on their owner, the async combine
    /// (`blocking`: waited for at once; `hold`: held back until [`Combine::launch`]) and the shared expert.
    /// Returns the layer's tape (with `attn_in`) and the combine.
    #[allow(clippy::too_many_arguments)]
    fn moe_forward<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        i: usize,
        moe_in: &Tensor<3>,
        attn_in: Tensor<3>,
        during_dispatch: impl FnOnce() -> Result<Tensor<3>>,
        blocking: bool,
        hold: bool,
    ) -> Result<(PartialTape, Combine)> {
        let begun = self.moe_begin(comm, trace, i, moe_in, ops::DISPATCH)?;
        let attn_out = during_dispatch()?;
        self.moe_end(
            comm,
            trace,
            i,
            begun,
            (attn_in, attn_out),
            ops::COMBINE,
            blocking,
            hold,
        )
    }

    /// The first part of [`EpTrainRank::moe_forward`]: the MoE's norm, then [`ep_moe::begin`] (router and slot
    /// gather, each from a fresh leaf, and the async dispatch tagged `dispatch`).
    fn moe_begin<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        i: usize,
        moe_in: &Tensor<3>,
        dispatch: &'static str,
    ) -> Result<MoeBegun> {
        let at = self.at(comm, trace, i);
        let g = trace.compute(self.rank, Some(i), ops::ROUTER, Phase::Forward);
        let norm_in = leaf(moe_in);
        let norm_out = flat3(self.model.layers[i].post_norm.forward(norm_in.clone()));
        g.finish();
        let begun = ep_moe::begin(
            &at,
            self.moe(i),
            &self.sharding,
            None,
            &norm_out,
            &Leaves,
            dispatch,
        )?;
        Ok(MoeBegun {
            norm_in,
            norm_out,
            router_in: begun.router_in,
            slots: begun.slots,
            weights: begun.routing.weights,
            slot_experts: begun.slot_experts,
            dispatched: begun.dispatched,
        })
    }

    /// The second part of [`EpTrainRank::moe_forward`]: [`ep_moe::end`] (the routed experts on their owner, the
    /// combine tagged `combine` — `blocking`: waited for at once; `hold`: held back until [`Combine::launch`] —
    /// and the shared expert, each from fresh leaves). `attention` is attention's `(input leaf, output)` for the
    /// tape.
    #[allow(clippy::too_many_arguments)]
    fn moe_end<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        i: usize,
        begun: MoeBegun,
        attention: (Tensor<3>, Tensor<3>),
        combine: &'static str,
        blocking: bool,
        hold: bool,
    ) -> Result<(PartialTape, Combine)> {
        let MoeBegun {
            norm_in,
            norm_out,
            router_in,
            slots,
            weights,
            slot_experts,
            dispatched,
        } = begun;
        let ended = ep_moe::end(
            &self.at(comm, trace, i),
            self.moe(i),
            dispatched,
            &norm_out,
            &Leaves,
            combine,
            blocking,
            hold,
        )?;
        let (attn_in, attn_out) = attention;
        let tape = PartialTape {
            attn_in,
            attn_out,
            norm_in,
            norm_out,
            router_in,
            slots,
            weights,
            shared_in: ended.shared_in,
            shared_out: ended.shared_out,
            expert_in: ended.expert_in,
            expert_out: ended.expert_out,
            slot_experts,
        };
        Ok((tape, ended.combine))
    }

    /// Where layer `i`'s EP MoE step runs (forward).
    fn at<'a, C: Communicator + ?Sized>(
        &self,
        comm: &'a C,
        trace: &'a Trace,
        i: usize,
    ) -> ep_moe::At<'a, C> {
        ep_moe::At {
            comm,
            trace,
            layer: i,
            phase: Phase::Forward,
        }
    }

    fn moe(&self, i: usize) -> &MoeBlock {
        match &self.model.layers[i].ffn {
            Ffn::Moe(m) => m,
            Ffn::Dense(_) => unreachable!("checked in new: every layer is MoE"),
        }
    }

    /// Sends slot rows (token-major, `top_k` per token) to the owners of `slot_experts`.
    fn send_slots<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        rows: Tensor<2>,
        slot_experts: &[usize],
        tag: CollectiveTag,
    ) -> Result<Pending<(crate::dispatch::ExpertInputs, DispatchPlan)>> {
        let ones = Tensor::<2>::ones([slot_experts.len(), 1], &rows.device());
        let routing = Routing::new(slot_experts.to_vec(), ones)?;
        Ok(dispatch_start(
            comm,
            &self.sharding,
            rows.without_autodiff(),
            &routing,
            tag,
        )?)
    }
}

/// Adds `more` into `acc` parameter by parameter.
fn merge(acc: &mut GradientsParams, mut more: GradientsParams, model: &Model) {
    struct Merge<'a> {
        acc: &'a mut GradientsParams,
        more: &'a mut GradientsParams,
    }
    impl ModuleVisitor for Merge<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.more.remove::<D>(param.id) {
                let sum = match self.acc.remove::<D>(param.id) {
                    Some(a) => a + g,
                    None => g,
                };
                self.acc.register::<D>(param.id, sum);
            }
        }
    }
    model.visit(&mut Merge {
        acc,
        more: &mut more,
    });
}

/// Ids and shapes of every float parameter of `model`, in visit order (for comparing gradients across ranks).
pub fn param_list(model: &Model) -> Vec<(ParamId, Vec<usize>)> {
    let mut l = ParamList::default();
    model.visit(&mut l);
    l.0
}

/// Joins the models of the ranks of one expert-parallel world (in rank order, as [`EpTrainRank::model`] holds
/// them) back into one model: rank 0's replicated weights and, for every MoE layer, the ranks' expert blocks
/// concatenated in rank order. The result is on rank 0's device without autodiff.
///
/// Replicated weights are taken from rank 0 only: after all-reduced gradients and identical optimizer steps they
/// are identical on every rank.
pub fn merge_rank_models(ranks: &[Model]) -> Result<Model> {
    let bad = |m: String| {
        Err(ScheduleError::Model(
            farskip_model::ModelError::InvalidInput(m),
        ))
    };
    let Some(first) = ranks.first() else {
        return bad("merging expert-parallel ranks needs at least one rank".into());
    };
    let mut merged = first.valid();
    for (r, m) in ranks.iter().enumerate() {
        if m.layers.len() != merged.layers.len() {
            return bad(format!(
                "rank {r} has {} layers but rank 0 has {}",
                m.layers.len(),
                merged.layers.len()
            ));
        }
    }
    for (i, layer) in merged.layers.iter_mut().enumerate() {
        let Ffn::Moe(moe) = &mut layer.ffn else {
            continue;
        };
        let mut gate_up = Vec::with_capacity(ranks.len());
        let mut down = Vec::with_capacity(ranks.len());
        for (r, m) in ranks.iter().enumerate() {
            match &m.layers[i].ffn {
                Ffn::Moe(other) => {
                    gate_up.push(other.experts.gate_up.val().inner());
                    down.push(other.experts.down.val().inner());
                }
                Ffn::Dense(_) => {
                    return bad(format!("layer {i} is MoE on rank 0 but dense on rank {r}"));
                }
            }
        }
        for (name, parts) in [("gate_up", &gate_up), ("down", &down)] {
            let tail = parts[0].dims()[1..].to_vec();
            if let Some((r, p)) = parts
                .iter()
                .enumerate()
                .find(|(_, p)| p.dims()[1..] != tail[..])
            {
                return bad(format!(
                    "layer {i} experts.{name}: rank {r} holds blocks of shape {:?}, rank 0 {:?}",
                    p.dims(),
                    parts[0].dims()
                ));
            }
        }
        let (gate_up_id, down_id) = (moe.experts.gate_up.id, moe.experts.down.id);
        moe.experts.gate_up = Param::initialized(gate_up_id, Tensor::cat(gate_up, 0));
        moe.experts.down = Param::initialized(down_id, Tensor::cat(down, 0));
    }
    Ok(merged)
}
