//! Bad input gets an error that names the culprit (file, key, tensor, shape, position, spec), never a panic:
//! broken checkpoint directories, configs and weight files, invalid config values, out-of-vocabulary tokens
//! and connectivity specifications that do not fit the model.

mod common;

use std::path::Path;

use burn::prelude::*;
use farskip_model::checkpoint::{TensorStore, TensorWriter};
use farskip_model::config::{AttentionConfig, RopeScaling};
use farskip_model::hf::parse_config;
use farskip_model::{
    Connectivity, FarSkip, FarSkipVariant, MemoryCheck, Model, ModelConfig, ModelError,
};
use serde_json::{Value, json};

use common::*;

fn dev() -> Device {
    Device::flex()
}

fn load(dir: &Path) -> ModelError {
    match Model::from_pretrained(dir, &dev()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    }
}

/// Rewrites `dir/model.safetensors` through `edit`: `None` drops a tensor, `Some((shape, values))` keeps or
/// replaces it.
fn rewrite(
    dir: &TempDir,
    mut edit: impl FnMut(&str, Vec<usize>, Vec<f32>) -> Option<(Vec<usize>, Vec<f32>)>,
) {
    let path = dir.join("model.safetensors");
    let store = TensorStore::open_files(std::slice::from_ref(&path)).expect("open fixture weights");
    let mut names: Vec<String> = store.names().map(String::from).collect();
    names.sort();
    let mut w = TensorWriter::default();
    for name in &names {
        let (v, shape) = store.f32(name).expect("f32 tensor");
        if let Some((shape, v)) = edit(name, shape, v) {
            w.f32_any(name.clone(), shape.clone(), TensorData::new(v, shape));
        }
    }
    w.write(&path, None).expect("write weights");
}

// ---------------------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------------------

#[test]
fn missing_directory_is_an_io_error_naming_it() {
    let dir = TempDir::new("gone");
    let missing = dir.join("no-such-model");
    match load(&missing) {
        ModelError::Io { path, .. } => assert_eq!(path, missing),
        e => panic!("unexpected error: {e}"),
    }
    assert!(load(&missing).to_string().contains("no-such-model"));
}

#[test]
fn missing_config_json_names_the_file() {
    let dir = copy_fixture("qwen3_moe");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    match load(dir.path()) {
        ModelError::Io { path, .. } => assert_eq!(path, dir.join("config.json")),
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn config_json_that_is_not_json_names_the_file() {
    let dir = copy_fixture("qwen3_moe");
    for text in ["{ \"model_type\": \"qwen3_moe\", ", "", "not json at all"] {
        std::fs::write(dir.join("config.json"), text).unwrap();
        match load(dir.path()) {
            ModelError::ConfigParse { path, message } => {
                assert_eq!(path, dir.join("config.json"));
                assert!(!message.is_empty());
            }
            e => panic!("{text:?}: unexpected error: {e}"),
        }
    }
}

#[test]
fn unknown_model_type_is_named() {
    let dir = copy_fixture("qwen3_moe");
    let mut json = fixture_config("qwen3_moe");
    json["model_type"] = "gpt_oss".into();
    write_config(&dir, &json);
    let e = load(dir.path());
    assert!(
        matches!(&e, ModelError::UnknownModelType(t) if t == "gpt_oss"),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("`gpt_oss`") && msg.contains("qwen3_moe"),
        "{msg}"
    );
}

#[test]
fn missing_model_type_names_the_key() {
    let mut json = fixture_config("mixtral");
    json.as_object_mut().unwrap().remove("model_type");
    let e = parse_config(&json).unwrap_err();
    assert!(
        matches!(&e, ModelError::InvalidConfig { key, .. } if key == "model_type"),
        "{e}"
    );
}

#[test]
fn missing_weights_file_names_it() {
    let dir = copy_fixture("olmoe");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    match load(dir.path()) {
        ModelError::Io { path, source } => {
            assert_eq!(path, dir.join("model.safetensors"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn missing_tensor_is_named_exactly() {
    let cases = [
        ("qwen3_moe", "model.layers.2.mlp.experts.5.up_proj.weight"),
        ("qwen3_moe", "lm_head.weight"),
        ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight"),
        ("qwen2_moe", "model.layers.3.self_attn.v_proj.bias"),
        (
            "deepseek_v2",
            "model.layers.0.self_attn.q_a_layernorm.weight",
        ),
        (
            "deepseek_v3",
            "model.layers.3.mlp.gate.e_score_correction_bias",
        ),
        (
            "llama4_text",
            "model.layers.2.feed_forward.experts.gate_up_proj",
        ),
        (
            "mixtral",
            "model.layers.1.block_sparse_moe.experts.7.w2.weight",
        ),
        ("olmoe", "model.layers.3.self_attn.k_norm.weight"),
        ("olmoe", "model.norm.weight"),
    ];
    for (family, victim) in cases {
        let dir = copy_fixture(family);
        let mut seen = false;
        rewrite(&dir, |name, shape, v| {
            seen |= name == victim;
            (name != victim).then_some((shape, v))
        });
        assert!(seen, "{family} has no tensor {victim}");
        let e = load(dir.path());
        assert!(
            matches!(&e, ModelError::MissingTensor(n) if n == victim),
            "{family}: {e}"
        );
        assert!(e.to_string().contains(victim));
    }
}

#[test]
fn wrong_tensor_shape_names_the_config_key_tensor_and_both_values() {
    // (family, tensor, shape written, (config key, its value, the file's value))
    let cases = [
        (
            "qwen3_moe",
            "model.layers.0.self_attn.k_proj.weight",
            vec![64, 32],
            ("num_key_value_heads × head_dim", 32, 64),
        ),
        (
            "llama4_text",
            "model.layers.2.feed_forward.experts.gate_up_proj",
            vec![8, 32, 64],
            ("hidden_size", 64, 32),
        ),
        (
            "deepseek_v3",
            "model.layers.1.mlp.gate.e_score_correction_bias",
            vec![4],
            ("n_routed_experts", 8, 4),
        ),
    ];
    for (family, victim, written, (culprit, config_value, file_value)) in cases {
        let dir = copy_fixture(family);
        rewrite(&dir, |name, shape, mut v| {
            if name == victim {
                v.truncate(written.iter().product());
                return Some((written.clone(), v));
            }
            Some((shape, v))
        });
        match load(dir.path()) {
            ModelError::ConfigTensorMismatch {
                key,
                config,
                tensor,
                found,
                shape,
            } => {
                assert_eq!(
                    (key.as_str(), tensor.as_str()),
                    (culprit, victim),
                    "{family}"
                );
                assert_eq!((config, found), (config_value, file_value), "{family}");
                assert_eq!(shape, written, "{family}");
            }
            e => panic!("{family}: unexpected error: {e}"),
        }
    }
    // a tensor of another rank than the config implies
    let dir = copy_fixture("qwen2_moe");
    let victim = "model.layers.1.self_attn.q_proj.bias";
    rewrite(&dir, |name, shape, v| {
        Some(if name == victim {
            assert_eq!(shape, [64], "fixture shape");
            (vec![64, 1], v)
        } else {
            (shape, v)
        })
    });
    match load(dir.path()) {
        ModelError::ShapeMismatch {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, victim);
            assert_eq!((expected, found), (vec![64], vec![64, 1]));
        }
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn unsupported_dtype_names_the_tensor() {
    let dir = copy_fixture("mixtral");
    let path = dir.join("model.safetensors");
    let store = TensorStore::open_files(std::slice::from_ref(&path)).unwrap();
    let victim = "model.layers.0.block_sparse_moe.gate.weight";
    let mut w = TensorWriter::default();
    let mut names: Vec<String> = store.names().map(String::from).collect();
    names.sort();
    for name in &names {
        let (v, shape) = store.f32(name).unwrap();
        if name == victim {
            w.i64(name.clone(), shape, &vec![1; v.len()]);
        } else {
            w.f32_any(name.clone(), shape.clone(), TensorData::new(v, shape));
        }
    }
    w.write(&path, None).unwrap();
    match load(dir.path()) {
        ModelError::UnsupportedDtype { name, dtype } => {
            assert_eq!(name, victim);
            assert!(dtype.contains("I64"), "{dtype}");
        }
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn truncated_safetensors_is_reported_as_corrupt_with_its_path() {
    let dir = copy_fixture("qwen3_moe");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(fixture("qwen3_moe").join("model.safetensors")).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for keep in [
        0,
        4,
        8,
        8 + header / 2,
        8 + header,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        match load(dir.path()) {
            ModelError::Safetensors { path: p, message } => {
                assert_eq!(p, path, "truncated to {keep} bytes");
                assert!(!message.is_empty());
            }
            e => panic!("truncated to {keep} bytes: unexpected error: {e}"),
        }
    }
    // garbage with a plausible header length
    let mut garbage = 16u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"{\"a\": [1, 2, 3]}");
    std::fs::write(&path, garbage).unwrap();
    assert!(matches!(load(dir.path()), ModelError::Safetensors { .. }));
}

#[test]
fn sharded_checkpoint_errors_name_the_index_or_the_shard() {
    let dir = copy_fixture("olmoe");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let index = dir.join("model.safetensors.index.json");
    // an index that is not JSON
    std::fs::write(&index, "{ weight_map").unwrap();
    assert!(matches!(load(dir.path()), ModelError::Safetensors { path, .. } if path == index));
    // an index without a weight map
    std::fs::write(&index, "{}").unwrap();
    match load(dir.path()) {
        ModelError::Safetensors { path, message } => {
            assert_eq!(path, index);
            assert!(message.contains("weight_map"), "{message}");
        }
        e => panic!("unexpected error: {e}"),
    }
    // a shard that does not exist
    let map =
        json!({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}});
    std::fs::write(&index, map.to_string()).unwrap();
    match load(dir.path()) {
        ModelError::Io { path, .. } => {
            assert_eq!(path, dir.join("model-00001-of-00002.safetensors"))
        }
        e => panic!("unexpected error: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// config.json against the tensors: checked from the safetensors headers before a weight is allocated
// ---------------------------------------------------------------------------------------------------------

/// Loads `family`'s fixture with `key` set to `value` and returns the error and how long it took.
fn load_with(family: &str, key: &str, value: Value) -> (ModelError, std::time::Duration) {
    let dir = copy_fixture(family);
    let mut json = fixture_config(family);
    json[key] = value;
    write_config(&dir, &json);
    let start = std::time::Instant::now();
    let e = load(dir.path());
    (e, start.elapsed())
}

/// (family, key, value, the key the error names and its value, tensor, value in the file)
type MismatchCase = (
    &'static str,
    &'static str,
    u64,
    (&'static str, u64),
    &'static str,
    usize,
);

/// Each case fails with `ConfigTensorMismatch` naming the key, the tensor and both values, in well under a
/// second (nothing of the config's size is allocated) and with a message that says all of it on one line.
fn assert_mismatches(cases: &[MismatchCase]) {
    for &(family, key, value, (culprit, implied), victim, file_value) in cases {
        let (e, took) = load_with(family, key, json!(value));
        let msg = e.to_string();
        match e {
            ModelError::ConfigTensorMismatch {
                key: k,
                config,
                tensor,
                found,
                ..
            } => {
                assert_eq!(
                    (k.as_str(), tensor.as_str()),
                    (culprit, victim),
                    "{family} {key}={value}"
                );
                assert_eq!(
                    (config as u64, found),
                    (implied, file_value),
                    "{family} {key}={value}"
                );
            }
            e => panic!("{family} {key}={value}: unexpected error: {e}"),
        }
        for part in [
            culprit,
            victim,
            &implied.to_string(),
            &file_value.to_string(),
        ] {
            assert!(msg.contains(part), "{msg} lacks {part}");
        }
        assert!(!msg.contains('\n'), "{msg}");
        assert!(took.as_secs_f64() < 1.0, "{family} {key}={value}: {took:?}");
    }
}

#[test]
fn config_dimension_larger_than_the_tensor_names_key_and_tensor() {
    assert_mismatches(&[
        (
            "qwen3_moe",
            "hidden_size",
            4_000_000_000,
            ("hidden_size", 4_000_000_000),
            "model.embed_tokens.weight",
            64,
        ),
        (
            "qwen3_moe",
            "moe_intermediate_size",
            123_456_789,
            ("moe_intermediate_size", 123_456_789),
            "model.layers.0.mlp.experts.0.gate_proj.weight",
            32,
        ),
        (
            "llama4_text",
            "intermediate_size_mlp",
            4096,
            ("intermediate_size_mlp", 4096),
            "model.layers.1.feed_forward.gate_proj.weight",
            128,
        ),
        (
            "mixtral",
            "intermediate_size",
            64,
            ("intermediate_size", 64),
            "model.layers.0.block_sparse_moe.experts.0.w1.weight",
            32,
        ),
    ]);
}

#[test]
fn config_dimension_smaller_than_the_tensor_names_key_and_tensor() {
    assert_mismatches(&[
        (
            "qwen3_moe",
            "hidden_size",
            32,
            ("hidden_size", 32),
            "model.embed_tokens.weight",
            64,
        ),
        (
            "qwen2_moe",
            "shared_expert_intermediate_size",
            16,
            ("shared_expert_intermediate_size", 16),
            "model.layers.0.mlp.shared_expert.gate_proj.weight",
            64,
        ),
        (
            "olmoe",
            "num_key_value_heads",
            2,
            ("num_key_value_heads × head_dim", 32),
            "model.layers.0.self_attn.k_proj.weight",
            64,
        ),
        (
            "deepseek_v2",
            "q_lora_rank",
            16,
            ("q_lora_rank", 16),
            "model.layers.0.self_attn.q_a_proj.weight",
            32,
        ),
    ]);
}

#[test]
fn config_vocab_size_that_is_not_the_embeddings_names_both() {
    assert_mismatches(&[
        (
            "qwen3_moe",
            "vocab_size",
            100_000_000_000,
            ("vocab_size", 100_000_000_000),
            "model.embed_tokens.weight",
            256,
        ),
        (
            "qwen3_moe",
            "vocab_size",
            255,
            ("vocab_size", 255),
            "model.embed_tokens.weight",
            256,
        ),
        (
            "deepseek_v3",
            "vocab_size",
            257,
            ("vocab_size", 257),
            "model.embed_tokens.weight",
            256,
        ),
    ]);
}

#[test]
fn config_expert_count_that_is_not_the_router_names_both() {
    assert_mismatches(&[
        (
            "qwen3_moe",
            "num_experts",
            1_000_000_000,
            ("num_experts", 1_000_000_000),
            "model.layers.0.mlp.gate.weight",
            8,
        ),
        (
            "mixtral",
            "num_local_experts",
            4,
            ("num_local_experts", 4),
            "model.layers.0.block_sparse_moe.gate.weight",
            8,
        ),
        (
            "deepseek_v3",
            "n_routed_experts",
            16,
            ("n_routed_experts", 16),
            "model.layers.1.mlp.gate.weight",
            8,
        ),
        (
            "llama4_text",
            "num_local_experts",
            16,
            ("num_local_experts", 16),
            "model.layers.0.feed_forward.router.weight",
            8,
        ),
    ]);
}

#[test]
fn config_layer_count_beyond_the_file_names_the_first_missing_layer() {
    for (family, layers) in [
        ("qwen3_moe", 100_000u64),
        ("qwen3_moe", 5),
        ("deepseek_v3", 1 << 60),
    ] {
        let (e, took) = load_with(family, "num_hidden_layers", json!(layers));
        let msg = e.to_string();
        match e {
            ModelError::LayerCountMismatch {
                config,
                found,
                tensor,
            } => {
                assert_eq!((config, found), (layers, 4), "{family}");
                assert_eq!(tensor, "model.layers.4.input_layernorm.weight");
            }
            e => panic!("{family} {layers}: unexpected error: {e}"),
        }
        assert!(
            msg.contains("num_hidden_layers")
                && msg.contains(&layers.to_string())
                && msg.contains("model.layers.4.input_layernorm.weight"),
            "{msg}"
        );
        assert!(took.as_secs_f64() < 1.0, "{family} {layers}: {took:?}");
    }
    // fewer layers than the file holds is a truncated model, which loads
    let dir = copy_fixture("qwen3_moe");
    let mut json = fixture_config("qwen3_moe");
    json["num_hidden_layers"] = 3.into();
    write_config(&dir, &json);
    let m = Model::from_pretrained(dir.path(), &dev()).expect("3 of 4 layers");
    assert_eq!(m.config().num_layers(), 3);
}

#[test]
fn parse_config_refuses_a_layer_count_no_model_has() {
    let mut json = fixture_config("qwen3_moe");
    json["num_hidden_layers"] = json!(1u64 << 40);
    let start = std::time::Instant::now();
    let e = parse_config(&json).unwrap_err();
    assert!(
        matches!(&e, ModelError::InvalidConfig { key, .. } if key == "num_hidden_layers"),
        "{e}"
    );
    assert!(start.elapsed().as_secs_f64() < 1.0);
}

#[test]
fn estimate_bytes_counts_every_weight_in_f32() {
    for family in FAMILIES {
        let m = Model::from_pretrained(fixture(family), &dev()).unwrap();
        let params = m.num_params() as u64;
        assert_eq!(Model::estimate_bytes(m.config()), 4 * params, "{family}");
    }
    for cfg in [
        ModelConfig::small_moe(32, 16, 2, 2, 1, 8, 4, 2, 8, None),
        ModelConfig::small_moe(40, 24, 3, 4, 2, 6, 6, 2, 12, Some(20)),
    ] {
        let params = Model::new(&cfg, &dev()).unwrap().num_params() as u64;
        assert_eq!(Model::estimate_bytes(&cfg), 4 * params);
    }
    // absurd values saturate instead of overflowing
    let mut cfg = ModelConfig::small_moe(32, 16, 2, 2, 1, 8, 4, 2, 8, None);
    cfg.vocab_size = usize::MAX;
    assert_eq!(Model::estimate_bytes(&cfg), u64::MAX);
}

#[test]
fn memory_check_refuses_or_warns_when_the_estimate_exceeds_what_is_available() {
    let what = "loading test";
    let e = MemoryCheck::Refuse
        .check_against(what, 3 << 30, Some(1 << 30))
        .unwrap_err();
    match &e {
        ModelError::InsufficientMemory {
            what: w,
            needed,
            available,
        } => {
            assert_eq!((w.as_str(), *needed, *available), (what, 3 << 30, 1 << 30));
        }
        e => panic!("unexpected error: {e}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("3.00 GiB") && msg.contains("1.00 GiB") && msg.contains(what),
        "{msg}"
    );
    MemoryCheck::Warn
        .check_against(what, 3 << 30, Some(1 << 30))
        .expect("a warning");
    MemoryCheck::Refuse
        .check_against(what, 1 << 30, Some(1 << 30))
        .expect("fits exactly");
    MemoryCheck::Refuse
        .check_against(what, u64::MAX, None)
        .expect("unknown: nothing to check");
}

// ---------------------------------------------------------------------------------------------------------
// Config values
// ---------------------------------------------------------------------------------------------------------

fn set(json: &mut Value, key: &str, value: Value) {
    match value {
        Value::Null => {
            json.as_object_mut().unwrap().remove(key);
        }
        v => json[key] = v,
    }
}

#[test]
fn invalid_config_values_name_the_key() {
    // (family, key to set (Null removes it), value, key the error must name)
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "qwen3_moe",
            "num_experts_per_tok",
            json!(9),
            "num_experts_per_tok",
        ),
        (
            "qwen3_moe",
            "num_experts_per_tok",
            json!(0),
            "num_experts_per_tok",
        ),
        (
            "qwen3_moe",
            "num_experts_per_tok",
            Value::Null,
            "num_experts_per_tok",
        ),
        ("deepseek_v3", "n_group", json!(3), "n_group"),
        ("deepseek_v3", "n_group", json!(0), "n_group"),
        ("deepseek_v3", "n_group", json!(8), "n_group"),
        ("deepseek_v3", "topk_group", json!(5), "topk_group"),
        ("deepseek_v3", "topk_group", json!(0), "topk_group"),
        ("deepseek_v2", "num_experts_per_tok", json!(5), "topk_group"),
        (
            "deepseek_v2",
            "topk_method",
            json!("mystery"),
            "topk_method",
        ),
        (
            "deepseek_v3",
            "qk_rope_head_dim",
            json!(7),
            "qk_rope_head_dim",
        ),
        ("deepseek_v3", "kv_lora_rank", json!(0), "kv_lora_rank"),
        ("deepseek_v3", "q_lora_rank", json!(0), "q_lora_rank"),
        ("deepseek_v3", "v_head_dim", json!(0), "v_head_dim"),
        ("qwen3_moe", "hidden_size", json!(0), "hidden_size"),
        ("qwen3_moe", "hidden_size", json!(-64), "hidden_size"),
        ("qwen3_moe", "hidden_size", json!("64"), "hidden_size"),
        ("qwen3_moe", "hidden_size", json!(64.5), "hidden_size"),
        ("qwen3_moe", "vocab_size", json!(0), "vocab_size"),
        (
            "qwen3_moe",
            "num_hidden_layers",
            json!(0),
            "num_hidden_layers",
        ),
        (
            "qwen3_moe",
            "num_attention_heads",
            json!(0),
            "num_attention_heads",
        ),
        (
            "qwen3_moe",
            "num_key_value_heads",
            json!(3),
            "num_key_value_heads",
        ),
        (
            "qwen3_moe",
            "num_key_value_heads",
            json!(0),
            "num_key_value_heads",
        ),
        ("qwen3_moe", "head_dim", json!(7), "head_dim"),
        ("qwen3_moe", "rms_norm_eps", json!(-1e-6), "rms_norm_eps"),
        ("qwen3_moe", "rms_norm_eps", json!(0.0), "rms_norm_eps"),
        (
            "qwen3_moe",
            "moe_intermediate_size",
            json!(0),
            "moe_intermediate_size",
        ),
        (
            "qwen3_moe",
            "mlp_only_layers",
            json!("1"),
            "mlp_only_layers",
        ),
        (
            "qwen3_moe",
            "norm_topk_prob",
            json!("yes"),
            "norm_topk_prob",
        ),
        (
            "qwen3_moe",
            "rope_parameters",
            json!({"rope_type": "dynamic", "rope_theta": 1e6}),
            "rope_type",
        ),
        (
            "qwen3_moe",
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": 0.0}),
            "rope_theta",
        ),
        ("mixtral", "num_local_experts", json!(0), "num_experts"),
        ("mixtral", "num_local_experts", Value::Null, "num_experts"),
        ("olmoe", "clip_qkv", json!(8.0), "clip_qkv"),
        (
            "llama4_text",
            "no_rope_layers",
            json!([1, 1]),
            "no_rope_layers",
        ),
        (
            "llama4_text",
            "attention_chunk_size",
            json!(0),
            "attention_chunk_size",
        ),
        (
            "llama4_text",
            "layer_types",
            json!("chunked_attention"),
            "layer_types",
        ),
    ];
    for (family, key, value, culprit) in cases {
        let mut json = fixture_config(family);
        set(&mut json, key, value.clone());
        match parse_config(&json) {
            Err(ModelError::InvalidConfig { key: k, message }) => {
                assert_eq!(k, culprit, "{family} {key}={value}: {message}");
                let shown = ModelError::InvalidConfig {
                    key: k.clone(),
                    message,
                }
                .to_string();
                assert!(shown.contains(culprit), "{shown}");
            }
            Err(e) => panic!("{family} {key}={value}: unexpected error {e}"),
            Ok(_) => panic!("{family} {key}={value}: accepted"),
        }
    }
}

#[test]
fn invalid_config_values_are_reported_by_from_pretrained_too() {
    let dir = copy_fixture("deepseek_v3");
    let mut json = fixture_config("deepseek_v3");
    json["n_group"] = 3.into();
    write_config(&dir, &json);
    let e = load(dir.path());
    assert!(
        matches!(&e, ModelError::InvalidConfig { key, .. } if key == "n_group"),
        "{e}"
    );
    assert!(
        e.to_string().contains("3 does not divide the 8 experts"),
        "{e}"
    );
}

#[test]
fn model_new_validates_the_config() {
    let bad = [
        (
            ModelConfig::small_moe(32, 16, 2, 2, 1, 8, 4, 5, 8, None),
            "num_experts_per_tok",
        ),
        (
            ModelConfig::small_moe(32, 0, 2, 2, 1, 8, 4, 2, 8, None),
            "hidden_size",
        ),
        (
            ModelConfig::small_moe(0, 16, 2, 2, 1, 8, 4, 2, 8, None),
            "vocab_size",
        ),
        (
            ModelConfig::small_moe(32, 16, 0, 2, 1, 8, 4, 2, 8, None),
            "num_hidden_layers",
        ),
        (
            ModelConfig::small_moe(32, 16, 2, 3, 2, 8, 4, 2, 8, None),
            "num_key_value_heads",
        ),
        (
            ModelConfig::small_moe(32, 16, 2, 2, 1, 8, 0, 0, 8, None),
            "num_experts",
        ),
        (
            ModelConfig::small_moe(32, 16, 2, 2, 1, 8, 4, 2, 8, Some(0)),
            "shared_expert_intermediate_size",
        ),
    ];
    for (cfg, culprit) in bad {
        match Model::new(&cfg, &dev()) {
            Err(ModelError::InvalidConfig { key, .. }) => assert_eq!(key, culprit),
            Err(e) => panic!("{culprit}: unexpected error {e}"),
            Ok(_) => panic!("{culprit}: accepted"),
        }
    }
    // an MoE layer without an MoE block
    let mut cfg = ModelConfig::small_moe(32, 16, 2, 2, 1, 8, 4, 2, 8, None);
    cfg.moe = None;
    assert!(
        matches!(Model::new(&cfg, &dev()), Err(ModelError::InvalidConfig { key, .. }) if key == "layer 0")
    );
}

/// A change to a config.json.
type Edit = fn(&mut Value);

#[test]
fn degenerate_rope_and_attention_values_are_rejected_before_they_produce_nan() {
    // each of these used to load and return non-finite logits (or panic in forward) without an error
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "qwen3_moe",
            (|j| {
                j["rope_parameters"] =
                    json!({"rope_type": "linear", "factor": 0.0, "rope_theta": 1e6})
            }),
            "factor",
        ),
        (
            "deepseek_v3",
            (|j| j["rope_parameters"]["original_max_position_embeddings"] = 0.into()),
            "original_max_position_embeddings",
        ),
        (
            "deepseek_v3",
            (|j| {
                // without an original context length the configured factor is used as is
                j["rope_parameters"]
                    .as_object_mut()
                    .unwrap()
                    .remove("original_max_position_embeddings");
                j["rope_parameters"]["factor"] = (-4.0).into();
            }),
            "factor",
        ),
        (
            "llama4_text",
            (|j| {
                j["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 0})
            }),
            "original_max_position_embeddings",
        ),
        (
            "llama4_text",
            (|j| j["floor_scale"] = 0.into()),
            "floor_scale",
        ),
        (
            "deepseek_v3",
            (|j| j["qk_nope_head_dim"] = 0.into()),
            "qk_nope_head_dim",
        ),
    ];
    for (family, edit, culprit) in cases {
        let mut json = fixture_config(family);
        edit(&mut json);
        match parse_config(&json) {
            Err(ModelError::InvalidConfig { key, .. }) => assert_eq!(key, culprit, "{family}"),
            Err(e) => panic!("{family} {culprit}: unexpected error {e}"),
            Ok(cfg) => {
                let outcome = std::panic::catch_unwind(|| {
                    let model = Model::new(&cfg, &dev()).expect("validated config");
                    values(
                        model
                            .forward(id_tensor(&[1, 2, 3], 1, &dev()))
                            .expect("forward"),
                    )
                    .iter()
                    .all(|v| v.is_finite())
                });
                panic!("{family}: bad `{culprit}` accepted (forward finite: {outcome:?})");
            }
        }
    }
    // a valid YaRN config (the fixture) still passes, with a finite factor
    let cfg = parse_config(&fixture_config("deepseek_v3")).unwrap();
    assert!(matches!(cfg.rope.scaling, RopeScaling::Yarn { factor, .. } if factor == 4.0));
    assert!(matches!(cfg.attention, AttentionConfig::Mla(_)));
}

// ---------------------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------------------

fn small_model() -> Model {
    let cfg = ModelConfig::small_moe(32, 16, 2, 2, 1, 8, 4, 2, 8, None);
    Model::new(&cfg, &dev()).unwrap()
}

#[test]
fn token_out_of_vocabulary_is_reported_with_its_position() {
    let model = small_model();
    let cases: [(&[i64], usize, i64, usize, usize); 4] = [
        (&[1, 2, 3, 4, 32, 5], 2, 32, 1, 1),
        (&[1, 2, 3, 4, 5, 1000], 2, 1000, 1, 2),
        (&[-1, 2, 3], 1, -1, 0, 0),
        (&[0, 31, 31, 7, 8, 40, 99, 0], 2, 40, 1, 1),
    ];
    for (ids, rows, bad, row, col) in cases {
        for via_generate in [false, true] {
            let input = id_tensor(ids, rows, &dev());
            let result = if via_generate {
                model.generate(input, 2).map(|_| ())
            } else {
                model.forward(input).map(|_| ())
            };
            match result {
                Err(ModelError::TokenOutOfVocab {
                    id,
                    row: r,
                    col: c,
                    vocab,
                }) => assert_eq!(
                    (id, r, c, vocab),
                    (bad, row, col, 32),
                    "{ids:?} generate={via_generate}"
                ),
                Err(e) => panic!("{ids:?}: unexpected error {e}"),
                Ok(()) => panic!("{ids:?}: accepted"),
            }
        }
    }
    let e = model
        .forward(id_tensor(&[5, 77], 1, &dev()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("77") && e.contains("[0, 1]") && e.contains("32"),
        "{e}"
    );
    // the boundary id is fine
    assert!(model.forward(id_tensor(&[0, 31], 1, &dev())).is_ok());
}

#[test]
fn empty_input_and_zero_new_tokens_are_invalid_input() {
    let model = small_model();
    let empty = Tensor::<2, Int>::zeros([1, 0], &dev());
    assert!(matches!(
        model.forward(empty.clone()),
        Err(ModelError::InvalidInput(_))
    ));
    assert!(matches!(
        model.generate(empty, 1),
        Err(ModelError::InvalidInput(_))
    ));
    let no_rows = Tensor::<2, Int>::zeros([0, 3], &dev());
    assert!(matches!(
        model.forward(no_rows),
        Err(ModelError::InvalidInput(_))
    ));
    match model.generate(id_tensor(&[1, 2], 1, &dev()), 0) {
        Err(ModelError::InvalidInput(m)) => assert!(m.contains("max_new_tokens"), "{m}"),
        other => panic!("unexpected {:?}", other.map(|_| ())),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Connectivity
// ---------------------------------------------------------------------------------------------------------

#[test]
fn invalid_connectivity_strings_are_rejected_with_the_spec() {
    let bad = [
        "",
        "far",
        "FarSkip",
        "farskip-attn",
        "standard:1..2",
        "standard:",
        "farskip:",
        "farskip:3..=1",
        "farskip:3..2",
        "farskip:2..2",
        "farskip:a..=2",
        "farskip:1..=b",
        "farskip:-1..",
        "farskip:5",
        "farskip:..3",
        "farskip-mlp-only:1..=x",
    ];
    for spec in bad {
        match spec.parse::<Connectivity>() {
            Err(ModelError::InvalidConnectivity { spec: s, message }) => {
                assert_eq!(s, spec);
                assert!(!message.is_empty());
                assert!(
                    ModelError::InvalidConnectivity { spec: s, message }
                        .to_string()
                        .contains(&format!("`{spec}`"))
                );
            }
            Err(e) => panic!("{spec:?}: unexpected error {e}"),
            Ok(c) => panic!("{spec:?} parsed as {c:?}"),
        }
    }
}

#[test]
fn connectivity_ranges_must_fit_the_model() {
    let model = small_model(); // 2 layers
    for spec in [
        "farskip:2..",
        "farskip:2..=3",
        "farskip-attn-only:5..=9",
        "farskip-mlp-only:7..",
    ] {
        match model.clone().with_connectivity(spec.parse().unwrap()) {
            Err(ModelError::InvalidConnectivity { spec: s, message }) => {
                assert_eq!(s, spec);
                assert!(message.contains("2 layers"), "{spec}: {message}");
            }
            Err(e) => panic!("{spec}: unexpected error {e}"),
            Ok(_) => panic!("{spec}: accepted on a 2-layer model"),
        }
    }
    // built by hand, past the parser
    for bad in [
        FarSkip {
            end: Some(0),
            ..FarSkip::range(1, 1)
        },
        FarSkip {
            depth: 2,
            variant: FarSkipVariant::AttnOnly,
            ..FarSkip::all()
        },
        FarSkip {
            depth: 0,
            ..FarSkip::all()
        },
    ] {
        let r = model
            .clone()
            .with_connectivity(Connectivity::FarSkip(bad.clone()));
        assert!(
            matches!(r, Err(ModelError::InvalidConnectivity { .. })),
            "{bad:?} accepted"
        );
    }
    // an end past the last layer is clamped, as in the reference (`min(end, L - 1)`)
    let ids = id_tensor(&[1, 2, 3, 4], 1, &dev());
    let clamped = model
        .clone()
        .with_connectivity("farskip:1..=9".parse().unwrap())
        .unwrap();
    let open = model
        .with_connectivity("farskip:1..".parse().unwrap())
        .unwrap();
    assert_eq!(
        max_diff(
            clamped.forward(ids.clone()).unwrap(),
            open.forward(ids).unwrap()
        ),
        0.0
    );
}
