//! Training losses and evaluation metrics for FCSD (DESIGN.md §2).
//!
//! The FCSD loss is `T² · KL(softmax(teacher/T) ‖ softmax(student/T))`, mean over tokens; the baselines are
//! cross-entropy on the data (SFT) and KL plus an L2 penalty on intermediate hidden states. Every loss works on
//! logits of any rank ≥ 2 (`[batch, seq, vocab]` or `[tokens, vocab]`): all leading dims count as tokens.
//! Losses use `log_softmax`, never `softmax(..).log()`, so logits of ±1000 stay finite. Teacher tensors are
//! detached, so a teacher run on the autodiff device gets no gradient.
//!
//! The metric helpers (`top1_agreement`, `mean_kl`, `perplexity`) read back to the host and return `f64`.
//! What does not live here: the model forward passes and the training loop.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// Distillation loss: `T² · mean over tokens of KL(softmax(teacher/T) ‖ softmax(student/T))`.
///
/// Forward KL, teacher first, as in the paper (which uses `T = 1`). The `T²` factor keeps the gradient's scale
/// independent of the temperature: `∂L/∂student = T · (softmax(s/T) − softmax(t/T)) / N`.
///
/// # Shapes
/// - `student_logits`, `teacher_logits`: `[..., vocab]`, the same shape (e.g. `[batch, seq, vocab]`)
/// - output: `[1]`
///
/// # Panics
/// If the shapes differ, the logits have rank < 2 or no tokens, or `temperature` is not finite and positive.
pub fn kl_distill<const D: usize>(
    student_logits: Tensor<D>,
    teacher_logits: Tensor<D>,
    temperature: f64,
) -> Tensor<1> {
    assert_same_shape(
        "kl_distill",
        "teacher_logits",
        &student_logits,
        &teacher_logits,
    );
    assert!(
        temperature.is_finite() && temperature > 0.0,
        "kl_distill: temperature must be finite and > 0, got {temperature}"
    );
    let student = tokens_by_vocab("kl_distill", student_logits);
    let teacher = tokens_by_vocab("kl_distill", teacher_logits.detach());
    let n_tokens = student.dims()[0] as f64;
    // mul_scalar, not div_scalar: burn-autodiff 0.22 computes div_scalar's backward factor in f32.
    let log_p_teacher = log_softmax(teacher.mul_scalar(1.0 / temperature), 1);
    let log_p_student = log_softmax(student.mul_scalar(1.0 / temperature), 1);
    // A teacher probability that underflows to 0 contributes 0 · (finite) = 0: log_softmax keeps both logs finite.
    (log_p_teacher.clone().exp() * (log_p_teacher - log_p_student))
        .sum()
        .mul_scalar(temperature * temperature / n_tokens)
}

/// Cross-entropy of `logits` against integer `targets`, mean over tokens (the SFT baseline).
///
/// # Shapes
/// - `logits`: `[..., vocab]` (rank `D`)
/// - `targets`: `[...]`, the leading dims of `logits` (rank `D - 1`), values in `0..vocab`
/// - output: `[1]`
///
/// # Panics
/// If the target shape is not the logits shape without its last dim, or there are no tokens. A target outside
/// `0..vocab` panics on flex (other backends may not check).
pub fn cross_entropy<const D: usize, const DT: usize>(
    logits: Tensor<D>,
    targets: Tensor<DT, Int>,
) -> Tensor<1> {
    let (logit_dims, target_dims) = (logits.dims(), targets.dims());
    assert!(
        DT + 1 == D && logit_dims[..D - 1] == target_dims[..],
        "cross_entropy: targets shape {target_dims:?} must equal logits shape {logit_dims:?} without its last (vocab) dim"
    );
    let logits = tokens_by_vocab("cross_entropy", logits);
    let n_tokens = logits.dims()[0];
    let targets = targets.reshape([n_tokens, 1]);
    log_softmax(logits, 1).gather(1, targets).mean().neg()
}

/// The KL + L2 baseline: `kl_distill(..) + l2_weight · mean over layers of mean((h_student − h_teacher)²)`.
///
/// # Shapes
/// - `student_logits`, `teacher_logits`: `[..., vocab]`, the same shape
/// - `student_hidden[l]`, `teacher_hidden[l]`: `[batch, seq, hidden]`, the same shape per layer
/// - output: `[1]`
///
/// # Panics
/// As [`kl_distill`] and [`hidden_mse`]; also if `l2_weight` is not finite and ≥ 0.
pub fn kl_l2<const D: usize>(
    student_logits: Tensor<D>,
    teacher_logits: Tensor<D>,
    student_hidden: &[Tensor<3>],
    teacher_hidden: &[Tensor<3>],
    temperature: f64,
    l2_weight: f64,
) -> Tensor<1> {
    assert!(
        l2_weight.is_finite() && l2_weight >= 0.0,
        "kl_l2: l2_weight must be finite and >= 0, got {l2_weight}"
    );
    let kl = kl_distill(student_logits, teacher_logits, temperature);
    kl + hidden_mse(student_hidden, teacher_hidden).mul_scalar(l2_weight)
}

/// Mean over layers of the mean squared difference between student and (detached) teacher hidden states.
///
/// # Shapes
/// - `student_hidden[l]`, `teacher_hidden[l]`: `[batch, seq, hidden]`, the same shape per layer
/// - output: `[1]`
///
/// # Panics
/// If the slices are empty (no layers to compare — collect the hidden states, or use [`kl_distill`]), have
/// different lengths, or a layer's shapes differ.
pub fn hidden_mse(student_hidden: &[Tensor<3>], teacher_hidden: &[Tensor<3>]) -> Tensor<1> {
    assert!(
        student_hidden.len() == teacher_hidden.len() && !student_hidden.is_empty(),
        "hidden_mse: need the same non-zero number of student and teacher layers, got {} and {}",
        student_hidden.len(),
        teacher_hidden.len()
    );
    let n_layers = student_hidden.len() as f64;
    let per_layer = student_hidden
        .iter()
        .zip(teacher_hidden)
        .enumerate()
        .map(|(layer, (s, t))| {
            assert_same_shape("hidden_mse", &format!("teacher_hidden[{layer}]"), s, t);
            (s.clone() - t.clone().detach()).square().mean()
        });
    per_layer
        .reduce(|acc, layer| acc + layer)
        .map(|sum| sum.mul_scalar(1.0 / n_layers))
        .expect("non-empty, asserted above")
}

/// Fraction of tokens on which the two models' most likely next token (argmax of the logits) agrees.
///
/// # Shapes
/// - `a_logits`, `b_logits`: `[..., vocab]`, the same shape
///
/// # Panics
/// If the shapes differ, or the logits have rank < 2 or no tokens.
pub fn top1_agreement<const D: usize>(a_logits: Tensor<D>, b_logits: Tensor<D>) -> f64 {
    assert_same_shape("top1_agreement", "b_logits", &a_logits, &b_logits);
    let a = tokens_by_vocab("top1_agreement", a_logits.detach()).argmax(1);
    let b = tokens_by_vocab("top1_agreement", b_logits.detach()).argmax(1);
    let n_tokens = a.dims()[0] as f64;
    let agree: i64 = a.equal(b).int().sum().into_scalar();
    agree as f64 / n_tokens
}

/// Mean over tokens of `KL(softmax(teacher) ‖ softmax(model))` at temperature 1, as a number for logging.
///
/// Note the argument order: teacher first (as in the KL), unlike [`kl_distill`] which takes the student first.
///
/// # Shapes
/// - `teacher_logits`, `model_logits`: `[..., vocab]`, the same shape
///
/// # Panics
/// As [`kl_distill`].
pub fn mean_kl<const D: usize>(teacher_logits: Tensor<D>, model_logits: Tensor<D>) -> f64 {
    kl_distill(model_logits.detach(), teacher_logits, 1.0).into_scalar()
}

/// Perplexity from a mean cross-entropy in nats: `exp(ce)`.
pub fn perplexity(cross_entropy: f64) -> f64 {
    cross_entropy.exp()
}

/// Flattens `[..., vocab]` to `[tokens, vocab]`.
fn tokens_by_vocab<const D: usize>(what: &str, logits: Tensor<D>) -> Tensor<2> {
    let dims = logits.dims();
    assert!(
        D >= 2,
        "{what}: logits need rank >= 2 ([..., vocab]), got shape {dims:?}"
    );
    let n_tokens: usize = dims[..D - 1].iter().product();
    assert!(
        n_tokens > 0,
        "{what}: logits of shape {dims:?} hold no tokens"
    );
    logits.reshape([n_tokens, dims[D - 1]])
}

fn assert_same_shape<const D: usize>(
    what: &str,
    other_name: &str,
    reference: &Tensor<D>,
    other: &Tensor<D>,
) {
    let (a, b) = (reference.dims(), other.dims());
    assert!(
        a == b,
        "{what}: {other_name} has shape {b:?}, expected {a:?}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Distribution, TensorData};

    fn f64_tensor<const D: usize>(values: &[f64], shape: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), shape),
            (device, DType::F64),
        )
    }

    fn host(t: Tensor<1>) -> f64 {
        t.into_scalar()
    }

    fn host_vec<const D: usize>(t: Tensor<D>) -> Vec<f64> {
        t.into_data().try_into_vec_as::<f64>().expect("float data")
    }

    /// Reference log-softmax in f64 over rows of `vocab` values.
    fn log_softmax_rows(values: &[f64], vocab: usize, temperature: f64) -> Vec<f64> {
        values
            .chunks(vocab)
            .flat_map(|row| {
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max) / temperature;
                let lse = max
                    + row
                        .iter()
                        .map(|v| (v / temperature - max).exp())
                        .sum::<f64>()
                        .ln();
                row.iter()
                    .map(move |v| v / temperature - lse)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Checks `grad` against central differences of `loss_at` (f64), per element, relative error < 1e-3.
    fn assert_matches_finite_differences(
        grad: &[f64],
        point: &[f64],
        loss_at: impl Fn(&[f64]) -> f64,
    ) {
        let h = 1e-5;
        for i in 0..point.len() {
            let (mut plus, mut minus) = (point.to_vec(), point.to_vec());
            plus[i] += h;
            minus[i] -= h;
            let fd = (loss_at(&plus) - loss_at(&minus)) / (2.0 * h);
            let rel = (grad[i] - fd).abs() / fd.abs().max(1e-4);
            assert!(
                rel < 1e-3,
                "element {i}: autodiff {} vs finite difference {fd} (rel err {rel})",
                grad[i]
            );
        }
    }

    #[test]
    fn kl_is_zero_for_identical_logits() {
        let device = Device::flex();
        let logits = Tensor::<3>::random([2, 5, 7], Distribution::Normal(0.0, 3.0), &device);
        for temperature in [0.5, 1.0, 2.0] {
            let kl = host(kl_distill(logits.clone(), logits.clone(), temperature));
            assert!(
                kl.abs() < 1e-7,
                "T={temperature}: KL of identical logits is {kl}"
            );
        }
    }

    #[test]
    fn kl_matches_hand_computed_value() {
        let device = Device::flex();
        let student = [0.5, -1.0, 2.0, 1.5, 0.0, -0.5];
        let teacher = [1.0, 0.0, -1.0, 0.3, 0.2, 2.5];
        let temperature = 2.0;
        let (ls, lt) = (
            log_softmax_rows(&student, 3, temperature),
            log_softmax_rows(&teacher, 3, temperature),
        );
        let expected: f64 = lt
            .iter()
            .zip(&ls)
            .map(|(t, s)| t.exp() * (t - s))
            .sum::<f64>()
            / 2.0
            * temperature
            * temperature;
        // [batch=1, seq=2, vocab=3] in f32: exercises the flattening of leading dims.
        let s = Tensor::<3>::from_data(
            TensorData::new(student.map(|v| v as f32).to_vec(), [1, 2, 3]),
            &device,
        );
        let t = Tensor::<3>::from_data(
            TensorData::new(teacher.map(|v| v as f32).to_vec(), [1, 2, 3]),
            &device,
        );
        let kl = host(kl_distill(s, t, temperature));
        assert!(
            (kl - expected).abs() < 1e-6 * expected.max(1.0),
            "KL {kl}, hand value {expected}"
        );
        assert!(expected > 0.1, "the case must not be trivial: {expected}");
    }

    #[test]
    fn kl_gradient_matches_finite_differences_and_analytic_form() {
        let plain = Device::flex();
        let autodiff = Device::flex().autodiff();
        let (shape, vocab, n_tokens) = ([2, 3, 4], 4, 6.0);
        let student: Vec<f64> = (0..24).map(|i| ((i * 7 % 11) as f64 - 5.0) * 0.4).collect();
        let teacher: Vec<f64> = (0..24).map(|i| ((i * 5 % 13) as f64 - 6.0) * 0.3).collect();
        let temperature = 1.5;

        let s_leaf = f64_tensor(&student, shape, &autodiff).require_grad();
        let t_ad = f64_tensor(&teacher, shape, &autodiff);
        let grads = kl_distill(s_leaf.clone(), t_ad, temperature).backward();
        let grad = host_vec(s_leaf.grad(&grads).expect("student logits are a grad leaf"));

        let loss_at = |s: &[f64]| {
            host(kl_distill(
                f64_tensor(s, shape, &plain),
                f64_tensor(&teacher, shape, &plain),
                temperature,
            ))
        };
        assert_matches_finite_differences(&grad, &student, loss_at);

        let (ls, lt) = (
            log_softmax_rows(&student, vocab, temperature),
            log_softmax_rows(&teacher, vocab, temperature),
        );
        for (i, g) in grad.iter().enumerate() {
            let analytic = temperature * (ls[i].exp() - lt[i].exp()) / n_tokens;
            assert!(
                (g - analytic).abs() < 1e-12,
                "element {i}: autodiff {g} vs analytic {analytic}"
            );
        }
    }

    #[test]
    fn teacher_gets_no_gradient() {
        let autodiff = Device::flex().autodiff();
        let s =
            Tensor::<2>::random([3, 5], Distribution::Normal(0.0, 1.0), &autodiff).require_grad();
        let t =
            Tensor::<2>::random([3, 5], Distribution::Normal(0.0, 1.0), &autodiff).require_grad();
        let grads = kl_distill(s.clone(), t.clone(), 1.0).backward();
        assert!(s.grad(&grads).is_some());
        assert!(t.grad(&grads).is_none(), "the teacher must be detached");
    }

    #[test]
    fn losses_are_stable_for_huge_logits() {
        let autodiff = Device::flex().autodiff();
        let s = Tensor::<2>::from_data([[1000.0, 0.0, -1000.0]], &autodiff).require_grad();
        let t = Tensor::<2>::from_data([[-1000.0, 0.0, 1000.0]], &autodiff);
        let loss = kl_distill(s.clone(), t, 1.0);
        let grad = host_vec(s.grad(&loss.backward()).expect("grad leaf"));
        let kl = host(loss);
        // p_teacher ≈ [0, 0, 1]: KL ≈ log p_t[2] − log p_s[2] = 0 − (−2000).
        assert!((kl - 2000.0).abs() < 1e-3, "KL {kl}");
        assert!(grad.iter().all(|g| g.is_finite()), "grad {grad:?}");
        assert!(
            (grad[0] - 1.0).abs() < 1e-6 && (grad[2] + 1.0).abs() < 1e-6,
            "grad {grad:?}"
        );

        let ce = host(cross_entropy(
            s.clone(),
            Tensor::<1, Int>::from_data([2], &autodiff),
        ));
        assert!((ce - 2000.0).abs() < 1e-3, "CE {ce}");
    }

    #[test]
    fn cross_entropy_matches_hand_value() {
        let device = Device::flex();
        let logits = Tensor::<3>::from_data([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]], &device);
        let targets = Tensor::<2, Int>::from_data([[2, 1]], &device);
        let expected = ((1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 3.0 + 3f64.ln()) / 2.0;
        let ce = host(cross_entropy(logits, targets));
        assert!(
            (ce - expected).abs() < 1e-6,
            "CE {ce}, hand value {expected}"
        );
        assert!((perplexity(ce) - expected.exp()).abs() < 1e-5);
    }

    #[test]
    fn kl_l2_gradient_matches_finite_differences_and_analytic_form() {
        let plain = Device::flex();
        let autodiff = Device::flex().autodiff();
        let (logit_shape, hidden_shape) = ([1, 2, 3], [1, 2, 2]);
        let student: Vec<f64> = vec![0.3, -0.2, 1.1, -0.7, 0.4, 0.0];
        let teacher: Vec<f64> = vec![-0.5, 0.9, 0.2, 0.1, 0.1, -1.2];
        let s_hidden = [vec![0.5, -1.0, 0.25, 2.0], vec![-0.3, 0.8, 1.5, -0.6]];
        let t_hidden = [vec![0.1, -0.4, 0.75, 1.0], vec![0.2, 0.3, -0.5, -0.1]];
        let (temperature, l2_weight) = (1.0, 0.7);

        let loss_on = |device: &Device, s: &[f64], h0: &[f64], h1: &[f64]| {
            let sh = [
                f64_tensor(h0, hidden_shape, device),
                f64_tensor(h1, hidden_shape, device),
            ];
            let th = t_hidden
                .each_ref()
                .map(|h| f64_tensor(h, hidden_shape, device));
            let (s, t) = (
                f64_tensor(s, logit_shape, device),
                f64_tensor(&teacher, logit_shape, device),
            );
            host(kl_l2(s, t, &sh, &th, temperature, l2_weight))
        };

        // Gradients w.r.t. the logits and both hidden layers, from one backward.
        let s_leaf = f64_tensor(&student, logit_shape, &autodiff).require_grad();
        let h_leaves = s_hidden
            .each_ref()
            .map(|h| f64_tensor(h, hidden_shape, &autodiff).require_grad());
        let th = t_hidden
            .each_ref()
            .map(|h| f64_tensor(h, hidden_shape, &autodiff));
        let t = f64_tensor(&teacher, logit_shape, &autodiff);
        let grads = kl_l2(s_leaf.clone(), t, &h_leaves, &th, temperature, l2_weight).backward();
        let grad_s = host_vec(s_leaf.grad(&grads).expect("grad leaf"));
        let grad_h = h_leaves
            .each_ref()
            .map(|h| host_vec(h.grad(&grads).expect("grad leaf")));

        assert_matches_finite_differences(&grad_s, &student, |s| {
            loss_on(&plain, s, &s_hidden[0], &s_hidden[1])
        });
        assert_matches_finite_differences(&grad_h[0], &s_hidden[0], |h| {
            loss_on(&plain, &student, h, &s_hidden[1])
        });
        assert_matches_finite_differences(&grad_h[1], &s_hidden[1], |h| {
            loss_on(&plain, &student, &s_hidden[0], h)
        });

        // d/dh_l of w · (1/L) Σ_l mean((h_l − t_l)²) = w · 2 (h_l − t_l) / (numel · L).
        for layer in 0..2 {
            for (i, g) in grad_h[layer].iter().enumerate() {
                let analytic =
                    l2_weight * 2.0 * (s_hidden[layer][i] - t_hidden[layer][i]) / (4.0 * 2.0);
                assert!(
                    (g - analytic).abs() < 1e-12,
                    "layer {layer} element {i}: {g} vs {analytic}"
                );
            }
        }
    }

    #[test]
    fn kl_l2_adds_weighted_hidden_mse() {
        let device = Device::flex();
        let s = Tensor::<2>::from_data([[0.1, 0.2], [0.3, -0.4]], &device);
        let t = Tensor::<2>::from_data([[0.5, 0.2], [-0.3, 0.4]], &device);
        let sh = [
            Tensor::<3>::from_data([[[1.0, 2.0]]], &device),
            Tensor::<3>::from_data([[[0.0, 0.0]]], &device),
        ];
        let th = [
            Tensor::<3>::from_data([[[1.0, 0.0]]], &device),
            Tensor::<3>::from_data([[[3.0, -1.0]]], &device),
        ];
        // Layer MSEs: (0 + 4)/2 = 2 and (9 + 1)/2 = 5; mean over layers 3.5.
        let kl = host(kl_distill(s.clone(), t.clone(), 1.0));
        let total = host(kl_l2(s, t, &sh, &th, 1.0, 0.1));
        assert!((total - (kl + 0.35)).abs() < 1e-6, "KL+L2 {total}, KL {kl}");
    }

    #[test]
    fn metrics_on_small_cases() {
        let device = Device::flex();
        let a = Tensor::<2>::from_data(
            [
                [1.0, 0.0, 0.0],
                [0.0, 2.0, 0.0],
                [0.0, 0.0, 3.0],
                [5.0, 1.0, 0.0],
            ],
            &device,
        );
        let b = Tensor::<2>::from_data(
            [
                [2.0, 1.0, 0.0],
                [0.0, 0.0, 1.0],
                [0.0, 1.0, 4.0],
                [0.0, 0.0, 9.0],
            ],
            &device,
        );
        assert_eq!(top1_agreement(a.clone(), b.clone()), 0.5);
        assert_eq!(top1_agreement(a.clone(), a.clone()), 1.0);
        let expected = host(kl_distill(b.clone(), a.clone(), 1.0));
        assert!((mean_kl(a, b) - expected).abs() < 1e-12);
        assert!((perplexity(5f64.ln()) - 5.0).abs() < 1e-12);
    }

    #[test]
    #[should_panic(expected = "kl_distill: teacher_logits has shape [2, 4], expected [2, 3]")]
    fn kl_rejects_mismatched_shapes() {
        let device = Device::flex();
        kl_distill(
            Tensor::<2>::zeros([2, 3], &device),
            Tensor::<2>::zeros([2, 4], &device),
            1.0,
        );
    }

    #[test]
    #[should_panic(expected = "cross_entropy: targets shape [3]")]
    fn cross_entropy_rejects_mismatched_targets() {
        let device = Device::flex();
        cross_entropy(
            Tensor::<2>::zeros([2, 3], &device),
            Tensor::<1, Int>::zeros([3], &device),
        );
    }
}
