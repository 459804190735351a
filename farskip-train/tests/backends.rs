//! One FCSD step (KL loss, backward, AdamW) on wgpu equals the same step on flex. flex takes its fast paths (the
//! hand-written attention and expert backwards, the fused AdamW); wgpu runs the generic fallbacks, composed of
//! burn tensor ops. Built with the feature `wgpu` only.
#![cfg(feature = "wgpu")]

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use farskip_model::{Connectivity, DeviceName, Model};
use farskip_train::optim::FusedAdamWConfig;
use farskip_train::{DistillStep, Method};

/// Every float parameter of a module, in visiting order.
#[derive(Default)]
struct Values(Vec<(Vec<usize>, Vec<f32>)>);

impl ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(host(param.val()));
    }
}

struct StepResult {
    loss: f32,
    grads: Values,
    before: Values,
    after: Values,
}

/// One FCSD step of the FarSkip student against its standard teacher (the fixture `family`), on `name`.
fn fcsd_step(family: &str, name: DeviceName) -> StepResult {
    let device = name.device().expect("device");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(family);
    let teacher = Model::from_pretrained(&dir, &device).expect("fixture");
    let student = Model::from_pretrained(&dir, &device.clone().autodiff())
        .expect("fixture")
        .with_connectivity(Connectivity::farskip())
        .expect("farskip");
    let step = DistillStep::new(student, Some(&teacher), Method::Fcsd { temperature: 2.0 })
        .expect("fcsd step");
    // Two windows of 17 ids (16 inputs and their next tokens), spread over the vocabulary.
    let ids: Vec<i64> = (0..34).map(|i| (i * 37 + 11) % 256).collect();
    let windows =
        Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 17]), &device.clone().autodiff());
    let mut before = Values::default();
    step.student.visit(&mut before);
    let loss = step.loss(windows);
    let loss_value = loss.clone().into_scalar::<f32>();
    let grads = GradientsParams::from_grads(loss.backward(), &step);
    let grad_values = {
        let mut g = Grads {
            grads: &grads,
            values: Values::default(),
        };
        step.student.visit(&mut g);
        g.values
    };
    let mut optim = FusedAdamWConfig::new()
        .with_weight_decay(0.01)
        .with_epsilon(1e-8)
        .init();
    let step = optim.step(1e-3, step, grads);
    let mut after = Values::default();
    step.student.visit(&mut after);
    StepResult {
        loss: loss_value,
        grads: grad_values,
        before,
        after,
    }
}

fn host<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    let dims = t.dims().to_vec();
    let v = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 values");
    (dims, v)
}

/// The gradient of every float parameter that has one, in visiting order.
struct Grads<'a> {
    grads: &'a GradientsParams,
    values: Values,
}

impl ModuleVisitor for Grads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.values.0.push(host(g));
        }
    }
}

/// max over tensors of max|a - b| / max|a| (each tensor scaled by its own largest value), and of ‖a - b‖₂ / ‖a‖₂;
/// infinite on NaN; panics on a shape or count mismatch.
fn rel_diffs(a: &Values, b: &Values) -> (f64, f64) {
    assert_eq!(a.0.len(), b.0.len(), "tensor counts");
    let (mut max_rel, mut l2_rel) = (0f64, 0f64);
    for ((da, va), (db, vb)) in a.0.iter().zip(&b.0) {
        assert_eq!(da, db, "shapes");
        let scale = va.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
        let d = farskip_model::compare::max_abs_diff(va, vb);
        let norm = va.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        let dist = va
            .iter()
            .zip(vb)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum::<f64>()
            .sqrt();
        let rel = |x: f64, s: f64| match (x.is_finite(), s > 0.0) {
            (false, _) => f64::INFINITY,
            (true, true) => x / s,
            (true, false) => x,
        };
        max_rel = max_rel.max(rel(d, scale));
        l2_rel = l2_rel.max(rel(dist, norm));
    }
    (max_rel, l2_rel)
}

#[test]
fn an_fcsd_step_on_wgpu_equals_the_step_on_flex() {
    for family in ["qwen3_moe", "deepseek_v3"] {
        let flex = fcsd_step(family, DeviceName::Flex);
        let wgpu = fcsd_step(family, DeviceName::Wgpu);
        let loss = (flex.loss - wgpu.loss).abs();
        let (grads, _) = rel_diffs(&flex.grads, &wgpu.grads);
        let (weights_max, weights) = rel_diffs(&flex.after, &wgpu.after);
        let (moved, _) = rel_diffs(&flex.before, &flex.after);
        eprintln!(
            "{family}: loss flex {} wgpu {} (|Δ| {loss:.2e}); {} gradients, max rel Δ {grads:.2e}; updated weights \
             rel Δ {weights:.2e} (‖Δ‖/‖w‖; elementwise, max|Δ|/max|w| {weights_max:.2e}); the step moved them by \
             {moved:.2e} (max|Δ|/max|w|)",
            flex.loss,
            wgpu.loss,
            flex.grads.0.len()
        );
        assert!(
            flex.loss.is_finite() && flex.loss > 0.0,
            "{family}: loss {}",
            flex.loss
        );
        assert!(loss <= 1e-4, "{family}: loss differs by {loss}");
        assert!(!flex.grads.0.is_empty(), "{family}: no gradients");
        assert!(
            grads <= 1e-4,
            "{family}: gradients differ by {grads} (relative)"
        );
        assert!(
            moved > 1e-3,
            "{family}: the step moved the weights by {moved} only"
        );
        // Per tensor, ‖Δ‖/‖w‖. Elementwise is no measure of the step: AdamW's first update is lr·g/(|g| + ε), which
        // sends a gradient element near ε = 1e-8 — below the float noise of gradients of order 1e-2 — anywhere in
        // ±lr, on one backend as on the other.
        assert!(
            weights <= 1e-4,
            "{family}: updated weights differ by {weights} (relative)"
        );
    }
}
