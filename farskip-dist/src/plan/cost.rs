//! Costs: a roofline per op (FLOPs and bytes from the parsed [`ModelConfig`], with the cluster's efficiency
//! factors) and an α–β model per collective that knows which peers share a node.
//!
//! What it leaves out: kernel fusion and the real efficiency of small matmuls (one efficiency factor per
//! device), FP8 weights or dispatch, node-limited routing (DeepSeek-V3 sends each token to at most 4 nodes:
//! here every expert is equally likely), and contention between a collective and compute on the same device.

use farskip_model::ModelConfig;
use farskip_model::config::{AttentionConfig, FfnKind, MaskKind};

use crate::schedule::ops;
use crate::trace::Phase;
use crate::training::bwd_ops;

use super::cluster::Cluster;
use super::desc::{MLP_BWD, OpKey};
use super::{Layout, Mode, Workload};

/// Costs of one schedule's ops, in ms.
pub trait CostModel {
    /// Compute op `key` on `rank`, when the rank's tokens are split into `micro_batches`.
    fn compute(&self, rank: usize, key: &OpKey, micro_batches: usize) -> f64;
    /// Collective `key` (the same on every rank).
    fn collective(&self, key: &OpKey, micro_batches: usize) -> f64;
    /// The cores the ranks share when there are fewer than ranks (a CPU running more ranks than it has
    /// cores): compute costs are then a rank's time on a core of its own, and the simulator shares the cores
    /// among the ranks computing at once. `None`: every rank has its own hardware.
    fn cores(&self) -> Option<usize> {
        None
    }

    /// How long after collective `key` arrives `rank`, waiting for it, resumes (ms): the host's delay in waking
    /// it, which is not link time. 0 by default.
    fn wake_ms(&self, _rank: usize, _key: &OpKey) -> f64 {
        0.0
    }

    /// With shared [`CostModel::cores`]: the operating system's time slice (ms), so that the simulator
    /// time-slices the cores among the ranks ([`super::sim::simulate_sliced`]) instead of sharing them as a
    /// fluid. `None`: fluid sharing.
    fn time_slice_ms(&self) -> Option<f64> {
        None
    }
}

/// FLOPs and bytes of one op.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Work {
    flops: f64,
    bytes: f64,
}

impl std::ops::Add for Work {
    type Output = Work;
    fn add(self, o: Work) -> Work {
        Work {
            flops: self.flops + o.flops,
            bytes: self.bytes + o.bytes,
        }
    }
}

impl std::ops::Mul<f64> for Work {
    type Output = Work;
    fn mul(self, k: f64) -> Work {
        Work {
            flops: self.flops * k,
            bytes: self.bytes * k,
        }
    }
}

/// The roofline cost model of a model on a cluster.
#[derive(Clone, Debug)]
pub struct Roofline {
    config: ModelConfig,
    cluster: Cluster,
    layout: Layout,
    workload: Workload,
}

/// Ring all-reduce of `bytes` over `p` ranks on links of `bw` bytes/s with latency `alpha` s.
pub fn ring_all_reduce_s(bytes: f64, p: usize, bw: f64, alpha: f64) -> f64 {
    if p <= 1 {
        return 0.0;
    }
    let p_f = p as f64;
    2.0 * (p_f - 1.0) * alpha + 2.0 * (p_f - 1.0) / p_f * bytes / bw
}

impl Roofline {
    /// The cost model of `config` on `cluster` split as `layout`, running `workload`.
    pub fn new(config: ModelConfig, cluster: Cluster, layout: Layout, workload: Workload) -> Self {
        Self {
            config,
            cluster,
            layout,
            workload,
        }
    }

    fn bpe(&self) -> f64 {
        self.cluster.bytes_per_element
    }

    fn hidden(&self) -> f64 {
        self.config.hidden_size as f64
    }

    /// Tokens a rank's attention runs (per micro-batch).
    fn tokens(&self, micro: usize) -> f64 {
        self.workload.tokens as f64 / micro.max(1) as f64
    }

    /// Tokens a rank's MoE and MLP run: under EP × TP each TP rank takes its share of the group's tokens.
    fn moe_tokens(&self, micro: usize) -> f64 {
        if self.layout.ep > 1 && self.layout.tp > 1 {
            self.tokens(micro) / self.layout.tp as f64
        } else {
            self.tokens(micro)
        }
    }

    /// Attention heads' share on this rank.
    fn head_split(&self) -> f64 {
        self.layout.tp as f64
    }

    /// Keys a query sees on average in layer `l`.
    fn context(&self, l: usize) -> f64 {
        let s = self.workload.seq_len as f64;
        let (decode, cap) = (
            self.workload.mode == Mode::Decode,
            match self.config.layers[l].mask {
                MaskKind::Causal => f64::INFINITY,
                MaskKind::Chunked { size } => size as f64,
                MaskKind::SlidingWindow { window } => window as f64,
            },
        );
        if decode {
            s.min(cap)
        } else {
            (s.min(cap) + 1.0) / 2.0
        }
    }

    /// (projections, scores + output projection) of layer `l` for `t` tokens on this rank.
    fn attention(&self, l: usize, t: f64) -> (Work, Work) {
        let h = self.hidden();
        let bpe = self.bpe();
        let split = self.head_split();
        let ctx = self.context(l);
        // Per-token FLOPs and weight elements of the projections; per-token per-key FLOPs of the core; KV bytes
        // cached per token.
        let (proj_w, out_w, core_per_key, kv_elems) = match &self.config.attention {
            AttentionConfig::Gqa(g) => {
                let (nh, nkv, hd) = (g.num_heads as f64, g.num_kv_heads as f64, g.head_dim as f64);
                (
                    h * (nh + 2.0 * nkv) * hd,
                    nh * hd * h,
                    4.0 * nh * hd,
                    2.0 * nkv * hd,
                )
            }
            AttentionConfig::Mla(m) => {
                let nh = m.num_heads as f64;
                let qk = (m.qk_nope_head_dim + m.qk_rope_head_dim) as f64;
                let v = m.v_head_dim as f64;
                let kvl = m.kv_lora_rank as f64;
                let q = match m.q_lora_rank {
                    Some(r) => h * r as f64 + r as f64 * nh * qk,
                    None => h * nh * qk,
                };
                let kv = h * (kvl + m.qk_rope_head_dim as f64)
                    + kvl * nh * (m.qk_nope_head_dim as f64 + v);
                (
                    q + kv,
                    nh * v * h,
                    2.0 * nh * (qk + v),
                    kvl + m.qk_rope_head_dim as f64,
                )
            }
        };
        let act = t * h * bpe;
        let proj = Work {
            flops: 2.0 * t * proj_w / split,
            bytes: proj_w * bpe / split + 2.0 * act,
        };
        // Decode reads every cached key and value of each sequence; prefill's fused kernel keeps them on chip.
        let kv_read = if self.workload.mode == Mode::Decode {
            t * ctx * kv_elems * bpe / split
        } else {
            t * kv_elems * bpe / split
        };
        let core = Work {
            flops: t * ctx * core_per_key / split + 2.0 * t * out_w / split,
            bytes: out_w * bpe / split + kv_read + 2.0 * act,
        };
        (proj, core)
    }

    fn swiglu(&self, t: f64, inter: f64, weight_copies: f64) -> Work {
        let h = self.hidden();
        Work {
            flops: 6.0 * t * h * inter,
            bytes: weight_copies * 3.0 * h * inter * self.bpe() + 2.0 * t * h * self.bpe(),
        }
    }

    /// Rows the busiest rank's experts run.
    fn expert_rows(&self, micro: usize) -> f64 {
        let k = self.config.moe.as_ref().map_or(0, |m| m.top_k) as f64;
        self.moe_tokens(micro) * k * self.workload.imbalance
    }

    fn work(&self, key: &OpKey, micro: usize) -> Work {
        let h = self.hidden();
        let bpe = self.bpe();
        let t = self.tokens(micro);
        let tm = self.moe_tokens(micro);
        let layer = key
            .layer
            .unwrap_or(0)
            .min(self.config.layers.len().saturating_sub(1));
        let moe = self.config.moe.as_ref();
        let e = moe.map_or(0, |m| m.num_experts) as f64;
        let k = moe.map_or(0, |m| m.top_k) as f64;
        let inter = moe.map_or(0, |m| m.expert_intermediate_size) as f64;
        let v = self.config.vocab_size as f64;
        let (proj, core) = self.attention(layer, t);
        let router = Work {
            flops: 2.0 * tm * h * e,
            bytes: h * e * bpe + 2.0 * tm * h * bpe,
        };
        let experts = || {
            let rows = self.expert_rows(micro);
            let local = (e / self.layout.ep as f64).max(1.0);
            // Weights read: the experts that get rows (all of them once rows outnumber them).
            let touched = local.min(rows.max(1.0));
            let split = if self.layout.ep == 1 {
                self.layout.tp as f64
            } else {
                1.0
            };
            Work {
                flops: 6.0 * rows * h * inter / split,
                bytes: touched * 3.0 * h * inter * bpe / split + 2.0 * rows * h * bpe,
            }
        };
        let shared = || match moe.and_then(|m| m.shared.as_ref()) {
            Some(s) => self.swiglu(tm, s.intermediate_size as f64, 1.0),
            None => Work::default(),
        };
        let mlp = || match self.config.layers[layer].ffn {
            FfnKind::Dense { intermediate_size } => self.swiglu(tm, intermediate_size as f64, 1.0),
            FfnKind::Moe => Work::default(),
        };
        let combine = Work {
            flops: 2.0 * tm * k * h,
            bytes: 2.0 * tm * k * h * bpe,
        };
        // Embedding + final norm + LM head; the schedule runs HEAD twice (embed, then logits): half each.
        let head = Work {
            flops: 2.0 * t * h * v,
            bytes: h * v * bpe + t * v * bpe,
        } * 0.5;
        match (key.phase, key.op) {
            (Phase::Forward, ops::ATTN_1) => proj,
            (Phase::Forward, ops::ATTN_2) => core,
            (Phase::Forward, ops::ATTN) => proj + core,
            (Phase::Forward, ops::ROUTER) => router,
            (Phase::Forward, ops::EXPERTS) => experts(),
            // The two parts of a cut expert step hold about half the rows each.
            (Phase::Forward, ops::EXPERTS_1 | ops::EXPERTS_2) => experts() * 0.5,
            (Phase::Forward, ops::SHARED) => shared(),
            (Phase::Forward, ops::MLP) => mlp(),
            (Phase::Forward, ops::COMBINE) => combine,
            (Phase::Forward, ops::HEAD) => head,
            // Backward: twice the forward FLOPs (input and weight gradients), the same weight traffic twice.
            (Phase::Backward, bwd_ops::ATTN) => (proj + core) * 2.0,
            (Phase::Backward, bwd_ops::EXPERTS) => experts() * 2.0,
            (Phase::Backward, bwd_ops::SHARED) => shared() * 2.0,
            (Phase::Backward, bwd_ops::ROUTER) => router * 2.0,
            (Phase::Backward, bwd_ops::JOIN) => combine * 2.0,
            (Phase::Backward, MLP_BWD) => mlp() * 2.0,
            (Phase::Backward, bwd_ops::HEAD) => head * 2.0,
            _ => Work::default(),
        }
    }

    fn seconds(&self, w: Work) -> f64 {
        let c = &self.cluster;
        let compute = w.flops / (c.flops * c.flop_efficiency);
        let memory = w.bytes / (c.mem_bw * c.mem_efficiency);
        compute.max(memory) + c.op_overhead_us * 1e-6
    }

    /// Which of EP's peers share a node with a rank: (intra-node peers, inter-node peers).
    fn ep_peers(&self) -> (usize, usize) {
        let per_node = self.layout.devices_per_node();
        let ep_in_node = (per_node / self.layout.tp).clamp(1, self.layout.ep);
        (ep_in_node - 1, self.layout.ep - ep_in_node)
    }

    /// Pairwise all-to-all where each rank sends `bytes` in total, spread evenly over the EP group: the
    /// intra-node and inter-node parts run concurrently on their own links, the slower one bounds it.
    pub fn all_to_all_s(&self, bytes: f64) -> f64 {
        let c = &self.cluster;
        let p = self.layout.ep as f64;
        let (intra, inter) = self.ep_peers();
        let per_peer = bytes / p;
        let intra_bw = match c.intra_peer_bw {
            Some(link) => c.intra_bw.min(link * intra as f64),
            None => c.intra_bw,
        } * c.link_efficiency;
        let t_intra = if intra > 0 {
            c.intra_latency_us * 1e-6 + intra as f64 * per_peer / intra_bw
        } else {
            0.0
        };
        let t_inter = if inter > 0 {
            c.inter_latency_us * 1e-6 + inter as f64 * per_peer / (c.inter_bw * c.link_efficiency)
        } else {
            0.0
        };
        t_intra.max(t_inter)
    }

    /// Ring all-reduce of `bytes` over `p` ranks that are contiguous (`p` ≤ devices per node: one node).
    pub fn all_reduce_s(&self, bytes: f64, p: usize, stride: usize) -> f64 {
        let c = &self.cluster;
        let one_node = p * stride <= self.layout.devices_per_node();
        let (bw, lat) = if one_node {
            (c.intra_bw, c.intra_latency_us)
        } else {
            (c.inter_bw, c.inter_latency_us)
        };
        ring_all_reduce_s(bytes, p, bw * c.link_efficiency, lat * 1e-6)
    }

    /// Elements of the replicated (non-expert) parameters of layer `l`, or of the embedding and head.
    fn replicated_params(&self, layer: Option<usize>) -> f64 {
        let h = self.hidden();
        let Some(l) = layer else {
            let v = self.config.vocab_size as f64;
            return if self.config.tie_word_embeddings {
                v * h
            } else {
                2.0 * v * h
            };
        };
        let (proj, core) = self.attention(l, 0.0);
        let attn = (proj.bytes + core.bytes) / self.bpe() * self.layout.tp as f64;
        let moe = self.config.moe.as_ref();
        let ffn = match self.config.layers[l].ffn {
            FfnKind::Dense { intermediate_size } => 3.0 * h * intermediate_size as f64,
            FfnKind::Moe => moe.map_or(0.0, |m| {
                h * m.num_experts as f64
                    + m.shared
                        .as_ref()
                        .map_or(0.0, |s| 3.0 * h * s.intermediate_size as f64)
            }),
        };
        attn + ffn
    }
}

impl CostModel for Roofline {
    fn compute(&self, rank: usize, key: &OpKey, micro: usize) -> f64 {
        // A GPU's collectives read and write their tensors in place (the token permutation is fused into the
        // experts' gather): no host work of their own.
        if ops::is_host_work(key.op) {
            return 0.0;
        }
        let mut w = self.work(key, micro);
        // Only the busiest rank gets `imbalance` × the mean expert rows; the others share the rest.
        let expert_op = matches!(
            key.op,
            ops::EXPERTS | ops::EXPERTS_1 | ops::EXPERTS_2 | bwd_ops::EXPERTS
        );
        if expert_op && rank > 0 && self.layout.ep > 1 {
            let i = self.workload.imbalance;
            let p = self.layout.ep as f64;
            let others = ((p - i) / (p - 1.0)).max(0.0);
            w = w * (others / i);
        }
        self.seconds(w) * 1e3
    }

    fn collective(&self, key: &OpKey, micro: usize) -> f64 {
        let h = self.hidden();
        let bpe = self.bpe();
        let rows = self.expert_rows(micro);
        let s = match key.op {
            ops::DISPATCH | ops::COMBINE | bwd_ops::COMBINE_BWD | bwd_ops::DISPATCH_BWD => {
                self.all_to_all_s(rows * h * bpe)
            }
            ops::AR_ATTN | ops::AR_MOE => {
                self.all_reduce_s(self.tokens(micro) * h * bpe, self.layout.tp, 1)
            }
            bwd_ops::GRAD_ALLREDUCE => {
                // Replicated gradients are all-reduced across the EP ranks (they hold the same weights).
                let bytes = self.replicated_params(key.layer) * bpe / micro.max(1) as f64;
                self.all_reduce_s(bytes, self.layout.ep, self.layout.tp)
            }
            _ => 0.0,
        };
        s * 1e3
    }
}
