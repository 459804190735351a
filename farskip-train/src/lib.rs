//! Far-Collective Self-Distillation (FCSD) training support for FarSkip MoE models (DESIGN.md §2): the converted
//! model (the student) learns the original model's (the teacher's) next-token distributions by forward KL.
//!
//! ```
//! use burn::prelude::*;
//! use farskip_model::{Connectivity, Model, ModelConfig};
//! use farskip_train::data::{BatchShape, ByteCorpus, RandomBatches, ValidationSet};
//! use farskip_train::{Method, TeacherLogits, TrainConfig, TrainData, train};
//!
//! let device = Device::flex();
//! let text = "the quick brown fox jumps over the lazy dog. ".repeat(30);
//! let split = ByteCorpus::from_text(&text)?.split(0.25)?;
//! let shape = BatchShape::new(16, 32)?; // 16 tokens per sequence, 2 sequences per batch
//! let valid = ValidationSet::new(split.valid, shape)?.truncated(2);
//!
//! let teacher = Model::new(&ModelConfig::small_moe(256, 32, 2, 2, 1, 16, 4, 2, 32, None), &device)?;
//! let student = teacher.clone().with_connectivity(Connectivity::farskip())?;
//! let teacher_logits = TeacherLogits::new(&teacher, &valid, &device);
//! let cfg = TrainConfig::new("fcsd", Method::Fcsd { temperature: 1.0 }, 2, 1e-3);
//! let data = TrainData {
//!     batches: RandomBatches::new(split.train, shape, cfg.seed, &device)?,
//!     valid: &valid,
//!     teacher_logits: Some(&teacher_logits),
//! };
//! let outcome = train(student, Some(&teacher), data, &cfg)?;
//! assert_eq!(outcome.steps_run, 2);
//! let (_, eval) = outcome.curves.valid.last().expect("evaluated at the last step");
//! assert!(eval.kl.expect("KL to the teacher").is_finite());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! - [`losses`]: the FCSD KL loss, the cross-entropy (SFT) and KL + L2 baselines, and logging metrics.
//! - [`learner`]: [`Method`], [`TrainConfig`], the burn-train step [`DistillStep`] and the [`train`] loop (evaluation,
//!   early stopping, checkpoint/resume).
//! - [`data`]: byte-level and Hugging Face tokenized corpora, the train/validation split, seeded batches.
//! - [`optim`]: AdamW fused into one pass per parameter on the CPU (burn's AdamW state, so checkpoints carry over).
//! - [`eval`]: held-out loss, perplexity, and agreement and KL with the teacher.
//! - [`ep`]: expert-parallel training on in-process ranks (`TrainConfig::world > 1`), equal to one process up to
//!   float rounding.
//! - [`early_stop`]: early stopping with a guard against late mode collapse, and the non-finite loss check.
//! - [`recipe`]: the end-to-end recipe (teacher, conversion, FCSD / SFT / KL + L2, report).
//! - [`distill`]: a user's checkpoint converted, recovered with FCSD and saved as a FarSkip HF checkpoint.
//! - [`sweep`]: the conversion sweep (a share of the layers from the first or the last, no training).
//! - [`plot`]: SVG loss curves and terminal/plain progress output.
#![warn(missing_docs)]

pub mod data;
pub mod distill;
pub mod early_stop;
pub mod ep;
pub mod eval;
pub mod learner;
pub mod losses;
pub mod optim;
pub mod plot;

pub use eval::{Evaluation, TeacherLogits, evaluate};
pub use learner::{
    DistillStep, EarlyStopConfig, Method, TrainConfig, TrainData, TrainError, TrainOutcome, train,
};
pub mod recipe;
pub mod sweep;
pub use distill::{DistillConfig, DistillReport, run_distill};
pub use recipe::{RecipeConfig, RecipeReport, run_recipe};
pub use sweep::{SweepReport, run_sweep};
