//! Vectorisable `exp` for f32 (farskip-rs patch, see PATCHED.md).
//!
//! `f32::exp` is a libm call per element, which no loop can vectorise: softmax, SiLU/sigmoid and attention spent
//! most of their time in it. [`exp_f32`] is branch-free arithmetic (Cody–Waite range reduction and the Cephes
//! degree-6 polynomial, ≤ 2 ulp over the whole range, denormal results included), so loops over it vectorise;
//! the `*_f32` slice kernels below are compiled for the best instruction set available at run time (macerator's
//! dispatch, as the other kernels of this module).

#[cfg(feature = "simd")]
use macerator::Simd;

/// `e^x` for f32 without a libm call: `exp_f32(-inf) = 0`, `exp_f32(inf) = inf`, NaN stays NaN, results below
/// `f32::MIN_POSITIVE` underflow gradually to 0 and above `f32::MAX` overflow to infinity, as `f32::exp`.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    // ln 2 split in a part exact in few bits and the rest (Cody–Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to the nearest integer and leaves that integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // Beyond these `e^x` is 0 or infinite in f32; the clamp keeps the scale exponents below in range.
    // `clamp` keeps NaN.
    let xc = x.clamp(-104.0, 89.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // 2^n in two factors, each a normal float for n in [-150, 129], so denormal results and overflow come
    // out right.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let s1 = f32::from_bits(((n1 + 127) << 23) as u32);
    let s2 = f32::from_bits(((n2 + 127) << 23) as u32);
    y * s1 * s2
}

/// `1 / (1 + e^-x)`, as `e^x / (1 + e^x)` for negative `x` (so tiny results keep their bits), with a select
/// instead of a branch.
#[inline(always)]
pub fn sigmoid_f32(x: f32) -> f32 {
    let e = exp_f32(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 { s } else { e * s }
}

/// `out[i] = e^(input[i] - shift)`, returning the sum of the outputs (summed in 16 interleaved partial sums,
/// so the loop vectorises). `input` and `out` have equal lengths.
#[inline(always)]
pub fn exp_shifted_sum_f32(input: &[f32], out: &mut [f32], shift: f32) -> f32 {
    debug_assert_eq!(input.len(), out.len());
    const W: usize = 16;
    let mut acc = [0.0f32; W];
    let mut ins = input.chunks_exact(W);
    let mut outs = out.chunks_exact_mut(W);
    for (i, o) in (&mut ins).zip(&mut outs) {
        for k in 0..W {
            let e = exp_f32(i[k] - shift);
            o[k] = e;
            acc[k] += e;
        }
    }
    let mut sum = 0.0;
    for (&x, o) in ins.remainder().iter().zip(outs.into_remainder()) {
        let e = exp_f32(x - shift);
        *o = e;
        sum += e;
    }
    acc.iter().sum::<f32>() + sum
}

/// In place: `row[i] = e^(row[i] - shift)`, returning the sum (see [`exp_shifted_sum_f32`]).
#[inline(always)]
pub fn exp_shifted_sum_inplace_f32(row: &mut [f32], shift: f32) -> f32 {
    const W: usize = 16;
    let mut acc = [0.0f32; W];
    let mut chunks = row.chunks_exact_mut(W);
    for c in &mut chunks {
        for k in 0..W {
            let e = exp_f32(c[k] - shift);
            c[k] = e;
            acc[k] += e;
        }
    }
    let mut sum = 0.0;
    for x in chunks.into_remainder() {
        let e = exp_f32(*x - shift);
        *x = e;
        sum += e;
    }
    acc.iter().sum::<f32>() + sum
}

/// `a[i] = e^a[i]`, vectorised for the machine.
#[cfg(feature = "simd")]
#[macerator::with_simd]
pub fn exp_inplace_f32<S: Simd>(a: &mut [f32]) {
    for x in a.iter_mut() {
        *x = exp_f32(*x);
    }
}

/// `a[i] = 1 / (1 + e^-a[i])`, vectorised for the machine.
#[cfg(feature = "simd")]
#[macerator::with_simd]
pub fn sigmoid_inplace_f32<S: Simd>(a: &mut [f32]) {
    for x in a.iter_mut() {
        *x = sigmoid_f32(*x);
    }
}

/// [`exp_shifted_sum_inplace_f32`] compiled for the machine.
#[cfg(feature = "simd")]
#[macerator::with_simd]
pub fn exp_shifted_sum_row_f32<S: Simd>(row: &mut [f32], shift: f32) -> f32 {
    exp_shifted_sum_inplace_f32(row, shift)
}

/// `a[i] = e^a[i]` (no `simd` feature: the loop as the compiler vectorises it for the build target).
#[cfg(not(feature = "simd"))]
pub fn exp_inplace_f32(a: &mut [f32]) {
    for x in a.iter_mut() {
        *x = exp_f32(*x);
    }
}

/// `a[i] = 1 / (1 + e^-a[i])` (no `simd` feature).
#[cfg(not(feature = "simd"))]
pub fn sigmoid_inplace_f32(a: &mut [f32]) {
    for x in a.iter_mut() {
        *x = sigmoid_f32(*x);
    }
}

/// [`exp_shifted_sum_inplace_f32`] (no `simd` feature).
#[cfg(not(feature = "simd"))]
pub fn exp_shifted_sum_row_f32(row: &mut [f32], shift: f32) -> f32 {
    exp_shifted_sum_inplace_f32(row, shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn ulps(a: f32, b: f32) -> u32 {
        if a == b {
            return 0;
        }
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn matches_libm_within_two_ulp() {
        let mut worst = 0;
        let mut x = -103.0f32;
        while x < 88.7 {
            let (got, want) = (exp_f32(x), x.exp());
            // Denormal results have fewer bits; compare those absolutely.
            if want >= f32::MIN_POSITIVE {
                worst = worst.max(ulps(got, want));
            } else {
                assert!((got - want).abs() <= 2.0 * f32::from_bits(1), "{x}: {got} vs {want}");
            }
            x += 0.000_731;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn special_values() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(88.72).is_finite());
        assert_eq!(sigmoid_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(sigmoid_f32(f32::INFINITY), 1.0);
        assert_eq!(sigmoid_f32(-200.0), 0.0);
        assert_eq!(sigmoid_f32(200.0), 1.0);
    }

    #[test]
    fn slice_kernels_match_scalar() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let mut a = xs.clone();
        exp_inplace_f32(&mut a);
        let mut s = xs.clone();
        sigmoid_inplace_f32(&mut s);
        for (i, &x) in xs.iter().enumerate() {
            assert_eq!(a[i], exp_f32(x));
            assert_eq!(s[i], sigmoid_f32(x));
        }
        let mut row = xs.clone();
        let sum = exp_shifted_sum_row_f32(&mut row, 3.0);
        let want: f64 = xs.iter().map(|&x| ((x - 3.0) as f64).exp()).sum();
        assert!(((sum as f64) - want).abs() / want < 1e-5, "{sum} vs {want}");
    }
}
