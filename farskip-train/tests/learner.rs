//! The learner: an interrupted run resumed from its checkpoint reproduces the uninterrupted loss curve; FCSD
//! lowers the KL to the teacher; a NaN learning signal stops with the step; a missing teacher is an error.

use burn::prelude::*;
use farskip_model::{Connectivity, Model, ModelConfig};
use farskip_train::data::{BatchShape, ByteCorpus, RandomBatches, ValidationSet};
use farskip_train::{Method, TeacherLogits, TrainConfig, TrainData, TrainError, train};

const TEXT: &str = "It is a truth universally acknowledged, that a single man in possession of a good fortune, \
must be in want of a wife. However little known the feelings or views of such a man may be on his first \
entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families.";

fn setup() -> (Model, Vec<u32>, ValidationSet, BatchShape) {
    let device = Device::flex();
    device.seed(3);
    let cfg = ModelConfig::small_moe(256, 32, 2, 2, 1, 16, 4, 2, 16, Some(16));
    let model = Model::new(&cfg, &device).unwrap();
    let split = ByteCorpus::from_text(TEXT).unwrap().split(0.25).unwrap();
    let shape = BatchShape::new(16, 64).unwrap();
    let valid = ValidationSet::new(split.valid.clone(), shape).unwrap();
    (model, split.train, valid, shape)
}

fn data<'a>(tokens: &[u32], shape: BatchShape, valid: &'a ValidationSet) -> TrainData<'a> {
    TrainData {
        batches: RandomBatches::new(tokens.to_vec(), shape, 9, &Device::flex()).unwrap(),
        valid,
        teacher_logits: None,
    }
}

#[test]
fn resume_reproduces_the_loss_curve() {
    let (model, tokens, valid, shape) = setup();
    let mut cfg = TrainConfig::new("resume", Method::Sft, 8, 1e-2);
    cfg.eval_every = 4;
    let straight = train(model.clone(), None, data(&tokens, shape, &valid), &cfg).unwrap();

    let dir = std::env::temp_dir().join(format!("farskip-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    cfg.checkpoint_dir = Some(dir.clone());
    cfg.checkpoint_every = 3;
    cfg.stop_after = Some(5);
    let first = train(model.clone(), None, data(&tokens, shape, &valid), &cfg).unwrap();
    assert_eq!(first.steps_run, 5);
    cfg.stop_after = None;
    // A fresh process would rebuild the model from its config: start from different weights to prove the
    // checkpoint, not the argument, is what continues.
    Device::flex().seed(99);
    let other = Model::new(model.config(), &Device::flex()).unwrap();
    let resumed = train(other, None, data(&tokens, shape, &valid), &cfg).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    assert_eq!(resumed.curves.train.len(), 8);
    for ((s1, a), (s2, b)) in straight.curves.train.iter().zip(&resumed.curves.train) {
        assert_eq!(s1, s2);
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "step {s1}: {a} vs {b}"
        );
    }
}

#[test]
fn fcsd_moves_the_student_towards_the_teacher() {
    let (model, tokens, valid, shape) = setup();
    let device = Device::flex();
    let student = model
        .clone()
        .with_connectivity(Connectivity::farskip())
        .unwrap();
    let teacher_logits = TeacherLogits::new(&model, &valid, &device);
    let before = farskip_train::evaluate(&student, &valid, Some(&teacher_logits), &device);
    let mut cfg = TrainConfig::new("fcsd", Method::Fcsd { temperature: 1.0 }, 30, 2e-3);
    cfg.eval_every = 4;
    let out = train(
        student,
        Some(&model),
        TrainData {
            teacher_logits: Some(&teacher_logits),
            ..data(&tokens, shape, &valid)
        },
        &cfg,
    )
    .unwrap();
    let after = farskip_train::evaluate(&out.model, &valid, Some(&teacher_logits), &device);
    assert!(
        after.kl.unwrap() < before.kl.unwrap(),
        "{before:?} -> {after:?}"
    );
}

#[test]
fn distillation_without_a_teacher_is_an_error() {
    let (model, tokens, valid, shape) = setup();
    let cfg = TrainConfig::new("x", Method::Fcsd { temperature: 1.0 }, 2, 1e-3);
    let err = train(model, None, data(&tokens, shape, &valid), &cfg).unwrap_err();
    assert!(matches!(err, TrainError::MissingTeacher("fcsd")), "{err}");
}

#[test]
fn a_non_finite_loss_stops_with_its_step() {
    let (mut model, tokens, valid, shape) = setup();
    // Poisoned embeddings make the very first loss NaN: the error names the run and step 1.
    model.embed.weight = model.embed.weight.clone().map(|w| w.mul_scalar(f32::NAN));
    let cfg = TrainConfig::new("poisoned", Method::Sft, 4, 1e-3);
    match train(model, None, data(&tokens, shape, &valid), &cfg) {
        Err(TrainError::NonFinite { label, source }) => {
            assert_eq!(label, "poisoned");
            assert_eq!(source.step, 1);
            assert!(source.value.is_nan());
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a NaN loss must stop training"),
    }
}

#[test]
fn invalid_settings_name_the_setting() {
    let (model, tokens, valid, shape) = setup();
    let cfg = TrainConfig::new("bad", Method::Sft, 0, 1e-3);
    let err = train(model, None, data(&tokens, shape, &valid), &cfg).unwrap_err();
    assert!(err.to_string().contains("steps"), "{err}");
}
