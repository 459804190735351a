//! Golden fixtures: logits and greedy ids of every family, standard and FarSkip (all layers and two ranges) and
//! FarSkip at skip depth 2 and 3, against PyTorch/transformers references (tolerance 1e-4 max-abs, ids exact), on
//! flex and, in a build with the feature `wgpu`, on burn's CubeCL backend through wgpu as well.

use burn::prelude::*;
use farskip_model::{Connectivity, DeviceName, Model};
use farskip_tests::*;

const TOL: f32 = 1e-4;

fn check_family(family: &str, name: DeviceName) {
    let device = name
        .device()
        .unwrap_or_else(|e| panic!("{family} on {name}: {e}"));
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
    check_depths(&model, family, &device, &mut report, &mut failures);
    eprintln!("{family} on {name}: {}", report.join(", "));
    assert!(failures.is_empty(), "{family} on {name}: {failures:#?}");
}

/// Skip depth 2 and 3 (all layers), depth 2 over layers 1..=3, and depth-2 greedy decoding with the KV cache.
fn check_depths(
    model: &Model,
    family: &str,
    device: &Device,
    report: &mut Vec<String>,
    failures: &mut Vec<String>,
) {
    let r = depth_reference(family);
    let input = ids(&r, "input_ids", device);
    let with = |spec: &str| {
        model
            .clone()
            .with_connectivity(spec.parse::<Connectivity>().unwrap())
            .unwrap()
    };
    for (spec, name) in [
        ("farskip-d2", "farskip_d2_logits"),
        ("farskip-d3", "farskip_d3_logits"),
        ("farskip-d2:1..=3", "farskip_d2_range_logits"),
    ] {
        let diff = max_abs_diff(
            with(spec).forward(input.clone()).unwrap(),
            &r.f32(name).unwrap(),
        );
        report.push(format!("{spec}: {diff:.2e}"));
        if diff > TOL {
            failures.push(format!("{spec}: max |logits - {name}| = {diff}"));
        }
    }
    let g = with("farskip-d2")
        .generate(input.narrow(1, 0, 8), 8)
        .unwrap();
    if int_values(g.ids) != ids_vec(&r, "farskip_d2_greedy_ids") {
        failures.push("farskip-d2: greedy ids differ".into());
    }
    let diff = max_abs_diff(
        g.step_logits,
        &r.f32("farskip_d2_greedy_step_logits").unwrap(),
    );
    report.push(format!("farskip-d2 greedy steps: {diff:.2e}"));
    if diff > TOL {
        failures.push(format!("farskip-d2: greedy step logits diff {diff}"));
    }
}

/// The comparison every golden check uses cannot be fooled by a NaN or an infinity.
#[test]
fn a_nan_logit_fails_the_golden_comparison() {
    let device = Device::flex();
    let want = (vec![0.5f32, 1.0, -2.0], vec![1, 3]);
    let same = Tensor::<2>::from_floats([[0.5, 1.0, -2.0]], &device);
    assert_eq!(max_abs_diff(same, &want), 0.0);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let got = Tensor::<2>::from_floats([[0.5, bad, -2.0]], &device);
        let diff = max_abs_diff(got, &want);
        assert!(diff > TOL, "{bad} gave diff {diff}");
    }
}

/// One test per family on flex, and one per family on wgpu in a build with the feature `wgpu`.
macro_rules! families {
    ($($family:ident),*) => {
        $(
            #[test]
            fn $family() {
                check_family(stringify!($family), DeviceName::Flex);
            }
        )*
        #[cfg(feature = "wgpu")]
        mod wgpu {
            use super::*;
            $(
                #[test]
                fn $family() {
                    check_family(stringify!($family), DeviceName::Wgpu);
                }
            )*
        }
    };
}

families!(
    deepseek_v2,
    deepseek_v3,
    llama4_text,
    mixtral,
    olmoe,
    qwen2_moe,
    qwen3_moe
);
