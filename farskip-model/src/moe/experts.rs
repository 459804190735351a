//! The routed expert bank, stored stacked (`[E, ...]`) and indexed, plus the host-side plan that groups token
//! slots by expert. The plan is the one host sync of an MoE layer; distributed dispatch reuses it.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::prelude::*;
use burn::tensor::activation::silu;

use crate::lanes;
use crate::matvec::{self, widened};

/// Stacked SwiGLU experts.
#[derive(Module, Debug)]
pub struct ExpertBank {
    /// `[experts, hidden, 2 * intermediate]`: gate columns first, then up.
    pub gate_up: Param<Tensor<3>>,
    /// `[experts, intermediate, hidden]`.
    pub down: Param<Tensor<3>>,
}

impl ExpertBank {
    /// Random-initialised bank (normal, std 0.02).
    pub fn new(num_experts: usize, hidden: usize, intermediate: usize, device: &Device) -> Self {
        let init = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        Self {
            gate_up: init.init([num_experts, hidden, 2 * intermediate], device),
            down: init.init([num_experts, intermediate, hidden], device),
        }
    }

    /// Number of experts held.
    pub fn num_experts(&self) -> usize {
        self.gate_up.dims()[0]
    }

    /// Intermediate width of one expert.
    pub fn intermediate_size(&self) -> usize {
        self.down.dims()[1]
    }

    /// A bank holding experts `range` of this one (for expert parallelism).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Self {
        let n = range.len();
        Self {
            gate_up: Param::from_tensor(self.gate_up.val().narrow(0, range.start, n)),
            down: Param::from_tensor(self.down.val().narrow(0, range.start, n)),
        }
    }

    /// The experts `order[0], order[1], …` (global ids) as a new bank, in that order.
    ///
    /// # Panics
    /// If an id is out of range.
    pub fn select(&self, order: &[usize]) -> Self {
        let device = self.gate_up.device();
        let idx = index_tensor(order, &device);
        Self {
            gate_up: Param::from_tensor(self.gate_up.val().select(0, idx.clone())),
            down: Param::from_tensor(self.down.val().select(0, idx)),
        }
    }

    /// Runs rows grouped by expert: the first `counts[0]` rows through expert 0, the next `counts[1]` through
    /// expert 1, and so on.
    ///
    /// When a gradient will be taken on flex, the step is one autodiff operation with a hand-written backward
    /// (`moe::backward`): the per-expert loop on the real rows, each bank gradient assembled once. On other
    /// autodiff backends the experts run as two batched matmuls over `[block, cap, hidden]` blocks of rows (see
    /// `ExpertBatches`) instead of one matmul pair per expert: the backward pass then produces each weight
    /// gradient in one piece, where the loop's backward sums one zero-padded full-size gradient per expert.
    /// Inference uses the blocks only for nearly equal counts (flex splits a batch across threads) and
    /// otherwise keeps the per-expert loop, which reads the weights in place and pads nothing.
    ///
    /// # Shapes
    /// - `xs`: `[sum(counts), hidden]` -> `[sum(counts), hidden]`
    pub fn forward_grouped(&self, xs: Tensor<2>, counts: &[usize]) -> Tensor<2> {
        let [m, hidden] = xs.dims();
        debug_assert_eq!(m, counts.iter().sum::<usize>());
        if m == 0 {
            return Tensor::zeros([0, hidden], &xs.device());
        }
        let tracked = xs.is_autodiff() || self.gate_up.is_autodiff();
        if tracked
            && let Some(ys) =
                super::backward::grouped_experts(&xs, &self.gate_up.val(), &self.down.val(), counts)
        {
            return ys;
        }
        if !tracked && let Some(ys) = self.forward_few_rows(&xs, counts) {
            return ys;
        }
        // bf16 weights through `bf16_gemm` read each expert in place: the loop, without padding or a widened copy
        // of the whole bank.
        let bf16_loop = !tracked
            && self.gate_up.val().dtype() == burn::tensor::DType::BF16
            && crate::bf16_gemm::available();
        match ExpertBatches::plan(counts, tracked) {
            Some(batches) if !bf16_loop => self.forward_batched(xs, &batches),
            _ => self.forward_loop(xs, counts),
        }
    }

    /// The expert boundary that cuts rows grouped by `counts` nearest to half: experts `..split` hold about
    /// half the rows (the first such boundary on a tie).
    pub fn half_rows_split(counts: &[usize]) -> usize {
        let total: usize = counts.iter().sum();
        let mut best = (total, 0);
        let mut rows = 0;
        for (e, &c) in counts.iter().enumerate() {
            rows += c;
            let off = (2 * rows).abs_diff(total);
            if off < best.0 {
                best = (off, e + 1);
            }
        }
        best.1
    }

    /// The first part of [`Self::forward_grouped`] cut at expert `split`: experts `..split` (their rows come
    /// first in `xs`) run now, the others in [`Self::forward_grouped_rest`], which returns the whole step's
    /// output. The two parts compute what the uncut step does, row for row; under autodiff on flex they are
    /// one operation with the hand-written backward (the backward does not see the cut). Lets a schedule put
    /// other work between the halves of a layer's experts.
    pub fn forward_grouped_first(
        &self,
        xs: Tensor<2>,
        counts: &[usize],
        split: usize,
    ) -> GroupedParts {
        let split = split.min(counts.len());
        let first = if xs.is_autodiff() || self.gate_up.is_autodiff() {
            match super::backward::grouped_experts_first(
                &xs,
                &self.gate_up.val(),
                &self.down.val(),
                counts,
                split,
            ) {
                Some(p) => FirstPart::Tracked(p),
                // Composed autodiff (other backends): the rest runs the whole step.
                None => FirstPart::Deferred,
            }
        } else {
            let rows: usize = counts[..split].iter().sum();
            FirstPart::Rows(match rows {
                0 => Tensor::zeros([0, xs.dims()[1]], &xs.device()),
                _ => self
                    .slice(0..split)
                    .forward_grouped(xs.clone().narrow(0, 0, rows), &counts[..split]),
            })
        };
        GroupedParts {
            xs,
            counts: counts.to_vec(),
            split,
            first,
        }
    }

    /// The rest of a step begun by [`Self::forward_grouped_first`]: the output of all its rows.
    pub fn forward_grouped_rest(&self, parts: GroupedParts) -> Tensor<2> {
        let GroupedParts {
            xs,
            counts,
            split,
            first,
        } = parts;
        match first {
            FirstPart::Tracked(p) => super::backward::grouped_experts_rest(
                &xs,
                &self.gate_up.val(),
                &self.down.val(),
                &counts,
                p,
            )
            .expect("the first part ran on autodiff flex tensors"),
            FirstPart::Deferred => self.forward_grouped(xs, &counts),
            FirstPart::Rows(done) => {
                let [m, _] = xs.dims();
                // The first part's rows: those of experts `..split`.
                let start = done.dims()[0];
                if start == m {
                    return done;
                }
                let rest = self
                    .slice(split..counts.len())
                    .forward_grouped(xs.narrow(0, start, m - start), &counts[split..]);
                match start {
                    0 => rest,
                    _ => Tensor::cat(vec![done, rest], 0),
                }
            }
        }
    }

    /// Rows grouped by expert through [`matvec::expert_rows`](crate::matvec::expert_rows), reading each
    /// chosen expert's weights in place: decoding, where an expert gets a row or two. `None` for more than
    /// [`Self::FEW_ROWS`] rows or off flex.
    fn forward_few_rows(&self, xs: &Tensor<2>, counts: &[usize]) -> Option<Tensor<2>> {
        let [m, hidden] = xs.dims();
        if m > Self::FEW_ROWS {
            return None;
        }
        let gate_up = matvec::flex_primitive(&self.gate_up.val())?;
        let down = matvec::flex_primitive(&self.down.val())?;
        let x = matvec::flex_primitive(xs)?;
        let x = match x.as_slice::<f32>() {
            Some(s) => s.to_vec(),
            None if x.dtype() == burn::tensor::DType::F32 => {
                x.to_contiguous().as_slice::<f32>()?.to_vec()
            }
            None => return None,
        };
        let segments: Vec<(usize, usize)> = counts.iter().copied().enumerate().collect();
        let out = matvec::expert_rows(
            &x,
            &segments,
            matvec::Weights::of(&gate_up)?,
            matvec::Weights::of(&down)?,
            hidden,
            self.intermediate_size(),
        );
        Some(Tensor::from_data(
            TensorData::new(out, [m, hidden]),
            &xs.device(),
        ))
    }

    /// Rows up to which [`Self::forward_grouped`] runs the few-row kernels (decoding a batch of a few sequences).
    const FEW_ROWS: usize = 16;

    /// The rows of [`Self::forward_grouped`] laid out by `batches`: one gather, two batched matmuls, one gather
    /// back. Padding rows repeat row 0; their outputs are dropped (so they get a zero gradient).
    fn forward_batched(&self, xs: Tensor<2>, batches: &ExpertBatches) -> Tensor<2> {
        let [_, hidden] = xs.dims();
        let device = xs.device();
        let inter = self.intermediate_size();
        let (n, cap) = (batches.len(), batches.cap);
        let (gate_up, down) = match &batches.experts {
            None if n == self.num_experts() => {
                (widened(self.gate_up.val()), widened(self.down.val()))
            }
            None => (
                widened(self.gate_up.val().narrow(0, 0, n)),
                widened(self.down.val().narrow(0, 0, n)),
            ),
            // Gathered as `[experts, rows * cols]` matrices: flex copies (and scatter-adds backward) whole rows
            // in 2-D, element by element in 3-D.
            Some(experts) => {
                let idx = index_tensor(experts, &device);
                let gather = |w: Tensor<3>| {
                    let [e, r, c] = w.dims();
                    w.reshape([e, r * c])
                        .select(0, idx.clone())
                        .reshape([experts.len(), r, c])
                };
                (
                    widened(gather(self.gate_up.val())),
                    widened(gather(self.down.val())),
                )
            }
        };
        let x = xs
            .select(0, index_tensor(&batches.src, &device))
            .reshape([n, cap, hidden]);
        let h = x.matmul(gate_up);
        let a = silu(h.clone().narrow(2, 0, inter)) * h.narrow(2, inter, inter);
        a.matmul(down)
            .reshape([n * cap, hidden])
            .select(0, index_tensor(&batches.dst, &device))
    }

    /// One matmul pair per expert, reading each expert's weights in place. Without autodiff on flex the rows
    /// are cut into equal ranges (an expert's rows may span two) that run side by side on
    /// [`lanes`](crate::lanes), each single-threaded: these matmuls gain little from flex's split over cores.
    fn forward_loop(&self, xs: Tensor<2>, counts: &[usize]) -> Tensor<2> {
        let rows = xs.dims()[0];
        let device = lanes::work_device(xs.device(), self.gate_up.device());
        let mut outs = lanes::ranges(&device, rows, Self::MIN_LANE_ROWS, |r| {
            let segments = segments_in(counts, r.clone());
            self.forward_segments(xs.clone().narrow(0, r.start, r.len()), &segments)
        });
        match outs.len() {
            1 => outs.remove(0),
            _ => Tensor::cat(outs, 0),
        }
    }

    /// Rows of one lane below which splitting the loop is not worth a thread hand-off.
    const MIN_LANE_ROWS: usize = 64;

    /// `segments` as `(expert, rows)`: the first rows of `xs` through the first segment's expert, and so on.
    fn forward_segments(&self, xs: Tensor<2>, segments: &[(usize, usize)]) -> Tensor<2> {
        if let Some(ys) = self.segments_bf16(&xs, segments) {
            return ys;
        }
        let inter = self.intermediate_size();
        let gate_up = self.gate_up.val();
        let down = self.down.val();
        let mut outs = Vec::with_capacity(segments.len());
        let mut offset = 0;
        for &(e, c) in segments {
            if c == 0 {
                continue;
            }
            let x = xs.clone().narrow(0, offset, c);
            let h = x.matmul(widened(gate_up.clone().narrow(0, e, 1).squeeze_dim::<2>(0)));
            let a = silu(h.clone().narrow(1, 0, inter)) * h.narrow(1, inter, inter);
            outs.push(a.matmul(widened(down.clone().narrow(0, e, 1).squeeze_dim::<2>(0))));
            offset += c;
        }
        Tensor::cat(outs, 0)
    }

    /// [`Self::forward_segments`] for a plain flex bf16 bank on a CPU with AVX-512 BF16: each expert's two
    /// products through [`crate::bf16_gemm`], reading its weights as stored (no widened copy), SwiGLU on the
    /// host. `None` otherwise.
    fn segments_bf16(&self, xs: &Tensor<2>, segments: &[(usize, usize)]) -> Option<Tensor<2>> {
        use burn::tensor::{DType, bf16};
        let gate_up = self.gate_up.val();
        if gate_up.dtype() != DType::BF16 || !crate::bf16_gemm::available() {
            return None;
        }
        let (gu, dn) = (
            matvec::flex_primitive(&gate_up)?,
            matvec::flex_primitive(&self.down.val())?,
        );
        let (gu, dn) = (gu.as_slice::<bf16>()?, dn.as_slice::<bf16>()?);
        let x = matvec::host_f32(xs)?;
        let [m, hidden] = xs.dims();
        let inter = self.intermediate_size();
        let (gu_len, dn_len) = (hidden * 2 * inter, inter * hidden);
        if gu.len() != self.num_experts() * gu_len || dn.len() != self.num_experts() * dn_len {
            return None;
        }
        let mut out = Vec::with_capacity(m * hidden);
        let mut row = 0;
        for &(e, c) in segments {
            if c == 0 {
                continue;
            }
            let xe = &x[row * hidden..(row + c) * hidden];
            let h = crate::bf16_gemm::matmul(
                xe,
                c,
                hidden,
                &gu[e * gu_len..(e + 1) * gu_len],
                2 * inter,
            )?;
            let mut a = Vec::with_capacity(c * inter);
            for hr in h.chunks_exact(2 * inter) {
                let (g, u) = hr.split_at(inter);
                a.extend(g.iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u));
            }
            out.extend(crate::bf16_gemm::matmul(
                &a,
                c,
                inter,
                &dn[e * dn_len..(e + 1) * dn_len],
                hidden,
            )?);
            row += c;
        }
        (row == m).then(|| Tensor::from_data(TensorData::new(out, [m, hidden]), &xs.device()))
    }
}

/// The `(expert, rows)` segments of the grouped rows `range` (rows grouped by expert as `counts` says).
fn segments_in(counts: &[usize], range: std::ops::Range<usize>) -> Vec<(usize, usize)> {
    let mut start = 0;
    let mut segments = Vec::new();
    for (e, &c) in counts.iter().enumerate() {
        let (lo, hi) = (start.max(range.start), (start + c).min(range.end));
        if lo < hi {
            segments.push((e, hi - lo));
        }
        start += c;
    }
    segments
}

/// How [`ExpertBank::forward_grouped`] packs rows grouped by expert into equal blocks for batched matmuls.
///
/// Balanced counts give one block per expert, `cap = max(counts)` rows each, using the weights as stored.
/// Uneven counts would spend most of such blocks on padding, so they are cut into segments of at most `cap`
/// rows instead, each block with a gathered copy of its expert's weights; `cap` (the mean count times a power
/// of two) balances padding against gathers.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ExpertBatches {
    /// Expert of each block; `None` when block `e` is expert `e` for every expert.
    experts: Option<Vec<usize>>,
    /// Rows per block.
    cap: usize,
    /// For each block row (`block * cap + i`), the grouped row it reads (padding reads row 0).
    src: Vec<usize>,
    /// For each grouped row, its block row.
    dst: Vec<usize>,
}

impl ExpertBatches {
    /// Padded rows allowed in one-block-per-expert form, as a multiple `(num, den)` of the real rows, with a
    /// gradient (the loop's backward sums one full-size zero-padded gradient per expert, so blocks win easily)
    /// and without (a busy 2-core flex box ran the loop single-threaded as fast as blocks padded by a third).
    const MAX_PADDING_TRACKED: (usize, usize) = (2, 1);
    const MAX_PADDING_UNTRACKED: (usize, usize) = (5, 4);
    /// What a block with gathered weights costs, in padding rows: the weight copy forward and its scatter-add
    /// backward (measured on the small preset, 2-core flex: 96 when flex zero-filled and scatter-added on one
    /// thread; 32 since it spreads them over the cores — 32 beat 96 and 8. A second group of small blocks
    /// for the stragglers of a skewed router padded less but was slower: one more full-size gradient).
    const GATHER_COST_ROWS: usize = 32;

    /// Plans the blocks for `counts`, or `None` when the per-expert loop is the better choice: uneven counts
    /// and no gradient to take, where gathering weights for segments costs more than the loop.
    fn plan(counts: &[usize], tracked: bool) -> Option<Self> {
        let rows: usize = counts.iter().sum();
        let max = counts.iter().copied().max().unwrap_or(0);
        if rows == 0 {
            return None;
        }
        let identity = || Self::blocks(counts, max, |e| vec![(e, counts[e])]);
        let padded = counts.len() * max;
        let (num, den) = match tracked {
            true => Self::MAX_PADDING_TRACKED,
            false => Self::MAX_PADDING_UNTRACKED,
        };
        if den * padded <= num * rows {
            return Some(identity());
        }
        if !tracked {
            return None;
        }
        // Caps from the mean count up to the largest count, doubling; each costs its padded rows plus its
        // gathers.
        let cost = |cap: usize| {
            let blocks: usize = counts.iter().map(|c| c.div_ceil(cap)).sum();
            blocks * (cap + Self::GATHER_COST_ROWS)
        };
        let (best, cap) = std::iter::successors(Some(rows.div_ceil(counts.len())), |&c| {
            (c < max).then(|| (2 * c).min(max))
        })
        .map(|cap| (cost(cap), cap))
        .min()?;
        if padded <= best {
            return Some(identity());
        }
        Some(Self::blocks(counts, cap, |e| {
            (0..counts[e].div_ceil(cap))
                .map(|j| (e, (counts[e] - j * cap).min(cap)))
                .collect()
        }))
    }

    /// Blocks of `cap` rows; `split(e)` lists expert `e`'s blocks as `(expert, rows)`, in row order.
    fn blocks(counts: &[usize], cap: usize, split: impl Fn(usize) -> Vec<(usize, usize)>) -> Self {
        let mut experts = Vec::new();
        let mut src = Vec::new();
        let mut dst = vec![0; counts.iter().sum()];
        let mut row = 0;
        for e in 0..counts.len() {
            for (expert, n) in split(e) {
                let start = experts.len() * cap;
                experts.push(expert);
                src.extend((row..row + n).chain(std::iter::repeat_n(0, cap - n)));
                for (i, d) in dst[row..row + n].iter_mut().enumerate() {
                    *d = start + i;
                }
                row += n;
            }
        }
        let identity =
            experts.len() == counts.len() && experts.iter().enumerate().all(|(i, &e)| i == e);
        Self {
            experts: (!identity).then_some(experts),
            cap,
            src,
            dst,
        }
    }

    /// Number of blocks.
    fn len(&self) -> usize {
        self.src.len() / self.cap
    }
}

/// A grouped expert step cut in two ([`ExpertBank::forward_grouped_first`]), between its parts.
#[derive(Debug)]
pub struct GroupedParts {
    xs: Tensor<2>,
    counts: Vec<usize>,
    split: usize,
    first: FirstPart,
}

#[derive(Debug)]
enum FirstPart {
    /// The output rows of experts `..split`.
    Rows(Tensor<2>),
    /// The hand-written backward's operation, its first experts' forward done.
    Tracked(super::backward::Partial),
    /// Nothing yet: the rest runs the whole step.
    Deferred,
}

/// Token slots grouped by expert. Slot `s = token * top_k + j` is the `j`-th choice of `token`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPlan {
    /// Experts per token.
    pub top_k: usize,
    /// Expert of every slot, `[tokens * top_k]`.
    pub slot_experts: Vec<usize>,
    /// Slots ordered by expert (stable: ascending slot within an expert).
    pub sorted_slots: Vec<usize>,
    /// Slots per expert, `[num_experts]`.
    pub counts: Vec<usize>,
}

impl SlotPlan {
    /// Groups slots by expert (a counting sort on the host).
    pub fn new(slot_experts: Vec<usize>, top_k: usize, num_experts: usize) -> Self {
        let mut counts = vec![0usize; num_experts];
        for &e in &slot_experts {
            counts[e] += 1;
        }
        let mut starts: Vec<usize> = counts
            .iter()
            .scan(0, |acc, &c| {
                let s = *acc;
                *acc += c;
                Some(s)
            })
            .collect();
        let mut sorted_slots = vec![0usize; slot_experts.len()];
        for (s, &e) in slot_experts.iter().enumerate() {
            sorted_slots[starts[e]] = s;
            starts[e] += 1;
        }
        Self {
            top_k,
            slot_experts,
            sorted_slots,
            counts,
        }
    }

    /// Reads the routing's expert ids from the device (one sync) and groups them.
    pub fn from_experts(experts: &Tensor<2, Int>, num_experts: usize) -> Self {
        let [_, k] = experts.dims();
        let ids: Vec<usize> = crate::host_reads::read_ints(experts.clone())
            .try_into_vec_as::<i64>()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e as usize)
            .collect();
        Self::new(ids, k, num_experts)
    }

    /// Number of tokens.
    pub fn num_tokens(&self) -> usize {
        self.slot_experts.len() / self.top_k.max(1)
    }

    /// Token of each sorted slot.
    pub fn sorted_tokens(&self) -> Vec<usize> {
        self.sorted_slots.iter().map(|s| s / self.top_k).collect()
    }

    /// For each slot, its position in [`Self::sorted_slots`].
    pub fn inverse(&self) -> Vec<usize> {
        let mut inv = vec![0usize; self.sorted_slots.len()];
        for (pos, &s) in self.sorted_slots.iter().enumerate() {
            inv[s] = pos;
        }
        inv
    }
}

/// A 1-D index tensor from host indices.
pub fn index_tensor(idx: &[usize], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn bank(device: &Device) -> ExpertBank {
        device.seed(7);
        // Larger weights than the default init, so that errors would show.
        let w = |shape: [usize; 3]| {
            Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, 0.5),
                device,
            ))
        };
        ExpertBank {
            gate_up: w([4, 8, 12]),
            down: w([4, 6, 8]),
        }
    }

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Every grouped row has a block row that reads it back, and blocks hold at most `cap` real rows.
    fn check_layout(b: &ExpertBatches, counts: &[usize]) {
        let rows: usize = counts.iter().sum();
        assert_eq!(b.dst.len(), rows);
        assert_eq!(b.src.len(), b.len() * b.cap);
        for (r, &d) in b.dst.iter().enumerate() {
            assert_eq!(b.src[d], r, "{b:?}");
        }
        let mut seen = b.dst.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), rows, "two rows share a block row: {b:?}");
    }

    #[test]
    fn plans_one_block_per_expert_when_balanced_and_segments_otherwise() {
        let balanced = [3, 3, 3, 2];
        let b = ExpertBatches::plan(&balanced, false).unwrap();
        assert_eq!((b.experts.clone(), b.cap, b.len()), (None, 3, 4));
        check_layout(&b, &balanced);
        // Padding by half: blocks only when a gradient is taken.
        let loose = [3, 2, 3, 0];
        assert_eq!(ExpertBatches::plan(&loose, false), None);
        let b = ExpertBatches::plan(&loose, true).unwrap();
        assert_eq!((b.experts.clone(), b.cap, b.len()), (None, 3, 4));
        check_layout(&b, &loose);

        let uneven = [0, 300, 1, 3];
        assert_eq!(ExpertBatches::plan(&uneven, false), None);
        let b = ExpertBatches::plan(&uneven, true).unwrap();
        check_layout(&b, &uneven);
        let experts = b.experts.clone().unwrap();
        assert!(experts.windows(2).all(|w| w[0] <= w[1]), "{experts:?}");
        assert!(!experts.contains(&0), "an empty expert got a block");
        assert!(b.len() * b.cap <= 2 * 304 + 3 * b.cap, "{b:?}");
        assert_eq!(ExpertBatches::plan(&[0, 0], true), None);
    }

    #[test]
    fn a_step_cut_in_two_equals_the_whole_step_with_gradients() {
        assert_eq!(ExpertBank::half_rows_split(&[3, 2, 3, 2]), 2);
        assert_eq!(ExpertBank::half_rows_split(&[0, 9, 1, 2]), 2);
        assert_eq!(ExpertBank::half_rows_split(&[5, 0, 0, 0]), 0);
        assert_eq!(ExpertBank::half_rows_split(&[1, 1, 1, 7]), 3);
        assert_eq!(ExpertBank::half_rows_split(&[0, 0, 0, 0]), 0);
        for device in [Device::flex(), Device::flex().autodiff()] {
            let tracked = device.is_autodiff();
            let bank = bank(&device);
            for counts in [[3, 2, 3, 2], [0, 9, 1, 2], [5, 0, 0, 0], [0, 0, 4, 0]] {
                let m: usize = counts.iter().sum();
                let xs = Tensor::<2>::random([m, 8], Distribution::Normal(0.0, 1.0), &device);
                let probe = Tensor::<2>::random([m, 8], Distribution::Normal(0.0, 1.0), &device);
                let run = |split: Option<usize>| {
                    let x = match tracked {
                        true => xs.clone().detach().require_grad(),
                        false => xs.clone(),
                    };
                    let out = match split {
                        None => bank.forward_grouped(x.clone(), &counts),
                        Some(k) => bank.forward_grouped_rest(bank.forward_grouped_first(
                            x.clone(),
                            &counts,
                            k,
                        )),
                    };
                    let mut v = out
                        .clone()
                        .into_data()
                        .try_into_vec_as::<f32>()
                        .expect("f32");
                    if tracked {
                        let grads = (out * probe.clone()).sum().backward();
                        v.extend(
                            x.grad(&grads)
                                .unwrap()
                                .into_data()
                                .try_into_vec_as::<f32>()
                                .expect("f32"),
                        );
                        for w in [bank.gate_up.val(), bank.down.val()] {
                            v.extend(
                                w.grad(&grads)
                                    .unwrap()
                                    .into_data()
                                    .try_into_vec_as::<f32>()
                                    .expect("f32"),
                            );
                        }
                    }
                    v
                };
                let whole = run(None);
                assert!(whole.iter().all(|x| x.is_finite()));
                for k in 0..=counts.len() {
                    // The same per-expert products in the same order: equal bit for bit.
                    assert_eq!(
                        run(Some(k)),
                        whole,
                        "counts {counts:?}, cut at {k}, tracked {tracked}"
                    );
                }
            }
        }
    }

    #[test]
    fn hand_written_backward_matches_the_composed_step() {
        let device = Device::flex().autodiff();
        let bank = bank(&device);
        for counts in [[3, 2, 3, 2], [0, 9, 1, 2], [5, 0, 0, 0], [0, 0, 0, 0]] {
            let m: usize = counts.iter().sum();
            let xs = Tensor::<2>::random([m, 8], Distribution::Normal(0.0, 1.0), &device);
            let probe = Tensor::<2>::random([m, 8], Distribution::Normal(0.0, 1.0), &device);
            for x_tracked in [true, false] {
                let run = |hand_written: bool| {
                    let x = match x_tracked {
                        true => xs.clone().detach().require_grad(),
                        false => xs.clone().detach(),
                    };
                    let out = match hand_written {
                        // Under autodiff on flex, `forward_grouped` takes the hand-written op.
                        true => bank.forward_grouped(x.clone(), &counts),
                        false => bank.forward_loop(x.clone(), &counts),
                    };
                    // `+ 0·sum` keeps a graph when there are no rows.
                    let loss = (out.clone() * probe.clone()).sum()
                        + bank.gate_up.val().sum().mul_scalar(0.0)
                        + bank.down.val().sum().mul_scalar(0.0);
                    let grads = loss.backward();
                    let g = |t: &Tensor<3>| t.grad(&grads).unwrap();
                    (
                        out.inner(),
                        (x_tracked && m > 0).then(|| x.grad(&grads).unwrap()),
                        g(&bank.gate_up.val()),
                        g(&bank.down.val()),
                    )
                };
                if m == 0 {
                    let got = run(true);
                    assert_eq!(got.0.dims(), [0, 8]);
                    assert_eq!(got.2.abs().max().into_scalar::<f32>(), 0.0);
                    continue;
                }
                let (want, got) = (run(false), run(true));
                let dx = match (got.1, want.1) {
                    (Some(a), Some(b)) => max_diff(a, b),
                    (None, None) => 0.0,
                    _ => panic!("d_x present in one run only"),
                };
                let diffs = [
                    max_diff(got.0, want.0),
                    dx,
                    max_diff(got.2, want.2),
                    max_diff(got.3, want.3),
                ];
                assert!(
                    diffs.iter().all(|&d| d < 1e-5),
                    "counts {counts:?}, x tracked {x_tracked}: output / d_x / d_gate_up / d_down differ by {diffs:?}"
                );
            }
        }
    }

    #[test]
    fn batched_experts_match_the_per_expert_loop_with_gradients() {
        let device = Device::flex().autodiff();
        let bank = bank(&device);
        for counts in [[3, 2, 3, 2], [0, 9, 1, 2], [5, 0, 0, 0]] {
            let m = counts.iter().sum();
            let xs = Tensor::<2>::random([m, 8], Distribution::Normal(0.0, 1.0), &device);
            let probe = Tensor::<2>::random([m, 8], Distribution::Normal(0.0, 1.0), &device);
            let run = |batches: Option<ExpertBatches>| {
                let x = xs.clone().detach().require_grad();
                let out = match batches {
                    Some(b) => bank.forward_batched(x.clone(), &b),
                    None => bank.forward_loop(x.clone(), &counts),
                };
                let grads = (out.clone() * probe.clone()).sum().backward();
                let g = |t: &Tensor<3>| t.grad(&grads).unwrap();
                (
                    out.inner(),
                    x.grad(&grads).unwrap(),
                    g(&bank.gate_up.val()),
                    g(&bank.down.val()),
                )
            };
            let want = run(None);
            let rows: usize = m;
            let identity = ExpertBatches::blocks(&counts, *counts.iter().max().unwrap(), |e| {
                vec![(e, counts[e])]
            });
            let segments = ExpertBatches::blocks(&counts, 2, |e| {
                (0..counts[e].div_ceil(2))
                    .map(|j| (e, (counts[e] - j * 2).min(2)))
                    .collect()
            });
            assert!(segments.experts.is_some() && rows > 0);
            for batches in [identity, segments] {
                let got = run(Some(batches.clone()));
                let diffs = [
                    max_diff(got.0, want.0.clone()),
                    max_diff(got.1, want.1.clone()),
                    max_diff(got.2, want.2.clone()),
                    max_diff(got.3, want.3.clone()),
                ];
                assert!(
                    diffs.iter().all(|&d| d < 1e-4),
                    "counts {counts:?}, {batches:?}: output / d_x / d_gate_up / d_down differ by {diffs:?}"
                );
            }
        }
    }

    /// On wgpu the hand-written backward declines (it computes on flex primitives) and the generic step runs:
    /// its output and gradients equal flex's hand-written op.
    #[cfg(feature = "wgpu")]
    #[test]
    fn wgpu_runs_the_generic_step_and_matches_flex() {
        let wgpu = crate::DeviceName::Wgpu.device().unwrap().autodiff();
        let flex = Device::flex().autodiff();
        let counts = [3, 0, 5, 2];
        let xs_flex = Tensor::<2>::random([10, 8], Distribution::Normal(0.0, 1.0), &flex);
        let bank_flex = bank(&flex);
        let copy = |w: &Param<Tensor<3>>| {
            Param::from_tensor(Tensor::from_data(w.val().into_data(), &wgpu))
        };
        let bank_wgpu = ExpertBank {
            gate_up: copy(&bank_flex.gate_up),
            down: copy(&bank_flex.down),
        };
        let xs_wgpu = xs_flex.clone().to_device(&wgpu);
        assert!(
            super::super::backward::grouped_experts(
                &xs_wgpu,
                &bank_wgpu.gate_up.val(),
                &bank_wgpu.down.val(),
                &counts
            )
            .is_none()
        );
        let run = |bank: &ExpertBank, xs: &Tensor<2>| {
            let x = xs.clone().detach().require_grad();
            let out = bank.forward_grouped(x.clone(), &counts);
            let grads = (out.clone() * out.clone()).sum().backward();
            (
                out.inner(),
                x.grad(&grads).unwrap(),
                bank.gate_up.val().grad(&grads).unwrap(),
                bank.down.val().grad(&grads).unwrap(),
            )
        };
        let (a, b) = (run(&bank_flex, &xs_flex), run(&bank_wgpu, &xs_wgpu));
        // Relative to the largest flex value: the sum of squares makes gradients of order 100.
        fn rel<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f64 {
            let scale = a.clone().abs().max().into_scalar::<f32>() as f64;
            crate::compare::max_abs_diff_tensors(a, b) / scale
        }
        let diffs = [rel(a.0, b.0), rel(a.1, b.1), rel(a.2, b.2), rel(a.3, b.3)];
        assert!(
            diffs.iter().all(|&d| d < 1e-5),
            "output / d_x / d_gate_up / d_down differ by {diffs:?} (relative)"
        );
    }
}
