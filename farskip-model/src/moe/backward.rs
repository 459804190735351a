//! The routed experts as one autodiff operation with a hand-written backward (flex under autodiff).
//!
//! Composed from tensor ops, a grouped expert step needs either one matmul pair per expert on a `narrow` of
//! the stacked bank — whose backward writes one zero-filled, full-size bank gradient per expert — or
//! equal-sized blocks with gathered weights, which pad skewed routings (1.5–1.9× the real rows on the
//! random-init preset) and copy and scatter-add the weights. burn 0.22 lets an operation carry its own
//! backward ([`burn_autodiff::ops::Backward`]); this one runs the per-expert loop on the real rows only and
//! computes the backward per expert too:
//!
//! ```text
//! forward, per expert e (rows x_e):   h = x_e · GU_e,  a = silu(g) ⊙ u  (h = [g | u]),  y_e = a · D_e
//! backward, from dy_e:                dD_e = aᵀ · dy_e,  da = dy_e · D_eᵀ,
//!                                     dg = da ⊙ u ⊙ silu'(g),  du = da ⊙ silu(g),  dh = [dg | du]
//!                                     dGU_e = x_eᵀ · dh,  dx_e = dh · GU_eᵀ
//! ```
//!
//! with `silu'(g) = σ(g) · (1 + g · (1 − σ(g)))`. The bank gradients are assembled once (experts without rows
//! get zeros). Values agree with the composed form to rounding (the tests compare both).

use burn::prelude::*;
use burn::tensor::activation::{sigmoid, silu};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::Flex;

use crate::attention_core::into_flex;
use rayon::prelude::*;

type Ad = Autodiff<Flex>;

/// What the backward needs: the inner (untracked) inputs and the forward's activations.
#[derive(Clone, Debug)]
struct Saved {
    xs: Tensor<2>,
    gate_up: Tensor<3>,
    down: Tensor<3>,
    /// `[rows, 2 * inter]`: `[g | u]` per row.
    h: Tensor<2>,
    /// `[rows, inter]`: `silu(g) ⊙ u`.
    a: Tensor<2>,
    counts: Vec<usize>,
    /// First row of each expert (`counts` summed before it).
    offsets: Vec<usize>,
}

#[derive(Debug)]
struct GroupedExperts;

impl Backward<Flex, 3> for GroupedExperts {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let dy = Tensor::<2>::from_primitive::<Flex>(grads.consume::<Flex>(&ops.node));
        let s = ops.state;
        let [xs_parent, gate_up_parent, down_parent] = ops.parents;
        let inter = s.down.dims()[1];
        let [experts, hidden, inter2] = s.gate_up.dims();
        let device = dy.device();
        // Experts are independent: their backward runs as rayon tasks (flex's own parallel kernels nest in the
        // same pool), then the pieces are assembled in expert order.
        let want_dx = xs_parent.is_some();
        let per_expert: Vec<(Tensor<3>, Tensor<3>, Option<Tensor<2>>)> = (0..experts)
            .into_par_iter()
            .map(|e| {
                let (offset, c) = (s.offsets[e], s.counts[e]);
                if c == 0 {
                    return (
                        Tensor::<3>::zeros([1, hidden, inter2], &device),
                        Tensor::<3>::zeros([1, inter, hidden], &device),
                        None,
                    );
                }
                let rows = |t: &Tensor<2>| t.clone().narrow(0, offset, c);
                let (dy_e, h_e, a_e) = (rows(&dy), rows(&s.h), rows(&s.a));
                let gu_e = s.gate_up.clone().narrow(0, e, 1).squeeze_dim::<2>(0);
                let d_e = s.down.clone().narrow(0, e, 1).squeeze_dim::<2>(0);
                let dd = a_e.transpose().matmul(dy_e.clone()).unsqueeze_dim(0);
                let da = dy_e.matmul(d_e.transpose());
                let g = h_e.clone().narrow(1, 0, inter);
                let u = h_e.narrow(1, inter, inter);
                let sg = sigmoid(g.clone());
                let dsilu = sg.clone() * (g.clone() * (sg.clone().neg() + 1.0) + 1.0);
                let dg = da.clone() * u * dsilu;
                let du = da * (g * sg);
                let dh = Tensor::cat(vec![dg, du], 1);
                let dgu = rows(&s.xs).transpose().matmul(dh.clone()).unsqueeze_dim(0);
                let dx = want_dx.then(|| dh.matmul(gu_e.transpose()));
                (dgu, dd, dx)
            })
            .collect();
        let mut dgate_up = Vec::with_capacity(experts);
        let mut ddown = Vec::with_capacity(experts);
        let mut dxs = Vec::new();
        for (dgu, dd, dx) in per_expert {
            dgate_up.push(dgu);
            ddown.push(dd);
            dxs.extend(dx);
        }
        if let Some(node) = gate_up_parent {
            grads.register::<Flex>(node.id, into_flex(Tensor::cat(dgate_up, 0)));
        }
        if let Some(node) = down_parent {
            grads.register::<Flex>(node.id, into_flex(Tensor::cat(ddown, 0)));
        }
        if let Some(node) = xs_parent {
            let dx = match dxs.len() {
                0 => Tensor::<2>::zeros([0, hidden], &device),
                1 => dxs.remove(0),
                _ => Tensor::cat(dxs, 0),
            };
            grads.register::<Flex>(node.id, into_flex(dx));
        }
    }
}

/// The grouped expert step under autodiff on flex with the hand-written backward, or `None` when the tensors
/// are not autodiff-on-flex tensors (other backends, or a gradient-checkpointing strategy): the caller then
/// composes the step from tensor ops.
///
/// # Shapes
/// - `xs`: `[sum(counts), hidden]`, rows grouped by expert; `gate_up`: `[E, hidden, 2 * inter]`; `down`:
///   `[E, inter, hidden]`; output `[sum(counts), hidden]`
pub(crate) fn grouped_experts(
    xs: &Tensor<2>,
    gate_up: &Tensor<3>,
    down: &Tensor<3>,
    counts: &[usize],
) -> Option<Tensor<2>> {
    let first = grouped_experts_first(xs, gate_up, down, counts, 0)?;
    grouped_experts_rest(xs, gate_up, down, counts, first)
}

/// A step begun by [`grouped_experts_first`]: the untracked inner inputs, each expert's first row, the split
/// point, and the forward activations of the experts before it (`(h, a, y)` of each expert with rows, in expert
/// order).
#[derive(Debug)]
pub(crate) struct Partial {
    inner: (Tensor<2>, Tensor<3>, Tensor<3>),
    offsets: Vec<usize>,
    split: usize,
    done: Vec<(Tensor<2>, Tensor<2>, Tensor<2>)>,
}

/// The untracked inner tensors of an autodiff-on-flex step, or `None`.
fn inner(
    xs: &Tensor<2>,
    gate_up: &Tensor<3>,
    down: &Tensor<3>,
) -> Option<(Tensor<2>, Tensor<3>, Tensor<3>)> {
    let prim = |t: &Tensor<3>| t.clone().try_into_primitive::<Ad>().ok();
    Some((
        Tensor::<2>::from_primitive::<Flex>(
            xs.clone()
                .try_into_primitive::<Ad>()
                .ok()?
                .primitive()
                .clone(),
        ),
        Tensor::<3>::from_primitive::<Flex>(prim(gate_up)?.primitive().clone()),
        Tensor::<3>::from_primitive::<Flex>(prim(down)?.primitive().clone()),
    ))
}

fn offsets_of(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |start, &c| {
            let first = *start;
            *start += c;
            Some(first)
        })
        .collect()
}

/// Experts `range`'s forward on the inner tensors (`offsets`: each expert's first row): `(h, a, y)` of each
/// expert with rows, in expert order.
fn expert_pass(
    (x_in, gu_in, d_in): &(Tensor<2>, Tensor<3>, Tensor<3>),
    counts: &[usize],
    offsets: &[usize],
    range: std::ops::Range<usize>,
) -> Vec<(Tensor<2>, Tensor<2>, Tensor<2>)> {
    let inter = d_in.dims()[1];
    // Experts are independent: rayon tasks, as in the backward; results in expert (= row) order.
    range
        .into_par_iter()
        .filter(|&e| counts[e] > 0)
        .map(|e| {
            let x_e = x_in.clone().narrow(0, offsets[e], counts[e]);
            let h = x_e.matmul(gu_in.clone().narrow(0, e, 1).squeeze_dim::<2>(0));
            let a = silu(h.clone().narrow(1, 0, inter)) * h.clone().narrow(1, inter, inter);
            let y = a
                .clone()
                .matmul(d_in.clone().narrow(0, e, 1).squeeze_dim::<2>(0));
            (h, a, y)
        })
        .collect()
}

/// The first part of [`grouped_experts`]: the forward of experts `..split` (their rows first in `xs`), or `None`
/// as [`grouped_experts`]. [`grouped_experts_rest`] runs the others and registers the one operation, so the
/// step's backward is the same whether or not it was cut.
pub(crate) fn grouped_experts_first(
    xs: &Tensor<2>,
    gate_up: &Tensor<3>,
    down: &Tensor<3>,
    counts: &[usize],
    split: usize,
) -> Option<Partial> {
    if counts.iter().all(|&c| c == 0) {
        return None;
    }
    let inner = inner(xs, gate_up, down)?;
    let offsets = offsets_of(counts);
    let split = split.min(counts.len());
    let done = expert_pass(&inner, counts, &offsets, 0..split);
    Some(Partial {
        inner,
        offsets,
        split,
        done,
    })
}

/// The rest of a step begun by [`grouped_experts_first`] on the same tensors: the forward of the remaining
/// experts, then the operation with its hand-written backward over all of them.
pub(crate) fn grouped_experts_rest(
    xs: &Tensor<2>,
    gate_up: &Tensor<3>,
    down: &Tensor<3>,
    counts: &[usize],
    first: Partial,
) -> Option<Tensor<2>> {
    let ad = |t: &Tensor<3>| t.clone().try_into_primitive::<Ad>().ok();
    let (xs, gate_up, down) = (
        xs.clone().try_into_primitive::<Ad>().ok()?,
        ad(gate_up)?,
        ad(down)?,
    );
    let Partial {
        inner,
        offsets,
        split,
        done: mut per_expert,
    } = first;
    per_expert.extend(expert_pass(&inner, counts, &offsets, split..counts.len()));
    let (x_in, gu_in, d_in) = inner;
    let mut hs = Vec::with_capacity(per_expert.len());
    let mut acts = Vec::with_capacity(per_expert.len());
    let mut ys = Vec::with_capacity(per_expert.len());
    for (h, a, y) in per_expert {
        hs.push(h);
        acts.push(a);
        ys.push(y);
    }
    let cat = |mut v: Vec<Tensor<2>>| match v.len() {
        1 => v.remove(0),
        _ => Tensor::cat(v, 0),
    };
    let (h, a, y) = (cat(hs), cat(acts), cat(ys));
    let y = into_flex(y);
    let out = match GroupedExperts
        .prepare::<NoCheckpointing>([xs.node(), gate_up.node(), down.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                xs: x_in,
                gate_up: gu_in,
                down: d_in,
                h,
                a,
                counts: counts.to_vec(),
                offsets,
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(Tensor::from_primitive::<Ad>(out))
}
