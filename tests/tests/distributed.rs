//! Distributed equals single-rank: expert and tensor parallelism on 2 and 4 in-process ranks, for the preset
//! and every fixture family, standard (blocking schedule) and FarSkip (overlapped schedule, skip depth 1, 2 and
//! 3); and expert-parallel
//! training (segmented backward) against single-rank training.

use burn::prelude::*;
use farskip_dist::comm::{Communicator, LinkModel, LocalWorld};
use farskip_dist::experiment::{
    OverlapConfig, Parallel, TrainingConfig, TrainingReport, balanced_placement, expert_loads,
    max_abs_diff, overlap_inference, overlap_training, random_ids, run_forward,
};
use farskip_dist::schedule::{EpRank, TpRank};
use farskip_dist::trace::Trace;
use farskip_model::{Connectivity, Model, ModelConfig};
use farskip_tests::{FAMILIES, fixture_dir};

/// `Device::seed` seeds one generator for the whole process and the tests of this file run in parallel:
/// seeding and initialising a model happen under this lock, so every run builds the same weights.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A random model from `seed`, the same every run.
fn seeded_model(seed: u64, cfg: &ModelConfig) -> Model {
    let _guard = SEEDED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let device = Device::flex();
    device.seed(seed);
    Model::new(cfg, &device).unwrap()
}

fn check(model: &Model, label: &str) {
    let device = Device::flex();
    let mut worst = [0.0f64; 2];
    for world in [2, 4] {
        let ids = random_ids(world, 12, model.config().vocab_size, world as u64, &device);
        for spec in [
            "standard",
            "farskip",
            "farskip:1..=2",
            "farskip-d2",
            "farskip-d3",
            "farskip-d2:1..=2",
        ] {
            let m = model
                .clone()
                .with_connectivity(spec.parse::<Connectivity>().unwrap())
                .unwrap();
            let reference = m.forward(ids.clone()).unwrap();
            for parallel in [Parallel::Expert, Parallel::Tensor] {
                let (logits, _) = run_forward(
                    &m,
                    parallel,
                    world,
                    &ids,
                    LinkModel::instant(),
                    &Trace::disabled(),
                )
                .unwrap_or_else(|e| panic!("{label} {parallel:?} world {world} {spec}: {e}"));
                let diff = max_abs_diff(logits, reference.clone());
                // EP runs the same per-row maths in the same slot order (bit-exact unless the CPU gemm picks a
                // different kernel for a smaller row count); TP adds partial sums over ranks: rounding only.
                assert!(
                    diff <= 1e-4,
                    "{label} {parallel:?} world {world} {spec}: {diff}"
                );
                worst[parallel as usize] = worst[parallel as usize].max(diff);
            }
        }
    }
    eprintln!(
        "{label}: max |distributed - single| EP {:.1e}, TP {:.1e}",
        worst[0], worst[1]
    );
}

#[test]
fn every_fixture_family_matches_single_rank() {
    for family in FAMILIES {
        let model = Model::from_pretrained(fixture_dir(family), &Device::flex()).unwrap();
        check(&model, family);
    }
}

/// Two-micro-batch overlap against the single-rank model of the same connectivity — standard (the
/// schedule-only baseline) and FarSkip (`farskip+tbo`), all layers and a range — EP and TP on 2 and 4 ranks, with
/// an odd sequence length so the halves differ in size.
fn check_tbo(model: &Model, label: &str) {
    let device = Device::flex();
    let mut worst = [0.0f64; 2];
    for spec in ["standard", "farskip", "farskip:1..=2"] {
        let model = model
            .clone()
            .with_connectivity(spec.parse::<Connectivity>().unwrap())
            .unwrap();
        for world in [2, 4] {
            let ids = random_ids(world, 13, model.config().vocab_size, world as u64, &device);
            let reference = model.forward(ids.clone()).unwrap();
            let trace = Trace::disabled();
            let ep = LocalWorld::run(world, LinkModel::instant(), |comm| {
                let r = comm.rank();
                EpRank::new(&model, r, world)?.forward_tbo(
                    comm,
                    &trace,
                    ids.clone().narrow(0, r, 1),
                )
            })
            .unwrap();
            let ep: Vec<_> = ep
                .into_iter()
                .map(|o| o.unwrap_or_else(|e| panic!("{label} {spec} EP world {world}: {e}")))
                .collect();
            let tp = LocalWorld::run(world, LinkModel::instant(), |comm| {
                TpRank::new(&model, comm.rank(), world)?.forward_tbo(comm, &trace, ids.clone())
            })
            .unwrap();
            for (parallel, logits) in [
                (0, Tensor::cat(ep, 0)),
                (
                    1,
                    tp.into_iter()
                        .next()
                        .unwrap()
                        .unwrap_or_else(|e| panic!("{label} {spec} TP: {e}")),
                ),
            ] {
                let diff = max_abs_diff(logits, reference.clone());
                assert!(
                    diff <= 1e-4,
                    "{label} {spec} TBO parallel {parallel} world {world}: {diff}"
                );
                worst[parallel] = worst[parallel].max(diff);
            }
        }
    }
    eprintln!(
        "{label}: max |TBO - single| EP {:.1e}, TP {:.1e}",
        worst[0], worst[1]
    );
}

#[test]
fn two_micro_batch_overlap_matches_single_rank() {
    for family in FAMILIES {
        let model = Model::from_pretrained(fixture_dir(family), &Device::flex()).unwrap();
        check_tbo(&model, family);
    }
    let cfg = ModelConfig::small_moe(256, 128, 3, 8, 4, 16, 16, 2, 64, Some(64));
    check_tbo(&seeded_model(5, &cfg), "preset");
}

#[test]
fn two_micro_batch_overlap_refuses_deeper_skips_and_one_token() {
    let model = Model::from_pretrained(fixture_dir("qwen3_moe"), &Device::flex()).unwrap();
    let device = Device::flex();
    let ids = random_ids(1, 8, model.config().vocab_size, 1, &device);
    let farskip = model
        .clone()
        .with_connectivity("farskip-d2".parse().unwrap())
        .unwrap();
    let out = LocalWorld::run(1, LinkModel::instant(), |comm| {
        TpRank::new(&farskip, 0, 1)?.forward_tbo(comm, &Trace::disabled(), ids.clone())
    })
    .unwrap();
    let err = out
        .into_iter()
        .next()
        .unwrap()
        .expect_err("farskip-d2 refused")
        .to_string();
    assert!(
        err.contains("farskip-d2") && err.contains("skip depth 1"),
        "{err}"
    );
    let out = LocalWorld::run(1, LinkModel::instant(), |comm| {
        TpRank::new(&model, 0, 1)?.forward_tbo(
            comm,
            &Trace::disabled(),
            ids.clone().narrow(1, 0, 1),
        )
    })
    .unwrap();
    let err = out
        .into_iter()
        .next()
        .unwrap()
        .expect_err("one token refused")
        .to_string();
    assert!(err.contains("at least 2 tokens"), "{err}");
}

#[test]
fn preset_matches_single_rank() {
    // The benchmark preset's shape (8 heads / 4 KV heads, 16 experts top-2), fewer and narrower layers.
    let cfg = ModelConfig::small_moe(256, 128, 3, 8, 4, 16, 16, 2, 64, Some(64));
    check(&seeded_model(5, &cfg), "preset");
}

/// EP training equals single-rank training: losses within 1e-5, every gradient within 1e-4 relative.
fn assert_matches_single_rank(report: &TrainingReport, label: &str) {
    assert!(
        report.loss_max_abs_diff <= 1e-5,
        "{label}: loss diff {}",
        report.loss_max_abs_diff
    );
    assert!(
        report.grad_max_rel_diff <= 1e-4,
        "{label}: grad diff {} ({})",
        report.grad_max_rel_diff,
        report.grad_max_rel_diff_param
    );
    // Two-micro-batch overlap (standard connectivity) against single-rank standard training. Its gradients are
    // sums of two halves' (a different rounding from the whole batch's, ~1e-6 relative after one step: see
    // `ep_training_with_two_micro_batch_overlap_matches_single_rank_training`), and AdamW turns rounding-level
    // gradients into whole steps, so after three steps they differ by up to a few 1e-4.
    assert!(
        report.tbo_loss_max_abs_diff <= 1e-5,
        "{label}: two-micro-batch loss diff {}",
        report.tbo_loss_max_abs_diff
    );
    assert!(
        report.tbo_grad_max_rel_diff <= 1e-3,
        "{label}: two-micro-batch grad diff {}",
        report.tbo_grad_max_rel_diff
    );
}

#[test]
fn ep_training_matches_single_rank_training() {
    let cfg = ModelConfig::small_moe(256, 64, 3, 4, 2, 16, 8, 2, 32, Some(32));
    let model = seeded_model(11, &cfg);
    for world in [2, 4] {
        let report = overlap_training(
            &model,
            &TrainingConfig {
                world,
                steps: 3,
                comm_ratio: 0.0,
                tokens: 16,
                // Two repeats at two ranks: the report's differences are the worst over both.
                repeats: if world == 2 { 2 } else { 1 },
                lr: 1e-2,
                seed: 1,
                balance: false,
                connectivity: Connectivity::farskip(),
            },
        )
        .unwrap();
        for (name, pct) in [
            ("forward", report.fwd_overlap_pct),
            ("backward", report.bwd_overlap_pct),
        ] {
            assert!(
                (0.0..=100.0).contains(&pct),
                "world {world}: {name} overlap {pct}"
            );
        }
        eprintln!(
            "world {world}: loss diff {:.1e}, grad diff {:.1e} ({})",
            report.loss_max_abs_diff, report.grad_max_rel_diff, report.grad_max_rel_diff_param
        );
        assert_matches_single_rank(&report, &format!("world {world}"));
        // Training moved: the losses of the three steps differ.
        assert!(
            (report.losses[0] - report.losses[2]).abs() > 1e-4,
            "{:?}",
            report.losses
        );
    }
}

/// The overlap experiment over several repeats, EP and TP: every schedule's logits equal the single-rank model's
/// in each repeat (the report keeps the worst), and the figures (each its median over the repeats) are times
/// and shares that make sense.
#[test]
fn overlap_inference_over_repeats_keeps_the_logits_and_reports_medians() {
    let cfg = ModelConfig::small_moe(256, 64, 3, 4, 2, 16, 8, 2, 32, Some(32));
    let model = seeded_model(13, &cfg);
    for parallel in [Parallel::Expert, Parallel::Tensor] {
        let report = overlap_inference(
            &model,
            &OverlapConfig {
                world: 2,
                parallel,
                comm_ratio: 1.0,
                tokens: 8,
                repeats: 3,
                seed: 2,
                balance: false,
                connectivity: Connectivity::farskip(),
            },
        )
        .unwrap();
        let label = format!("{parallel:?}");
        for (name, diff) in [
            ("FarSkip", report.max_abs_diff),
            ("blocking", report.blocking_max_abs_diff),
            ("TBO", report.tbo_max_abs_diff),
            ("farskip+tbo", report.farskip_tbo_max_abs_diff),
        ] {
            assert!(
                diff <= 1e-4,
                "{label} {name}: logits {diff} from single-rank"
            );
        }
        for (name, ms) in [
            ("farskip_ms", report.farskip_ms),
            ("blocking_ms", report.blocking_ms),
            ("compute_ms", report.compute_ms),
        ] {
            assert!(ms.is_finite() && ms > 0.0, "{label} {name} {ms}");
        }
        for (name, pct) in [
            ("overlap", report.overlap_pct),
            ("tbo overlap", report.tbo_overlap_pct),
        ] {
            assert!((0.0..=100.0).contains(&pct), "{label} {name} {pct}");
        }
        // Ops running on one rank's thread cannot take longer than the whole forward.
        assert!(
            report.compute_ms <= report.farskip_ms * 1.05,
            "{label}: compute {} ms in a {} ms forward",
            report.compute_ms,
            report.farskip_ms
        );
    }
}

/// Experts placed by load (relabelled, so the model computes the same function) on 2 and 4 EP ranks give the
/// single-rank logits of the model as it was, and the placement evens out the rows per rank on the tokens it
/// was fitted to.
#[test]
fn balanced_expert_placement_keeps_the_logits_and_evens_the_load() {
    let device = Device::flex();
    let cfg = ModelConfig::small_moe(256, 128, 3, 8, 4, 16, 16, 2, 64, Some(64));
    let model = seeded_model(5, &cfg)
        .with_connectivity(Connectivity::farskip())
        .unwrap();
    for world in [2, 4] {
        let calibration = random_ids(world, 256, 256, 100 + world as u64, &device);
        let ids = random_ids(world, 256, 256, world as u64, &device);
        let placement = balanced_placement(&model, world, &calibration).unwrap();
        let placed = placement.apply(&model).unwrap();
        let reference = model.forward(ids.clone()).unwrap();
        let (logits, _) = run_forward(
            &placed,
            Parallel::Expert,
            world,
            &ids,
            LinkModel::instant(),
            &Trace::disabled(),
        )
        .unwrap();
        let diff = max_abs_diff(logits, reference);
        assert!(diff <= 1e-4, "world {world}: {diff}");
        // On the tokens it was fitted to, the placement never loads the busiest rank more than contiguous
        // blocks do; on other tokens it usually helps too (printed, not asserted: random routers are noisy).
        let (contiguous, balanced) = placement
            .imbalance(&expert_loads(&model, world, &calibration).unwrap(), world)
            .unwrap();
        let (held_out_contiguous, held_out_balanced) = placement
            .imbalance(&expert_loads(&model, world, &ids).unwrap(), world)
            .unwrap();
        eprintln!(
            "world {world}: |EP placed - single| {diff:.1e}; busiest rank / mean, contiguous vs balanced: \
             fitted tokens {contiguous:.3} vs {balanced:.3}, held-out {held_out_contiguous:.3} vs {held_out_balanced:.3}"
        );
        assert!(
            balanced <= contiguous + 1e-9,
            "world {world}: balanced {balanced} vs contiguous {contiguous}"
        );
    }
}

/// Skip depth 2 and 3: up to d combines in flight per rank, the backward joining each routed output's gradient
/// where it was read; equals single-rank training of the same connectivity.
#[test]
fn ep_training_at_skip_depth_2_and_3_matches_single_rank_training() {
    let cfg = ModelConfig::small_moe(256, 64, 4, 4, 2, 16, 8, 2, 32, Some(32));
    let model = seeded_model(11, &cfg);
    for (world, spec) in [(2, "farskip-d2"), (4, "farskip-d2"), (2, "farskip-d3")] {
        let report = overlap_training(
            &model,
            &TrainingConfig {
                world,
                steps: 3,
                comm_ratio: 0.0,
                tokens: 16,
                repeats: 1,
                lr: 1e-2,
                seed: 1,
                balance: false,
                connectivity: spec.parse().unwrap(),
            },
        )
        .unwrap();
        eprintln!(
            "{spec} world {world}: loss diff {:.1e}, grad diff {:.1e} ({})",
            report.loss_max_abs_diff, report.grad_max_rel_diff, report.grad_max_rel_diff_param
        );
        assert_eq!(report.connectivity, spec);
        assert_matches_single_rank(&report, &format!("{spec} world {world}"));
        assert!(
            (report.losses[0] - report.losses[2]).abs() > 1e-4,
            "{:?}",
            report.losses
        );
    }
}

/// Few tokens over many ranks: some rank's experts get no rows in some layer, and training still equals
/// single-rank training (with experts placed by load too).
#[test]
fn ep_training_with_ranks_that_get_no_rows() {
    let cfg = ModelConfig::small_moe(256, 32, 2, 2, 1, 16, 8, 1, 16, None);
    let model = seeded_model(3, &cfg);
    for balance in [false, true] {
        let report = overlap_training(
            &model,
            &TrainingConfig {
                world: 4,
                steps: 1,
                comm_ratio: 0.0,
                tokens: 2,
                repeats: 1,
                lr: 1e-3,
                seed: 2,
                balance,
                connectivity: Connectivity::farskip(),
            },
        )
        .unwrap();
        assert_matches_single_rank(&report, &format!("balance {balance}"));
    }
}

/// One step of two-micro-batch overlap training on `world` ranks (two rows each, split into two halves) against
/// single-rank training of the same standard model on the same windows: returns the loss difference and the
/// largest gradient difference relative to the parameter's largest gradient (experts: each owner's slice).
fn tbo_step_vs_single_rank(model: &Model, world: usize, distill: bool) -> (f64, f64) {
    use burn::optim::GradientsParams;
    use farskip_dist::comm::LocalWorldConfig;
    use farskip_dist::training::{EpTrainRank, Objective, distill_loss, param_list};
    use farskip_model::compare::max_abs_diff as max_abs_diff_host;

    let device = Device::flex();
    let (rows, seq) = (2 * world, 16);
    let vocab = model.config().vocab_size;
    let windows = random_ids(rows, seq + 1, vocab, 40 + world as u64, &device);
    let teacher = {
        let _guard = SEEDED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        device.seed(90 + world as u64);
        Tensor::<3>::random(
            [rows, seq, vocab],
            burn::tensor::Distribution::Normal(0.0, 2.0),
            &device,
        )
    };
    let temperature = 2.0;
    let host = |t: Tensor<1>| {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    };
    // Reads a gradient of any rank as a flat vector (zeros where the parameter got none).
    let read = |grads: &GradientsParams, id, dims: &[usize]| -> Vec<f32> {
        let n: usize = dims.iter().product();
        let flat = match dims.len() {
            1 => grads.get::<1>(id),
            2 => grads.get::<2>(id).map(|g| g.reshape([n])),
            3 => grads.get::<3>(id).map(|g| g.reshape([n])),
            d => panic!("unexpected parameter rank {d}"),
        };
        flat.map(host).unwrap_or_else(|| vec![0.0; n])
    };

    // Single rank.
    let m = model.clone().train().fork(&device.autodiff());
    let x = windows.clone().narrow(1, 0, seq);
    let logits = m.forward_unchecked(x, None).reshape([rows * seq, vocab]);
    let loss = if distill {
        distill_loss(
            logits,
            teacher.clone().reshape([rows * seq, vocab]),
            temperature,
            1,
        )
    } else {
        let y = windows.clone().narrow(1, 1, seq).reshape([rows * seq, 1]);
        burn::tensor::activation::log_softmax(logits, 1)
            .gather(1, y)
            .neg()
            .mean()
    };
    let ref_loss = loss.clone().into_scalar::<f64>();
    let ref_grads = GradientsParams::from_grads(loss.backward(), &m);
    let reference: Vec<(Vec<usize>, Vec<f32>)> = param_list(&m)
        .into_iter()
        .map(|(id, dims)| {
            let g = read(&ref_grads, id, &dims);
            (dims, g)
        })
        .collect();

    // Expert parallel, two micro-batches per rank.
    let results = LocalWorld::run_with(
        world,
        LocalWorldConfig::new(LinkModel::instant()),
        |comm| -> anyhow::Result<_> {
            let r = comm.rank();
            let rank = EpTrainRank::new(model, r, world)?;
            let objective = if distill {
                Objective::Distill {
                    teacher_logits: teacher.clone().narrow(0, 2 * r, 2),
                    temperature,
                }
            } else {
                Objective::CrossEntropy
            };
            let step = rank.step_tbo_on(
                comm,
                comm,
                &Trace::disabled(),
                windows.clone().narrow(0, 2 * r, 2),
                &objective,
            )?;
            let grads: Vec<(Vec<usize>, Vec<f32>)> = param_list(rank.model())
                .into_iter()
                .map(|(id, dims)| {
                    let g = read(&step.grads, id, &dims);
                    (dims, g)
                })
                .collect();
            Ok((step.loss, rank.local_experts(), grads))
        },
    )
    .unwrap();
    let mut loss_sum = 0.0;
    let mut worst = 0.0f64;
    for r in results {
        let (loss, experts, grads) = r.unwrap();
        loss_sum += loss;
        assert_eq!(grads.len(), reference.len());
        for ((dims, g), (ref_dims, g_ref)) in grads.iter().zip(&reference) {
            let scale = g_ref.iter().fold(0.0f32, |a, b| a.max(b.abs())).max(1e-6) as f64;
            // An expert bank ([experts, ...]): this rank's block of the reference.
            let expected: &[f32] = if dims != ref_dims {
                let per_expert = g_ref.len() / ref_dims[0];
                &g_ref[experts.start * per_expert..experts.end * per_expert]
            } else {
                g_ref
            };
            worst = worst.max(max_abs_diff_host(g, expected) / scale);
        }
    }
    // Infinite on NaN.
    let loss_diff = max_abs_diff_host(&[loss_sum], &[ref_loss]);
    (loss_diff, worst)
}

/// Two-micro-batch overlap training (standard connectivity, each rank's rows split into two halves whose
/// layers interleave) equals single-rank training: cross-entropy and KL distillation, worlds 2 and 4.
#[test]
fn ep_training_with_two_micro_batch_overlap_matches_single_rank_training() {
    let cfg = ModelConfig::small_moe(256, 64, 3, 4, 2, 16, 8, 2, 32, Some(32));
    let model = seeded_model(11, &cfg)
        .with_connectivity(Connectivity::Standard)
        .unwrap();
    for world in [2, 4] {
        for distill in [false, true] {
            let (loss_diff, grad_diff) = tbo_step_vs_single_rank(&model, world, distill);
            eprintln!(
                "two-micro-batch training, world {world}, distill {distill}: loss diff {loss_diff:.1e}, \
                 grad diff {grad_diff:.1e}"
            );
            assert!(
                loss_diff <= 1e-5,
                "world {world} distill {distill}: loss diff {loss_diff}"
            );
            assert!(
                grad_diff <= 1e-4,
                "world {world} distill {distill}: grad diff {grad_diff}"
            );
        }
    }
}

/// Two-micro-batch overlap training refuses what it cannot split or run, naming it.
#[test]
fn two_micro_batch_training_refuses_odd_batches_farskip_and_kl_l2() {
    use farskip_dist::comm::SingleRank;
    use farskip_dist::training::{EpTrainRank, Objective};
    let cfg = ModelConfig::small_moe(256, 32, 2, 2, 1, 16, 8, 1, 16, None);
    let device = Device::flex();
    let model = seeded_model(3, &cfg)
        .with_connectivity(Connectivity::Standard)
        .unwrap();
    let comm = SingleRank::new();
    let trace = Trace::disabled();
    let step = |model: &Model, rows: usize, objective: &Objective| {
        let rank = EpTrainRank::new(model, 0, 1).unwrap();
        let windows = random_ids(rows, 9, 256, 1, &device);
        match rank.step_tbo_on(&comm, &comm, &trace, windows, objective) {
            Ok(_) => panic!("{rows} rows, {objective:?}: accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = step(&model, 3, &Objective::CrossEntropy);
    assert!(e.contains("batch even") && e.contains("[3, 9]"), "{e}");
    let e = step(&model, 0, &Objective::CrossEntropy);
    assert!(e.contains("[0, 9]"), "{e}");
    let farskip = model
        .clone()
        .with_connectivity(Connectivity::farskip())
        .unwrap();
    let e = step(&farskip, 2, &Objective::CrossEntropy);
    assert!(e.contains("standard connectivity"), "{e}");
    let hidden = Objective::DistillHidden {
        teacher_logits: Tensor::zeros([2, 8, 256], &device),
        teacher_hidden: vec![Tensor::zeros([2, 8, 32], &device); 2],
        temperature: 1.0,
        l2_weight: 1.0,
    };
    let e = step(&model, 2, &hidden);
    assert!(e.contains("KL + L2"), "{e}");
    // The standard model and an even batch run.
    let rank = EpTrainRank::new(&model, 0, 1).unwrap();
    let windows = random_ids(2, 9, 256, 1, &device);
    let loss = rank
        .step_tbo_on(&comm, &comm, &trace, windows, &Objective::CrossEntropy)
        .unwrap()
        .loss;
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
}
