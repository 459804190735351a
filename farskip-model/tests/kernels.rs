//! The CPU kernels the models lean on, checked against f64 references: exp, sigmoid/SiLU, softmax and the fused
//! attention kernel (its small-shape and tiled paths, causal and masked). They matter because the vendored
//! burn-flex replaces libm's `expf` with a vectorised polynomial (vendor/burn-flex/PATCHED.md). The last tests
//! check the vendored multi-threaded paths of the memory-bound kernels (elementwise ops, `select` scatter-add,
//! zero buffers), which only start above 128–256 K elements, against the same arithmetic done on the host.

use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

mod common;

use common::{max_abs, values};

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
        let worst = max_abs(&got, &want);
        assert!(
            worst < 2e-5,
            "seq_q {seq_q} seq_kv {seq_kv} masked {masked}: max diff {worst:e}"
        );
    }
}

/// Deterministic values in [-1, 1] (not burn's RNG, which parallel tests share).
fn ramp(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn tensor2(v: &[f32], shape: [usize; 2]) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), &Device::flex())
}

#[test]
fn large_elementwise_ops_split_across_threads_equal_the_serial_arithmetic() {
    // 720 × 400 = 288 000 elements: above the size (256 K) where flex splits elementwise work across threads.
    let (r, c) = (720, 400);
    let (a, b, m) = (ramp(r * c, 1), ramp(c, 2), ramp(r * c, 3));
    let ta = tensor2(&a, [r, c]);
    let tb = tensor2(&b, [1, c]);
    let tm = tensor2(&m, [c, r]);

    // Shared operands: the allocating loop nest, with a broadcast row.
    let sum = values(ta.clone() + tb.clone());
    // A strided (transposed) operand.
    let prod = values(ta.clone() * tm.clone().transpose());
    // A uniquely owned left operand: written in place.
    let diff = values(ta.clone().mul_scalar(2.0) - tb.clone());
    // Contiguous, same shape: the SIMD in-place kernels.
    let quot = values(ta.clone().add_scalar(3.0) / tm.clone().reshape([r, c]));
    let exp = values(ta.clone().mul_scalar(4.0).exp());
    for i in 0..r {
        for j in 0..c {
            let k = i * c + j;
            assert_eq!(sum[k], (a[k] + b[j]) as f64, "add at {k}");
            assert_eq!(prod[k], (a[k] * m[j * r + i]) as f64, "mul at {k}");
            assert_eq!(diff[k], (a[k] * 2.0 - b[j]) as f64, "sub at {k}");
            assert_eq!(quot[k], ((a[k] + 3.0) / m[k]) as f64, "div at {k}");
            let want = ((a[k] * 4.0) as f64).exp();
            assert!((exp[k] - want).abs() <= 3e-7 * want, "exp at {k}");
        }
    }
}

#[test]
fn large_select_add_with_repeated_indices_equals_the_serial_scatter() {
    // 48 updates of 4096-wide rows into 16 rows, each row hit several times (as the backward of an expert
    // weight gather is), plus a 2-wide case whose columns cannot be split.
    for (rows, cols, n) in [(16, 4096, 48), (70_000, 2, 70_000)] {
        let base = ramp(rows * cols, 5);
        let upd = ramp(n * cols, 6);
        let idx: Vec<i64> = (0..n).map(|i| ((i * 7 + i / 3) % rows) as i64).collect();
        let got = values(tensor2(&base, [rows, cols]).select_assign(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(idx.clone(), [n]), &Device::flex()),
            tensor2(&upd, [n, cols]),
            IndexingUpdateOp::Add,
        ));
        let mut want = base.clone();
        for (i, &row) in idx.iter().enumerate() {
            for j in 0..cols {
                want[row as usize * cols + j] += upd[i * cols + j];
            }
        }
        for (k, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w as f64, "[{rows}, {cols}] element {k}");
        }
    }
}

#[test]
fn large_zero_buffers_are_zero_after_the_heap_held_other_data() {
    for _ in 0..3 {
        let junk = Tensor::<2>::ones([1024, 1024], &Device::flex()).mul_scalar(7.0);
        assert_eq!(values(junk.sum())[0], 7.0 * 1024.0 * 1024.0);
        let zeros = values(Tensor::<2>::zeros([1024, 1024], &Device::flex()));
        assert!(zeros.iter().all(|&z| z == 0.0));
    }
}
