//! Scaled dot-product attention as one autodiff operation with a hand-written backward (flex under autodiff).
//!
//! burn-autodiff 0.22 differentiates `attention` through its composed form: a matmul, the mask, a softmax
//! built from exp / sum / div (each with its own backward and saved tensors) and a second matmul. This
//! operation runs the same forward arithmetic on the inner tensors (so its values are those of the composed
//! form) and keeps only what the textbook backward needs — the scaled queries, keys, values and the
//! probabilities `P`:
//!
//! ```text
//! S = (q·scale) · kᵀ (+ mask → −∞),   P = softmax(S),   O = P · v
//! dv = Pᵀ · dO,   dP = dO · vᵀ,   dS = P ⊙ (dP − rowsum(dP ⊙ P)),
//! dq = scale · dS · k,   dk = dSᵀ · (q·scale)
//! ```
//!
//! Grouped-query attention shares each key/value head among `heads / kv_heads` query heads; as in the
//! composed form the query heads of a group are stacked along the rows (`[b, kv, g·t, d]`), so `dk`/`dv`
//! sum over the group inside the matmuls.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::Flex;

type Ad = Autodiff<Flex>;

#[derive(Clone, Debug)]
struct Saved {
    /// `[b, kv, g·t, d]`, already multiplied by `scale`.
    q_scaled: Tensor<4>,
    /// `[b, kv, s, d]`.
    k: Tensor<4>,
    /// `[b, kv, s, dv]`.
    v: Tensor<4>,
    /// `[b, kv, g·t, s]`.
    p: Tensor<4>,
    /// `[b, heads, t, d]` of the queries.
    q_dims: [usize; 4],
    scale: f64,
}

#[derive(Debug)]
struct AttentionCore;

impl Backward<Flex, 3> for AttentionCore {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let s = ops.state;
        let [q_parent, k_parent, v_parent] = ops.parents;
        let [b, kv, gt, _] = s.p.dims();
        let dv_dim = s.v.dims()[3];
        let d_out = Tensor::<4>::from_primitive::<Flex>(grads.consume::<Flex>(&ops.node))
            .reshape([b, kv, gt, dv_dim]);
        if let Some(node) = v_parent {
            let dv = s.p.clone().swap_dims(2, 3).matmul(d_out.clone());
            grads.register::<Flex>(node.id, into_flex(dv));
        }
        if q_parent.is_none() && k_parent.is_none() {
            return;
        }
        let dp = d_out.matmul(s.v.swap_dims(2, 3));
        let row = (dp.clone() * s.p.clone()).sum_dim(3);
        let ds = s.p * (dp - row);
        if let Some(node) = q_parent {
            let dq = ds.clone().matmul(s.k).mul_scalar(s.scale).reshape(s.q_dims);
            grads.register::<Flex>(node.id, into_flex(dq));
        }
        if let Some(node) = k_parent {
            let dk = ds.swap_dims(2, 3).matmul(s.q_scaled);
            grads.register::<Flex>(node.id, into_flex(dk));
        }
    }
}

/// The flex primitive of a (non-autodiff) flex tensor; the hand-written backwards compute on those.
pub(crate) fn into_flex<const D: usize>(t: Tensor<D>) -> burn_flex::FlexTensor {
    t.try_into_primitive::<Flex>()
        .expect("the backward computes on flex tensors")
}

/// The composed form's first half: the scaled queries with a group's heads stacked along the rows, `[b, kv,
/// g·t, d]`, and the attention probabilities `P = softmax((q·scale)·kᵀ, masked)`, `[b, kv, g·t, s]`. `mask`:
/// `[t, s]`, `true` where the key is hidden from the query. The hand-written operation runs it on the inner
/// tensors; other backends differentiate it as composed.
///
/// # Shapes
/// - `q`: `[b, heads, t, d]`; `k`: `[b, kv_heads, s, d]`
pub(crate) fn probabilities(
    q: Tensor<4>,
    k: Tensor<4>,
    scale: f64,
    mask: Option<Tensor<2, Bool>>,
) -> (Tensor<4>, Tensor<4>) {
    let [b, heads, t, d] = q.dims();
    let [_, kv, s, _] = k.dims();
    let g = heads / kv;
    let q_scaled = q.mul_scalar(scale).reshape([b, kv, g * t, d]);
    let mut scores = q_scaled.clone().matmul(k.swap_dims(2, 3));
    if let Some(mask) = mask {
        scores = scores
            .reshape([b, kv, g, t, s])
            .mask_fill(mask.reshape([1, 1, 1, t, s]), f32::NEG_INFINITY)
            .reshape([b, kv, g * t, s]);
    }
    (q_scaled, softmax(scores, 3))
}

/// The composed form's second half: `P · v` back in `[b, heads, t, dv]` (`q_dims` = the queries' dims).
pub(crate) fn weighted_values(p: Tensor<4>, v: Tensor<4>, q_dims: [usize; 4]) -> Tensor<4> {
    let [b, heads, t, _] = q_dims;
    let dv = v.dims()[3];
    p.matmul(v).reshape([b, heads, t, dv])
}

/// `softmax(q·scale·kᵀ, masked) · v` under autodiff on flex with the hand-written backward, or `None` when the
/// tensors are not autodiff-on-flex tensors (the caller then composes it from tensor ops). `hidden(t, s)`
/// builds the `[t, s]` mask (`true` = key hidden from the query) on the device it is given, or `None`.
///
/// # Shapes
/// - `q`: `[b, heads, t, d]`; `k`: `[b, kv_heads, s, d]`; `v`: `[b, kv_heads, s, dv]` -> `[b, heads, t, dv]`
pub(crate) fn attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    scale: f64,
    hidden: impl FnOnce(&Device) -> Option<Tensor<2, Bool>>,
) -> Option<Tensor<4>> {
    let q = q.clone().try_into_primitive::<Ad>().ok()?;
    let k = k.clone().try_into_primitive::<Ad>().ok()?;
    let v = v.clone().try_into_primitive::<Ad>().ok()?;
    let q_in = Tensor::<4>::from_primitive::<Flex>(q.primitive().clone());
    let k_in = Tensor::<4>::from_primitive::<Flex>(k.primitive().clone());
    let v_in = Tensor::<4>::from_primitive::<Flex>(v.primitive().clone());
    let q_dims = q_in.dims();
    let mask = hidden(&k_in.device());
    let (q_scaled, p) = probabilities(q_in, k_in.clone(), scale, mask);
    let out = into_flex(weighted_values(p.clone(), v_in.clone(), q_dims));
    let out = match AttentionCore
        .prepare::<NoCheckpointing>([q.node(), k.node(), v.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                q_scaled,
                k: k_in,
                v: v_in,
                p,
                q_dims,
                scale,
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(Tensor::from_primitive::<Ad>(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The composed form, differentiated by burn-autodiff op by op (what the operation replaces).
    fn composed(
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        scale: f64,
        mask: Option<Tensor<2, Bool>>,
    ) -> Tensor<4> {
        let q_dims = q.dims();
        let (_, p) = probabilities(q, k, scale, mask);
        weighted_values(p, v, q_dims)
    }

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    #[test]
    fn hand_written_backward_matches_the_composed_attention() {
        for shape in [(2, 4, 2, 5, 7, 8), (1, 2, 1, 2, 2, 16), (4, 2, 1, 2, 2, 16)] {
            check_shape(shape);
        }
    }

    fn check_shape((b, heads, kv, t, s, d): (usize, usize, usize, usize, usize, usize)) {
        let device = Device::flex().autodiff();
        let r =
            |dims: [usize; 4]| Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v) = (r([b, heads, t, d]), r([b, kv, s, d]), r([b, kv, s, d]));
        let probe = r([b, heads, t, d]);
        // Queries at positions 2..7 over keys 0..7, causal; and no mask at all.
        let causal = |dev: &Device| {
            let data: Vec<bool> = (0..t)
                .flat_map(|i| (0..s).map(move |j| j > i + 2))
                .collect();
            Some(Tensor::<2, Bool>::from_data(
                TensorData::new(data, [t, s]),
                dev,
            ))
        };
        for masked in [true, false] {
            for tracked in [
                [true, true, true],
                [false, true, true],
                [true, false, false],
            ] {
                let leaves = [&q, &k, &v].map(|x| x.clone().detach());
                let leaves: Vec<Tensor<4>> = leaves
                    .into_iter()
                    .zip(tracked)
                    .map(|(x, tr)| if tr { x.require_grad() } else { x })
                    .collect();
                let mask = |dev: &Device| if masked { causal(dev) } else { None };
                let got = attention(&leaves[0], &leaves[1], &leaves[2], 0.35, mask)
                    .expect("autodiff on flex");
                let want = composed(
                    leaves[0].clone(),
                    leaves[1].clone(),
                    leaves[2].clone(),
                    0.35,
                    mask(&device),
                );
                assert!(max_diff(got.clone().inner(), want.clone().inner()) < 1e-6);
                let g_got = (got * probe.clone()).sum().backward();
                let g_want = (want * probe.clone()).sum().backward();
                for (i, x) in leaves.iter().enumerate() {
                    match (x.grad(&g_got), x.grad(&g_want)) {
                        (Some(a), Some(b)) => {
                            let diff = max_diff(a, b);
                            assert!(
                                diff < 1e-5,
                                "masked {masked}, input {i}: gradients differ by {diff}"
                            );
                        }
                        (None, None) => assert!(!tracked[i]),
                        _ => panic!("masked {masked}, input {i}: gradient present in one run only"),
                    }
                }
            }
        }
    }
}
