//! Helpers shared by the workspace tests: where the golden fixtures are, reading their reference tensors, and
//! comparing tensors.

use std::path::PathBuf;

use burn::prelude::*;
use farskip_model::checkpoint::TensorStore;

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

/// `tests/fixtures/<family>`. The crate's directory is read when the test runs (cargo sets `CARGO_MANIFEST_DIR`
/// for test processes), falling back to where it was compiled, so a test binary cargo did not rebuild after the
/// checkout moved still finds the fixtures.
pub fn fixture_dir(family: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("fixtures")
        .join(family)
}

/// The reference tensors of a family.
pub fn reference(family: &str) -> TensorStore {
    TensorStore::open_files(&[fixture_dir(family).join("reference.safetensors")])
        .unwrap_or_else(|e| panic!("{family}: {e}"))
}

/// An int64 reference tensor as a `[rows, cols]` Int tensor.
pub fn ids(store: &TensorStore, name: &str, device: &Device) -> Tensor<2, Int> {
    let (v, shape) = store.i64(name).unwrap_or_else(|e| panic!("{e}"));
    Tensor::from_data(TensorData::new(v, [shape[0], shape[1]]), device)
}

/// An int64 reference tensor as host values.
pub fn ids_vec(store: &TensorStore, name: &str) -> Vec<i64> {
    store.i64(name).unwrap_or_else(|e| panic!("{e}")).0
}

/// The depth reference tensors of a family (`depth.safetensors`: skip depth 2 and 3).
pub fn depth_reference(family: &str) -> TensorStore {
    TensorStore::open_files(&[fixture_dir(family).join("depth.safetensors")])
        .unwrap_or_else(|e| panic!("{family}: {e}"))
}

/// Max |a - b| between a tensor and reference values; panics on a shape or length mismatch. A NaN or infinite
/// value on either side gives `f32::INFINITY`, so `diff <= tol` can never pass on one.
pub fn max_abs_diff<const D: usize>(got: Tensor<D>, want: &(Vec<f32>, Vec<usize>)) -> f32 {
    assert_eq!(got.dims().to_vec(), want.1, "shape");
    let g = got
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data");
    max_abs_diff_values(&g, &want.0)
}

/// Max |a - b| over two slices of equal length; `f32::INFINITY` if any value is NaN or infinite.
pub fn max_abs_diff_values(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    farskip_model::compare::max_abs_diff(a, b) as f32
}

/// Host values of an Int tensor.
pub fn int_values<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data().try_into_vec_as::<i64>().expect("int data")
}
