//! Tensor-parallel slices of the model's blocks: attention split by heads, MLPs and experts split along the
//! intermediate dim. Each slice computes a partial output whose sum over ranks (an all-reduce) is the full
//! output. The distributed crate drives these slices; the maths stays here.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;

use crate::attention::{Attention, AttentionKind};
use crate::config::QkNorm;
use crate::error::{ModelError, Result};
use crate::mlp::Mlp;
use crate::moe::ExpertBank;

fn shard_err(what: &str, n: usize, world: usize) -> ModelError {
    ModelError::InvalidConfig {
        key: what.to_string(),
        message: format!("{n} cannot be split across {world} tensor-parallel ranks"),
    }
}

/// Output columns `start..start + len` of a linear layer (with its bias).
pub(crate) fn columns(l: &Linear, start: usize, len: usize) -> Linear {
    Linear {
        weight: Param::from_tensor(l.weight.val().narrow(1, start, len)),
        bias: l
            .bias
            .as_ref()
            .map(|b| Param::from_tensor(b.val().narrow(0, start, len))),
    }
}

/// Input rows `start..start + len` of a linear layer; the bias stays on one rank only.
fn rows(l: &Linear, start: usize, len: usize, keep_bias: bool) -> Linear {
    Linear {
        weight: Param::from_tensor(l.weight.val().narrow(0, start, len)),
        bias: if keep_bias { l.bias.clone() } else { None },
    }
}

/// `(start, len)` of rank `rank`'s share of `n` items, or an error when `n` does not split evenly.
fn share(what: &str, n: usize, rank: usize, world: usize) -> Result<(usize, usize)> {
    if world == 0 || !n.is_multiple_of(world) {
        return Err(shard_err(what, n, world));
    }
    let len = n / world;
    Ok((rank * len, len))
}

/// Rank `rank`'s query heads `(start, len)` and key/value heads `(start, len)` of `world`: whole query heads
/// per rank, and either whole K/V groups per rank or a group's query heads spread over ranks (each holding a
/// copy of its K/V head); an error names the count that does not split.
fn gqa_heads(
    num_heads: usize,
    num_kv_heads: usize,
    rank: usize,
    world: usize,
) -> Result<(usize, usize, usize, usize)> {
    let (qs, ql) = share("num_attention_heads", num_heads, rank, world)?;
    let group = num_heads / num_kv_heads.max(1);
    if !ql.is_multiple_of(group) && !group.is_multiple_of(ql) {
        return Err(shard_err("num_key_value_heads", num_kv_heads, world));
    }
    Ok((qs, ql, qs / group, (ql / group).max(1)))
}

impl Attention {
    /// Rank `rank`'s heads of `world`: its partial output sums to the full attention output.
    pub fn shard_heads(&self, rank: usize, world: usize) -> Result<Self> {
        let mut out = self.clone();
        match &mut out.kind {
            AttentionKind::Gqa(a) => {
                let g = a.cfg.clone();
                let (qs, ql, ks, kl) = gqa_heads(g.num_heads, g.num_kv_heads, rank, world)?;
                let hd = g.head_dim;
                if g.qk_norm == QkNorm::Whole {
                    // The norm spans every head: keep whole projections, select heads after the norm.
                    a.local_heads = Some((qs, ql, ks, kl));
                } else {
                    a.q_proj = columns(&a.q_proj, qs * hd, ql * hd);
                    a.k_proj = columns(&a.k_proj, ks * hd, kl * hd);
                    a.v_proj = columns(&a.v_proj, ks * hd, kl * hd);
                }
                a.o_proj = rows(&a.o_proj, qs * hd, ql * hd, rank == 0);
                a.cfg.num_heads = ql;
                a.cfg.num_kv_heads = kl;
            }
            AttentionKind::Mla(a) => {
                let m = a.cfg.clone();
                let (hs, hl) = share("num_attention_heads", m.num_heads, rank, world)?;
                let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
                if let Some(q) = &a.q_proj {
                    a.q_proj = Some(columns(q, hs * qk, hl * qk));
                }
                if let Some(q) = &a.q_b_proj {
                    a.q_b_proj = Some(columns(q, hs * qk, hl * qk));
                }
                let kv = m.qk_nope_head_dim + m.v_head_dim;
                a.kv_b_proj = columns(&a.kv_b_proj, hs * kv, hl * kv);
                a.o_proj = rows(&a.o_proj, hs * m.v_head_dim, hl * m.v_head_dim, rank == 0);
                a.cfg.num_heads = hl;
            }
        }
        Ok(out)
    }
}

impl Mlp {
    /// Rank `rank`'s slice of the intermediate dim: partial outputs sum to the full output.
    pub fn shard_intermediate(&self, rank: usize, world: usize) -> Result<Self> {
        let [_, inter] = self.gate_proj.weight.dims();
        let (s, l) = share("intermediate_size", inter, rank, world)?;
        Ok(Self {
            gate_proj: columns(&self.gate_proj, s, l),
            up_proj: columns(&self.up_proj, s, l),
            down_proj: rows(&self.down_proj, s, l, rank == 0),
        })
    }
}

impl ExpertBank {
    /// Every expert's slice `rank` of `world` of the intermediate dim.
    pub fn shard_intermediate(&self, rank: usize, world: usize) -> Result<Self> {
        let inter = self.intermediate_size();
        let (s, l) = share("moe_intermediate_size", inter, rank, world)?;
        let gu = self.gate_up.val();
        Ok(Self {
            gate_up: Param::from_tensor(Tensor::cat(
                vec![gu.clone().narrow(2, s, l), gu.narrow(2, inter + s, l)],
                2,
            )),
            down: Param::from_tensor(self.down.val().narrow(1, s, l)),
        })
    }
}

impl crate::ModelConfig {
    /// Whether [`Attention::shard_heads`] and [`ExpertBank::shard_intermediate`] can cut this model's attention
    /// and routed experts into `world` tensor-parallel slices (what the distributed TP rank shards; its shared
    /// experts and dense MLPs run whole), checked on the config alone, before any weights exist. The error names
    /// the first dimension that does not split.
    pub fn check_tensor_parallel(&self, world: usize) -> Result<()> {
        use crate::config::AttentionConfig;
        match &self.attention {
            AttentionConfig::Gqa(g) => {
                gqa_heads(g.num_heads, g.num_kv_heads, 0, world)?;
            }
            AttentionConfig::Mla(m) => {
                share("num_attention_heads", m.num_heads, 0, world)?;
            }
        }
        if let Some(moe) = &self.moe {
            share(
                "moe_intermediate_size",
                moe.expert_intermediate_size,
                0,
                world,
            )?;
        }
        Ok(())
    }
}
