//! Golden fixtures: logits and greedy ids of every family, standard and FarSkip (all layers and two ranges),
//! against PyTorch/transformers references (tolerance 1e-4 max-abs, ids exact).

use burn::prelude::*;
use farskip_model::{Connectivity, Model};
use farskip_tests::*;

const TOL: f32 = 1e-4;

fn check_family(family: &str) {
    let device = Device::flex();
    let model = Model::from_pretrained(fixture_dir(family), &device)
        .unwrap_or_else(|e| panic!("{family}: {e}"));
    let r = reference(family);
    let input = ids(&r, "input_ids", &device);
    let cases = [
        ("standard", "logits"),
        ("farskip", "farskip_logits"),
        ("farskip:1..=3", "farskip_range_logits"),
        ("farskip:1..=2", "farskip_range_b_logits"),
    ];
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (spec, name) in cases {
        let m = model
            .clone()
            .with_connectivity(spec.parse::<Connectivity>().unwrap())
            .unwrap();
        let logits = m.forward(input.clone()).unwrap();
        let diff = max_abs_diff(logits, &r.f32(name).unwrap());
        report.push(format!("{spec}: {diff:.2e}"));
        if diff > TOL {
            failures.push(format!("{spec}: max |logits - {name}| = {diff}"));
        }
    }
    let prompt = input.clone().narrow(1, 0, 8);
    for (spec, prefix) in [("standard", ""), ("farskip", "farskip_")] {
        let m = model
            .clone()
            .with_connectivity(spec.parse::<Connectivity>().unwrap())
            .unwrap();
        let g = m.generate(prompt.clone(), 8).unwrap();
        let want = ids_vec(&r, &format!("{prefix}greedy_ids"));
        if int_values(g.ids) != want {
            failures.push(format!("{spec}: greedy ids differ"));
        }
        let diff = max_abs_diff(
            g.step_logits,
            &r.f32(&format!("{prefix}greedy_step_logits")).unwrap(),
        );
        report.push(format!("{spec} greedy steps: {diff:.2e}"));
        if diff > TOL {
            failures.push(format!("{spec}: greedy step logits diff {diff}"));
        }
    }
    eprintln!("{family}: {}", report.join(", "));
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
