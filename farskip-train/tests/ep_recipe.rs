//! Expert-parallel recovery training (`TrainConfig::world > 1`) equals single-process training: FCSD, SFT and
//! KL + L2 over a few steps give the same losses and weights; the distributed KL is `kl_distill`; bad settings are
//! errors that name the setting.

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use farskip_dist::comm::SingleRank;
use farskip_dist::trace::Trace;
use farskip_dist::training::{EpTrainRank, Objective, distill_loss};
use farskip_model::{Connectivity, Model, ModelConfig};
use farskip_train::data::{BatchShape, ByteCorpus, RandomBatches, ValidationSet};
use farskip_train::ep::EpTrainer;
use farskip_train::losses::kl_distill;
use farskip_train::{
    Method, TeacherLogits, TrainConfig, TrainData, TrainError, TrainOutcome, train,
};

const TEXT: &str = "It is a truth universally acknowledged, that a single man in possession of a good fortune, \
must be in want of a wife. However little known the feelings or views of such a man may be on his first \
entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families.";

/// Seeding and drawing from burn's global RNG, one test at a time: the tests of this file run in parallel threads,
/// and without the lock a test's random models depended on what the others drew meanwhile (a different model each
/// run, so the single-process vs EP comparison below checked a different case every time).
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn seeded<T>(f: impl FnOnce() -> T) -> T {
    let _guard = SEEDED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f()
}

struct Setup {
    teacher: Model,
    student: Model,
    tokens: Vec<u32>,
    valid: ValidationSet,
    shape: BatchShape,
}

fn setup(shared: Option<usize>) -> Setup {
    let device = Device::flex();
    let cfg = ModelConfig::small_moe(256, 32, 2, 2, 1, 16, 4, 2, 32, shared);
    let (teacher, student) = seeded(|| {
        device.seed(5);
        let teacher = Model::new(&cfg, &device).unwrap();
        // A freshly converted random model is almost its own teacher (KL ≈ 1e-7, all rounding): distil another
        // random model instead, so that the KL and its gradients are of order one.
        device.seed(6);
        let student = Model::new(&cfg, &device)
            .unwrap()
            .with_connectivity(Connectivity::farskip())
            .unwrap();
        (teacher, student)
    });
    let split = ByteCorpus::from_text(TEXT).unwrap().split(0.25).unwrap();
    // 4 sequences of 16 tokens per batch: 2 rows per rank at world 2.
    let shape = BatchShape::new(16, 64).unwrap();
    let valid = ValidationSet::new(split.valid, shape).unwrap().truncated(2);
    Setup {
        teacher,
        student,
        tokens: split.train,
        valid,
        shape,
    }
}

fn run(s: &Setup, method: Method, steps: usize, world: usize) -> Result<TrainOutcome, TrainError> {
    let device = Device::flex();
    let teacher_logits = TeacherLogits::new(&s.teacher, &s.valid, &device);
    let mut cfg = TrainConfig::new(method.name(), method, steps, 1e-2);
    cfg.warmup_steps = 1;
    cfg.eval_every = steps; // one evaluation, at the end: the outcome's model is the final one
    cfg.world = world;
    // A clipping threshold the gradients exceed, so that clipping (of sharded expert banks too) is exercised.
    cfg.grad_clip = Some(0.05);
    train(
        s.student.clone(),
        Some(&s.teacher),
        TrainData {
            batches: RandomBatches::new(s.tokens.clone(), s.shape, 3, &device).unwrap(),
            valid: &s.valid,
            teacher_logits: Some(&teacher_logits),
        },
        &cfg,
    )
}

/// Every float parameter's values, in visit order.
fn weights(model: &Model) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(
                param
                    .val()
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap(),
            );
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// Max over tensors of max|a − b| / max|a|, and max over tensors of max|a − start| / max|a| (how far training
/// moved them).
fn rel_diffs(a: &Model, b: &Model, start: &Model) -> (f64, f64) {
    let (wa, wb, w0) = (weights(a), weights(b), weights(start));
    assert_eq!(wa.len(), wb.len());
    let (mut diff, mut moved) = (0.0f64, 0.0f64);
    for ((x, y), z) in wa.iter().zip(&wb).zip(&w0) {
        assert_eq!(x.len(), y.len());
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12) as f64;
        // NaN-safe: a NaN or an infinity on either side gives an infinite difference.
        let d = farskip_model::compare::max_abs_diff(x, y);
        let m = farskip_model::compare::max_abs_diff(x, z);
        diff = diff.max(d / scale);
        moved = moved.max(m / scale);
    }
    (diff, moved)
}

fn check_equivalence(method: Method, shared: Option<usize>, label: &str) {
    let s = setup(shared);
    let single = run(&s, method.clone(), 3, 1).unwrap();
    let ep = run(&s, method, 3, 2).unwrap();
    assert_eq!(single.curves.train.len(), 3);
    assert_eq!(ep.curves.train.len(), 3);
    let loss = |c: &[(usize, f64)]| c.iter().map(|&(_, l)| l).collect::<Vec<_>>();
    let loss_diff =
        farskip_model::compare::max_abs_diff(&loss(&single.curves.train), &loss(&ep.curves.train));
    let (weight_diff, moved) = rel_diffs(&single.model, &ep.model, &s.student);
    let (ea, eb) = (single.curves.valid[0].1, ep.curves.valid[0].1);
    let eval_diff = farskip_model::compare::max_abs_diff(
        &[ea.loss, ea.kl.unwrap_or(0.0)],
        &[eb.loss, eb.kl.unwrap_or(0.0)],
    );
    eprintln!(
        "{label}: losses {:?}; max |loss diff| {loss_diff:.2e}; max weight diff {weight_diff:.2e} (relative; training \
         moved weights by up to {moved:.2e}); eval loss {} / {}, KL {:?} / {:?}",
        single
            .curves
            .train
            .iter()
            .map(|(_, l)| *l)
            .collect::<Vec<_>>(),
        ea.loss,
        eb.loss,
        ea.kl,
        eb.kl
    );
    assert!(loss_diff <= 1e-5, "{label}: loss diff {loss_diff}");
    assert!(weight_diff <= 1e-4, "{label}: weight diff {weight_diff}");
    assert!(eval_diff <= 1e-5, "{label}: eval loss diff {eval_diff}");
    assert!(
        moved > 1e-3,
        "{label}: training moved the weights ({moved})"
    );
    // The gathered model is a whole model: connectivity kept, the same parameter count.
    assert_eq!(ep.model.connectivity(), s.student.connectivity());
    assert_eq!(ep.model.num_params(), s.student.num_params());
}

#[test]
fn ep_fcsd_matches_single_process() {
    check_equivalence(Method::Fcsd { temperature: 1.0 }, None, "fcsd");
}

#[test]
fn ep_fcsd_with_shared_expert_and_temperature_matches_single_process() {
    check_equivalence(
        Method::Fcsd { temperature: 2.0 },
        Some(16),
        "fcsd T=2, shared",
    );
}

#[test]
fn ep_sft_and_kl_l2_match_single_process() {
    check_equivalence(Method::Sft, Some(16), "sft");
    check_equivalence(
        Method::KlL2 {
            temperature: 1.0,
            l2_weight: 1.0,
        },
        Some(16),
        "kl_l2",
    );
}

#[test]
fn distributed_kl_is_kl_distill() {
    let device = Device::flex();
    let (student, teacher) = seeded(|| {
        device.seed(2);
        let draw = || {
            Tensor::<3>::random(
                [3, 5, 11],
                burn::tensor::Distribution::Normal(0.0, 2.0),
                &device,
            )
        };
        (draw(), draw())
    });
    for t in [1.0, 0.5, 2.0] {
        let reference = kl_distill(student.clone(), teacher.clone(), t).into_scalar::<f64>();
        for world in [1, 2, 4] {
            let ours = distill_loss(
                student.clone().reshape([15, 11]),
                teacher.clone().reshape([15, 11]),
                t,
                world,
            )
            .into_scalar::<f64>();
            let d = (ours * world as f64 - reference).abs();
            assert!(
                d <= 1e-6 * reference.abs().max(1.0),
                "T={t} world={world}: {ours} × {world} vs {reference}"
            );
        }
    }
    // The gradients agree too (world 1).
    let ad = device.autodiff();
    let leaf = || student.clone().autodiff().require_grad();
    let (a, b) = (leaf(), leaf());
    let ga = kl_distill(a.clone(), teacher.clone(), 1.5).backward();
    let gb = distill_loss(
        b.clone().reshape([15, 11]),
        teacher.clone().reshape([15, 11]),
        1.5,
        1,
    )
    .backward();
    let (ga, gb) = (a.grad(&ga).unwrap(), b.grad(&gb).unwrap());
    let d = farskip_model::compare::max_abs_diff_tensors(ga, gb);
    assert!(d <= 1e-7, "gradient diff {d}");
    let _ = ad;
}

#[test]
fn distill_objective_loss_is_the_single_process_kl() {
    let s = setup(None);
    let device = Device::flex();
    let windows = RandomBatches::new(s.tokens.clone(), s.shape, 1, &device)
        .unwrap()
        .next()
        .unwrap();
    let t = windows.dims()[1] - 1;
    let x = windows.clone().narrow(1, 0, t);
    let teacher_logits = s.teacher.forward_unchecked(x.clone(), None);
    let reference =
        kl_distill(s.student.forward(x).unwrap(), teacher_logits.clone(), 1.0).into_scalar::<f64>();
    let rank = EpTrainRank::new(&s.student, 0, 1).unwrap();
    let step = rank
        .step_with(
            &SingleRank::new(),
            &Trace::disabled(),
            windows,
            &Objective::Distill {
                teacher_logits,
                temperature: 1.0,
            },
        )
        .unwrap();
    eprintln!(
        "EP Distill objective loss {} vs kl_distill {reference}",
        step.loss
    );
    assert!(
        (step.loss - reference).abs() <= 1e-5,
        "{} vs {reference}",
        step.loss
    );
}

#[test]
fn a_teacher_of_the_wrong_shape_is_an_error() {
    let s = setup(None);
    let device = Device::flex();
    let windows = Tensor::<2, Int>::from_ints([[1, 2, 3, 4, 5]], &device);
    let rank = EpTrainRank::new(&s.student, 0, 1).unwrap();
    let err = rank
        .step_with(
            &SingleRank::new(),
            &Trace::disabled(),
            windows,
            &Objective::Distill {
                teacher_logits: Tensor::zeros([1, 3, 256], &device),
                temperature: 1.0,
            },
        )
        .err()
        .expect("shape mismatch");
    assert!(err.to_string().contains("teacher_logits"), "{err}");
}

#[test]
fn bad_world_settings_name_the_setting() {
    let s = setup(None);
    let key_of = |r: Result<TrainOutcome, TrainError>| match r {
        Err(TrainError::InvalidConfig { key, message }) => (key, message),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("accepted"),
    };
    // 4 sequences per batch over 3 ranks.
    let (key, message) = key_of(run(&s, Method::Sft, 2, 3));
    assert_eq!(key, "world");
    assert!(message.contains("divide"), "{message}");
    // More ranks than experts (4 per layer).
    let mut cfg = TrainConfig::new("wide", Method::Sft, 2, 1e-3);
    cfg.world = 8;
    match EpTrainer::new(&s.student, None, &cfg) {
        Err(TrainError::InvalidConfig { key, message }) => {
            assert_eq!(key, "world");
            assert!(message.contains("experts"), "{message}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("8 ranks for 4 experts accepted"),
    }
    // world 0.
    let (key, _) = key_of(run(&s, Method::Sft, 2, 0));
    assert_eq!(key, "world");
    // Checkpointing is single-process only.
    let mut cfg = TrainConfig::new("ck", Method::Sft, 2, 1e-3);
    cfg.world = 2;
    cfg.checkpoint_dir = Some(std::env::temp_dir().join("farskip-ep-never-written"));
    let device = Device::flex();
    let (key, message) = key_of(train(
        s.student.clone(),
        None,
        TrainData {
            batches: RandomBatches::new(s.tokens.clone(), s.shape, 3, &device).unwrap(),
            valid: &s.valid,
            teacher_logits: None,
        },
        &cfg,
    ));
    assert_eq!(key, "world");
    assert!(message.contains("checkpoint"), "{message}");
    // A connectivity the EP schedule does not run: the ranks' error comes back naming it.
    let partial = s
        .teacher
        .clone()
        .with_connectivity("farskip:1..=1".parse::<Connectivity>().unwrap())
        .unwrap();
    let mut cfg = TrainConfig::new("partial", Method::Sft, 2, 1e-3);
    cfg.world = 2;
    let err = train(
        partial,
        None,
        TrainData {
            batches: RandomBatches::new(s.tokens.clone(), s.shape, 3, &device).unwrap(),
            valid: &s.valid,
            teacher_logits: None,
        },
        &cfg,
    )
    .expect_err("partial FarSkip refused");
    eprintln!("{err}");
    assert!(
        matches!(err, TrainError::Distributed { world: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("connectivity"), "{err}");
}

#[test]
fn a_failing_step_stops_the_world_with_the_ranks_error() {
    let s = setup(None);
    let device = Device::flex();
    let mut cfg = TrainConfig::new("bad-step", Method::Sft, 2, 1e-3);
    cfg.world = 2;
    let mut trainer = EpTrainer::new(&s.student, None, &cfg).unwrap();
    // Windows of one token have no next token to predict.
    let err = trainer
        .step(Tensor::<2, Int>::from_ints([[1], [2]], &device), 1e-3)
        .expect_err("one-token windows refused");
    eprintln!("{err}");
    assert!(err.to_string().contains("training windows"), "{err}");
    assert!(err.to_string().contains("rank 0"), "{err}");
    // The world is gone: later calls are errors, not panics or hangs.
    let again = trainer
        .step(
            Tensor::<2, Int>::from_ints([[1, 2, 3], [4, 5, 6]], &device),
            1e-3,
        )
        .expect_err("stopped world");
    assert!(again.to_string().contains("stopped"), "{again}");
    assert!(trainer.gather().is_err());
}
