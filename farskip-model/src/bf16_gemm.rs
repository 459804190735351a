//! Products of many rows with a bf16 weight matrix (prefill and other long inputs with bf16 weights) through
//! AVX-512 BF16's `vdpbf16ps`, where the CPU has it.
//!
//! Without it a bf16 weight is widened to an f32 copy for burn's f32 matmul: the copy is written and read again
//! on every call, and the f32 multiply-adds do one product per lane. `vdpbf16ps` multiplies pairs of bf16
//! values and adds both products to an f32 lane: twice the products per instruction, reading the weight as
//! stored. The activations are rounded to bf16 for it (to nearest, ties to even), as PyTorch (oneDNN) and
//! llama.cpp do for bf16 weights; each product of two bf16 values is exact in f32 and the sums are f32.
//!
//! Layout: the rows of `x` are rounded once into pairs of bf16 along the depth (one `u32` per pair); the
//! weight is repacked 256 columns at a time into panels of 32 columns as pairs of rows (`[k / 2, 32]` pairs
//! each, 32 KiB for a depth of 512; the 256 columns' panels stay in L2 while every row block passes over
//! them); an 8 × 32 block of outputs stays in 16 registers over the whole depth.

use burn::tensor::bf16;

/// Rows of one register block.
#[cfg(target_arch = "x86_64")]
const MR: usize = 8;

/// Columns of one packed panel (two AVX-512 registers of f32).
#[cfg(target_arch = "x86_64")]
const NR: usize = 32;

/// Columns packed at a time: their panels (256 KiB for a depth of 512) stay in L2.
#[cfg(target_arch = "x86_64")]
const NB: usize = 256;

/// Rows ahead of the packing at which the weight is prefetched (the reads jump from row to row).
#[cfg(target_arch = "x86_64")]
const PACK_AHEAD: usize = 8;

/// Multiply-adds (`m · k · n`) from which [`matmul`] splits the rows over the rayon pool.
#[cfg(target_arch = "x86_64")]
const PAR_MIN_WORK: usize = 1 << 22;

/// Whether [`matmul`] runs here: the CPU has AVX-512F and AVX-512 BF16, and `FARSKIP_BF16_GEMM` is not `0`
/// (which turns it off: bf16 weights are then widened to f32 for burn's matmul, activations stay f32).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::env::var("FARSKIP_BF16_GEMM").map_or(true, |v| v != "0")
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `x · w` for `x` `[m, k]` (f32, rounded to bf16 for the products) and `w` `[k, n]` (bf16, row-major),
/// accumulated in f32; `None` where the CPU lacks AVX-512 BF16 (the caller widens the weight instead).
///
/// Large products split their rows over the rayon pool (inside a one-thread pool, a lane, they stay on it).
///
/// # Panics
/// If `x` is not `m · k` values or `w` not `k · n`.
pub fn matmul(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize) -> Option<Vec<f32>> {
    assert_eq!(x.len(), m * k, "bf16_gemm::matmul: x is not [m, k]");
    assert_eq!(w.len(), k * n, "bf16_gemm::matmul: w is not [k, n]");
    if !available() {
        return None;
    }
    if m == 0 || n == 0 || k == 0 {
        return Some(vec![0.0; m * n]);
    }
    #[cfg(target_arch = "x86_64")]
    {
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        let threads = rayon::current_num_threads();
        let spare = &mut out.spare_capacity_mut()[..m * n];
        if threads > 1 && m * k * n >= PAR_MIN_WORK && m >= 2 * MR {
            use rayon::prelude::*;
            // Row ranges of whole register blocks, one per thread.
            let rows = m.div_ceil(threads).div_ceil(MR) * MR;
            spare
                .par_chunks_mut(rows * n)
                .enumerate()
                .for_each(|(i, o)| {
                    let r0 = i * rows;
                    let r1 = (r0 + rows).min(m);
                    // SAFETY: `available()` checked AVX-512F and AVX-512 BF16; `o` holds `(r1 - r0) · n` values.
                    unsafe {
                        imp::matmul(&x[r0 * k..r1 * k], r1 - r0, k, w, n, o.as_mut_ptr().cast())
                    };
                });
        } else {
            // SAFETY: as above, `spare` holds `m · n` values.
            unsafe { imp::matmul(x, m, k, w, n, spare.as_mut_ptr().cast()) };
        }
        // SAFETY: `imp::matmul` wrote all `m · n` values.
        unsafe { out.set_len(m * n) };
        Some(out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::{MR, NB, NR, PACK_AHEAD};
    use burn::tensor::bf16;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    thread_local! {
        /// This thread's rounded rows and packed weight, kept between calls (no allocation, no zeroing, warm
        /// in the caches).
        static BUFFERS: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// `out = x · w` (`x` `[m, k]`, `w` `[k, n]`, `out` `[m, n]`, every value written).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16; `out` must be valid for writes of `m · n` f32 that
    /// nothing else accesses meanwhile.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn matmul(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[bf16],
        n: usize,
        out: *mut f32,
    ) {
        debug_assert!(x.len() == m * k && w.len() == k * n);
        let kp = k.div_ceil(2);
        BUFFERS.with_borrow_mut(|(xa, packed)| {
            // Every value of both buffers is written below before it is read.
            xa.resize(m * kp, 0);
            for (row, pairs) in x.chunks_exact(k).zip(xa.chunks_exact_mut(kp)) {
                round_row(row, pairs);
            }
            for cb in (0..n).step_by(NB) {
                let ncb = (n - cb).min(NB);
                let panels = ncb.div_ceil(NR);
                packed.resize(panels * kp * NR, 0);
                pack(&w[cb..], k, n, ncb, packed);
                for (panel, pp) in packed.chunks_exact(kp * NR).enumerate() {
                    let c0 = cb + panel * NR;
                    let nc = (n - c0).min(NR);
                    let mut r0 = 0;
                    while r0 < m {
                        let mr = (m - r0).min(MR);
                        let a = &xa[r0 * kp..(r0 + mr) * kp];
                        // SAFETY (of `add` and of the block's writes): rows `r0..r0 + mr` and columns
                        // `c0..c0 + nc` lie inside the `m · n` values the caller promised.
                        unsafe {
                            let o = out.add(r0 * n);
                            match mr {
                                8 => block::<8>(a, kp, pp, o, n, c0, nc),
                                7 => block::<7>(a, kp, pp, o, n, c0, nc),
                                6 => block::<6>(a, kp, pp, o, n, c0, nc),
                                5 => block::<5>(a, kp, pp, o, n, c0, nc),
                                4 => block::<4>(a, kp, pp, o, n, c0, nc),
                                3 => block::<3>(a, kp, pp, o, n, c0, nc),
                                2 => block::<2>(a, kp, pp, o, n, c0, nc),
                                _ => block::<1>(a, kp, pp, o, n, c0, nc),
                            }
                        }
                        r0 += mr;
                    }
                }
            }
        });
    }

    /// One row rounded to bf16, as pairs along the depth (`pairs.len() == row.len().div_ceil(2)`; an odd
    /// depth's last pair is padded with zero).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn round_row(row: &[f32], pairs: &mut [u32]) {
        let k = row.len();
        let mut j = 0;
        while j + 32 <= k {
            // SAFETY: `j + 32 <= k` values are read; `pairs` holds `k.div_ceil(2) >= j / 2 + 16` values.
            unsafe {
                let lo = _mm512_loadu_ps(row.as_ptr().add(j));
                let hi = _mm512_loadu_ps(row.as_ptr().add(j + 16));
                let b: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(pairs.as_mut_ptr().add(j / 2).cast(), b);
            }
            j += 32;
        }
        if j < k {
            let mut tail = [0.0f32; 32];
            tail[..k - j].copy_from_slice(&row[j..]);
            let mut packed = [0u32; 16];
            // SAFETY: the two local arrays hold 32 f32 and 16 u32.
            unsafe {
                let lo = _mm512_loadu_ps(tail.as_ptr());
                let hi = _mm512_loadu_ps(tail.as_ptr().add(16));
                let b: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(packed.as_mut_ptr().cast(), b);
            }
            let left = pairs.len() - j / 2;
            pairs[j / 2..].copy_from_slice(&packed[..left]);
        }
    }

    /// The first `nc` columns of `w` (`[k, n]` from its first value: `w` may start mid-row and end short of
    /// the last row's end) as panels of [`NR`] columns, each `[k / 2, NR]` pairs of rows: value `p · NR + c` of
    /// panel `i` holds `w[2p, i · NR + c]` in its low half and `w[2p + 1, i · NR + c]` in its high half;
    /// missing rows and columns are zero. Each row's `nc` values are read in order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn pack(w: &[bf16], k: usize, n: usize, nc: usize, packed: &mut [u32]) {
        let kp = k.div_ceil(2);
        let panels = nc.div_ceil(NR);
        debug_assert_eq!(packed.len(), panels * kp * NR);
        let bits = |v: bf16| v.to_bits() as u32;
        let full = nc / 16 * 16;
        let zeros = [bf16::ZERO; 16];
        for p in 0..kp {
            let r0 = &w[2 * p * n..2 * p * n + nc];
            let r1 = match 2 * p + 1 < k {
                true => &w[(2 * p + 1) * n..(2 * p + 1) * n + nc],
                false => &[][..],
            };
            for c in (0..full).step_by(16) {
                if c % 32 == 0 {
                    // The same columns [`PACK_AHEAD`] rows further down (a prefetch never faults).
                    let ahead = w
                        .as_ptr()
                        .wrapping_add((2 * p + PACK_AHEAD) * n + c)
                        .cast::<i8>();
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(2 * n));
                }
                let at = (c / NR) * kp * NR + p * NR + c % NR;
                let second = match r1.is_empty() {
                    true => zeros.as_ptr(),
                    // SAFETY (of `add`): `c + 16 <= nc`.
                    false => unsafe { r1.as_ptr().add(c) },
                };
                // SAFETY: 16 bf16 read from each row at `c` (`c + 16 <= nc`, or the local zeros), 16 u32
                // written at `at` (`c % NR <= NR - 16`: inside the panel's row `p`).
                unsafe {
                    let a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(r0.as_ptr().add(c).cast()));
                    let b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(second.cast()));
                    let pair = _mm512_or_si512(a, _mm512_slli_epi32::<16>(b));
                    _mm512_storeu_si512(packed.as_mut_ptr().add(at).cast(), pair);
                }
            }
            for c in full..panels * NR {
                packed[(c / NR) * kp * NR + p * NR + c % NR] = match c < nc {
                    true => bits(r0[c]) | r1.get(c).map_or(0, |&v| bits(v) << 16),
                    false => 0,
                };
            }
        }
    }

    /// Rows `0..R` of `a` (`[R, kp]` pairs) times the panel into columns `c0..c0 + nc` of `out` (row stride
    /// `n`).
    ///
    /// # Safety
    /// `out` must be valid for writes of columns `c0..c0 + nc` of rows `0..R` (row stride `n`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn block<const R: usize>(
        a: &[u32],
        kp: usize,
        panel: &[u32],
        out: *mut f32,
        n: usize,
        c0: usize,
        nc: usize,
    ) {
        assert!(a.len() >= R * kp && panel.len() >= kp * NR && nc <= NR);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (ap, pp) = (a.as_ptr(), panel.as_ptr());
        for p in 0..kp {
            // SAFETY: `p < kp`: the panel holds `kp * NR` values and `a` `R * kp` (asserted above).
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(pp.add(p * NR).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(pp.add(p * NR + 16).cast()));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*ap.add(r * kp + p) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
                }
            }
        }
        let lo = nc.min(16);
        let hi = nc - lo;
        let mask = |c: usize| ((1u32 << c) - 1) as __mmask16;
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: the masks cover `lo` values at column `c0` and `hi` at `c0 + 16` of row `r`, which the
            // caller promised writable.
            unsafe {
                let o = out.add(r * n + c0);
                _mm512_mask_storeu_ps(o, mask(lo), acc[0]);
                if hi > 0 {
                    _mm512_mask_storeu_ps(o.add(16), mask(hi), acc[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an f64 reference on the bf16-rounded inputs: odd depths, widths that are not a multiple of
    /// the panel, row counts that are not a multiple of the register block, and a product large enough to
    /// split over the pool.
    #[test]
    fn matmul_matches_a_f64_reference_on_rounded_inputs() {
        if !available() {
            eprintln!("no AVX-512 BF16 here: nothing to check");
            assert!(matmul(&[1.0], 1, 1, &[bf16::from_f32(1.0)], 1).is_none());
            return;
        }
        let mut seed = 11u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for (m, k, n) in [
            (1, 1, 1),
            (3, 37, 45),
            (8, 64, 32),
            (13, 513, 100),
            (64, 512, 1024),
            (200, 96, 33),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let w: Vec<bf16> = (0..k * n).map(|_| bf16::from_f32(next())).collect();
            let got = matmul(&x, m, k, &w, n).expect("available");
            let mut want = vec![0.0f64; m * n];
            for r in 0..m {
                for j in 0..k {
                    let a = bf16::from_f32(x[r * k + j]).to_f64();
                    for c in 0..n {
                        want[r * n + c] += a * w[j * n + c].to_f64();
                    }
                }
            }
            let got: Vec<f64> = got.iter().map(|&v| v as f64).collect();
            let diff = crate::compare::max_abs_diff(&got, &want);
            assert!(diff < 1e-4, "[{m}, {k}] x [{k}, {n}]: off by {diff}");
        }
    }
}
