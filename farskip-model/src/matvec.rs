//! Products of a few rows with a weight matrix — batch-1 decoding — on flex, reading the weights in place in
//! their stored dtype (f32 or bf16) and accumulating in f32; and [`linear`], the one entry point every
//! projection of the model goes through.
//!
//! A decode step multiplies one row by every weight matrix it touches, so it is bound by reading the weights
//! from memory. gemm's one-row path spent ~45 % of a decode step (perf, `bench --decode`) and bf16 weights
//! would first be widened to a full f32 copy (burn-flex's bf16 matmul converts both operands, then rounds the
//! product to bf16). Here each weight row is streamed once, widened in registers (the same speed as gemm's
//! one-row path for f32, half the bytes for bf16), on the calling thread.
//!
//! Longer inputs (prefill, training) keep burn's matmul; a bf16 weight is then widened to f32 for the call
//! (one copy of that matrix, freed after it): accumulation in f32 on the bf16 values, as PyTorch does on CPU.

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType, bf16};
use burn_flex::{Flex, FlexTensor};

/// Rows up to which [`linear`] and the expert bank use these kernels instead of gemm.
pub const MAX_ROWS: usize = 4;

/// Columns per tile: a tile of `k` weight rows stays in L2 while each input row passes over it.
const TILE_COLS: usize = 4096;

/// A weight matrix `[k, n]`, row-major, as stored.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values, widened to f32 as they are read.
    Bf16(&'a [bf16]),
}

impl<'a> Weights<'a> {
    /// The contiguous storage of a plain flex tensor, or `None` (another device, autodiff, a strided view, a
    /// dtype other than f32/bf16).
    pub fn of(t: &'a FlexTensor) -> Option<Self> {
        match t.dtype() {
            DType::F32 => t.as_slice::<f32>().map(Weights::F32),
            DType::BF16 => t.as_slice::<bf16>().map(Weights::Bf16),
            _ => None,
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
        }
    }

    /// Whether no element is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `start..start + len`.
    pub fn range(&self, start: usize, len: usize) -> Self {
        match self {
            Weights::F32(w) => Weights::F32(&w[start..start + len]),
            Weights::Bf16(w) => Weights::Bf16(&w[start..start + len]),
        }
    }
}

/// The flex primitive of a plain (not autodiff) flex tensor, `None` on any other device.
pub fn flex_primitive<const D: usize>(t: &Tensor<D>) -> Option<FlexTensor> {
    t.clone().try_into_primitive::<Flex>().ok()
}

/// `x`'s values as contiguous f32 when it is a plain flex f32 tensor.
fn host_f32<const D: usize>(x: &Tensor<D>) -> Option<Vec<f32>> {
    let p = flex_primitive(x)?;
    if p.dtype() != DType::F32 {
        return None;
    }
    match p.as_slice::<f32>() {
        Some(s) => Some(s.to_vec()),
        None => p.to_contiguous().as_slice::<f32>().map(<[f32]>::to_vec),
    }
}

/// `x · W + b` for a burn [`Linear`] (weight `[in, out]`, f32 or bf16; bias f32).
///
/// Up to [`MAX_ROWS`] rows on flex run through [`rows_times`]; otherwise burn's matmul, on a widened copy of a
/// bf16 weight.
///
/// # Shapes
/// - `x`: `[..., in]` -> `[..., out]`
pub fn linear<const D: usize>(lin: &Linear, x: Tensor<D>) -> Tensor<D> {
    let w = lin.weight.val();
    let bias = lin.bias.as_ref().map(|b| b.val());
    if let Some(y) = small_product(&x, &w) {
        return match bias {
            Some(b) => y + b.unsqueeze(),
            None => y,
        };
    }
    burn::tensor::module::linear(x, widened(w), bias)
}

/// `w` in f32: itself, or a widened copy of a bf16 / f16 weight.
pub fn widened<const D: usize>(w: Tensor<D>) -> Tensor<D> {
    match w.dtype() {
        DType::F32 => w,
        _ => w.cast(FloatDType::F32),
    }
}

/// `x · w` through [`rows_times`] when `x` has at most [`MAX_ROWS`] rows and both live on flex; else `None`.
///
/// # Shapes
/// - `x`: `[..., k]`; `w`: `[k, n]` -> `[..., n]`
pub fn small_product<const D: usize>(x: &Tensor<D>, w: &Tensor<2>) -> Option<Tensor<D>> {
    let dims = x.dims();
    let k = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    if rows == 0 || rows > MAX_ROWS {
        return None;
    }
    let [wk, n] = w.dims();
    if wk != k {
        return None;
    }
    let wp = flex_primitive(w)?;
    let weights = Weights::of(&wp)?;
    let xs = host_f32(x)?;
    let out = rows_times(&xs, rows, weights, k, n);
    let mut out_dims = dims;
    out_dims[D - 1] = n;
    Some(Tensor::from_data(
        TensorData::new(out, out_dims),
        &x.device(),
    ))
}

/// `out[r, :] = Σ_j x[r, j] · w[j, :]` for `rows` rows of `x` (`[rows, k]`), `w` `[k, n]`, in f32, on the
/// calling thread.
///
/// Not split over threads: a decode step makes ~70 of these products of 0.1–4 MB each, and handing each to
/// the rayon pool cost more than it saved on a 2-core machine that is also busy with other work (measured:
/// 66 tok/s split over two threads against 124 on one, f32, `bench --decode 128`, load average 5).
pub fn rows_times(x: &[f32], rows: usize, w: Weights<'_>, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "rows_times: x is not [rows, k]");
    assert_eq!(w.len(), k * n, "rows_times: w is not [k, n]");
    let mut out = vec![0.0; rows * n];
    columns(x, rows, w, k, n, 0, n, &mut out);
    out
}

/// Columns `c0..c1` of `x · w` into `out` (`[rows, c1 - c0]`), compiled for the widest vector unit found at
/// run time.
#[allow(clippy::too_many_arguments)]
fn columns(
    x: &[f32],
    rows: usize,
    w: Weights<'_>,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let fma = std::arch::is_x86_feature_detected!("fma");
        if fma && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F and FMA (checked just above); the function is safe code otherwise.
            unsafe { columns_avx512(x, rows, w, k, n, c0, c1, out) };
            return;
        }
        if fma && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { columns_avx2(x, rows, w, k, n, c0, c1, out) };
            return;
        }
    }
    columns_portable::<false>(x, rows, w, k, n, c0, c1, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
fn columns_avx512(
    x: &[f32],
    rows: usize,
    w: Weights<'_>,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: &mut [f32],
) {
    columns_portable::<true>(x, rows, w, k, n, c0, c1, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn columns_avx2(
    x: &[f32],
    rows: usize,
    w: Weights<'_>,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: &mut [f32],
) {
    columns_portable::<true>(x, rows, w, k, n, c0, c1, out)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn columns_portable<const FMA: bool>(
    x: &[f32],
    rows: usize,
    w: Weights<'_>,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: &mut [f32],
) {
    match w {
        Weights::F32(w) => tiles::<f32, FMA>(x, rows, w, k, n, c0, c1, out),
        Weights::Bf16(w) => tiles::<bf16, FMA>(x, rows, w, k, n, c0, c1, out),
    }
}

/// A stored weight element, widened to f32.
trait Widen: Copy {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tiles<W: Widen, const FMA: bool>(
    x: &[f32],
    rows: usize,
    w: &[W],
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: &mut [f32],
) {
    let cw = c1 - c0;
    let mut t0 = c0;
    while t0 < c1 {
        let t1 = (t0 + TILE_COLS).min(c1);
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            let o = &mut out[r * cw + (t0 - c0)..r * cw + (t1 - c0)];
            tile_row::<W, FMA>(xr, w, n, t0, o);
        }
        t0 = t1;
    }
}

/// `o += Σ_j xr[j] · w[j, t0..t0 + o.len()]`, one weight row per pass over `o` (a single sequential stream
/// of weights: faster than passes over two or four rows at once, measured on the decode step), with fused
/// multiply-adds where the caller was compiled with them.
#[inline(always)]
fn tile_row<W: Widen, const FMA: bool>(xr: &[f32], w: &[W], n: usize, t0: usize, o: &mut [f32]) {
    let width = o.len();
    for (j, &a) in xr.iter().enumerate() {
        let wj = &w[j * n + t0..j * n + t0 + width];
        for (o, &wv) in o.iter_mut().zip(wj) {
            *o = match FMA {
                true => a.mul_add(wv.widen(), *o),
                false => *o + a * wv.widen(),
            };
        }
    }
}

/// SwiGLU experts on a few rows: `silu(x · gate) ⊙ (x · up) · down` for each `(expert, rows)` segment, the
/// segments' rows consecutive in `x` (`[rows, hidden]`). `gate_up` is the stacked bank `[E, hidden, 2·inter]`
/// (gate columns first), `down` `[E, inter, hidden]`.
pub fn expert_rows(
    x: &[f32],
    segments: &[(usize, usize)],
    gate_up: Weights<'_>,
    down: Weights<'_>,
    hidden: usize,
    inter: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    let mut row = 0;
    for &(e, c) in segments {
        if c == 0 {
            continue;
        }
        let xs = &x[row * hidden..(row + c) * hidden];
        let gu = gate_up.range(e * hidden * 2 * inter, hidden * 2 * inter);
        let h = rows_times(xs, c, gu, hidden, 2 * inter);
        let mut a = Vec::with_capacity(c * inter);
        for r in 0..c {
            let hr = &h[r * 2 * inter..(r + 1) * 2 * inter];
            let (g, u) = hr.split_at(inter);
            a.extend(g.iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u));
        }
        let dn = down.range(e * inter * hidden, inter * hidden);
        out.extend(rows_times(&a, c, dn, inter, hidden));
        row += c;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn reference(x: &[f32], rows: usize, w: &[f32], k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; rows * n];
        for r in 0..rows {
            for j in 0..k {
                for c in 0..n {
                    out[r * n + c] += x[r * k + j] as f64 * w[j * n + c] as f64;
                }
            }
        }
        out
    }

    /// f32 and bf16 weights, odd widths and depths, one to four rows.
    #[test]
    fn rows_times_matches_a_f64_reference() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for (rows, k, n) in [
            (1, 512, 1024),
            (3, 37, 1000),
            (4, 513, 77),
            (1, 1, 1),
            (2, 1024, 512),
        ] {
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wb_f32: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            for (got, want) in [
                (
                    rows_times(&x, rows, Weights::F32(&w), k, n),
                    reference(&x, rows, &w, k, n),
                ),
                (
                    rows_times(&x, rows, Weights::Bf16(&wb), k, n),
                    reference(&x, rows, &wb_f32, k, n),
                ),
            ] {
                let got: Vec<f64> = got.iter().map(|&v| v as f64).collect();
                let diff = crate::compare::max_abs_diff(&got, &want);
                assert!(diff < 1e-4, "[{rows}, {k}] x [{k}, {n}]: off by {diff}");
            }
        }
    }

    /// `linear` on one row (the kernels) and on many rows (burn's matmul) against burn's `Linear`, with a bf16
    /// weight against the same weight widened.
    #[test]
    fn linear_matches_burn_for_f32_and_bf16_weights() {
        let device = Device::flex();
        let mut lin = burn::nn::LinearConfig::new(96, 200).init(&device);
        for rows in [1, 3, 9] {
            let x = Tensor::<3>::random([1, rows, 96], Distribution::Normal(0.0, 1.0), &device);
            let want = lin.forward(x.clone());
            let diff = crate::compare::max_abs_diff_tensors(linear(&lin, x), want);
            assert!(diff < 1e-5, "{rows} rows, f32: off by {diff}");
        }
        let w = lin.weight.val();
        let bf = w.clone().cast(FloatDType::BF16);
        let wide = bf.clone().cast(FloatDType::F32);
        lin.weight = burn::module::Param::from_tensor(bf);
        let mut wide_lin = lin.clone();
        wide_lin.weight = burn::module::Param::from_tensor(wide);
        for rows in [1, 9] {
            let x = Tensor::<2>::random([rows, 96], Distribution::Normal(0.0, 1.0), &device);
            let want = wide_lin.forward(x.clone());
            let got = linear(&lin, x);
            assert_eq!(got.dtype(), DType::F32);
            let diff = crate::compare::max_abs_diff_tensors(got, want);
            assert!(diff < 1e-5, "{rows} rows, bf16: off by {diff}");
        }
    }
}
