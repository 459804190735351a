//! Golden fixtures with the weights kept in bf16 (`WeightDtype::Bf16`) against the f32 PyTorch references.
//!
//! Measured on every family (docs/performance.md): where a token is routed to the same experts as in f32, its
//! logits move by at most 3.5e-2 (2e-2–5e-2 over the families); where rounding flips a near-tied routing
//! choice (the fixtures are random-weight models with small routing margins: DeepSeek-V2's group-limited
//! router flips on 15 of 32 positions) that position's logits move by up to ~1. So the test asks, for each
//! family, connectivity and the greedy steps: at least half of the positions within `LOGITS_TOL` (a wrong
//! transpose, a lost bias or a bf16-rounded product moves every position far more), and greedy ids identical
//! unless, at the first step that differs, the reference's two choices are closer than twice that step's logit
//! difference (a near-tie: Mixtral's standard run, margin 2.4e-3 at step 3).

use burn::prelude::*;
use farskip_model::hf::WeightDtype;
use farskip_model::{Connectivity, MemoryCheck, Model};
use farskip_tests::*;

/// Max-abs logit difference allowed with bf16 weights.
const LOGITS_TOL: f32 = 5e-2;

fn check_family(family: &str) {
    let device = Device::flex();
    let model = Model::from_pretrained_as(
        fixture_dir(family),
        &device,
        MemoryCheck::Refuse,
        Some(WeightDtype::Bf16),
    )
    .unwrap_or_else(|e| panic!("{family}: {e}"));
    let r = reference(family);
    let input = ids(&r, "input_ids", &device);
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (spec, name, prefix) in [
        ("standard", "logits", ""),
        ("farskip", "farskip_logits", "farskip_"),
    ] {
        let m = model
            .clone()
            .with_connectivity(spec.parse::<Connectivity>().unwrap())
            .unwrap();
        let (close, total, worst) =
            positions_within(m.forward(input.clone()).unwrap(), &r.f32(name).unwrap());
        report.push(format!(
            "{spec}: {close}/{total} positions within {LOGITS_TOL}, worst {worst:.2e}"
        ));
        if 2 * close < total {
            failures.push(format!(
                "{spec}: {close}/{total} positions within {LOGITS_TOL}"
            ));
        }
        let g = m.generate(input.clone().narrow(1, 0, 8), 8).unwrap();
        let steps = g.step_logits.clone();
        let (close, total, worst) = positions_within(
            g.step_logits,
            &r.f32(&format!("{prefix}greedy_step_logits")).unwrap(),
        );
        report.push(format!(
            "{spec} greedy steps: {close}/{total}, worst {worst:.2e}"
        ));
        if 2 * close < total {
            failures.push(format!(
                "{spec}: greedy steps {close}/{total} within {LOGITS_TOL}"
            ));
        }
        let (got_ids, want_ids) = (
            int_values(g.ids),
            ids_vec(&r, &format!("{prefix}greedy_ids")),
        );
        if let Some(pos) = got_ids.iter().zip(&want_ids).position(|(a, b)| a != b) {
            // Ids are `[batch, 8 + 8]`: the first difference is step `col - 8` of row `row`.
            let (row, step) = (pos / 16, (pos % 16).saturating_sub(8));
            let want_steps = r.f32(&format!("{prefix}greedy_step_logits")).unwrap();
            let vocab = want_steps.1[2];
            let at = (row * 8 + step) * vocab;
            let got_step: Vec<f32> = steps
                .narrow(0, row, 1)
                .narrow(1, step, 1)
                .into_data()
                .convert::<f32>()
                .try_to_vec()
                .expect("f32 logits");
            let d = max_abs_diff_values(&got_step, &want_steps.0[at..at + vocab]);
            // The reference's margin between its choice and ours: logits off by d can swap two choices
            // at most 2·d apart, so a larger margin is a real disagreement.
            let reference_logits = &want_steps.0[at..at + vocab];
            let margin =
                reference_logits[want_ids[pos] as usize] - reference_logits[got_ids[pos] as usize];
            report.push(format!(
                "{spec} greedy ids differ from step {step} (logits off by {d:.2e}, reference margin {margin:.2e})"
            ));
            if d.is_nan() || margin.is_nan() || margin > 2.0 * d {
                failures.push(format!(
                    "{spec}: greedy ids differ at step {step}: margin {margin} but logits off by only {d}"
                ));
            }
        }
    }
    eprintln!("{family} (bf16 weights): {}", report.join(", "));
    assert!(failures.is_empty(), "{family}: {failures:#?}");
}

#[test]
fn deepseek_v2() {
    check_family("deepseek_v2");
}
#[test]
fn deepseek_v3() {
    check_family("deepseek_v3");
}
#[test]
fn llama4_text() {
    check_family("llama4_text");
}
#[test]
fn mixtral() {
    check_family("mixtral");
}
#[test]
fn olmoe() {
    check_family("olmoe");
}
#[test]
fn qwen2_moe() {
    check_family("qwen2_moe");
}
#[test]
fn qwen3_moe() {
    check_family("qwen3_moe");
}

/// Positions (rows of the last dimension) whose logits are all within [`LOGITS_TOL`] of the reference, the
/// number of positions, and the largest difference anywhere. NaN or infinity counts as far off.
fn positions_within<const D: usize>(
    got: Tensor<D>,
    want: &(Vec<f32>, Vec<usize>),
) -> (usize, usize, f32) {
    assert_eq!(got.dims().to_vec(), want.1, "shape");
    let vocab = want.1[D - 1];
    let got: Vec<f32> = got
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("f32 logits");
    let mut close = 0;
    let mut worst = 0f32;
    for (g, w) in got.chunks(vocab).zip(want.0.chunks(vocab)) {
        let d = max_abs_diff_values(g, w);
        let d = if d.is_finite() { d } else { f32::INFINITY };
        worst = worst.max(d);
        close += usize::from(d <= LOGITS_TOL);
    }
    (close, got.len() / vocab, worst)
}
