//! `forward` on checkpoints that carry their own connectivity and tokenizer: without `--connectivity` a
//! fixture whose config.json records FarSkip on layers 1..=3 gives the reference's range logits (the flag wins
//! when given), and `--prompt TEXT --generate N` prints N decoded tokens.

use std::path::{Path, PathBuf};
use std::process::Command;

use farskip_model::checkpoint::TensorStore;

/// The built example `name` (cargo builds a package's examples before running its tests).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(path.is_file(), "{} is not built", path.display());
    path
}

fn fixture(family: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("../tests/fixtures")
        .join(family)
}

/// `family`'s fixture in a fresh temp dir, its config.json merged with `keys`.
fn checkpoint(family: &str, tag: &str, keys: serde_json::Value) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("farskip-cli-text-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let src = fixture(family);
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).expect("copy");
    let text = std::fs::read_to_string(src.join("config.json")).expect("config");
    let mut config: serde_json::Value = serde_json::from_str(&text).expect("json");
    for (k, v) in keys.as_object().expect("object") {
        config[k] = v.clone();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config");
    dir
}

#[test]
fn forward_runs_a_checkpoint_as_its_config_records() {
    let family = "qwen3_moe";
    let dir = checkpoint(
        family,
        "range",
        serde_json::json!({"farskip": true, "farskip_start_idx": 1, "farskip_end_idx": 3}),
    );
    let reference = fixture(family).join("reference.safetensors");
    let r = TensorStore::open_files(std::slice::from_ref(&reference)).expect("reference");
    for (flag, want) in [(None, "farskip_range_logits"), (Some("standard"), "logits")] {
        let out = dir.join("out.safetensors");
        let mut cmd = Command::new(example("forward"));
        cmd.arg("--model").arg(&dir).arg("--input").arg(&reference);
        cmd.arg("--out").arg(&out);
        if let Some(c) = flag {
            cmd.args(["--connectivity", c]);
        }
        let o = cmd.output().expect("run forward");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = TensorStore::open_files(std::slice::from_ref(&out))
            .expect("out")
            .f32("logits")
            .expect("logits")
            .0;
        let d = farskip_model::compare::max_abs_diff(&got, &r.f32(want).expect("reference").0);
        assert!(
            d <= 1e-4,
            "--connectivity {flag:?}: max |Δ| to {want} = {d}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn forward_prompt_prints_the_decoded_continuation() {
    let dir = checkpoint("olmoe", "prompt", serde_json::json!({}));
    // One word per id of the fixture's 256-token vocabulary: every generated id decodes to a word.
    let words: Vec<String> = (0..255).map(|i| format!("w{i}")).collect();
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for (i, w) in words.iter().enumerate() {
        vocab.insert(w.clone(), (i + 1).into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("tokenizer");
    let out = dir.join("greedy.safetensors");
    let o = Command::new(example("forward"))
        .arg("--model")
        .arg(&dir)
        .args(["--prompt", "w1 w2 w3", "--generate", "5", "--json", "--out"])
        .arg(&out)
        .output()
        .expect("run forward");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = String::from_utf8_lossy(&o.stdout);
    let j: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    assert_eq!(j["seq"], 3, "{j}");
    let (ids, shape) = TensorStore::open_files(std::slice::from_ref(&out))
        .expect("out")
        .i64("greedy_ids")
        .expect("greedy_ids");
    assert_eq!(shape, [1, 8]);
    assert_eq!(ids[..3], [2, 3, 4], "the prompt's ids");
    // The printed continuation is the generated ids, decoded (id 0 is [UNK], id i the word w{i-1}).
    let want: Vec<String> = ids[3..]
        .iter()
        .map(|&i| match i {
            0 => "[UNK]".to_string(),
            i => format!("w{}", i - 1),
        })
        .collect();
    assert_eq!(
        j["continuation"].as_str().expect("continuation"),
        want.join(" "),
        "{j}"
    );

    // Without a tokenizer, --prompt is a clear error.
    std::fs::remove_file(dir.join("tokenizer.json")).expect("remove");
    let o = Command::new(example("forward"))
        .arg("--model")
        .arg(&dir)
        .args(["--prompt", "w1", "--generate", "2"])
        .output()
        .expect("run forward");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("tokenizer.json"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}
