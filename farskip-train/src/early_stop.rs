//! Early stopping on a held-out metric, and the non-finite loss guard.
//!
//! The paper saw late mode collapse in self-distillation: the held-out metric improves, then suddenly gets much
//! worse. [`EarlyStopping`] therefore stops on two conditions: `patience` evaluations in a row without a relative
//! improvement, or at once when the metric is worse than the best by more than `max_rel_degradation`. Either way
//! the caller should keep the checkpoint of `best_step`. What does not live here: evaluation and checkpointing.

use thiserror::Error;

/// Whether a lower or a higher metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Objective {
    /// Lower is better (a loss, a KL, a perplexity).
    #[default]
    Minimize,
    /// Higher is better (an accuracy, a task score).
    Maximize,
}

/// What to do after an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Keep training.
    Continue,
    /// Stop training and restore the best checkpoint.
    Stop {
        /// Why training stopped.
        reason: StopReason,
        /// The step with the best metric so far; `None` if no finite metric was seen.
        best_step: Option<usize>,
    },
}

/// Why [`EarlyStopping`] stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    /// `patience` evaluations in a row brought no sufficient improvement.
    Patience {
        /// Evaluations since the best one.
        evals_without_improvement: usize,
    },
    /// The metric degraded by more than `max_rel_degradation` relative to the best (mode collapse guard).
    Degraded {
        /// The metric at this evaluation.
        value: f64,
        /// The best metric so far.
        best: f64,
        /// `|value − best| / |best|`.
        rel_degradation: f64,
    },
    /// The metric was NaN or infinite.
    NonFinite {
        /// The metric at this evaluation.
        value: f64,
    },
}

/// An invalid early-stopping parameter.
#[derive(Debug, Error, PartialEq)]
#[error("early stopping: {name} = {value} is invalid, expected {expected}")]
pub struct InvalidParameter {
    /// The parameter at fault.
    pub name: &'static str,
    /// Its value.
    pub value: f64,
    /// What it must be.
    pub expected: &'static str,
}

/// A NaN or infinite training loss.
#[derive(Debug, Error, PartialEq)]
#[error("non-finite loss {value} at step {step}")]
pub struct NonFiniteLoss {
    /// The step whose loss is not finite.
    pub step: usize,
    /// The loss value.
    pub value: f64,
}

/// Errors with [`NonFiniteLoss`] naming `step` if `loss` is NaN or infinite.
pub fn check_finite(step: usize, loss: f64) -> Result<(), NonFiniteLoss> {
    if loss.is_finite() {
        Ok(())
    } else {
        Err(NonFiniteLoss { step, value: loss })
    }
}

/// Early stopping with patience and a degradation guard; see the module docs.
#[derive(Debug, Clone)]
pub struct EarlyStopping {
    patience: usize,
    min_rel_improvement: f64,
    max_rel_degradation: f64,
    objective: Objective,
    best: Option<(usize, f64)>,
    evals_without_improvement: usize,
    stopped: Option<Decision>,
}

impl EarlyStopping {
    /// A lower-is-better stopper.
    ///
    /// - `patience` ≥ 1: evaluations in a row without improvement before stopping;
    /// - `min_rel_improvement` ≥ 0: an improvement counts when it beats the best by this fraction of `|best|`;
    /// - `max_rel_degradation` > 0 (may be infinite to disable): stop at once when worse than the best by more
    ///   than this fraction of `|best|`.
    pub fn new(
        patience: usize,
        min_rel_improvement: f64,
        max_rel_degradation: f64,
    ) -> Result<Self, InvalidParameter> {
        let invalid = |name, value, expected| {
            Err(InvalidParameter {
                name,
                value,
                expected,
            })
        };
        if patience == 0 {
            return invalid("patience", 0.0, "at least 1");
        }
        if !(min_rel_improvement.is_finite() && min_rel_improvement >= 0.0) {
            return invalid(
                "min_rel_improvement",
                min_rel_improvement,
                "finite and >= 0",
            );
        }
        if max_rel_degradation.is_nan() || max_rel_degradation <= 0.0 {
            return invalid(
                "max_rel_degradation",
                max_rel_degradation,
                "> 0 (infinity disables it)",
            );
        }
        Ok(Self {
            patience,
            min_rel_improvement,
            max_rel_degradation,
            objective: Objective::Minimize,
            best: None,
            evals_without_improvement: 0,
            stopped: None,
        })
    }

    /// The same stopper with the given objective.
    pub fn with_objective(mut self, objective: Objective) -> Self {
        self.objective = objective;
        self
    }

    /// The best `(step, metric)` so far.
    pub fn best(&self) -> Option<(usize, f64)> {
        self.best
    }

    /// Records the metric of the evaluation at `step`. Once it has said `Stop`, it keeps saying the same.
    pub fn observe(&mut self, step: usize, metric: f64) -> Decision {
        if let Some(stopped) = &self.stopped {
            return stopped.clone();
        }
        let decision = self.decide(step, metric);
        if let Decision::Stop { .. } = decision {
            self.stopped = Some(decision.clone());
        }
        decision
    }

    fn decide(&mut self, step: usize, metric: f64) -> Decision {
        let best_step = self.best.map(|(s, _)| s);
        let stop = |reason| Decision::Stop { reason, best_step };
        if !metric.is_finite() {
            return stop(StopReason::NonFinite { value: metric });
        }
        let Some((_, best)) = self.best else {
            self.best = Some((step, metric));
            return Decision::Continue;
        };
        // Positive when `metric` is better than `best`, in units of |best| (absolute when best is 0).
        let gain = match self.objective {
            Objective::Minimize => best - metric,
            Objective::Maximize => metric - best,
        };
        let scale = if best == 0.0 { 1.0 } else { best.abs() };
        let rel_gain = gain / scale;
        if -rel_gain > self.max_rel_degradation {
            return stop(StopReason::Degraded {
                value: metric,
                best,
                rel_degradation: -rel_gain,
            });
        }
        if rel_gain > self.min_rel_improvement {
            self.best = Some((step, metric));
            self.evals_without_improvement = 0;
            return Decision::Continue;
        }
        self.evals_without_improvement += 1;
        if self.evals_without_improvement >= self.patience {
            return stop(StopReason::Patience {
                evals_without_improvement: self.evals_without_improvement,
            });
        }
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_at_the_collapse_and_keeps_the_best_step() {
        // Validation KL every 100 steps: falls, wobbles within 5%, then explodes (mode collapse) at step 800.
        let curve = [2.0, 1.2, 0.8, 0.6, 0.55, 0.57, 0.54, 0.56, 3.5, 4.0];
        let mut stopper = EarlyStopping::new(5, 0.01, 0.5).expect("valid");
        let decisions: Vec<_> = curve
            .iter()
            .enumerate()
            .map(|(i, &v)| (i * 100, stopper.observe(i * 100, v)))
            .collect();
        let first_stop = decisions
            .iter()
            .position(|(_, d)| *d != Decision::Continue)
            .expect("must stop");
        assert_eq!(
            decisions[first_stop].0, 800,
            "stops at the collapse, not before or after"
        );
        match &decisions[first_stop].1 {
            Decision::Stop {
                reason:
                    StopReason::Degraded {
                        value,
                        best,
                        rel_degradation,
                    },
                best_step,
            } => {
                assert_eq!((*value, *best, *best_step), (3.5, 0.54, Some(600)));
                assert!((rel_degradation - (3.5 - 0.54) / 0.54).abs() < 1e-12);
            }
            other => panic!("expected a degradation stop, got {other:?}"),
        }
        assert_eq!(decisions[9].1, decisions[8].1, "stays stopped");
        assert_eq!(stopper.best(), Some((600, 0.54)));
    }

    #[test]
    fn counts_patience_in_evaluations_without_relative_improvement() {
        let mut stopper = EarlyStopping::new(3, 0.01, f64::INFINITY).expect("valid");
        assert_eq!(stopper.observe(0, 1.0), Decision::Continue);
        assert_eq!(
            stopper.observe(1, 0.995),
            Decision::Continue,
            "0.5% is below min_rel_improvement: 1 strike"
        );
        assert_eq!(
            stopper.observe(2, 0.98),
            Decision::Continue,
            "2% improvement resets the count"
        );
        assert_eq!(stopper.observe(3, 0.975), Decision::Continue); // 1
        assert_eq!(stopper.observe(4, 5.0), Decision::Continue); // 2; degradation guard disabled
        let decision = stopper.observe(5, 0.98);
        let reason = StopReason::Patience {
            evals_without_improvement: 3,
        };
        assert_eq!(
            decision,
            Decision::Stop {
                reason,
                best_step: Some(2)
            }
        );
    }

    #[test]
    fn maximize_tracks_the_highest_metric() {
        let mut stopper = EarlyStopping::new(2, 0.0, 0.2)
            .expect("valid")
            .with_objective(Objective::Maximize);
        for (step, acc) in [(0, 0.30), (1, 0.50), (2, 0.55), (3, 0.54)] {
            assert_eq!(stopper.observe(step, acc), Decision::Continue);
        }
        assert_eq!(stopper.best(), Some((2, 0.55)));
        // 0.40 is 27% below 0.55.
        assert!(matches!(
            stopper.observe(4, 0.40),
            Decision::Stop {
                reason: StopReason::Degraded { .. },
                best_step: Some(2)
            }
        ));
    }

    #[test]
    fn nan_metric_stops() {
        let mut stopper = EarlyStopping::new(3, 0.0, 1.0).expect("valid");
        assert_eq!(stopper.observe(10, 1.0), Decision::Continue);
        let decision = stopper.observe(20, f64::NAN);
        assert!(matches!(
            decision,
            Decision::Stop {
                reason: StopReason::NonFinite { .. },
                best_step: Some(10)
            }
        ));
    }

    #[test]
    fn check_finite_names_the_step() {
        assert_eq!(check_finite(3, 1.5), Ok(()));
        let err = check_finite(1234, f64::NAN).expect_err("NaN");
        assert_eq!(err.step, 1234);
        assert_eq!(err.to_string(), "non-finite loss NaN at step 1234");
        assert_eq!(
            check_finite(7, f64::INFINITY).unwrap_err().to_string(),
            "non-finite loss inf at step 7"
        );
    }

    #[test]
    fn rejects_invalid_parameters() {
        assert_eq!(
            EarlyStopping::new(0, 0.0, 1.0).unwrap_err().name,
            "patience"
        );
        assert_eq!(
            EarlyStopping::new(1, -0.1, 1.0).unwrap_err().name,
            "min_rel_improvement"
        );
        let err = EarlyStopping::new(1, 0.0, f64::NAN).unwrap_err();
        assert_eq!(err.name, "max_rel_degradation");
        assert!(
            err.to_string()
                .starts_with("early stopping: max_rel_degradation = NaN is invalid"),
            "{err}"
        );
    }
}
