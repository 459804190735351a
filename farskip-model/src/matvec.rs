//! Products of a few rows with a weight matrix — batch-1 decoding — on flex, reading the weights in place in
//! their stored dtype (f32 or bf16) and accumulating in f32; and [`linear`], the one entry point every
//! projection of the model goes through.
//!
//! A decode step multiplies one row by every weight matrix it touches, so it is bound by reading the weights
//! from memory. gemm's one-row path spent ~45 % of a decode step (perf, `bench --decode`) and bf16 weights
//! would first be widened to a full f32 copy (burn-flex's bf16 matmul converts both operands, then rounds the
//! product to bf16). Here each weight row is streamed once, widened in registers (the same speed as gemm's
//! one-row path for f32, half the bytes for bf16); larger batches of products are cut by depth between the
//! calling thread and one helper thread ([`products`], [`pair`]).
//!
//! Longer inputs (prefill, training) keep burn's matmul, except that a bf16 weight goes through
//! [`crate::bf16_gemm`] where the CPU has AVX-512 BF16 (activations rounded to bf16, f32 accumulation, as
//! PyTorch does on CPU); elsewhere it is widened to f32 for the call (one copy of that matrix, freed after
//! it) and the products run in f32 on the bf16 values.

use burn::nn::{Linear, RmsNorm};
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
pub fn host_f32<const D: usize>(x: &Tensor<D>) -> Option<Vec<f32>> {
    let p = flex_primitive(x)?;
    if p.dtype() != DType::F32 {
        return None;
    }
    match p.as_slice::<f32>() {
        Some(s) => Some(s.to_vec()),
        None => p.to_contiguous().as_slice::<f32>().map(<[f32]>::to_vec),
    }
}

/// `x` normalised by `norm` (burn's `RmsNorm`: `x / sqrt(mean(x²) + eps) · gamma` over the last dim); up to
/// [`MAX_ROWS`] rows of plain flex f32 on the host (one read, one tensor out, instead of burn's seven ops),
/// otherwise `norm.forward(x)`.
pub fn rms_norm<const D: usize>(norm: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    if rows == 0 || rows > MAX_ROWS || x.is_autodiff() || norm.gamma.is_autodiff() {
        return norm.forward(x);
    }
    match (host_f32(&x), host_f32(&norm.gamma.val())) {
        (Some(mut v), Some(gamma)) if gamma.len() == dims[D - 1] => {
            rms_norm_rows(&mut v, &gamma, norm.epsilon);
            Tensor::from_data(TensorData::new(v, dims), &x.device())
        }
        _ => norm.forward(x),
    }
}

/// [`rms_norm`] in place on host rows of `gamma.len()` values each.
pub fn rms_norm_rows(x: &mut [f32], gamma: &[f32], eps: f64) {
    let d = gamma.len();
    for row in x.chunks_mut(d) {
        let mean = row.iter().map(|&v| v * v).sum::<f32>() / d as f32;
        let rms = (mean + eps as f32).sqrt();
        row.iter_mut()
            .zip(gamma)
            .for_each(|(v, &g)| *v = *v / rms * g);
    }
}

/// `x · W + b` for a burn [`Linear`] (weight `[in, out]`, f32 or bf16; bias f32).
///
/// Up to [`MAX_ROWS`] rows on flex run through [`rows_times`]; more rows with a bf16 weight through
/// [`bf16_product`] where the CPU has AVX-512 BF16; otherwise burn's matmul, on a widened copy of a bf16
/// weight.
///
/// # Shapes
/// - `x`: `[..., in]` -> `[..., out]`
pub fn linear<const D: usize>(lin: &Linear, x: Tensor<D>) -> Tensor<D> {
    let w = lin.weight.val();
    let bias = lin.bias.as_ref().map(|b| b.val());
    if let Some(y) = small_product(&x, &w).or_else(|| bf16_product(&x, &w)) {
        return match bias {
            Some(b) => y + b.unsqueeze(),
            None => y,
        };
    }
    burn::tensor::module::linear(x, widened(w), bias)
}

/// `w` in f32: itself, or a widened copy of a bf16 / f16 weight.
///
/// A plain flex bf16 tensor whose values are one contiguous run (a whole weight, or one expert of the stacked
/// bank) is widened straight from its storage in one pass; burn-flex's cast first copies a view into a
/// contiguous tensor of its own and then converts it element by element. The values are the same (widening
/// bf16 to f32 is exact).
pub fn widened<const D: usize>(w: Tensor<D>) -> Tensor<D> {
    match w.dtype() {
        DType::F32 => w,
        DType::BF16 => match flex_primitive(&w)
            .as_ref()
            .and_then(|p| p.as_slice::<bf16>())
        {
            Some(s) => Tensor::from_data(TensorData::new(widen_bf16(s), w.dims()), &w.device()),
            None => w.cast(FloatDType::F32),
        },
        _ => w.cast(FloatDType::F32),
    }
}

/// bf16 values widened to f32 (exact: the bf16 bits are the top half of the f32's).
pub fn widen_bf16(s: &[bf16]) -> Vec<f32> {
    s.iter()
        .map(|v| f32::from_bits((v.to_bits() as u32) << 16))
        .collect()
}

/// `x · w` through [`crate::bf16_gemm`] when `w` is a plain flex bf16 weight, `x` plain flex f32 and the CPU
/// has AVX-512 BF16 (the activations rounded to bf16 for the products); else `None`.
///
/// # Shapes
/// - `x`: `[..., k]`; `w`: `[k, n]` -> `[..., n]`
pub fn bf16_product<const D: usize>(x: &Tensor<D>, w: &Tensor<2>) -> Option<Tensor<D>> {
    if w.dtype() != DType::BF16 || !crate::bf16_gemm::available() {
        return None;
    }
    let dims = x.dims();
    let k = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let [wk, n] = w.dims();
    if wk != k {
        return None;
    }
    let wp = flex_primitive(w)?;
    let ws = wp.as_slice::<bf16>()?;
    let xs = host_f32(x)?;
    let out = crate::bf16_gemm::matmul(&xs, rows, k, ws, n)?;
    let mut out_dims = dims;
    out_dims[D - 1] = n;
    Some(Tensor::from_data(
        TensorData::new(out, out_dims),
        &x.device(),
    ))
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

/// `out[r, :] = Σ_j x[r, j] · w[j, :]` for `rows` rows of `x` (`[rows, k]`), `w` `[k, n]`, in f32.
///
/// Large enough products are split by depth between the calling thread and the decode helper thread (see
/// [`products`]).
pub fn rows_times(x: &[f32], rows: usize, w: Weights<'_>, k: usize, n: usize) -> Vec<f32> {
    products(&[Product { x, rows, w, k, n }]).remove(0)
}

/// One product of [`products`]: `x` (`[rows, k]`) times `w` (`[k, n]`).
#[derive(Clone, Copy, Debug)]
pub struct Product<'a> {
    /// `[rows, k]`, row-major.
    pub x: &'a [f32],
    /// Rows of `x`.
    pub rows: usize,
    /// `[k, n]`.
    pub w: Weights<'a>,
    /// Depth.
    pub k: usize,
    /// Output columns.
    pub n: usize,
}

/// Weight elements (summed over a batch of products) from which [`products`] splits the work with the helper
/// thread: below it the hand-off costs more than it saves.
const SPLIT_MIN_ELEMENTS: usize = 1 << 16;

/// Several independent products at once (e.g. the q/k/v projections of one position), each `[rows, n]`.
///
/// Batches of at least `SPLIT_MIN_ELEMENTS` weights are cut by depth: the first half of each weight's rows
/// is summed on the calling thread, the second half on the helper thread ([`pair`]), one hand-off for the
/// whole batch, and the two partial sums are added. Each thread then streams one contiguous half of every
/// matrix; cutting by columns instead (each thread reading half of every row) ran slower on two threads than
/// one thread on the whole product. Without the helper (one thread, or a busy machine) the caller computes
/// both halves itself, so the result is the same whatever the thread count.
pub fn products(list: &[Product<'_>]) -> Vec<Vec<f32>> {
    for p in list {
        assert_eq!(p.x.len(), p.rows * p.k, "products: x is not [rows, k]");
        assert_eq!(p.w.len(), p.k * p.n, "products: w is not [k, n]");
    }
    let mut outs: Vec<Vec<f32>> = list.iter().map(|p| vec![0.0; p.rows * p.n]).collect();
    let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    let run = |half: usize, halves: usize| {
        for (p, o) in list.iter().zip(&ptrs) {
            let (c0, c1) = half_columns(p.n, half, halves);
            if c0 < c1 {
                // SAFETY: `o` points at `outs[i]` (`[rows, n]`, alive until `products` returns); the halves
                // write disjoint column ranges of it.
                unsafe { columns(p.x, p.rows, p.w, p.k, p.n, c0, c1, o.0) };
            }
        }
    };
    let elements: usize = list.iter().map(|p| p.k * p.n).sum();
    if elements < SPLIT_MIN_ELEMENTS {
        run(0, 1);
        return outs;
    }
    // Split by depth: the first half of the rows of `w` summed into `outs`, the second half into buffers of
    // their own, added at the end; with or without the helper (the same sums in the same order whatever the
    // thread count or the machine's load).
    let mut seconds: Vec<Vec<f32>> = list.iter().map(|p| vec![0.0; p.rows * p.n]).collect();
    let sptrs: Vec<OutPtr> = seconds.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    let xs2: Vec<Vec<f32>> = list
        .iter()
        .map(|p| {
            let k0 = p.k / 2;
            (0..p.rows)
                .flat_map(|r| p.x[r * p.k + k0..(r + 1) * p.k].iter().copied())
                .collect()
        })
        .collect();
    let xs1: Vec<Vec<f32>> = list
        .iter()
        .map(|p| {
            let k0 = p.k / 2;
            (0..p.rows)
                .flat_map(|r| p.x[r * p.k..r * p.k + k0].iter().copied())
                .collect()
        })
        .collect();
    let split = |half: usize| {
        for (i, p) in list.iter().enumerate() {
            let k0 = p.k / 2;
            let (x, w, k, o) = match half {
                0 => (&xs1[i], p.w.range(0, k0 * p.n), k0, ptrs[i]),
                _ => (
                    &xs2[i],
                    p.w.range(k0 * p.n, (p.k - k0) * p.n),
                    p.k - k0,
                    sptrs[i],
                ),
            };
            // SAFETY: each half writes its own buffer.
            unsafe { columns(x, p.rows, w, k, p.n, 0, p.n, o.0) };
        }
    };
    if !pair::run(&split) {
        split(0);
        split(1);
    }
    for (o, s2) in outs.iter_mut().zip(&seconds) {
        o.iter_mut().zip(s2).for_each(|(a, &b)| *a += b);
    }
    outs
}

/// Columns `half` of `halves` equal parts of `0..n`, cut at multiples of 16 (one AVX-512 register of f32).
fn half_columns(n: usize, half: usize, halves: usize) -> (usize, usize) {
    let cut = |i: usize| match i {
        0 => 0,
        i if i >= halves => n,
        i => ((n * i / halves).div_ceil(16) * 16).min(n),
    };
    (cut(half), cut(half + 1))
}

/// The output buffer of one product, shared by the two halves (disjoint columns).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only disjoint columns are written through it from each thread, while the owner waits.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Columns `c0..c1` of `x · w` into those columns of `out` (`[rows, n]`), compiled for the widest vector
/// unit found at run time.
///
/// # Safety
/// `out` must point at `rows * n` f32 that no one else reads or writes in columns `c0..c1` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    x: &[f32],
    rows: usize,
    w: Weights<'_>,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let fma = std::arch::is_x86_feature_detected!("fma");
        if fma && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F and FMA (checked just above); `out` as the caller promised.
            unsafe { columns_avx512(x, rows, w, k, n, c0, c1, out) };
            return;
        }
        if fma && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { columns_avx2(x, rows, w, k, n, c0, c1, out) };
            return;
        }
    }
    // SAFETY: as the caller promised.
    unsafe { columns_portable::<false>(x, rows, w, k, n, c0, c1, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn columns_avx512(
    x: &[f32],
    rows: usize,
    w: Weights<'_>,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: *mut f32,
) {
    // SAFETY: as [`columns`]'s caller promised.
    unsafe { columns_portable::<true>(x, rows, w, k, n, c0, c1, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn columns_avx2(
    x: &[f32],
    rows: usize,
    w: Weights<'_>,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: *mut f32,
) {
    // SAFETY: as [`columns`]'s caller promised.
    unsafe { columns_portable::<true>(x, rows, w, k, n, c0, c1, out) }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn columns_portable<const FMA: bool>(
    x: &[f32],
    rows: usize,
    w: Weights<'_>,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: *mut f32,
) {
    // SAFETY: as [`columns`]'s caller promised.
    unsafe {
        match w {
            Weights::F32(w) => tiles::<f32, FMA>(x, rows, w, k, n, c0, c1, out),
            Weights::Bf16(w) => tiles::<bf16, FMA>(x, rows, w, k, n, c0, c1, out),
        }
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
unsafe fn tiles<W: Widen, const FMA: bool>(
    x: &[f32],
    rows: usize,
    w: &[W],
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: *mut f32,
) {
    let mut t0 = c0;
    while t0 < c1 {
        let t1 = (t0 + TILE_COLS).min(c1);
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            // SAFETY: columns `t0..t1` of row `r` are inside `out` and written by this call only.
            let o = unsafe { std::slice::from_raw_parts_mut(out.add(r * n + t0), t1 - t0) };
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
    let mut starts = Vec::with_capacity(segments.len());
    let mut row = 0;
    for &(e, c) in segments {
        if c > 0 {
            starts.push((e, c, row));
        }
        row += c;
    }
    // Every chosen expert's gate/up product in one batch, then every down product in another: two hand-offs
    // to the helper thread per MoE layer.
    let up: Vec<Product<'_>> = starts
        .iter()
        .map(|&(e, c, row)| Product {
            x: &x[row * hidden..(row + c) * hidden],
            rows: c,
            w: gate_up.range(e * hidden * 2 * inter, hidden * 2 * inter),
            k: hidden,
            n: 2 * inter,
        })
        .collect();
    let acts: Vec<Vec<f32>> = products(&up)
        .into_iter()
        .zip(&starts)
        .map(|(h, &(_, c, _))| {
            // silu(g) · u as burn's `silu` computes it on flex (g · sigmoid(g), flex's vectorised sigmoid).
            let mut a = Vec::with_capacity(c * inter);
            for r in 0..c {
                let hr = &h[r * 2 * inter..(r + 1) * 2 * inter];
                let (g, u) = hr.split_at(inter);
                let start = a.len();
                a.extend_from_slice(g);
                burn_flex::simd::exp::sigmoid_inplace_f32(&mut a[start..]);
                for ((s, &g), &u) in a[start..].iter_mut().zip(g).zip(u) {
                    *s = g * *s * u;
                }
            }
            a
        })
        .collect();
    let downs: Vec<Product<'_>> = starts
        .iter()
        .zip(&acts)
        .map(|(&(e, c, _), a)| Product {
            x: a,
            rows: c,
            w: down.range(e * inter * hidden, inter * hidden),
            k: inter,
            n: hidden,
        })
        .collect();
    let mut out = Vec::with_capacity(x.len());
    for y in products(&downs) {
        out.extend(y);
    }
    out
}

/// A second thread for the decode products: a persistent helper that spin-waits for work for a while after
/// each job (so the next hand-off costs a cache-line transfer, not a wake-up), then parks.
///
/// Used when the process has at least two threads to work with: `FARSKIP_DECODE_THREADS` (1: off), else
/// `RAYON_NUM_THREADS`, else the cores. One caller at a time: a second thread asking
/// while the helper is busy runs its whole product itself.
pub mod pair {
    use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
    use std::thread::Thread;
    use std::time::{Duration, Instant};

    /// How long the helper spins after a job before it parks.
    const SPIN: Duration = Duration::from_micros(500);

    /// A wait for the helper's half longer than this means it was descheduled (a busy machine) ...
    const STALL: Duration = Duration::from_micros(500);

    /// ... and so do this many hand-offs in a row that the helper did not pick up in time ...
    const MISSES: usize = 4;

    /// ... and the next calls run on the caller alone: this many after a helper that had been working
    /// (a one-off: another thread took the core for a moment) ...
    const PAUSE_MIN: usize = 64;

    /// ... doubling with each pause that follows the last one within this many calls (a busy machine), up
    /// to this many.
    const PAUSE_MAX: usize = 2048;

    type Job<'a> = &'a (dyn Fn(usize) + Sync);

    struct Pair {
        /// The job on offer (a pointer to a [`Job`] on the caller's stack), or null.
        job: AtomicPtr<Job<'static>>,
        done: AtomicBool,
        panicked: AtomicBool,
        sleeping: AtomicBool,
        busy: AtomicBool,
        /// Calls left to run on the caller alone (see [`STALL`]).
        pause: AtomicUsize,
        /// Length of the next pause.
        next_pause: AtomicUsize,
        /// Calls since the last pause ended.
        since_pause: AtomicUsize,
        /// Hand-offs in a row taken back by the caller.
        misses: AtomicUsize,
        helper: OnceLock<Thread>,
    }

    fn pair() -> Option<&'static Pair> {
        static PAIR: OnceLock<Option<&'static Pair>> = OnceLock::new();
        *PAIR.get_or_init(|| {
            let var = |name: &str| {
                std::env::var(name)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .filter(|&n| n > 0)
            };
            let threads = var("FARSKIP_DECODE_THREADS")
                .or_else(|| var("RAYON_NUM_THREADS"))
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            if threads < 2 {
                return None;
            }
            let p: &'static Pair = Box::leak(Box::new(Pair {
                job: AtomicPtr::new(std::ptr::null_mut()),
                done: AtomicBool::new(false),
                panicked: AtomicBool::new(false),
                sleeping: AtomicBool::new(false),
                busy: AtomicBool::new(false),
                pause: AtomicUsize::new(0),
                next_pause: AtomicUsize::new(PAUSE_MIN),
                since_pause: AtomicUsize::new(0),
                misses: AtomicUsize::new(0),
                helper: OnceLock::new(),
            }));
            let handle = std::thread::Builder::new()
                .name("farskip-decode".into())
                .spawn(move || helper(p))
                .ok()?;
            let _ = p.helper.set(handle.thread().clone());
            Some(p)
        })
    }

    /// Whether a helper thread exists (it is started on first use).
    pub fn available() -> bool {
        pair().is_some()
    }

    /// Starts a pause of the helper: the next calls run on the caller alone.
    fn pause(p: &Pair) {
        // A busy machine keeps stalling the helper soon after each pause: longer pauses, as long as that
        // lasts; a quiet one gets a short pause for a one-off.
        let len = match p.since_pause.swap(0, Ordering::Relaxed) < PAUSE_MAX {
            true => p.next_pause.load(Ordering::Relaxed),
            false => PAUSE_MIN,
        };
        p.next_pause
            .store((2 * len).min(PAUSE_MAX), Ordering::Relaxed);
        p.pause.store(len, Ordering::Relaxed);
    }

    fn helper(p: &'static Pair) {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            // Taking the pointer claims the job: the caller takes it back the same way if it finishes its own
            // half first (this thread was not scheduled), so exactly one of the two runs it.
            let job = match p.job.load(Ordering::Relaxed).is_null() {
                true => std::ptr::null_mut(),
                false => p.job.swap(std::ptr::null_mut(), Ordering::Acquire),
            };
            if !job.is_null() {
                // SAFETY: the caller keeps the job alive until it has seen `done`.
                let f: Job<'_> = unsafe { *job };
                let result = catch_unwind(AssertUnwindSafe(|| f(1)));
                if result.is_err() {
                    p.panicked.store(true, Ordering::Relaxed);
                }
                p.done.store(true, Ordering::Release);
                idle_since = Instant::now();
                spins = 0;
                continue;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && idle_since.elapsed() > SPIN {
                p.sleeping.store(true, Ordering::SeqCst);
                if p.job.load(Ordering::SeqCst).is_null() {
                    std::thread::park();
                }
                p.sleeping.store(false, Ordering::SeqCst);
                idle_since = Instant::now();
            } else if spins.is_multiple_of(16) {
                // Let another thread of this core run (a no-op on an idle core).
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Runs `f(0)` here and `f(1)` on the helper thread, and returns when both are done; `false` (nothing
    /// run) when there is no helper or another thread is using it. If the helper has not picked `f(1)` up by
    /// the time `f(0)` is done (it was not scheduled: a busy machine), `f(1)` runs here as well, so a loaded
    /// machine costs the hand-off, not a wait.
    pub fn run(f: &(dyn Fn(usize) + Sync)) -> bool {
        let Some(p) = pair() else {
            return false;
        };
        if p.pause.load(Ordering::Relaxed) > 0 {
            p.pause.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        p.since_pause.fetch_add(1, Ordering::Relaxed);
        if p.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let job: Job<'_> = f;
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        p.done.store(false, Ordering::Relaxed);
        // SAFETY (lifetime): the helper only uses the job until it sets `done`, which is awaited below, or
        // never, if the job is taken back.
        p.job.store(ptr, Ordering::SeqCst);
        let asleep = p.sleeping.load(Ordering::SeqCst);
        if asleep && let Some(t) = p.helper.get() {
            t.unpark();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        let taken_back = p
            .job
            .compare_exchange(
                ptr,
                std::ptr::null_mut(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        let theirs = match taken_back {
            // The helper has not started it (not scheduled, or asleep): the second half runs here too. Several
            // misses in a row mean the machine is busy: the helper then parks for a while instead of
            // spinning, which would only take time from this thread.
            // (A helper that had to be woken up is expected to miss: that is not counted.)
            true => {
                if !asleep && p.misses.fetch_add(1, Ordering::Relaxed) + 1 >= MISSES {
                    p.misses.store(0, Ordering::Relaxed);
                    pause(p);
                }
                catch_unwind(AssertUnwindSafe(|| f(1)))
            }
            false => {
                p.misses.store(0, Ordering::Relaxed);
                if !p.done.load(Ordering::Acquire) {
                    let start = Instant::now();
                    let mut spins = 0u32;
                    while !p.done.load(Ordering::Acquire) {
                        spins = spins.wrapping_add(1);
                        match spins % 1024 {
                            0 => std::thread::yield_now(),
                            _ => std::hint::spin_loop(),
                        }
                    }
                    // A helper woken from its park starts late by its wake-up: not counted (as for misses).
                    if start.elapsed() > STALL && !asleep {
                        // The helper was descheduled mid-job: the machine is busy. Work alone for a while.
                        pause(p);
                    }
                }
                Ok(())
            }
        };
        let helper_panicked = p.panicked.swap(false, Ordering::Relaxed);
        p.busy.store(false, Ordering::Release);
        if let Err(e) = mine.and(theirs) {
            resume_unwind(e);
        }
        assert!(!helper_panicked, "the decode helper thread panicked");
        true
    }
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
            // Beyond the few-row kernel, with AVX-512 BF16, the activations are rounded to bf16 too.
            let rounded = rows > MAX_ROWS && crate::bf16_gemm::available();
            let want = match rounded {
                true => wide_lin.forward(x.clone().cast(FloatDType::BF16).cast(FloatDType::F32)),
                false => wide_lin.forward(x.clone()),
            };
            let got = linear(&lin, x);
            assert_eq!(got.dtype(), DType::F32);
            let diff = crate::compare::max_abs_diff_tensors(got, want);
            assert!(diff < 1e-5, "{rows} rows, bf16: off by {diff}");
        }
    }
}
