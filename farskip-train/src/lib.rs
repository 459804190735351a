//! Far-Collective Self-Distillation (FCSD) training support for FarSkip MoE models (DESIGN.md §2).
//!
//! - [`losses`]: the FCSD KL loss, the cross-entropy (SFT) and KL + L2 baselines, and logging metrics.
//! - [`data`]: byte-level and Hugging Face tokenized corpora, the train/validation split, seeded batches.
//! - [`early_stop`]: early stopping with a guard against late mode collapse, and the non-finite loss check.
//! - [`plot`]: SVG loss curves and terminal/plain progress output.
#![warn(missing_docs)]

pub mod data;
pub mod early_stop;
pub mod eval;
pub mod learner;
pub mod losses;
pub mod plot;

pub use eval::{Evaluation, TeacherLogits, evaluate};
pub use learner::{
    DistillStep, EarlyStopConfig, Method, TrainConfig, TrainData, TrainError, TrainOutcome, train,
};
pub mod recipe;
pub use recipe::{RecipeConfig, RecipeReport, run_recipe};
