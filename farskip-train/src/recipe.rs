//! The FCSD recipe, end to end: train a small MoE teacher on a corpus (or load an HF checkpoint), convert it to
//! FarSkip, measure the damage, then recover it from the same start with the same token budget three ways —
//! FCSD (KL), SFT and KL + L2 — and report perplexity, agreement and KL to the teacher for every model.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use farskip_model::{Connectivity, FarSkip, Model, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::data::{BatchShape, CorpusSplit, RandomBatches, ValidationSet};
use crate::eval::{Evaluation, TeacherLogits, evaluate};
use crate::learner::{Curves, Method, TrainConfig, TrainData, TrainError, train};
use crate::plot::loss_curves_svg;

/// Errors of the recipe.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// Reading the corpus or tokenizer failed.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// Loading or converting the model failed.
    #[error(transparent)]
    Model(#[from] farskip_model::ModelError),
    /// A training run failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// Writing the report failed.
    #[error("writing the report to {path}: {message}")]
    Report {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The corpus does not fit the model.
    #[error("{0}")]
    Mismatch(String),
    /// A recovery run's thread could not start or panicked.
    #[error("{0}")]
    Run(String),
}

/// Recipe settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecipeConfig {
    /// Text corpus (bytes as tokens, or the checkpoint's `tokenizer.json` when it has one).
    pub corpus: PathBuf,
    /// Distil this HF checkpoint instead of training a teacher.
    pub model_dir: Option<PathBuf>,
    /// The teacher trained from scratch.
    pub teacher: ModelConfig,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Tokens per batch.
    pub tokens_per_batch: usize,
    /// Teacher training steps.
    pub teacher_steps: usize,
    /// Teacher peak learning rate.
    pub teacher_lr: f64,
    /// Steps of each recovery run (the same budget for every method).
    pub recovery_steps: usize,
    /// Peak learning rate of the recovery runs.
    pub recovery_lr: f64,
    /// Weight of the hidden-state term of KL + L2.
    pub l2_weight: f64,
    /// Validation windows for evaluation during training (early stopping, the best checkpoint): the first
    /// ones of the held-out split, at most half of them.
    pub valid_windows: usize,
    /// The final table is measured on the held-out windows after those (at most this many), so that no
    /// checkpoint is chosen on the tokens it is reported on; on a split too short for two parts it falls back
    /// to the selection windows.
    #[serde(default = "default_test_windows")]
    pub test_windows: usize,
    /// Fraction of the corpus held out (its tail).
    pub valid_fraction: f64,
    /// Seed of initialisation and batch order.
    pub seed: u64,
    /// Where recipe.md and loss_curves.svg go.
    pub report_dir: PathBuf,
    /// Save the trained teacher here as an HF checkpoint (for `sweep`, `distill`, `forward`); not used with
    /// `model_dir`.
    #[serde(default)]
    pub save_teacher: Option<PathBuf>,
    /// Expert-parallel ranks (threads of this process) for the recovery runs (FCSD, SFT, KL + L2); the teacher
    /// always trains in one process. 1, the default, is single-process training; see [`TrainConfig::world`].
    #[serde(default = "one")]
    pub world: usize,
    /// Skip depth of the student's FarSkip conversion (all layers): 1 is the paper's, d ≥ 2 keeps every routed
    /// output in flight for d layers (`farskip-dD`).
    #[serde(default = "one")]
    pub depth: usize,
}

fn one() -> usize {
    1
}

fn default_test_windows() -> usize {
    512
}

impl RecipeConfig {
    /// The full recipe (≈ 5 min on 2 cores): the quick recipe's model, trained about 3× and recovered about 2×
    /// longer.
    pub fn full(corpus: impl Into<PathBuf>) -> Self {
        Self {
            corpus: corpus.into(),
            model_dir: None,
            teacher: ModelConfig::small_moe(256, 128, 4, 4, 2, 32, 8, 2, 96, Some(96)),
            seq_len: 128,
            tokens_per_batch: 2048,
            teacher_steps: 1000,
            teacher_lr: 3e-3,
            recovery_steps: 200,
            recovery_lr: 1e-3,
            l2_weight: 1.0,
            valid_windows: 96,
            test_windows: default_test_windows(),
            valid_fraction: 0.05,
            seed: 7,
            report_dir: PathBuf::from("report"),
            save_teacher: None,
            world: 1,
            depth: 1,
        }
    }

    /// The quick recipe (≈ 2 min on 2 cores: teacher 320 steps, each recovery run 96).
    pub fn quick(corpus: impl Into<PathBuf>) -> Self {
        Self {
            teacher_steps: 320,
            recovery_steps: 96,
            valid_windows: 48,
            ..Self::full(corpus)
        }
    }
}

/// One row of the results table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecipeRow {
    /// teacher, converted, fcsd, sft or kl_l2.
    pub name: String,
    /// Held-out metrics.
    pub eval: Evaluation,
    /// Validation curve (step, loss) of the run that produced it.
    pub curve: Vec<(usize, f64)>,
    /// Seconds spent training it.
    pub seconds: f64,
}

/// The recipe's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecipeReport {
    /// Rows in table order.
    pub rows: Vec<RecipeRow>,
    /// Wall time of the whole recipe.
    pub seconds: f64,
    /// Tokens each recovery run saw.
    pub recovery_tokens: usize,
    /// Tokens the teacher was trained on (0 for a loaded checkpoint).
    pub teacher_tokens: usize,
    /// Held-out target tokens the table was measured on (none of them chose a checkpoint, unless the split was
    /// too short for two parts; see [`RecipeConfig::test_windows`]).
    #[serde(default)]
    pub eval_tokens: usize,
    /// The student's connectivity (`farskip`, `farskip-d2`, ...).
    #[serde(default)]
    pub connectivity: String,
    /// The student's skip depth.
    #[serde(default = "one")]
    pub depth: usize,
}

impl RecipeReport {
    fn row(&self, name: &str) -> Option<&Evaluation> {
        self.rows.iter().find(|r| r.name == name).map(|r| &r.eval)
    }

    /// Fraction of the conversion's perplexity gap FCSD recovers: `(converted − fcsd) / (converted − teacher)`.
    pub fn recovered_fraction(&self, name: &str) -> Option<f64> {
        let (t, c, m) = (
            self.row("teacher")?,
            self.row("converted")?,
            self.row(name)?,
        );
        Some((c.ppl - m.ppl) / (c.ppl - t.ppl))
    }

    /// The one-line JSON summary (`teacher_ppl`, `fcsd_agreement`, `sft_kl`, ...).
    pub fn json(&self) -> serde_json::Value {
        let mut j = serde_json::Map::new();
        for r in &self.rows {
            j.insert(format!("{}_ppl", r.name), r.eval.ppl.into());
            j.insert(format!("{}_loss", r.name), r.eval.loss.into());
            if r.name != "teacher" {
                j.insert(
                    format!("{}_agreement", r.name),
                    r.eval.agreement.unwrap_or(f64::NAN).into(),
                );
                j.insert(
                    format!("{}_kl", r.name),
                    r.eval.kl.unwrap_or(f64::NAN).into(),
                );
            }
        }
        for m in ["fcsd", "sft", "kl_l2"] {
            if let Some(f) = self.recovered_fraction(m) {
                j.insert(format!("{m}_recovered_fraction"), f.into());
            }
        }
        j.insert("recovery_tokens".into(), self.recovery_tokens.into());
        j.insert("teacher_tokens".into(), self.teacher_tokens.into());
        j.insert("eval_tokens".into(), self.eval_tokens.into());
        j.insert("connectivity".into(), self.connectivity.clone().into());
        j.insert("depth".into(), self.depth.into());
        j.insert("seconds".into(), self.seconds.into());
        serde_json::Value::Object(j)
    }

    /// The results as a Markdown table.
    pub fn table(&self) -> String {
        let mut s = String::from(
            "| model | val loss | perplexity | top-1 agreement | KL to teacher | train s |\n",
        );
        s.push_str("|---|---|---|---|---|---|\n");
        for r in &self.rows {
            let opt =
                |v: Option<f64>, p: usize| v.map_or("—".to_string(), |v| format!("{v:.p$}"));
            let _ = writeln!(
                s,
                "| {} | {:.4} | {:.3} | {} | {} | {:.0} |",
                r.name,
                r.eval.loss,
                r.eval.ppl,
                opt(r.eval.agreement, 4),
                opt(r.eval.kl, 4),
                r.seconds
            );
        }
        s
    }
}

fn tokens_for(cfg: &RecipeConfig) -> Result<(Vec<u32>, usize), RecipeError> {
    Ok(crate::distill::corpus_tokens(
        cfg.model_dir.as_deref(),
        &cfg.corpus,
    )?)
}

/// Runs the recipe and writes `report_dir/recipe.md` and `report_dir/loss_curves.svg`.
pub fn run_recipe(cfg: &RecipeConfig, device: &Device) -> Result<RecipeReport, RecipeError> {
    let started = Instant::now();
    // Checked before anything trains: a bad depth must not cost a teacher run.
    let student = Connectivity::FarSkip(FarSkip::all().with_depth(cfg.depth));
    student.validate(usize::MAX)?;
    if cfg.world > 1 && cfg.depth > 1 {
        return Err(RecipeError::Mismatch(format!(
            "expert-parallel recovery (world {}) at skip depth > 1 cannot run the KL + L2 baseline, which compares \
             full residual streams; use world 1 for {student}",
            cfg.world
        )));
    }
    if cfg.save_teacher.is_some() && cfg.model_dir.is_none() {
        // A teacher that cannot be saved must fail now, not after its training.
        farskip_model::hf::hf_config_json(&cfg.teacher)?;
    }
    let (tokens, vocab) = tokens_for(cfg)?;
    let CorpusSplit {
        train: train_tokens,
        valid: valid_tokens,
    } = crate::data::split_tokens(&tokens, cfg.valid_fraction)?;
    let shape = BatchShape::new(cfg.seq_len, cfg.tokens_per_batch)?;
    let held_out = ValidationSet::new(valid_tokens, shape)?;
    let selection = cfg.valid_windows.min(held_out.num_windows() / 2);
    let (valid, test) = held_out.split_at(selection);
    // Checkpoints are chosen on `valid`; the table is measured on `test`, the windows after it.
    let test = test.map_or_else(|| valid.clone(), |t| t.truncated(cfg.test_windows));
    let train_tokens: std::sync::Arc<[u32]> = train_tokens.into();
    let batches = |seed| RandomBatches::new(train_tokens.clone(), shape, seed, device);
    eprintln!(
        "corpus {}: {} train tokens (vocab {vocab}); held out: {} windows of {} for checkpoint selection, {} to report on",
        cfg.corpus.display(),
        train_tokens.len(),
        valid.num_windows(),
        cfg.seq_len,
        test.num_windows(),
    );

    let mut rows = Vec::new();
    let (teacher, teacher_tokens) = match &cfg.model_dir {
        Some(dir) => {
            let m = Model::from_pretrained(dir, device)?;
            if m.config().vocab_size < vocab {
                return Err(RecipeError::Mismatch(format!(
                    "the corpus needs a vocabulary of {vocab} but {} has {}",
                    dir.display(),
                    m.config().vocab_size
                )));
            }
            let e = evaluate(&m, &test, None, device);
            rows.push(RecipeRow {
                name: "teacher".into(),
                eval: e,
                curve: vec![],
                seconds: 0.0,
            });
            (m, 0)
        }
        None => {
            if cfg.teacher.vocab_size != vocab {
                return Err(RecipeError::Mismatch(format!(
                    "teacher vocab {} does not match the corpus vocab {vocab}",
                    cfg.teacher.vocab_size
                )));
            }
            device.seed(cfg.seed);
            let init = Model::new(&cfg.teacher, device)?;
            eprintln!(
                "training the teacher: {} parameters, {} steps of {} tokens",
                init.num_params(),
                cfg.teacher_steps,
                shape.batch_size() * cfg.seq_len
            );
            let mut tc = TrainConfig::new(
                "teacher",
                Method::Pretrain,
                cfg.teacher_steps,
                cfg.teacher_lr,
            );
            tc.min_lr = cfg.teacher_lr * 0.02;
            tc.seed = cfg.seed;
            let out = train(
                init,
                None,
                TrainData {
                    batches: batches(cfg.seed)?,
                    valid: &valid,
                    teacher_logits: None,
                },
                &tc,
            )?;
            let e = evaluate(&out.model, &test, None, device);
            rows.push(RecipeRow {
                name: "teacher".into(),
                eval: e,
                curve: valid_curve(&out.curves),
                seconds: out.seconds,
            });
            (
                out.model,
                cfg.teacher_steps * shape.batch_size() * cfg.seq_len,
            )
        }
    };
    if let (Some(dir), None) = (&cfg.save_teacher, &cfg.model_dir) {
        teacher.save_pretrained(dir, None)?;
        eprintln!("saved the teacher to {}", dir.display());
    }
    let teacher_logits = TeacherLogits::new(&teacher, &valid, device);
    let test_logits = TeacherLogits::new(&teacher, &test, device);
    let converted = teacher.clone().with_connectivity(student.clone())?;
    let mut e = evaluate(&converted, &test, Some(&test_logits), device);
    e.agreement = e.agreement.or(Some(0.0));
    rows.push(RecipeRow {
        name: "converted".into(),
        eval: e,
        curve: vec![],
        seconds: 0.0,
    });
    eprintln!(
        "teacher ppl {:.3}, converted ({student}, all layers) ppl {:.3}",
        rows[0].eval.ppl, e.ppl
    );

    let methods = [
        ("fcsd", Method::Fcsd { temperature: 1.0 }),
        ("sft", Method::Sft),
        (
            "kl_l2",
            Method::KlL2 {
                temperature: 1.0,
                l2_weight: cfg.l2_weight,
            },
        ),
    ];
    // The three recovery runs are independent (same converted start, same batches): they train side by side,
    // each on its own thread, sharing the cores (their results do not depend on it).
    let mut runs = Vec::with_capacity(methods.len());
    for (name, method) in methods {
        let mut tc = TrainConfig::new(name, method, cfg.recovery_steps, cfg.recovery_lr);
        tc.seed = cfg.seed + 1;
        tc.world = cfg.world;
        tc.early_stopping = Some(crate::distill::recovery_early_stopping());
        if cfg.world > 1 {
            eprintln!(
                "recovering with {name}: {} steps, expert-parallel on {} ranks",
                cfg.recovery_steps, cfg.world
            );
        } else {
            eprintln!("recovering with {name}: {} steps", cfg.recovery_steps);
        }
        runs.push((name, tc, batches(cfg.seed + 1)?));
    }
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .into_iter()
            .map(|(name, tc, batches)| {
                let (converted, teacher, valid, teacher_logits, test, test_logits) = (
                    &converted,
                    &teacher,
                    &valid,
                    &teacher_logits,
                    &test,
                    &test_logits,
                );
                let handle = std::thread::Builder::new()
                    .name(format!("recipe-{name}"))
                    .spawn_scoped(scope, move || {
                        let out = train(
                            converted.clone(),
                            Some(teacher),
                            TrainData {
                                batches,
                                valid,
                                teacher_logits: Some(teacher_logits),
                            },
                            &tc,
                        )?;
                        let e = evaluate(&out.model, test, Some(test_logits), device);
                        Ok::<_, RecipeError>(RecipeRow {
                            name: name.into(),
                            eval: e,
                            curve: valid_curve(&out.curves),
                            seconds: out.seconds,
                        })
                    });
                (name, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, handle)| {
                handle
                    .map_err(|e| RecipeError::Run(format!("could not start the {name} run: {e}")))?
                    .join()
                    .map_err(|_| RecipeError::Run(format!("the {name} run panicked")))?
            })
            .collect::<Vec<_>>()
    });
    for row in outcomes {
        rows.push(row?);
    }
    let report = RecipeReport {
        rows,
        seconds: started.elapsed().as_secs_f64(),
        recovery_tokens: cfg.recovery_steps * shape.batch_size() * cfg.seq_len,
        teacher_tokens,
        eval_tokens: test.num_targets(),
        connectivity: student.to_string(),
        depth: cfg.depth,
    };
    write_report(cfg, &report)?;
    Ok(report)
}

fn valid_curve(c: &Curves) -> Vec<(usize, f64)> {
    c.valid.iter().map(|(s, e)| (*s, e.loss)).collect()
}

fn write_report(cfg: &RecipeConfig, report: &RecipeReport) -> Result<(), RecipeError> {
    let dir = &cfg.report_dir;
    let err = |path: &Path, e: &dyn std::fmt::Display| RecipeError::Report {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, &e))?;
    let svg = dir.join("loss_curves.svg");
    let teacher_steps = report.rows[0].curve.len();
    let series: Vec<(String, Vec<(f64, f64)>)> = report
        .rows
        .iter()
        .filter(|r| !r.curve.is_empty())
        .map(|r| {
            // Recovery runs start where the teacher ended, so all curves share one step axis.
            let offset = if r.name == "teacher" || teacher_steps == 0 {
                0
            } else {
                cfg.teacher_steps
            };
            (
                r.name.clone(),
                r.curve
                    .iter()
                    .map(|(s, l)| ((s + offset) as f64, *l))
                    .collect(),
            )
        })
        .collect();
    if !series.is_empty() {
        loss_curves_svg(&svg, "validation loss (nats/token)", &series)
            .map_err(|e| err(&svg, &e))?;
    }
    let md = dir.join("recipe.md");
    let mut text = String::from("# FCSD recipe\n\n");
    let _ = writeln!(
        text,
        "Corpus `{}`; teacher {} tokens; each recovery run {} tokens (same start, same budget). Student: `{}` \
         (FarSkip on all layers, skip depth {}).\n\
         Measured on {} held-out tokens after the ones that chose the checkpoints.\n",
        cfg.corpus.display(),
        report.teacher_tokens,
        report.recovery_tokens,
        report.connectivity,
        report.depth,
        report.eval_tokens
    );
    text.push_str(&report.table());
    for m in ["fcsd", "sft", "kl_l2"] {
        if let Some(f) = report.recovered_fraction(m) {
            let _ = writeln!(
                text,
                "\n{m} recovers {:.1}% of the conversion's perplexity gap.",
                100.0 * f
            );
        }
    }
    let _ = writeln!(
        text,
        "\n![loss curves](loss_curves.svg)\n\nTotal time {:.0} s.",
        report.seconds
    );
    std::fs::write(&md, text).map_err(|e| err(&md, &e))?;
    Ok(())
}
