//! Distil a user's checkpoint and save it: load a Hugging Face checkpoint (and its `tokenizer.json`, bytes
//! otherwise), convert it to a FarSkip connectivity, recover it with FCSD (early stopping on KL to the teacher),
//! and write the student as an HF checkpoint that reloads as FarSkip — weights in the checkpoint's own dtype,
//! `config.json` with the FarSkip keys, the tokenizer files, `report.md` and the loss curve.
//!
//! Nothing is written until the run has finished: the output is assembled in a temporary directory next to
//! `out_dir` and renamed into place, so a failed run leaves no half-written checkpoint. What does not live here:
//! the training loop ([`crate::train`]) and the evaluation ([`crate::evaluate`]), which the recipe shares.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use farskip_model::{Connectivity, Model, hf};
use serde::{Deserialize, Serialize};

use crate::data::{BatchShape, ByteCorpus, CorpusSplit, HfTokenizer, RandomBatches, ValidationSet};
use crate::eval::{Evaluation, TeacherLogits, evaluate};
use crate::learner::{EarlyStopConfig, Method, TrainConfig, TrainData, TrainError, train};
use crate::plot::loss_curves_svg;

/// The tokenizer files of an HF checkpoint, copied to the distilled one when present.
const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
];

/// Errors of [`run_distill`].
#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    /// Reading the corpus or tokenizer failed.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// Loading, converting or saving the model failed.
    #[error(transparent)]
    Model(#[from] farskip_model::ModelError),
    /// The recovery run failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The output directory cannot be used or written.
    #[error("output directory {path}: {message}")]
    OutDir {
        /// The directory (or the file in it) at fault.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The corpus does not fit the model.
    #[error("{0}")]
    Mismatch(String),
}

/// Settings of [`run_distill`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistillConfig {
    /// The HF checkpoint to convert (the teacher, run with standard connectivity).
    pub model_dir: PathBuf,
    /// Text corpus, tokenized with the checkpoint's `tokenizer.json` (bytes when it has none); its tail is held
    /// out for checkpoint selection and the reported numbers.
    pub corpus: PathBuf,
    /// The student's connectivity.
    pub connectivity: Connectivity,
    /// Where the distilled checkpoint goes.
    pub out_dir: PathBuf,
    /// Replace a non-empty `out_dir`.
    pub force: bool,
    /// Recovery steps (early stopping may end sooner).
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Tokens per batch.
    pub tokens_per_batch: usize,
    /// Fraction of the corpus held out (its tail).
    pub valid_fraction: f64,
    /// Held-out windows that choose the checkpoint (at most half of them); the numbers are reported on the
    /// windows after those (at most `test_windows`), as in the recipe.
    pub valid_windows: usize,
    /// Held-out windows the numbers are reported on.
    pub test_windows: usize,
    /// Seed of the batch order.
    pub seed: u64,
}

impl DistillConfig {
    /// The recipe's recovery settings (200 steps of 2048 tokens, peak learning rate 1e-3, sequences of 128).
    pub fn new(
        model_dir: impl Into<PathBuf>,
        corpus: impl Into<PathBuf>,
        connectivity: Connectivity,
        out_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            model_dir: model_dir.into(),
            corpus: corpus.into(),
            connectivity,
            out_dir: out_dir.into(),
            force: false,
            steps: 200,
            lr: 1e-3,
            seq_len: 128,
            tokens_per_batch: 2048,
            valid_fraction: 0.05,
            valid_windows: 96,
            test_windows: 512,
            seed: 7,
        }
    }
}

/// What [`run_distill`] measured, on held-out text none of whose windows chose the checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistillReport {
    /// The checkpoint as loaded, standard connectivity.
    pub teacher: Evaluation,
    /// Converted, before training.
    pub converted: Evaluation,
    /// Converted and recovered (the saved checkpoint).
    pub distilled: Evaluation,
    /// The student's connectivity.
    pub connectivity: String,
    /// Recovery steps run.
    pub steps: usize,
    /// The step whose model was kept (lowest KL to the teacher on the selection windows).
    pub best_step: usize,
    /// Why training stopped before the last step, if it did.
    pub stopped_early: Option<String>,
    /// Held-out target tokens the numbers were measured on.
    pub eval_tokens: usize,
    /// Validation curve `(step, KL to the teacher)`.
    pub curve: Vec<(usize, f64)>,
    /// The distilled checkpoint's directory.
    pub out_dir: PathBuf,
    /// Wall time.
    pub seconds: f64,
}

impl DistillReport {
    /// One JSON object: `teacher_ppl, converted_ppl, distilled_ppl, converted_kl, distilled_kl, steps, out_dir`
    /// and a few more (`*_agreement`, `best_step`, `connectivity`, `eval_tokens`, `seconds`).
    pub fn json(&self) -> serde_json::Value {
        let nan = f64::NAN;
        serde_json::json!({
            "teacher_ppl": self.teacher.ppl,
            "converted_ppl": self.converted.ppl,
            "distilled_ppl": self.distilled.ppl,
            "converted_kl": self.converted.kl.unwrap_or(nan),
            "distilled_kl": self.distilled.kl.unwrap_or(nan),
            "converted_agreement": self.converted.agreement.unwrap_or(nan),
            "distilled_agreement": self.distilled.agreement.unwrap_or(nan),
            "steps": self.steps,
            "best_step": self.best_step,
            "connectivity": self.connectivity,
            "eval_tokens": self.eval_tokens,
            "out_dir": self.out_dir.display().to_string(),
            "seconds": self.seconds,
        })
    }

    /// The results as a Markdown table.
    pub fn table(&self) -> String {
        let mut s = String::from("| model | perplexity | top-1 agreement | KL to teacher |\n");
        s.push_str("|---|---|---|---|\n");
        let opt = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.4}"));
        for (name, e) in [
            ("teacher (standard)", &self.teacher),
            ("converted", &self.converted),
            ("distilled (FCSD)", &self.distilled),
        ] {
            let _ = writeln!(
                s,
                "| {name} | {:.3} | {} | {} |",
                e.ppl,
                opt(e.agreement),
                opt(e.kl)
            );
        }
        s
    }
}

/// The token stream of `corpus` and its vocabulary size: the checkpoint's `tokenizer.json` when `model_dir` has
/// one, bytes (vocabulary 256) otherwise.
pub fn corpus_tokens(
    model_dir: Option<&Path>,
    corpus: &Path,
) -> Result<(Vec<u32>, usize), crate::data::DataError> {
    if let Some(tok) = model_dir.map(|d| d.join("tokenizer.json"))
        && tok.exists()
    {
        let t = HfTokenizer::from_file(&tok)?;
        return Ok((t.encode_file(corpus)?, t.vocab_size()));
    }
    let corpus = ByteCorpus::from_file(corpus)?;
    Ok((corpus.tokens(), ByteCorpus::VOCAB_SIZE))
}

/// The early stopping of every recovery run (the recipe's too): four evaluations without a 0.1 % improvement,
/// or the metric doubling (a late collapse).
pub fn recovery_early_stopping() -> EarlyStopConfig {
    EarlyStopConfig {
        patience: 4,
        min_rel_improvement: 1e-3,
        // Only a collapse (the metric doubling) stops a run at once; noise on a small KL must not.
        max_rel_degradation: 1.0,
    }
}

fn out_err(path: &Path, message: impl std::fmt::Display) -> DistillError {
    DistillError::OutDir {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Refuses an `out_dir` that is a file, or a non-empty directory without `force`.
fn check_out_dir(dir: &Path, force: bool) -> Result<(), DistillError> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.is_dir() {
        return Err(out_err(dir, "exists and is not a directory"));
    }
    let mut entries = std::fs::read_dir(dir).map_err(|e| out_err(dir, e))?;
    if entries.next().is_some() && !force {
        return Err(out_err(dir, "is not empty (pass --force to replace it)"));
    }
    Ok(())
}

/// Distils `cfg.model_dir` into `cfg.connectivity` and writes `cfg.out_dir`. Returns the report and the saved
/// student (the best model of the run).
pub fn run_distill(
    cfg: &DistillConfig,
    device: &Device,
) -> Result<(DistillReport, Model), DistillError> {
    let started = Instant::now();
    if cfg.connectivity == Connectivity::Standard {
        return Err(DistillError::Mismatch(
            "the student's connectivity is standard: nothing to convert (give a farskip connectivity)".into(),
        ));
    }
    check_out_dir(&cfg.out_dir, cfg.force)?;
    let (tokens, vocab) = corpus_tokens(Some(&cfg.model_dir), &cfg.corpus)?;
    let (_, hf_config) = hf::load_config(&cfg.model_dir)?;
    let teacher = Model::from_pretrained(&cfg.model_dir, device)?
        .with_connectivity(Connectivity::Standard)?;
    if teacher.config().vocab_size < vocab {
        return Err(DistillError::Mismatch(format!(
            "the tokenizer has {vocab} tokens but {} has a vocabulary of {}",
            cfg.model_dir.display(),
            teacher.config().vocab_size
        )));
    }
    let converted = teacher
        .clone()
        .with_connectivity(cfg.connectivity.clone())?;

    let CorpusSplit {
        train: train_tokens,
        valid: valid_tokens,
    } = crate::data::split_tokens(&tokens, cfg.valid_fraction)?;
    let shape = BatchShape::new(cfg.seq_len, cfg.tokens_per_batch)?;
    let held_out = ValidationSet::new(valid_tokens, shape)?;
    let selection = cfg.valid_windows.min(held_out.num_windows() / 2);
    let (valid, test) = held_out.split_at(selection);
    let test = test.map_or_else(|| valid.clone(), |t| t.truncated(cfg.test_windows));
    eprintln!(
        "corpus {}: {} train tokens (vocab {vocab}); held out: {} windows of {} to choose the checkpoint, {} to report on",
        cfg.corpus.display(),
        train_tokens.len(),
        valid.num_windows(),
        cfg.seq_len,
        test.num_windows(),
    );

    let valid_logits = TeacherLogits::new(&teacher, &valid, device);
    let test_logits = TeacherLogits::new(&teacher, &test, device);
    let teacher_eval = evaluate(&teacher, &test, Some(&test_logits), device);
    let converted_eval = evaluate(&converted, &test, Some(&test_logits), device);
    eprintln!(
        "teacher ppl {:.3}; converted ({}) ppl {:.3}, KL {:.4}",
        teacher_eval.ppl,
        cfg.connectivity,
        converted_eval.ppl,
        converted_eval.kl.unwrap_or(f64::NAN)
    );

    let mut tc = TrainConfig::new("fcsd", Method::Fcsd { temperature: 1.0 }, cfg.steps, cfg.lr);
    tc.seed = cfg.seed;
    tc.early_stopping = Some(recovery_early_stopping());
    let out = train(
        converted,
        Some(&teacher),
        TrainData {
            batches: RandomBatches::new(train_tokens, shape, cfg.seed, device)?,
            valid: &valid,
            teacher_logits: Some(&valid_logits),
        },
        &tc,
    )?;
    let distilled_eval = evaluate(&out.model, &test, Some(&test_logits), device);
    let report = DistillReport {
        teacher: teacher_eval,
        converted: converted_eval,
        distilled: distilled_eval,
        connectivity: cfg.connectivity.to_string(),
        steps: out.steps_run,
        best_step: out.best_step,
        stopped_early: out.stopped_early.clone(),
        eval_tokens: test.num_targets(),
        curve: out
            .curves
            .valid
            .iter()
            .map(|(s, e)| (*s, e.kl.unwrap_or(e.loss)))
            .collect(),
        out_dir: cfg.out_dir.clone(),
        seconds: started.elapsed().as_secs_f64(),
    };
    write_checkpoint(cfg, &hf_config, &out.model, &report)?;
    Ok((report, out.model))
}

/// Writes the checkpoint, tokenizer files and report into a temporary directory next to `out_dir`, then
/// renames it into place; on any error the temporary directory is removed.
fn write_checkpoint(
    cfg: &DistillConfig,
    hf_config: &serde_json::Value,
    student: &Model,
    report: &DistillReport,
) -> Result<(), DistillError> {
    let out = &cfg.out_dir;
    let name = out
        .file_name()
        .ok_or_else(|| out_err(out, "has no directory name"))?
        .to_string_lossy();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| out_err(&parent, e))?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        std::fs::create_dir_all(&tmp).map_err(|e| out_err(&tmp, e))?;
        student.save_pretrained(&tmp, Some(hf_config))?;
        for f in TOKENIZER_FILES {
            let src = cfg.model_dir.join(f);
            if src.is_file() {
                std::fs::copy(&src, tmp.join(f)).map_err(|e| out_err(&tmp.join(f), e))?;
            }
        }
        write_report(cfg, report, &tmp)?;
        // Checked again: the directory may have filled while the run trained.
        check_out_dir(out, cfg.force)?;
        if out.exists() {
            std::fs::remove_dir_all(out).map_err(|e| out_err(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| out_err(out, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_report(
    cfg: &DistillConfig,
    report: &DistillReport,
    dir: &Path,
) -> Result<(), DistillError> {
    let svg = dir.join("loss_curve.svg");
    let points: Vec<(f64, f64)> = report.curve.iter().map(|&(s, v)| (s as f64, v)).collect();
    if !points.is_empty() {
        loss_curves_svg(
            &svg,
            "FCSD: KL to the teacher on held-out text",
            &[("fcsd", points)],
        )
        .map_err(|e| out_err(&svg, e))?;
    }
    let mut text = String::from("# Distilled checkpoint\n\n");
    let _ = writeln!(
        text,
        "`{}` converted to `{}` and recovered with FCSD on `{}`: {} steps of {} tokens (the model of step {} \
         kept{}). Measured on {} held-out tokens that did not choose the checkpoint.\n",
        cfg.model_dir.display(),
        report.connectivity,
        cfg.corpus.display(),
        report.steps,
        cfg.tokens_per_batch,
        report.best_step,
        report
            .stopped_early
            .as_ref()
            .map_or(String::new(), |r| format!("; stopped early: {r}")),
        report.eval_tokens,
    );
    text.push_str(&report.table());
    if !report.curve.is_empty() {
        text.push_str("\n![KL to the teacher during recovery](loss_curve.svg)\n");
    }
    let _ = writeln!(
        text,
        "\nLoad it with `Model::from_pretrained`: config.json records the connectivity. Total time {:.0} s.",
        report.seconds
    );
    let md = dir.join("report.md");
    std::fs::write(&md, text).map_err(|e| out_err(&md, e))
}
