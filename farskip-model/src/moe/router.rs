//! The one router. Variants are data ([`RouterConfig`]): softmax or sigmoid scoring, renormalisation,
//! group-limited top-k (max or sum-of-top-2 group scores), DeepSeek-V3's selection-only correction bias, a
//! scaling factor, and whether the weight scales the expert input (Llama-4) or output.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{sigmoid, softmax};

use crate::config::{GroupScore, RouterConfig, Scoring};

/// Routing decisions for a set of tokens.
#[derive(Clone, Debug)]
pub struct Routing {
    /// `[tokens, top_k]` weights (differentiable w.r.t. the router and the input).
    pub weights: Tensor<2>,
    /// `[tokens, top_k]` chosen experts, best first.
    pub experts: Tensor<2, Int>,
}

/// The router of one MoE layer.
#[derive(Module, Debug)]
pub struct Router {
    /// `[hidden, num_experts]`.
    pub gate: Linear,
    /// `[num_experts]` selection bias (DeepSeek-V3 `e_score_correction_bias`).
    pub correction_bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub(crate) cfg: RouterConfig,
    #[module(skip)]
    pub(crate) top_k: usize,
}

impl Router {
    /// Random-initialised router.
    pub fn new(
        cfg: &RouterConfig,
        hidden: usize,
        num_experts: usize,
        top_k: usize,
        device: &Device,
    ) -> Self {
        Self {
            gate: LinearConfig::new(hidden, num_experts)
                .with_bias(false)
                .init(device),
            correction_bias: cfg
                .correction_bias
                .then(|| Param::from_tensor(Tensor::zeros([num_experts], device))),
            cfg: cfg.clone(),
            top_k,
        }
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// The configuration this router follows.
    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// Scores every expert and picks `top_k` per token.
    ///
    /// # Shapes
    /// - `x`: `[tokens, hidden]`
    pub fn route(&self, x: Tensor<2>) -> Routing {
        let logits = crate::matvec::linear(&self.gate, x);
        let [n, e] = logits.dims();
        let scores = match self.cfg.scoring {
            Scoring::Softmax => softmax(logits, 1),
            Scoring::Sigmoid => sigmoid(logits),
        };
        let mut select = match &self.correction_bias {
            Some(b) => scores.clone().detach() + b.val().detach().unsqueeze::<2>(),
            None => scores.clone().detach(),
        };
        if let Some(g) = self.cfg.group_limit {
            let per = e / g.num_groups;
            let grouped = select.clone().reshape([n, g.num_groups, per]);
            let group_scores: Tensor<2> = match g.group_score {
                GroupScore::Max => grouped.max_dim(2).squeeze_dim::<2>(2),
                GroupScore::SumTop2 => grouped.topk(2, 2).sum_dim(2).squeeze_dim::<2>(2),
            };
            let (_, keep) = group_scores.topk_with_indices(g.topk_groups, 1);
            let device = select.device();
            let keep_mask = Tensor::<2>::zeros([n, g.num_groups], &device).scatter(
                1,
                keep.clone(),
                Tensor::ones(keep.dims(), &device),
                burn::tensor::IndexingUpdateOp::Add,
            );
            let dropped = keep_mask
                .unsqueeze_dim::<3>(2)
                .expand([n, g.num_groups, per])
                .reshape([n, e])
                .equal_elem(0.0);
            select = select.mask_fill(dropped, f32::NEG_INFINITY);
        }
        let (_, experts) = select.topk_with_indices(self.top_k, 1);
        let mut weights = scores.gather(1, experts.clone());
        if self.cfg.renormalize {
            weights = weights.clone() / (weights.sum_dim(1) + 1e-20);
        }
        if self.cfg.scaling_factor != 1.0 {
            weights = weights.mul_scalar(self.cfg.scaling_factor);
        }
        Routing { weights, experts }
    }
}

impl Router {
    /// [`Self::route`] for router logits already on the host (`[tokens, experts]`, the gate's output): the same
    /// scoring, selection and weights, in f32, as `(weights [tokens, top_k], experts [tokens, top_k])`. Decoding
    /// uses it for its one or few tokens, where each burn op costs more than the arithmetic.
    ///
    /// Ties in the selection go to the lower expert id. `None` if the correction bias cannot be read.
    pub fn route_host(&self, logits: &[f32], tokens: usize) -> Option<(Vec<f32>, Vec<usize>)> {
        let e = logits.len() / tokens.max(1);
        let k = self.top_k;
        let bias: Option<Vec<f32>> = match &self.correction_bias {
            Some(b) => Some(crate::matvec::host_f32(&b.val())?),
            None => None,
        };
        let mut weights = Vec::with_capacity(tokens * k);
        let mut experts = Vec::with_capacity(tokens * k);
        for row in logits.chunks(e) {
            let scores: Vec<f32> = match self.cfg.scoring {
                Scoring::Softmax => {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let exps: Vec<f32> = row.iter().map(|&l| (l - max).exp()).collect();
                    let sum: f32 = exps.iter().sum();
                    exps.iter().map(|&x| x / sum).collect()
                }
                Scoring::Sigmoid => row.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
            };
            let mut select: Vec<f32> = match &bias {
                Some(b) => scores.iter().zip(b).map(|(&s, &b)| s + b).collect(),
                None => scores.clone(),
            };
            if let Some(g) = self.cfg.group_limit {
                let per = e / g.num_groups;
                let group_scores: Vec<f32> = select
                    .chunks(per)
                    .map(|grp| match g.group_score {
                        GroupScore::Max => grp.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                        GroupScore::SumTop2 => {
                            let top = top_indices(grp, 2);
                            top.iter().map(|&i| grp[i]).sum()
                        }
                    })
                    .collect();
                let keep = top_indices(&group_scores, g.topk_groups);
                for (gi, grp) in select.chunks_mut(per).enumerate() {
                    if !keep.contains(&gi) {
                        grp.fill(f32::NEG_INFINITY);
                    }
                }
            }
            let chosen = top_indices(&select, k);
            let mut w: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
            if self.cfg.renormalize {
                let sum: f32 = w.iter().sum::<f32>() + 1e-20;
                w.iter_mut().for_each(|x| *x /= sum);
            }
            if self.cfg.scaling_factor != 1.0 {
                let f = self.cfg.scaling_factor as f32;
                w.iter_mut().for_each(|x| *x *= f);
            }
            weights.extend(w);
            experts.extend(chosen);
        }
        Some((weights, experts))
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}
