//! Held-out evaluation: cross-entropy / perplexity on the data, and agreement and KL with a teacher.
//! The teacher's validation logits are computed once and reused (the teacher is frozen).

use burn::prelude::*;
use farskip_model::Model;
use serde::{Deserialize, Serialize};

use crate::data::{ValidationSet, inputs_targets};
use crate::losses::{cross_entropy, mean_kl, perplexity, top1_agreement};

/// Held-out metrics of one model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub ppl: f64,
    /// Top-1 agreement with the teacher (fraction of tokens).
    pub agreement: Option<f64>,
    /// Mean per-token KL(teacher ‖ model).
    pub kl: Option<f64>,
}

/// The teacher's logits on every validation batch.
#[derive(Clone, Debug)]
pub struct TeacherLogits {
    batches: Vec<Tensor<3>>,
}

impl TeacherLogits {
    /// Runs the teacher once over the validation set.
    pub fn new(teacher: &Model, valid: &ValidationSet, device: &Device) -> Self {
        Self {
            batches: valid
                .batches(device)
                .map(|w| teacher.forward_unchecked(inputs_targets(w).0, None))
                .collect(),
        }
    }
}

/// Evaluates `model` (any device; run on a `valid()` copy) on the validation set.
pub fn evaluate(
    model: &Model,
    valid: &ValidationSet,
    teacher: Option<&TeacherLogits>,
    device: &Device,
) -> Evaluation {
    let (mut ce, mut agree, mut kl, mut tokens) = (0.0, 0.0, 0.0, 0.0);
    for (i, windows) in valid.batches(device).enumerate() {
        let (x, y) = inputs_targets(windows);
        let n = (y.dims()[0] * y.dims()[1]) as f64;
        let logits = model.forward_unchecked(x, None);
        ce += n * cross_entropy(logits.clone(), y).into_scalar::<f64>();
        if let Some(t) = teacher {
            let tl = t.batches[i].clone();
            agree += n * top1_agreement(tl.clone(), logits.clone());
            kl += n * mean_kl(tl, logits);
        }
        tokens += n;
    }
    let loss = ce / tokens;
    Evaluation {
        loss,
        ppl: perplexity(loss),
        agreement: teacher.map(|_| agree / tokens),
        kl: teacher.map(|_| kl / tokens),
    }
}
