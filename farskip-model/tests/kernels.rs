//! The CPU kernels the models lean on, checked against f64 references: exp, sigmoid/SiLU, softmax and the fused
//! attention kernel (its small-shape and tiled paths, causal and masked). They matter because the vendored
//! burn-flex replaces libm's `expf` with a vectorised polynomial (vendor/burn-flex/PATCHED.md).

use burn::prelude::*;
use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

mod common;

use common::values;

/// Inputs over the whole f32 range of exp, including its edges and special values.
fn exp_inputs() -> Vec<f32> {
    let mut xs: Vec<f32> = (0..20_000).map(|i| -103.0 + i as f32 * 0.009_6).collect();
    xs.extend([
        0.0,
        -0.0,
        1e-8,
        -1e-8,
        88.72,
        -87.3,
        -103.9,
        -200.0,
        200.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ]);
    xs
}

#[test]
fn exp_is_within_a_few_ulp_of_f64_over_the_whole_range() {
    let xs = exp_inputs();
    let got = values(Tensor::<1>::from_floats(xs.as_slice(), &Device::flex()).exp());
    for (&x, &g) in xs.iter().zip(&got) {
        let want = (x as f64).exp();
        if want > f32::MAX as f64 {
            assert_eq!(g, f64::INFINITY, "exp({x})");
        } else if want >= f32::MIN_POSITIVE as f64 {
            let rel = (g - want).abs() / want;
            assert!(rel < 3e-7, "exp({x}) = {g}, want {want} (rel {rel:e})");
        } else {
            // Denormal results carry fewer bits.
            assert!((g - want).abs() < 3e-45, "exp({x}) = {g}, want {want}");
        }
    }
    let nan = values(Tensor::<1>::from_floats([f32::NAN], &Device::flex()).exp());
    assert!(nan[0].is_nan());
}

#[test]
fn exp_of_a_strided_view_equals_exp_of_its_copy() {
    let device = Device::flex();
    let x = Tensor::<2>::random(
        [6, 10],
        burn::tensor::Distribution::Normal(0.0, 3.0),
        &device,
    );
    let view = x.clone().narrow(1, 2, 5);
    let copy = Tensor::<2>::from_data(view.clone().into_data(), &device);
    assert_eq!(view.exp().into_data(), copy.exp().into_data());
    // The source is unchanged (the kernel runs in place only on a tensor nobody else holds).
    assert_eq!(
        x.clone().into_data(),
        Tensor::<2>::from_data(x.into_data(), &device).into_data()
    );
}

#[test]
fn sigmoid_and_silu_match_f64() {
    let xs: Vec<f32> = (0..4001).map(|i| -100.0 + i as f32 * 0.05).collect();
    let t = Tensor::<1>::from_floats(xs.as_slice(), &Device::flex());
    let s = values(sigmoid(t.clone()));
    let u = values(silu(t));
    for (i, &x) in xs.iter().enumerate() {
        let x64 = x as f64;
        let want = 1.0 / (1.0 + (-x64).exp());
        assert!(
            (s[i] - want).abs() <= 5e-7 * want + 1e-44,
            "sigmoid({x}) = {}, want {want}",
            s[i]
        );
        let want_silu = x64 * want;
        assert!(
            (u[i] - want_silu).abs() <= 6e-7 * want_silu.abs() + 1e-43,
            "silu({x}) = {}, want {want_silu}",
            u[i]
        );
    }
    let ends = values(sigmoid(Tensor::<1>::from_floats(
        [f32::NEG_INFINITY, f32::INFINITY],
        &Device::flex(),
    )));
    assert_eq!(ends, vec![0.0, 1.0]);
}

#[test]
fn softmax_matches_f64_and_sums_to_one() {
    let device = Device::flex();
    for cols in [1usize, 7, 16, 33, 512] {
        let x = Tensor::<2>::random(
            [5, cols],
            burn::tensor::Distribution::Normal(0.0, 4.0),
            &device,
        );
        let xs = values(x.clone());
        let got = values(softmax(x, 1));
        for r in 0..5 {
            let row = &xs[r * cols..(r + 1) * cols];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f64 = row.iter().map(|&v| (v - max).exp()).sum();
            for c in 0..cols {
                let want = (row[c] - max).exp() / sum;
                let g = got[r * cols + c];
                assert!((g - want).abs() < 1e-6, "row {r} col {c}: {g} vs {want}");
            }
        }
    }
}

/// Softmax attention in f64 for one `[seq_q, d] × [seq_kv, d]` head; `hidden(i, j)` masks key `j` for query `i`.
fn reference_head(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    (seq_q, seq_kv, d): (usize, usize, usize),
    scale: f64,
    hidden: impl Fn(usize, usize) -> bool,
) -> Vec<f64> {
    let mut out = vec![0.0; seq_q * d];
    for i in 0..seq_q {
        let scores: Vec<f64> = (0..seq_kv)
            .map(|j| match hidden(i, j) {
                true => f64::NEG_INFINITY,
                false => (0..d).map(|x| q[i * d + x] * k[j * d + x]).sum::<f64>() * scale,
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = w.iter().sum();
        for j in 0..seq_kv {
            for x in 0..d {
                out[i * d + x] += w[j] / sum * v[j * d + x];
            }
        }
    }
    out
}

/// The fused kernel against the f64 reference: `seq_q × seq_kv` above 256 K elements takes flex's tiled path,
/// below it the one-tile path; `seq_q < seq_kv` is a query block over a longer key prefix (as the model's
/// query blocks and KV-cache decoding call it).
#[test]
fn fused_attention_matches_f64_causal_and_masked() {
    let device = Device::flex();
    let d = 16;
    for (seq_q, seq_kv, masked) in [
        (40, 40, false),
        (24, 70, false),
        (600, 600, false),
        (300, 900, false),
        (40, 40, true),
        (520, 520, true),
    ] {
        let rnd = |n: usize| {
            Tensor::<4>::random(
                [1, 1, n, d],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device,
            )
        };
        let (q, k, v) = (rnd(seq_q), rnd(seq_kv), rnd(seq_kv));
        let offset = seq_kv - seq_q;
        // The masked case: a sliding window of 7 keys (not causal-only), given as a bool mask.
        let hidden = |i: usize, j: usize| {
            let i = i + offset;
            j > i || (masked && j + 7 <= i)
        };
        let mask = masked.then(|| {
            let m: Vec<bool> = (0..seq_q)
                .flat_map(|i| (0..seq_kv).map(move |j| hidden(i, j)))
                .collect();
            Tensor::<4, Bool>::from_data(TensorData::new(m, [1, 1, seq_q, seq_kv]), &device)
        });
        let scale = 0.25;
        let options = AttentionModuleOptions {
            scale: Some(scale),
            softcap: None,
            is_causal: !masked,
        };
        let want = reference_head(
            &values(q.clone()),
            &values(k.clone()),
            &values(v.clone()),
            (seq_q, seq_kv, d),
            scale,
            hidden,
        );
        let got = values(attention(q, k, v, mask, None, options));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g - w).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 2e-5,
            "seq_q {seq_q} seq_kv {seq_kv} masked {masked}: max diff {worst:e}"
        );
    }
}
