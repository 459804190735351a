//! Two-micro-batch overlap (TBO): the schedule-only answer to blocking collectives that the field uses without
//! changing the model (SGLang's two-batch overlap, the idea behind DeepSeek's DualPipe). Each rank splits its
//! tokens into two halves along the sequence — the first half (micro-batch 0) and the second (micro-batch 1) —
//! and walks the two-micro-batch form of its inference description (`plan::desc::two_micro_batches`): each
//! half's steps cut before every wait and interleaved, so that one half's collective is in flight while the
//! other half computes:
//!
//! - EP: `attention, router, dispatch` of half 0 then half 1; `wait dispatch, experts, combine, shared` of half
//!   0 then half 1; `wait combine` and the next layer's attention … Half 0's dispatch hides behind half 1's
//!   attention, half 1's behind half 0's experts, half 0's combine behind half 1's experts, half 1's behind half
//!   0's next attention.
//! - TP: attention and its all-reduce per half, then the MoE and its all-reduce per half.
//!
//! The halves are a chunked prefill: half 1's attention reads half 0's keys and values of the same layer from a
//! per-layer cache (half 0's projection always runs first), so the result is the single-micro-batch model's up to
//! float rounding. Standard connectivity, or FarSkip at skip depth 1 (`farskip+tbo`: a converted layer's
//! attention also hides the previous routed collective of its own half).

use burn::prelude::*;
use farskip_model::{Connectivity, Model, ModelError};

use super::{Ctx, EpRank, Result, ScheduleError, TpRank, walk};
use crate::comm::Communicator;
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

impl EpRank {
    /// The forward pass of this rank's sequences with two-micro-batch overlap: equals [`EpRank::forward`] of
    /// the same model up to float rounding. Standard connectivity, or FarSkip at skip depth 1 (`farskip+tbo`).
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq ≥ 2]` (this rank's rows) -> `[batch, seq, vocab]`
    pub fn forward_tbo<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        trace: &Trace,
        input_ids: Tensor<2, Int>,
    ) -> Result<Tensor<3>> {
        depth_one(&self.model)?;
        let ctx = Ctx {
            comm,
            trace,
            phase: Phase::Forward,
        };
        walk::walk_two(self, &ctx, halves(input_ids)?)
    }
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
        depth_one(&self.model)?;
        let ctx = Ctx {
            comm,
            trace,
            phase: Phase::Forward,
        };
        walk::walk_two(self, &ctx, halves(input_ids)?)
    }
}
