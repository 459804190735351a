//! MoE layer and attention at the `preset_small` size (512 tokens, hidden 512, 16 experts top-2, 8 heads /
//! 4 KV heads): forward on the plain device, and forward + backward on the autodiff device.
//!
//! `cargo bench -p farskip-model --bench moe` (quick: 10 samples each; CI only compiles it).

use std::hint::black_box;
use std::time::Duration;

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{Criterion, criterion_group, criterion_main};
use farskip_model::moe::SlotPlan;
use farskip_model::{Ffn, Model, ModelConfig};

const TOKENS: usize = 512;

fn preset_model(device: &Device) -> Model {
    device.seed(0);
    Model::new(&ModelConfig::preset_small(), device).expect("preset_small is valid")
}

fn input<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn moe(c: &mut Criterion) {
    let device = Device::default();
    let model = preset_model(&device);
    let Ffn::Moe(block) = &model.layers[0].ffn else {
        panic!("preset_small layer 0 is MoE");
    };
    let hidden = model.config().hidden_size;
    let x = input([TOKENS, hidden], &device);
    let routing = block.route(x.clone());
    let plan = SlotPlan::from_experts(&routing.experts, block.experts.num_experts());
    let xs = x.clone().select(
        0,
        farskip_model::moe::index_tensor(&plan.sorted_tokens(), &device),
    );

    let mut g = c.benchmark_group("moe");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("forward", |b| {
        b.iter(|| black_box(block.forward(x.clone()).routed.into_data()))
    });
    g.bench_function("route", |b| {
        b.iter(|| black_box(block.route(x.clone()).weights.into_data()))
    });
    g.bench_function("experts_grouped", |b| {
        b.iter(|| {
            black_box(
                block
                    .experts
                    .forward_grouped(xs.clone(), &plan.counts)
                    .into_data(),
            )
        })
    });

    let ad = Device::default().autodiff();
    let model = preset_model(&ad);
    let Ffn::Moe(block) = &model.layers[0].ffn else {
        panic!("preset_small layer 0 is MoE");
    };
    let x = input([TOKENS, hidden], &ad).require_grad();
    g.bench_function("forward_backward", |b| {
        b.iter(|| black_box(block.forward(x.clone()).routed.sum().backward()))
    });
    g.finish();
}

fn attention(c: &mut Criterion) {
    let device = Device::default();
    let model = preset_model(&device);
    let hidden = model.config().hidden_size;
    let attn = &model.layers[0].attention;
    let x = input([1, TOKENS, hidden], &device);

    let mut g = c.benchmark_group("attention");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("forward", |b| {
        b.iter(|| black_box(attn.forward(x.clone(), 0, None).into_data()))
    });

    let ad = Device::default().autodiff();
    let model = preset_model(&ad);
    let attn = &model.layers[0].attention;
    let x = input([1, TOKENS, hidden], &ad).require_grad();
    g.bench_function("forward_backward", |b| {
        b.iter(|| black_box(attn.forward(x.clone(), 0, None).sum().backward()))
    });
    g.finish();
}

criterion_group!(benches, moe, attention);
criterion_main!(benches);
