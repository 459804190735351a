//! config.json against the safetensors headers, before a weight is allocated. Every tensor the config implies
//! must be in the checkpoint with a float dtype and the dimensions the config gives it; a disagreement names
//! the config key, the tensor and both values. The model is built only once this passes, so what it allocates
//! is what the files hold: a corrupt config (a typo, a truncated download, a value edited by hand) cannot ask
//! for a tensor of a trillion elements, nor for more layers than the file has. Tensors the config does not
//! need are allowed (DeepSeek-V3's multi-token-prediction layer after the last decoder layer).

use std::path::Path;

use safetensors::Dtype;
use serde_json::Value;

use super::{ExpertStyle, FfnNames, ffn_names, parse_config, per_expert_names, read_config_json};
use crate::checkpoint::{TensorIndex, TensorStore};
use crate::config::*;
use crate::error::{ModelError, Result};
use crate::memory::MemoryCheck;
use crate::model::Model;

/// Reads `dir`'s config.json and safetensors headers, checks them against each other and the estimate against
/// the available memory, then reads the weights.
pub(super) fn open_checked(
    dir: &Path,
    memory: MemoryCheck,
    dtype: super::WeightDtype,
) -> Result<(ModelConfig, Value, TensorStore)> {
    let json = read_config_json(dir)?;
    let index = TensorIndex::open_dir(dir)?;
    check_layer_count(&json, &index)?;
    let config = parse_config(&json)?;
    check_tensors(&config, &json, &index)?;
    // Tensors are read one at a time: the model's weights are what loading needs (bf16 halves the f32
    // estimate; its norms and routers, which stay f32, are a rounding error).
    let weights = match dtype {
        super::WeightDtype::F32 => Model::estimate_bytes(&config),
        super::WeightDtype::Bf16 => Model::estimate_bytes(&config) / 2,
    };
    memory.check(
        &format!(
            "loading {} ({weights} bytes of {dtype:?} weights)",
            dir.display()
        ),
        weights,
    )?;
    Ok((config, json, index.read()?))
}

/// The tensor every decoder layer has, by which the layers in a checkpoint are counted.
fn layer_marker(i: u64) -> String {
    format!("model.layers.{i}.input_layernorm.weight")
}

/// `num_hidden_layers` against the layers in the checkpoint, before the per-layer config is built: a count past
/// the file is reported at its first missing layer. (A missing or ill-typed value is `parse_config`'s to report.)
pub(super) fn check_layer_count(json: &Value, index: &TensorIndex) -> Result<()> {
    let Some(n) = json.get("num_hidden_layers").and_then(Value::as_u64) else {
        return Ok(());
    };
    match (0..n).find(|&i| !index.contains(&layer_marker(i))) {
        Some(i) => Err(ModelError::LayerCountMismatch {
            config: n,
            found: i as usize,
            tensor: layer_marker(i),
        }),
        None => Ok(()),
    }
}

/// Every tensor `config` implies against the headers in `index`: present, a float dtype, the same dimensions.
pub(super) fn check_tensors(config: &ModelConfig, json: &Value, index: &TensorIndex) -> Result<()> {
    visit_expected(config, json, index, &mut |name, dims| {
        check_one(index, name, dims)
    })
}

fn check_one(index: &TensorIndex, name: &str, dims: &[Dim]) -> Result<()> {
    let shape = index.shape(name)?;
    let dtype = index.dtype(name)?;
    if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
        return Err(ModelError::UnsupportedDtype {
            name: name.to_string(),
            dtype: format!("{dtype:?}"),
        });
    }
    if shape.len() != dims.len() {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: dims.iter().map(|d| d.value).collect(),
            found: shape.to_vec(),
        });
    }
    match dims.iter().zip(shape).find(|(d, f)| d.value != **f) {
        Some((d, &found)) => Err(ModelError::ConfigTensorMismatch {
            key: d.key.clone(),
            config: d.value,
            tensor: name.to_string(),
            found,
            shape: shape.to_vec(),
        }),
        None => Ok(()),
    }
}

/// One dimension a config implies: its value and the config key (or expression of keys) it comes from.
#[derive(Clone, Debug)]
pub(super) struct Dim {
    pub(super) value: usize,
    pub(super) key: String,
}

fn dim(value: usize, key: &str) -> Dim {
    Dim {
        value,
        key: key.to_string(),
    }
}

/// `a × b` named `key`; an overflow is the config's fault, reported as such.
fn product(a: usize, b: usize, key: &str) -> Result<Dim> {
    a.checked_mul(b)
        .map(|value| dim(value, key))
        .ok_or_else(|| ModelError::invalid(key, format!("{a} × {b} overflows")))
}

/// `a + b` named `key`.
fn sum(a: usize, b: usize, key: &str) -> Result<Dim> {
    a.checked_add(b)
        .map(|value| dim(value, key))
        .ok_or_else(|| ModelError::invalid(key, format!("{a} + {b} overflows")))
}

/// The config keys a family gives its feed-forward sizes.
struct Keys {
    experts: &'static str,
    expert_intermediate: &'static str,
    dense_intermediate: &'static str,
    shared_intermediate: &'static str,
}

impl Keys {
    fn of(family: &str, json: &Value) -> Self {
        // As parse_config: the first of these that config.json has.
        let experts = ["num_experts", "num_local_experts", "n_routed_experts"]
            .into_iter()
            .find(|k| json.get(*k).is_some_and(|v| !v.is_null()))
            .unwrap_or("num_experts");
        match family {
            "deepseek_v2" | "deepseek_v3" => Self {
                experts,
                expert_intermediate: "moe_intermediate_size",
                dense_intermediate: "intermediate_size",
                shared_intermediate: "n_shared_experts × moe_intermediate_size",
            },
            "llama4_text" => Self {
                experts,
                expert_intermediate: "intermediate_size",
                dense_intermediate: "intermediate_size_mlp",
                shared_intermediate: "intermediate_size",
            },
            "mixtral" | "olmoe" => Self {
                experts,
                expert_intermediate: "intermediate_size",
                dense_intermediate: "intermediate_size",
                shared_intermediate: "intermediate_size",
            },
            _ => Self {
                experts,
                expert_intermediate: "moe_intermediate_size",
                dense_intermediate: "intermediate_size",
                shared_intermediate: "shared_expert_intermediate_size",
            },
        }
    }
}

/// Calls `f` with the name and dimensions of every tensor the loader reads for `cfg`, in the loader's order,
/// stopping at the first error. A tensor's dimensions are known before the next tensor is visited, so a count
/// the file does not back (the experts of a layer) is rejected before it is iterated over.
pub(super) fn visit_expected(
    cfg: &ModelConfig,
    json: &Value,
    index: &TensorIndex,
    f: &mut dyn FnMut(&str, &[Dim]) -> Result<()>,
) -> Result<()> {
    let keys = Keys::of(&cfg.family, json);
    let h = dim(cfg.hidden_size, "hidden_size");
    let v = dim(cfg.vocab_size, "vocab_size");
    f("model.embed_tokens.weight", &[v.clone(), h.clone()])?;
    f("model.norm.weight", std::slice::from_ref(&h))?;
    if !cfg.tie_word_embeddings {
        f("lm_head.weight", &[v, h.clone()])?;
    }
    let attention = attention_tensors(cfg)?;
    for (i, layer) in cfg.layers.iter().enumerate() {
        let base = format!("model.layers.{i}");
        f(
            &format!("{base}.input_layernorm.weight"),
            std::slice::from_ref(&h),
        )?;
        f(
            &format!("{base}.post_attention_layernorm.weight"),
            std::slice::from_ref(&h),
        )?;
        for (suffix, dims) in &attention {
            f(&format!("{base}.self_attn.{suffix}"), dims)?;
        }
        match (&layer.ffn, &cfg.moe) {
            (FfnKind::Dense { intermediate_size }, _) => mlp(
                f,
                &ffn_names(&cfg.family, i, false).prefix,
                &h,
                &dim(*intermediate_size, keys.dense_intermediate),
            )?,
            (FfnKind::Moe, Some(moe_cfg)) => moe(
                f,
                &ffn_names(&cfg.family, i, true),
                moe_cfg,
                &h,
                &keys,
                index,
            )?,
            (FfnKind::Moe, None) => {
                return Err(ModelError::invalid(
                    format!("layer {i}"),
                    "is an MoE layer but the config has no MoE block",
                ));
            }
        }
    }
    Ok(())
}

/// `[out, in]` of an HF linear weight.
fn linear(out: &Dim, d_in: &Dim) -> Vec<Dim> {
    vec![out.clone(), d_in.clone()]
}

/// The attention tensors of one layer (the same in every layer): suffix after `self_attn.` and dimensions.
fn attention_tensors(cfg: &ModelConfig) -> Result<Vec<(String, Vec<Dim>)>> {
    let h = dim(cfg.hidden_size, "hidden_size");
    Ok(match &cfg.attention {
        AttentionConfig::Gqa(g) => {
            let q = product(g.num_heads, g.head_dim, "num_attention_heads × head_dim")?;
            let kv = product(g.num_kv_heads, g.head_dim, "num_key_value_heads × head_dim")?;
            let mut t = Vec::new();
            for (name, out, d_in, bias) in [
                ("q_proj", &q, &h, g.qkv_bias),
                ("k_proj", &kv, &h, g.qkv_bias),
                ("v_proj", &kv, &h, g.qkv_bias),
                ("o_proj", &h, &q, g.o_bias),
            ] {
                t.push((format!("{name}.weight"), linear(out, d_in)));
                if bias {
                    t.push((format!("{name}.bias"), vec![out.clone()]));
                }
            }
            match g.qk_norm {
                QkNorm::PerHead => {
                    let d = dim(g.head_dim, "head_dim");
                    t.push(("q_norm.weight".into(), vec![d.clone()]));
                    t.push(("k_norm.weight".into(), vec![d]));
                }
                QkNorm::Whole => {
                    t.push(("q_norm.weight".into(), vec![q]));
                    t.push(("k_norm.weight".into(), vec![kv]));
                }
                QkNorm::None | QkNorm::L2AfterRope => {}
            }
            t
        }
        AttentionConfig::Mla(m) => {
            let qk = m
                .qk_nope_head_dim
                .checked_add(m.qk_rope_head_dim)
                .ok_or_else(|| ModelError::invalid("qk_nope_head_dim", "overflows"))?;
            let q_out = product(
                m.num_heads,
                qk,
                "num_attention_heads × (qk_nope_head_dim + qk_rope_head_dim)",
            )?;
            let kv_lora = dim(m.kv_lora_rank, "kv_lora_rank");
            let mut t = Vec::new();
            match m.q_lora_rank {
                None => t.push(("q_proj.weight".into(), linear(&q_out, &h))),
                Some(r) => {
                    let r = dim(r, "q_lora_rank");
                    t.push(("q_a_proj.weight".into(), linear(&r, &h)));
                    t.push(("q_b_proj.weight".into(), linear(&q_out, &r)));
                }
            }
            let kv_a = sum(
                m.kv_lora_rank,
                m.qk_rope_head_dim,
                "kv_lora_rank + qk_rope_head_dim",
            )?;
            let nope_v = m
                .qk_nope_head_dim
                .checked_add(m.v_head_dim)
                .ok_or_else(|| ModelError::invalid("v_head_dim", "overflows"))?;
            let kv_b = product(
                m.num_heads,
                nope_v,
                "num_attention_heads × (qk_nope_head_dim + v_head_dim)",
            )?;
            let o_in = product(
                m.num_heads,
                m.v_head_dim,
                "num_attention_heads × v_head_dim",
            )?;
            t.push(("kv_a_proj_with_mqa.weight".into(), linear(&kv_a, &h)));
            t.push(("kv_b_proj.weight".into(), linear(&kv_b, &kv_lora)));
            t.push(("o_proj.weight".into(), linear(&h, &o_in)));
            t.push(("kv_a_layernorm.weight".into(), vec![kv_lora]));
            if let Some(r) = m.q_lora_rank {
                t.push(("q_a_layernorm.weight".into(), vec![dim(r, "q_lora_rank")]));
            }
            t
        }
    })
}

/// A SwiGLU MLP's three weights under `prefix`.
fn mlp(
    f: &mut dyn FnMut(&str, &[Dim]) -> Result<()>,
    prefix: &str,
    h: &Dim,
    inter: &Dim,
) -> Result<()> {
    f(&format!("{prefix}.gate_proj.weight"), &linear(inter, h))?;
    f(&format!("{prefix}.up_proj.weight"), &linear(inter, h))?;
    f(&format!("{prefix}.down_proj.weight"), &linear(h, inter))
}

/// An MoE block: router (whose rows fix the expert count before the experts are visited), correction bias,
/// shared expert, expert weights in whichever of the layouts the loader accepts the file has.
fn moe(
    f: &mut dyn FnMut(&str, &[Dim]) -> Result<()>,
    names: &FfnNames,
    cfg: &MoeConfig,
    h: &Dim,
    keys: &Keys,
    index: &TensorIndex,
) -> Result<()> {
    let prefix = &names.prefix;
    let e = dim(cfg.num_experts, keys.experts);
    let i = dim(cfg.expert_intermediate_size, keys.expert_intermediate);
    let router = format!("{prefix}.{}", names.router);
    f(&format!("{router}.weight"), &linear(&e, h))?;
    if cfg.router.correction_bias {
        f(
            &format!("{router}.e_score_correction_bias"),
            std::slice::from_ref(&e),
        )?;
    }
    if let Some(s) = &cfg.shared {
        let inter = dim(s.intermediate_size, keys.shared_intermediate);
        mlp(f, &format!("{prefix}.{}", names.shared), h, &inter)?;
        if s.gated {
            f(
                &format!("{prefix}.shared_expert_gate.weight"),
                &linear(&dim(1, "shared_expert_gate (one output)"), h),
            )?;
        }
    }
    let two_i = product(
        2,
        cfg.expert_intermediate_size,
        &format!("2 × {}", keys.expert_intermediate),
    )?;
    let fused_gate_up = format!("{prefix}.experts.gate_up_proj");
    let fused_down = format!("{prefix}.experts.down_proj");
    if names.expert_style == ExpertStyle::FusedInOut {
        f(&fused_gate_up, &[e.clone(), h.clone(), two_i])?;
        return f(&fused_down, &[e, i, h.clone()]);
    }
    let first = per_expert_names(names.expert_style, prefix, 0);
    if !index.contains(&first[0]) && index.contains(&fused_gate_up) {
        // transformers 5.x in-memory layout: gate_up [E, 2I, H], down [E, H, I].
        f(&fused_gate_up, &[e.clone(), two_i, h.clone()])?;
        return f(&fused_down, &[e, h.clone(), i]);
    }
    for n in 0..cfg.num_experts {
        let [g, u, d] = per_expert_names(names.expert_style, prefix, n);
        f(&g, &linear(&i, h))?;
        f(&u, &linear(&i, h))?;
        f(&d, &linear(h, &i))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use burn::prelude::*;

    use super::*;
    use crate::checkpoint::TensorWriter;

    fn fixture(family: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(family)
    }

    /// The check visits exactly the tensors the loader reads, with their shapes: those a loaded model writes
    /// back (the loader's own traversal, mirrored), for every family.
    #[test]
    fn visits_the_tensors_the_loader_reads() {
        for family in [
            "deepseek_v2",
            "deepseek_v3",
            "llama4_text",
            "mixtral",
            "olmoe",
            "qwen2_moe",
            "qwen3_moe",
        ] {
            let dir = fixture(family);
            let (config, json) = super::super::load_config(&dir).unwrap();
            let index = TensorIndex::open_dir(&dir).unwrap();
            let mut visited = BTreeMap::new();
            visit_expected(&config, &json, &index, &mut |name, dims| {
                let shape: Vec<usize> = dims.iter().map(|d| d.value).collect();
                assert!(
                    visited.insert(name.to_string(), shape).is_none(),
                    "{family}: {name} twice"
                );
                Ok(())
            })
            .unwrap();
            let model = Model::from_pretrained(&dir, &Device::flex()).unwrap();
            let mut w = TensorWriter::default();
            model.write_hf_tensors(&mut w);
            let out = std::env::temp_dir().join(format!(
                "farskip-check-{family}-{}.safetensors",
                std::process::id()
            ));
            w.write(&out, None).unwrap();
            let written = TensorIndex::open_files(std::slice::from_ref(&out)).unwrap();
            let _ = std::fs::remove_file(&out);
            let written: BTreeMap<String, Vec<usize>> = written
                .names()
                .map(|n| (n.to_string(), written.shape(n).unwrap().to_vec()))
                .collect();
            assert_eq!(visited, written, "{family}");
            // and every one of them is in the fixture with that shape
            for (name, shape) in &visited {
                assert_eq!(
                    index.shape(name).unwrap(),
                    shape.as_slice(),
                    "{family} {name}"
                );
            }
        }
    }
}
