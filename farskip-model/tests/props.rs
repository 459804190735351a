//! Property tests over random small configurations: routing decisions, the slot plan that groups token slots
//! by expert, and output shapes of the MoE block and the model.

mod common;

use burn::module::Param;
use burn::prelude::*;
use farskip_model::config::{
    GroupLimit, GroupScore, MoeConfig, RouterConfig, Scoring, SharedExpertConfig, WeightOn,
};
use farskip_model::moe::{MoeBlock, Router, SlotPlan};
use farskip_model::{Connectivity, Model, ModelConfig};
use proptest::prelude::*;

use common::*;

/// A valid router configuration for `experts` experts and `top_k`, from raw random choices.
#[allow(clippy::too_many_arguments)]
fn router_config(
    experts: usize,
    top_k: usize,
    sigmoid: bool,
    renormalize: bool,
    scaling: f64,
    group_pick: Option<(usize, usize, bool)>,
    bias: bool,
) -> RouterConfig {
    let group_limit = group_pick.map(|(g, t, sum2)| {
        let divisors: Vec<usize> = (1..=experts)
            .filter(|&d| experts.is_multiple_of(d))
            .collect();
        let num_groups = divisors[g % divisors.len()];
        let per = experts / num_groups;
        // enough groups to hold top_k
        let topk_groups = (t % num_groups + 1).max(top_k.div_ceil(per));
        GroupLimit {
            num_groups,
            topk_groups,
            group_score: if sum2 && per >= 2 {
                GroupScore::SumTop2
            } else {
                GroupScore::Max
            },
        }
    });
    RouterConfig {
        scoring: if sigmoid {
            Scoring::Sigmoid
        } else {
            Scoring::Softmax
        },
        renormalize,
        group_limit,
        correction_bias: bias,
        scaling_factor: scaling,
        weight_on: WeightOn::Output,
    }
}

prop_compose! {
    fn router_case()(experts in 1usize..=8)(
        experts in Just(experts),
        top_k in 1..=experts,
        tokens in 1usize..20,
        sigmoid in any::<bool>(),
        renormalize in any::<bool>(),
        scaling in prop_oneof![Just(1.0), 0.5f64..3.0],
        group_pick in proptest::option::of((0usize..8, 0usize..8, any::<bool>())),
        bias in any::<bool>(),
        seed in any::<u64>(),
    ) -> (usize, usize, usize, RouterConfig, u64) {
        (experts, top_k, tokens, router_config(experts, top_k, sigmoid, renormalize, scaling, group_pick, bias), seed)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn routing_picks_top_k_distinct_experts_with_valid_weights((experts, top_k, tokens, cfg, seed) in router_case()) {
        let d = Device::flex();
        let hidden = 5;
        let mut rng = TestRng::new(seed);
        let mut router = Router::new(&cfg, hidden, experts, top_k, &d);
        router.gate.weight = Param::from_tensor(tensor(&rng.normals(hidden * experts, 1.0), [hidden, experts], &d));
        if cfg.correction_bias {
            router.correction_bias = Some(Param::from_tensor(tensor(&rng.normals(experts, 0.5), [experts], &d)));
        }
        let routing = router.route(tensor(&rng.normals(tokens * hidden, 1.0), [tokens, hidden], &d));
        prop_assert_eq!(routing.experts.dims(), [tokens, top_k]);
        prop_assert_eq!(routing.weights.dims(), [tokens, top_k]);
        let ids = ints(routing.experts);
        let weights = values(routing.weights);
        for (t, (row, w)) in ids.chunks(top_k).zip(weights.chunks(top_k)).enumerate() {
            let mut sorted = row.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), top_k, "token {} repeats an expert: {:?}", t, row);
            prop_assert!(row.iter().all(|&e| (0..experts as i64).contains(&e)), "token {}: {:?}", t, row);
            prop_assert!(w.iter().all(|&x| x.is_finite() && x >= 0.0), "token {}: weights {:?}", t, w);
            let sum: f64 = w.iter().sum();
            if cfg.renormalize {
                prop_assert!((sum - cfg.scaling_factor).abs() < 1e-5, "token {}: weights sum to {}", t, sum);
            } else if cfg.scoring == Scoring::Softmax {
                prop_assert!(sum <= cfg.scaling_factor + 1e-5, "token {}: softmax weights sum to {}", t, sum);
            }
            if let Some(g) = cfg.group_limit {
                let per = experts / g.num_groups;
                let mut groups: Vec<i64> = row.iter().map(|&e| e / per as i64).collect();
                groups.sort_unstable();
                groups.dedup();
                prop_assert!(groups.len() <= g.topk_groups, "token {}: experts {:?} span {:?}", t, row, groups);
            }
        }
    }

    #[test]
    fn slot_plan_groups_slots_by_expert(
        (experts, top_k, slot_experts) in (1usize..=8, 1usize..=4, 1usize..20).prop_flat_map(|(e, k, n)| {
            (Just(e), Just(k), proptest::collection::vec(0..e, n * k))
        })
    ) {
        let plan = SlotPlan::new(slot_experts.clone(), top_k, experts);
        let n = slot_experts.len();
        prop_assert_eq!(plan.num_tokens(), n / top_k);
        // a permutation of the slots
        let mut seen = plan.sorted_slots.clone();
        seen.sort_unstable();
        prop_assert_eq!(seen, (0..n).collect::<Vec<_>>());
        // the right count per expert, contiguous, in expert order, ascending slots within an expert
        for e in 0..experts {
            prop_assert_eq!(plan.counts[e], slot_experts.iter().filter(|&&x| x == e).count());
        }
        let mut start = 0;
        for (e, &c) in plan.counts.iter().enumerate() {
            let block = &plan.sorted_slots[start..start + c];
            prop_assert!(block.iter().all(|&s| slot_experts[s] == e), "expert {} block {:?}", e, block);
            prop_assert!(block.windows(2).all(|w| w[0] < w[1]), "expert {} block not stable: {:?}", e, block);
            start += c;
        }
        // inverse() inverts it, and sorted_tokens follows the slots
        let inv = plan.inverse();
        for (pos, &s) in plan.sorted_slots.iter().enumerate() {
            prop_assert_eq!(inv[s], pos);
        }
        for (s, &pos) in inv.iter().enumerate() {
            prop_assert_eq!(plan.sorted_slots[pos], s);
        }
        let tokens = plan.sorted_tokens();
        for (pos, &s) in plan.sorted_slots.iter().enumerate() {
            prop_assert_eq!(tokens[pos], s / top_k);
        }
    }

    #[test]
    fn moe_output_has_the_input_shape(
        (experts, top_k, tokens, cfg, seed) in router_case(),
        hidden in 1usize..10,
        shared in any::<bool>(),
        input_weight in any::<bool>(),
    ) {
        let d = Device::flex();
        let mut cfg = cfg;
        cfg.weight_on = if input_weight { WeightOn::Input } else { WeightOn::Output };
        let moe_cfg = MoeConfig {
            num_experts: experts,
            top_k,
            expert_intermediate_size: 3,
            router: cfg,
            shared: shared.then_some(SharedExpertConfig { intermediate_size: 4, gated: seed % 2 == 0 }),
        };
        let block = reseed(MoeBlock::new(&moe_cfg, hidden, &d), seed);
        let out = block.forward(tensor(&TestRng::new(seed).normals(tokens * hidden, 1.0), [tokens, hidden], &d));
        prop_assert_eq!(out.routed.dims(), [tokens, hidden]);
        prop_assert!(values(out.routed).iter().all(|v| v.is_finite()));
        prop_assert_eq!(out.shared.map(|s| s.dims()), shared.then_some([tokens, hidden]));
    }

    #[test]
    fn logits_have_shape_batch_seq_vocab(
        batch in 1usize..4,
        seq in 1usize..9,
        vocab in 2usize..50,
        layers in 1usize..4,
        experts in 1usize..5,
        shared in any::<bool>(),
        spec in prop_oneof![Just("standard"), Just("farskip"), Just("farskip-attn-only"), Just("farskip-mlp-only"), Just("farskip:1.."), Just("farskip-d2"), Just("farskip-d3")],
        seed in any::<u64>(),
    ) {
        let d = Device::flex();
        let top_k = 1 + (seed as usize) % experts;
        let cfg = ModelConfig::small_moe(vocab, 8, layers, 2, 1, 4, experts, top_k, 4, shared.then_some(4));
        let model = Model::new(&cfg, &d).unwrap();
        let spec = if spec == "farskip:1.." && layers == 1 { "farskip" } else { spec };
        let model = model.with_connectivity(spec.parse::<Connectivity>().unwrap()).unwrap();
        let ids = id_tensor(&TestRng::new(seed).ints(batch * seq, vocab), batch, &d);
        let logits = model.forward(ids).unwrap();
        prop_assert_eq!(logits.dims(), [batch, seq, vocab]);
        prop_assert!(values(logits).iter().all(|v| v.is_finite()));
    }
}
