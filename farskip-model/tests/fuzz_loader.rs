//! The loader against untrusted checkpoints: the fixture checkpoints with mutated config.json values and
//! safetensors headers (shapes, dtypes, offsets, length prefix, raw bytes, truncation). Every case must end in
//! `Ok` (and then a forward pass that runs) or a `ModelError`: a panic fails the case, an abort kills the test
//! process, a case that runs past its time limit fails as a hang.
//!
//! `cargo test` runs 500 cases from a fixed seed. A longer run: `FARSKIP_FUZZ_CASES=60000 cargo test -p
//! farskip-model --test fuzz_loader -- --nocapture` (`FARSKIP_FUZZ_SEED` picks another seed); the summary line
//! counts the outcomes (the crate's README has the long runs' results).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use burn::prelude::*;
use farskip_model::Model;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{Value, json};

use common::*;

/// Cases in a plain `cargo test`.
const DEFAULT_CASES: u32 = 500;
/// Longest a case may take (debug build, a busy machine) before it counts as a hang.
const CASE_LIMIT: Duration = Duration::from_secs(20);

/// A config.json value: what a corrupted download or a careless edit puts there.
fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u64..300).prop_map(Value::from),
        3 => prop::sample::select(vec![
            0u64,
            1,
            2,
            100_000,
            123_456_789,
            1_000_000_000,
            4_000_000_000,
            100_000_000_000,
            1 << 32,
            1 << 53,
            i64::MAX as u64,
            u64::MAX,
        ])
        .prop_map(Value::from),
        1 => (-1000i64..0).prop_map(Value::from),
        1 => prop::sample::select(vec![-1.0f64, 0.0, 0.5, 1e-12, 2.5, 1e300, -1e300])
            .prop_map(Value::from),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        1 => prop::sample::select(vec!["", "64", "float32", "sliding_attention", "yarn"])
            .prop_map(Value::from),
        1 => prop::collection::vec(0u64..8, 0..6).prop_map(|v| json!(v)),
        1 => Just(json!({"rope_type": "yarn", "factor": 0.0})),
    ]
}

/// What happens to the checkpoint before it is loaded.
#[derive(Clone, Debug)]
enum Mutation {
    /// Sets a config key (picked among the fixture's keys) to a value.
    ConfigValue(prop::sample::Index, Value),
    /// Removes a config key.
    ConfigRemove(prop::sample::Index),
    /// Changes one dimension of a tensor and resizes its data to match (a well-formed file that disagrees with
    /// the config).
    Reshape(prop::sample::Index, prop::sample::Index, u64),
    /// Changes one dimension in the header only (the data no longer matches).
    HeaderDim(prop::sample::Index, prop::sample::Index, u64),
    /// Changes a tensor's dtype in the header.
    Dtype(prop::sample::Index, &'static str),
    /// Removes a tensor.
    Drop(prop::sample::Index),
    /// Renames a tensor.
    Rename(prop::sample::Index, &'static str),
    /// Sets a tensor's data offsets.
    Offsets(prop::sample::Index, u64, u64),
    /// Replaces the 8-byte header length.
    LengthPrefix(u64),
    /// Overwrites one byte of the header text.
    HeaderByte(prop::sample::Index, u8),
    /// Cuts the file.
    Truncate(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let idx = any::<prop::sample::Index>;
    let dim = prop_oneof![
        4 => 0u64..130,
        1 => prop::sample::select(vec![1u64 << 20, 1 << 32, 1 << 40, u64::MAX / 2, u64::MAX]),
    ];
    prop_oneof![
        6 => (idx(), json_value()).prop_map(|(i, v)| Mutation::ConfigValue(i, v)),
        1 => idx().prop_map(Mutation::ConfigRemove),
        4 => (idx(), idx(), 0u64..130).prop_map(|(t, d, v)| Mutation::Reshape(t, d, v)),
        2 => (idx(), idx(), dim).prop_map(|(t, d, v)| Mutation::HeaderDim(t, d, v)),
        2 => (
            idx(),
            prop::sample::select(vec!["F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "Q4"])
        )
            .prop_map(|(t, d)| Mutation::Dtype(t, d)),
        1 => idx().prop_map(Mutation::Drop),
        1 => (idx(), prop::sample::select(vec!["model.layers.99.input_layernorm.weight", "", "x"]))
            .prop_map(|(t, n)| Mutation::Rename(t, n)),
        1 => (idx(), 0u64..2_000_000, 0u64..2_000_000).prop_map(|(t, s, e)| Mutation::Offsets(t, s, e)),
        1 => prop_oneof![Just(0u64), Just(u64::MAX), 0u64..100_000]
            .prop_map(Mutation::LengthPrefix),
        1 => (idx(), any::<u8>()).prop_map(|(i, b)| Mutation::HeaderByte(i, b)),
        1 => idx().prop_map(Mutation::Truncate),
    ]
}

/// One case: a fixture and the mutations applied to it, in order.
fn case() -> impl Strategy<Value = (usize, Vec<Mutation>)> {
    (0..FAMILIES.len(), prop::collection::vec(mutation(), 1..=3))
}

/// A safetensors file taken apart: each tensor's dtype (as the header spells it), shape and bytes.
#[derive(Clone)]
struct Weights {
    tensors: BTreeMap<String, (String, Vec<u64>, Vec<u8>)>,
}

fn dtype_bytes(dtype: &str) -> u64 {
    match dtype {
        "F64" | "I64" => 8,
        "F32" | "I32" => 4,
        "F16" | "BF16" => 2,
        _ => 1,
    }
}

impl Weights {
    fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).expect("fixture weights");
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("fixture header");
        let data = &bytes[8 + n..];
        let mut tensors = BTreeMap::new();
        for (name, info) in header.as_object().unwrap() {
            if name == "__metadata__" {
                continue;
            }
            let dtype = info["dtype"].as_str().unwrap().to_string();
            let shape = info["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            let [s, e] = [0, 1].map(|i| info["data_offsets"][i].as_u64().unwrap() as usize);
            tensors.insert(name.clone(), (dtype, shape, data[s..e].to_vec()));
        }
        Self { tensors }
    }

    /// The header (offsets laid out in name order) and the data.
    fn header_and_data(&self) -> (Value, Vec<u8>) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, (dtype, shape, bytes)) in &self.tensors {
            let start = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.clone(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        (Value::Object(header), data)
    }

    fn pick(&self, i: &prop::sample::Index) -> String {
        let names: Vec<&String> = self.tensors.keys().collect();
        names[i.index(names.len())].clone()
    }
}

fn key(json: &Value, i: &prop::sample::Index) -> String {
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    keys[i.index(keys.len())].clone()
}

/// Writes the mutated checkpoint of `family` into `dir`.
fn write_case(dir: &Path, family: &str, mutations: &[Mutation]) {
    let mut config = fixture_config(family);
    let mut weights = Weights::read(&fixture(family).join("model.safetensors"));
    // Mutations of the serialised file, applied after the structured ones.
    let mut raw: Vec<&Mutation> = Vec::new();
    let mut offsets: Vec<(String, u64, u64)> = Vec::new();
    for m in mutations {
        match m {
            Mutation::ConfigValue(i, v) => {
                let k = key(&config, i);
                config[k] = v.clone();
            }
            Mutation::ConfigRemove(i) => {
                let k = key(&config, i);
                config.as_object_mut().unwrap().remove(&k);
            }
            Mutation::Reshape(t, d, v) => {
                let name = weights.pick(t);
                let (dtype, shape, bytes) = weights.tensors.get_mut(&name).unwrap();
                if !shape.is_empty() {
                    let d = d.index(shape.len());
                    shape[d] = *v;
                    // (an earlier HeaderDim may have made the shape huge: then the data stays as it is)
                    let len = shape
                        .iter()
                        .try_fold(dtype_bytes(dtype), |n, &d| n.checked_mul(d));
                    if let Some(len) = len.filter(|&n| n <= 1 << 26) {
                        bytes.resize(len as usize, 0);
                    }
                }
            }
            Mutation::HeaderDim(t, d, v) => {
                let name = weights.pick(t);
                let shape = &mut weights.tensors.get_mut(&name).unwrap().1;
                if !shape.is_empty() {
                    let d = d.index(shape.len());
                    shape[d] = *v;
                }
            }
            Mutation::Dtype(t, dtype) => {
                let name = weights.pick(t);
                weights.tensors.get_mut(&name).unwrap().0 = dtype.to_string();
            }
            Mutation::Drop(t) => {
                let name = weights.pick(t);
                weights.tensors.remove(&name);
            }
            Mutation::Rename(t, new) => {
                let name = weights.pick(t);
                let v = weights.tensors.remove(&name).unwrap();
                weights.tensors.insert(new.to_string(), v);
            }
            Mutation::Offsets(t, s, e) => offsets.push((weights.pick(t), *s, *e)),
            Mutation::LengthPrefix(_) | Mutation::HeaderByte(..) | Mutation::Truncate(_) => {
                raw.push(m)
            }
        }
        if weights.tensors.is_empty() {
            break;
        }
    }
    let (mut header, data) = weights.header_and_data();
    for (name, s, e) in offsets {
        if let Some(info) = header.get_mut(&name) {
            info["data_offsets"] = json!([s, e]);
        }
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&text);
    file.extend_from_slice(&data);
    for m in raw {
        match m {
            Mutation::LengthPrefix(n) => file[..8].copy_from_slice(&n.to_le_bytes()),
            Mutation::HeaderByte(i, b) => {
                let at = 8 + i.index(text.len().max(1));
                if at < file.len() {
                    file[at] = *b;
                }
            }
            Mutation::Truncate(i) => file.truncate(i.index(file.len())),
            _ => unreachable!(),
        }
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
}

/// How a case ended.
#[derive(Debug)]
enum Outcome {
    /// Loaded, and a forward pass of four tokens ran.
    Loaded,
    /// A `ModelError`: its variant.
    Error(String),
    /// A panic: its message.
    Panic(String),
    Hang,
}

/// Loads `dir` (and runs a forward pass when it loads) on its own thread, bounded by [`CASE_LIMIT`].
fn run(dir: &Path) -> Outcome {
    let dir: PathBuf = dir.to_path_buf();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(|| {
            let device = Device::flex();
            let model = Model::from_pretrained(&dir, &device)?;
            let vocab = model.config().vocab_size as i64;
            let ids: Vec<i64> = (0..4).map(|i| i % vocab).collect();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, 4]), &device);
            model.forward(ids).map(|_| ())
        });
        let _ = tx.send(result);
    });
    match rx.recv_timeout(CASE_LIMIT) {
        Ok(Ok(Ok(()))) => Outcome::Loaded,
        Ok(Ok(Err(e))) => {
            let debug = format!("{e:?}");
            let variant = debug.split(['(', ' ', '{']).next().unwrap_or_default();
            Outcome::Error(variant.to_string())
        }
        Ok(Err(panic)) => Outcome::Panic(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        ),
        Err(_) => Outcome::Hang,
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn mutated_checkpoints_load_or_fail_with_a_model_error() {
    let cases = env_u64("FARSKIP_FUZZ_CASES").map_or(DEFAULT_CASES, |n| n as u32);
    let seed = env_u64("FARSKIP_FUZZ_SEED").unwrap_or(0x00FA_A5C1_0AD0);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_time: 60_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let dir = TempDir::new("fuzz");
    let counts = std::cell::RefCell::new(BTreeMap::<String, usize>::new());
    let start = Instant::now();
    let result = runner.run(&case(), |(family, mutations)| {
        write_case(dir.path(), FAMILIES[family], &mutations);
        let outcome = run(dir.path());
        let kind = match &outcome {
            Outcome::Loaded => "loaded".to_string(),
            Outcome::Error(variant) => format!("error {variant}"),
            Outcome::Panic(_) => "panic".to_string(),
            Outcome::Hang => "hang".to_string(),
        };
        *counts.borrow_mut().entry(kind).or_default() += 1;
        let family = FAMILIES[family];
        match outcome {
            Outcome::Loaded | Outcome::Error(_) => Ok(()),
            Outcome::Panic(message) => Err(TestCaseError::fail(format!(
                "{family} {mutations:?}: panicked: {message}"
            ))),
            Outcome::Hang => Err(TestCaseError::fail(format!(
                "{family} {mutations:?}: still running after {CASE_LIMIT:?}"
            ))),
        }
    });
    let counts = counts.into_inner();
    let ran: usize = counts.values().sum();
    println!(
        "fuzz_loader: seed {seed:#x}, {ran} cases (shrinking included) in {:.1} s: {counts:?}",
        start.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    // The mutations must reach both ends: some checkpoints still load, most are refused.
    let errors: usize = counts
        .iter()
        .filter(|(k, _)| k.starts_with("error"))
        .map(|(_, n)| n)
        .sum();
    assert!(counts.get("loaded").copied().unwrap_or(0) > 0, "{counts:?}");
    assert!(errors > cases as usize / 2, "{counts:?}");
}
