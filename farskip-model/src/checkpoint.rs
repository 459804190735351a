//! Reading and writing safetensors checkpoints (single file or sharded with `model.safetensors.index.json`),
//! converting F32 / F16 / BF16 / F64 to f32 or bf16. Knows nothing of model names: see `hf.rs`.
//!
//! Tensors are read one at a time from the open files (positioned reads of exactly their bytes), never the
//! whole file at once: loading holds the model plus one tensor's bytes, not the files and the model.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use safetensors::{
    Dtype,
    tensor::{Metadata, TensorView},
};

use crate::error::{ModelError, Result};

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// safetensors' own bound on a header (100 MB): a larger length prefix is a corrupt file, not a big model.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The headers of a checkpoint's safetensors files: every tensor's name, dtype and shape and where its bytes
/// lie, read without the data (a few KiB per file). A loader checks a config against it before committing
/// memory to the weights, then [`TensorIndex::read`]s them.
pub struct TensorIndex {
    /// Each file and the length its header implies (checked against the file's size).
    files: Vec<(PathBuf, u64)>,
    entries: HashMap<String, Entry>,
}

impl TensorIndex {
    /// The headers of `dir/model.safetensors`, or of the shards listed in `dir/model.safetensors.index.json`.
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

    /// The headers of the given safetensors files.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let (header_len, meta, file_len) = read_header(path)?;
            let base = 8 + header_len;
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
            files.push((path.clone(), file_len));
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
        self.entry(name).map(|e| e.shape.as_slice())
    }

    /// Dtype of `name` as stored.
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        self.entry(name).map(|e| e.dtype)
    }

    /// Total size of the files in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|(_, n)| n).sum()
    }

    /// Opens the files for reading tensor by tensor ([`TensorStore`]).
    pub fn read(self) -> Result<TensorStore> {
        let mut data = Vec::with_capacity(self.files.len());
        for (path, len) in &self.files {
            let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
            let now = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
            // The offsets were checked against the header's length: a file that changed since is refused
            // rather than read out of bounds.
            if now != *len {
                return Err(ModelError::Safetensors {
                    path: path.clone(),
                    message: format!(
                        "the file changed while loading ({len} bytes in its header, {now} now)"
                    ),
                });
            }
            data.push(file);
        }
        Ok(TensorStore { index: self, data })
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }
}

/// Reads only the header of a safetensors file: its length, the validated metadata and the file's size, which
/// must be exactly the header plus the data it describes.
fn read_header(path: &Path) -> Result<(usize, Metadata, u64)> {
    let corrupt = |message: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut prefix = [0u8; 8];
    if file_len < 8 {
        return Err(corrupt(format!(
            "{file_len} bytes is too short for a safetensors header"
        )));
    }
    file.read_exact(&mut prefix)
        .map_err(|e| ModelError::io(path, e))?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_BYTES || n > file_len - 8 {
        return Err(corrupt(format!(
            "header length {n} does not fit the file ({file_len} bytes, at most {MAX_HEADER_BYTES} of header)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| ModelError::io(path, e))?;
    let meta: Metadata =
        serde_json::from_slice(&header).map_err(|e| corrupt(format!("invalid header: {e}")))?;
    let described = 8 + n + meta.data_len() as u64;
    if described != file_len {
        return Err(corrupt(format!(
            "the header describes {described} bytes but the file has {file_len}"
        )));
    }
    Ok((n as usize, meta, file_len))
}

/// The tensors of a checkpoint directory, read on demand from its open files.
pub struct TensorStore {
    index: TensorIndex,
    data: Vec<std::fs::File>,
}

/// Element types read straight from a little-endian file: plain bits, any byte pattern a value.
trait Plain: Copy + Default {}
impl Plain for f32 {}
impl Plain for half::bf16 {}

/// A float tensor's values in the dtype a model keeps them in.
enum Values {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl TensorStore {
    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        TensorIndex::open_dir(dir)?.read()
    }

    /// Opens the given safetensors files.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        TensorIndex::open_files(paths)?.read()
    }

    /// The headers: names, dtypes, shapes.
    pub fn index(&self) -> &TensorIndex {
        &self.index
    }

    /// Whether the checkpoint has `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains(name)
    }

    /// Every tensor name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.names()
    }

    /// Shape of `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.index.shape(name)
    }

    /// The bytes of `name`, read from its file.
    fn bytes(&self, e: &Entry) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; e.end - e.start];
        let path = &self.index.files[e.file].0;
        self.data[e.file]
            .read_exact_at(&mut buf, e.start as u64)
            .map_err(|err| ModelError::io(path, err))?;
        Ok(buf)
    }

    /// The values of `e`, stored as `T`, read straight into their vector (no byte buffer, no conversion pass).
    fn plain<T: Plain>(&self, e: &Entry) -> Result<Vec<T>> {
        let n = (e.end - e.start) / std::mem::size_of::<T>();
        let mut v = vec![T::default(); n];
        // SAFETY: `T` is plain bits (every byte pattern is a value) and the slice covers exactly `v`'s bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                v.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(&v[..]),
            )
        };
        let path = &self.index.files[e.file].0;
        self.data[e.file]
            .read_exact_at(bytes, e.start as u64)
            .map_err(|err| ModelError::io(path, err))?;
        Ok(v)
    }

    /// `name` in `dtype` (f32, or bf16: a bf16 tensor keeps its bits, others round to nearest), row-major as
    /// stored.
    fn values(&self, name: &str, dtype: burn::tensor::FloatDType) -> Result<(Values, Vec<usize>)> {
        let e = self.index.entry(name)?;
        if dtype == burn::tensor::FloatDType::BF16
            && e.dtype == Dtype::BF16
            && cfg!(target_endian = "little")
        {
            return Ok((Values::Bf16(self.plain(e)?), e.shape.clone()));
        }
        if dtype == burn::tensor::FloatDType::BF16 {
            let bytes = self.bytes(e)?;
            let values = match e.dtype {
                Dtype::BF16 => bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
                _ => {
                    drop(bytes);
                    let (v, _) = self.f32(name)?;
                    v.into_iter().map(half::bf16::from_f32).collect()
                }
            };
            return Ok((Values::Bf16(values), e.shape.clone()));
        }
        let (v, shape) = self.f32(name)?;
        Ok((Values::F32(v), shape))
    }

    /// `name` as f32 values (row-major) and its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let e = self.index.entry(name)?;
        if e.dtype == Dtype::F32 && cfg!(target_endian = "little") {
            return Ok((self.plain(e)?, e.shape.clone()));
        }
        let bytes = &self.bytes(e)?[..];
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
        let e = self.index.entry(name)?;
        let bytes = &self.bytes(e)?[..];
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

    /// A float tensor of rank `D` with exactly `expected` shape as stored, kept in `dtype`, optionally with
    /// its last two dimensions swapped (HF's `[out, in]` linear weights become burn's `[in, out]`, row-major:
    /// one pass, no transposed view). The error names the tensor.
    pub fn tensor_as<const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        swap_last_two: bool,
        dtype: burn::tensor::FloatDType,
        device: &Device,
    ) -> Result<Tensor<D>> {
        let (values, shape) = self.values(name, dtype)?;
        if shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        let mut dims = expected;
        let swap = swap_last_two && D >= 2;
        if swap {
            dims.swap(D - 2, D - 1);
        }
        let data = match values {
            Values::F32(v) if swap => TensorData::new(swap_last(&v, &expected), dims),
            Values::F32(v) => TensorData::new(v, dims),
            Values::Bf16(v) if swap => TensorData::new(swap_last(&v, &expected), dims),
            Values::Bf16(v) => TensorData::new(v, dims),
        };
        let dtype = data.dtype();
        Ok(Tensor::from_data(
            data,
            burn::tensor::TensorCreationOptions::new(device.clone()).with_dtype(dtype),
        ))
    }

    /// Per-expert `[rows, cols]` matrices `names[e]` (`e` = expert), each transposed into columns
    /// `offset..offset + rows` of expert `e`'s `[cols, width]` block of one stacked `[experts, cols, width]`
    /// buffer: the expert bank built in place, in `dtype`, without a per-expert tensor. `parts` lists the
    /// matrices per expert with their column offsets (e.g. gate at 0 and up at `inter` for `gate_up`).
    pub fn stacked_transposed(
        &self,
        parts: &[(Vec<String>, usize)],
        [experts, rows, cols]: [usize; 3],
        width: usize,
        dtype: burn::tensor::FloatDType,
        device: &Device,
    ) -> Result<Tensor<3>> {
        let dims = [experts, cols, width];
        fn fill<T: Copy + Default + Send>(
            store: &TensorStore,
            parts: &[(Vec<String>, usize)],
            [experts, rows, cols]: [usize; 3],
            width: usize,
            take: impl Fn(Values) -> Vec<T> + Sync,
            dtype: burn::tensor::FloatDType,
        ) -> Result<Vec<T>> {
            use rayon::prelude::*;
            let mut out = vec![T::default(); experts * cols * width];
            // Experts side by side: each reads its own bytes and fills its own block.
            out.par_chunks_mut(cols * width)
                .enumerate()
                .try_for_each(|(e, block)| {
                    for (names, offset) in parts {
                        let name = &names[e];
                        let (values, shape) = store.values(name, dtype)?;
                        if shape != [rows, cols] {
                            return Err(ModelError::ShapeMismatch {
                                name: name.clone(),
                                expected: vec![rows, cols],
                                found: shape,
                            });
                        }
                        transpose_into(&take(values), rows, cols, block, width, *offset);
                    }
                    Ok(())
                })?;
            Ok(out)
        }
        let shape = [experts, rows, cols];
        let data = match dtype {
            burn::tensor::FloatDType::BF16 => TensorData::new(
                fill(
                    self,
                    parts,
                    shape,
                    width,
                    |v| match v {
                        Values::Bf16(v) => v,
                        Values::F32(v) => v.into_iter().map(half::bf16::from_f32).collect(),
                    },
                    dtype,
                )?,
                dims,
            ),
            _ => TensorData::new(
                fill(
                    self,
                    parts,
                    shape,
                    width,
                    |v| match v {
                        Values::F32(v) => v,
                        Values::Bf16(v) => v.into_iter().map(half::bf16::to_f32).collect(),
                    },
                    dtype,
                )?,
                dims,
            ),
        };
        let dtype = data.dtype();
        Ok(Tensor::from_data(
            data,
            burn::tensor::TensorCreationOptions::new(device.clone()).with_dtype(dtype),
        ))
    }

    /// The path of the file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index
            .entries
            .get(name)
            .map(|e| self.index.files[e.file].0.as_path())
    }
}

/// `v` (row-major, `shape`) with its last two dimensions swapped, in tiles of 32 × 32 (both sides stay in
/// cache).
fn swap_last<T: Copy + Default>(v: &[T], shape: &[usize]) -> Vec<T> {
    let d = shape.len();
    let (rows, cols) = (shape[d - 2], shape[d - 1]);
    let mut out = vec![T::default(); v.len()];
    let m = rows * cols;
    if m == 0 {
        return out;
    }
    for (src, dst) in v.chunks_exact(m).zip(out.chunks_exact_mut(m)) {
        transpose_into(src, rows, cols, dst, rows, 0);
    }
    out
}

/// `dst[c][offset + r] = src[r][c]` for `src` `[rows, cols]` and `dst` `[cols, width]`: 8 × 8 blocks through a
/// local array (read as eight row pieces, written as eight), in tiles of 128 × 128 that stay in cache; 2.3× the
/// speed of an element-by-element tile walk (the transposes were 40 % of loading a bf16 checkpoint).
fn transpose_into<T: Copy + Default>(
    src: &[T],
    rows: usize,
    cols: usize,
    dst: &mut [T],
    width: usize,
    offset: usize,
) {
    const B: usize = 8;
    const TILE: usize = 128;
    let (rb, cb) = (rows / B * B, cols / B * B);
    for r0 in (0..rb).step_by(TILE) {
        for c0 in (0..cb).step_by(TILE) {
            for r in (r0..(r0 + TILE).min(rb)).step_by(B) {
                for c in (c0..(c0 + TILE).min(cb)).step_by(B) {
                    let mut block = [[T::default(); B]; B];
                    for i in 0..B {
                        let s = &src[(r + i) * cols + c..(r + i) * cols + c + B];
                        for j in 0..B {
                            block[j][i] = s[j];
                        }
                    }
                    for (j, piece) in block.iter().enumerate() {
                        let at = (c + j) * width + offset + r;
                        dst[at..at + B].copy_from_slice(piece);
                    }
                }
            }
        }
    }
    // The edges left over by the blocks: the last `rows % 8` rows, then the last `cols % 8` columns.
    for r in rb..rows {
        for c in 0..cols {
            dst[c * width + offset + r] = src[r * cols + c];
        }
    }
    for r in 0..rb {
        for c in cb..cols {
            dst[c * width + offset + r] = src[r * cols + c];
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks, edges and an offset into a wider destination, against the definition.
    #[test]
    fn transpose_into_matches_the_definition() {
        for (rows, cols, width, offset) in [
            (1, 1, 1, 0),
            (8, 8, 8, 0),
            (13, 21, 20, 3),
            (300, 9, 600, 300),
        ] {
            let src: Vec<u32> = (0..rows * cols).map(|i| i as u32 + 1).collect();
            let mut dst = vec![0u32; cols * width];
            transpose_into(&src, rows, cols, &mut dst, width, offset);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * width + offset + r],
                        src[r * cols + c],
                        "[{rows}, {cols}] at ({r}, {c})"
                    );
                }
            }
            let written = dst.iter().filter(|&&v| v != 0).count();
            assert_eq!(
                written,
                rows * cols,
                "[{rows}, {cols}]: only the transposed block is written"
            );
        }
    }
}
