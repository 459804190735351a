//! # farskip-model
//!
//! Mixture-of-Experts decoder families loaded from Hugging Face checkpoints (Qwen3-MoE, Qwen2-MoE,
//! DeepSeek-V2/V3 with MLA, Llama-4 text, Mixtral, OLMoE), each runnable with standard residual connectivity
//! or with FarSkip-Collective connectivity (arXiv 2511.11505), on any burn device.
//!
//! Families are data ([`ModelConfig`]), not types: one attention module (GQA or MLA), one router with its
//! variants as configuration, one stacked expert bank. [`Connectivity`] decides which streams each layer reads.
//!
//! ```
//! use burn::prelude::*;
//! use farskip_model::{Connectivity, Model, ModelConfig};
//!
//! let device = Device::flex();
//! let config = ModelConfig::small_moe(64, 32, 2, 4, 2, 8, 4, 2, 16, None);
//! let model = Model::new(&config, &device)?;
//! let ids = Tensor::<2, Int>::from_ints([[1, 2, 3, 4]], &device);
//! let standard = model.forward(ids.clone())?;
//! let farskip = model.with_connectivity(Connectivity::farskip())?.forward(ids)?;
//! assert_eq!(standard.dims(), [1, 4, 64]);
//! assert_eq!(farskip.dims(), [1, 4, 64]);
//! # Ok::<(), farskip_model::ModelError>(())
//! ```
#![warn(missing_docs)]
// burn's `Tensor` is a 256-byte handle; boxing the residual-stream enums would add an allocation per layer.
#![allow(clippy::large_enum_variant)]

pub mod attention;
mod attention_core;
pub mod bf16_gemm;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod connectivity;
pub mod device;
pub mod error;
pub mod generate;
pub mod hf;
pub mod host_reads;
pub mod lanes;
pub mod matvec;
pub mod memory;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod rope;
pub mod shard;

pub use config::ModelConfig;
pub use connectivity::{Connectivity, FarSkip, FarSkipVariant, Residual};
pub use device::DeviceName;
pub use error::{ModelError, Result};
pub use generate::Generation;
pub use memory::MemoryCheck;
pub use model::{DecoderLayer, Ffn, KvCache, Model};
