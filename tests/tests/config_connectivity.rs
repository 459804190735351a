//! Connectivity recorded in `config.json` (the Instella-MoE keys `farskip`, `farskip_start_idx`,
//! `farskip_end_idx`, `attn_only_farskip`, `mlp_only_farskip`, plus `farskip_depth`): every family saved under
//! each connectivity reloads as that connectivity with the same logits; a fixture whose config gains a range
//! reproduces the reference's range logits; bad values are errors that name the key.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use farskip_model::hf::load_config;
use farskip_model::{Connectivity, FarSkip, Model, ModelError};
use farskip_tests::*;
use serde_json::{Value, json};

/// A fresh directory under the system temp dir, unique to this process and `name`.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "farskip-config-connectivity-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// What a connectivity does to a model of `layers` layers: which layers are converted, the variant, the depth.
fn behaviour(c: &Connectivity, layers: usize) -> (Vec<bool>, Option<(String, usize)>) {
    let converted = (0..layers).map(|i| c.is_converted(i)).collect();
    let kind = match c {
        Connectivity::Standard => None,
        Connectivity::FarSkip(f) => Some((format!("{:?}", f.variant), f.depth)),
    };
    (converted, kind)
}

fn connectivities() -> Vec<Connectivity> {
    let mut v: Vec<Connectivity> = [
        "standard",
        "farskip",
        "farskip:1..=3",
        "farskip:1..=2",
        "farskip-mlp-only",
        "farskip-attn-only:2..",
    ]
    .iter()
    .map(|s| s.parse().expect("spec"))
    .collect();
    v.push(Connectivity::FarSkip(FarSkip {
        depth: 2,
        ..FarSkip::all()
    }));
    v
}

#[test]
fn every_family_round_trips_its_connectivity() {
    let device = Device::flex();
    let mut report = Vec::new();
    for family in FAMILIES {
        let dir = fixture_dir(family);
        let (_, hf) = load_config(&dir).unwrap_or_else(|e| panic!("{family}: {e}"));
        let model =
            Model::from_pretrained(&dir, &device).unwrap_or_else(|e| panic!("{family}: {e}"));
        let layers = model.config().num_layers();
        let input = ids(&reference(family), "input_ids", &device);
        for c in connectivities() {
            let m = model
                .clone()
                .with_connectivity(c.clone())
                .unwrap_or_else(|e| panic!("{family} {c}: {e}"));
            let want = m.forward(input.clone()).expect("forward");
            let out = temp_dir(&format!("{family}-{}", c.to_string().replace(':', "_")));
            m.save_pretrained(&out, Some(&hf)).expect("save");
            let back = Model::from_pretrained(&out, &device)
                .unwrap_or_else(|e| panic!("{family} {c}: reload: {e}"));
            assert_eq!(
                behaviour(back.connectivity(), layers),
                behaviour(&c, layers),
                "{family}: saved as {c}, reloaded as {}",
                back.connectivity()
            );
            let d = farskip_model::compare::max_abs_diff_tensors(
                back.forward(input.clone()).expect("forward"),
                want,
            );
            assert!(d <= 1e-6, "{family} {c}: max |Δ logits| after reload = {d}");
            report.push(format!("{family} {c}: {d:.1e}"));
            let _ = std::fs::remove_dir_all(&out);
        }
        // A standard save of a FarSkip-configured checkpoint drops the keys.
        let out = temp_dir(&format!("{family}-standard-clears"));
        let mut tagged = hf.clone();
        tagged["farskip"] = json!(true);
        model.save_pretrained(&out, Some(&tagged)).expect("save");
        let (_, saved) = load_config(&out).expect("config");
        assert!(saved.get("farskip").is_none(), "{family}: {saved}");
        let _ = std::fs::remove_dir_all(&out);
    }
    eprintln!("{}", report.join("\n"));
}

/// `family`'s fixture with `keys` merged into its config.json, in a temp dir.
fn fixture_with(family: &str, name: &str, keys: &Value) -> PathBuf {
    let src = fixture_dir(family);
    let dir = temp_dir(&format!("{family}-{name}"));
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).expect("copy");
    let (_, mut hf) = load_config(&src).expect("config");
    for (k, v) in keys.as_object().expect("object") {
        hf[k] = v.clone();
    }
    std::fs::write(dir.join("config.json"), hf.to_string()).expect("write config");
    dir
}

#[test]
fn config_range_gives_the_reference_range_logits() {
    let device = Device::flex();
    for family in FAMILIES {
        let dir = fixture_with(
            family,
            "range",
            &json!({"farskip": true, "farskip_start_idx": 1, "farskip_end_idx": 3}),
        );
        let model =
            Model::from_pretrained(&dir, &device).unwrap_or_else(|e| panic!("{family}: {e}"));
        assert_eq!(model.connectivity().to_string(), "farskip:1..", "{family}");
        let r = reference(family);
        let logits = model
            .forward(ids(&r, "input_ids", &device))
            .expect("forward");
        let (v, shape) = r.f32("farskip_range_logits").expect("reference");
        let want =
            Tensor::<3>::from_data(TensorData::new(v, [shape[0], shape[1], shape[2]]), &device);
        let d = farskip_model::compare::max_abs_diff_tensors(logits, want);
        assert!(d <= 1e-4, "{family}: max |Δ| to farskip_range_logits = {d}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn load_error(dir: &Path) -> ModelError {
    match Model::from_pretrained(dir, &Device::flex()) {
        Ok(m) => panic!("{} loaded as {}", dir.display(), m.connectivity()),
        Err(e) => e,
    }
}

#[test]
fn bad_farskip_keys_are_errors_naming_the_key() {
    let cases = [
        (
            "both-variants",
            json!({"farskip": true, "attn_only_farskip": true, "mlp_only_farskip": true}),
            "mlp_only_farskip",
        ),
        (
            "start-after-end",
            json!({"farskip": true, "farskip_start_idx": 3, "farskip_end_idx": 1}),
            "farskip_end_idx",
        ),
        (
            "start-past-last",
            json!({"farskip": true, "farskip_start_idx": 4}),
            "farskip_start_idx",
        ),
        (
            "depth-zero",
            json!({"farskip": true, "farskip_depth": 0}),
            "farskip_depth",
        ),
        (
            "fractional",
            json!({"farskip": true, "farskip_start_idx": 1.5}),
            "farskip_start_idx",
        ),
        (
            "negative",
            json!({"farskip": true, "farskip_end_idx": -1}),
            "farskip_end_idx",
        ),
        ("string-flag", json!({"farskip": "yes"}), "farskip"),
        (
            "string-variant",
            json!({"farskip": false, "attn_only_farskip": 1}),
            "attn_only_farskip",
        ),
    ];
    for (name, keys, key) in cases {
        let dir = fixture_with("qwen3_moe", name, &keys);
        match load_error(&dir) {
            ModelError::InvalidConfig { key: k, message } => {
                assert_eq!(k, key, "{name}: {message}");
            }
            other => panic!("{name}: expected an invalid-config error naming {key}, got {other}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn absent_or_false_flag_is_standard_and_end_default_is_the_last_layer() {
    let device = Device::flex();
    let off = fixture_with(
        "olmoe",
        "off",
        &json!({"farskip": false, "farskip_start_idx": 2}),
    );
    assert_eq!(
        *Model::from_pretrained(&off, &device)
            .expect("load")
            .connectivity(),
        Connectivity::Standard
    );
    let on = fixture_with(
        "olmoe",
        "on",
        &json!({"farskip": true, "farskip_start_idx": 2}),
    );
    let m = Model::from_pretrained(&on, &device).expect("load");
    assert_eq!(m.connectivity().to_string(), "farskip:2..");
    for d in [off, on] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_preset_with_a_shared_expert_saves_and_reloads() {
    // The recipe's teacher: Qwen3-style attention with an ungated shared expert, saved with a generated config.
    let device = Device::flex();
    let cfg = farskip_model::ModelConfig::small_moe(256, 32, 2, 2, 1, 16, 4, 2, 32, Some(24));
    device.seed(3);
    let model = Model::new(&cfg, &device)
        .expect("model")
        .with_connectivity("farskip".parse().expect("spec"))
        .expect("farskip");
    let out = temp_dir("shared-preset");
    model.save_pretrained(&out, None).expect("save");
    let back = Model::from_pretrained(&out, &device).expect("reload");
    assert_eq!(back.config(), model.config());
    assert_eq!(back.connectivity(), model.connectivity());
    let input = Tensor::<2, Int>::from_ints([[1, 5, 9, 200, 3, 17]], &device);
    let d = farskip_model::compare::max_abs_diff_tensors(
        back.forward(input.clone()).expect("forward"),
        model.forward(input).expect("forward"),
    );
    assert!(d <= 1e-6, "max |Δ logits| after reload = {d}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_trained_model_saves_and_reloads() {
    // Trained weights (not the constant-initialised norms of a fresh model) survive save and reload.
    use farskip_train::data::{BatchShape, ByteCorpus, RandomBatches, ValidationSet};
    use farskip_train::{Method, TrainConfig, TrainData, train};
    let device = Device::flex();
    let cfg = farskip_model::ModelConfig::small_moe(256, 64, 2, 4, 2, 16, 4, 2, 48, Some(48));
    device.seed(5);
    let init = Model::new(&cfg, &device).expect("model");
    let text = "All the world's a stage, and all the men and women merely players. ".repeat(40);
    let split = ByteCorpus::from_text(&text)
        .expect("text")
        .split(0.2)
        .expect("split");
    let shape = BatchShape::new(32, 128).expect("shape");
    let valid = ValidationSet::new(split.valid, shape)
        .expect("valid")
        .truncated(2);
    let tc = TrainConfig::new("teacher", Method::Pretrain, 6, 3e-3);
    let data = TrainData {
        batches: RandomBatches::new(split.train, shape, 1, &device).expect("batches"),
        valid: &valid,
        teacher_logits: None,
    };
    let model = train(init, None, data, &tc).expect("train").model;
    let out = temp_dir("trained");
    model.save_pretrained(&out, None).expect("save");
    let back = Model::from_pretrained(&out, &device).expect("reload");
    let input = Tensor::<2, Int>::from_ints([[65, 108, 108, 32, 116, 104, 101, 32]], &device);
    let d = farskip_model::compare::max_abs_diff_tensors(
        back.forward(input.clone()).expect("forward"),
        model.forward(input).expect("forward"),
    );
    assert!(d <= 1e-6, "max |Δ logits| after reload = {d}");
    let _ = std::fs::remove_dir_all(&out);
}
