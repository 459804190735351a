//! `run_distill` (the `distill` example's library) on a fixture checkpoint with a word-level tokenizer built
//! here: the saved checkpoint reloads as the student (same connectivity, same logits), its KL to the teacher on
//! held-out text is below the converted model's, bf16 weights stay bf16, and bad inputs fail before anything
//! is written.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use farskip_model::{Connectivity, Model};
use farskip_tests::*;
use farskip_train::distill::DistillError;
use farskip_train::{DistillConfig, run_distill};
use serde_json::json;

const FAMILY: &str = "qwen3_moe";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("farskip-distill-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A word-level `tokenizer.json` over `words` (id 0 is `[UNK]`).
fn word_tokenizer(words: &[String]) -> String {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for (i, w) in words.iter().enumerate() {
        vocab.insert(w.clone(), (i + 1).into());
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
    .to_string()
}

fn words(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("w{i}")).collect()
}

/// A corpus over `words`: a seeded stream with some structure (each word often followed by the next).
fn corpus(words: &[String], len: usize) -> String {
    let mut state = 12345u64;
    let mut prev = 0usize;
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = (state >> 33) as usize;
        prev = if r.is_multiple_of(3) {
            r % words.len()
        } else {
            (prev + 1) % words.len()
        };
        out.push(words[prev].as_str());
    }
    out.join(" ")
}

/// The fixture checkpoint copied to a temp dir with a tokenizer of `vocab_words` words; optionally re-saved with
/// `dtype` recorded in its config (the weights follow it).
fn checkpoint(name: &str, vocab_words: usize, dtype: Option<&str>) -> PathBuf {
    let dir = temp_dir(name);
    let src = fixture_dir(FAMILY);
    match dtype {
        None => {
            for f in ["config.json", "model.safetensors"] {
                std::fs::copy(src.join(f), dir.join(f)).expect("copy");
            }
        }
        Some(dt) => {
            let (_, mut hf) = farskip_model::hf::load_config(&src).expect("config");
            hf["dtype"] = json!(dt);
            Model::from_pretrained(&src, &Device::flex())
                .expect("load")
                .save_pretrained(&dir, Some(&hf))
                .expect("save");
        }
    }
    std::fs::write(
        dir.join("tokenizer.json"),
        word_tokenizer(&words(vocab_words)),
    )
    .expect("tokenizer");
    dir
}

fn config(model: &Path, corpus: &Path, out: &Path, steps: usize) -> DistillConfig {
    let mut cfg = DistillConfig::new(model, corpus, Connectivity::farskip(), out);
    cfg.steps = steps;
    cfg.lr = 1e-3;
    cfg.seq_len = 16;
    cfg.tokens_per_batch = 64;
    cfg.valid_fraction = 0.25;
    cfg.valid_windows = 4;
    cfg.test_windows = 8;
    cfg
}

/// No `.NAME.partial-*` directory left next to `out`.
fn no_partial_left(out: &Path) {
    let parent = out.parent().expect("parent");
    let name = out.file_name().expect("name").to_string_lossy().to_string();
    for e in std::fs::read_dir(parent).expect("read parent").flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        assert!(
            !n.starts_with(&format!(".{name}.partial")),
            "left behind: {n}"
        );
    }
}

fn stored_dtypes(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).expect("read");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    let mut d: Vec<String> = meta
        .tensors()
        .values()
        .map(|t| format!("{:?}", t.dtype))
        .collect();
    d.sort();
    d.dedup();
    d
}

#[test]
fn distilled_checkpoint_reloads_as_the_student_and_beats_the_conversion() {
    let device = Device::flex();
    let work = temp_dir("main");
    let model = checkpoint("main-model", 60, None);
    let text = work.join("corpus.txt");
    std::fs::write(&text, corpus(&words(60), 3000)).expect("corpus");
    let out = work.join("out");
    let cfg = config(&model, &text, &out, 30);
    let (report, student) = run_distill(&cfg, &device).expect("distill");
    eprintln!("{}", report.json());

    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "report.md",
        "loss_curve.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing from {}", out.display());
    }
    no_partial_left(&out);
    let (_, saved) = farskip_model::hf::load_config(&out).expect("config");
    assert_eq!(saved["farskip"], json!(true), "{saved}");
    assert_eq!(stored_dtypes(&out.join("model.safetensors")), ["F32"]);

    let reloaded = Model::from_pretrained(&out, &device).expect("reload");
    assert_eq!(reloaded.connectivity(), student.connectivity());
    assert_eq!(*reloaded.connectivity(), Connectivity::farskip());
    let input = ids(&reference(FAMILY), "input_ids", &device);
    let d = farskip_model::compare::max_abs_diff_tensors(
        reloaded.forward(input.clone()).expect("forward"),
        student.forward(input).expect("forward"),
    );
    assert!(d <= 1e-5, "max |Δ logits| reloaded vs student = {d}");

    let (conv, dist) = (
        report.converted.kl.expect("kl"),
        report.distilled.kl.expect("kl"),
    );
    assert!(
        dist < conv,
        "distilled KL {dist} is not below the converted model's {conv}"
    );
    assert!(report.steps >= 1 && report.eval_tokens > 0, "{report:?}");
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&model);
}

#[test]
fn bf16_checkpoint_is_saved_as_bf16() {
    let device = Device::flex();
    let work = temp_dir("bf16");
    let model = checkpoint("bf16-model", 40, Some("bfloat16"));
    assert_eq!(stored_dtypes(&model.join("model.safetensors")), ["BF16"]);
    let text = work.join("corpus.txt");
    std::fs::write(&text, corpus(&words(40), 1500)).expect("corpus");
    let out = work.join("out");
    let (_, student) = run_distill(&config(&model, &text, &out, 2), &device).expect("distill");
    assert_eq!(stored_dtypes(&out.join("model.safetensors")), ["BF16"]);
    let (_, saved) = farskip_model::hf::load_config(&out).expect("config");
    assert_eq!(saved["dtype"], json!("bfloat16"));
    // The saved weights are exactly the student's rounded to bf16: the same as saving the student in bf16.
    let mine = work.join("student-bf16");
    student.save_pretrained(&mine, Some(&saved)).expect("save");
    let input = ids(&reference(FAMILY), "input_ids", &device);
    let load = |d: &Path| {
        Model::from_pretrained(d, &device)
            .expect("reload")
            .forward(input.clone())
            .expect("forward")
    };
    let d = farskip_model::compare::max_abs_diff_tensors(load(&out), load(&mine));
    assert!(
        d == 0.0,
        "the saved bf16 checkpoint differs from the student's own bf16 save by {d}"
    );
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&model);
}

#[test]
fn bad_inputs_fail_before_anything_is_written() {
    let device = Device::flex();
    let work = temp_dir("bad");
    let model = checkpoint("bad-model", 40, None);
    let text = work.join("corpus.txt");
    std::fs::write(&text, corpus(&words(40), 1500)).expect("corpus");

    // A missing corpus: the error names it, no output directory appears.
    let out = work.join("out-missing");
    let missing = work.join("no-such-corpus.txt");
    let err = run_distill(&config(&model, &missing, &out, 2), &device).expect_err("missing corpus");
    assert!(matches!(err, DistillError::Data(_)), "{err}");
    assert!(err.to_string().contains("no-such-corpus.txt"), "{err}");
    assert!(!out.exists());

    // A tokenizer larger than the model's vocabulary (256).
    let big = checkpoint("bad-big-vocab", 300, None);
    let big_text = work.join("big.txt");
    std::fs::write(&big_text, corpus(&words(300), 1500)).expect("corpus");
    let out = work.join("out-vocab");
    let err = run_distill(&config(&big, &big_text, &out, 2), &device).expect_err("vocab");
    assert!(matches!(err, DistillError::Mismatch(_)), "{err}");
    assert!(err.to_string().contains("301 tokens"), "{err}");
    assert!(!out.exists());

    // A standard "student".
    let out = work.join("out-standard");
    let mut standard = config(&model, &text, &out, 2);
    standard.connectivity = Connectivity::Standard;
    let err = run_distill(&standard, &device).expect_err("standard");
    assert!(err.to_string().contains("standard"), "{err}");
    assert!(!out.exists());

    // A non-empty output directory without --force: refused and untouched; with it, replaced.
    let out = work.join("out-busy");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("keep.txt"), "mine").expect("write");
    let err = run_distill(&config(&model, &text, &out, 2), &device).expect_err("non-empty");
    assert!(matches!(err, DistillError::OutDir { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).expect("kept"),
        "mine"
    );
    let mut forced = config(&model, &text, &out, 2);
    forced.force = true;
    run_distill(&forced, &device).expect("forced");
    assert!(!out.join("keep.txt").exists() && out.join("config.json").is_file());
    no_partial_left(&out);

    for d in [work, model, big] {
        let _ = std::fs::remove_dir_all(d);
    }
}
