//! Expert-parallel training with overlapped forward and backward communication.
//!
//! The all-to-alls cut the autodiff graph (rows travel through host buffers), so every rank runs its part of the
//! step as small graphs ("segments") whose inputs are fresh leaves, and backpropagates them one by one with the
//! gradient of their outputs as seed — the Rust counterpart of the paper's custom autograd functions and hooks.
//! The step walks its schedule description (`plan::desc::training`, the one the planner simulates; the private
//! `walk` module): the forward is the inference walker recording segments, the backward walks the description's
//! backward steps. Per MoE layer k (FarSkip, depth 1):
//!
//! - forward: attention part 1 on A_k → wait Combine(k−1) → join → norm + router → async Dispatch(k) →
//!   attention part 2 → wait → routed experts (on their owner) → async Combine(k) → shared experts;
//! - backward: join → async exchange of the expert-output gradients (the backward of Combine, dispatch-shaped)
//!   hidden behind attention's backward → experts' backward on the owner → async return of the input gradients
//!   (the backward of Dispatch, combine-shaped) hidden behind the shared expert's backward → router and norm.
//!   Expert gradients stay on their owner; the replicated gradients of each layer are all-reduced
//!   asynchronously as soon as they are complete, hidden behind the backward of the layers below.
//!
//! At skip depth d ≥ 2 up to d combines stay in flight and each layer routes and dispatches before its
//! attention. Standard connectivity runs the same segments in the stock order with every collective waited for
//! at once (the blocking baseline). Gradients equal single-rank training up to float rounding.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Gradients;
use farskip_model::model::Ffn;
use farskip_model::moe::MoeBlock;
use farskip_model::{Connectivity, DecoderLayer, Model};

use crate::comm::{CollectiveTag, CommError, Communicator, Pending};
use crate::dispatch::{DispatchPlan, ExpertSharding, Routing, dispatch_start_traced};
use crate::schedule::{Result, ScheduleError, ep_moe};
use crate::trace::{Phase, Trace};

mod tbo;
mod walk;

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
    /// Host work of [`COMBINE_BWD`] before it goes out: the slot gradients copied in destination order.
    pub const COMBINE_BWD_PACK: &str = "combine_bwd_pack";
    /// Host work after [`COMBINE_BWD`] arrived: the gradient rows grouped by local expert.
    pub const COMBINE_BWD_UNPACK: &str = "combine_bwd_unpack";
    /// Host work of [`DISPATCH_BWD`] before it goes out: the expert-input gradients back in received order.
    pub const DISPATCH_BWD_PACK: &str = "dispatch_bwd_pack";
    /// Host work after [`DISPATCH_BWD`] arrived: the slot gradients put back in slot order.
    pub const DISPATCH_BWD_UNPACK: &str = "dispatch_bwd_unpack";
    /// Host work of a layer's [`GRAD_ALLREDUCE`]: its replicated gradients flattened into one buffer.
    pub const GRAD_ALLREDUCE_PACK: &str = "grad_allreduce_pack";
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
        let device = model.device();
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
        same_ranks(comm, grad_comm)?;
        let [b, t1] = windows.dims();
        if t1 < 2 || b == 0 {
            return Err(ScheduleError::Model(
                farskip_model::ModelError::InvalidInput(format!(
                    "training windows must be [batch >= 1, seq + 1 >= 2], got [{b}, {t1}]"
                )),
            ));
        }
        let (x_ids, y_ids) = self.inputs_and_targets(windows, objective)?;
        let micro = walk::Micro {
            x_ids,
            y_ids,
            objective: objective.clone(),
            weight: 1.0,
        };
        let schedule = crate::plan::desc::training(self.model.config(), self.model.connectivity());
        self.step_walk(comm, grad_comm, trace, vec![micro], &schedule)
    }

    /// Checks `objective` against this rank's windows `[batch, seq + 1]` (seq ≥ 1) and splits them into the
    /// inputs and their next-token targets, `[batch, seq]` each.
    fn inputs_and_targets(
        &self,
        windows: Tensor<2, Int>,
        objective: &Objective,
    ) -> Result<(Tensor<2, Int>, Tensor<2, Int>)> {
        let [b, t1] = windows.dims();
        let t = t1 - 1;
        let config = self.model.config();
        objective.check(
            [b, t],
            config.vocab_size,
            config.hidden_size,
            self.model.layers.len(),
        )?;
        Ok((windows.clone().narrow(1, 0, t), windows.narrow(1, 1, t)))
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
    /// backward) and that one, writing the global gradients into `acc`. Flattening the outer gradients is
    /// traced on `trace` as [`bwd_ops::GRAD_ALLREDUCE_PACK`] without a layer.
    fn reduce_replicated<G: Communicator + ?Sized>(
        &self,
        grad_comm: &G,
        trace: &Trace,
        acc: &mut GradientsParams,
        pending: Vec<(usize, Vec<bool>, Pending<Vec<f32>>)>,
        device: Device,
    ) -> Result<()> {
        let g = trace.compute(
            self.rank,
            None,
            bwd_ops::GRAD_ALLREDUCE_PACK,
            Phase::Backward,
        );
        let mut f = Flatten {
            grads: acc,
            buffer: Vec::new(),
            present: Vec::new(),
        };
        visit_replicated_outer(&self.model, &mut f);
        let (buffer, outer_present) = (f.buffer, f.present);
        g.finish();
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

    fn moe(&self, i: usize) -> &MoeBlock {
        match &self.model.layers[i].ffn {
            Ffn::Moe(m) => m,
            Ffn::Dense(_) => unreachable!("checked in new: every layer is MoE"),
        }
    }

    /// Sends slot rows (token-major, `top_k` per token) to the owners of `slot_experts`.
    /// Its host work is traced on `trace` ([`bwd_ops::COMBINE_BWD_PACK`] / `_UNPACK` for that tag).
    fn send_slots<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        rows: Tensor<2>,
        slot_experts: &[usize],
        tag: CollectiveTag,
    ) -> Result<Pending<(crate::dispatch::ExpertInputs, DispatchPlan)>> {
        let ones = Tensor::<2>::ones([slot_experts.len(), 1], &rows.device());
        let routing = Routing::new(slot_experts.to_vec(), ones)?;
        Ok(dispatch_start_traced(
            comm,
            &self.sharding,
            rows.without_autodiff(),
            &routing,
            tag,
            trace,
        )?)
    }
}

/// Refuses a gradient communicator that does not span the same ranks in the same order as `comm`.
fn same_ranks<C: Communicator + ?Sized, G: Communicator + ?Sized>(
    comm: &C,
    grad_comm: &G,
) -> Result<()> {
    if grad_comm.rank() != comm.rank() || grad_comm.world_size() != comm.world_size() {
        return Err(ScheduleError::Comm(CommError::InvalidArgument(format!(
            "the gradient communicator is rank {} of {} but the expert-parallel one is rank {} of {}",
            grad_comm.rank(),
            grad_comm.world_size(),
            comm.rank(),
            comm.world_size()
        ))));
    }
    Ok(())
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
