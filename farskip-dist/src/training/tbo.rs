//! Expert-parallel training with two-micro-batch overlap (TBO, the schedule-only baseline; standard
//! connectivity only).
//!
//! Each rank splits its windows by rows into half 0 (the first `batch / 2` rows) and half 1 (the rest) and walks
//! the two-micro-batch training description ([`desc::training_tbo`], the one the planner simulates) with the
//! training walker, so that one half's collective is in flight while the other half computes. Per layer i, with
//! `attn` = norm + attention, `begin` = norm + router + slot gather + async dispatch, `end` = wait dispatch +
//! experts + async combine + shared expert, `join` = wait combine + weighted combine + residual:
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
//! Each half's loss is weighted ½ so that the two add up to the whole batch's. The step's loss and gradients
//! equal [`EpTrainRank::step_on`]'s up to float rounding.

use burn::prelude::*;
use farskip_model::{Connectivity, ModelError};

use super::walk::Micro;
use super::{EpTrainRank, Objective, RankStep, Result, same_ranks};
use crate::comm::Communicator;
use crate::plan::desc;
use crate::schedule::ScheduleError;
use crate::trace::Trace;

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
        same_ranks(comm, grad_comm)?;
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
        let (x_ids, y_ids) = self.inputs_and_targets(windows, objective)?;
        let half = b / 2;
        let micro = (0..2)
            .map(|mb| {
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
                Micro {
                    x_ids: x_ids.clone().narrow(0, mb * half, half),
                    y_ids: y_ids.clone().narrow(0, mb * half, half),
                    objective,
                    weight: 0.5,
                }
            })
            .collect();
        let schedule = desc::training_tbo(self.model.config());
        self.step_walk(comm, grad_comm, trace, micro, &schedule)
    }
}

#[cfg(test)]
mod tests {
    use crate::schedule::tbo_ops;
    use crate::training::bwd_ops;

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
