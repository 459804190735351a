//! Reading and writing safetensors checkpoints (single file or sharded with `model.safetensors.index.json`),
//! converting F32 / F16 / BF16 / F64 to f32. Knows nothing of model names: see `hf.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::prelude::*;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{ModelError, Result};

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// All tensors of a checkpoint directory, read into memory.
pub struct TensorStore {
    files: Vec<(PathBuf, Vec<u8>)>,
    entries: HashMap<String, Entry>,
}

impl TensorStore {
    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            return Self::open_files(&[single]);
        }
        if !index.exists() {
            return Err(ModelError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json exists",
                ),
            ));
        }
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Safetensors {
                path: index.clone(),
                message: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Safetensors {
                path: index.clone(),
                message: "no `weight_map` object".into(),
            })?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        shards.sort();
        shards.dedup();
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        Self::open_files(&paths)
    }

    /// Opens the given safetensors files.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
            let (n, meta) =
                SafeTensors::read_metadata(&bytes).map_err(|e| ModelError::Safetensors {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            let base = 8 + n;
            for (name, info) in meta.tensors() {
                entries.insert(
                    name,
                    Entry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + info.data_offsets.0,
                        end: base + info.data_offsets.1,
                    },
                );
            }
            files.push((path.clone(), bytes));
        }
        Ok(Self { files, entries })
    }

    /// Whether the checkpoint has `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Every tensor name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Shape of `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.entries
            .get(name)
            .map(|e| e.shape.as_slice())
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    /// `name` as f32 values (row-major) and its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        let values = match e.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok((values, e.shape.clone()))
    }

    /// `name` as i64 values and its shape (I64 / I32 tensors).
    pub fn i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        let values = match e.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok((values, e.shape.clone()))
    }

    /// A float tensor of rank `D` with exactly `expected` shape; the error names the tensor.
    pub fn tensor<const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>> {
        let (v, shape) = self.f32(name)?;
        if shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        Ok(Tensor::from_data(TensorData::new(v, expected), device))
    }

    /// The path of the file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entries
            .get(name)
            .map(|e| self.files[e.file].0.as_path())
    }
}

/// Tensors to write: name -> (shape, payload).
#[derive(Default)]
pub struct TensorWriter {
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
}

impl TensorWriter {
    /// Adds an f32 tensor.
    pub fn f32(&mut self, name: impl Into<String>, tensor: Tensor<2>) {
        self.f32_any(name, tensor.dims().to_vec(), tensor.into_data())
    }

    /// Adds an f32 tensor of any rank from its data.
    pub fn f32_any(&mut self, name: impl Into<String>, shape: Vec<usize>, data: TensorData) {
        let v: Vec<f32> = data
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors.insert(name.into(), (Dtype::F32, shape, bytes));
    }

    /// Adds an i64 tensor.
    pub fn i64(&mut self, name: impl Into<String>, shape: Vec<usize>, values: &[i64]) {
        let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors.insert(name.into(), (Dtype::I64, shape, bytes));
    }

    /// Stores every f32 tensor as `dtype` (F32, BF16 or F16, rounded to nearest): a checkpoint saved in the
    /// dtype it was loaded from.
    pub fn cast_floats(&mut self, dtype: Dtype) -> Result<()> {
        let cast: fn(f32) -> [u8; 2] = match dtype {
            Dtype::F32 => return Ok(()),
            Dtype::BF16 => |x| half::bf16::from_f32(x).to_le_bytes(),
            Dtype::F16 => |x| half::f16::from_f32(x).to_le_bytes(),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: "(writing weights)".into(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        for (dt, _, bytes) in self.tensors.values_mut() {
            if *dt == Dtype::F32 {
                *bytes = bytes
                    .chunks_exact(4)
                    .flat_map(|c| cast(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect();
                *dt = dtype;
            }
        }
        Ok(())
    }

    /// Writes a safetensors file.
    pub fn write(&self, path: &Path, metadata: Option<HashMap<String, String>>) -> Result<()> {
        let views: Vec<(String, TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(n, (dt, shape, bytes))| {
                TensorView::new(*dt, shape.clone(), bytes)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| ModelError::Safetensors {
                        path: path.to_path_buf(),
                        message: format!("{n}: {e}"),
                    })
            })
            .collect::<Result<_>>()?;
        safetensors::serialize_to_file(views, metadata, path).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}
