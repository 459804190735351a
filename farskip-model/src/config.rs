//! The family-agnostic model configuration. A family (Qwen3-MoE, DeepSeek-V3, Llama-4, ...) is a set of
//! values here — router kind, norm placement, rope kind, attention kind — not a type. `hf.rs` turns a
//! Hugging Face `config.json` into a [`ModelConfig`]; nothing else knows HF key names.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Everything needed to build a model. Serialisable, so a trained model can be reloaded without HF.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The HF `model_type` this config came from (informative; used when saving back).
    pub family: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Epsilon of the residual RMSNorms.
    pub rms_norm_eps: f64,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Attention shape, shared by all layers.
    pub attention: AttentionConfig,
    /// Rotary embedding.
    pub rope: RopeConfig,
    /// One entry per decoder layer.
    pub layers: Vec<LayerConfig>,
    /// MoE block configuration (used by layers whose `ffn` is [`FfnKind::Moe`]).
    pub moe: Option<MoeConfig>,
}

/// Per-layer choices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerConfig {
    /// Dense MLP or MoE block.
    pub ffn: FfnKind,
    /// Whether this layer applies rotary embeddings (Llama-4 NoPE layers do not).
    pub use_rope: bool,
    /// Which keys a query may see.
    pub mask: MaskKind,
}

/// The feed-forward part of a layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FfnKind {
    /// A SwiGLU MLP with this intermediate size.
    Dense {
        /// Intermediate width.
        intermediate_size: usize,
    },
    /// The model's MoE block ([`ModelConfig::moe`]).
    Moe,
}

/// Attention visibility.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaskKind {
    /// Causal over the whole sequence.
    Causal,
    /// Causal within fixed chunks: key j is visible to query i iff j <= i and j / size == i / size (Llama-4).
    Chunked {
        /// Chunk length.
        size: usize,
    },
    /// Causal within a sliding window: key j is visible iff i - window < j <= i.
    SlidingWindow {
        /// Window length.
        window: usize,
    },
}

/// Attention kind and shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AttentionConfig {
    /// Grouped-query attention (MHA when `num_kv_heads == num_heads`).
    Gqa(GqaConfig),
    /// DeepSeek multi-head latent attention.
    Mla(MlaConfig),
}

/// Grouped-query attention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GqaConfig {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Biases on q/k/v projections (Qwen2).
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Normalisation of queries and keys.
    pub qk_norm: QkNorm,
    /// Llama-4 attention temperature tuning on NoPE layers: `(floor_scale, attn_scale)`.
    pub temperature_tuning: Option<(f64, f64)>,
}

/// Where and how q/k are normalised.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum QkNorm {
    /// No normalisation.
    None,
    /// RMSNorm with a weight over each head, before rope (Qwen3-MoE).
    PerHead,
    /// RMSNorm with a weight over the whole projection, before the split into heads (OLMoE).
    Whole,
    /// Weightless RMS (L2) norm per head after rope, on rope layers only (Llama-4).
    L2AfterRope,
}

/// DeepSeek multi-head latent attention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlaConfig {
    /// Heads.
    pub num_heads: usize,
    /// Rank of the query compression (`None`: a plain `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value latent.
    pub kv_lora_rank: usize,
    /// Non-rotary part of a query/key head.
    pub qk_nope_head_dim: usize,
    /// Rotary part of a query/key head (shared across heads for keys).
    pub qk_rope_head_dim: usize,
    /// Value head width.
    pub v_head_dim: usize,
    /// Epsilon of the q/kv latent norms.
    pub latent_norm_eps: f64,
}

/// Rotary embedding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    /// Base frequency.
    pub theta: f64,
    /// How the rotary dims are paired.
    pub layout: RopeLayout,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// Pairing of rotary dims.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeLayout {
    /// (x_i, x_{i+d/2}) pairs (`rotate_half`).
    Half,
    /// (x_{2i}, x_{2i+1}) pairs (complex multiplication).
    Interleaved,
}

/// Rope frequency scaling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain rope.
    None,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama-3 frequency-dependent scaling.
    Llama3 {
        /// Scale factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context length of the original model.
        original_max_position_embeddings: f64,
    },
    /// YaRN.
    Yarn {
        /// Scale factor.
        factor: f64,
        /// Context length of the original model.
        original_max_position_embeddings: f64,
        /// Fast boundary of the correction range (rotations).
        beta_fast: f64,
        /// Slow boundary of the correction range (rotations).
        beta_slow: f64,
        /// Multiplier of cos/sin.
        attention_factor: f64,
        /// DeepSeek's `mscale_all_dim` (scales the softmax by m(factor, mscale_all_dim)²), 0 = off.
        mscale_all_dim: f64,
        /// The configured `factor`, which DeepSeek's softmax scale uses (the frequencies use the context ratio
        /// `max_position_embeddings / original_max_position_embeddings` when the config gives the latter).
        softmax_factor: f64,
        /// Round the correction range to integers.
        truncate: bool,
    },
}

/// The MoE block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Routed experts.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Intermediate width of one routed expert.
    pub expert_intermediate_size: usize,
    /// The router.
    pub router: RouterConfig,
    /// Shared expert, if any.
    pub shared: Option<SharedExpertConfig>,
}

/// One router, variants as data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterConfig {
    /// How router logits become scores.
    pub scoring: Scoring,
    /// Renormalise the selected weights to sum to one.
    pub renormalize: bool,
    /// Group-limited top-k.
    pub group_limit: Option<GroupLimit>,
    /// A learned `e_score_correction_bias` added to scores for selection only (DeepSeek-V3).
    pub correction_bias: bool,
    /// Multiplier of the final weights (DeepSeek `routed_scaling_factor`).
    pub scaling_factor: f64,
    /// Where the routing weight is applied.
    pub weight_on: WeightOn,
}

/// Router scoring function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scoring {
    /// Softmax over all experts.
    Softmax,
    /// Independent sigmoid per expert.
    Sigmoid,
}

/// Group-limited top-k: experts are split into `num_groups` contiguous groups, only the best `topk_groups`
/// groups may be chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLimit {
    /// Number of groups (divides the expert count).
    pub num_groups: usize,
    /// Groups kept.
    pub topk_groups: usize,
    /// How a group is scored.
    pub group_score: GroupScore,
}

/// How a group of experts is scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupScore {
    /// Best score in the group (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// Sum of the two best scores (DeepSeek-V3 `noaux_tc`).
    SumTop2,
}

/// Where the routing weight multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightOn {
    /// `w · expert(x)` (most families).
    Output,
    /// `expert(w · x)` (Llama-4).
    Input,
}

/// Shared expert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedExpertConfig {
    /// Intermediate width.
    pub intermediate_size: usize,
    /// Gate the output by `sigmoid(x · w_g)` (Qwen2-MoE).
    pub gated: bool,
}

impl ModelConfig {
    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Checks every value and cross-constraint; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let pos = |key: &str, v: usize| {
            if v == 0 {
                Err(ModelError::invalid(key, "must be > 0"))
            } else {
                Ok(())
            }
        };
        pos("vocab_size", self.vocab_size)?;
        pos("hidden_size", self.hidden_size)?;
        pos("num_hidden_layers", self.layers.len())?;
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(ModelError::invalid("rms_norm_eps", "must be > 0"));
        }
        if self.rope.theta.is_nan() || self.rope.theta <= 0.0 {
            return Err(ModelError::invalid("rope_theta", "must be > 0"));
        }
        // A zero or negative scaling value does not fail anywhere later: it turns the rope tables (and so
        // the logits) into NaN / inf without an error.
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(ModelError::invalid(
                    key,
                    format!("must be a positive number, found {v}"),
                ))
            }
        };
        match &self.rope.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => positive("factor", *factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                )?;
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("high_freq_factor", *high_freq_factor)?;
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                ..
            } => {
                positive(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                )?;
                positive("factor", *factor)?;
            }
        }
        match &self.attention {
            AttentionConfig::Gqa(g) => {
                pos("num_attention_heads", g.num_heads)?;
                pos("num_key_value_heads", g.num_kv_heads)?;
                pos("head_dim", g.head_dim)?;
                if g.num_heads % g.num_kv_heads != 0 {
                    return Err(ModelError::invalid(
                        "num_key_value_heads",
                        format!(
                            "{} does not divide num_attention_heads {}",
                            g.num_kv_heads, g.num_heads
                        ),
                    ));
                }
                if g.head_dim % 2 != 0 {
                    return Err(ModelError::invalid("head_dim", "must be even for rope"));
                }
                if let Some((floor_scale, _)) = g.temperature_tuning {
                    positive("floor_scale", floor_scale)?;
                }
            }
            AttentionConfig::Mla(m) => {
                pos("num_attention_heads", m.num_heads)?;
                pos("kv_lora_rank", m.kv_lora_rank)?;
                // (the forward splits a zero-width nope part off the query, which panics)
                pos("qk_nope_head_dim", m.qk_nope_head_dim)?;
                pos("qk_rope_head_dim", m.qk_rope_head_dim)?;
                pos("v_head_dim", m.v_head_dim)?;
                if m.qk_rope_head_dim % 2 != 0 {
                    return Err(ModelError::invalid(
                        "qk_rope_head_dim",
                        "must be even for rope",
                    ));
                }
                if m.q_lora_rank == Some(0) {
                    return Err(ModelError::invalid("q_lora_rank", "must be > 0 or null"));
                }
            }
        }
        for (i, l) in self.layers.iter().enumerate() {
            match (&l.ffn, &self.moe) {
                (FfnKind::Dense { intermediate_size }, _) => {
                    pos(&format!("layer {i} intermediate_size"), *intermediate_size)?
                }
                (FfnKind::Moe, None) => {
                    return Err(ModelError::invalid(
                        format!("layer {i}"),
                        "is an MoE layer but the config has no MoE block",
                    ));
                }
                (FfnKind::Moe, Some(_)) => {}
            }
            match l.mask {
                MaskKind::Chunked { size: 0 } => {
                    return Err(ModelError::invalid("attention_chunk_size", "must be > 0"));
                }
                MaskKind::SlidingWindow { window: 0 } => {
                    return Err(ModelError::invalid("sliding_window", "must be > 0"));
                }
                _ => {}
            }
        }
        if let Some(m) = &self.moe {
            pos("num_experts", m.num_experts)?;
            pos("num_experts_per_tok", m.top_k)?;
            pos("moe_intermediate_size", m.expert_intermediate_size)?;
            if m.top_k > m.num_experts {
                return Err(ModelError::invalid(
                    "num_experts_per_tok",
                    format!("top_k {} exceeds the {} experts", m.top_k, m.num_experts),
                ));
            }
            if let Some(g) = m.router.group_limit {
                if g.num_groups == 0 || m.num_experts % g.num_groups != 0 {
                    return Err(ModelError::invalid(
                        "n_group",
                        format!(
                            "{} does not divide the {} experts",
                            g.num_groups, m.num_experts
                        ),
                    ));
                }
                if g.topk_groups == 0 || g.topk_groups > g.num_groups {
                    return Err(ModelError::invalid(
                        "topk_group",
                        format!("must be in 1..={}", g.num_groups),
                    ));
                }
                let per_group = m.num_experts / g.num_groups;
                if g.group_score == GroupScore::SumTop2 && per_group < 2 {
                    return Err(ModelError::invalid(
                        "n_group",
                        "groups need at least 2 experts for noaux_tc",
                    ));
                }
                if g.topk_groups * per_group < m.top_k {
                    return Err(ModelError::invalid(
                        "topk_group",
                        format!(
                            "{} groups of {per_group} experts cannot hold top_k {}",
                            g.topk_groups, m.top_k
                        ),
                    ));
                }
            }
            if let Some(s) = &m.shared {
                pos("shared_expert_intermediate_size", s.intermediate_size)?;
            }
        }
        Ok(())
    }

    /// A small Qwen3-MoE-like config built from a few numbers: every layer MoE, GQA with per-head q/k norm,
    /// softmax top-k router with renormalisation, optional shared expert. Used by presets and tests.
    #[allow(clippy::too_many_arguments)]
    pub fn small_moe(
        vocab_size: usize,
        hidden_size: usize,
        num_layers: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        num_experts: usize,
        top_k: usize,
        expert_intermediate_size: usize,
        shared_intermediate_size: Option<usize>,
    ) -> Self {
        Self {
            family: "qwen3_moe".into(),
            vocab_size,
            hidden_size,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            attention: AttentionConfig::Gqa(GqaConfig {
                num_heads,
                num_kv_heads,
                head_dim,
                qkv_bias: false,
                o_bias: false,
                qk_norm: QkNorm::PerHead,
                temperature_tuning: None,
            }),
            rope: RopeConfig {
                theta: 10_000.0,
                layout: RopeLayout::Half,
                scaling: RopeScaling::None,
            },
            layers: (0..num_layers)
                .map(|_| LayerConfig {
                    ffn: FfnKind::Moe,
                    use_rope: true,
                    mask: MaskKind::Causal,
                })
                .collect(),
            moe: Some(MoeConfig {
                num_experts,
                top_k,
                expert_intermediate_size,
                router: RouterConfig {
                    scoring: Scoring::Softmax,
                    renormalize: true,
                    group_limit: None,
                    correction_bias: false,
                    scaling_factor: 1.0,
                    weight_on: WeightOn::Output,
                },
                shared: shared_intermediate_size.map(|intermediate_size| SharedExpertConfig {
                    intermediate_size,
                    gated: false,
                }),
            }),
        }
    }

    /// The benchmark model: HF Qwen3-MoE with vocab 256, hidden 512, 8 layers, 8 heads, 4 KV heads,
    /// head_dim 64, 16 experts top-2 (renormalised), expert intermediate 512, every layer MoE.
    pub fn preset_small() -> Self {
        Self::small_moe(256, 512, 8, 8, 4, 64, 16, 2, 512, None)
    }
}
