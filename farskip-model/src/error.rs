//! The one error type of the model crate. Every variant names what is at fault: a file, a config key,
//! a tensor, a shape.

use std::path::PathBuf;

/// Errors raised while configuring, loading, running or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file or directory could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or misses a required key.
    #[error("invalid config {path}: {message}")]
    ConfigParse {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The checkpoint's `model_type` is not one of the supported families.
    #[error(
        "unknown model_type `{0}` (supported: qwen3_moe, qwen2_moe, deepseek_v2, deepseek_v3, llama4_text, mixtral, olmoe)"
    )]
    UnknownModelType(String),
    /// A config value is out of range or inconsistent with another.
    #[error("invalid config value `{key}`: {message}")]
    InvalidConfig {
        /// The config key at fault.
        key: String,
        /// Why it is invalid.
        message: String,
    },
    /// A safetensors file is corrupt or cannot be parsed.
    #[error("corrupt safetensors file {path}: {message}")]
    Safetensors {
        /// The file at fault.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("missing tensor `{0}` in the checkpoint")]
    MissingTensor(String),
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor at fault.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A dimension config.json implies disagrees with the tensor in the checkpoint that holds it.
    #[error(
        "config.json `{key}` = {config} does not match the checkpoint: tensor `{tensor}` has {found} there (shape {shape:?})"
    )]
    ConfigTensorMismatch {
        /// The config key (or expression of keys, `num_attention_heads × head_dim`) the dimension comes from.
        key: String,
        /// The value config.json gives.
        config: usize,
        /// The tensor at fault.
        tensor: String,
        /// The dimension in the file.
        found: usize,
        /// The tensor's whole shape in the file.
        shape: Vec<usize>,
    },
    /// config.json asks for more decoder layers than the checkpoint holds.
    #[error(
        "config.json `num_hidden_layers` = {config} does not match the checkpoint: it holds {found} layers (no tensor `{tensor}`)"
    )]
    LayerCountMismatch {
        /// `num_hidden_layers` in config.json.
        config: u64,
        /// Layers in the checkpoint (the first missing layer's index).
        found: usize,
        /// The first missing layer's tensor.
        tensor: String,
    },
    /// Loading would need more memory than the machine has available.
    #[error(
        "not enough memory: {what} needs about {:.2} GiB, {:.2} GiB is available",
        gib(*needed),
        gib(*available)
    )]
    InsufficientMemory {
        /// What would be allocated.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// A tensor has a dtype the loader cannot convert to f32.
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The tensor at fault.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// An input token id is outside the vocabulary.
    #[error("token id {id} at position [{row}, {col}] is out of the vocabulary (size {vocab})")]
    TokenOutOfVocab {
        /// The offending id.
        id: i64,
        /// Batch row.
        row: usize,
        /// Sequence position.
        col: usize,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The input does not have the shape a call needs.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A connectivity specification could not be parsed or does not fit the model.
    #[error("invalid connectivity `{spec}`: {message}")]
    InvalidConnectivity {
        /// The specification as given.
        spec: String,
        /// Why it is invalid.
        message: String,
    },
    /// A device was asked for by a name this build does not know, or could not be brought up.
    #[error("device `{name}`: {message}")]
    Device {
        /// The device as named (`flex`, `wgpu`, or the `BURN_DEVICE` value).
        name: String,
        /// Why it is not available.
        message: String,
    },
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Result alias of the model crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidConfig {
            key: key.into(),
            message: message.into(),
        }
    }
}
