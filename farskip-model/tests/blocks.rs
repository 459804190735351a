//! Building blocks against references computed here in plain f64 Rust (no burn in the reference maths):
//! every router variant, the expert bank and its dispatch (values and gradients), MLA, GQA, the chunked and
//! sliding-window masks, the KV cache, the FarSkip variants composed by hand from the model's own
//! sub-modules, and the save/load round trip of every fixture family.

mod common;

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use farskip_model::attention::{Attention, AttentionKind};
use farskip_model::config::{
    AttentionConfig, FfnKind, GroupLimit, GroupScore, MaskKind, MlaConfig, MoeConfig, QkNorm,
    RopeConfig, RopeLayout, RopeScaling, RouterConfig, Scoring, SharedExpertConfig, WeightOn,
};
use farskip_model::moe::{ExpertBank, MoeBlock, Router, SlotPlan};
use farskip_model::{Connectivity, DecoderLayer, Ffn, KvCache, Model, ModelConfig, ModelError};

use common::*;

type TestResult = Result<(), ModelError>;

// ---------------------------------------------------------------------------------------------------------
// f64 reference maths
// ---------------------------------------------------------------------------------------------------------

/// Row-major `[n, k] · [k, m]`.
fn matmul(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
    assert_eq!((a.len(), b.len()), (n * k, k * m));
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for p in 0..k {
            let a_ip = a[i * k + p];
            for j in 0..m {
                out[i * m + j] += a_ip * b[p * m + j];
            }
        }
    }
    out
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn silu_f64(x: f64) -> f64 {
    x * sigmoid(x)
}

fn softmax_f64(v: &[f64]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = v.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// RMSNorm of every `d`-wide row of `x`, times `gain`.
fn rms_rows(x: &[f64], d: usize, gain: &[f64], eps: f64) -> Vec<f64> {
    x.chunks(d)
        .flat_map(|row| {
            let rms = (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
            row.iter().zip(gain).map(move |(v, g)| v / rms * g)
        })
        .collect()
}

/// Indices of `v` sorted by descending value.
fn argsort_desc(v: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx
}

/// One token's routing: (experts best first, weights, smallest selection margin). Written from the HF/DeepSeek
/// definitions: the bias only shifts the selection scores, groups are scored on the (biased) selection
/// scores, the weights are the unbiased scores of the chosen experts.
fn ref_route(
    logits: &[f64],
    cfg: &RouterConfig,
    bias: Option<&[f64]>,
    top_k: usize,
) -> (Vec<usize>, Vec<f64>, f64) {
    let e = logits.len();
    let scores: Vec<f64> = match cfg.scoring {
        Scoring::Softmax => softmax_f64(logits),
        Scoring::Sigmoid => logits.iter().map(|&x| sigmoid(x)).collect(),
    };
    let mut select: Vec<f64> = (0..e)
        .map(|i| scores[i] + bias.map_or(0.0, |b| b[i]))
        .collect();
    let mut margin = f64::INFINITY;
    if let Some(g) = cfg.group_limit {
        let per = e / g.num_groups;
        let group_scores: Vec<f64> = (0..g.num_groups)
            .map(|gi| {
                let mut v = select[gi * per..(gi + 1) * per].to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                match g.group_score {
                    GroupScore::Max => v[0],
                    GroupScore::SumTop2 => v[0] + v[1],
                }
            })
            .collect();
        let order = argsort_desc(&group_scores);
        if g.topk_groups < g.num_groups {
            margin = group_scores[order[g.topk_groups - 1]] - group_scores[order[g.topk_groups]];
        }
        for &dropped in &order[g.topk_groups..] {
            for s in &mut select[dropped * per..(dropped + 1) * per] {
                *s = f64::NEG_INFINITY;
            }
        }
    }
    let order = argsort_desc(&select);
    if top_k < e && select[order[top_k]].is_finite() {
        margin = margin.min(select[order[top_k - 1]] - select[order[top_k]]);
    }
    let chosen: Vec<usize> = order[..top_k].to_vec();
    let mut w: Vec<f64> = chosen.iter().map(|&i| scores[i]).collect();
    if cfg.renormalize {
        let s: f64 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= s + 1e-20);
    }
    w.iter_mut().for_each(|x| *x *= cfg.scaling_factor);
    (chosen, w, margin)
}

/// Host copy of a stacked expert bank.
struct HostBank {
    hidden: usize,
    inter: usize,
    gate_up: Vec<f64>,
    down: Vec<f64>,
}

impl HostBank {
    fn of(bank: &ExpertBank) -> Self {
        let [_, hidden, i2] = bank.gate_up.dims();
        Self {
            hidden,
            inter: i2 / 2,
            gate_up: values(bank.gate_up.val()),
            down: values(bank.down.val()),
        }
    }
    /// `down_e(silu(x · gate_e) * (x · up_e))` for one row.
    fn expert(&self, e: usize, x: &[f64]) -> Vec<f64> {
        let (h, i) = (self.hidden, self.inter);
        let gu = &self.gate_up[e * h * 2 * i..(e + 1) * h * 2 * i];
        let hh = matmul(x, gu, 1, h, 2 * i);
        let a: Vec<f64> = (0..i).map(|j| silu_f64(hh[j]) * hh[i + j]).collect();
        matmul(&a, &self.down[e * i * h..(e + 1) * i * h], 1, i, h)
    }
}

/// Dense MoE reference: every expert runs on every token; the routing weights (zero for unchosen experts)
/// mask the result. Returns the chosen experts per token and the `[n, hidden]` routed output.
fn dense_moe_ref(
    x: &[f64],
    gate: &[f64],
    bank: &HostBank,
    cfg: &RouterConfig,
    num_experts: usize,
    top_k: usize,
) -> (Vec<Vec<usize>>, Vec<f64>) {
    let h = bank.hidden;
    let mut chosen = Vec::new();
    let mut out = Vec::new();
    for row in x.chunks(h) {
        let logits = matmul(row, gate, 1, h, num_experts);
        let (ex, w, _) = ref_route(&logits, cfg, None, top_k);
        let mut dense_w = vec![0.0; num_experts];
        for (&e, &wi) in ex.iter().zip(&w) {
            dense_w[e] = wi;
        }
        let mut acc = vec![0.0; h];
        for (e, &we) in dense_w.iter().enumerate() {
            let y = match cfg.weight_on {
                WeightOn::Output => bank
                    .expert(e, row)
                    .into_iter()
                    .map(|v| v * we)
                    .collect::<Vec<_>>(),
                WeightOn::Input => bank.expert(e, &row.iter().map(|v| v * we).collect::<Vec<_>>()),
            };
            acc.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        }
        chosen.push(ex);
        out.extend(acc);
    }
    (chosen, out)
}

// ---------------------------------------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------------------------------------

fn dev() -> Device {
    Device::flex()
}

fn router_cfg(scoring: Scoring, renormalize: bool) -> RouterConfig {
    RouterConfig {
        scoring,
        renormalize,
        group_limit: None,
        correction_bias: false,
        scaling_factor: 1.0,
        weight_on: WeightOn::Output,
    }
}

/// A router whose gate is `gate` (`[hidden, experts]`, burn's `[in, out]` layout).
fn router(
    cfg: &RouterConfig,
    gate: &[f64],
    hidden: usize,
    experts: usize,
    top_k: usize,
    bias: Option<&[f64]>,
) -> Router {
    let d = dev();
    let mut r = Router::new(cfg, hidden, experts, top_k, &d);
    r.gate.weight = Param::from_tensor(tensor(gate, [hidden, experts], &d));
    if let Some(b) = bias {
        r.correction_bias = Some(Param::from_tensor(tensor(b, [experts], &d)));
    }
    r
}

fn identity(n: usize) -> Vec<f64> {
    (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect()
}

/// Routes `x` (rows of `hidden`) and returns per-token experts and weights.
fn route(r: &Router, x: &[f64], hidden: usize) -> (Vec<Vec<usize>>, Vec<Vec<f64>>) {
    let n = x.len() / hidden;
    let routing = r.route(tensor(x, [n, hidden], &dev()));
    let k = r.top_k();
    let experts = ints(routing.experts);
    let weights = values(routing.weights);
    (
        experts
            .chunks(k)
            .map(|c| c.iter().map(|&e| e as usize).collect())
            .collect(),
        weights.chunks(k).map(<[f64]>::to_vec).collect(),
    )
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    let d = max_abs(got, want);
    assert!(
        d < tol,
        "{what}: max diff {d:e} >= {tol:e}\n got  {got:?}\n want {want:?}"
    );
}

#[test]
fn softmax_top2_without_renormalisation_returns_raw_probabilities() {
    let cfg = router_cfg(Scoring::Softmax, false);
    let r = router(&cfg, &identity(4), 4, 4, 2, None);
    // identity gate: the inputs are the router logits
    let x = [1.0, 3.0, 2.0, 0.5, 0.2, -1.0, 0.1, 2.0];
    let (experts, weights) = route(&r, &x, 4);
    let p0 = softmax_f64(&x[..4]);
    let p1 = softmax_f64(&x[4..]);
    assert_eq!(experts, [vec![1, 2], vec![3, 0]]);
    assert_close(&weights[0], &[p0[1], p0[2]], 1e-6, "token 0");
    assert_close(&weights[1], &[p1[3], p1[0]], 1e-6, "token 1");
    // e^3 / (e + e^3 + e^2 + e^0.5), written out
    assert!((weights[0][0] - 0.630_797).abs() < 1e-5, "{weights:?}");
}

#[test]
fn softmax_top2_with_renormalisation_sums_to_one() {
    let cfg = router_cfg(Scoring::Softmax, true);
    let r = router(&cfg, &identity(4), 4, 4, 2, None);
    let x = [1.0, 3.0, 2.0, 0.5];
    let (experts, weights) = route(&r, &x, 4);
    let p = softmax_f64(&x);
    let s = p[1] + p[2];
    assert_eq!(experts, [vec![1, 2]]);
    assert_close(&weights[0], &[p[1] / s, p[2] / s], 1e-6, "renormalised");
    // renormalised softmax top-k = softmax over the chosen logits: e^3 / (e^3 + e^2)
    assert!((weights[0][0] - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-6);
}

#[test]
fn scaling_factor_multiplies_the_final_weights() {
    let mut cfg = router_cfg(Scoring::Softmax, false);
    cfg.scaling_factor = 2.0;
    let x = [1.0, 3.0, 2.0, 0.5];
    let (_, weights) = route(&router(&cfg, &identity(4), 4, 4, 2, None), &x, 4);
    let p = softmax_f64(&x);
    assert_close(
        &weights[0],
        &[2.0 * p[1], 2.0 * p[2]],
        1e-6,
        "scaled, not renormalised",
    );
    cfg.renormalize = true;
    let (_, weights) = route(&router(&cfg, &identity(4), 4, 4, 2, None), &x, 4);
    let s = p[1] + p[2];
    assert_close(
        &weights[0],
        &[2.0 * p[1] / s, 2.0 * p[2] / s],
        1e-6,
        "renormalised then scaled",
    );
}

#[test]
fn sigmoid_correction_bias_changes_the_selection_but_not_the_weights() {
    let mut cfg = router_cfg(Scoring::Sigmoid, true);
    cfg.correction_bias = true;
    cfg.scaling_factor = 2.5;
    let x = [2.0, 1.0, 0.0, -1.0];
    let bias = [0.0, 0.0, 0.0, 3.0];
    // without a bias: the two largest sigmoid scores
    let (experts, weights) = route(&router(&cfg, &identity(4), 4, 4, 2, Some(&[0.0; 4])), &x, 4);
    let (s0, s1, s3) = (sigmoid(2.0), sigmoid(1.0), sigmoid(-1.0));
    assert_eq!(experts, [vec![0, 1]]);
    assert_close(
        &weights[0],
        &[2.5 * s0 / (s0 + s1), 2.5 * s1 / (s0 + s1)],
        1e-6,
        "no bias",
    );
    // the bias lifts expert 3 (score 0.27 + 3) to the top, but its weight is its unbiased score
    let (experts, weights) = route(&router(&cfg, &identity(4), 4, 4, 2, Some(&bias)), &x, 4);
    assert_eq!(experts, [vec![3, 0]]);
    assert_close(
        &weights[0],
        &[2.5 * s3 / (s3 + s0 + 1e-20), 2.5 * s0 / (s3 + s0 + 1e-20)],
        1e-6,
        "bias",
    );
    // without renormalisation the weights are the raw unbiased scores, scaled
    cfg.renormalize = false;
    let (experts, weights) = route(&router(&cfg, &identity(4), 4, 4, 2, Some(&bias)), &x, 4);
    assert_eq!(experts, [vec![3, 0]]);
    assert_close(
        &weights[0],
        &[2.5 * s3, 2.5 * s0],
        1e-6,
        "bias, no renormalisation",
    );
}

#[test]
fn group_limited_max_keeps_the_best_groups_deepseek_v2() {
    let mut cfg = router_cfg(Scoring::Softmax, false);
    cfg.scaling_factor = 1.5;
    cfg.group_limit = Some(GroupLimit {
        num_groups: 4,
        topk_groups: 2,
        group_score: GroupScore::Max,
    });
    // groups of 2: g0 = {0,1} max 5, g1 = {2,3} max 4.9, g2 = {4,5} max 4.95, g3 = {6,7} max 0.2
    let x = [5.0, 0.0, 4.9, 4.8, 4.95, 0.1, 0.2, 0.0];
    let (experts, weights) = route(&router(&cfg, &identity(8), 8, 8, 3, None), &x, 8);
    let p = softmax_f64(&x);
    // g0 and g2 survive; the third best expert overall (2, in g1) is dropped in favour of expert 5
    assert_eq!(experts, [vec![0, 4, 5]]);
    assert_close(
        &weights[0],
        &[1.5 * p[0], 1.5 * p[4], 1.5 * p[5]],
        1e-6,
        "weights",
    );
    // one group: only g0, so expert 1 (logit 0) beats experts 2, 3, 4
    cfg.group_limit = Some(GroupLimit {
        num_groups: 4,
        topk_groups: 1,
        group_score: GroupScore::Max,
    });
    let (experts, weights) = route(&router(&cfg, &identity(8), 8, 8, 2, None), &x, 8);
    assert_eq!(experts, [vec![0, 1]]);
    assert_close(&weights[0], &[1.5 * p[0], 1.5 * p[1]], 1e-6, "one group");
    // and without groups the plain top-2
    cfg.group_limit = None;
    let (experts, _) = route(&router(&cfg, &identity(8), 8, 8, 2, None), &x, 8);
    assert_eq!(experts, [vec![0, 4]]);
}

#[test]
fn group_limited_sum_top2_drops_the_group_of_the_best_expert_deepseek_v3() {
    let mut cfg = router_cfg(Scoring::Sigmoid, true);
    cfg.correction_bias = true;
    cfg.scaling_factor = 2.5;
    cfg.group_limit = Some(GroupLimit {
        num_groups: 4,
        topk_groups: 1,
        group_score: GroupScore::SumTop2,
    });
    let x = [5.0, -5.0, 4.9, 4.8, 0.0, 0.0, -1.0, -2.0];
    let s: Vec<f64> = x.iter().map(|&v| sigmoid(v)).collect();
    // g0 = σ(5) + σ(-5) = 1.0 < g1 = σ(4.9) + σ(4.8) = 1.98: the best single expert (0) is in a dropped group
    assert!(s[0] + s[1] < s[2] + s[3] && s[0] > s[2]);
    let (experts, weights) = route(&router(&cfg, &identity(8), 8, 8, 2, Some(&[0.0; 8])), &x, 8);
    assert_eq!(experts, [vec![2, 3]]);
    let z = s[2] + s[3] + 1e-20;
    assert_close(
        &weights[0],
        &[2.5 * s[2] / z, 2.5 * s[3] / z],
        1e-6,
        "sum-top2 weights",
    );
    // the same logits with max group scores keep g0
    let mut max_cfg = cfg.clone();
    max_cfg.group_limit = Some(GroupLimit {
        group_score: GroupScore::Max,
        ..cfg.group_limit.unwrap()
    });
    let (experts, _) = route(
        &router(&max_cfg, &identity(8), 8, 8, 2, Some(&[0.0; 8])),
        &x,
        8,
    );
    assert_eq!(experts, [vec![0, 1]]);
    // the correction bias also scores the groups: +1.5 on expert 1 makes g0 = 0.99 + 0.5 + 1.5 the best group,
    // and ranks expert 1 (biased 2.0) above expert 0 (0.99); the weights stay unbiased
    let mut bias = [0.0; 8];
    bias[1] = 1.5;
    let (experts, weights) = route(&router(&cfg, &identity(8), 8, 8, 2, Some(&bias)), &x, 8);
    assert_eq!(experts, [vec![1, 0]]);
    let z = s[1] + s[0] + 1e-20;
    assert_close(
        &weights[0],
        &[2.5 * s[1] / z, 2.5 * s[0] / z],
        1e-6,
        "biased groups",
    );
}

#[test]
fn router_matches_the_f64_reference_with_a_random_gate() {
    let (hidden, experts, n) = (6, 8, 12);
    let mut rng = TestRng::new(1);
    let gate = rng.normals(hidden * experts, 1.0);
    let x = rng.normals(n * hidden, 1.0);
    let bias = rng.normals(experts, 0.3);
    let logits = matmul(&x, &gate, n, hidden, experts);
    let groups = |num_groups, topk_groups, group_score| {
        Some(GroupLimit {
            num_groups,
            topk_groups,
            group_score,
        })
    };
    let mut cases = Vec::new();
    for renormalize in [false, true] {
        cases.push((router_cfg(Scoring::Softmax, renormalize), None, 2));
        cases.push((router_cfg(Scoring::Sigmoid, renormalize), None, 3));
    }
    let mut v2 = router_cfg(Scoring::Softmax, false);
    v2.group_limit = groups(4, 2, GroupScore::Max);
    v2.scaling_factor = 1.5;
    cases.push((v2, None, 3));
    let mut v3 = router_cfg(Scoring::Sigmoid, true);
    v3.group_limit = groups(4, 2, GroupScore::SumTop2);
    v3.correction_bias = true;
    v3.scaling_factor = 2.5;
    cases.push((v3, Some(&bias[..]), 2));
    for (cfg, b, k) in cases {
        let r = router(&cfg, &gate, hidden, experts, k, b);
        let (got_e, got_w) = route(&r, &x, hidden);
        for t in 0..n {
            let (want_e, want_w, margin) =
                ref_route(&logits[t * experts..(t + 1) * experts], &cfg, b, k);
            assert!(
                margin > 1e-4,
                "near tie in the test data ({margin:e}); pick another seed"
            );
            assert_eq!(got_e[t], want_e, "{cfg:?} token {t}");
            assert_close(&got_w[t], &want_w, 1e-5, &format!("{cfg:?} token {t}"));
        }
    }
}

fn moe_config(
    num_experts: usize,
    top_k: usize,
    inter: usize,
    router: RouterConfig,
    shared: Option<SharedExpertConfig>,
) -> MoeConfig {
    MoeConfig {
        num_experts,
        top_k,
        expert_intermediate_size: inter,
        router,
        shared,
    }
}

#[test]
fn weight_on_input_scales_the_expert_input_llama4() {
    let (hidden, experts, n) = (4, 4, 6);
    let mut cfg = router_cfg(Scoring::Sigmoid, false);
    cfg.weight_on = WeightOn::Input;
    let moe = reseed(
        MoeBlock::new(
            &moe_config(experts, 1, 3, cfg.clone(), None),
            hidden,
            &dev(),
        ),
        2,
    );
    let x = TestRng::new(3).normals(n * hidden, 1.0);
    let got = values(moe.forward(tensor(&x, [n, hidden], &dev())).routed);
    let gate = values(moe.router.gate.weight.val());
    let bank = HostBank::of(&moe.experts);
    let (_, want) = dense_moe_ref(&x, &gate, &bank, &cfg, experts, 1);
    assert_close(&got, &want, 1e-5, "expert(w·x)");
    // the other placement, w·expert(x), is measurably different: the test can tell them apart
    let mut out_cfg = cfg.clone();
    out_cfg.weight_on = WeightOn::Output;
    let (_, other) = dense_moe_ref(&x, &gate, &bank, &out_cfg, experts, 1);
    assert!(
        max_abs(&want, &other) > 1e-2,
        "weight placement does not matter for this data"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Expert bank and dispatch
// ---------------------------------------------------------------------------------------------------------

#[test]
fn forward_grouped_runs_each_row_through_its_expert() {
    let d = dev();
    let bank = reseed(ExpertBank::new(5, 4, 3, &d), 4);
    let host = HostBank::of(&bank);
    let counts = [0, 2, 0, 3, 0];
    let xs = TestRng::new(5).normals(5 * 4, 1.0);
    let got = values(bank.forward_grouped(tensor(&xs, [5, 4], &d), &counts));
    let row_expert = [1, 1, 3, 3, 3];
    let want: Vec<f64> = xs
        .chunks(4)
        .zip(row_expert)
        .flat_map(|(row, e)| host.expert(e, row))
        .collect();
    assert_close(&got, &want, 1e-5, "grouped rows");
    // no rows at all
    let empty = bank.forward_grouped(Tensor::zeros([0, 4], &d), &[0; 5]);
    assert_eq!(empty.dims(), [0, 4]);
}

/// Inputs whose first feature is 1 and a gate that gives experts `starved` a -50 logit from it: they get no
/// tokens.
fn starving_gate(gate: &mut [f64], starved: &[usize], x: &mut [f64], hidden: usize) {
    // gate is [hidden, experts]: its first row holds feature 0's logit for each expert
    for &e in starved {
        gate[e] = -50.0;
    }
    for row in x.chunks_mut(hidden) {
        row[0] = 1.0;
    }
}

#[test]
fn moe_forward_matches_a_dense_reference_including_idle_experts() {
    let d = dev();
    let (hidden, experts, top_k, n) = (8, 6, 2, 9);
    let cfg = router_cfg(Scoring::Softmax, true);
    let shared = SharedExpertConfig {
        intermediate_size: 7,
        gated: true,
    };
    let mut moe = reseed(
        MoeBlock::new(
            &moe_config(experts, top_k, 5, cfg.clone(), Some(shared)),
            hidden,
            &d,
        ),
        6,
    );
    let mut gate = values(moe.router.gate.weight.val());
    let mut x = TestRng::new(7).normals(n * hidden, 1.0);
    starving_gate(&mut gate, &[4, 5], &mut x, hidden);
    moe.router.gate.weight = Param::from_tensor(tensor(&gate, [hidden, experts], &d));

    let xt = tensor(&x, [n, hidden], &d);
    let plan = SlotPlan::from_experts(&moe.route(xt.clone()).experts, experts);
    assert_eq!(
        &plan.counts[4..],
        [0, 0],
        "experts 4 and 5 must be idle: {:?}",
        plan.counts
    );
    assert!(
        plan.counts[..4].iter().filter(|&&c| c > 0).count() >= 2,
        "{:?}",
        plan.counts
    );

    let out = moe.forward(xt);
    let (chosen, want) =
        dense_moe_ref(&x, &gate, &HostBank::of(&moe.experts), &cfg, experts, top_k);
    assert_eq!(plan.slot_experts, chosen.concat(), "routing");
    assert_close(&values(out.routed), &want, 1e-5, "routed output");

    // Qwen2-MoE shared expert: sigmoid(x · w_g) * down(silu(x · gate) * (x · up))
    let s = moe.shared.as_ref().expect("shared expert");
    let w = |l: &burn::nn::Linear| values(l.weight.val());
    let (wg, wu, wd, sg) = (
        w(&s.mlp.gate_proj),
        w(&s.mlp.up_proj),
        w(&s.mlp.down_proj),
        w(s.gate.as_ref().unwrap()),
    );
    let g = matmul(&x, &wg, n, hidden, 7);
    let u = matmul(&x, &wu, n, hidden, 7);
    let a: Vec<f64> = g.iter().zip(&u).map(|(g, u)| silu_f64(*g) * u).collect();
    let y = matmul(&a, &wd, n, 7, hidden);
    let gates = matmul(&x, &sg, n, hidden, 1);
    let want_shared: Vec<f64> = y
        .iter()
        .enumerate()
        .map(|(i, v)| sigmoid(gates[i / hidden]) * v)
        .collect();
    assert_close(
        &values(out.shared.expect("shared output")),
        &want_shared,
        1e-5,
        "gated shared expert",
    );
}

/// The dense reference of the routed output in burn ops (for gradients): the routing weights recomputed from
/// the gate with the chosen experts as a constant mask, every expert run on every token.
fn dense_moe_burn(
    x: Tensor<2>,
    gate: Tensor<2>,
    gate_up: Tensor<3>,
    down: Tensor<3>,
    mask: Tensor<2>,
    cfg: &RouterConfig,
) -> Tensor<2> {
    let [n, hidden] = x.dims();
    let [experts, _, i2] = gate_up.dims();
    let inter = i2 / 2;
    let logits = x.clone().matmul(gate);
    let scores = match cfg.scoring {
        Scoring::Softmax => softmax(logits, 1),
        Scoring::Sigmoid => burn::tensor::activation::sigmoid(logits),
    };
    let mut w = scores * mask;
    if cfg.renormalize {
        w = w.clone() / w.sum_dim(1);
    }
    let mut out = Tensor::<2>::zeros([n, hidden], &x.device());
    for e in 0..experts {
        let we = w.clone().narrow(1, e, 1);
        let xin = match cfg.weight_on {
            WeightOn::Input => x.clone() * we.clone(),
            WeightOn::Output => x.clone(),
        };
        let h = xin.matmul(gate_up.clone().narrow(0, e, 1).squeeze_dim::<2>(0));
        let a = silu(h.clone().narrow(1, 0, inter)) * h.narrow(1, inter, inter);
        let y = a.matmul(down.clone().narrow(0, e, 1).squeeze_dim::<2>(0));
        out = out
            + match cfg.weight_on {
                WeightOn::Output => y * we,
                WeightOn::Input => y,
            };
    }
    out
}

fn check_moe_gradients(cfg: RouterConfig, top_k: usize, seed: u64) {
    let d = Device::flex().autodiff();
    let (hidden, experts, n) = (6, 4, 5);
    let mut moe = reseed(
        MoeBlock::new(
            &moe_config(experts, top_k, 4, cfg.clone(), None),
            hidden,
            &d,
        ),
        seed,
    );
    let mut gate = values(moe.router.gate.weight.val());
    let mut rng = TestRng::new(seed + 1);
    let mut x = rng.normals(n * hidden, 1.0);
    starving_gate(&mut gate, &[3], &mut x, hidden);
    moe.router.gate.weight = Param::from_tensor(tensor(&gate, [hidden, experts], &d));
    let c = tensor(&rng.normals(n * hidden, 1.0), [n, hidden], &d);

    // the block
    let xt = tensor(&x, [n, hidden], &d).require_grad();
    let routing = moe.route(xt.clone());
    let chosen = ints(routing.experts.clone());
    assert!(!chosen.contains(&3), "expert 3 must be idle: {chosen:?}");
    let out = moe.forward(xt.clone()).routed;
    let grads = (out.clone() * c.clone()).sum().backward();

    // the dense reference, same leaves, fresh graph
    let mut mask = vec![0.0; n * experts];
    for (slot, &e) in chosen.iter().enumerate() {
        mask[(slot / top_k) * experts + e as usize] = 1.0;
    }
    let xr = tensor(&x, [n, hidden], &d).require_grad();
    let dense = dense_moe_burn(
        xr.clone(),
        moe.router.gate.weight.val(),
        moe.experts.gate_up.val(),
        moe.experts.down.val(),
        tensor(&mask, [n, experts], &d),
        &cfg,
    );
    assert!(
        max_diff(out.inner(), dense.clone().inner()) < 1e-5,
        "forward"
    );
    let ref_grads = (dense * c).sum().backward();

    let pairs = [
        ("input", xt.grad(&grads), xr.grad(&ref_grads)),
        (
            "router gate",
            moe.router.gate.weight.grad(&grads),
            moe.router.gate.weight.grad(&ref_grads),
        ),
    ];
    for (what, got, want) in pairs {
        let (got, want) = (got.expect(what), want.expect(what));
        let diff = max_diff(got.clone(), want);
        assert!(diff < 1e-4, "{what} gradient differs by {diff:e}");
        assert!(
            values(got).iter().any(|v| v.abs() > 1e-3),
            "{what} gradient is trivially zero"
        );
    }
    for (what, param) in [
        ("gate_up", &moe.experts.gate_up),
        ("down", &moe.experts.down),
    ] {
        let got = param.grad(&grads).expect(what);
        let want = param.grad(&ref_grads).expect(what);
        let diff = max_diff(got.clone(), want);
        assert!(diff < 1e-4, "{what} gradient differs by {diff:e}");
        // the idle expert gets exactly no gradient, the busy ones some
        let per = got.dims()[1] * got.dims()[2];
        let g = values(got);
        assert!(
            g[3 * per..].iter().all(|&v| v == 0.0),
            "idle expert 3 has a {what} gradient"
        );
        assert!(
            g[..3 * per].iter().any(|v| v.abs() > 1e-4),
            "{what} gradient is trivially zero"
        );
    }
}

#[test]
fn moe_gradients_match_the_dense_reference_softmax_renormalised() {
    check_moe_gradients(router_cfg(Scoring::Softmax, true), 2, 8);
}

#[test]
fn moe_gradients_match_the_dense_reference_weight_on_input() {
    let mut cfg = router_cfg(Scoring::Sigmoid, false);
    cfg.weight_on = WeightOn::Input;
    cfg.scaling_factor = 1.0;
    check_moe_gradients(cfg, 2, 9);
}

// ---------------------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------------------

/// A one-layer config around `attention` with plain rope of base `theta`.
fn attention_config(
    hidden: usize,
    attention: AttentionConfig,
    layout: RopeLayout,
    theta: f64,
    mask: MaskKind,
) -> ModelConfig {
    let mut cfg = ModelConfig::small_moe(16, hidden, 1, 2, 1, 4, 2, 1, 4, None);
    cfg.attention = attention;
    cfg.rope = RopeConfig {
        theta,
        layout,
        scaling: RopeScaling::None,
    };
    cfg.layers[0].mask = mask;
    cfg.validate().expect("valid test config");
    cfg
}

fn attention(cfg: &ModelConfig, seed: u64) -> Attention {
    reseed(Attention::new(cfg, &cfg.layers[0], &dev()), seed)
}

/// Rotates interleaved pairs `(v[2i], v[2i+1])` by `pos · theta^(-2i/d)` (DeepSeek's complex form).
fn rope_interleaved(v: &[f64], pos: usize, theta: f64) -> Vec<f64> {
    let d = v.len();
    let mut out = v.to_vec();
    for i in 0..d / 2 {
        let a = pos as f64 * theta.powf(-((2 * i) as f64) / d as f64);
        let (x0, x1) = (v[2 * i], v[2 * i + 1]);
        out[2 * i] = x0 * a.cos() - x1 * a.sin();
        out[2 * i + 1] = x0 * a.sin() + x1 * a.cos();
    }
    out
}

/// DeepSeek MLA for one sequence, causal, positions 0..t.
fn mla_ref(attn: &Attention, m: &MlaConfig, theta: f64, x: &[f64], hidden: usize) -> Vec<f64> {
    let AttentionKind::Mla(a) = &attn.kind else {
        panic!("not MLA")
    };
    let lin = |l: &burn::nn::Linear| values(l.weight.val());
    let t = x.len() / hidden;
    let (heads, nope, rd, vd, kvr) = (
        m.num_heads,
        m.qk_nope_head_dim,
        m.qk_rope_head_dim,
        m.v_head_dim,
        m.kv_lora_rank,
    );
    let qk = nope + rd;
    let q = match m.q_lora_rank {
        None => matmul(x, &lin(a.q_proj.as_ref().unwrap()), t, hidden, heads * qk),
        Some(r) => {
            let qa = matmul(x, &lin(a.q_a_proj.as_ref().unwrap()), t, hidden, r);
            let qa = rms_rows(
                &qa,
                r,
                &values(a.q_a_norm.as_ref().unwrap().gamma.val()),
                m.latent_norm_eps,
            );
            matmul(&qa, &lin(a.q_b_proj.as_ref().unwrap()), t, r, heads * qk)
        }
    };
    let ckv = matmul(x, &lin(&a.kv_a_proj), t, hidden, kvr + rd);
    let latent: Vec<f64> = ckv
        .chunks(kvr + rd)
        .flat_map(|r| r[..kvr].to_vec())
        .collect();
    let latent = rms_rows(
        &latent,
        kvr,
        &values(a.kv_a_norm.gamma.val()),
        m.latent_norm_eps,
    );
    let kv = matmul(&latent, &lin(&a.kv_b_proj), t, kvr, heads * (nope + vd));
    let k_pe: Vec<Vec<f64>> = (0..t)
        .map(|j| rope_interleaved(&ckv[j * (kvr + rd) + kvr..(j + 1) * (kvr + rd)], j, theta))
        .collect();
    let scale = (qk as f64).powf(-0.5);
    let mut out = vec![0.0; t * heads * vd];
    for h in 0..heads {
        for i in 0..t {
            let qi = &q[i * heads * qk + h * qk..i * heads * qk + (h + 1) * qk];
            let q_pe = rope_interleaved(&qi[nope..], i, theta);
            let kv_row = |j: usize| &kv[j * heads * (nope + vd) + h * (nope + vd)..][..nope + vd];
            let scores: Vec<f64> = (0..=i)
                .map(|j| (dot(&qi[..nope], &kv_row(j)[..nope]) + dot(&q_pe, &k_pe[j])) * scale)
                .collect();
            let p = softmax_f64(&scores);
            for (j, pj) in p.iter().enumerate() {
                for c in 0..vd {
                    out[i * heads * vd + h * vd + c] += pj * kv_row(j)[nope + c];
                }
            }
        }
    }
    matmul(&out, &lin(&a.o_proj), t, heads * vd, hidden)
}

fn check_mla(q_lora_rank: Option<usize>) {
    let hidden = 8;
    let m = MlaConfig {
        num_heads: 2,
        q_lora_rank,
        kv_lora_rank: 6,
        qk_nope_head_dim: 4,
        qk_rope_head_dim: 4,
        v_head_dim: 3,
        latent_norm_eps: 1e-6,
    };
    // base 100: the second rotary pair turns by 0.1 rad per position, visible at 1e-5
    let theta = 100.0;
    let cfg = attention_config(
        hidden,
        AttentionConfig::Mla(m.clone()),
        RopeLayout::Interleaved,
        theta,
        MaskKind::Causal,
    );
    let attn = attention(&cfg, 10);
    let mut rng = TestRng::new(11);
    for t in [1, 3] {
        let x = rng.normals(2 * t * hidden, 1.0);
        let got = values(attn.forward(tensor(&x, [2, t, hidden], &dev()), 0, None));
        for b in 0..2 {
            let xb = &x[b * t * hidden..(b + 1) * t * hidden];
            let want = mla_ref(&attn, &m, theta, xb, hidden);
            assert_close(
                &got[b * t * hidden..(b + 1) * t * hidden],
                &want,
                1e-5,
                &format!("MLA t={t} batch {b}"),
            );
        }
    }
}

#[test]
fn mla_without_q_lora_matches_the_f64_reference() {
    check_mla(None);
}

#[test]
fn mla_with_q_lora_matches_the_f64_reference() {
    check_mla(Some(5));
}

/// Columns of kv head `h / group` for every query head `h` (`mapping` picks the kv head).
fn duplicate_heads(
    w: &[f64],
    rows: usize,
    kv_heads: usize,
    heads: usize,
    hd: usize,
    mapping: impl Fn(usize) -> usize,
) -> Vec<f64> {
    let cols = kv_heads * hd;
    let mut out = Vec::with_capacity(rows * heads * hd);
    for r in 0..rows {
        for h in 0..heads {
            let kvh = mapping(h);
            out.extend_from_slice(&w[r * cols + kvh * hd..r * cols + (kvh + 1) * hd]);
        }
    }
    out
}

#[test]
fn gqa_equals_mha_with_duplicated_kv_heads() {
    let d = dev();
    let (hidden, heads, kv_heads, hd) = (8, 4, 2, 4);
    let gqa_cfg = |kv| {
        AttentionConfig::Gqa(farskip_model::config::GqaConfig {
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hd,
            qkv_bias: true,
            o_bias: false,
            qk_norm: QkNorm::PerHead,
            temperature_tuning: None,
        })
    };
    let gqa = attention(
        &attention_config(
            hidden,
            gqa_cfg(kv_heads),
            RopeLayout::Half,
            100.0,
            MaskKind::Causal,
        ),
        12,
    );
    let x = tensor(
        &TestRng::new(13).normals(2 * 5 * hidden, 1.0),
        [2, 5, hidden],
        &d,
    );
    let want = gqa.forward(x.clone(), 0, None);
    let mha_with = |mapping: &dyn Fn(usize) -> usize| {
        let mha_cfg = attention_config(
            hidden,
            gqa_cfg(heads),
            RopeLayout::Half,
            100.0,
            MaskKind::Causal,
        );
        let mut mha = Attention::new(&mha_cfg, &mha_cfg.layers[0], &d);
        let (AttentionKind::Gqa(src), AttentionKind::Gqa(dst)) = (&gqa.kind, &mut mha.kind) else {
            panic!()
        };
        dst.q_proj = src.q_proj.clone();
        dst.o_proj = src.o_proj.clone();
        dst.q_norm = src.q_norm.clone();
        dst.k_norm = src.k_norm.clone();
        for (s, t) in [
            (&src.k_proj, &mut dst.k_proj),
            (&src.v_proj, &mut dst.v_proj),
        ] {
            let w = duplicate_heads(
                &values(s.weight.val()),
                hidden,
                kv_heads,
                heads,
                hd,
                mapping,
            );
            t.weight = Param::from_tensor(tensor(&w, [hidden, heads * hd], &d));
            let b = duplicate_heads(
                &values(s.bias.as_ref().unwrap().val()),
                1,
                kv_heads,
                heads,
                hd,
                mapping,
            );
            t.bias = Some(Param::from_tensor(tensor(&b, [heads * hd], &d)));
        }
        mha.forward(x.clone(), 0, None)
    };
    // HF repeat_kv: query head h reads kv head h / (heads / kv_heads)
    let diff = max_diff(mha_with(&|h| h / (heads / kv_heads)), want.clone());
    assert!(diff < 1e-5, "GQA vs MHA with duplicated kv heads: {diff:e}");
    let wrong = max_diff(mha_with(&|h| h % kv_heads), want);
    assert!(
        wrong > 1e-3,
        "the head-grouping convention is not observable ({wrong:e})"
    );
}

fn gqa_small() -> AttentionConfig {
    AttentionConfig::Gqa(farskip_model::config::GqaConfig {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        qkv_bias: false,
        o_bias: false,
        qk_norm: QkNorm::None,
        temperature_tuning: None,
    })
}

/// Row `i` of the masked attention equals causal attention over the visible keys only (`first_visible(i)..=i`);
/// rope is relative, so running the visible window from position 0 gives the same scores.
fn check_mask(mask: MaskKind, first_visible: impl Fn(usize) -> usize) {
    let d = dev();
    let (hidden, t) = (8, 8);
    let masked = attention(
        &attention_config(hidden, gqa_small(), RopeLayout::Half, 100.0, mask),
        14,
    );
    let causal = attention(
        &attention_config(
            hidden,
            gqa_small(),
            RopeLayout::Half,
            100.0,
            MaskKind::Causal,
        ),
        14,
    );
    let x = tensor(
        &TestRng::new(15).normals(t * hidden, 1.0),
        [1, t, hidden],
        &d,
    );
    let got = masked.forward(x.clone(), 0, None);
    let full_causal = causal.forward(x.clone(), 0, None);
    let mut hidden_any = false;
    for i in 0..t {
        let start = first_visible(i);
        let visible = x.clone().narrow(1, start, i + 1 - start);
        let want = causal.forward(visible, 0, None).narrow(1, i - start, 1);
        let row = got.clone().narrow(1, i, 1);
        let diff = max_diff(row.clone(), want);
        assert!(
            diff < 1e-5,
            "{mask:?}: query {i} differs from attention over keys {start}..={i} by {diff:e}"
        );
        if start > 0 {
            hidden_any = true;
            let vs_causal = max_diff(row, full_causal.clone().narrow(1, i, 1));
            assert!(
                vs_causal > 1e-4,
                "{mask:?}: query {i} is unaffected by its hidden keys ({vs_causal:e})"
            );
        }
    }
    assert!(hidden_any);
}

#[test]
fn chunked_mask_hides_keys_outside_the_chunk() {
    check_mask(MaskKind::Chunked { size: 3 }, |i| i / 3 * 3);
}

#[test]
fn sliding_window_hides_keys_outside_the_window() {
    check_mask(MaskKind::SlidingWindow { window: 3 }, |i| {
        i.saturating_sub(2)
    });
}

// ---------------------------------------------------------------------------------------------------------
// KV cache
// ---------------------------------------------------------------------------------------------------------

/// Prefill `prefill` tokens, then one token at a time: every step equals the matching row of a full forward.
fn check_cache(model: &Model, batch: usize, t: usize, prefill: usize, tol: f64, seed: u64) {
    let d = dev();
    let ids = id_tensor(
        &TestRng::new(seed).ints(batch * t, model.config().vocab_size),
        batch,
        &d,
    );
    let full = model.forward_unchecked(ids.clone(), None);
    let mut cache = KvCache::new(model.layers.len());
    let pre = model.forward_unchecked(ids.clone().narrow(1, 0, prefill), Some(&mut cache));
    let diff = max_diff(pre, full.clone().narrow(1, 0, prefill));
    assert!(
        diff < tol,
        "{}: prefill differs by {diff:e}",
        model.connectivity()
    );
    assert_eq!(cache.len(), prefill);
    for p in prefill..t {
        let step = model.forward_unchecked(ids.clone().narrow(1, p, 1), Some(&mut cache));
        let diff = max_diff(step, full.clone().narrow(1, p, 1));
        assert!(
            diff < tol,
            "{}: cached step at position {p} differs by {diff:e}",
            model.connectivity()
        );
        assert_eq!(cache.len(), p + 1);
    }
}

fn check_cache_both(model: Model, t: usize, tol: f64) {
    check_cache(&model, 2, t, t - 1, tol, 20);
    check_cache(&model, 1, t, 2, tol, 21);
    let fs = model.with_connectivity(Connectivity::farskip()).unwrap();
    check_cache(&fs, 2, t, t - 1, tol, 22);
    check_cache(&fs, 1, t, 2, tol, 23);
}

#[test]
fn kv_cache_matches_full_forward_small_moe() {
    let cfg = ModelConfig::small_moe(40, 16, 2, 4, 2, 4, 4, 2, 8, Some(8));
    check_cache_both(reseed(Model::new(&cfg, &dev()).unwrap(), 24), 6, 1e-5);
}

#[test]
fn kv_cache_matches_full_forward_deepseek_v3() {
    check_cache_both(
        Model::from_pretrained(fixture("deepseek_v3"), &dev()).unwrap(),
        7,
        1e-4,
    );
}

#[test]
fn kv_cache_matches_full_forward_deepseek_v2_q_lora() {
    check_cache_both(
        Model::from_pretrained(fixture("deepseek_v2"), &dev()).unwrap(),
        6,
        1e-4,
    );
}

#[test]
fn kv_cache_matches_full_forward_llama4_with_short_chunks() {
    // chunks of 3 so the decode steps cross chunk boundaries; floor_scale 4 moves the NoPE temperature at 3
    let dir = copy_fixture("llama4_text");
    let mut json = fixture_config("llama4_text");
    json["attention_chunk_size"] = 3.into();
    write_config(&dir, &json);
    let model = Model::from_pretrained(dir.path(), &dev()).unwrap();
    assert_eq!(model.config().layers[0].mask, MaskKind::Chunked { size: 3 });
    check_cache_both(model, 8, 1e-4);
}

#[test]
fn kv_cache_matches_full_forward_qwen2_with_sliding_window() {
    let dir = copy_fixture("qwen2_moe");
    let mut json = fixture_config("qwen2_moe");
    json["use_sliding_window"] = true.into();
    json["sliding_window"] = 3.into();
    json["layer_types"] = serde_json::json!([
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention"
    ]);
    write_config(&dir, &json);
    let model = Model::from_pretrained(dir.path(), &dev()).unwrap();
    assert_eq!(
        model.config().layers[0].mask,
        MaskKind::SlidingWindow { window: 3 }
    );
    assert_eq!(model.config().layers[1].mask, MaskKind::Causal);
    check_cache_both(model, 7, 1e-4);
}

// ---------------------------------------------------------------------------------------------------------
// Connectivity, composed by hand from the model's sub-modules (DESIGN.md §1, FARSKIP_SEMANTICS.md)
// ---------------------------------------------------------------------------------------------------------

/// `Attn(N1(x))`.
fn attn(l: &DecoderLayer, x: Tensor<3>) -> Tensor<3> {
    l.attention.forward(l.input_norm.forward(x), 0, None)
}

/// `(Routed(N2(m)), Shared(N2(m)))` of an MoE layer.
fn moe(l: &DecoderLayer, m: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
    let x = l.post_norm.forward(m);
    let [b, t, h] = x.dims();
    let Ffn::Moe(block) = &l.ffn else {
        panic!("layer {} is not MoE", l.index())
    };
    let out = block.forward(x.reshape([b * t, h]));
    (
        out.routed.reshape([b, t, h]),
        out.shared.expect("shared expert").reshape([b, t, h]),
    )
}

/// `MLP(N2(m))` of a dense layer.
fn mlp(l: &DecoderLayer, m: Tensor<3>) -> Tensor<3> {
    let Ffn::Dense(block) = &l.ffn else {
        panic!("layer {} is not dense", l.index())
    };
    block.forward(l.post_norm.forward(m))
}

fn head(model: &Model, h: Tensor<3>) -> Tensor<3> {
    model
        .lm_head
        .as_ref()
        .expect("untied head")
        .forward(model.norm.forward(h))
}

/// Three layers, MoE - dense - MoE, with a shared expert (so A differs from R' as well).
fn moe_dense_moe() -> (Model, Tensor<2, Int>) {
    let mut cfg = ModelConfig::small_moe(40, 16, 3, 2, 1, 8, 4, 2, 8, Some(12));
    cfg.layers[1].ffn = FfnKind::Dense {
        intermediate_size: 24,
    };
    let model = reseed(Model::new(&cfg, &dev()).unwrap(), 30);
    let ids = id_tensor(&TestRng::new(31).ints(2 * 5, 40), 2, &dev());
    (model, ids)
}

fn check_against(model: &Model, spec: &str, ids: Tensor<2, Int>, want: Tensor<3>) -> TestResult {
    let got = model
        .clone()
        .with_connectivity(spec.parse()?)?
        .forward(ids.clone())?;
    let diff = max_diff(got.clone(), want);
    assert!(diff < 1e-5, "{spec}: hand-built logits differ by {diff:e}");
    if spec != "standard" {
        let standard = model.forward(ids)?;
        let moved = max_diff(got, standard);
        assert!(
            moved > 1e-3,
            "{spec} is indistinguishable from standard ({moved:e})"
        );
    }
    Ok(())
}

#[test]
fn standard_connectivity_matches_hand_built_layers() -> TestResult {
    let (model, ids) = moe_dense_moe();
    let [l0, l1, l2] = &model.layers[..] else {
        panic!()
    };
    let h = model.embed(ids.clone());
    let h = h.clone() + attn(l0, h);
    let (r, s) = moe(l0, h.clone());
    let h = h + (r + s);
    let h = h.clone() + attn(l1, h);
    let h = h.clone() + mlp(l1, h);
    let h = h.clone() + attn(l2, h);
    let (r, s) = moe(l2, h.clone());
    check_against(&model, "standard", ids, head(&model, h + (r + s)))
}

#[test]
fn farskip_full_with_a_dense_middle_layer_matches_hand_built_layers() -> TestResult {
    let (model, ids) = moe_dense_moe();
    let [l0, l1, l2] = &model.layers[..] else {
        panic!()
    };
    let h0 = model.embed(ids.clone());
    // layer 0, plain input: R = A = M = h0; the MoE reads N2(h0), in parallel with attention
    let r0p = h0.clone() + attn(l0, h0.clone());
    let (r, s) = moe(l0, h0);
    let (full1, free1) = (r0p.clone() + (r + s.clone()), r0p + s);
    // layer 1, dense, given (R, A): attention reads A, the MLP the pre-attention R; A collapses
    let r1p = full1.clone() + attn(l1, free1);
    let h2 = r1p + mlp(l1, full1);
    // layer 2, plain input again
    let r2p = h2.clone() + attn(l2, h2.clone());
    let (r, s) = moe(l2, h2);
    // the final norm reads R, which includes the last routed output
    check_against(&model, "farskip", ids, head(&model, r2p + (r + s)))
}

#[test]
fn farskip_attn_only_matches_hand_built_layers() -> TestResult {
    let (model, ids) = moe_dense_moe();
    let [l0, l1, l2] = &model.layers[..] else {
        panic!()
    };
    let h0 = model.embed(ids.clone());
    // attention reads A, the feed-forward reads the post-attention stream R'
    let r0p = h0.clone() + attn(l0, h0);
    let (r, s) = moe(l0, r0p.clone());
    let (full1, free1) = (r0p.clone() + (r + s.clone()), r0p + s);
    let r1p = full1 + attn(l1, free1);
    let h2 = r1p.clone() + mlp(l1, r1p);
    let r2p = h2.clone() + attn(l2, h2);
    let (r, s) = moe(l2, r2p.clone());
    check_against(
        &model,
        "farskip-attn-only",
        ids,
        head(&model, r2p + (r + s)),
    )
}

#[test]
fn farskip_mlp_only_matches_hand_built_layers() -> TestResult {
    let (model, ids) = moe_dense_moe();
    let [l0, l1, l2] = &model.layers[..] else {
        panic!()
    };
    let h0 = model.embed(ids.clone());
    // attention reads R, the feed-forward the pre-attention R: A is never read
    let r0p = h0.clone() + attn(l0, h0.clone());
    let (r, s) = moe(l0, h0);
    let full1 = r0p + (r + s);
    let r1p = full1.clone() + attn(l1, full1.clone());
    let h2 = r1p + mlp(l1, full1);
    let r2p = h2.clone() + attn(l2, h2.clone());
    let (r, s) = moe(l2, h2);
    check_against(&model, "farskip-mlp-only", ids, head(&model, r2p + (r + s)))
}

#[test]
fn farskip_range_after_a_stock_moe_layer_reads_its_routed_free_stream() -> TestResult {
    let (model, ids) = moe_dense_moe();
    let [l0, l1, l2] = &model.layers[..] else {
        panic!()
    };
    let h0 = model.embed(ids.clone());
    // layer 0 is stock but, being MoE, still emits the pair (R' + (r + s), R' + s)
    let r0p = h0.clone() + attn(l0, h0);
    let (r, s) = moe(l0, r0p.clone());
    let (full1, free1) = (r0p.clone() + (r + s.clone()), r0p + s);
    // layer 1 converted: attention reads A = R'_0 + s_0
    let r1p = full1.clone() + attn(l1, free1);
    let h2 = r1p + mlp(l1, full1.clone());
    // layer 2 stock
    let h3 = h2.clone() + attn(l2, h2);
    let (r, s) = moe(l2, h3.clone());
    check_against(
        &model,
        "farskip:1..=1",
        ids.clone(),
        head(&model, h3 + (r + s)),
    )?;
    // had layer 0 emitted one stream (R = A), layer 1 would differ measurably
    let r1p = full1.clone() + attn(l1, full1.clone());
    let h2 = r1p + mlp(l1, full1);
    let h3 = h2.clone() + attn(l2, h2);
    let (r, s) = moe(l2, h3.clone());
    let without_quirk = head(&model, h3 + (r + s));
    let got = model
        .with_connectivity("farskip:1..=1".parse()?)?
        .forward(ids)?;
    assert!(max_diff(got, without_quirk) > 1e-3);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Save / load
// ---------------------------------------------------------------------------------------------------------

/// Save, reload: the same config and bit-identical weights. Reloaded linears are transposed views of the
/// file's `[out, in]` matrices, so logits are bit-identical only when the original was loaded the same way
/// (`bitwise_logits`); a model built in memory may differ in the last float bits.
fn round_trip(
    model: &Model,
    hf_config: Option<&serde_json::Value>,
    tag: &str,
    bitwise_logits: bool,
) {
    let d = dev();
    let dir = TempDir::new(tag);
    model
        .save_pretrained(dir.path(), hf_config)
        .unwrap_or_else(|e| panic!("{tag}: save: {e}"));
    let reloaded =
        Model::from_pretrained(dir.path(), &d).unwrap_or_else(|e| panic!("{tag}: load: {e}"));
    assert_eq!(reloaded.config(), model.config(), "{tag}: config");
    let (a, b) = (parameters(model), parameters(&reloaded));
    assert_eq!(a.len(), b.len(), "{tag}: parameter count");
    for (i, (pa, pb)) in a.iter().zip(&b).enumerate() {
        assert!(
            pa == pb,
            "{tag}: parameter {i} {:?} differs after the round trip",
            pa.0
        );
    }
    let ids = id_tensor(
        &TestRng::new(40).ints(2 * 6, model.config().vocab_size),
        2,
        &d,
    );
    for spec in ["standard", "farskip"] {
        let c: Connectivity = spec.parse().unwrap();
        let a = model
            .clone()
            .with_connectivity(c.clone())
            .unwrap()
            .forward(ids.clone())
            .unwrap();
        let b = reloaded
            .clone()
            .with_connectivity(c)
            .unwrap()
            .forward(ids.clone())
            .unwrap();
        let diff = max_diff(a, b);
        if bitwise_logits {
            assert_eq!(diff, 0.0, "{tag} {spec}: reloaded logits differ");
        } else {
            assert!(
                diff < 1e-5,
                "{tag} {spec}: reloaded logits differ by {diff:e}"
            );
        }
    }
}

fn round_trip_family(family: &str) {
    let model = Model::from_pretrained(fixture(family), &dev()).unwrap();
    round_trip(&model, Some(&fixture_config(family)), family, true);
}

#[test]
fn save_load_round_trip_deepseek_v2() {
    round_trip_family("deepseek_v2");
}
#[test]
fn save_load_round_trip_deepseek_v3() {
    round_trip_family("deepseek_v3");
}
#[test]
fn save_load_round_trip_llama4_text() {
    round_trip_family("llama4_text");
}
#[test]
fn save_load_round_trip_mixtral() {
    round_trip_family("mixtral");
}
#[test]
fn save_load_round_trip_olmoe() {
    round_trip_family("olmoe");
}
#[test]
fn save_load_round_trip_qwen2_moe() {
    round_trip_family("qwen2_moe");
}
#[test]
fn save_load_round_trip_qwen3_moe() {
    round_trip_family("qwen3_moe");
}

#[test]
fn save_load_round_trip_with_a_generated_config() {
    // a config with a Qwen3-MoE equivalent (no shared expert): save_pretrained writes config.json itself
    let mut cfg = ModelConfig::small_moe(40, 16, 3, 2, 1, 8, 4, 2, 8, None);
    cfg.layers[1].ffn = FfnKind::Dense {
        intermediate_size: 24,
    };
    let model = reseed(Model::new(&cfg, &dev()).unwrap(), 41);
    round_trip(&model, None, "generated", false);
    // once loaded from disk, a second round trip is bit-identical
    let dir = TempDir::new("generated-first");
    model.save_pretrained(dir.path(), None).unwrap();
    round_trip(
        &Model::from_pretrained(dir.path(), &dev()).unwrap(),
        None,
        "generated-again",
        true,
    );
}

/// Relabelling the experts of every MoE layer (gate columns, correction bias and expert weights together)
/// leaves the logits unchanged — for every family, including group-limited routing with a correction bias
/// (DeepSeek-V3), where whole groups move. Orders that are not permutations, or split a routing group, are
/// refused with an error that shows the order.
#[test]
fn permuting_experts_keeps_the_model_function() -> Result<(), ModelError> {
    let device = dev();
    let mut rng = TestRng::new(11);
    for family in FAMILIES {
        let model = Model::from_pretrained(fixture(family), &device)?;
        let ids = Tensor::<2, Int>::from_data(TensorData::new(rng.ints(24, 256), [2, 12]), &device);
        let before = model.forward(ids.clone())?;
        let mut permuted = model.clone();
        for layer in permuted.layers.iter_mut() {
            if let Ffn::Moe(moe) = &mut layer.ffn {
                let n = moe.experts.num_experts();
                let groups = moe
                    .router
                    .config()
                    .group_limit
                    .as_ref()
                    .map_or(1, |g| g.num_groups);
                let size = n / groups;
                // Groups in reverse order, members of each group reversed too.
                let order: Vec<usize> = (0..groups)
                    .rev()
                    .flat_map(|g| (g * size..(g + 1) * size).rev())
                    .collect();
                *moe = moe.permute_experts(&order)?;
            }
        }
        let after = permuted.forward(ids)?;
        let diff = max_diff(before, after);
        assert!(
            diff <= 1e-5,
            "{family}: permuted experts change the logits by {diff}"
        );
    }
    let model = Model::from_pretrained(fixture("deepseek_v3"), &device)?;
    let moe = model
        .layers
        .iter()
        .find_map(|l| match &l.ffn {
            Ffn::Moe(m) => Some(m.clone()),
            Ffn::Dense(_) => None,
        })
        .expect("deepseek_v3 fixture has an MoE layer");
    let err = moe.permute_experts(&[0, 1, 2]).unwrap_err().to_string();
    assert!(err.contains("not a permutation"), "{err}");
    // 8 experts in 4 groups of 2: [1, 2] mixes groups 0 and 1.
    let err = moe
        .permute_experts(&[1, 2, 0, 3, 4, 5, 6, 7])
        .unwrap_err()
        .to_string();
    assert!(err.contains("splits a routing group"), "{err}");
    Ok(())
}

#[test]
fn an_expert_block_keeps_its_experts_and_routes_among_them() -> TestResult {
    let device = dev();
    let model = Model::from_pretrained(fixture("deepseek_v3"), &device)?;
    // 8 experts in 4 groups of 2, top-2 of the best 2 groups.
    let moes = |m: &Model| -> Vec<MoeBlock> {
        m.layers
            .iter()
            .filter_map(|l| match &l.ffn {
                Ffn::Moe(b) => Some(b.clone()),
                Ffn::Dense(_) => None,
            })
            .collect()
    };
    let hidden = model.config().hidden_size;
    let x = tensor(
        &TestRng::new(5).normals(9 * hidden, 1.0),
        [9, hidden],
        &device,
    );
    for (range, groups, top_k) in [
        (4..8, Some((2, 2)), 2),
        (0..2, Some((1, 1)), 2),
        (1..3, None, 2),
        (3..4, None, 1),
    ] {
        let block = model.expert_block(range.clone())?;
        let m = block.config().moe.as_ref().unwrap();
        assert_eq!(m.num_experts, range.len(), "{range:?}");
        assert_eq!(m.top_k, top_k, "{range:?}");
        assert_eq!(
            m.router.group_limit.map(|g| (g.num_groups, g.topk_groups)),
            groups,
            "{range:?}"
        );
        let (full, part) = (moes(&model), moes(&block));
        assert_eq!(full.len(), part.len());
        for (f, p) in full.iter().zip(&part) {
            let n = range.len();
            let want = f.experts.gate_up.val().narrow(0, range.start, n);
            assert_eq!(max_diff(p.experts.gate_up.val(), want), 0.0, "{range:?}");
            let want = f.experts.down.val().narrow(0, range.start, n);
            assert_eq!(max_diff(p.experts.down.val(), want), 0.0, "{range:?}");
            // The block's router logits are the full router's for the kept experts.
            let full_logits = x.clone().matmul(f.router.gate.weight.val());
            let part_logits = x.clone().matmul(p.router.gate.weight.val());
            let want = full_logits.narrow(1, range.start, n);
            assert_eq!(max_diff(part_logits, want), 0.0, "{range:?}");
            // Every token picks `top_k` distinct experts of the block.
            let chosen = ints(p.router.route(x.clone()).experts);
            assert_eq!(chosen.len(), 9 * top_k);
            for row in chosen.chunks(top_k) {
                assert!(row.iter().all(|&e| (e as usize) < n), "{range:?}: {row:?}");
                assert!(top_k < 2 || row[0] != row[1], "{range:?}: {row:?}");
            }
        }
        let ids = id_tensor(&[1, 5, 9, 3, 7, 2], 1, &device);
        let logits = values(block.forward(ids)?);
        assert!(logits.iter().all(|v| v.is_finite()), "{range:?}");
    }
    for bad in [0..0, 6..9] {
        let err = model.expert_block(bad.clone()).unwrap_err().to_string();
        assert!(err.contains("not inside the 8 experts"), "{bad:?}: {err}");
    }
    Ok(())
}
