//! Helpers shared by the integration tests of farskip-model: a seeded RNG, seeded module weights (burn's own
//! initialisers are not seeded per test), host <-> tensor conversion, the golden fixtures and temporary
//! directories. Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;

/// `tests/fixtures` of the workspace. The crate's directory is read when the test runs (cargo sets
/// `CARGO_MANIFEST_DIR` for test processes), falling back to where it was compiled: a test binary that cargo did
/// not rebuild after the checkout moved (a shared target dir, a renamed clone) still finds the fixtures.
pub fn fixtures() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("../tests/fixtures")
}

/// The seven fixture families.
pub const FAMILIES: [&str; 7] = [
    "deepseek_v2",
    "deepseek_v3",
    "llama4_text",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
];

/// `tests/fixtures/<family>`.
pub fn fixture(family: &str) -> PathBuf {
    fixtures().join(family)
}

/// SplitMix64: small, seedable, good enough for test weights.
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// `n` normals times `std`.
    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f64> {
        (0..n).map(|_| self.normal() * std).collect()
    }
    /// `n` integers in `0..bound`.
    pub fn ints(&mut self, n: usize, bound: usize) -> Vec<i64> {
        (0..n)
            .map(|_| (self.next_u64() % bound as u64) as i64)
            .collect()
    }
}

/// A float tensor from row-major f64 values.
pub fn tensor<const D: usize>(values: &[f64], shape: [usize; D], device: &Device) -> Tensor<D> {
    assert_eq!(
        values.len(),
        shape.iter().product::<usize>(),
        "values for shape {shape:?}"
    );
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Row-major host values of a float tensor.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data")
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Row-major host values of an Int tensor.
pub fn ints<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data().try_into_vec_as::<i64>().expect("int data")
}

/// A `[rows, cols]` id tensor.
pub fn id_tensor(ids: &[i64], rows: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(
        TensorData::new(ids.to_vec(), [rows, ids.len() / rows]),
        device,
    )
}

/// Max |a - b| over two equally long slices (infinite on NaN/inf or a length mismatch).
pub fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths");
    farskip_model::compare::max_abs_diff(a, b)
}

/// Max |a - b| over two tensors of the same shape.
pub fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes");
    max_abs(&values(a), &values(b))
}

/// Replaces every float parameter by seeded values: vectors (norm gains, biases) become 1 + 0.1·N(0, 1),
/// matrices and stacks N(0, 1/fan_in) with fan_in the second-to-last dim (`[in, out]` linears, `[E, in, out]`
/// experts). Parameters keep their ids and their require-grad state.
struct Reseed(TestRng);

impl ModuleMapper for Reseed {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let rng = &mut self.0;
        param.map(|t| {
            let dims = t.dims();
            let n = dims.iter().product();
            let v = if D == 1 {
                rng.normals(n, 0.1)
                    .into_iter()
                    .map(|x| 1.0 + x)
                    .collect::<Vec<_>>()
            } else {
                rng.normals(n, (dims[D - 2] as f64).powf(-0.5))
            };
            let fresh = tensor(&v, dims, &t.device());
            if t.is_require_grad() {
                fresh.require_grad()
            } else {
                fresh
            }
        })
    }
}

/// `module` with every float parameter drawn from `seed` (same seed and structure: same weights).
pub fn reseed<M: Module>(module: M, seed: u64) -> M {
    module.map(&mut Reseed(TestRng::new(seed)))
}

/// Every float parameter of a module, in visiting order, as (shape, values).
pub fn parameters<M: Module>(module: &M) -> Vec<(Vec<usize>, Vec<f64>)> {
    struct Collect(Vec<(Vec<usize>, Vec<f64>)>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push((param.dims().to_vec(), values(param.val())));
        }
    }
    let mut c = Collect(Vec::new());
    module.visit(&mut c);
    c.0
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "farskip-model-test-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A temp copy of a fixture's `config.json` and `model.safetensors`.
pub fn copy_fixture(family: &str) -> TempDir {
    let dir = TempDir::new(family);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(family).join(f), dir.join(f)).expect("copy fixture");
    }
    dir
}

/// The fixture's `config.json` as JSON.
pub fn fixture_config(family: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(fixture(family).join("config.json")).expect("read config.json");
    serde_json::from_str(&text).expect("parse config.json")
}

/// Writes `value` as `dir/config.json`.
pub fn write_config(dir: &TempDir, value: &serde_json::Value) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(value).expect("json"),
    )
    .expect("write");
}
