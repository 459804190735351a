//! The inference executor: a rank walks its schedule description ([`desc::inference`], the one the planner
//! simulates) step by step. The description says what runs in which order and where each collective is issued
//! and waited for; the walker does each step on the rank's tensors ([`Exec`]: expert or tensor parallelism)
//! and knows only what each step reads, from the connectivity's rules (../fixtures/FARSKIP_SEMANTICS.md):
//!
//! - `S`, the settled stream: the embedding, then each layer's output without the routed outputs still in
//!   flight (`S' = R' + s` after an MoE layer, `R' + m` after a dense one);
//! - routed outputs that have been waited for but not yet added (`landed`), in the order they landed;
//! - `R = S + landed`, formed when a layer first reads it: a stock layer's attention, a converted layer's MoE (its
//!   pre-attention input), every layer's residual add. A FarSkip layer's attention reads `S`.
//!
//! Where the description waits decides what `R` holds, so the schedule and the maths cannot disagree: at depth
//! d a converted layer's MoE reads `S + r_{i−d}` because the description waits for `r_{i−d}` (and nothing newer)
//! before its router. The additions follow the model's order (depth ≤ 1: `R' + (r + s)`; depth ≥ 2:
//! `S + r_newest + …`; after a dense layer `R' + Σ + m`), so expert parallelism equals the single-rank model bit
//! for bit and tensor parallelism within the rounding of its partial sums.

use burn::prelude::*;
use farskip_model::Model;
use farskip_model::attention::LayerKvCache;
use farskip_model::connectivity::FarSkipVariant;
use farskip_model::model::Ffn;

use super::{Ctx, Result, ScheduleError, ops, tbo_ops};
use crate::comm::Communicator;
use crate::plan::desc::{self, OpKey, Split, Step};

/// Attention between the steps of its description. (One per layer in progress, moved not copied: the size
/// difference between the variants costs nothing worth a box.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum Attention<A> {
    /// Still running (EP: projected q/k/v; TP: partial output or its all-reduce).
    Running(A),
    /// The layer's attention output.
    Done(Tensor<3>),
}

/// Where a micro-batch's tokens sit in the sequence: the absolute position of its first token, and the layer's
/// keys and values of the earlier micro-batches (`None`: one micro-batch, nothing cached).
pub(crate) struct Pos<'c> {
    pub offset: usize,
    pub cache: Option<&'c mut LayerKvCache>,
}

/// The per-step work of one kind of rank, driven by [`walk`]. A step the rank kind does not have is an error
/// naming it (a description built for the other split).
pub(crate) trait Exec {
    /// Attention between its steps.
    type Attn;
    /// An MoE layer from its router to the issue of its routed collective.
    type Moe;
    /// A routed collective in flight.
    type Routed;
    /// A routed collective waited for, before its join.
    type Waited;
    /// The split the rank's description is built for.
    const SPLIT: Split;
    /// Whether a waited routed collective is joined by a compute step of its own (`combine`, EP) or at the wait.
    const JOIN_STEP: bool;

    /// The rank's model.
    fn model(&self) -> &Model;
    /// The next step is micro-batch `m`'s (a recording exec keeps its records per micro-batch).
    fn micro(&self, _m: usize) {}
    /// The embedding (span `embed_head`): the first stream.
    fn embed<C: Communicator + ?Sized>(&self, ctx: &Ctx<'_, C>, ids: Tensor<2, Int>) -> Tensor<3> {
        ctx.compute(None, ops::HEAD, || self.model().embed(ids))
    }
    /// `R` of layer `at` (`None`: the final norm's input) has been formed from `S` and the routed outputs of
    /// `from` (training records it for the backward).
    fn formed_r(&self, _at: Option<usize>, _from: &[usize], _r: &Tensor<3>) {}
    /// `attn_1`: attention's first part on its input `x` (the input norm included), at `pos`.
    fn attn_1<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        i: usize,
        x: Tensor<3>,
        pos: Pos<'_>,
    ) -> Result<Self::Attn>;
    /// A later compute step of attention (`attn_2`, `attn`), at `pos`.
    fn attn_step<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        a: Self::Attn,
        pos: Pos<'_>,
    ) -> Result<Attention<Self::Attn>>;
    /// Issues attention's collective (by default there is none: an error naming the step).
    fn attn_issue<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        key: &OpKey,
        _a: Self::Attn,
    ) -> Result<Self::Attn> {
        Err(bad_step(key, "this split has no attention collective"))
    }
    /// Waits for attention's collective: the attention output (by default there is none).
    fn attn_wait<C: Communicator + ?Sized>(
        &self,
        _ctx: &Ctx<'_, C>,
        key: &OpKey,
        _a: Self::Attn,
    ) -> Result<Tensor<3>> {
        Err(bad_step(key, "this split has no attention collective"))
    }
    /// `router`: the MoE's norm and router (and slot gather) on its input `m`.
    fn router<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        i: usize,
        m: Tensor<3>,
    ) -> Result<Self::Moe>;
    /// A compute step of the MoE after its router (`experts`, `shared`).
    fn moe_step<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        moe: &mut Self::Moe,
    ) -> Result<()>;
    /// Issues the dispatch.
    fn dispatch_issue<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        moe: &mut Self::Moe,
    ) -> Result<()>;
    /// Waits for the dispatch.
    fn dispatch_wait<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        moe: &mut Self::Moe,
    ) -> Result<()>;
    /// The shared expert's output, once the MoE has computed it (taken when the layer's output settles).
    fn take_shared(moe: &mut Self::Moe) -> Option<Tensor<3>>;
    /// Issues the routed collective (combine or all-reduce); the MoE may still run its shared expert after.
    fn routed_issue<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        key: &OpKey,
        moe: &mut Self::Moe,
    ) -> Result<Self::Routed>;
    /// Waits for a routed collective.
    fn routed_wait<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        r: Self::Routed,
    ) -> Result<Self::Waited>;
    /// The routed output of layer `layer`'s waited collective (EP: the combine's weighted sum of slot outputs).
    fn join<C: Communicator + ?Sized>(
        &self,
        ctx: &Ctx<'_, C>,
        layer: usize,
        w: Self::Waited,
    ) -> Result<Tensor<3>>;
}

/// An error naming the description step the rank could not run.
pub(crate) fn bad_step(key: &OpKey, why: &str) -> ScheduleError {
    ScheduleError::Description(format!(
        "step `{}` of layer {:?} ({:?}): {why}",
        key.op, key.layer, key.phase
    ))
}

/// An error for a step whose input an earlier step did not leave.
pub(crate) fn out_of_order(key: &OpKey, what: &str) -> ScheduleError {
    bad_step(
        key,
        &format!("{what} is missing (the steps are out of order)"),
    )
}

/// How the settled stream was last formed (the model's order of additions depends on it). One per walk.
#[allow(clippy::large_enum_variant)]
enum Made {
    /// The embedding, or anything the pair rule does not apply to.
    Plain,
    /// An MoE layer at depth ≤ 1: `S = R' + s`, its routed output `r` joins as `R' + (r + s)`.
    Moe {
        post: Tensor<3>,
        shared: Option<Tensor<3>>,
    },
}

/// One layer's tensors while the walker is in it (and, for an MoE layer, until its routed collective is
/// issued).
struct Layer<A, M> {
    attn: Option<Attention<A>>,
    /// `R`, once formed.
    r: Option<Tensor<3>>,
    /// `R + a`, once attention is done.
    post: Option<Tensor<3>>,
    moe: Option<M>,
    mlp: Option<Tensor<3>>,
    /// Its routed collective has been issued.
    issued: bool,
}

struct Walk<'m, E: Exec + ?Sized> {
    exec: &'m E,
    model: &'m Model,
    /// Depth ≤ 1: the pair rule `R' + (r + s)` applies.
    pair_rule: bool,
    s: Option<Tensor<3>>,
    made: Made,
    /// Routed outputs waited for and not yet added, with their layers, in the order they landed.
    landed: Vec<(usize, Tensor<3>)>,
    layers: Vec<Layer<E::Attn, E::Moe>>,
    /// The layer the walker is in.
    current: Option<usize>,
    routed: Vec<Option<E::Routed>>,
    waited: std::collections::VecDeque<(usize, E::Waited)>,
}

impl<E: Exec + ?Sized> Walk<'_, E> {
    fn variant(&self, i: usize) -> Option<FarSkipVariant> {
        match self.model.connectivity() {
            farskip_model::Connectivity::FarSkip(f)
                if self.model.connectivity().is_converted(i) =>
            {
                Some(f.variant)
            }
            _ => None,
        }
    }

    fn settled(&self, key: &OpKey) -> Result<Tensor<3>> {
        self.s
            .clone()
            .ok_or_else(|| bad_step(key, "runs before the embedding"))
    }

    /// `R` of layer `i`: `S` plus everything landed, formed once.
    fn r(&mut self, key: &OpKey, i: usize) -> Result<Tensor<3>> {
        if let Some(r) = &self.layers[i].r {
            return Ok(r.clone());
        }
        let (r, from) = self.fold(key)?;
        self.exec.formed_r(Some(i), &from, &r);
        self.layers[i].r = Some(r.clone());
        Ok(r)
    }

    /// `S` plus everything landed (the model's order: depth ≤ 1 `R' + (r + s)`, else newest first), and the
    /// layers whose routed outputs it holds.
    fn fold(&mut self, key: &OpKey) -> Result<(Tensor<3>, Vec<usize>)> {
        let s = self.settled(key)?;
        let mut landed = std::mem::take(&mut self.landed);
        landed.sort_by_key(|(k, _)| std::cmp::Reverse(*k));
        let from = landed.iter().map(|(k, _)| *k).collect();
        let r = match (&self.made, landed.len()) {
            (_, 0) => s,
            (Made::Moe { post, shared }, 1) if self.pair_rule => {
                let (_, r) = landed.pop().expect("one landed");
                let rs = match shared {
                    Some(sh) => r + sh.clone(),
                    None => r,
                };
                post.clone() + rs
            }
            _ => landed.into_iter().fold(s, |acc, (_, r)| acc + r),
        };
        Ok((r, from))
    }

    /// The walker leaves layer `i`: its output settles (`S = R' + s`; a dense layer's `R' + Σ landed + m`).
    fn settle(&mut self, key: &OpKey, i: usize) -> Result<()> {
        let post = self.layers[i]
            .post
            .take()
            .ok_or_else(|| bad_step(key, &format!("layer {i} ended before its attention")))?;
        if let Some(out) = self.layers[i].mlp.take() {
            let landed = std::mem::take(&mut self.landed);
            // Dense layers are not trained here (training runs all-MoE models): nothing to record.
            self.s = Some(landed.into_iter().fold(post, |acc, (_, r)| acc + r) + out);
            self.made = Made::Plain;
        } else {
            let shared = self.layers[i].moe.as_mut().and_then(E::take_shared);
            if self.layers[i].issued {
                // Its routed collective is on its way: nothing of the MoE is read again.
                self.layers[i].moe = None;
            }
            self.s = Some(match &shared {
                Some(sh) => post.clone() + sh.clone(),
                None => post.clone(),
            });
            self.made = if self.pair_rule {
                Made::Moe { post, shared }
            } else {
                Made::Plain
            };
        }
        self.layers[i].r = None;
        self.layers[i].attn = None;
        Ok(())
    }

    /// Enters layer `i` (leaving the one before).
    fn enter(&mut self, key: &OpKey, i: usize) -> Result<()> {
        match self.current {
            Some(c) if c == i => return Ok(()),
            Some(c) if c > i => {
                return Err(bad_step(key, &format!("layer {i} after layer {c}")));
            }
            Some(c) => self.settle(key, c)?,
            None => {}
        }
        self.current = Some(i);
        Ok(())
    }

    fn attention_done(&mut self, key: &OpKey, i: usize, a: Tensor<3>) -> Result<()> {
        let r = self.r(key, i)?;
        self.layers[i].post = Some(r + a);
        Ok(())
    }

    /// What the layer's feed-forward block reads: `R` (a converted layer of the full or MLP-only variant), else
    /// the post-attention stream.
    fn ffn_input(&mut self, key: &OpKey, i: usize) -> Result<Tensor<3>> {
        if matches!(
            self.variant(i),
            Some(FarSkipVariant::Full | FarSkipVariant::MlpOnly)
        ) {
            self.r(key, i)
        } else {
            self.layers[i]
                .post
                .clone()
                .ok_or_else(|| bad_step(key, "reads the post-attention stream before attention"))
        }
    }

    fn take_attn(&mut self, key: &OpKey, i: usize) -> Result<E::Attn> {
        match self.layers[i].attn.take() {
            Some(Attention::Running(a)) => Ok(a),
            _ => Err(bad_step(key, "no attention in progress")),
        }
    }

    fn moe_mut(&mut self, key: &OpKey, i: usize) -> Result<&mut E::Moe> {
        self.layers[i]
            .moe
            .as_mut()
            .ok_or_else(|| bad_step(key, "no MoE in progress (the router runs first)"))
    }
}

/// Runs `input_ids` through this rank's model by walking its inference description: the logits
/// `[batch, seq, vocab]`.
pub(super) fn walk<E: Exec + ?Sized, C: Communicator + ?Sized>(
    e: &E,
    ctx: &Ctx<'_, C>,
    input_ids: Tensor<2, Int>,
) -> Result<Tensor<3>> {
    let model = e.model();
    let schedule = desc::inference(model.config(), model.connectivity(), E::SPLIT);
    let mut logits = None;
    walk_forward(e, ctx, &schedule.steps, vec![(input_ids, 0)], |_, full| {
        logits = Some(ctx.compute(None, ops::HEAD, || model.logits(full)));
        Ok(())
    })?;
    logits.ok_or_else(|| ScheduleError::Description("the description has no head".into()))
}

/// Runs the two halves of `input_ids` (along the sequence) through this rank's model as two micro-batches,
/// walking the two-micro-batch form of its inference description ([`desc::two_micro_batches`]: each half's
/// steps cut before every wait and interleaved, so one half computes while the other's collective is in
/// flight): the logits of both halves joined along the sequence. The second half's attention reads the first
/// half's keys and values.
pub(super) fn walk_two<E: Exec + ?Sized, C: Communicator + ?Sized>(
    e: &E,
    ctx: &Ctx<'_, C>,
    halves: [(Tensor<2, Int>, usize); 2],
) -> Result<Tensor<3>> {
    let model = e.model();
    let one = desc::inference(model.config(), model.connectivity(), E::SPLIT);
    let schedule = desc::two_micro_batches(&one);
    let mut logits: [Option<Tensor<3>>; 2] = [None, None];
    walk_forward(e, ctx, &schedule.steps, halves.to_vec(), |m, full| {
        logits[m] = Some(ctx.compute(None, ops::HEAD, || model.logits(full)));
        Ok(())
    })?;
    match logits {
        [Some(a), Some(b)] => Ok(Tensor::cat(vec![a, b], 1)),
        _ => Err(ScheduleError::Description(
            "a micro-batch never reached the head".into(),
        )),
    }
}

fn pos(caches: &mut [LayerKvCache], offset: usize, i: usize) -> Pos<'_> {
    Pos {
        offset,
        cache: caches.get_mut(i),
    }
}

/// A micro-batch collective's own name (`dispatch` of micro-batch 1 → `dispatch.mb1`): each half's collective is
/// its own (and its own link entry).
fn micro_key(key: &OpKey, micro_batches: usize) -> OpKey {
    let names = match key.op {
        ops::DISPATCH => tbo_ops::DISPATCH,
        ops::COMBINE => tbo_ops::COMBINE,
        ops::AR_ATTN => tbo_ops::AR_ATTN,
        ops::AR_MOE => tbo_ops::AR_MOE,
        _ => return *key,
    };
    if micro_batches < 2 {
        return *key;
    }
    OpKey {
        op: names[usize::from(key.micro) % 2],
        ..*key
    }
}

/// Walks the forward `steps` of a description on one input per micro-batch (`(ids, absolute position of the
/// first token)`; the steps' `micro` picks one), up to each micro-batch's head, where `at_head(micro, R)` gets the
/// final norm's input (inference takes the logits, training its loss). Returns the number of steps walked.
pub(crate) fn walk_forward<E: Exec + ?Sized, C: Communicator + ?Sized>(
    e: &E,
    ctx: &Ctx<'_, C>,
    steps: &[Step],
    inputs: Vec<(Tensor<2, Int>, usize)>,
    mut at_head: impl FnMut(usize, Tensor<3>) -> Result<()>,
) -> Result<usize> {
    let model = e.model();
    let conn = model.connectivity();
    let n = model.layers.len();
    let micro_batches = inputs.len();
    let new_walk = || -> Walk<'_, E> {
        Walk {
            exec: e,
            model,
            pair_rule: desc::overlap_depth(conn) <= 1,
            s: None,
            made: Made::Plain,
            landed: Vec::new(),
            layers: (0..n)
                .map(|_| Layer {
                    attn: None,
                    r: None,
                    post: None,
                    moe: None,
                    mlp: None,
                    issued: false,
                })
                .collect(),
            current: None,
            routed: (0..n).map(|_| None).collect(),
            waited: Default::default(),
        }
    };
    let mut walks: Vec<Walk<'_, E>> = (0..micro_batches).map(|_| new_walk()).collect();
    let offsets: Vec<usize> = inputs.iter().map(|(_, o)| *o).collect();
    let mut inputs: Vec<Option<Tensor<2, Int>>> =
        inputs.into_iter().map(|(ids, _)| Some(ids)).collect();
    // Micro-batches that start at different positions are pieces of the same sequences: they share each
    // layer's keys and values (the later half attends to the earlier one). At the same position they are
    // different sequences (a batch cut by rows), each attending to itself.
    let one_sequence = offsets.windows(2).any(|w| w[0] != w[1]);
    let mut caches: Vec<LayerKvCache> = if one_sequence {
        (0..n).map(|_| LayerKvCache::default()).collect()
    } else {
        Vec::new()
    };
    let mut finished = 0;
    let layer_of = |key: &OpKey| -> Result<usize> {
        key.layer
            .filter(|&i| i < n)
            .ok_or_else(|| bad_step(key, &format!("the model has {n} layers")))
    };
    for (index, step) in steps.iter().enumerate() {
        let key = match step {
            Step::Compute(k) | Step::Issue { key: k, .. } | Step::Wait(k) => k,
        };
        let micro = usize::from(key.micro);
        let offset = offsets.get(micro).copied().unwrap_or_default();
        e.micro(micro);
        let w = walks
            .get_mut(micro)
            .ok_or_else(|| bad_step(key, &format!("micro-batch {micro} of {micro_batches}")))?;
        let ck = micro_key(key, micro_batches);
        match step {
            Step::Compute(key) if key.op == ops::COMBINE => {
                // The join of the oldest waited collective (inference traces it without a layer).
                let (k, waited) = w
                    .waited
                    .pop_front()
                    .ok_or_else(|| bad_step(key, "joins a collective nobody waited for"))?;
                if key.layer.is_some_and(|l| l != k) {
                    return Err(bad_step(
                        key,
                        &format!("the oldest waited collective is layer {k}'s"),
                    ));
                }
                let r = e.join(ctx, k, waited)?;
                w.landed.push((k, r));
            }
            Step::Compute(key) if key.layer.is_none() => match key.op {
                ops::HEAD => match inputs[micro].take() {
                    Some(ids) => w.s = Some(e.embed(ctx, ids)),
                    None => {
                        if let Some(c) = w.current.take() {
                            w.settle(key, c)?;
                        }
                        let (full, from) = w.fold(key)?;
                        e.formed_r(None, &from, &full);
                        at_head(micro, full)?;
                        finished += 1;
                        if finished == micro_batches {
                            return Ok(index + 1);
                        }
                    }
                },
                _ => return Err(bad_step(key, "is not a step of the embedding or head")),
            },
            Step::Compute(key) if key.op == ops::EXPERTS_2 => {
                // The second part of a layer's experts may run after the walker has left the layer (which then
                // holds its combine back until this part is done).
                let i = layer_of(key)?;
                let moe = w.moe_mut(key, i)?;
                e.moe_step(ctx, key, moe)?;
            }
            Step::Compute(key) => {
                let i = layer_of(key)?;
                w.enter(key, i)?;
                let layer = &model.layers[i];
                match key.op {
                    ops::ATTN_1 => {
                        let x = if matches!(
                            w.variant(i),
                            Some(FarSkipVariant::Full | FarSkipVariant::AttnOnly)
                        ) {
                            w.settled(key)?
                        } else {
                            w.r(key, i)?
                        };
                        let a = e.attn_1(ctx, i, x, pos(&mut caches, offset, i))?;
                        w.layers[i].attn = Some(Attention::Running(a));
                    }
                    ops::ATTN_2 | ops::ATTN => {
                        let a = w.take_attn(key, i)?;
                        match e.attn_step(ctx, key, a, pos(&mut caches, offset, i))? {
                            Attention::Done(a) => w.attention_done(key, i, a)?,
                            running => w.layers[i].attn = Some(running),
                        }
                    }
                    ops::ROUTER => {
                        let m = w.ffn_input(key, i)?;
                        w.layers[i].moe = Some(e.router(ctx, i, m)?);
                    }
                    ops::EXPERTS | ops::EXPERTS_1 | ops::SHARED => {
                        let moe = w.moe_mut(key, i)?;
                        e.moe_step(ctx, key, moe)?;
                    }
                    ops::MLP => {
                        let Ffn::Dense(mlp) = &layer.ffn else {
                            return Err(bad_step(key, "the layer is not dense"));
                        };
                        let x = w.ffn_input(key, i)?;
                        let out = ctx.compute(Some(i), ops::MLP, || {
                            mlp.forward(layer.post_norm.forward(x))
                        });
                        w.layers[i].mlp = Some(out);
                    }
                    _ => return Err(bad_step(key, "is not an inference step")),
                }
            }
            Step::Issue { key, .. } => {
                let i = layer_of(key)?;
                match key.op {
                    ops::DISPATCH => {
                        let moe = w.moe_mut(key, i)?;
                        e.dispatch_issue(ctx, &ck, moe)?;
                    }
                    ops::COMBINE | ops::AR_MOE => {
                        let moe = w.moe_mut(key, i)?;
                        let routed = e.routed_issue(ctx, &ck, moe)?;
                        w.routed[i] = Some(routed);
                        w.layers[i].issued = true;
                        if w.current != Some(i) {
                            // Issued after the layer settled (held back behind the next dispatch).
                            w.layers[i].moe = None;
                        }
                    }
                    ops::AR_ATTN => {
                        let a = w.take_attn(key, i)?;
                        w.layers[i].attn = Some(Attention::Running(e.attn_issue(ctx, &ck, a)?));
                    }
                    _ => return Err(bad_step(key, "is not a collective")),
                }
            }
            Step::Wait(key) => {
                let i = layer_of(key)?;
                match key.op {
                    ops::DISPATCH => {
                        let moe = w.moe_mut(key, i)?;
                        e.dispatch_wait(ctx, &ck, moe)?;
                    }
                    ops::COMBINE | ops::AR_MOE => {
                        let r = w.routed[i]
                            .take()
                            .ok_or_else(|| bad_step(key, "waits for a collective never issued"))?;
                        let waited = e.routed_wait(ctx, r)?;
                        if E::JOIN_STEP {
                            w.waited.push_back((i, waited));
                        } else {
                            let r = e.join(ctx, i, waited)?;
                            w.landed.push((i, r));
                        }
                    }
                    ops::AR_ATTN => {
                        let a = w.take_attn(key, i)?;
                        let a = e.attn_wait(ctx, &ck, a)?;
                        w.attention_done(key, i, a)?;
                    }
                    _ => return Err(bad_step(key, "is not a collective")),
                }
            }
        }
    }
    Err(ScheduleError::Description(
        "the description ends before the head".into(),
    ))
}

#[cfg(test)]
mod tests {
    use burn::prelude::*;
    use farskip_model::config::ModelConfig;
    use farskip_model::{Connectivity, Model};

    use super::*;
    use crate::comm::SingleRank;
    use crate::schedule::EpRank;
    use crate::trace::{Phase, Trace};

    fn rank(conn: Connectivity) -> (EpRank, Tensor<2, Int>) {
        let device = Device::flex();
        let config = ModelConfig::small_moe(64, 32, 3, 4, 2, 8, 4, 2, 16, None);
        let model = Model::new(&config, &device)
            .unwrap()
            .with_connectivity(conn)
            .unwrap();
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 3], [1, 4]), &device);
        (EpRank::new(&model, 0, 1).unwrap(), ids)
    }

    fn run(r: &EpRank, steps: &[Step], ids: Tensor<2, Int>) -> Result<usize> {
        let (comm, trace) = (SingleRank::new(), Trace::new());
        let ctx = Ctx {
            comm: &comm,
            trace: &trace,
            phase: Phase::Forward,
        };
        walk_forward(r, &ctx, steps, vec![(ids, 0)], |_, _| Ok(()))
    }

    #[test]
    fn every_description_walks_to_its_head() {
        for conn in [
            "standard",
            "farskip",
            "farskip-d2",
            "farskip:1..=2",
            "farskip-attn-only",
        ] {
            let (r, ids) = rank(conn.parse().unwrap());
            let d = desc::inference(r.model().config(), r.model().connectivity(), Split::Expert);
            assert_eq!(run(&r, &d.steps, ids).unwrap(), d.steps.len(), "{conn}");
        }
    }

    #[test]
    fn a_step_out_of_order_is_an_error_naming_it() {
        let (r, ids) = rank(Connectivity::Standard);
        let mut d = desc::inference(r.model().config(), r.model().connectivity(), Split::Expert);
        // The router of a stock layer before its attention: it reads a stream that does not exist yet.
        let at = d
            .steps
            .iter()
            .position(|s| matches!(s, Step::Compute(k) if k.op == ops::ROUTER))
            .unwrap();
        let router = d.steps.remove(at);
        let attn = d
            .steps
            .iter()
            .position(|s| matches!(s, Step::Compute(k) if k.op == ops::ATTN_2))
            .unwrap();
        d.steps.insert(attn, router);
        let err = run(&r, &d.steps, ids.clone()).unwrap_err().to_string();
        assert!(err.contains("`router` of layer Some(0)"), "{err}");
        assert!(err.contains("before attention"), "{err}");
        // A wait for a collective never issued.
        let mut d = desc::inference(r.model().config(), r.model().connectivity(), Split::Expert);
        d.steps
            .retain(|s| !matches!(s, Step::Issue { key, .. } if key.op == ops::COMBINE && key.layer == Some(1)));
        let err = run(&r, &d.steps, ids.clone()).unwrap_err().to_string();
        assert!(err.contains("never issued"), "{err}");
        // A description cut before the head.
        let d = desc::inference(r.model().config(), r.model().connectivity(), Split::Expert);
        let err = run(&r, &d.steps[..d.steps.len() - 1], ids)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ends before the head"), "{err}");
    }
}
