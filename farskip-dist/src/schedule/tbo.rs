//! Two-micro-batch overlap (TBO): the schedule-only answer to blocking collectives that the field uses without
//! changing the model (SGLang's two-batch overlap, the idea behind DeepSeek's DualPipe). Each rank splits its
//! tokens into two halves along the sequence — the first half (micro-batch 0) and the second (micro-batch 1) —
//! and runs every layer in two stages per half, interleaved `0.s0, 1.s0, 0.s1, 1.s1`, so that one half's
//! collective is in flight while the other half computes:
//!
//! - EP: stage 0 = wait the previous combine, attention, router, dispatch; stage 1 = wait the dispatch, experts,
//!   combine, shared expert. Half 0's dispatch hides behind half 1's attention, half 1's behind half 0's
//!   experts, half 0's combine behind half 1's experts, half 1's behind half 0's next attention.
//! - TP: stage 0 = wait the previous MoE all-reduce, attention, its all-reduce; stage 1 = wait it, MoE, its
//!   all-reduce.
//!
//! The halves are a chunked prefill: half 1's attention reads half 0's keys and values of the same layer from a
//! per-layer cache (half 0's stage 0 always runs first), so the result is the standard model's up to float
//! rounding. Standard connectivity only: the connectivity's rules are the model's, every layer waits for its
//! own collectives.

use burn::prelude::*;
use farskip_model::attention::LayerKvCache;
use farskip_model::connectivity::{FfnInput, Residual};
use farskip_model::model::Ffn;
use farskip_model::moe::{Routing as ModelRouting, SlotPlan};
use farskip_model::{Connectivity, DecoderLayer, Model, ModelError};

use super::{
    Ctx, EpRank, Result, ScheduleError, TpRank, all_reduce_tensor, flat, from_host, ops,
    overlappable,
};
use crate::comm::{Communicator, Pending};
use crate::dispatch::{DispatchPlan, ExpertInputs};
use crate::trace::{Phase, Trace};

/// Names of the micro-batches' collectives: each half's is its own collective (and link entry), so the two are
/// told apart in traces and in the link model (which gives each half its share of the full collective's time).
pub mod tbo_ops {
    /// EP dispatch of half 0 / half 1.
    pub const DISPATCH: [&str; 2] = ["dispatch.mb0", "dispatch.mb1"];
    /// EP combine of half 0 / half 1.
    pub const COMBINE: [&str; 2] = ["combine.mb0", "combine.mb1"];
    /// TP all-reduce of the attention output, half 0 / half 1.
    pub const AR_ATTN: [&str; 2] = ["allreduce_attn.mb0", "allreduce_attn.mb1"];
    /// TP all-reduce of the routed output, half 0 / half 1.
    pub const AR_MOE: [&str; 2] = ["allreduce_moe.mb0", "allreduce_moe.mb1"];

    /// The full collective a micro-batch's collective is half of (`"dispatch.mb1"` → `"dispatch"`), or `None`
    /// for any other name.
    pub fn full_op(name: &str) -> Option<&str> {
        name.strip_suffix(".mb0")
            .or_else(|| name.strip_suffix(".mb1"))
    }
}

/// Refuses a connectivity two-micro-batch overlap does not run: it runs standard connectivity (the
/// schedule-only baseline) and FarSkip at skip depth 1 (`farskip+tbo`), not deeper skips.
fn depth_one(model: &Model) -> Result<()> {
    match model.connectivity() {
        other @ Connectivity::FarSkip(_) if other.depth().is_some_and(|d| d > 1) => {
            Err(ScheduleError::Model(ModelError::InvalidConnectivity {
                spec: other.to_string(),
                message:
                    "two-micro-batch overlap runs standard connectivity or FarSkip at skip depth 1"
                        .into(),
            }))
        }
        _ => Ok(()),
    }
}

/// The two halves of `[batch, seq]` ids along the sequence, with the absolute position of each half's first token.
fn halves(input_ids: Tensor<2, Int>) -> Result<[(Tensor<2, Int>, usize); 2]> {
    let [_, t] = input_ids.dims();
    if t < 2 {
        return Err(ScheduleError::Model(ModelError::InvalidInput(format!(
            "two-micro-batch overlap splits the sequence in two: it needs at least 2 tokens, got {t}"
        ))));
    }
    let first = t / 2;
    Ok([
        (input_ids.clone().narrow(1, 0, first), 0),
        (input_ids.narrow(1, first, t - first), first),
    ])
}

/// What one half has in flight between its stages.
#[allow(clippy::large_enum_variant)]
enum EpInflight {
    /// Nothing: the stream is settled.
    None,
    /// Stage 0 ended with a dispatch.
    Dispatched {
        dispatch: Pending<(ExpertInputs, DispatchPlan)>,
        routing: ModelRouting,
        post_attention: Tensor<3>,
        x: Tensor<2>,
    },
    /// Stage 1 ended with a combine.
    Combining {
        layer: usize,
        combine: super::Combine,
        routing: ModelRouting,
        post_attention: Tensor<3>,
        shared: Option<Tensor<2>>,
    },
}

struct Half<I> {
    /// The layer input once nothing is in flight.
    state: Residual,
    offset: usize,
    inflight: I,
}

/// Checks the connectivity, splits the ids and embeds each half.
fn embed_halves<C: Communicator + ?Sized, I>(
    ctx: &Ctx<'_, C>,
    model: &Model,
    input_ids: Tensor<2, Int>,
    nothing_in_flight: impl Fn() -> I,
) -> Result<[Half<I>; 2]> {
    depth_one(model)?;
    Ok(halves(input_ids)?.map(|(ids, offset)| Half {
        state: Residual::Plain(ctx.compute(None, ops::HEAD, || model.embed(ids))),
        offset,
        inflight: nothing_in_flight(),
    }))
}

/// Settles each half (`settle`: wait for what it has in flight) and runs the head; the logits of the two halves
/// joined along the sequence.
fn head<C: Communicator + ?Sized, I>(
    ctx: &Ctx<'_, C>,
    model: &Model,
    halves: [Half<I>; 2],
    mut settle: impl FnMut(Half<I>) -> Result<Tensor<3>>,
) -> Result<Tensor<3>> {
    let mut logits = Vec::with_capacity(2);
    for half in halves {
        let h = settle(half)?;
        logits.push(ctx.compute(None, ops::HEAD, || model.logits(h)));
    }
    Ok(Tensor::cat(logits, 1))
}

impl EpRank {
    /// The forward pass of this rank's sequences with two-micro-batch overlap (standard connectivity): equals
    /// [`EpRank::forward`] of the standard model up to float rounding.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq ≥ 2]` (this rank's rows) -> `[batch, seq, vocab]`
    pub fn forward_tbo<C: Communicator + ?Sized>(
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
        let model = &self.model;
        let mut halves = embed_halves(&ctx, model, input_ids, || EpInflight::None)?;
        for layer in &model.layers {
            let mut cache = LayerKvCache::default();
            for (mb, half) in halves.iter_mut().enumerate() {
                self.tbo_stage_0(&ctx, layer, mb, half, &mut cache)?;
            }
            for (mb, half) in halves.iter_mut().enumerate() {
                self.tbo_stage_1(&ctx, layer, mb, half)?;
            }
        }
        head(&ctx, model, halves, |half| {
            Ok(self.tbo_settle(&ctx, half.state, half.inflight)?.full())
        })
    }

    /// Waits for a half's combine and forms the layer's output state (standard: `R' + (r + s)`; FarSkip: that
    /// and the routed-free stream).
    fn tbo_settle<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        state: Residual,
        inflight: EpInflight,
    ) -> Result<Residual> {
        match inflight {
            EpInflight::None => Ok(state),
            EpInflight::Combining {
                layer,
                combine,
                routing,
                post_attention,
                shared,
            } => {
                let slot_out = combine.wait(ctx.comm)?;
                let Ffn::Moe(moe) = &self.model.layers[layer].ffn else {
                    unreachable!("only MoE layers combine")
                };
                let dims = post_attention.dims();
                let routed = ctx.compute(Some(layer), ops::COMBINE, || {
                    moe.combine_slots(slot_out, &routing).reshape(dims)
                });
                Ok(self.model.connectivity().moe_output(
                    post_attention,
                    routed,
                    shared.map(|s| s.reshape(dims)),
                    Vec::new(),
                ))
            }
            EpInflight::Dispatched { .. } => unreachable!("stage 1 always follows stage 0"),
        }
    }

    /// Stage 0: the previous combine, attention (half 1 reads half 0's keys and values from `cache`), router,
    /// dispatch; a dense layer runs whole here.
    fn tbo_stage_0<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        layer: &DecoderLayer,
        mb: usize,
        half: &mut Half<EpInflight>,
        cache: &mut LayerKvCache,
    ) -> Result<()> {
        let i = layer.index();
        let conn = self.model.connectivity();
        let inflight = std::mem::replace(&mut half.inflight, EpInflight::None);
        let attend = |x: Tensor<3>, cache: &mut LayerKvCache| {
            ctx.compute(Some(i), ops::ATTN, || {
                layer
                    .attention
                    .forward(layer.input_norm.forward(x), half.offset, Some(cache))
            })
        };
        // FarSkip: attention reads the routed-free stream, known while the previous combine is in flight.
        let (a, inputs) = match &inflight {
            EpInflight::Combining {
                post_attention,
                shared,
                ..
            } if overlappable(conn, i) => {
                let routed_free = match shared {
                    Some(s) => post_attention.clone() + s.clone().reshape(post_attention.dims()),
                    None => post_attention.clone(),
                };
                let a = attend(routed_free, cache);
                let state = self.tbo_settle(ctx, half.state.clone(), inflight)?;
                (a, conn.layer_inputs(i, state))
            }
            _ => {
                let state = self.tbo_settle(ctx, half.state.clone(), inflight)?;
                let inputs = conn.layer_inputs(i, state);
                (attend(inputs.attn_in.clone(), cache), inputs)
            }
        };
        let post_attention = inputs.residual + a;
        let ffn_in = match inputs.ffn_in {
            FfnInput::PostAttention => post_attention.clone(),
            FfnInput::PreAttention(m) => m,
        };
        match &layer.ffn {
            Ffn::Dense(mlp) => {
                half.state = ctx.compute(Some(i), ops::MLP, || {
                    let y = mlp.forward(layer.post_norm.forward(ffn_in));
                    conn.dense_output(post_attention, y, Vec::new())
                });
            }
            Ffn::Moe(moe) => {
                let (x, _) = ctx.compute(Some(i), ops::ROUTER, || {
                    flat(layer.post_norm.forward(ffn_in))
                });
                let begun = self.moe_begin(ctx, i, moe, &x, tbo_ops::DISPATCH[mb])?;
                half.inflight = EpInflight::Dispatched {
                    dispatch: begun.dispatched,
                    routing: begun.routing,
                    post_attention,
                    x,
                };
            }
        }
        Ok(())
    }

    /// Stage 1: the dispatch, the experts, the combine (left in flight) and the shared expert.
    fn tbo_stage_1<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        layer: &DecoderLayer,
        mb: usize,
        half: &mut Half<EpInflight>,
    ) -> Result<()> {
        let i = layer.index();
        let (Ffn::Moe(moe), EpInflight::Dispatched { .. }) = (&layer.ffn, &half.inflight) else {
            return Ok(()); // a dense layer ran whole in stage 0
        };
        let EpInflight::Dispatched {
            dispatch,
            routing,
            post_attention,
            x,
        } = std::mem::replace(&mut half.inflight, EpInflight::None)
        else {
            unreachable!("matched above")
        };
        let ended = super::ep_moe::end(
            &self.at(ctx, i),
            moe,
            dispatch,
            &x,
            &super::ep_moe::Through,
            tbo_ops::COMBINE[mb],
            false,
            false,
        )?;
        let (combine, shared) = (ended.combine, ended.shared_out);
        half.inflight = EpInflight::Combining {
            layer: i,
            combine,
            routing,
            post_attention,
            shared,
        };
        Ok(())
    }
}

/// What one TP half has in flight between its stages. (Two per rank, moved not copied: the size difference
/// between the variants costs nothing worth a box.)
#[allow(clippy::large_enum_variant)]
enum TpInflight {
    /// Nothing: the stream is settled.
    None,
    /// Stage 0 ended with the attention all-reduce; the layer's residual and MoE input wait for it.
    Attention {
        reduce: Pending<Vec<f32>>,
        residual: Tensor<3>,
        ffn_in: FfnInput,
    },
    /// Stage 1 ended with the routed all-reduce.
    Moe {
        reduce: Pending<Vec<f32>>,
        post_attention: Tensor<3>,
        shared: Option<Tensor<3>>,
    },
}

impl TpRank {
    /// The forward pass with two-micro-batch overlap (every rank runs the same tokens): equals
    /// [`TpRank::forward`] of the same model up to float rounding. Standard connectivity, or FarSkip at skip
    /// depth 1 (`farskip+tbo`: a converted layer's attention also hides the previous routed all-reduce).
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq ≥ 2]` -> `[batch, seq, vocab]`
    pub fn forward_tbo<C: Communicator + ?Sized>(
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
        let model = &self.model;
        let conn = model.connectivity();
        let mut halves = embed_halves(&ctx, model, input_ids, || TpInflight::None)?;
        for layer in &model.layers {
            let i = layer.index();
            let mut cache = LayerKvCache::default();
            // Stage 0: attention (FarSkip: on the routed-free stream, before the previous routed all-reduce is
            // waited for), its all-reduce.
            for (mb, half) in halves.iter_mut().enumerate() {
                let inflight = std::mem::replace(&mut half.inflight, TpInflight::None);
                let offset = half.offset;
                let mut attend = |x: Tensor<3>| {
                    let partial = ctx.compute(Some(i), ops::ATTN, || {
                        layer.attention.forward(
                            layer.input_norm.forward(x),
                            offset,
                            Some(&mut cache),
                        )
                    });
                    all_reduce_tensor(ctx.comm, ctx.tag(tbo_ops::AR_ATTN[mb], i), partial)
                };
                let (reduce, inputs) = match &inflight {
                    TpInflight::Moe {
                        post_attention,
                        shared,
                        ..
                    } if overlappable(conn, i) => {
                        let routed_free = match shared {
                            Some(s) => post_attention.clone() + s.clone(),
                            None => post_attention.clone(),
                        };
                        let reduce = attend(routed_free);
                        let state = tp_settle(conn, half.state.clone(), inflight)?;
                        (reduce, conn.layer_inputs(i, state))
                    }
                    _ => {
                        let state = tp_settle(conn, half.state.clone(), inflight)?;
                        let inputs = conn.layer_inputs(i, state);
                        (attend(inputs.attn_in.clone()), inputs)
                    }
                };
                half.inflight = TpInflight::Attention {
                    reduce,
                    residual: inputs.residual,
                    ffn_in: inputs.ffn_in,
                };
            }
            // Stage 1: attention's all-reduce, the MoE (FarSkip: before that wait, on the pre-attention stream) or
            // dense MLP, the routed all-reduce.
            for (mb, half) in halves.iter_mut().enumerate() {
                let TpInflight::Attention {
                    reduce,
                    residual,
                    ffn_in,
                } = std::mem::replace(&mut half.inflight, TpInflight::None)
                else {
                    unreachable!("stage 0 leaves the attention all-reduce in flight")
                };
                let dims = residual.dims();
                let device = residual.device();
                let moe_part = |x: Tensor<3>, moe: &farskip_model::moe::MoeBlock| {
                    ctx.compute(Some(i), ops::EXPERTS, || {
                        let (x, _) = flat(layer.post_norm.forward(x));
                        let routing = moe.route(x.clone());
                        let plan =
                            SlotPlan::from_experts(&routing.experts, moe.experts.num_experts());
                        (moe.routed(x.clone(), &routing, &plan), moe.shared(x))
                    })
                };
                let (post_attention, out) = match (&layer.ffn, ffn_in) {
                    (Ffn::Moe(moe), FfnInput::PreAttention(m)) => {
                        let out = moe_part(m, moe);
                        (
                            residual + from_host(reduce.wait()?, dims, &device),
                            Some(out),
                        )
                    }
                    (Ffn::Moe(moe), FfnInput::PostAttention) => {
                        let post = residual + from_host(reduce.wait()?, dims, &device);
                        let out = moe_part(post.clone(), moe);
                        (post, Some(out))
                    }
                    (Ffn::Dense(mlp), ffn_in) => {
                        let post = residual + from_host(reduce.wait()?, dims, &device);
                        let m = match ffn_in {
                            FfnInput::PostAttention => post.clone(),
                            FfnInput::PreAttention(m) => m,
                        };
                        half.state = ctx.compute(Some(i), ops::MLP, || {
                            let y = mlp.forward(layer.post_norm.forward(m));
                            conn.dense_output(post.clone(), y, Vec::new())
                        });
                        (post, None)
                    }
                };
                if let Some((routed, shared)) = out {
                    half.inflight = TpInflight::Moe {
                        reduce: ctx
                            .comm
                            .all_reduce(ctx.tag(tbo_ops::AR_MOE[mb], i), super::to_host(routed)),
                        post_attention,
                        shared: shared.map(|s| s.reshape(dims)),
                    };
                }
            }
        }
        head(&ctx, model, halves, |half| {
            Ok(tp_settle(conn, half.state, half.inflight)?.full())
        })
    }
}

/// Waits for the half's routed all-reduce and forms the layer's output state (standard: `R' + (r + s)`).
fn tp_settle(conn: &Connectivity, state: Residual, inflight: TpInflight) -> Result<Residual> {
    match inflight {
        TpInflight::None => Ok(state),
        TpInflight::Moe {
            reduce,
            post_attention,
            shared,
        } => {
            let dims = post_attention.dims();
            let device = post_attention.device();
            let routed = from_host(reduce.wait()?, dims, &device);
            Ok(conn.moe_output(post_attention, routed, shared, Vec::new()))
        }
        TpInflight::Attention { .. } => unreachable!("stage 1 always follows stage 0"),
    }
}
