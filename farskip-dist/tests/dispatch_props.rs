//! Expert-parallel dispatch → experts → combine against single-rank references, for random
//! routings, token counts, expert counts and world sizes 1..=4 (ranks as LocalWorld threads).

use burn::prelude::{Device, Int, Tensor, TensorData};
use farskip_dist::{
    CollectiveTag, Communicator, DispatchError, ExpertInputs, ExpertSharding, LinkModel,
    LocalWorld, Routing, SingleRank, combine, combine_start, dispatch, dispatch_start,
    weighted_sum_slots,
};
use proptest::prelude::*;

/// One rank's tokens and routing, as host data.
#[derive(Debug, Clone)]
struct RankCase {
    x: Vec<f32>,
    experts: Vec<usize>,
    weights: Vec<f32>,
}

#[derive(Debug, Clone)]
struct Case {
    world: usize,
    num_experts: usize,
    top_k: usize,
    hidden: usize,
    ranks: Vec<RankCase>,
}

impl Case {
    fn tokens(&self, r: usize) -> usize {
        self.ranks[r].x.len() / self.hidden
    }
}

/// Dyadic values (multiples of 1/4 and 1/8) keep every product and sum exact in f32.
fn case(dyadic: bool) -> impl Strategy<Value = Case> {
    (1usize..=4, 1usize..=6, 1usize..=3, 1usize..=4).prop_flat_map(move |(world, e, k, h)| {
        let value = if dyadic {
            (-16i32..=16).prop_map(|v| v as f32 / 4.0).boxed()
        } else {
            (-1e3f32..1e3).boxed()
        };
        let weight = if dyadic {
            (0i32..=8).prop_map(|v| v as f32 / 8.0).boxed()
        } else {
            (0f32..1.0).boxed()
        };
        let rank = (0usize..=5).prop_flat_map(move |n| {
            (
                prop::collection::vec(value.clone(), n * h),
                prop::collection::vec(0..e, n * k),
                prop::collection::vec(weight.clone(), n * k),
            )
                .prop_map(|(x, experts, weights)| RankCase {
                    x,
                    experts,
                    weights,
                })
        });
        prop::collection::vec(rank, world).prop_map(move |ranks| Case {
            world,
            num_experts: e,
            top_k: k,
            hidden: h,
            ranks,
        })
    })
}

fn dev() -> Device {
    Device::flex()
}

fn tensor2(data: Vec<f32>, rows: usize, cols: usize) -> Tensor<2> {
    Tensor::from_data(TensorData::new(data, [rows, cols]), &dev())
}

fn read(t: Tensor<2>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap_or_default()
}

/// A deterministic, row-wise expert whose result depends on the global expert id.
fn expert_fn(e: usize, v: f32) -> f32 {
    v * (1.0 + e as f32 * 0.37) - e as f32 * 0.11
}

/// Applies `expert_fn` to each received row (identity when `identity`).
fn run_experts(inputs: &ExpertInputs, hidden: usize, identity: bool) -> Tensor<2> {
    let rows = inputs.num_rows();
    let mut data = read(inputs.tokens.clone());
    if !identity {
        for (l, e) in inputs.experts.clone().enumerate() {
            for r in inputs.rows_of(l) {
                for v in &mut data[r * hidden..(r + 1) * hidden] {
                    *v = expert_fn(e, *v);
                }
            }
        }
    }
    tensor2(data, rows, hidden)
}

/// Dispatch, experts, combine on one rank; returns the combined rows.
fn moe_step<C: Communicator + ?Sized>(
    comm: &C,
    c: &Case,
    rank_case: &RankCase,
    world: usize,
    identity: bool,
) -> Result<Vec<f32>, DispatchError> {
    let n = rank_case.x.len() / c.hidden;
    let sharding = ExpertSharding::new(c.num_experts, world)?;
    let x = tensor2(rank_case.x.clone(), n, c.hidden);
    let routing = Routing::new(
        rank_case.experts.clone(),
        tensor2(rank_case.weights.clone(), n, c.top_k),
    )?;
    let (inputs, plan) = dispatch(comm, &sharding, x, &routing, CollectiveTag::new("dispatch"))?;
    assert_eq!(inputs.counts.len(), sharding.num_local(comm.rank()));
    let y = run_experts(&inputs, c.hidden, identity);
    let out = combine(comm, y, plan, CollectiveTag::new("combine"))?;
    assert_eq!(out.dims(), [n, c.hidden]);
    Ok(read(out))
}

fn run_ep(c: &Case, identity: bool) -> Result<Vec<Vec<f32>>, TestCaseError> {
    let outcomes = LocalWorld::run(c.world, LinkModel::instant(), |comm| {
        moe_step(comm, c, &c.ranks[comm.rank()], c.world, identity)
    })
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    outcomes
        .into_iter()
        .enumerate()
        .map(|(r, o)| o.map_err(|e| TestCaseError::fail(format!("rank {r}: {e}"))))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Identity experts: each token comes back as its row times the sum of its weights, exactly.
    #[test]
    fn identity_experts_return_rows_times_weight_sum(c in case(true)) {
        let out = run_ep(&c, true)?;
        for (r, got) in out.iter().enumerate() {
            let rc = &c.ranks[r];
            for t in 0..c.tokens(r) {
                let wsum: f32 = rc.weights[t * c.top_k..(t + 1) * c.top_k].iter().sum();
                for i in 0..c.hidden {
                    let want = rc.x[t * c.hidden + i] * wsum;
                    prop_assert_eq!(got[t * c.hidden + i], want, "rank {} token {} col {}", r, t, i);
                }
            }
        }
    }

    /// Arbitrary floats and expert-specific outputs: expert parallelism is bit-identical to one
    /// rank holding all tokens and all experts.
    #[test]
    fn expert_parallel_is_bit_exact_against_single_rank(c in case(false)) {
        let ep = run_ep(&c, false)?;
        let all = RankCase {
            x: c.ranks.iter().flat_map(|r| r.x.clone()).collect(),
            experts: c.ranks.iter().flat_map(|r| r.experts.clone()).collect(),
            weights: c.ranks.iter().flat_map(|r| r.weights.clone()).collect(),
        };
        let single = moe_step(&SingleRank::new(), &c, &all, 1, false)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let ep_all: Vec<f32> = ep.concat();
        prop_assert_eq!(bits(&ep_all), bits(&single));

        // And both equal the naive host loop: Σ_j w_j · f_e(x), slot 0 first.
        let mut naive = Vec::new();
        for t in 0..all.x.len() / c.hidden {
            for i in 0..c.hidden {
                let mut acc: Option<f32> = None;
                for j in 0..c.top_k {
                    let s = t * c.top_k + j;
                    let term = expert_fn(all.experts[s], all.x[t * c.hidden + i]) * all.weights[s];
                    acc = Some(acc.map_or(term, |a| a + term));
                }
                naive.push(acc.unwrap_or(0.0));
            }
        }
        prop_assert_eq!(bits(&single), bits(&naive));
    }
}

#[test]
fn two_phase_dispatch_lets_the_rank_compute_in_between() -> Result<(), DispatchError> {
    // 4 experts on 2 ranks, 3 tokens each, k = 2.
    let out = LocalWorld::run(2, LinkModel::instant(), |comm| {
        let r = comm.rank();
        let sharding = ExpertSharding::new(4, 2)?;
        let x = tensor2((0..6).map(|i| (r * 10 + i) as f32).collect(), 3, 2);
        let routing = Routing::from_indices(
            Tensor::<2, Int>::from_data(TensorData::new(vec![0i32, 3, 1, 2, 2, 0], [3, 2]), &dev()),
            tensor2(vec![0.5; 6], 3, 2),
        )?;
        let pending = dispatch_start(comm, &sharding, x, &routing, CollectiveTag::new("d"))?;
        let shared = tensor2(vec![1.0; 6], 3, 2) * 2.0; // "shared experts" while in flight
        let (inputs, plan) = pending.wait()?;
        // Each rank owns 2 experts; expert 0, 1 on rank 0 and 2, 3 on rank 1.
        assert_eq!(inputs.experts, 2 * r..2 * r + 2);
        assert_eq!(inputs.num_rows(), plan.received_rows());
        let y = inputs.tokens.clone();
        let combined = combine_start(comm, y, plan, CollectiveTag::new("c"))?.wait()?;
        Ok::<_, DispatchError>(read(combined + shared))
    })?;
    for (r, o) in out.into_iter().enumerate() {
        let got = o.map_err(|e| DispatchError::Read {
            what: "rank result",
            detail: e.to_string(),
        })?;
        let want: Vec<f32> = (0..6).map(|i| (r * 10 + i) as f32 + 2.0).collect();
        assert_eq!(got, want, "rank {r}");
    }
    Ok(())
}

#[test]
fn bad_inputs_are_named_errors() -> Result<(), DispatchError> {
    let comm = SingleRank::new();
    let sharding = ExpertSharding::new(4, 1)?;
    let x = tensor2(vec![0.0; 4], 2, 2);
    let routing = Routing::new(vec![0, 4], tensor2(vec![1.0; 2], 2, 1))?;
    let err = dispatch(
        &comm,
        &sharding,
        x.clone(),
        &routing,
        CollectiveTag::new("d"),
    );
    assert!(matches!(
        err,
        Err(DispatchError::ExpertOutOfRange {
            token: 1,
            slot: 0,
            expert: 4,
            num_experts: 4
        })
    ));
    assert!(matches!(
        Routing::new(vec![0, 1, 2], tensor2(vec![1.0; 2], 2, 1)),
        Err(DispatchError::RoutingLength {
            experts: 3,
            tokens: 2,
            top_k: 1
        })
    ));
    let negative = Tensor::<2, Int>::from_data(TensorData::new(vec![0i32, -1], [2, 1]), &dev());
    assert!(matches!(
        Routing::from_indices(negative, tensor2(vec![1.0; 2], 2, 1)),
        Err(DispatchError::NegativeExpert {
            token: 1,
            slot: 0,
            expert: -1
        })
    ));
    let wrong_world = ExpertSharding::new(4, 2)?;
    let routing = Routing::new(vec![0, 1], tensor2(vec![1.0; 2], 2, 1))?;
    assert!(matches!(
        dispatch(
            &comm,
            &wrong_world,
            x.clone(),
            &routing,
            CollectiveTag::new("d")
        ),
        Err(DispatchError::WorldMismatch {
            sharding: 2,
            comm: 1
        })
    ));
    let (_, plan) = dispatch(&comm, &sharding, x, &routing, CollectiveTag::new("d"))?;
    let err = combine(
        &comm,
        tensor2(vec![0.0; 6], 3, 2),
        plan,
        CollectiveTag::new("c"),
    );
    assert!(matches!(
        err,
        Err(DispatchError::OutputRows {
            got: 3,
            expected: 2
        })
    ));
    Ok(())
}

#[test]
fn weighted_sum_adds_slots_in_order() {
    // (1e8 − 1e8) + 1 = 1 in f32 when added left to right; (1 − 1e8) + 1e8 = 0 backwards.
    let y = Tensor::<3>::from_data(TensorData::new(vec![1e8f32, -1e8, 1.0], [1, 3, 1]), &dev());
    let w = tensor2(vec![1.0, 1.0, 1.0], 1, 3);
    assert_eq!(read(weighted_sum_slots(y, w)), vec![1.0]);
}
