//! Hugging Face checkpoints: `config.json` keys per family and safetensors tensor names. The only file that
//! knows HF names.

use std::path::Path;

use burn::module::Param;
use burn::nn::{Linear, RmsNorm};
use burn::prelude::*;
use burn::tensor::FloatDType;
use safetensors::Dtype;
use serde_json::Value;

use crate::attention::AttentionKind;
use crate::checkpoint::{TensorStore, TensorWriter};
use crate::config::*;
use crate::connectivity::{Connectivity, FarSkip, FarSkipVariant};
use crate::error::{ModelError, Result};
use crate::memory::MemoryCheck;
use crate::mlp::{Mlp, SharedExpert};
use crate::model::{Ffn, Model};
use crate::moe::{ExpertBank, MoeBlock};
use crate::rope::Rope;

mod check;

/// The `model_type`s this crate loads.
pub const SUPPORTED_FAMILIES: [&str; 7] = [
    "qwen3_moe",
    "qwen2_moe",
    "deepseek_v2",
    "deepseek_v3",
    "llama4_text",
    "mixtral",
    "olmoe",
];

/// The most decoder layers [`parse_config`] accepts (published MoE models have at most a few hundred).
pub const MAX_LAYERS: usize = 1 << 16;

/// Typed access to config.json with errors that name the key.
struct Json<'a> {
    v: &'a Value,
}

impl Json<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| ModelError::invalid(key, "missing from config.json"))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                ModelError::invalid(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| ModelError::invalid(key, format!("expected a number, found {v}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| ModelError::invalid(key, format!("expected true/false, found {v}"))),
        }
    }
    fn usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64().map(|x| x as usize).ok_or_else(|| {
                        ModelError::invalid(key, format!("expected integers, found {x}"))
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(ModelError::invalid(
                key,
                format!("expected a list, found {v}"),
            )),
        }
    }
    fn str_list(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str().map(String::from).ok_or_else(|| {
                        ModelError::invalid(key, format!("expected strings, found {x}"))
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(ModelError::invalid(
                key,
                format!("expected a list, found {v}"),
            )),
        }
    }
}

fn parse_rope(j: &Json, layout: RopeLayout) -> Result<RopeConfig> {
    // transformers 5.x: `rope_parameters`; 4.x: `rope_theta` + `rope_scaling`.
    let params = j.get("rope_parameters").or_else(|| j.get("rope_scaling"));
    let p = params.map(|v| Json { v });
    let theta = match &p {
        Some(p) if p.get("rope_theta").is_some() => p.f64_or("rope_theta", 10_000.0)?,
        _ => j.f64_or("rope_theta", 10_000.0)?,
    };
    let kind = p
        .as_ref()
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(|v| v.as_str())
        .unwrap_or("default")
        .to_string();
    let num = |key: &str, default: f64| match &p {
        Some(p) => p.f64_or(key, default),
        None => Ok(default),
    };
    let scaling = match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor", 1.0)?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor", 8.0)?,
            low_freq_factor: num("low_freq_factor", 1.0)?,
            high_freq_factor: num("high_freq_factor", 4.0)?,
            original_max_position_embeddings: num("original_max_position_embeddings", 8192.0)?,
        },
        "yarn" => {
            let max_pos = j.f64_or("max_position_embeddings", 2048.0)?;
            let config_factor = num("factor", 1.0)?;
            let original = p
                .as_ref()
                .and_then(|p| p.get("original_max_position_embeddings"))
                .and_then(|v| v.as_f64());
            // As transformers: with an explicit original context, the factor is the context ratio.
            let (factor, original) = match original {
                Some(o) => (max_pos / o, o),
                None => (config_factor, max_pos),
            };
            let mscale = num("mscale", 0.0)?;
            let mscale_all_dim = num("mscale_all_dim", 0.0)?;
            let attention_factor = match p
                .as_ref()
                .and_then(|p| p.get("attention_factor"))
                .and_then(|v| v.as_f64())
            {
                Some(a) => a,
                None => Rope::yarn_attention_factor(factor, mscale, mscale_all_dim),
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: num("beta_fast", 32.0)?,
                beta_slow: num("beta_slow", 1.0)?,
                attention_factor,
                mscale_all_dim,
                softmax_factor: config_factor,
                truncate: p
                    .as_ref()
                    .map(|p| p.bool_or("truncate", true))
                    .transpose()?
                    .unwrap_or(true),
            }
        }
        other => {
            return Err(ModelError::invalid(
                "rope_type",
                format!("`{other}` is not supported"),
            ));
        }
    };
    Ok(RopeConfig {
        theta,
        layout,
        scaling,
    })
}

/// Parses an HF `config.json` value into a [`ModelConfig`].
pub fn parse_config(v: &Value) -> Result<ModelConfig> {
    let j = Json { v };
    let family = j
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| ModelError::invalid("model_type", "missing from config.json"))?
        .to_string();
    if !SUPPORTED_FAMILIES.contains(&family.as_str()) {
        return Err(ModelError::UnknownModelType(family));
    }
    let hidden = j.usize("hidden_size")?;
    let layers_n = j.usize("num_hidden_layers")?;
    // One layer config per layer is built here, before any weights file is read: a count no model comes near
    // is a corrupt value, refused rather than iterated over. (Loading compares the count with the checkpoint's
    // layers first, so a checkpoint gets the error naming its first missing layer.)
    if layers_n > MAX_LAYERS {
        return Err(ModelError::invalid(
            "num_hidden_layers",
            format!("{layers_n} is more than {MAX_LAYERS} layers"),
        ));
    }
    let heads = j.usize("num_attention_heads")?;
    let kv_heads = j.opt_usize("num_key_value_heads")?.unwrap_or(heads);
    if heads == 0 {
        return Err(ModelError::invalid("num_attention_heads", "must be > 0"));
    }
    let head_dim = j.opt_usize("head_dim")?.unwrap_or(hidden / heads);
    let eps = j.f64_or("rms_norm_eps", 1e-6)?;
    let experts = || -> Result<usize> {
        for key in ["num_experts", "num_local_experts", "n_routed_experts"] {
            if let Some(n) = j.opt_usize(key)? {
                return Ok(n);
            }
        }
        Err(ModelError::invalid(
            "num_experts",
            "missing from config.json",
        ))
    };
    let top_k = j.usize("num_experts_per_tok")?;
    let gqa = |qkv_bias: bool, o_bias: bool, qk_norm: QkNorm| {
        AttentionConfig::Gqa(GqaConfig {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            qkv_bias,
            o_bias,
            qk_norm,
            temperature_tuning: None,
        })
    };
    let plain_router = |renormalize: bool| RouterConfig {
        scoring: Scoring::Softmax,
        renormalize,
        group_limit: None,
        correction_bias: false,
        scaling_factor: 1.0,
        weight_on: WeightOn::Output,
    };
    let window_mask = |i: usize| -> Result<MaskKind> {
        let types = j.str_list("layer_types")?;
        let sliding = match &types {
            Some(t) => t.get(i).is_some_and(|s| s == "sliding_attention"),
            None => j.bool_or("use_sliding_window", false)? || family == "mixtral",
        };
        Ok(match (sliding, j.opt_usize("sliding_window")?) {
            (true, Some(w)) if w > 0 => MaskKind::SlidingWindow { window: w },
            _ => MaskKind::Causal,
        })
    };
    let attention_bias = j.bool_or("attention_bias", false)?;
    let dense = |key: &str| -> Result<FfnKind> {
        Ok(FfnKind::Dense {
            intermediate_size: j.usize(key)?,
        })
    };

    let (attention, rope_layout, moe, layers): (
        AttentionConfig,
        RopeLayout,
        MoeConfig,
        Vec<LayerConfig>,
    ) = match family.as_str() {
        "qwen3_moe" | "qwen2_moe" => {
            let qwen3 = family == "qwen3_moe";
            let mlp_only = j.usize_list("mlp_only_layers")?.unwrap_or_default();
            let step = j.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
            let n = experts()?;
            let layers = (0..layers_n)
                .map(|i| {
                    let moe = !mlp_only.contains(&i) && n > 0 && (i + 1) % step == 0;
                    Ok(LayerConfig {
                        ffn: if moe {
                            FfnKind::Moe
                        } else {
                            dense("intermediate_size")?
                        },
                        use_rope: true,
                        mask: window_mask(i)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            // Qwen2-MoE's shared expert is gated. Qwen3-MoE has none in transformers; the key on a qwen3_moe
            // config is this crate's extension for the recipe's models (an ungated shared expert, see
            // `hf_config_json`).
            let shared = match j.opt_usize("shared_expert_intermediate_size")? {
                Some(s) if s > 0 => Some(SharedExpertConfig {
                    intermediate_size: s,
                    gated: !qwen3,
                }),
                _ => None,
            };
            let attention = if qwen3 {
                gqa(attention_bias, attention_bias, QkNorm::PerHead)
            } else {
                gqa(j.bool_or("qkv_bias", true)?, false, QkNorm::None)
            };
            let moe = MoeConfig {
                num_experts: n,
                top_k,
                expert_intermediate_size: j.usize("moe_intermediate_size")?,
                router: plain_router(j.bool_or("norm_topk_prob", false)?),
                shared,
            };
            (attention, RopeLayout::Half, moe, layers)
        }
        "mixtral" | "olmoe" => {
            let mixtral = family == "mixtral";
            if j.get("clip_qkv").is_some() {
                return Err(ModelError::invalid(
                    "clip_qkv",
                    "is not supported (must be null)",
                ));
            }
            let layers = (0..layers_n)
                .map(|i| {
                    Ok(LayerConfig {
                        ffn: FfnKind::Moe,
                        use_rope: true,
                        mask: window_mask(i)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let attention = if mixtral {
                gqa(false, false, QkNorm::None)
            } else {
                gqa(attention_bias, attention_bias, QkNorm::Whole)
            };
            let moe = MoeConfig {
                num_experts: experts()?,
                top_k,
                expert_intermediate_size: j.usize("intermediate_size")?,
                router: plain_router(mixtral || j.bool_or("norm_topk_prob", false)?),
                shared: None,
            };
            (attention, RopeLayout::Half, moe, layers)
        }
        "deepseek_v2" | "deepseek_v3" => {
            let v3 = family == "deepseek_v3";
            let first_dense = j.opt_usize("first_k_dense_replace")?.unwrap_or(0);
            let freq = if v3 {
                1
            } else {
                j.opt_usize("moe_layer_freq")?.unwrap_or(1).max(1)
            };
            let layers = (0..layers_n)
                .map(|i| {
                    Ok(LayerConfig {
                        ffn: if i >= first_dense && i % freq == 0 {
                            FfnKind::Moe
                        } else {
                            dense("intermediate_size")?
                        },
                        use_rope: true,
                        mask: MaskKind::Causal,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let attention = AttentionConfig::Mla(MlaConfig {
                num_heads: heads,
                q_lora_rank: j.opt_usize("q_lora_rank")?,
                kv_lora_rank: j.usize("kv_lora_rank")?,
                qk_nope_head_dim: j.usize("qk_nope_head_dim")?,
                qk_rope_head_dim: j.usize("qk_rope_head_dim")?,
                v_head_dim: j.usize("v_head_dim")?,
                latent_norm_eps: 1e-6,
            });
            let moe_inter = j.usize("moe_intermediate_size")?;
            let shared = match j.opt_usize("n_shared_experts")?.filter(|&n| n > 0) {
                None => None,
                Some(n) => Some(SharedExpertConfig {
                    intermediate_size: n.checked_mul(moe_inter).ok_or_else(|| {
                        ModelError::invalid(
                            "n_shared_experts",
                            format!("{n} × moe_intermediate_size {moe_inter} overflows"),
                        )
                    })?,
                    gated: false,
                }),
            };
            let groups = |score| -> Result<Option<GroupLimit>> {
                Ok(Some(GroupLimit {
                    num_groups: j.opt_usize("n_group")?.unwrap_or(1),
                    topk_groups: j.opt_usize("topk_group")?.unwrap_or(1),
                    group_score: score,
                }))
            };
            let router = if v3 {
                RouterConfig {
                    scoring: Scoring::Sigmoid,
                    renormalize: j.bool_or("norm_topk_prob", true)?,
                    group_limit: groups(GroupScore::SumTop2)?,
                    correction_bias: true,
                    scaling_factor: j.f64_or("routed_scaling_factor", 1.0)?,
                    weight_on: WeightOn::Output,
                }
            } else {
                let method = j
                    .get("topk_method")
                    .and_then(|v| v.as_str())
                    .unwrap_or("greedy");
                RouterConfig {
                    scoring: Scoring::Softmax,
                    // HF DeepSeek-V2 never renormalises (it ignores norm_topk_prob).
                    renormalize: false,
                    group_limit: match method {
                        "greedy" => None,
                        "group_limited_greedy" => groups(GroupScore::Max)?,
                        other => {
                            return Err(ModelError::invalid(
                                "topk_method",
                                format!("`{other}` is not supported"),
                            ));
                        }
                    },
                    correction_bias: false,
                    scaling_factor: j.f64_or("routed_scaling_factor", 1.0)?,
                    weight_on: WeightOn::Output,
                }
            };
            let layout = if !v3 || j.bool_or("rope_interleave", true)? {
                RopeLayout::Interleaved
            } else {
                RopeLayout::Half
            };
            let moe = MoeConfig {
                num_experts: experts()?,
                top_k,
                expert_intermediate_size: moe_inter,
                router,
                shared,
            };
            (attention, layout, moe, layers)
        }
        "llama4_text" => {
            let moe_layers = match j.usize_list("moe_layers")? {
                Some(l) => l,
                None => {
                    let step = j
                        .opt_usize("interleave_moe_layer_step")?
                        .unwrap_or(1)
                        .max(1);
                    (step - 1..layers_n).step_by(step).collect()
                }
            };
            let use_rope: Vec<bool> = match j.usize_list("no_rope_layers")? {
                Some(l) if !l.is_empty() => {
                    if l.len() != layers_n {
                        return Err(ModelError::invalid(
                            "no_rope_layers",
                            format!("has {} entries for {layers_n} layers", l.len()),
                        ));
                    }
                    l.iter().map(|&x| x != 0).collect()
                }
                _ => {
                    let interval = j.opt_usize("no_rope_layer_interval")?.unwrap_or(4).max(1);
                    (0..layers_n).map(|i| (i + 1) % interval != 0).collect()
                }
            };
            let chunk = j.opt_usize("attention_chunk_size")?;
            let types = j.str_list("layer_types")?;
            let layers = (0..layers_n)
                .map(|i| {
                    let chunked = match &types {
                        Some(t) => t.get(i).is_some_and(|s| s == "chunked_attention"),
                        None => use_rope[i],
                    };
                    Ok(LayerConfig {
                        ffn: if moe_layers.contains(&i) {
                            FfnKind::Moe
                        } else {
                            dense("intermediate_size_mlp")?
                        },
                        use_rope: use_rope[i],
                        mask: match (chunked, chunk) {
                            (true, Some(c)) => MaskKind::Chunked { size: c },
                            _ => MaskKind::Causal,
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let attention = AttentionConfig::Gqa(GqaConfig {
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim,
                qkv_bias: attention_bias,
                o_bias: attention_bias,
                qk_norm: if j.bool_or("use_qk_norm", true)? {
                    QkNorm::L2AfterRope
                } else {
                    QkNorm::None
                },
                temperature_tuning: if j.bool_or("attn_temperature_tuning", true)? {
                    Some((
                        j.f64_or("floor_scale", 8192.0)?,
                        j.f64_or("attn_scale", 0.1)?,
                    ))
                } else {
                    None
                },
            });
            let inter = j.usize("intermediate_size")?;
            let moe = MoeConfig {
                num_experts: experts()?,
                top_k,
                expert_intermediate_size: inter,
                router: RouterConfig {
                    scoring: Scoring::Sigmoid,
                    renormalize: false,
                    group_limit: None,
                    correction_bias: false,
                    scaling_factor: 1.0,
                    weight_on: WeightOn::Input,
                },
                shared: Some(SharedExpertConfig {
                    intermediate_size: inter,
                    gated: false,
                }),
            };
            (attention, RopeLayout::Interleaved, moe, layers)
        }
        _ => unreachable!("checked against SUPPORTED_FAMILIES"),
    };
    let has_moe = layers.iter().any(|l| l.ffn == FfnKind::Moe);
    let cfg = ModelConfig {
        family: family.clone(),
        vocab_size: j.usize("vocab_size")?,
        hidden_size: hidden,
        rms_norm_eps: eps,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", false)?,
        attention,
        rope: parse_rope(&j, rope_layout)?,
        layers,
        moe: has_moe.then_some(moe),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The FarSkip keys of `config.json`, as the paper authors' Instella-MoE checkpoints name them, plus
/// `farskip_depth` (skip depth, absent = 1).
pub const FARSKIP_KEYS: [&str; 6] = [
    "farskip",
    "farskip_start_idx",
    "farskip_end_idx",
    "attn_only_farskip",
    "mlp_only_farskip",
    "farskip_depth",
];

/// The reference's `farskip_end_idx` default: through the last layer.
const FARSKIP_END_ALL: usize = 10_000;

/// The connectivity a `config.json` records: standard unless `"farskip": true`; then layers
/// `farskip_start_idx ..= min(farskip_end_idx, num_layers - 1)` (defaults 0 and 10000), the variant from
/// `attn_only_farskip` / `mlp_only_farskip` and the depth from `farskip_depth`. An end at or past the last layer
/// means "through the last layer" (`end: None`). Errors name the key at fault.
pub fn parse_connectivity(v: &Value, num_layers: usize) -> Result<Connectivity> {
    let j = Json { v };
    // Every key is type-checked, even when `farskip` is false: a typo should not hide until it is switched on.
    let enabled = j.bool_or("farskip", false)?;
    let start = j.opt_usize("farskip_start_idx")?.unwrap_or(0);
    let end = j.opt_usize("farskip_end_idx")?.unwrap_or(FARSKIP_END_ALL);
    let attn_only = j.bool_or("attn_only_farskip", false)?;
    let mlp_only = j.bool_or("mlp_only_farskip", false)?;
    let depth = j.opt_usize("farskip_depth")?.unwrap_or(1);
    if !enabled {
        return Ok(Connectivity::Standard);
    }
    let variant = match (attn_only, mlp_only) {
        (true, true) => {
            return Err(ModelError::invalid(
                "mlp_only_farskip",
                "attn_only_farskip and mlp_only_farskip are both true (choose one variant)",
            ));
        }
        (true, false) => FarSkipVariant::AttnOnly,
        (false, true) => FarSkipVariant::MlpOnly,
        (false, false) => FarSkipVariant::Full,
    };
    if depth == 0 {
        return Err(ModelError::invalid(
            "farskip_depth",
            "must be at least 1 (1 = the paper's FarSkip)",
        ));
    }
    if start >= num_layers {
        return Err(ModelError::invalid(
            "farskip_start_idx",
            format!("is {start} but the model has {num_layers} layers (0-based)"),
        ));
    }
    if end < start {
        return Err(ModelError::invalid(
            "farskip_end_idx",
            format!("is {end}, before farskip_start_idx {start}"),
        ));
    }
    Ok(Connectivity::FarSkip(FarSkip {
        start,
        end: (end + 1 < num_layers).then_some(end),
        variant,
        depth,
    }))
}

/// Records `connectivity` in a `config.json` value: the FarSkip keys for a FarSkip model (`farskip_depth`
/// only when it is not 1, `farskip_end_idx` 10000 for "through the last layer"), none of them for a standard
/// one.
pub fn write_connectivity(config: &mut Value, connectivity: &Connectivity) -> Result<()> {
    let obj = config
        .as_object_mut()
        .ok_or_else(|| ModelError::invalid("config.json", "is not a JSON object"))?;
    for key in FARSKIP_KEYS {
        obj.remove(key);
    }
    if let Connectivity::FarSkip(f) = connectivity {
        obj.insert("farskip".into(), true.into());
        obj.insert("farskip_start_idx".into(), f.start.into());
        obj.insert(
            "farskip_end_idx".into(),
            f.end.unwrap_or(FARSKIP_END_ALL).into(),
        );
        obj.insert(
            "attn_only_farskip".into(),
            (f.variant == FarSkipVariant::AttnOnly).into(),
        );
        obj.insert(
            "mlp_only_farskip".into(),
            (f.variant == FarSkipVariant::MlpOnly).into(),
        );
        if f.depth != 1 {
            obj.insert("farskip_depth".into(), f.depth.into());
        }
    }
    Ok(())
}

/// The dtype `config.json` gives the weights (`torch_dtype`, transformers 4.x, or `dtype`, 5.x): f32 when
/// neither is there.
pub fn weights_dtype(config: &Value) -> Result<Dtype> {
    let j = Json { v: config };
    for key in ["torch_dtype", "dtype"] {
        if let Some(v) = j.get(key) {
            return match v.as_str() {
                Some("float32" | "float") => Ok(Dtype::F32),
                Some("bfloat16") => Ok(Dtype::BF16),
                Some("float16" | "half") => Ok(Dtype::F16),
                _ => Err(ModelError::invalid(
                    key,
                    format!("expected float32, bfloat16 or float16, found {v}"),
                )),
            };
        }
    }
    Ok(Dtype::F32)
}

/// Reads and parses `dir/config.json`.
pub fn load_config(dir: &Path) -> Result<(ModelConfig, Value)> {
    let v = read_config_json(dir)?;
    Ok((parse_config(&v)?, v))
}

/// `dir/config.json` as JSON.
fn read_config_json(dir: &Path) -> Result<Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::ConfigParse {
        path: path.clone(),
        message: e.to_string(),
    })
}

/// HF names of one layer's feed-forward module and its experts.
struct FfnNames {
    prefix: String,
    router: &'static str,
    expert_style: ExpertStyle,
    shared: &'static str,
}

#[derive(Clone, Copy, PartialEq)]
enum ExpertStyle {
    /// `experts.{e}.{gate,up,down}_proj.weight`
    PerExpert,
    /// `experts.{e}.{w1,w3,w2}.weight` (Mixtral on disk)
    Mixtral,
    /// `experts.gate_up_proj [E, H, 2I]`, `experts.down_proj [E, I, H]` (Llama-4)
    FusedInOut,
}

fn ffn_names(family: &str, layer: usize, moe: bool) -> FfnNames {
    let base = format!("model.layers.{layer}");
    match family {
        "llama4_text" => FfnNames {
            prefix: format!("{base}.feed_forward"),
            router: "router",
            expert_style: ExpertStyle::FusedInOut,
            shared: "shared_expert",
        },
        "mixtral" if moe => FfnNames {
            prefix: format!("{base}.block_sparse_moe"),
            router: "gate",
            expert_style: ExpertStyle::Mixtral,
            shared: "shared_expert",
        },
        "deepseek_v2" | "deepseek_v3" => FfnNames {
            prefix: format!("{base}.mlp"),
            router: "gate",
            expert_style: ExpertStyle::PerExpert,
            shared: "shared_experts",
        },
        _ => FfnNames {
            prefix: format!("{base}.mlp"),
            router: "gate",
            expert_style: ExpertStyle::PerExpert,
            shared: "shared_expert",
        },
    }
}

fn per_expert_names(style: ExpertStyle, prefix: &str, e: usize) -> [String; 3] {
    let p = format!("{prefix}.experts.{e}");
    match style {
        ExpertStyle::Mixtral => [
            format!("{p}.w1.weight"),
            format!("{p}.w3.weight"),
            format!("{p}.w2.weight"),
        ],
        _ => [
            format!("{p}.gate_proj.weight"),
            format!("{p}.up_proj.weight"),
            format!("{p}.down_proj.weight"),
        ],
    }
}

/// The dtype a model keeps its weights in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    /// f32 (bf16 / f16 checkpoints are widened on load).
    F32,
    /// bf16: projection, expert, embedding and LM-head weights stay bf16 in memory; norms, biases and the
    /// router stay f32. Products accumulate in f32 (see [`crate::matvec`]).
    Bf16,
}

impl WeightDtype {
    /// The checkpoint's own dtype as config.json gives it ([`weights_dtype`]): bf16 for bf16, else f32.
    pub fn of_config(config: &Value) -> Result<Self> {
        Ok(match weights_dtype(config)? {
            Dtype::BF16 => WeightDtype::Bf16,
            _ => WeightDtype::F32,
        })
    }

    fn float(self) -> FloatDType {
        match self {
            WeightDtype::F32 => FloatDType::F32,
            WeightDtype::Bf16 => FloatDType::BF16,
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(WeightDtype::F32),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            other => Err(ModelError::InvalidInput(format!(
                "weight dtype `{other}`: expected f32 or bf16"
            ))),
        }
    }
}

/// A parameter's dims without drawing it (the model is built with lazy parameters that loading replaces).
fn lazy_dims<const D: usize>(p: &Param<Tensor<D>>) -> [usize; D] {
    let shape = p.lazy_shape();
    std::array::from_fn(|i| shape[i])
}

/// Loads HF tensors into a model built from the same config. HF stores linear weights as `[out, in]` and burn
/// multiplies by `[in, out]`: a transposed view would make every matmul read the weights with strides (≈ 15 %
/// slower forward on the bench checkpoint), so each weight is transposed while it is read.
struct Loader<'a> {
    store: &'a TensorStore,
    device: Device,
    dtype: FloatDType,
}

impl Loader<'_> {
    fn linear(&self, lin: &mut Linear, name: &str) -> Result<()> {
        self.linear_as(lin, name, self.dtype)
    }
    fn linear_as(&self, lin: &mut Linear, name: &str, dtype: FloatDType) -> Result<()> {
        let [d_in, d_out] = lazy_dims(&lin.weight);
        lin.weight = Param::from_tensor(self.store.tensor_as(
            &format!("{name}.weight"),
            [d_out, d_in],
            true,
            dtype,
            &self.device,
        )?);
        if let Some(b) = &lin.bias {
            let [n] = lazy_dims(b);
            lin.bias = Some(Param::from_tensor(self.store.tensor(
                &format!("{name}.bias"),
                [n],
                &self.device,
            )?));
        }
        Ok(())
    }
    fn norm(&self, n: &mut RmsNorm, name: &str) -> Result<()> {
        let [d] = lazy_dims(&n.gamma);
        n.gamma = Param::from_tensor(self.store.tensor(
            &format!("{name}.weight"),
            [d],
            &self.device,
        )?);
        Ok(())
    }
    fn mlp(&self, m: &mut Mlp, prefix: &str) -> Result<()> {
        self.linear(&mut m.gate_proj, &format!("{prefix}.gate_proj"))?;
        self.linear(&mut m.up_proj, &format!("{prefix}.up_proj"))?;
        self.linear(&mut m.down_proj, &format!("{prefix}.down_proj"))
    }
    fn experts(&self, bank: &mut ExpertBank, names: &FfnNames) -> Result<()> {
        let [e_n, h, i2] = lazy_dims(&bank.gate_up);
        let i = i2 / 2;
        let fused_gate_up = format!("{}.experts.gate_up_proj", names.prefix);
        let fused_down = format!("{}.experts.down_proj", names.prefix);
        let (store, dev, dt) = (self.store, &self.device, self.dtype);
        if names.expert_style == ExpertStyle::FusedInOut {
            bank.gate_up = Param::from_tensor(store.tensor_as(
                &fused_gate_up,
                [e_n, h, i2],
                false,
                dt,
                dev,
            )?);
            bank.down =
                Param::from_tensor(store.tensor_as(&fused_down, [e_n, i, h], false, dt, dev)?);
            return Ok(());
        }
        let first = per_expert_names(names.expert_style, &names.prefix, 0);
        if !store.contains(&first[0]) && store.contains(&fused_gate_up) {
            // transformers 5.x in-memory layout: gate_up [E, 2I, H] (gate rows first), down [E, H, I].
            bank.gate_up =
                Param::from_tensor(store.tensor_as(&fused_gate_up, [e_n, i2, h], true, dt, dev)?);
            bank.down =
                Param::from_tensor(store.tensor_as(&fused_down, [e_n, h, i], true, dt, dev)?);
            return Ok(());
        }
        let names_of = |part: usize| -> Vec<String> {
            (0..e_n)
                .map(|e| {
                    let [g, u, d] = per_expert_names(names.expert_style, &names.prefix, e);
                    [g, u, d][part].clone()
                })
                .collect()
        };
        // Each expert's matrices transposed straight into the stacked bank.
        bank.gate_up = Param::from_tensor(store.stacked_transposed(
            &[(names_of(0), 0), (names_of(1), i)],
            [e_n, i, h],
            i2,
            dt,
            dev,
        )?);
        bank.down = Param::from_tensor(store.stacked_transposed(
            &[(names_of(2), 0)],
            [e_n, h, i],
            h,
            dt,
            dev,
        )?);
        Ok(())
    }
}

fn attention_names(kind: &mut AttentionKind) -> Vec<(&mut Linear, &'static str)> {
    match kind {
        AttentionKind::Gqa(a) => vec![
            (&mut a.q_proj, "q_proj"),
            (&mut a.k_proj, "k_proj"),
            (&mut a.v_proj, "v_proj"),
            (&mut a.o_proj, "o_proj"),
        ],
        AttentionKind::Mla(a) => {
            let mut v = Vec::new();
            if let Some(q) = a.q_proj.as_mut() {
                v.push((q, "q_proj"));
            }
            if let Some(q) = a.q_a_proj.as_mut() {
                v.push((q, "q_a_proj"));
            }
            if let Some(q) = a.q_b_proj.as_mut() {
                v.push((q, "q_b_proj"));
            }
            v.push((&mut a.kv_a_proj, "kv_a_proj_with_mqa"));
            v.push((&mut a.kv_b_proj, "kv_b_proj"));
            v.push((&mut a.o_proj, "o_proj"));
            v
        }
    }
}

fn attention_norms(kind: &mut AttentionKind) -> Vec<(&mut RmsNorm, &'static str)> {
    match kind {
        AttentionKind::Gqa(a) => {
            let mut v = Vec::new();
            if let Some(n) = a.q_norm.as_mut() {
                v.push((n, "q_norm"));
            }
            if let Some(n) = a.k_norm.as_mut() {
                v.push((n, "k_norm"));
            }
            v
        }
        AttentionKind::Mla(a) => {
            let mut v = vec![(&mut a.kv_a_norm, "kv_a_layernorm")];
            if let Some(n) = a.q_a_norm.as_mut() {
                v.push((n, "q_a_layernorm"));
            }
            v
        }
    }
}

impl Model {
    /// Loads a Hugging Face checkpoint directory (`config.json` + `model.safetensors` or a sharded index),
    /// refusing one that needs more memory than is available ([`MemoryCheck::Refuse`]).
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(dir, device, MemoryCheck::Refuse)
    }

    /// [`Self::from_pretrained`] with a choice of what happens when the checkpoint needs more memory than is
    /// available. Before a weight is allocated, config.json is checked against the safetensors headers (every
    /// dimension it implies, the layer count, the dtypes) and the estimate ([`Model::estimate_bytes`]) against
    /// the available memory. The weights are f32 (a bf16 checkpoint is widened): see [`Self::from_pretrained_as`].
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        device: &Device,
        memory: MemoryCheck,
    ) -> Result<Self> {
        Self::from_pretrained_as(dir, device, memory, Some(WeightDtype::F32))
    }

    /// [`Self::from_pretrained_with`], keeping the weights in `dtype` (`None`: the checkpoint's own,
    /// [`WeightDtype::of_config`]). The model is built without drawing random weights and each tensor is read
    /// from the files straight into its place, so loading holds the model plus one tensor's bytes.
    pub fn from_pretrained_as(
        dir: impl AsRef<Path>,
        device: &Device,
        memory: MemoryCheck,
        dtype: Option<WeightDtype>,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(ModelError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let json = read_config_json(dir)?;
        let dtype = match dtype {
            Some(d) => d,
            None => WeightDtype::of_config(&json)?,
        };
        let (config, json, store) = check::open_checked(dir, memory, dtype)?;
        let connectivity = parse_connectivity(&json, config.num_layers())?;
        config.validate()?;
        let mut model = Model::new_lazy(&config, device);
        model.load_hf_tensors_as(&store, dtype)?;
        let model = model.with_connectivity(connectivity)?;
        tracing::info!(family = %config.family, layers = config.num_layers(), dir = %dir.display(), "loaded checkpoint");
        Ok(model)
    }

    /// Replaces every weight with the tensors of an HF checkpoint.
    pub fn load_hf_tensors(&mut self, store: &TensorStore) -> Result<()> {
        self.load_hf_tensors_as(store, WeightDtype::F32)
    }

    /// [`Self::load_hf_tensors`], keeping the weights in `dtype` ([`WeightDtype`]).
    pub fn load_hf_tensors_as(&mut self, store: &TensorStore, dtype: WeightDtype) -> Result<()> {
        let device = self.embed.weight.lazy_device();
        let l = Loader {
            store,
            device,
            dtype: dtype.float(),
        };
        let family = self.config().family.clone();
        let [v, h] = lazy_dims(&self.embed.weight);
        self.embed.weight = Param::from_tensor(store.tensor_as(
            "model.embed_tokens.weight",
            [v, h],
            false,
            l.dtype,
            &l.device,
        )?);
        l.norm(&mut self.norm, "model.norm")?;
        if let Some(head) = self.lm_head.as_mut() {
            l.linear(head, "lm_head")?;
        }
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let base = format!("model.layers.{i}");
            l.norm(&mut layer.input_norm, &format!("{base}.input_layernorm"))?;
            l.norm(
                &mut layer.post_norm,
                &format!("{base}.post_attention_layernorm"),
            )?;
            for (lin, n) in attention_names(&mut layer.attention.kind) {
                l.linear(lin, &format!("{base}.self_attn.{n}"))?;
            }
            for (norm, n) in attention_norms(&mut layer.attention.kind) {
                l.norm(norm, &format!("{base}.self_attn.{n}"))?;
            }
            match &mut layer.ffn {
                Ffn::Dense(mlp) => l.mlp(mlp, &ffn_names(&family, i, false).prefix)?,
                Ffn::Moe(moe) => load_moe(&l, moe, &ffn_names(&family, i, true))?,
            }
        }
        Ok(())
    }

    /// Writes `dir/model.safetensors` with HF names and layout, and `dir/config.json` (the given HF config, or
    /// one generated from [`ModelConfig`] for the GQA softmax-router families) with the model's connectivity in
    /// the FarSkip keys ([`write_connectivity`]), so that [`Model::from_pretrained`] reloads it as it runs now.
    /// Weights are written in the dtype the config names ([`weights_dtype`]).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>, hf_config: Option<&Value>) -> Result<()> {
        let dir = dir.as_ref();
        let mut config = match hf_config {
            Some(v) => v.clone(),
            None => hf_config_json(self.config())?,
        };
        write_connectivity(&mut config, self.connectivity())?;
        let dtype = weights_dtype(&config)?;
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let cfg_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config).map_err(|e| ModelError::ConfigParse {
            path: cfg_path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&cfg_path, text).map_err(|e| ModelError::io(&cfg_path, e))?;
        let mut w = TensorWriter::default();
        self.write_hf_tensors(&mut w);
        w.cast_floats(dtype)?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        w.write(&dir.join("model.safetensors"), Some(meta))
    }

    /// Adds every weight to `w` under its HF name, in HF layout.
    pub fn write_hf_tensors(&self, w: &mut TensorWriter) {
        let family = self.config().family.clone();
        let lin = |w: &mut TensorWriter, l: &Linear, name: &str| {
            w.f32(format!("{name}.weight"), l.weight.val().transpose());
            if let Some(b) = &l.bias {
                w.f32_any(
                    format!("{name}.bias"),
                    b.dims().to_vec(),
                    b.val().into_data(),
                );
            }
        };
        let norm = |w: &mut TensorWriter, n: &RmsNorm, name: &str| {
            w.f32_any(
                format!("{name}.weight"),
                n.gamma.dims().to_vec(),
                n.gamma.val().into_data(),
            );
        };
        let mlp = |w: &mut TensorWriter, m: &Mlp, p: &str| {
            lin(w, &m.gate_proj, &format!("{p}.gate_proj"));
            lin(w, &m.up_proj, &format!("{p}.up_proj"));
            lin(w, &m.down_proj, &format!("{p}.down_proj"));
        };
        w.f32("model.embed_tokens.weight", self.embed.weight.val());
        norm(w, &self.norm, "model.norm");
        if let Some(h) = &self.lm_head {
            lin(w, h, "lm_head");
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let base = format!("model.layers.{i}");
            norm(w, &layer.input_norm, &format!("{base}.input_layernorm"));
            norm(
                w,
                &layer.post_norm,
                &format!("{base}.post_attention_layernorm"),
            );
            let mut kind = layer.attention.kind.clone();
            for (l, n) in attention_names(&mut kind) {
                lin(w, l, &format!("{base}.self_attn.{n}"));
            }
            for (nm, n) in attention_norms(&mut kind) {
                norm(w, nm, &format!("{base}.self_attn.{n}"));
            }
            match &layer.ffn {
                Ffn::Dense(m) => mlp(w, m, &ffn_names(&family, i, false).prefix),
                Ffn::Moe(moe) => {
                    let names = ffn_names(&family, i, true);
                    lin(
                        w,
                        &moe.router.gate,
                        &format!("{}.{}", names.prefix, names.router),
                    );
                    if let Some(b) = &moe.router.correction_bias {
                        w.f32_any(
                            format!("{}.{}.e_score_correction_bias", names.prefix, names.router),
                            b.dims().to_vec(),
                            b.val().into_data(),
                        );
                    }
                    if let Some(s) = &moe.shared {
                        mlp(w, &s.mlp, &format!("{}.{}", names.prefix, names.shared));
                        if let Some(g) = &s.gate {
                            lin(w, g, &format!("{}.shared_expert_gate", names.prefix));
                        }
                    }
                    let [e_n, h, i2] = moe.experts.gate_up.dims();
                    let inter = i2 / 2;
                    if names.expert_style == ExpertStyle::FusedInOut {
                        let gu = moe.experts.gate_up.val();
                        let dn = moe.experts.down.val();
                        w.f32_any(
                            format!("{}.experts.gate_up_proj", names.prefix),
                            vec![e_n, h, i2],
                            gu.into_data(),
                        );
                        w.f32_any(
                            format!("{}.experts.down_proj", names.prefix),
                            vec![e_n, inter, h],
                            dn.into_data(),
                        );
                    } else {
                        for e in 0..e_n {
                            let [g, u, d] = per_expert_names(names.expert_style, &names.prefix, e);
                            let gu: Tensor<2> =
                                moe.experts.gate_up.val().narrow(0, e, 1).squeeze_dim(0);
                            let dn: Tensor<2> =
                                moe.experts.down.val().narrow(0, e, 1).squeeze_dim(0);
                            w.f32(g, gu.clone().narrow(1, 0, inter).transpose());
                            w.f32(u, gu.narrow(1, inter, inter).transpose());
                            w.f32(d, dn.transpose());
                        }
                    }
                }
            }
        }
    }
}

fn load_moe(l: &Loader, moe: &mut MoeBlock, names: &FfnNames) -> Result<()> {
    // The router stays f32: its scores pick the experts, and it is small.
    l.linear_as(
        &mut moe.router.gate,
        &format!("{}.{}", names.prefix, names.router),
        FloatDType::F32,
    )?;
    if let Some(b) = moe.router.correction_bias.as_mut() {
        let [e] = lazy_dims(b);
        *b = Param::from_tensor(l.store.tensor(
            &format!("{}.{}.e_score_correction_bias", names.prefix, names.router),
            [e],
            &l.device,
        )?);
    }
    if let Some(SharedExpert { mlp, gate }) = moe.shared.as_mut() {
        l.mlp(mlp, &format!("{}.{}", names.prefix, names.shared))?;
        if let Some(g) = gate.as_mut() {
            l.linear(g, &format!("{}.shared_expert_gate", names.prefix))?;
        }
    }
    l.experts(&mut moe.experts, names)
}

/// An HF `config.json` for configs this crate can describe as Qwen3-MoE (the GQA, softmax-router presets).
///
/// An ungated shared expert (the recipe's teacher has one) is recorded as `shared_expert_intermediate_size`
/// and its weights as `mlp.shared_expert.*`: this crate reloads it, but transformers' Qwen3-MoE has no shared
/// expert and would load the model without it.
pub fn hf_config_json(cfg: &ModelConfig) -> Result<Value> {
    let (AttentionConfig::Gqa(g), Some(moe)) = (&cfg.attention, &cfg.moe) else {
        return Err(ModelError::invalid(
            "family",
            "only GQA MoE configs can be written as a new config.json",
        ));
    };
    if moe.router.scoring != Scoring::Softmax
        || moe.shared.as_ref().is_some_and(|s| s.gated)
        || cfg.rope.scaling != RopeScaling::None
    {
        return Err(ModelError::invalid(
            "family",
            "this config has no Qwen3-MoE equivalent; pass the original config.json to save_pretrained",
        ));
    }
    let mlp_only: Vec<usize> = cfg
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.ffn != FfnKind::Moe)
        .map(|(i, _)| i)
        .collect();
    let dense_inter = cfg
        .layers
        .iter()
        .find_map(|l| match l.ffn {
            FfnKind::Dense { intermediate_size } => Some(intermediate_size),
            FfnKind::Moe => None,
        })
        .unwrap_or(moe.expert_intermediate_size);
    let mut config = serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers(),
        "num_attention_heads": g.num_heads,
        "num_key_value_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "attention_bias": g.qkv_bias,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope.theta},
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_intermediate_size,
        "intermediate_size": dense_inter,
        "norm_topk_prob": moe.router.renormalize,
        "mlp_only_layers": mlp_only,
        "decoder_sparse_step": 1,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "dtype": "float32",
    });
    if let Some(shared) = &moe.shared {
        config["shared_expert_intermediate_size"] = shared.intermediate_size.into();
    }
    Ok(config)
}
