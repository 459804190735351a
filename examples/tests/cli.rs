//! The examples as a user runs them: bad checkpoints, bad files and bad values end with exit status 1 and one
//! line on stderr that names the culprit, quickly, and leave nothing at `--out`. Runs the example binaries that
//! `cargo test` builds next to this test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The built example `name` (cargo builds the examples of a package before running its tests).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        path.is_file(),
        "{} is not built (`cargo test -p farskip-examples` builds the examples first)",
        path.display()
    );
    path
}

fn fixture(family: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("../tests/fixtures")
        .join(family)
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("farskip-cli-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A copy of the `qwen3_moe` fixture in `dir/model` with `key` set to `value`.
fn mutated_checkpoint(dir: &TempDir, key: &str, value: Value) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(
        fixture("qwen3_moe").join("model.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(fixture("qwen3_moe").join("config.json")).unwrap();
    let mut config: Value = serde_json::from_str(&text).unwrap();
    config[key] = value;
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    model
}

/// Runs `forward` with `args` (and `env`), returning its output and wall time.
fn forward(args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    run_example("forward", args, env)
}

/// Runs the example `name` with `args` (and `env`), returning its output and wall time.
fn run_example(name: &str, args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new(example(name))
        .args(args)
        .env_remove("FARSKIP_MEMORY_AVAILABLE")
        .envs(env.iter().copied())
        .output()
        .expect("run the example");
    (out, start.elapsed())
}

/// The non-empty lines of stderr.
fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

/// The JSON report an example printed as its last line, after checking it succeeded (`what` names the run).
fn json_report(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: {e} in {line:?}"))
}

/// Exit status 1 and exactly one line on stderr, which contains every one of `parts`.
fn assert_one_line_error(out: &Output, parts: &[&str], what: &str) {
    let lines = stderr_lines(out);
    assert_eq!(out.status.code(), Some(1), "{what}: {lines:?}");
    assert_eq!(lines.len(), 1, "{what}: {lines:?}");
    for p in parts {
        assert!(lines[0].contains(p), "{what}: {:?} lacks {p:?}", lines[0]);
    }
}

#[test]
fn corrupt_config_exits_1_with_one_line_naming_key_and_tensor_and_writes_nothing() {
    // (key, value, key named, tensor named)
    let cases: [(&str, Value, &str, &str); 5] = [
        (
            "num_experts",
            json!(1_000_000_000u64),
            "num_experts",
            "model.layers.0.mlp.gate.weight",
        ),
        (
            "hidden_size",
            json!(4_000_000_000u64),
            "hidden_size",
            "model.embed_tokens.weight",
        ),
        (
            "vocab_size",
            json!(100_000_000_000u64),
            "vocab_size",
            "model.embed_tokens.weight",
        ),
        (
            "moe_intermediate_size",
            json!(123_456_789u64),
            "moe_intermediate_size",
            "model.layers.0.mlp.experts.0.gate_proj.weight",
        ),
        (
            "num_hidden_layers",
            json!(100_000u64),
            "num_hidden_layers",
            "model.layers.4.input_layernorm.weight",
        ),
    ];
    for (key, value, culprit, tensor) in cases {
        let dir = TempDir::new("corrupt");
        let model = mutated_checkpoint(&dir, key, value.clone());
        let out_file = dir.join("out.safetensors");
        let (out, took) = forward(
            &[
                "--model",
                model.to_str().unwrap(),
                "--tokens",
                "4",
                "--out",
                out_file.to_str().unwrap(),
            ],
            &[],
        );
        let what = format!("{key}={value}");
        assert_one_line_error(&out, &[culprit, tensor, &value.to_string()], &what);
        assert!(!out_file.exists(), "{what}: --out was written");
        assert!(took < Duration::from_secs(1), "{what}: took {took:?}");
    }
}

#[test]
fn memory_estimate_past_the_available_memory_is_an_error_or_with_force_a_warning() {
    let dir = TempDir::new("memory");
    let out_file = dir.join("out.safetensors");
    let model = fixture("qwen3_moe");
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        "4",
        "--out",
        out_file.to_str().unwrap(),
    ];
    let tight = [("FARSKIP_MEMORY_AVAILABLE", "1000000")];
    let (out, _) = forward(&args, &tight);
    assert_one_line_error(
        &out,
        &["not enough memory", "0.00 GiB is available"],
        "refused",
    );
    assert!(!out_file.exists(), "--out written after a refused load");

    let forced: Vec<&str> = args.iter().copied().chain(["--force"]).collect();
    let (out, _) = forward(&forced, &tight);
    let lines = stderr_lines(&out);
    assert_eq!(out.status.code(), Some(0), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("not enough memory") && l.contains("loading anyway")),
        "{lines:?}"
    );
    assert!(out_file.is_file(), "--force: no logits written");
}

#[test]
fn bad_files_and_values_exit_1_with_one_line_naming_them() {
    let dir = TempDir::new("values");
    let missing = dir.join("no-such-ids.safetensors");
    let missing = missing.to_str().unwrap();
    let not_a_model = dir.join("no-such-model");
    let not_a_model = not_a_model.to_str().unwrap();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--model", not_a_model],
            vec!["no-such-model", "not found"],
        ),
        (
            vec!["--preset", "tiny", "--input", missing],
            vec!["no-such-ids.safetensors"],
        ),
        (vec!["--preset", "huge"], vec!["unknown preset", "huge"]),
        (vec![], vec!["--model", "--preset"]),
        (
            vec![
                "--preset",
                "tiny",
                "--tokens",
                "4",
                "--generate",
                "2",
                "--prompt-len",
                "9",
            ],
            vec!["--prompt-len", "9"],
        ),
        (vec!["--preset", "tiny", "--tokens", "0"], vec!["input"]),
        (vec!["--preset", "tiny", "--batch", "0"], vec!["input"]),
    ];
    for (args, parts) in cases {
        let (out, _) = forward(&args, &[]);
        assert_one_line_error(&out, &parts, &format!("{args:?}"));
    }
    // values clap rejects: its own status 2, the first line names the flag
    for (args, flag) in [
        (
            vec!["--preset", "tiny", "--connectivity", "sideways"],
            "--connectivity",
        ),
        (vec!["--preset", "tiny", "--tokens", "many"], "--tokens"),
    ] {
        let (out, _) = forward(&args, &[]);
        let lines = stderr_lines(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {lines:?}");
        assert!(
            lines[0].starts_with("error:") && lines[0].contains(flag),
            "{args:?}: {lines:?}"
        );
    }
}

#[test]
fn bad_corpus_and_tokenizer_files_exit_1_with_one_line_naming_them() {
    let dir = TempDir::new("files");
    let report = dir.join("report");
    let report = report.to_str().unwrap();
    let missing = dir.join("no-such-corpus.txt");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    for (corpus, parts) in [
        (&missing, ["no-such-corpus.txt", "cannot read"]),
        (&empty, ["empty.txt", "is empty"]),
    ] {
        let args = [
            "--quick",
            "--corpus",
            corpus.to_str().unwrap(),
            "--report-dir",
            report,
        ];
        let (out, took) = run_example("recipe", &args, &[]);
        assert_one_line_error(&out, &parts, &format!("recipe {args:?}"));
        assert!(!Path::new(report).exists(), "recipe wrote a report");
        assert!(took < Duration::from_secs(1), "{args:?}: took {took:?}");
    }
    // a checkpoint whose tokenizer.json is not a tokenizer
    let model = mutated_checkpoint(&dir, "vocab_size", json!(256));
    std::fs::write(model.join("tokenizer.json"), "{\"model\": 42").unwrap();
    let text = dir.join("corpus.txt");
    std::fs::write(&text, "a small corpus of plain text. ".repeat(100)).unwrap();
    let out_dir = dir.join("distilled");
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        text.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--steps",
        "1",
    ];
    let (out, _) = run_example("distill", &args, &[]);
    assert_one_line_error(
        &out,
        &["cannot load tokenizer", "tokenizer.json"],
        "distill with a bad tokenizer.json",
    );
    assert!(!out_dir.exists(), "distill wrote {}", out_dir.display());
}

/// `forward --connectivity farskip-d2|farskip-d3|farskip-d2:1..=3` on every family's depth references, as a user
/// runs it: logits within 1e-4 and depth-2 greedy ids equal.
#[test]
fn forward_matches_every_familys_skip_depth_references() {
    use farskip_model::checkpoint::TensorStore;
    const FAMILIES: [&str; 7] = [
        "deepseek_v2",
        "deepseek_v3",
        "llama4_text",
        "mixtral",
        "olmoe",
        "qwen2_moe",
        "qwen3_moe",
    ];
    let dir = TempDir::new("depth");
    for family in FAMILIES {
        let input = fixture(family).join("depth.safetensors");
        let reference =
            TensorStore::open_files(std::slice::from_ref(&input)).expect("depth references");
        for (spec, name, generate) in [
            ("farskip-d2", "farskip_d2_logits", true),
            ("farskip-d3", "farskip_d3_logits", false),
            ("farskip-d2:1..=3", "farskip_d2_range_logits", false),
        ] {
            let out = dir.join(&format!("{family}-{spec}.safetensors"));
            let model = fixture(family);
            let mut args = vec![
                "--model",
                model.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--connectivity",
                spec,
                "--out",
                out.to_str().unwrap(),
            ];
            if generate {
                args.extend(["--generate", "8", "--prompt-len", "8"]);
            }
            let (run, _) = forward(&args, &[]);
            assert!(
                run.status.success(),
                "{family} {spec}: {:?}",
                stderr_lines(&run)
            );
            let got = TensorStore::open_files(&[out]).expect("forward's output");
            let (logits, shape) = got.f32("logits").expect("logits");
            let (want, want_shape) = reference.f32(name).expect("reference");
            assert_eq!(shape, want_shape, "{family} {spec}");
            let diff = farskip_model::compare::max_abs_diff(&logits, &want);
            assert!(
                diff <= 1e-4,
                "{family} {spec}: max |logits - {name}| = {diff}"
            );
            if generate {
                let ids = got.i64("greedy_ids").expect("greedy ids").0;
                let want = reference
                    .i64("farskip_d2_greedy_ids")
                    .expect("reference ids")
                    .0;
                assert_eq!(ids, want, "{family} {spec}: greedy ids");
            }
        }
    }
}

/// `forward --device D --connectivity farskip --generate 8 --prompt-len 8` on every family's references: logits
/// within 1e-4, greedy ids equal; and `--json` (no `--generate`) reports at most one host read per MoE layer.
fn forward_matches_every_familys_farskip_references_on(device: &str) {
    use farskip_model::checkpoint::TensorStore;
    const FAMILIES: [&str; 7] = [
        "deepseek_v2",
        "deepseek_v3",
        "llama4_text",
        "mixtral",
        "olmoe",
        "qwen2_moe",
        "qwen3_moe",
    ];
    let dir = TempDir::new(&format!("farskip-{device}"));
    let mut report = Vec::new();
    for family in FAMILIES {
        let model = fixture(family);
        let input = model.join("reference.safetensors");
        let out = dir.join(&format!("{family}.safetensors"));
        let (run, _) = forward(
            &[
                "--device",
                device,
                "--model",
                model.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--connectivity",
                "farskip",
                "--out",
                out.to_str().unwrap(),
                "--generate",
                "8",
                "--prompt-len",
                "8",
            ],
            &[],
        );
        assert!(run.status.success(), "{family}: {:?}", stderr_lines(&run));
        let reference = TensorStore::open_files(std::slice::from_ref(&input)).expect("references");
        let got = TensorStore::open_files(&[out]).expect("forward's output");
        let (logits, shape) = got.f32("logits").expect("logits");
        let (want, want_shape) = reference.f32("farskip_logits").expect("reference");
        assert_eq!(shape, want_shape, "{family}");
        let diff = farskip_model::compare::max_abs_diff(&logits, &want);
        assert!(diff <= 1e-4, "{family} on {device}: max |Δlogits| = {diff}");
        let ids = got.i64("greedy_ids").expect("greedy ids").0;
        let want = reference
            .i64("farskip_greedy_ids")
            .expect("reference ids")
            .0;
        assert_eq!(ids, want, "{family} on {device}: greedy ids");

        let (run, _) = forward(
            &[
                "--device",
                device,
                "--model",
                model.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--connectivity",
                "farskip",
                "--json",
            ],
            &[],
        );
        assert!(run.status.success(), "{family}: {:?}", stderr_lines(&run));
        let line = String::from_utf8_lossy(&run.stdout);
        let j: Value = serde_json::from_str(line.trim()).expect("one JSON line");
        let reads = j["host_reads"].as_u64().expect("host_reads");
        let moe = j["moe_layers"].as_u64().expect("moe_layers");
        assert_eq!(j["device"], device, "{family}");
        assert!(moe > 0, "{family}: no MoE layer");
        // One read per MoE layer: the routing's expert ids, which a dispatch needs on the host.
        assert!(
            reads <= moe,
            "{family} on {device}: {reads} host reads for {moe} MoE layers"
        );
        report.push(format!(
            "{family} {diff:.2e} ({reads} reads / {moe} MoE layers)"
        ));
    }
    eprintln!(
        "forward --device {device} --connectivity farskip: {}",
        report.join(", ")
    );
}

#[test]
fn forward_matches_every_familys_farskip_references_on_flex() {
    forward_matches_every_familys_farskip_references_on("flex");
}

#[cfg(feature = "wgpu")]
#[test]
fn forward_matches_every_familys_farskip_references_on_wgpu() {
    forward_matches_every_familys_farskip_references_on("wgpu");
}

/// A build without the wgpu backend refuses `--device wgpu` (and `BURN_DEVICE=wgpu`) with one line naming the
/// feature; an unknown `BURN_DEVICE` is named too.
#[cfg(not(feature = "wgpu"))]
#[test]
fn wgpu_without_the_feature_is_a_one_line_error() {
    let (out, _) = forward(
        &["--device", "wgpu", "--preset", "tiny", "--tokens", "4"],
        &[],
    );
    assert_one_line_error(&out, &["wgpu", "feature"], "--device wgpu");
    let (out, _) = forward(
        &["--preset", "tiny", "--tokens", "4"],
        &[("BURN_DEVICE", "wgpu")],
    );
    assert_one_line_error(&out, &["wgpu", "feature"], "BURN_DEVICE=wgpu");
    let (out, _) = forward(
        &["--preset", "tiny", "--tokens", "4"],
        &[("BURN_DEVICE", "tpu")],
    );
    assert_one_line_error(&out, &["tpu", "flex or wgpu"], "BURN_DEVICE=tpu");
}

#[test]
fn a_world_the_model_cannot_be_split_into_is_refused_by_run_and_prediction_alike() {
    // The tiny preset has 8 experts and 4 attention heads: three ranks cannot hold the same number of either.
    // The planner refuses what the overlap example it predicts refuses, before any calibration, and names the
    // rule of the split asked for (EP: the experts; TP: the heads).
    for (parallel, culprit) in [
        ("ep", ["--world 3", "8 experts"]),
        ("tp", ["--world 3", "num_attention_heads"]),
    ] {
        for (name, extra) in [
            ("overlap_inference", vec![]),
            ("plan", vec!["--cluster", "cpu-here", "--json"]),
        ] {
            let mut args = vec![
                "--preset",
                "tiny",
                "--world",
                "3",
                "--tokens",
                "8",
                "--parallel",
                parallel,
            ];
            args.extend(extra);
            let (out, _) = run_example(name, &args, &[]);
            assert_one_line_error(&out, &culprit, &format!("{name} {args:?}"));
        }
    }
}

/// `overlap_inference --trace --svg` writes the FarSkip run and the blocking baseline beside it, each trace with
/// both ranks' compute spans.
#[test]
fn overlap_inference_writes_both_runs_traces_and_timelines() {
    let dir = TempDir::new("trace");
    let trace = dir.join("run.json");
    let svg = dir.join("run.svg");
    let (out, _) = run_example(
        "overlap_inference",
        &[
            "--preset",
            "tiny",
            "--tokens",
            "8",
            "--repeats",
            "1",
            "--trace",
            trace.to_str().expect("utf-8 path"),
            "--svg",
            svg.to_str().expect("utf-8 path"),
            "--json",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["run.json", "run_blocking.json"] {
        let text = std::fs::read_to_string(dir.join(name)).expect(name);
        let v: Value = serde_json::from_str(&text).expect("Chrome-trace JSON");
        let events = v["traceEvents"].as_array().expect("traceEvents");
        for rank in 0..2 {
            let spans = events
                .iter()
                .filter(|e| e["ph"] == "X" && e["pid"] == rank && e["tid"] == 0)
                .count();
            assert!(spans > 0, "{name}: no compute spans of rank {rank}");
        }
    }
    for name in ["run.svg", "run_blocking.svg"] {
        let text = std::fs::read_to_string(dir.join(name)).expect(name);
        assert!(text.contains("<svg"), "{name}");
    }
}

/// `plan --trace` writes the simulated timeline it reports: every simulated rank's compute and collective spans,
/// ending at the schedule's predicted step time (FarSkip by default, the blocking baseline with `--schedule`).
#[test]
fn plan_writes_the_timeline_it_predicts_as_a_trace() {
    let dir = TempDir::new("plan_trace");
    let config = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("data/configs/qwen3_30b_a3b.json");
    for (schedule, key) in [("farskip", "farskip_ms"), ("blocking", "blocking_ms")] {
        let trace = dir.join(&format!("{schedule}.json"));
        let (out, _) = run_example(
            "plan",
            &[
                "--model",
                config.to_str().expect("utf-8 path"),
                "--cluster",
                "h100",
                "--ep",
                "8",
                "--schedule",
                schedule,
                "--trace",
                trace.to_str().expect("utf-8 path"),
                "--json",
            ],
            &[],
        );
        let report = json_report(&out, schedule);
        let predicted = report[key].as_f64().expect(key);
        let text = std::fs::read_to_string(&trace).expect("the trace file");
        let v: Value = serde_json::from_str(&text).expect("Chrome-trace JSON");
        let spans: Vec<&Value> = v["traceEvents"]
            .as_array()
            .expect("traceEvents")
            .iter()
            .filter(|e| e["ph"] == "X")
            .collect();
        for rank in 0..8 {
            for tid in [0, 1] {
                assert!(
                    spans.iter().any(|e| e["pid"] == rank && e["tid"] == tid),
                    "{schedule}: rank {rank} has no spans on thread {tid}"
                );
            }
        }
        // Chrome traces count microseconds.
        let end_ms = spans
            .iter()
            .map(|e| e["ts"].as_f64().expect("ts") + e["dur"].as_f64().expect("dur"))
            .fold(f64::NEG_INFINITY, f64::max)
            / 1e3;
        assert!(
            (end_ms - predicted).abs() <= 1e-3 * predicted,
            "{schedule}: the trace ends at {end_ms} ms, the prediction is {predicted} ms"
        );
    }
}

/// `plan` predicting a two-rank run of the tiny preset (8 tokens) on this machine, its calibrations cached in
/// `cache`.
fn tiny_plan_args(cache: &Path) -> Vec<&str> {
    vec![
        "--cluster",
        "cpu-here",
        "--preset",
        "tiny",
        "--world",
        "2",
        "--tokens",
        "8",
        "--calibration-dir",
        cache.to_str().expect("utf-8 path"),
        "--json",
    ]
}

/// `plan --cluster cpu-here --balance` predicts the overlap examples' `--balance` run: it calibrates the model with
/// its experts placed as they place them, cached apart from the contiguous placement's calibration.
#[test]
fn plan_calibrates_a_balanced_placement_apart() {
    let dir = TempDir::new("plan_balance");
    let cache = dir.join("cache");
    for balance in [false, true] {
        let mut args = tiny_plan_args(&cache);
        args.extend(["--jitter-draws", "0"]);
        if balance {
            args.push("--balance");
        }
        let (out, _) = run_example("plan", &args, &[]);
        let report = json_report(&out, &format!("plan {args:?}"));
        let ms = report["farskip_ms"].as_f64().expect("farskip_ms");
        assert!(ms.is_finite() && ms > 0.0, "{report}");
    }
    let mut files: Vec<String> = std::fs::read_dir(&cache)
        .expect("the calibration cache")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "tiny-emb1-balanced-prefill-expert-w2-t8.json",
            "tiny-emb1-prefill-expert-w2-t8.json"
        ]
    );
}

/// `plan --cluster cpu-here` takes an overlap example's whole command line: the flags that do not change the
/// figures it predicts (`--repeats`, `--steps`, `--lr`, `--backend local`, `--comm-timeout-s`) leave the
/// prediction as it is, and one it cannot honour (an MPI run, a training flag on a prefill, an example's flag off
/// cpu-here) is a one-line error naming it, before any calibration.
#[test]
fn plan_takes_the_overlap_examples_command_lines_as_they_are() {
    let dir = TempDir::new("plan_example_flags");
    let cache = dir.join("cache");
    let base = tiny_plan_args(&cache);
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let (out, _) = run_example("plan", &args, &[]);
        (out, format!("plan {args:?}"))
    };
    for (mode, keys, flags) in [
        (
            "prefill",
            &["farskip_ms", "blocking_ms", "overlap_pct", "compute_ms"][..],
            &[
                "--repeats",
                "3",
                "--backend",
                "local",
                "--comm-timeout-s",
                "60",
            ][..],
        ),
        (
            "train",
            &[
                "farskip_step_ms",
                "blocking_step_ms",
                "fwd_overlap_pct",
                "bwd_overlap_pct",
            ][..],
            &[
                "--steps",
                "3",
                "--repeats",
                "2",
                "--lr",
                "1e-3",
                "--backend",
                "local",
            ][..],
        ),
    ] {
        // The first run calibrates into the cache; the two compared predict from that same calibration.
        let (out, what) = run(&["--mode", mode]);
        json_report(&out, &what);
        let (out, what) = run(&["--mode", mode]);
        let plain = json_report(&out, &what);
        let (out, what) = run(&[&["--mode", mode][..], flags].concat());
        let with_flags = json_report(&out, &what);
        for key in keys {
            let (a, b) = (plain[key].as_f64(), with_flags[key].as_f64());
            assert!(
                a.is_some_and(f64::is_finite) && a == b,
                "{mode} {key}: {a:?} without the example's flags, {b:?} with them"
            );
        }
    }
    let (out, what) = run(&["--backend", "mpi"]);
    assert_one_line_error(&out, &["--backend mpi", "LocalWorld"], &what);
    let (out, what) = run(&["--steps", "3"]);
    assert_one_line_error(&out, &["--steps", "--mode train"], &what);
    let (out, what) = run(&["--mode", "train", "--repeats", "0"]);
    assert_one_line_error(&out, &["--repeats", "> 0"], &what);
    let (out, _) = run_example(
        "plan",
        &["--cluster", "h100", "--repeats", "3", "--json"],
        &[],
    );
    assert_one_line_error(
        &out,
        &["--repeats", "cpu-here", "h100"],
        "plan --cluster h100 --repeats 3",
    );
}

/// `bench --decode` on a fixture checkpoint, both weight dtypes: the JSON carries the decode speed, its parts per
/// step (finite, attention and MoE not zero) and the peak RSS.
#[test]
fn bench_reports_decode_speed_its_parts_and_peak_rss() {
    let model = fixture("qwen3_moe");
    for dtype in ["f32", "bf16"] {
        let (out, _) = run_example(
            "bench",
            &[
                "--model",
                model.to_str().expect("utf-8 path"),
                "--tokens",
                "8",
                "--decode",
                "4",
                "--runs",
                "1",
                "--warmup",
                "0",
                "--no-train",
                "--dtype",
                dtype,
                "--json",
            ],
            &[],
        );
        let v = json_report(&out, dtype);
        let num = |v: &Value| v.as_f64().filter(|x| x.is_finite()).unwrap_or(-1.0);
        assert_eq!(v["dtype"], dtype);
        assert_eq!(v["decode_tokens"], 4);
        assert!(num(&v["decode_tok_s"]) > 0.0, "{dtype}: {v}");
        assert!(num(&v["peak_rss_mb"]) > 0.0, "{dtype}: {v}");
        let parts = &v["decode_breakdown_us"];
        for part in ["attention", "moe", "norm_other", "head"] {
            assert!(num(&parts[part]) >= 0.0, "{dtype} {part}: {parts}");
        }
        assert!(
            num(&parts["attention"]) > 0.0 && num(&parts["moe"]) > 0.0,
            "{dtype}: {parts}"
        );
    }
}
