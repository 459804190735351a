//! How much memory a model takes and whether the machine has it: [`Model::estimate_bytes`] counts a config's
//! weights without building them, [`MemoryCheck`] compares what a load needs with what is available before
//! anything is allocated. Activations and KV caches are not counted: they depend on the input, not the config.

use crate::Model;
use crate::config::{AttentionConfig, FfnKind, ModelConfig, QkNorm};
use crate::error::{ModelError, Result};

/// The variable that overrides the available memory (bytes), for machines whose limit the kernel's figures
/// do not show.
pub const MEMORY_AVAILABLE_VAR: &str = "FARSKIP_MEMORY_AVAILABLE";

/// What a load does when it needs more memory than is available.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryCheck {
    /// Fail with [`ModelError::InsufficientMemory`] before allocating.
    #[default]
    Refuse,
    /// Log a warning and load anyway (the allocation itself may then fail).
    Warn,
}

impl MemoryCheck {
    /// Checks that `needed` bytes for `what` fit in [`available_bytes`] (nothing to check where that is
    /// unknown).
    pub fn check(self, what: &str, needed: u64) -> Result<()> {
        self.check_against(what, needed, available_bytes()?)
    }

    /// [`Self::check`] against a given amount of available memory (`None`: unknown, nothing to check).
    pub fn check_against(self, what: &str, needed: u64, available: Option<u64>) -> Result<()> {
        let Some(available) = available else {
            return Ok(());
        };
        if needed <= available {
            return Ok(());
        }
        let e = ModelError::InsufficientMemory {
            what: what.to_string(),
            needed,
            available,
        };
        match self {
            Self::Refuse => Err(e),
            Self::Warn => {
                tracing::warn!("{e}; loading anyway");
                Ok(())
            }
        }
    }
}

/// Bytes this process may still allocate: `FARSKIP_MEMORY_AVAILABLE` when set, else the smaller of the
/// kernel's `MemAvailable` (`/proc/meminfo`) and what the cgroup's `memory.max` leaves (a container's limit,
/// which `MemAvailable` does not show); `None` where neither can be read.
pub fn available_bytes() -> Result<Option<u64>> {
    if let Some(v) = std::env::var_os(MEMORY_AVAILABLE_VAR) {
        let s = v.to_string_lossy();
        return s.trim().parse::<u64>().map(Some).map_err(|_| {
            ModelError::InvalidInput(format!(
                "{MEMORY_AVAILABLE_VAR}={s:?} is not a number of bytes"
            ))
        });
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kib| kib.saturating_mul(1024))
    });
    let read = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .map(|max| max.saturating_sub(read("/sys/fs/cgroup/memory.current").unwrap_or(0)));
    Ok(match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

impl Model {
    /// Bytes of the weights `config` describes, in f32 (the dtype the model computes in), counted without
    /// allocating them: what building the model takes. Saturates instead of overflowing on absurd configs.
    pub fn estimate_bytes(config: &ModelConfig) -> u64 {
        num_parameters(config).saturating_mul(4)
    }
}

/// Parameters of a model built from `cfg` (as [`Model::new`] makes them).
fn num_parameters(cfg: &ModelConfig) -> u64 {
    let m = |a: usize, b: usize| (a as u64).saturating_mul(b as u64);
    let h = cfg.hidden_size;
    let linear = |d_in: usize, d_out: usize, bias: bool| {
        m(d_in, d_out).saturating_add(if bias { d_out as u64 } else { 0 })
    };
    let mlp = |i: usize| m(h, i).saturating_mul(3);
    let attention = match &cfg.attention {
        AttentionConfig::Gqa(g) => {
            let q = g.num_heads.saturating_mul(g.head_dim);
            let kv = g.num_kv_heads.saturating_mul(g.head_dim);
            let norms = match g.qk_norm {
                QkNorm::PerHead => m(2, g.head_dim),
                QkNorm::Whole => (q as u64).saturating_add(kv as u64),
                QkNorm::None | QkNorm::L2AfterRope => 0,
            };
            [
                linear(h, q, g.qkv_bias),
                linear(h, kv, g.qkv_bias),
                linear(h, kv, g.qkv_bias),
                linear(q, h, g.o_bias),
                norms,
            ]
            .into_iter()
            .fold(0u64, u64::saturating_add)
        }
        AttentionConfig::Mla(a) => {
            let qk = a.qk_nope_head_dim.saturating_add(a.qk_rope_head_dim);
            let q_out = a.num_heads.saturating_mul(qk);
            let q = match a.q_lora_rank {
                None => m(h, q_out),
                Some(r) => m(h, r).saturating_add(r as u64).saturating_add(m(r, q_out)),
            };
            [
                q,
                m(h, a.kv_lora_rank.saturating_add(a.qk_rope_head_dim)),
                a.kv_lora_rank as u64,
                m(
                    a.kv_lora_rank,
                    a.num_heads
                        .saturating_mul(a.qk_nope_head_dim.saturating_add(a.v_head_dim)),
                ),
                m(a.num_heads.saturating_mul(a.v_head_dim), h),
            ]
            .into_iter()
            .fold(0u64, u64::saturating_add)
        }
    };
    let moe = cfg.moe.as_ref().map_or(0, |moe| {
        let e = moe.num_experts;
        let router = m(h, e).saturating_add(if moe.router.correction_bias {
            e as u64
        } else {
            0
        });
        let experts = mlp(moe.expert_intermediate_size).saturating_mul(e as u64);
        let shared = moe.shared.as_ref().map_or(0, |s| {
            mlp(s.intermediate_size).saturating_add(if s.gated { h as u64 } else { 0 })
        });
        router.saturating_add(experts).saturating_add(shared)
    });
    let layers = cfg.layers.iter().fold(0u64, |acc, l| {
        let ffn = match l.ffn {
            FfnKind::Dense { intermediate_size } => mlp(intermediate_size),
            FfnKind::Moe => moe,
        };
        acc.saturating_add(m(2, h))
            .saturating_add(attention)
            .saturating_add(ffn)
    });
    let embed = m(cfg.vocab_size, h);
    let head = if cfg.tie_word_embeddings { 0 } else { embed };
    embed
        .saturating_add(head)
        .saturating_add(h as u64)
        .saturating_add(layers)
}
