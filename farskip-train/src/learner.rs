//! The FCSD learner: a student (FarSkip connectivity, trainable) learns from a frozen teacher (the original
//! model, no autodiff) by forward KL; SFT (cross-entropy on the data) and KL + L2 on hidden states are the
//! baselines, and `Pretrain` trains a model from scratch with the same loop.
//!
//! The step is a burn-train [`TrainStep`] / [`InferenceStep`] ([`DistillStep`]), so it also runs under
//! burn-train's `Learner` / `SupervisedTraining`. [`train`] drives it step by step, which the paper's recipe
//! needs: evaluation every N steps, early stopping with patience and a relative-degradation guard, checkpoints
//! that resume bit-for-bit, and a non-finite loss check that names the step.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::grad_clipping::GradientClippingConfig;
use burn::lr_scheduler::{
    LrSchedulerConfig, cosine::CosineAnnealingLrSchedulerConfig, linear::LinearLrSchedulerConfig,
    module_lr_scheduler::ModuleLrScheduler, sequential::SequentialLrSchedulerConfig,
};
use burn::module::Module;
use burn::optim::ModuleOptimizer;

use crate::optim::FusedAdamWConfig;
use burn::prelude::*;
use burn::train::{InferenceStep, RegressionOutput, TrainOutput, TrainStep};
use farskip_model::Model;
use serde::{Deserialize, Serialize};

use crate::data::{RandomBatches, ValidationSet, inputs_targets};
use crate::early_stop::{Decision, EarlyStopping, check_finite};
use crate::ep::EpTrainer;
use crate::eval::{Evaluation, TeacherLogits, evaluate};
use crate::losses::{cross_entropy, kl_distill, kl_l2};
use crate::plot::ProgressReporter;

/// What the student is trained to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Method {
    /// Cross-entropy on the data, no teacher (training a model from scratch).
    Pretrain,
    /// FCSD: `T² · KL(teacher ‖ student)` per token.
    Fcsd {
        /// Softmax temperature (the paper uses 1).
        temperature: f64,
    },
    /// Supervised fine-tuning of the converted model on the data (baseline).
    Sft,
    /// KL plus the mean squared difference of the full residual stream after every intermediate layer (every layer
    /// but the last; see `farskip_dist::training::l2_compared_layers`) (baseline, the paper's KL + L2).
    KlL2 {
        /// Softmax temperature.
        temperature: f64,
        /// Weight of the hidden-state term.
        l2_weight: f64,
    },
}

impl Method {
    /// Whether the method needs a teacher.
    pub fn needs_teacher(&self) -> bool {
        matches!(self, Self::Fcsd { .. } | Self::KlL2 { .. })
    }
    /// Short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pretrain => "pretrain",
            Self::Fcsd { .. } => "fcsd",
            Self::Sft => "sft",
            Self::KlL2 { .. } => "kl_l2",
        }
    }
}

/// Errors of the learner.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A loss became NaN or infinite.
    #[error("training {label}: {source}")]
    NonFinite {
        /// The run.
        label: String,
        /// Step and value.
        #[source]
        source: crate::early_stop::NonFiniteLoss,
    },
    /// A setting is invalid.
    #[error("invalid training setting `{key}`: {message}")]
    InvalidConfig {
        /// The setting.
        key: &'static str,
        /// Why.
        message: String,
    },
    /// The method needs a teacher and none was given.
    #[error("method {0} needs a teacher model")]
    MissingTeacher(&'static str),
    /// The expert-parallel world failed (a rank's error, or every rank's when several failed).
    #[error("training {label} on {world} expert-parallel ranks: {message}")]
    Distributed {
        /// The run.
        label: String,
        /// Ranks in the world.
        world: usize,
        /// What went wrong, naming the rank.
        message: String,
    },
    /// A checkpoint could not be written or read.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file at fault.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// One training step as burn-train sees it: the student, the frozen teacher and the loss.
#[derive(Module, Debug)]
pub struct DistillStep {
    /// The trainable student.
    pub student: Model,
    #[module(skip)]
    teacher: Option<Model>,
    #[module(skip)]
    method: Method,
}

impl DistillStep {
    /// A step for `method`; the teacher is kept without autodiff (`valid()`).
    pub fn new(
        student: Model,
        teacher: Option<&Model>,
        method: Method,
    ) -> Result<Self, TrainError> {
        if method.needs_teacher() && teacher.is_none() {
            return Err(TrainError::MissingTeacher(method.name()));
        }
        Ok(Self {
            student,
            teacher: teacher.map(Module::valid),
            method,
        })
    }

    /// The training loss on token windows `[batch, seq + 1]`.
    pub fn loss(&self, windows: Tensor<2, Int>) -> Tensor<1> {
        let (x, y) = inputs_targets(windows);
        let teacher = || self.teacher.as_ref().expect("checked in DistillStep::new");
        match &self.method {
            Method::Pretrain | Method::Sft => {
                cross_entropy(self.student.forward_unchecked(x, None), y)
            }
            Method::Fcsd { temperature } => {
                let t = teacher().forward_unchecked(x.clone(), None);
                kl_distill(self.student.forward_unchecked(x, None), t, *temperature)
            }
            Method::KlL2 {
                temperature,
                l2_weight,
            } => {
                let (tl, th) = teacher().forward_with_hidden(x.clone());
                let (sl, sh) = self.student.forward_with_hidden(x);
                // The intermediate layers: every layer's output stream but the last.
                let k = farskip_dist::training::l2_compared_layers(sh.len());
                kl_l2(sl, tl, &sh[..k], &th[..k], *temperature, *l2_weight)
            }
        }
    }

    fn output(loss: Tensor<1>) -> RegressionOutput {
        let device = loss.device();
        RegressionOutput::new(
            loss.clone(),
            loss.reshape([1, 1]),
            Tensor::zeros([1, 1], &device),
        )
    }
}

impl TrainStep for DistillStep {
    type Input = Tensor<2, Int>;
    type Output = RegressionOutput;
    fn step(&self, windows: Tensor<2, Int>) -> TrainOutput<RegressionOutput> {
        let loss = self.loss(windows);
        TrainOutput::new(self, loss.backward(), Self::output(loss))
    }
}

impl InferenceStep for DistillStep {
    type Input = Tensor<2, Int>;
    type Output = RegressionOutput;
    fn step(&self, windows: Tensor<2, Int>) -> RegressionOutput {
        Self::output(self.loss(windows))
    }
}

/// Early-stopping settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopConfig {
    /// Evaluations without improvement before stopping.
    pub patience: usize,
    /// Relative improvement that counts.
    pub min_rel_improvement: f64,
    /// Stop at once when the metric is this much (relative) worse than the best: the late-collapse guard.
    pub max_rel_degradation: f64,
}

/// Settings of one training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Run name (progress lines, errors, reports).
    pub label: String,
    /// The loss.
    pub method: Method,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Gradient-norm clipping.
    pub grad_clip: Option<f64>,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    /// Print a progress line every this many steps (without a TTY).
    pub log_every: usize,
    /// Early stopping, if any.
    pub early_stopping: Option<EarlyStopConfig>,
    /// Seed of the batch order.
    pub seed: u64,
    /// Where to write checkpoints (and resume from, if one is there).
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every this many steps.
    pub checkpoint_every: usize,
    /// Stop this invocation after this step (a later call with the same checkpoint directory resumes); `None`
    /// runs to `steps`.
    #[serde(default)]
    pub stop_after: Option<usize>,
    /// Ranks of expert-parallel training on an in-process world (threads of this process). 1 (the default) is
    /// the single-process loop; above 1 the steps run on [`crate::ep::EpTrainer`], which needs every layer MoE,
    /// standard or all-layer FarSkip connectivity, a batch whose rows divide by `world` and no checkpointing. The
    /// result equals single-process training up to float rounding.
    #[serde(default = "one")]
    pub world: usize,
}

fn one() -> usize {
    1
}

impl TrainConfig {
    /// Defaults for `method` over `steps` steps.
    pub fn new(label: impl Into<String>, method: Method, steps: usize, lr: f64) -> Self {
        Self {
            label: label.into(),
            method,
            steps,
            lr,
            min_lr: lr * 0.1,
            warmup_steps: (steps / 20).max(1),
            weight_decay: 0.01,
            grad_clip: Some(1.0),
            eval_every: (steps / 10).max(1),
            log_every: (steps / 20).max(1),
            early_stopping: None,
            seed: 0,
            checkpoint_dir: None,
            checkpoint_every: (steps / 4).max(1),
            stop_after: None,
            world: 1,
        }
    }

    fn validate(&self) -> Result<(), TrainError> {
        let bad = |key, message: String| Err(TrainError::InvalidConfig { key, message });
        if self.steps == 0 {
            return bad("steps", "must be > 0".into());
        }
        if !(self.lr > 0.0 && self.lr <= 1.0) {
            return bad("lr", format!("{} is not in (0, 1]", self.lr));
        }
        if !(self.min_lr > 0.0 && self.min_lr <= self.lr) {
            return bad("min_lr", format!("{} is not in (0, lr]", self.min_lr));
        }
        if self.warmup_steps >= self.steps {
            return bad(
                "warmup_steps",
                format!("{} must be below steps {}", self.warmup_steps, self.steps),
            );
        }
        if self.eval_every == 0 || self.checkpoint_every == 0 || self.log_every == 0 {
            return bad("eval_every", "intervals must be > 0".into());
        }
        if self.world == 0 {
            return bad("world", "must be >= 1".into());
        }
        if self.world > 1 && self.checkpoint_dir.is_some() {
            return bad(
                "world",
                format!(
                    "checkpointing is single-process only: unset checkpoint_dir or train with world 1 (got {})",
                    self.world
                ),
            );
        }
        Ok(())
    }

    fn scheduler(&self) -> Result<ModuleLrScheduler, TrainError> {
        let cosine = CosineAnnealingLrSchedulerConfig::new(self.lr, self.steps - self.warmup_steps)
            .with_min_lr(self.min_lr);
        let cfg = if self.warmup_steps == 0 {
            SequentialLrSchedulerConfig::new(vec![LrSchedulerConfig::Cosine(cosine)], vec![])
        } else {
            SequentialLrSchedulerConfig::new(
                vec![
                    LrSchedulerConfig::Linear(LinearLrSchedulerConfig::new(
                        self.lr / self.warmup_steps as f64,
                        self.lr,
                        self.warmup_steps,
                    )),
                    LrSchedulerConfig::Cosine(cosine),
                ],
                vec![self.warmup_steps],
            )
        };
        cfg.init()
            .map_err(|message| TrainError::InvalidConfig { key: "lr", message })
    }

    fn optimizer(&self) -> ModuleOptimizer {
        FusedAdamWConfig::new()
            .with_weight_decay(self.weight_decay as f32)
            .with_epsilon(1e-8)
            .with_grad_clipping(
                self.grad_clip
                    .map(|c| GradientClippingConfig::Norm(c as f32)),
            )
            .init()
    }

    /// [`TrainConfig::optimizer`] without gradient clipping: the expert-parallel ranks clip by themselves (an
    /// expert bank's norm spans every rank).
    pub(crate) fn unclipped_optimizer(&self) -> ModuleOptimizer {
        let mut cfg = self.clone();
        cfg.grad_clip = None;
        cfg.optimizer()
    }
}

/// Training and validation curves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Curves {
    /// `(step, training loss)` for every step.
    pub train: Vec<(usize, f64)>,
    /// `(step, evaluation)` at every evaluation.
    pub valid: Vec<(usize, Evaluation)>,
}

/// The result of [`train`].
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// The best model seen (by the early-stopping metric), without autodiff.
    pub model: Model,
    /// The curves.
    pub curves: Curves,
    /// Step of the best evaluation.
    pub best_step: usize,
    /// Steps actually run.
    pub steps_run: usize,
    /// Why training stopped before `steps`, if it did.
    pub stopped_early: Option<String>,
    /// Wall time.
    pub seconds: f64,
}

/// The data a run reads.
pub struct TrainData<'a> {
    /// Training batch stream (token windows).
    pub batches: RandomBatches,
    /// Held-out windows.
    pub valid: &'a ValidationSet,
    /// Teacher logits on `valid`, for agreement/KL metrics.
    pub teacher_logits: Option<&'a TeacherLogits>,
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    curves: Curves,
    best_step: usize,
    best_value: Option<f64>,
}

fn ck_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The metric early stopping and best-model selection use: KL to the teacher when the method distils,
/// validation cross-entropy otherwise.
fn selection_metric(method: &Method, e: &Evaluation) -> f64 {
    match (method.needs_teacher(), e.kl) {
        (true, Some(kl)) => kl,
        _ => e.loss,
    }
}

/// How the steps run: one process with burn's optimizer, or the expert-parallel ranks.
#[allow(
    clippy::large_enum_variant,
    reason = "one value per training run, moved once per step"
)]
enum Engine {
    Single {
        step: DistillStep,
        optim: ModuleOptimizer,
    },
    Expert(EpTrainer),
}

impl Engine {
    /// Writes a checkpoint (single process only: `validate` refuses a checkpoint directory with world > 1).
    fn save_checkpoint(
        &self,
        dir: &Path,
        step: usize,
        curves: &Curves,
        best: Option<&(usize, f64, Model)>,
    ) -> Result<(), TrainError> {
        match self {
            Self::Single {
                step: step_module,
                optim,
            } => save_checkpoint(dir, step_module, optim, step, curves, best),
            Self::Expert(_) => Ok(()),
        }
    }

    /// The student as it stands, without autodiff.
    fn model(&mut self) -> Result<Model, TrainError> {
        match self {
            Self::Single { step, .. } => Ok(step.student.valid()),
            Self::Expert(ep) => ep.gather(),
        }
    }
}

/// Trains `student` (a plain-device model; it is moved to the autodiff device here) and returns the best model.
///
/// With `cfg.world > 1` the steps run expert-parallel on that many in-process ranks ([`crate::ep::EpTrainer`]);
/// evaluation, early stopping and best-model selection run here on the gathered model, as in one process.
pub fn train(
    student: Model,
    teacher: Option<&Model>,
    mut data: TrainData<'_>,
    cfg: &TrainConfig,
) -> Result<TrainOutcome, TrainError> {
    cfg.validate()?;
    let started = Instant::now();
    let plain = student.device();
    let ad = plain.clone().autodiff();
    let mut engine = if cfg.world > 1 {
        let batch = data.batches.shape().batch_size();
        if !batch.is_multiple_of(cfg.world) {
            return Err(TrainError::InvalidConfig {
                key: "world",
                message: format!(
                    "expert parallelism splits the batch's rows over the ranks: {batch} sequences per batch do not \
                     divide evenly over {} ranks",
                    cfg.world
                ),
            });
        }
        Engine::Expert(EpTrainer::new(&student, teacher, cfg)?)
    } else {
        Engine::Single {
            step: DistillStep::new(student.train().fork(&ad), teacher, cfg.method.clone())?,
            optim: cfg.optimizer(),
        }
    };
    let mut sched = cfg.scheduler()?;
    let mut curves = Curves::default();
    let mut stopper = match &cfg.early_stopping {
        Some(e) => Some(
            EarlyStopping::new(e.patience, e.min_rel_improvement, e.max_rel_degradation).map_err(
                |err| TrainError::InvalidConfig {
                    key: "early_stopping",
                    message: err.to_string(),
                },
            )?,
        ),
        None => None,
    };
    let mut best: Option<(usize, f64, Model)> = None;
    let mut start_step = 0;

    // Resume: model weights, optimizer state, the scheduler and the batch stream are restored exactly.
    // (`validate` refuses a checkpoint directory with world > 1.)
    if let (
        Some(dir),
        Engine::Single {
            step: step_module,
            optim,
        },
    ) = (&cfg.checkpoint_dir, &mut engine)
    {
        let state_path = dir.join("state.json");
        if state_path.exists() {
            let text = std::fs::read_to_string(&state_path).map_err(|e| ck_err(&state_path, e))?;
            let state: CheckpointState =
                serde_json::from_str(&text).map_err(|e| ck_err(&state_path, e))?;
            let model_path = dir.join("student");
            let student = step_module
                .student
                .clone()
                .try_load_file(&model_path)
                .map_err(|e| ck_err(&model_path, format!("{e:?}")))?;
            step_module.student = student;
            let optim_path = dir.join("optim");
            *optim = std::mem::replace(optim, cfg.optimizer())
                .load(&optim_path)
                .map_err(|e| ck_err(&optim_path, format!("{e:?}")))?;
            for _ in 0..state.step {
                sched.step();
                data.batches.next_offsets();
            }
            if let Some(s) = stopper.as_mut() {
                for (step, e) in &state.curves.valid {
                    s.observe(*step, selection_metric(&cfg.method, e));
                }
            }
            if let Some(v) = state.best_value {
                best = Some((state.best_step, v, step_module.student.valid()));
            }
            curves = state.curves;
            start_step = state.step;
            eprintln!(
                "[{}] resumed from {} at step {start_step}",
                cfg.label,
                dir.display()
            );
        }
    }

    let progress = ProgressReporter::new(cfg.steps, cfg.log_every).with_label(cfg.label.clone());
    let mut stopped_early = None;
    let mut steps_run = start_step;
    for step in start_step + 1..=cfg.steps {
        let lr = sched.step();
        let windows = data.batches.next().expect("the batch stream is endless");
        let non_finite = |source| TrainError::NonFinite {
            label: cfg.label.clone(),
            source,
        };
        let loss;
        engine = match engine {
            Engine::Single {
                step: step_module,
                mut optim,
            } => {
                let out = TrainStep::step(&step_module, windows);
                loss = out.item.loss.clone().into_scalar::<f64>();
                check_finite(step, loss).map_err(non_finite)?;
                let step_module = step_module.optimize(&mut optim, lr.clone(), out.grads);
                Engine::Single {
                    step: step_module,
                    optim,
                }
            }
            Engine::Expert(mut ep) => {
                // The ranks step their optimizers along with the loss; a non-finite loss still ends the run here.
                loss = ep.step(windows, lr.base())?;
                check_finite(step, loss).map_err(non_finite)?;
                Engine::Expert(ep)
            }
        };
        curves.train.push((step, loss));
        progress.update(step, loss, lr.base());
        steps_run = step;

        if step % cfg.eval_every == 0 || step == cfg.steps {
            let model = engine.model()?;
            let e = evaluate(&model, data.valid, data.teacher_logits, &plain);
            curves.valid.push((step, e));
            let metric = selection_metric(&cfg.method, &e);
            tracing::info!(run = %cfg.label, step, loss = e.loss, ppl = e.ppl, ?e.agreement, ?e.kl, "evaluation");
            if best.as_ref().is_none_or(|(_, v, _)| metric < *v) {
                best = Some((step, metric, model));
            }
            if let Some(s) = stopper.as_mut()
                && let Decision::Stop { reason, .. } = s.observe(step, metric)
            {
                let why = format!("step {step}: {reason:?}");
                eprintln!("[{}] early stop at {why}", cfg.label);
                stopped_early = Some(why);
            }
        }
        let checkpoint_due = step % cfg.checkpoint_every == 0 || step == cfg.steps;
        if let Some(dir) = &cfg.checkpoint_dir
            && checkpoint_due
        {
            engine.save_checkpoint(dir, step, &curves, best.as_ref())?;
        }
        if stopped_early.is_some() {
            break;
        }
        if cfg.stop_after == Some(step) {
            if let Some(dir) = &cfg.checkpoint_dir
                && !checkpoint_due
            {
                engine.save_checkpoint(dir, step, &curves, best.as_ref())?;
            }
            stopped_early = Some(format!("step {step}: stop_after"));
            break;
        }
    }
    progress.finish();
    let (best_step, _, model) = match best {
        Some(b) => b,
        None => (steps_run, f64::NAN, engine.model()?),
    };
    Ok(TrainOutcome {
        model,
        curves,
        best_step,
        steps_run,
        stopped_early,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn save_checkpoint(
    dir: &Path,
    step_module: &DistillStep,
    optim: &ModuleOptimizer,
    step: usize,
    curves: &Curves,
    best: Option<&(usize, f64, Model)>,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| ck_err(dir, e))?;
    let model_path = dir.join("student");
    step_module
        .student
        .clone()
        .save_file(&model_path)
        .map_err(|e| ck_err(&model_path, format!("{e:?}")))?;
    let optim_path = dir.join("optim");
    optim
        .save(&optim_path)
        .map_err(|e| ck_err(&optim_path, format!("{e:?}")))?;
    let state = CheckpointState {
        step,
        curves: curves.clone(),
        best_step: best.map_or(0, |b| b.0),
        best_value: best.map(|b| b.1),
    };
    let state_path = dir.join("state.json");
    let text = serde_json::to_string(&state).map_err(|e| ck_err(&state_path, e))?;
    std::fs::write(&state_path, text).map_err(|e| ck_err(&state_path, e))
}
