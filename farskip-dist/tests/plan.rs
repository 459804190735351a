//! The planner: the simulator on hand-computable schedules, the descriptions against the executors' traces,
//! and every vendored config on the GPU presets.

use std::path::PathBuf;

use burn::prelude::*;
use farskip_dist::experiment::random_ids;
use farskip_dist::plan::desc::{self, OpKey, Schedule, Split, Step};
use std::collections::HashMap;

use farskip_dist::plan::sim::{
    Interval, Lane, SimError, Timeline, simulate, simulate_shared, simulate_sliced,
    simulate_with_wake,
};
use farskip_dist::plan::{
    Cluster, CostModel, Layout, Mode, ScheduleKind, Workload, load_model_config, predict,
    predict_roofline, schedule,
};
use farskip_dist::schedule::{EpRank, TpRank, ops, tbo_ops};
use farskip_dist::trace::{Phase, Stream};
use farskip_dist::training::{EpTrainRank, Objective};
use farskip_dist::{Communicator, LinkModel, LocalComm, LocalWorld, LocalWorldConfig, Trace};
use farskip_model::{Connectivity, Model, ModelConfig};

fn k(op: &'static str) -> OpKey {
    OpKey {
        op,
        layer: Some(0),
        phase: Phase::Forward,
        micro: 0,
    }
}

/// Compute a (2 ms) → issue c → compute w (2 ms, the window) → wait c → compute z (1 ms).
fn one_window() -> Schedule {
    Schedule {
        steps: vec![
            Step::Compute(k("a")),
            Step::Issue {
                key: k("c"),
                channel: 0,
            },
            Step::Compute(k("w")),
            Step::Wait(k("c")),
            Step::Compute(k("z")),
        ],
    }
}

fn costs(op: &str) -> f64 {
    match op {
        "a" | "w" => 2.0,
        _ => 1.0,
    }
}

#[test]
fn comm_equal_to_its_window_is_hidden_completely() {
    let t = simulate(&one_window(), 1, &|_, k| costs(k.op), &|_| 2.0).unwrap();
    let m = t.metrics(None);
    assert_eq!(m.wall_ms, 5.0);
    assert_eq!(m.overlap_pct, 100.0);
    assert_eq!(m.exposed_ms, 0.0);
    assert_eq!(m.compute_ms, 5.0);
}

#[test]
fn a_wake_delay_holds_a_waiting_rank_but_not_the_link() {
    // `ranks` ranks of `one_window` on cores of their own, the collective lasting `link` ms.
    let run = |ranks: usize, link: f64, wake: &dyn Fn(usize, &OpKey) -> f64| {
        simulate_with_wake(
            &one_window(),
            ranks,
            ranks,
            None,
            &|_, k| costs(k.op),
            &|_| link,
            wake,
        )
    };
    // The collective (4 ms) arrives at 6 ms; the rank waiting for it resumes 0.5 ms later. Its link time and
    // overlap are unchanged; the wall time grows by the delay.
    let m = run(1, 4.0, &|_, _| 0.5).unwrap().metrics(None);
    assert_eq!(m.wall_ms, 7.5);
    assert_eq!(m.comm_ms, 4.0);
    assert_eq!(m.overlap_pct, 50.0);
    // A collective whose link time and delay fit its window costs nothing: 1 ms + 0.5 ms behind 2 ms of compute.
    assert_eq!(run(1, 1.0, &|_, _| 0.5).unwrap().metrics(None).wall_ms, 5.0);
    // Each rank has its own delay: rank 1 resumes 1 ms after rank 0 and finishes last.
    let apart = run(2, 4.0, &|r, _| r as f64).unwrap();
    let end = |r: usize| {
        apart.ranks[r]
            .iter()
            .map(|i| i.end)
            .fold(f64::NAN, f64::max)
    };
    assert_eq!((end(0), end(1)), (7.0, 8.0));
    // A negative delay is refused by name.
    let err = run(1, 1.0, &|_, _| -1.0).unwrap_err();
    assert!(matches!(err, SimError::BadCost { op: "c", .. }), "{err:?}");
}

#[test]
fn comm_twice_its_window_exposes_exactly_the_excess() {
    let t = simulate(&one_window(), 1, &|_, k| costs(k.op), &|_| 4.0).unwrap();
    let m = t.metrics(None);
    assert_eq!(m.wall_ms, 7.0);
    assert_eq!(m.exposed_ms, 2.0);
    assert_eq!(m.overlap_pct, 50.0);
}

#[test]
fn a_second_window_before_the_wait_hides_twice_the_comm() {
    // Depth 2 in miniature: the wait moves one window later.
    let mut s = one_window();
    s.steps.insert(3, Step::Compute(k("w")));
    let t = simulate(&s, 1, &|_, k| costs(k.op), &|_| 4.0).unwrap();
    let m = t.metrics(None);
    assert_eq!(m.wall_ms, 7.0);
    assert_eq!(m.exposed_ms, 0.0);
    assert_eq!(m.overlap_pct, 100.0);
}

#[test]
fn a_late_rank_holds_the_collective_and_its_peer_waits() {
    // Rank 1's first op takes 3 ms instead of 2: the collective starts at 3 on both ranks.
    let t = simulate(
        &one_window(),
        2,
        &|r, k| {
            if r == 1 && k.op == "a" {
                3.0
            } else {
                costs(k.op)
            }
        },
        &|_| 2.0,
    )
    .unwrap();
    let m = t.metrics(None);
    assert_eq!(m.wall_ms, 6.0);
    assert_eq!(m.peer_wait_ms, 1.0);
    // Rank 0: c runs 3..5, w 2..4 → 1 ms hidden of 2; rank 1: w 3..5 hides all of it.
    assert_eq!(m.overlap_pct, 75.0);
    assert_eq!(m.exposed_ms, 1.0);
}

#[test]
fn a_collectives_host_work_runs_before_its_issue_and_after_its_wait() {
    // The dispatch packs (1 ms) before it goes out and unpacks (0.5 ms) after the wait: a → pack → (dispatch
    // 2..6 beside w 3..5) → wait until 6 → unpack 6..6.5 → z.
    let d = k(ops::DISPATCH);
    let s = Schedule {
        steps: vec![
            Step::Compute(k("a")),
            Step::Issue { key: d, channel: 0 },
            Step::Compute(k("w")),
            Step::Wait(d),
            Step::Compute(k("z")),
        ],
    };
    let cost = |_: usize, key: &OpKey| match key.op {
        ops::DISPATCH_PACK => 1.0,
        ops::DISPATCH_UNPACK => 0.5,
        op => costs(op),
    };
    let t = simulate(&s, 1, &cost, &|_| 3.0).unwrap();
    let order: Vec<(&str, f64, f64)> = t.ranks[0]
        .iter()
        .map(|i| (i.key.op, i.start, i.end))
        .collect();
    assert_eq!(
        order,
        [
            ("a", 0.0, 2.0),
            (ops::DISPATCH_PACK, 2.0, 3.0),
            (ops::DISPATCH, 3.0, 6.0),
            ("w", 3.0, 5.0),
            (ops::DISPATCH_UNPACK, 6.0, 6.5),
            ("z", 6.5, 7.5),
        ]
    );
    let m = t.metrics(None);
    assert_eq!(m.compute_ms, 6.5);
    assert_eq!(m.exposed_ms, 1.0);
    // Without host costs, nothing is added.
    let free = |_: usize, key: &OpKey| {
        if ops::is_host_work(key.op) {
            0.0
        } else {
            costs(key.op)
        }
    };
    let t = simulate(&s, 1, &free, &|_| 3.0).unwrap();
    assert_eq!(t.ranks[0].len(), 4);
}

#[test]
fn ranks_sharing_a_core_compute_at_its_share_of_the_speed() {
    // Two ranks on one core: both compute a (2 ms of work) at half speed, 0..4; c runs 4..6 beside w (4..8);
    // z 8..10.
    let t = simulate_shared(&one_window(), 2, 1, &|_, k| costs(k.op), &|_| 2.0).unwrap();
    let m = t.metrics(None);
    assert_eq!(m.wall_ms, 10.0);
    assert_eq!(m.overlap_pct, 100.0);
    // Rank 1's a is 1 ms of work: it ends at 2, and while rank 1 waits for the collective rank 0 runs alone.
    // Rank 0: a 0..4, c 4..6, w 4..8 (half speed while rank 1 computes), z 8..9 alone.
    let t = simulate_shared(
        &one_window(),
        2,
        1,
        &|r, k| {
            if r == 1 && k.op == "a" {
                1.0
            } else {
                costs(k.op)
            }
        },
        &|_| 2.0,
    )
    .unwrap();
    let ends: Vec<Vec<(&str, f64, f64)>> = t
        .ranks
        .iter()
        .map(|r| r.iter().map(|i| (i.key.op, i.start, i.end)).collect())
        .collect();
    assert!(ends[0].contains(&("a", 0.0, 4.0)), "{ends:?}");
    assert!(ends[0].contains(&("z", 8.0, 9.0)), "{ends:?}");
    assert!(ends[1].contains(&("w", 2.0, 6.0)), "{ends:?}");
    assert!(ends[1].contains(&("z", 6.0, 8.0)), "{ends:?}");
    assert_eq!(t.metrics(None).wall_ms, 9.0);
    assert!(
        simulate_shared(
            &Schedule {
                steps: vec![Step::Wait(k("c"))]
            },
            1,
            1,
            &|_, _| 1.0,
            &|_| 1.0
        )
        .is_err()
    );
}

#[test]
fn time_slices_let_ranks_sharing_a_core_drift_apart() {
    // Two ranks on one core, 1 ms slices, round robin: rank 0 computes a in 0..1 and 2..3, rank 1 in 1..2 and
    // 3..4, so rank 0 issues c at 3 and waits 1 ms for rank 1 (processor sharing: both issue at 4, no wait).
    // c runs 4..6 while each rank's w is under way (rank 0 3..7, rank 1 4..8); z: rank 0 7..9, rank 1 8..10.
    let t = simulate_sliced(&one_window(), 2, 1, 1.0, &|_, k| costs(k.op), &|_| 2.0).unwrap();
    let spans: Vec<Vec<(&str, f64, f64, f64)>> = t
        .ranks
        .iter()
        .map(|r| {
            r.iter()
                .map(|i| (i.key.op, i.start, i.end, i.peer_wait))
                .collect()
        })
        .collect();
    assert!(spans[0].contains(&("a", 0.0, 3.0, 0.0)), "{spans:?}");
    assert!(spans[1].contains(&("a", 0.0, 4.0, 0.0)), "{spans:?}");
    assert!(spans[0].contains(&("c", 4.0, 6.0, 1.0)), "{spans:?}");
    assert!(spans[1].contains(&("c", 4.0, 6.0, 0.0)), "{spans:?}");
    assert!(spans[0].contains(&("w", 3.0, 7.0, 0.0)), "{spans:?}");
    assert!(spans[1].contains(&("z", 8.0, 10.0, 0.0)), "{spans:?}");
    let m = t.metrics(None);
    assert_eq!(m.wall_ms, 10.0);
    assert_eq!(m.overlap_pct, 100.0);
    assert_eq!(m.peer_wait_ms, 1.0);
    let fluid = simulate_shared(&one_window(), 2, 1, &|_, k| costs(k.op), &|_| 2.0).unwrap();
    assert_eq!(fluid.metrics(None).peer_wait_ms, 0.0);
    // A core per rank: time slices change nothing.
    let cost = |r: usize, k: &OpKey| costs(k.op) * (1.0 + r as f64);
    assert_eq!(
        simulate_sliced(&one_window(), 2, 2, 1.0, &cost, &|_| 2.0).unwrap(),
        simulate(&one_window(), 2, &cost, &|_| 2.0).unwrap()
    );
}

#[test]
fn a_rank_woken_by_its_collective_preempts_at_once() {
    // Two ranks on one core, slices far longer than the step. Rank 0 computes a (0..1), issues c, computes w
    // (1..1.5) and sleeps in its wait; rank 1 gets the core: a 1.5..2.5, issues c (2.5..5.5), starts its long w.
    // When c arrives rank 0 wakes and takes the core at once (z 5.5..6.5); rank 1's w resumes after it and ends
    // at 13.5 (10 ms of work). Queued behind rank 1's slice instead, rank 0's z would run 13.5..14.5.
    let cost = |r: usize, k: &OpKey| match (k.op, r) {
        ("w", 0) => 0.5,
        ("w", _) => 10.0,
        _ => 1.0,
    };
    let t = simulate_sliced(&one_window(), 2, 1, 100.0, &cost, &|_| 3.0).unwrap();
    let span = |r: usize, op: &str| {
        t.ranks[r]
            .iter()
            .find(|i| i.key.op == op && i.lane == Lane::Compute)
            .map(|i| (i.start, i.end))
    };
    assert_eq!(span(0, "z"), Some((5.5, 6.5)), "{:?}", t.ranks);
    assert_eq!(span(1, "w"), Some((2.5, 13.5)), "{:?}", t.ranks);
    assert_eq!(span(1, "z"), Some((13.5, 14.5)), "{:?}", t.ranks);
}

/// The lockstep simulator the event simulator generalises: ranks step through the description together, each
/// rank's clock advancing by its own costs, a collective starting once every rank issued it and its lane is
/// free. The reference [`simulate`] must reproduce when every rank has a core of its own.
fn lockstep(
    schedule: &Schedule,
    world: usize,
    compute: &dyn Fn(usize, &OpKey) -> f64,
    collective: &dyn Fn(&OpKey) -> f64,
) -> Result<Timeline, SimError> {
    if world == 0 {
        return Err(SimError::NoRanks);
    }
    let mut t = vec![0.0f64; world];
    let mut lane_free: HashMap<u8, Vec<f64>> = HashMap::new();
    let mut done: HashMap<OpKey, f64> = HashMap::new();
    let mut ranks: Vec<Vec<Interval>> = vec![Vec::new(); world];
    // Runs `k` on every rank's compute lane; a collective's host work (`host`) leaves no interval where it
    // costs nothing.
    let run = |ranks: &mut Vec<Vec<Interval>>,
               t: &mut Vec<f64>,
               k: OpKey,
               host: bool|
     -> Result<(), SimError> {
        for r in 0..world {
            let c = compute(r, &k);
            if host && c == 0.0 {
                continue;
            }
            ranks[r].push(Interval {
                key: k,
                lane: Lane::Compute,
                start: t[r],
                end: t[r] + c,
                peer_wait: 0.0,
                issued: t[r],
            });
            t[r] += c;
        }
        Ok(())
    };
    let host = |ranks: &mut Vec<Vec<Interval>>,
                t: &mut Vec<f64>,
                op: Option<&'static str>,
                key: OpKey| match op {
        Some(op) => run(ranks, t, OpKey { op, ..key }, true),
        None => Ok(()),
    };
    for step in &schedule.steps {
        match *step {
            Step::Compute(k) => run(&mut ranks, &mut t, k, false)?,
            Step::Issue { key, channel } => {
                host(&mut ranks, &mut t, ops::pack(key.op), key)?;
                let free = lane_free.entry(channel).or_insert_with(|| vec![0.0; world]);
                // Costs are checked finite, so these maxima are numbers.
                let all_issued = t.iter().copied().fold(0.0, f64::max);
                let start = free.iter().copied().fold(all_issued, f64::max);
                let end = start + collective(&key);
                for r in 0..world {
                    free[r] = end;
                    ranks[r].push(Interval {
                        key,
                        lane: Lane::Comm(channel),
                        start,
                        end,
                        peer_wait: all_issued - t[r],
                        issued: t[r],
                    });
                }
                done.insert(key, end);
            }
            Step::Wait(k) => {
                let end = *done.get(&k).ok_or(SimError::WaitBeforeIssue {
                    op: k.op,
                    layer: k.layer,
                })?;
                for tr in t.iter_mut() {
                    *tr = tr.max(end);
                }
                host(&mut ranks, &mut t, ops::unpack(k.op), k)?;
            }
        }
    }
    Ok(Timeline { ranks })
}

/// An interval as (op, layer, micro-batch, start µs, end µs).
type SpanRow = (String, Option<usize>, u8, i64, i64);

#[test]
fn enough_cores_give_the_lockstep_timeline() {
    // Every description kind of a small model, with costs that differ per rank, op and layer (host work
    // included): the event simulator with a core per rank is the lockstep one.
    let config = tiny();
    let cost = |r: usize, k: &OpKey| {
        let h =
            k.op.bytes()
                .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
        let h = h ^ (k.layer.unwrap_or(99) as u64 * 131) ^ (r as u64 * 977) ^ (k.micro as u64 * 17);
        0.5 + (h % 97) as f64 / 37.0
    };
    let coll = |k: &OpKey| 0.25 + (k.layer.unwrap_or(5) % 4) as f64 * 0.8;
    let d2 = Connectivity::FarSkip(farskip_model::FarSkip::all().with_depth(2));
    let mut schedules = Vec::new();
    for conn in [Connectivity::Standard, Connectivity::farskip(), d2.clone()] {
        for split in [Split::Expert, Split::Tensor] {
            schedules.push(desc::inference(&config, &conn, split));
            schedules.push(desc::two_micro_batches(&desc::inference(
                &config, &conn, split,
            )));
        }
        schedules.push(desc::training(&config, &conn));
    }
    schedules.push(desc::training_tbo(&config));
    for s in &schedules {
        for world in [1, 2, 3] {
            let a = lockstep(s, world, &cost, &coll).unwrap();
            let b = simulate(s, world, &cost, &coll).unwrap();
            let (ma, mb) = (a.metrics(None), b.metrics(None));
            for (x, y) in [
                (ma.wall_ms, mb.wall_ms),
                (ma.compute_ms, mb.compute_ms),
                (ma.overlap_pct, mb.overlap_pct),
                (ma.exposed_ms, mb.exposed_ms),
                (ma.peer_wait_ms, mb.peer_wait_ms),
            ] {
                assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{x} vs {y}");
            }
            let sorted = |t: &Timeline| {
                let mut v: Vec<Vec<SpanRow>> = t
                    .ranks
                    .iter()
                    .map(|r| {
                        r.iter()
                            .map(|i| {
                                let q = |x: f64| (x * 1e6).round() as i64;
                                (
                                    i.key.op.to_string(),
                                    i.key.layer,
                                    i.key.micro,
                                    q(i.start),
                                    q(i.end),
                                )
                            })
                            .collect()
                    })
                    .collect();
                v.iter_mut().for_each(|r| r.sort());
                v
            };
            assert_eq!(sorted(&a), sorted(&b));
        }
    }
}

#[test]
fn waiting_before_issuing_and_bad_costs_are_errors() {
    let s = Schedule {
        steps: vec![Step::Wait(k("c"))],
    };
    let e = simulate(&s, 1, &|_, _| 1.0, &|_| 1.0).unwrap_err();
    assert!(e.to_string().contains("before issuing"), "{e}");
    let e = simulate(&one_window(), 1, &|_, _| f64::NAN, &|_| 1.0).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
}

#[test]
fn two_micro_batches_interleave_at_the_waits() {
    let s = desc::two_micro_batches(&one_window());
    let names: Vec<(String, u8)> = s
        .steps
        .iter()
        .map(|s| match s {
            Step::Compute(k) => (k.op.to_string(), k.micro),
            Step::Issue { key, .. } => (format!("issue {}", key.op), key.micro),
            Step::Wait(k) => (format!("wait {}", k.op), k.micro),
        })
        .collect();
    let expect = [
        ("a", 0),
        ("issue c", 0),
        ("w", 0),
        ("a", 1),
        ("issue c", 1),
        ("w", 1),
        ("wait c", 0),
        ("z", 0),
        ("wait c", 1),
        ("z", 1),
    ];
    assert_eq!(
        names,
        expect.map(|(a, b)| (a.to_string(), b)).to_vec(),
        "{names:?}"
    );
}

/// Unit op costs, collectives at `ratio` × 1 ms.
struct Unit(f64);
impl CostModel for Unit {
    fn compute(&self, _: usize, k: &OpKey, micro: usize) -> f64 {
        match k.op {
            "attn_1" | "attn_2" | "attn" | "experts" | "shared" | "mlp" | "attn_bwd"
            | "experts_bwd" | "shared_bwd" => 1.0 / micro as f64,
            "experts_1" | "experts_2" => 0.5 / micro as f64,
            _ => 0.0,
        }
    }
    fn collective(&self, _: &OpKey, _: usize) -> f64 {
        self.0
    }
}

fn tiny() -> ModelConfig {
    ModelConfig::small_moe(64, 32, 4, 4, 2, 8, 4, 2, 16, Some(16))
}

#[test]
fn farskip_hides_what_blocking_exposes_on_a_model() {
    let c = tiny();
    for split in [Split::Expert, Split::Tensor] {
        let p = predict(
            &c,
            &Connectivity::farskip(),
            split,
            Mode::Prefill,
            2,
            &Unit(1.0),
        )
        .unwrap();
        let m = &p.prediction;
        assert!(m.blocking_ms > m.farskip_ms, "{split:?}: {m:?}");
        assert!(m.speedup > 1.0);
        // Standard connectivity at the same costs has nothing to gain.
        let s = predict(
            &c,
            &Connectivity::Standard,
            split,
            Mode::Prefill,
            2,
            &Unit(1.0),
        )
        .unwrap();
        assert_eq!(s.prediction.farskip_ms, s.prediction.blocking_ms);
    }
    // EP, 4 layers, unit costs: every collective of the FarSkip schedule has a 1 ms window but the last
    // combine (the shared expert only): 100 % hidden.
    let p = predict(
        &c,
        &Connectivity::farskip(),
        Split::Expert,
        Mode::Prefill,
        2,
        &Unit(1.0),
    )
    .unwrap();
    assert_eq!(p.prediction.overlap_pct, 100.0, "{:?}", p.prediction);
    assert_eq!(p.prediction.compute_ms, 4.0 * 4.0);
    assert_eq!(p.prediction.farskip_ms, 16.0);
    // Blocking: dispatch exposed (1 ms per layer), combine hidden by the shared expert.
    assert_eq!(p.prediction.blocking_ms, 20.0);
}

/// At depth ≥ 2 the EP descriptions cut each layer's experts in two: layer i runs its router, issues its
/// dispatch, runs the second half of layer i − 1's experts and issues that layer's combine, then attention i, the
/// wait for dispatch i and the first half of its own experts — each collective gets an attention and half the
/// experts as its window. The last layer, with no layer to hold its combine, runs its experts whole.
#[test]
fn depth_two_ep_cuts_the_experts_between_the_two_collectives() {
    let c = tiny();
    let conn: Connectivity = "farskip-d2".parse().unwrap();
    let layers = c.layers.len();
    let key = |op: &'static str, layer: usize, phase: Phase| OpKey {
        op,
        layer: Some(layer),
        phase,
        micro: 0,
    };
    for schedule in [
        desc::inference(&c, &conn, Split::Expert),
        desc::training(&c, &conn),
    ] {
        let f = Phase::Forward;
        let at = |step: Step| {
            schedule
                .steps
                .iter()
                .position(|s| *s == step)
                .unwrap_or_else(|| panic!("{step:?} missing"))
        };
        let issue = |k: OpKey| Step::Issue { key: k, channel: 0 };
        for i in 1..layers - 1 {
            let order = [
                at(Step::Compute(key(ops::ROUTER, i, f))),
                at(issue(key(ops::DISPATCH, i, f))),
                at(Step::Compute(key(ops::EXPERTS_2, i - 1, f))),
                at(issue(key(ops::COMBINE, i - 1, f))),
                at(Step::Compute(key(ops::ATTN_1, i, f))),
                at(Step::Compute(key(ops::ATTN_2, i, f))),
                at(Step::Wait(key(ops::DISPATCH, i, f))),
                at(Step::Compute(key(ops::EXPERTS_1, i, f))),
            ];
            assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "layer {i}: {order:?}"
            );
        }
        let last = layers - 1;
        assert!(
            schedule
                .steps
                .contains(&Step::Compute(key(ops::EXPERTS, last, f)))
        );
        let cut = |op| {
            schedule
                .steps
                .iter()
                .filter(|s| matches!(s, Step::Compute(k) if k.op == op))
                .count()
        };
        assert_eq!(
            (cut(ops::EXPERTS_1), cut(ops::EXPERTS_2)),
            (layers - 1, layers - 1)
        );
    }
    // Depth 1 and the blocking baseline keep the experts whole.
    for conn in [Connectivity::farskip(), Connectivity::Standard] {
        let s = desc::inference(&c, &conn, Split::Expert);
        assert!(!s.steps.iter().any(
            |st| matches!(st, Step::Compute(k) if k.op == ops::EXPERTS_1 || k.op == ops::EXPERTS_2)
        ));
    }
}

#[test]
fn farskip_tbo_is_planned_where_the_executors_run_it() {
    let c = tiny();
    // Halves cost half the compute and, with `Unit`, a whole collective each: the two halves' collectives
    // overlap each other's compute, so farskip+tbo lands between FarSkip's wall and twice the blocking one.
    let p = predict(
        &c,
        &Connectivity::farskip(),
        Split::Expert,
        Mode::Prefill,
        2,
        &Unit(0.5),
    )
    .unwrap();
    let ft = p
        .prediction
        .farskip_tbo_ms
        .expect("depth-1 inference plans farskip+tbo");
    assert!(
        ft.is_finite() && ft >= p.prediction.compute_ms,
        "{:?}",
        p.prediction
    );
    assert!(ft <= 2.0 * p.prediction.blocking_ms, "{:?}", p.prediction);
    let d2 = Connectivity::FarSkip(farskip_model::FarSkip::all().with_depth(2));
    for (conn, mode) in [
        (d2, Mode::Prefill),
        (Connectivity::farskip(), Mode::Train),
        (Connectivity::Standard, Mode::Prefill),
    ] {
        let p = predict(&c, &conn, Split::Expert, mode, 2, &Unit(0.5)).unwrap();
        assert_eq!(p.prediction.farskip_tbo_ms, None, "{conn} {mode:?}");
    }
}

#[test]
fn training_reports_forward_and_backward_overlap() {
    let c = tiny();
    let p = predict(
        &c,
        &Connectivity::farskip(),
        Split::Expert,
        Mode::Train,
        2,
        &Unit(0.5),
    )
    .unwrap();
    let m = &p.prediction;
    assert!(m.fwd_overlap_pct.is_some_and(|f| f > 50.0), "{m:?}");
    assert!(m.bwd_overlap_pct.is_some_and(|b| b > 0.0), "{m:?}");
    assert!(m.speedup > 1.0, "{m:?}");
    // Depth 2 keeps two combines in flight: the forward hides at least as much.
    let d2 = Connectivity::FarSkip(farskip_model::FarSkip::all().with_depth(2));
    let p2 = predict(&c, &d2, Split::Expert, Mode::Train, 2, &Unit(0.5)).unwrap();
    assert!(
        p2.prediction.farskip_ms <= m.farskip_ms,
        "{:?}",
        p2.prediction
    );
}

/// (op, layer) of rank 0's compute spans in time order, consecutive repeats merged; and its collectives.
/// (op, layer) pairs in order.
type Ops = Vec<(String, Option<usize>)>;

fn traced(trace: &Trace) -> (Ops, Ops) {
    let mut spans: Vec<_> = trace.spans().into_iter().filter(|s| s.rank == 0).collect();
    spans.sort_by_key(|s| s.start);
    let mut compute: Ops = Vec::new();
    let mut comm = Vec::new();
    for s in spans {
        let item = (s.op.to_string(), s.layer);
        match s.stream {
            Stream::Compute => {
                if compute.last() != Some(&item) {
                    compute.push(item);
                }
            }
            _ => comm.push(item),
        }
    }
    (compute, comm)
}

/// The compute and collective order a description gives, with each collective's host work where the
/// simulator puts it: packing right before the issue, unpacking right after the wait.
fn described(s: &Schedule) -> (Ops, Ops) {
    let mut compute: Ops = Vec::new();
    let mut comm = Vec::new();
    let push = |compute: &mut Ops, op: &str, layer: Option<usize>| {
        let item = (op.to_string(), layer);
        if compute.last() != Some(&item) {
            compute.push(item);
        }
    };
    for step in &s.steps {
        match step {
            Step::Compute(k) => push(&mut compute, k.op, k.layer),
            Step::Issue { key, .. } => {
                if let Some(op) = ops::pack(key.op) {
                    push(&mut compute, op, key.layer);
                }
                comm.push((key.op.to_string(), key.layer));
            }
            Step::Wait(k) => {
                if let Some(op) = ops::unpack(k.op) {
                    push(&mut compute, op, k.layer);
                }
            }
        }
    }
    (compute, comm)
}

#[test]
fn descriptions_follow_the_executors_op_order() {
    let device = Device::flex();
    let config = tiny();
    let model = Model::new(&config, &device).unwrap();
    let ids = random_ids(1, 8, config.vocab_size, 3, &device);
    for conn in [
        Connectivity::Standard,
        Connectivity::farskip(),
        Connectivity::FarSkip(farskip_model::FarSkip::all().with_depth(2)),
        "farskip:1..=2".parse::<Connectivity>().unwrap(),
    ] {
        let m = model.clone().with_connectivity(conn.clone()).unwrap();
        for split in [Split::Expert, Split::Tensor] {
            let trace = Trace::new();
            let cfg = LocalWorldConfig::new(LinkModel::instant()).with_trace(trace.clone());
            LocalWorld::run_with(2, cfg, |comm: &LocalComm| match split {
                Split::Tensor => TpRank::new(&m, comm.rank(), 2)
                    .unwrap()
                    .forward(comm, &trace, ids.clone())
                    .map(|_| ()),
                _ => EpRank::new(&m, comm.rank(), 2)
                    .unwrap()
                    .forward(comm, &trace, ids.clone())
                    .map(|_| ()),
            })
            .unwrap()
            .into_iter()
            .for_each(|r| r.unwrap());
            let d = schedule(&config, &conn, split, Mode::Prefill, ScheduleKind::FarSkip);
            let (tc, tm) = traced(&trace);
            let (dc, dm) = described(&d);
            assert_eq!(dc, tc, "{conn} {split:?}: compute order");
            assert_eq!(dm, tm, "{conn} {split:?}: collectives");
        }
    }
    for conn in [
        Connectivity::Standard,
        Connectivity::farskip(),
        Connectivity::FarSkip(farskip_model::FarSkip::all().with_depth(2)),
    ] {
        let m = model.clone().with_connectivity(conn.clone()).unwrap();
        let windows = random_ids(1, 9, config.vocab_size, 4, &device);
        let trace = Trace::new();
        let cfg = LocalWorldConfig::new(LinkModel::instant()).with_trace(trace.clone());
        LocalWorld::run_with(2, cfg, |comm: &LocalComm| {
            EpTrainRank::new(&m, comm.rank(), 2)
                .unwrap()
                .step(comm, &trace, windows.clone())
                .map(|_| ())
        })
        .unwrap()
        .into_iter()
        .for_each(|r| r.unwrap());
        let d = schedule(
            &config,
            &conn,
            Split::Expert,
            Mode::Train,
            ScheduleKind::FarSkip,
        );
        let (tc, _) = traced(&trace);
        let (dc, _) = described(&d);
        // The step ends with the loss all-reduce and the optimizer's bookkeeping, which the description leaves out.
        assert_eq!(dc, tc[..dc.len().min(tc.len())].to_vec(), "{conn} training");
    }
    // Two-micro-batch training: each rank's two sequences are the micro-batches.
    let windows = random_ids(4, 9, config.vocab_size, 5, &device);
    let trace = Trace::new();
    let cfg = LocalWorldConfig::new(LinkModel::instant()).with_trace(trace.clone());
    LocalWorld::run_with(2, cfg, |comm: &LocalComm| {
        let mine = windows.clone().narrow(0, 2 * comm.rank(), 2);
        EpTrainRank::new(&model, comm.rank(), 2)
            .unwrap()
            .step_tbo_on(comm, comm, &trace, mine, &Objective::CrossEntropy)
            .map(|_| ())
    })
    .unwrap()
    .into_iter()
    .for_each(|r| r.unwrap());
    let d = schedule(
        &config,
        &Connectivity::Standard,
        Split::Expert,
        Mode::Train,
        ScheduleKind::Tbo,
    );
    let (tc, tm) = traced(&trace);
    let (dc, dm) = described(&d);
    assert_eq!(dc, tc[..dc.len().min(tc.len())].to_vec(), "TBO training");
    // The executor's collectives carry their micro-batch in the name (`dispatch.mb1`), and the embedding/head
    // gradient all-reduce is tagged with layer usize::MAX: the same sequence.
    let full: Ops = tm
        .iter()
        .map(|(op, l)| {
            let layer = l.filter(|&l| l != usize::MAX);
            (tbo_ops::full_op(op).unwrap_or(op).to_string(), layer)
        })
        .collect();
    assert_eq!(
        dm,
        full[..dm.len().min(full.len())].to_vec(),
        "TBO training collectives"
    );
}

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/data/configs")
}

#[test]
fn every_vendored_config_plans_on_h100_and_mi300x() {
    let mut n = 0;
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let config = load_model_config(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for cluster in [Cluster::h100(), Cluster::mi300x()] {
            for mode in [Mode::Prefill, Mode::Train] {
                for nodes in [1, 4] {
                    let layout = Layout::new(8 * nodes, 1, nodes, &cluster).unwrap();
                    let work = Workload::new(mode, 4096, 4096);
                    let p = predict_roofline(
                        &config,
                        &Connectivity::farskip(),
                        &cluster,
                        layout,
                        &work,
                    )
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    let m = p.prediction;
                    let what = format!(
                        "{} {} {mode:?} {nodes} nodes: {m:?}",
                        path.display(),
                        cluster.name
                    );
                    assert!(m.farskip_ms > 0.0 && m.farskip_ms.is_finite(), "{what}");
                    assert!(m.farskip_ms <= m.blocking_ms * (1.0 + 1e-9), "{what}");
                    assert!((0.0..=100.0).contains(&m.overlap_pct), "{what}");
                    assert!(m.compute_ms <= m.farskip_ms * (1.0 + 1e-9), "{what}");
                }
            }
        }
        n += 1;
    }
    assert_eq!(n, 6, "vendored configs");
}

#[test]
fn llama4_wrapper_is_planned_from_its_text_config() {
    let c = load_model_config(&configs_dir().join("llama4_scout.json")).unwrap();
    assert_eq!(c.hidden_size, 5120);
    assert_eq!(c.layers.len(), 48);
    assert_eq!(c.moe.as_ref().map(|m| m.num_experts), Some(16));
}

#[test]
fn bad_layouts_and_clusters_name_the_culprit() {
    let h = Cluster::h100();
    let e = Layout::new(16, 1, 1, &h).unwrap_err().to_string();
    assert!(e.contains("16 per node") && e.contains("has 8"), "{e}");
    let e = Layout::new(6, 1, 4, &h).unwrap_err().to_string();
    assert!(e.contains("do not split over 4 nodes"), "{e}");
    let e = Cluster::from_toml("name = \"x\"\nflops = -1.0\nmem_bw = 1.0\ndevices_per_node = 8\nintra_bw = 1.0\ninter_bw = 1.0\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("flops = -1"), "{e}");
    let e = Cluster::from_toml("name = \"x\"\nflop = 1.0\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("flop"), "{e}");
    let ok = Cluster::from_toml(
        "name = \"lab\"\nflops = 1e15\nmem_bw = 3e12\ndevices_per_node = 4\nintra_bw = 1e11\ninter_bw = 2.5e10\n",
    )
    .unwrap();
    assert_eq!(ok.devices_per_node, 4);
    assert_eq!(ok.flop_efficiency, 0.6);
    // The example file: an H100 node with half the NIC bandwidth.
    let file = std::fs::read_to_string(configs_dir().join("../clusters/h100_200g.toml")).unwrap();
    let c = Cluster::from_toml(&file).unwrap();
    assert_eq!(
        c,
        Cluster {
            name: "h100-200g".into(),
            ..Cluster::h100().with_inter_bw(25e9)
        }
    );
}

#[test]
fn roofline_collectives_follow_the_alpha_beta_model() {
    use farskip_dist::plan::cost::ring_all_reduce_s;
    // 4 ranks, 1 GB/s, 1 ms latency, 4 MB: 2·3·1 ms + 2·3/4·4 MB / 1 GB/s = 6 + 6 ms.
    let t = ring_all_reduce_s(4e6, 4, 1e9, 1e-3);
    assert!((t - 0.012).abs() < 1e-12, "{t}");
    assert_eq!(ring_all_reduce_s(4e6, 1, 1e9, 1e-3), 0.0);
    // A cross-node all-to-all is bounded by the NIC: EP 16 over 2 H100 nodes moves 8/16 of the bytes
    // through 50 GB/s × 0.8, the other 7/16 over 450 GB/s × 0.8.
    let c = Cluster::h100();
    let cfg = tiny();
    let two = Layout::new(16, 1, 2, &c).unwrap();
    let r = farskip_dist::plan::Roofline::new(
        cfg.clone(),
        c.clone(),
        two,
        Workload::new(Mode::Prefill, 1, 1),
    );
    let bytes = 1.6e9;
    let expect = 6e-6 + 8.0 * (bytes / 16.0) / (50e9 * 0.8);
    assert!(
        (r.all_to_all_s(bytes) - expect).abs() < 1e-9,
        "{}",
        r.all_to_all_s(bytes)
    );
    // MI300X inside one node: 7 peer links of 64 GB/s, not the 448 GB/s aggregate, are what the exchange gets.
    let m = Cluster::mi300x();
    let one = Layout::new(8, 1, 1, &m).unwrap();
    let r = farskip_dist::plan::Roofline::new(cfg, m, one, Workload::new(Mode::Prefill, 1, 1));
    let expect = 3e-6 + 7.0 * (bytes / 8.0) / (7.0 * 64e9 * 0.8);
    assert!(
        (r.all_to_all_s(bytes) - expect).abs() < 1e-9,
        "{}",
        r.all_to_all_s(bytes)
    );
}

#[test]
fn measured_costs_calibrate_the_link_on_the_depth_one_windows() {
    use farskip_dist::experiment::Parallel;
    use farskip_dist::plan::calibrate::{CALIBRATION_VERSION, Calibration, Measured, OpTime};
    let op = |op: &str, layer: Option<usize>, ms: f64, min_ms: f64| OpTime {
        op: op.into(),
        layer,
        backward: false,
        ms,
        min_ms,
        spread: 0.0,
    };
    let config = ModelConfig::small_moe(64, 32, 2, 4, 2, 8, 4, 2, 16, None);
    let cal = Calibration {
        model: "t".into(),
        mode: "prefill".into(),
        parallel: Parallel::Expert,
        world: 2,
        tokens: 8,
        threads: 1,
        cores: 2,
        slice_ms: None,
        latency_ms: None,
        rank_speed: Vec::new(),
        round_speeds: Vec::new(),
        ops: vec![
            op("attn_1", Some(0), 2.0, 1.0),
            op("attn_1", Some(1), 4.0, 3.0),
            op("attn_2", Some(0), 5.0, 4.0),
            op("attn_2", Some(1), 6.0, 5.0),
            op("experts", Some(0), 7.0, 7.0),
            op("embed_head", None, 10.0, 10.0),
            op("dispatch_pack", Some(0), 0.5, 0.5),
        ],
        // Half the batch: attention part 2 of layer 1 takes more than half of the whole's 6 ms.
        ops_half: vec![op("attn_2", Some(1), 3.5, 3.0)],
        expert_share: vec![vec![1.5, 0.5], vec![]],
        measured_unix_s: None,
        version: CALIBRATION_VERSION,
    };
    let d = schedule(
        &config,
        &Connectivity::farskip(),
        Split::Expert,
        Mode::Prefill,
        ScheduleKind::FarSkip,
    );
    let m = Measured::new(&cal, &d, 2, Split::Expert, 2.0);
    let key = |op: &'static str, layer: Option<usize>| OpKey {
        op,
        layer,
        phase: Phase::Forward,
        micro: 0,
    };
    // Dispatch(0): 2 × fastest attention part 2; combine(0): 2 × (no shared + fastest attn_1 of layer 1).
    assert_eq!(m.collective(&key("dispatch", Some(0)), 1), 8.0);
    assert_eq!(m.collective(&key("combine", Some(0)), 1), 6.0);
    assert_eq!(m.collective(&key("combine", Some(1)), 1), 0.0);
    assert_eq!(m.window_ms(), 4.0 + 3.0 + 5.0);
    // The median is the cost; the head's total is shared by its two steps (embedding, logits).
    assert_eq!(m.compute(0, &key("attn_2", Some(1)), 1), 6.0);
    assert_eq!(m.compute(0, &key("embed_head", None), 1), 5.0);
    // A two-micro-batch half costs what half the batch measured; an op measured only whole costs half of it.
    assert_eq!(m.compute(0, &key("attn_2", Some(1)), 2), 3.5);
    assert_eq!(m.compute(0, &key("attn_2", Some(0)), 2), 2.5);
    // More micro-batches than two: the whole's share.
    assert_eq!(m.compute(0, &key("attn_2", Some(1)), 4), 1.5);
    // Rank 0 receives 1.5 × the measured pass's expert rows in layer 0, rank 1 half.
    assert_eq!(m.compute(0, &key("experts", Some(0)), 1), 10.5);
    assert_eq!(m.compute(1, &key("experts", Some(0)), 1), 3.5);
    // A collective's host work is costed as measured (once per issue of the dispatch).
    assert_eq!(m.compute(0, &key("dispatch_pack", Some(0)), 1), 0.5);
    assert_eq!(m.cores(), None);
    // A measured latency (the LocalWorld's rendezvous and wake-ups) delays a rank waiting for any collective,
    // which keeps its link time; windows unchanged.
    let slow = Measured::new(
        &Calibration {
            latency_ms: Some(0.25),
            ..cal.clone()
        },
        &d,
        2,
        Split::Expert,
        2.0,
    );
    assert_eq!(slow.collective(&key("dispatch", Some(0)), 1), 8.0);
    assert_eq!(slow.wake_ms(0, &key("dispatch", Some(0))), 0.25);
    assert_eq!(slow.wake_ms(1, &key("combine", Some(1))), 0.25);
    assert_eq!(m.wake_ms(0, &key("combine", Some(1))), 0.0);
    // A draw holds each rank back a share of it: uniform in 0..=0.375 ms for two ranks, the later of the two
    // 0.25 ms on average.
    let (mut later, draws) = (0.0, 2000);
    for seed in 0..draws {
        let d = slow.clone().with_jitter(Some(seed));
        let w: Vec<f64> = (0..2)
            .map(|r| d.wake_ms(r, &key("dispatch", Some(0))))
            .collect();
        assert!(w.iter().all(|x| (0.0..=0.375).contains(x)), "{w:?}");
        later += w[0].max(w[1]);
    }
    let later = later / draws as f64;
    assert!((later - 0.25).abs() < 0.01, "{later}");
    assert_eq!(slow.window_ms(), m.window_ms());
    // A cache's age comes from when it was measured: none recorded (older files) or a time ahead of this clock
    // has no age, so the planner measures again.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(cal.age(), None);
    let aged = |s| Calibration {
        measured_unix_s: Some(s),
        ..cal.clone()
    };
    let age = aged(now - 100).age().expect("an age").as_secs();
    assert!((100..110).contains(&age), "{age}");
    assert_eq!(aged(now + 3600).age(), None);
    // Rank 1's core measured 1.5 × as slow: its ops cost 1.5 × as much, rank 0's and the windows (the fastest
    // passes) unchanged.
    let uneven = Measured::new(
        &Calibration {
            rank_speed: vec![1.0, 1.5],
            ..cal.clone()
        },
        &d,
        2,
        Split::Expert,
        2.0,
    );
    assert_eq!(uneven.compute(0, &key("attn_2", Some(1)), 1), 6.0);
    assert_eq!(uneven.compute(1, &key("attn_2", Some(1)), 1), 9.0);
    assert_eq!(uneven.compute(1, &key("experts", Some(0)), 1), 3.5 * 1.5);
    assert_eq!(uneven.window_ms(), m.window_ms());
    // Each draw takes one round's speeds in turn (the slow core changed sides between the two rounds); without
    // a draw, the median speeds.
    let rounds = Calibration {
        rank_speed: vec![1.0, 1.5],
        round_speeds: vec![vec![1.0, 1.5], vec![1.5, 1.0]],
        ..cal.clone()
    };
    let m0 = Measured::new(&rounds, &d, 2, Split::Expert, 2.0);
    let attn = key("attn_2", Some(1));
    assert_eq!(m0.compute(1, &attn, 1), 9.0);
    let draw = |seed| m0.clone().with_jitter(Some(seed));
    assert_eq!(draw(0).compute(0, &attn, 1), 6.0);
    assert_eq!(draw(0).compute(1, &attn, 1), 9.0);
    assert_eq!(draw(1).compute(0, &attn, 1), 9.0);
    assert_eq!(draw(1).compute(1, &attn, 1), 6.0);
    assert_eq!(draw(2).compute(1, &attn, 1), 9.0);
    // Four ranks on two cores: ops were measured a core per copy; the experiments' free pass runs all four at
    // once, so each window is twice the fastest op, and the simulator shares the two cores.
    let four = Calibration { world: 4, ..cal };
    let m = Measured::new(&four, &d, 2, Split::Expert, 2.0);
    assert_eq!(m.cores(), Some(2));
    assert_eq!(m.collective(&key("dispatch", Some(0)), 1), 16.0);
    assert_eq!(m.compute(0, &key("attn_2", Some(1)), 1), 6.0);
    assert_eq!(m.time_slice_ms(), None);
    // With the scheduler's time slice measured, the free pass is simulated with it: with slices longer than the
    // pass, ranks 0 and 1 keep their cores until they wait for the dispatch (ranks 2 and 3 have not issued
    // it), so their attn_2 runs alone and the window is the fastest attn_2 (4 ms).
    let sliced = Calibration {
        world: 4,
        slice_ms: Some(1e6),
        ..four
    };
    let m = Measured::new(&sliced, &d, 2, Split::Expert, 2.0);
    assert_eq!(m.time_slice_ms(), Some(1e6));
    assert_eq!(m.collective(&key("dispatch", Some(0)), 1), 8.0);
}

#[test]
fn jitter_draws_rank_costs_around_the_median_and_averages_out() {
    use farskip_dist::experiment::Parallel;
    use farskip_dist::plan::Prediction;
    use farskip_dist::plan::calibrate::{CALIBRATION_VERSION, Calibration, Measured, OpTime};
    let config = tiny();
    let ops = (0..4)
        .flat_map(|l| {
            ["attn_1", "attn_2", "experts", "shared"].map(|op| OpTime {
                op: op.into(),
                layer: Some(l),
                backward: false,
                ms: 2.0,
                min_ms: 2.0,
                spread: 0.3,
            })
        })
        .collect();
    let cal = Calibration {
        model: "t".into(),
        mode: "prefill".into(),
        parallel: Parallel::Expert,
        world: 2,
        tokens: 8,
        threads: 1,
        cores: 2,
        slice_ms: None,
        latency_ms: None,
        rank_speed: Vec::new(),
        round_speeds: Vec::new(),
        ops,
        ops_half: Vec::new(),
        expert_share: Vec::new(),
        measured_unix_s: None,
        version: CALIBRATION_VERSION,
    };
    let d = schedule(
        &config,
        &Connectivity::farskip(),
        Split::Expert,
        Mode::Prefill,
        ScheduleKind::FarSkip,
    );
    let plain = Measured::new(&cal, &d, 4, Split::Expert, 1.0);
    let p0 = predict(
        &config,
        &Connectivity::farskip(),
        Split::Expert,
        Mode::Prefill,
        2,
        &plain,
    )
    .unwrap();
    // Without jitter every window equals its collective: all hidden.
    assert_eq!(p0.prediction.overlap_pct, 100.0);
    let draws: Vec<Prediction> = (0..64)
        .map(|seed| {
            let m = plain.clone().with_jitter(Some(seed));
            predict(
                &config,
                &Connectivity::farskip(),
                Split::Expert,
                Mode::Prefill,
                2,
                &m,
            )
            .unwrap()
            .prediction
        })
        .collect();
    let mean = Prediction::mean(&draws).unwrap();
    // Ranks drift apart: some comm is exposed and the step is slower than the ranks' mean compute.
    assert!(
        mean.overlap_pct < 95.0 && mean.overlap_pct > 40.0,
        "{mean:?}"
    );
    assert!(mean.farskip_ms > p0.prediction.farskip_ms, "{mean:?}");
    // The factors have mean 1: the busiest rank's compute is within the spread of the median's.
    assert!(
        (mean.compute_ms / p0.prediction.compute_ms - 1.0).abs() < 0.3,
        "{mean:?}"
    );
    assert!(Prediction::mean(&[]).is_none());
    // The median is each field's middle value, not the mean's: draws at 1, 2 and 9 ms give 2 (mean 4).
    let at = |ms: f64, overlap: f64| Prediction {
        farskip_ms: ms,
        overlap_pct: overlap,
        fwd_overlap_pct: None,
        ..p0.prediction.clone()
    };
    let three = [at(1.0, 90.0), at(2.0, 40.0), at(9.0, 80.0)];
    let median = Prediction::median(&three).unwrap();
    assert_eq!((median.farskip_ms, median.overlap_pct), (2.0, 80.0));
    assert_eq!(Prediction::mean(&three).unwrap().farskip_ms, 4.0);
    assert_eq!(
        median.speedup,
        p0.prediction.blocking_ms / 2.0,
        "speedup from the median times"
    );
    assert!(Prediction::median(&[]).is_none());
}

#[test]
fn routing_imbalance_comes_from_the_checkpoints_router() {
    use farskip_dist::plan::calibrate::routing_imbalance;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe");
    let model = Model::from_pretrained(&dir, &Device::flex()).unwrap();
    let experts = model.config().moe.as_ref().unwrap().num_experts;
    // One rank holds every expert: perfectly balanced by definition.
    assert_eq!(routing_imbalance(&model, 1, 16, 1).unwrap(), 1.0);
    // One expert per rank: the busiest rank's rows over the mean, between 1 and the rank count.
    let i = routing_imbalance(&model, experts, 16, 1).unwrap();
    assert!(i > 1.0 && i <= experts as f64, "{i}");
}

#[test]
fn an_ep_calibration_times_a_ranks_block_of_experts() {
    use farskip_dist::experiment::Parallel;
    use farskip_dist::plan::Mode;
    use farskip_dist::plan::calibrate::{
        CALIBRATION_VERSION, Calibration, Passes, measure_inference, measure_training,
    };
    // Two rounds of one timed pass: the rounds' samples are kept apart.
    const QUICK: Passes = Passes {
        rounds: 2,
        per_round: 1,
    };
    // 8 experts, top-2, every layer MoE (as EP training needs).
    let cfg = ModelConfig::small_moe(40, 16, 2, 4, 2, 4, 8, 2, 8, None);
    let model = Model::new(&cfg, &Device::flex()).unwrap();
    let moe_layers = model.layers.len();
    let tokens = 16;
    // (world, the experiment's rows per token over the timed block's): a rank of 8 holds one expert, so its
    // block routes one row per token where the experiment routes two.
    for (world, rows_ratio) in [(1, 1.0), (2, 1.0), (8, 2.0)] {
        let inference =
            measure_inference(&model, "tiny", Parallel::Expert, world, tokens, QUICK, 7).unwrap();
        let training = measure_training(&model, "tiny", world, tokens, QUICK, 7).unwrap();
        if world <= 2 {
            // TP (4 heads: up to 2 ranks here): its micro-batch costs also come from a two-micro-batch pass.
            let tensor =
                measure_inference(&model, "tiny", Parallel::Tensor, world, tokens, QUICK, 7)
                    .unwrap();
            assert_eq!(
                op_keys(&tensor.ops),
                op_keys(&tensor.ops_half),
                "tp world {world}"
            );
        }
        for c in [&inference, &training] {
            let timed = c
                .ops
                .iter()
                .filter(|o| o.op == ops::EXPERTS && o.ms > 0.0)
                .count();
            assert_eq!(timed, moe_layers, "world {world}, {}", c.mode);
            // Each rank's share is its rows in the experiment over the rows the timed block ran: the shares of a
            // layer add up to the world times the experiment's rows per token over the block's.
            assert_eq!(c.expert_share.len(), moe_layers);
            for shares in &c.expert_share {
                assert_eq!(shares.len(), world);
                let sum: f64 = shares.iter().sum();
                let want = world as f64 * rows_ratio;
                assert!(
                    (sum - want).abs() < 1e-9,
                    "world {world}, {}: {shares:?}",
                    c.mode
                );
            }
            assert_eq!(c.version, CALIBRATION_VERSION);
            let mode = if c.mode == "train" {
                Mode::Train
            } else {
                Mode::Prefill
            };
            assert!(c.matches("tiny", mode, Parallel::Expert, world, tokens));
            // A micro-batch's costs come from the two-micro-batch pass, which runs every op of the plain one.
            assert_eq!(
                op_keys(&c.ops),
                op_keys(&c.ops_half),
                "world {world}, {}",
                c.mode
            );
            // A calibration measured otherwise (e.g. the whole expert bank) is measured again.
            for version in [0, 1] {
                let old = Calibration {
                    version,
                    ..c.clone()
                };
                assert!(!old.matches("tiny", mode, Parallel::Expert, world, tokens));
            }
        }
    }
}

/// The (op, layer, backward) keys of a calibration's op table, sorted.
fn op_keys(ops: &[farskip_dist::plan::calibrate::OpTime]) -> Vec<(String, Option<usize>, bool)> {
    let mut k: Vec<_> = ops
        .iter()
        .map(|o| (o.op.clone(), o.layer, o.backward))
        .collect();
    k.sort();
    k
}

#[test]
fn a_balanced_calibration_places_the_experts_as_the_experiments_do() {
    use farskip_dist::experiment::{
        BALANCE_SEED, balanced_placement as run_placement, expert_loads,
    };
    use farskip_dist::plan::calibrate::balanced_placement;
    let cfg = ModelConfig::small_moe(40, 16, 2, 4, 2, 4, 8, 2, 8, None);
    let device = Device::flex();
    let model = Model::new(&cfg, &device).unwrap();
    let (tokens, seed) = (16, 1);
    for world in [2, 4] {
        // The planner routes the placement batch on one rank; the experiments on `world` EP ranks.
        let planned = balanced_placement(&model, world, tokens, seed).unwrap();
        let ids = random_ids(world, tokens, cfg.vocab_size, seed + BALANCE_SEED, &device);
        let run = run_placement(&model, world, &ids).unwrap();
        assert_eq!(planned.orders, run.orders, "world {world}");
        assert_eq!(planned.orders.len(), cfg.layers.len());
        // Random routing is uneven enough that some layer's experts move.
        assert!(
            planned
                .orders
                .iter()
                .any(|o| *o != (0..8).collect::<Vec<_>>()),
            "world {world}: {:?}",
            planned.orders
        );
        for order in &planned.orders {
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (0..8).collect::<Vec<_>>(),
                "world {world}: {order:?}"
            );
        }
        // On the batch it was placed for, the busiest rank carries no more than under contiguous blocks.
        let loads = expert_loads(&model, world, &ids).unwrap();
        let (contiguous, balanced) = planned.imbalance(&loads, world).unwrap();
        assert!(
            balanced >= 1.0 && balanced <= contiguous,
            "world {world}: {balanced} against {contiguous}"
        );
        // The placed model routes the same tokens to the same experts, renumbered: its EP calibration runs.
        let placed = planned.apply(&model).unwrap();
        let c = farskip_dist::plan::calibrate::measure_inference(
            &placed,
            "tiny-balanced",
            farskip_dist::experiment::Parallel::Expert,
            world,
            tokens,
            farskip_dist::plan::calibrate::Passes {
                rounds: 1,
                per_round: 1,
            },
            seed,
        )
        .unwrap();
        assert_eq!(c.expert_share.len(), cfg.layers.len());
    }
}
