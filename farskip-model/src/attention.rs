//! Self-attention: grouped-query attention (with the q/k norm variants of Qwen3, OLMoE and Llama-4) and
//! DeepSeek multi-head latent attention, both with a KV cache and causal / chunked / sliding-window masks.
//!
//! Attention is split into two named sub-steps, [`Attention::project`] (projections, norms, rope, cache) and
//! [`Attention::attend`] (scores, softmax, output projection), so a distributed schedule can hide a collective
//! behind each part. [`Attention::forward`] runs both.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::config::{
    AttentionConfig, GqaConfig, LayerConfig, MaskKind, MlaConfig, ModelConfig, QkNorm,
};
use crate::lanes;
use crate::matvec::linear as lin;
use crate::rope::Rope;

/// Queries per block in [`Attention::attend`].
const QUERY_BLOCK: usize = 128;

/// Positions per lane below which [`Attention::project`] and the output projection run in place.
const LANE_POSITIONS: usize = 64;

/// Keys and values of earlier positions for one layer: tensors, or (while decoding one position at a time on
/// the CPU) host buffers with room to grow, written in place at each step instead of concatenated.
#[derive(Clone, Debug, Default)]
pub struct LayerKvCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
    host: Option<HostKv>,
}

/// A one-sequence cache on the host: `[kv_heads, capacity, dim]` keys and values, `len` positions filled.
#[derive(Clone, Debug)]
struct HostKv {
    heads: usize,
    k_dim: usize,
    v_dim: usize,
    len: usize,
    cap: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    device: Device,
}

impl HostKv {
    fn new(heads: usize, k_dim: usize, v_dim: usize, cap: usize, device: Device) -> Self {
        Self {
            heads,
            k_dim,
            v_dim,
            len: 0,
            cap,
            k: vec![0.0; heads * cap * k_dim],
            v: vec![0.0; heads * cap * v_dim],
            device,
        }
    }

    /// Room for at least `len + extra` positions (doubling).
    fn reserve(&mut self, extra: usize) {
        if self.len + extra <= self.cap {
            return;
        }
        let cap = (self.len + extra).max(2 * self.cap);
        let grow = |old: &[f32], d: usize| {
            let mut new = vec![0.0; self.heads * cap * d];
            for h in 0..self.heads {
                new[h * cap * d..h * cap * d + self.len * d]
                    .copy_from_slice(&old[h * self.cap * d..h * self.cap * d + self.len * d]);
            }
            new
        };
        self.k = grow(&self.k, self.k_dim);
        self.v = grow(&self.v, self.v_dim);
        self.cap = cap;
    }

    /// Appends positions given as `[heads, t, dim]` keys and values.
    fn push(&mut self, k: &[f32], v: &[f32], t: usize) {
        self.reserve(t);
        for h in 0..self.heads {
            for (src, dst, d) in [(k, &mut self.k, self.k_dim), (v, &mut self.v, self.v_dim)] {
                let at = h * self.cap * d + self.len * d;
                dst[at..at + t * d].copy_from_slice(&src[h * t * d..(h + 1) * t * d]);
            }
        }
        self.len += t;
    }

    /// Keys of head `h`, `[len, k_dim]`.
    fn keys(&self, h: usize) -> &[f32] {
        &self.k[h * self.cap * self.k_dim..(h * self.cap + self.len) * self.k_dim]
    }

    /// Values of head `h`, `[len, v_dim]`.
    fn values(&self, h: usize) -> &[f32] {
        &self.v[h * self.cap * self.v_dim..(h * self.cap + self.len) * self.v_dim]
    }

    /// The cache as `[1, heads, len, dim]` tensors.
    fn tensors(&self) -> (Tensor<4>, Tensor<4>) {
        let dense = |d: usize, h: fn(&Self, usize) -> &[f32]| {
            let mut out = Vec::with_capacity(self.heads * self.len * d);
            for i in 0..self.heads {
                out.extend_from_slice(h(self, i));
            }
            Tensor::from_data(
                TensorData::new(out, [1, self.heads, self.len, d]),
                &self.device,
            )
        };
        (
            dense(self.k_dim, Self::keys),
            dense(self.v_dim, Self::values),
        )
    }
}

/// Positions a host cache makes room for beyond what it holds when it is first built.
const HOST_KV_SLACK: usize = 256;

impl LayerKvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        match (&self.host, &self.kv) {
            (Some(h), _) => h.len,
            (None, Some((k, _))) => k.dims()[2],
            (None, None) => 0,
        }
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The cached keys and values, `([batch, kv_heads, cached, key_dim], [batch, kv_heads, cached,
    /// value_dim])`; `None` when nothing is cached.
    pub fn kv(&self) -> Option<(Tensor<4>, Tensor<4>)> {
        match &self.host {
            Some(h) => Some(h.tensors()),
            None => self.kv.clone(),
        }
    }
    /// Moves a host cache back into tensors (before a longer input or a batch comes through).
    fn move_to_tensors(&mut self) {
        if let Some(h) = self.host.take() {
            self.kv = (h.len > 0).then(|| h.tensors());
        }
    }
    /// The host cache for one sequence of `heads` K/V heads, built from the tensors on the first call; `None`
    /// when the cached tensors cannot be read on the host or hold another shape.
    fn host(
        &mut self,
        heads: usize,
        k_dim: usize,
        v_dim: usize,
        device: &Device,
    ) -> Option<&mut HostKv> {
        if self.host.is_none() {
            let mut h = match &self.kv {
                None => HostKv::new(heads, k_dim, v_dim, HOST_KV_SLACK, device.clone()),
                Some((k, v)) => {
                    let [b, kh, s, kd] = k.dims();
                    let [_, _, _, vd] = v.dims();
                    if (b, kh, kd, vd) != (1, heads, k_dim, v_dim) {
                        return None;
                    }
                    let hk = crate::matvec::host_f32(k)?;
                    let hv = crate::matvec::host_f32(v)?;
                    let mut h = HostKv::new(heads, k_dim, v_dim, s + HOST_KV_SLACK, device.clone());
                    h.push(&hk, &hv, s);
                    h
                }
            };
            h.reserve(1);
            self.host = Some(h);
            self.kv = None;
        }
        self.host.as_mut()
    }
    fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        self.move_to_tensors();
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// Queries, keys and values after [`Attention::project`]: the input of [`Attention::attend`].
#[derive(Clone, Debug)]
pub struct ProjectedQkv {
    /// `[batch, heads, seq, key_dim]`, already scaled where a family scales queries.
    pub q: Tensor<4>,
    /// `[batch, kv_heads, offset + seq, key_dim]`, including cached positions.
    pub k: Tensor<4>,
    /// `[batch, kv_heads, offset + seq, value_dim]`.
    pub v: Tensor<4>,
    /// Absolute position of the first query.
    pub offset: usize,
}

/// Grouped-query attention weights.
#[derive(Module, Debug)]
pub struct GqaAttention {
    /// `[hidden, heads * head_dim]`.
    pub q_proj: Linear,
    /// `[hidden, kv_heads * head_dim]`.
    pub k_proj: Linear,
    /// `[hidden, kv_heads * head_dim]`.
    pub v_proj: Linear,
    /// `[heads * head_dim, hidden]`.
    pub o_proj: Linear,
    /// Query norm (per head or whole projection), if the family has one with a weight.
    pub q_norm: Option<RmsNorm>,
    /// Key norm.
    pub k_norm: Option<RmsNorm>,
    #[module(skip)]
    pub(crate) cfg: GqaConfig,
    /// Tensor parallelism with a whole-projection q/k norm: the projections stay whole and only these heads
    /// (`q_start, q_len, kv_start, kv_len`) are kept after the norm.
    #[module(skip)]
    pub(crate) local_heads: Option<(usize, usize, usize, usize)>,
}

/// DeepSeek multi-head latent attention weights.
#[derive(Module, Debug)]
pub struct MlaAttention {
    /// Plain query projection (no q-LoRA) `[hidden, heads * qk_head_dim]`.
    pub q_proj: Option<Linear>,
    /// Query down-projection `[hidden, q_lora_rank]`.
    pub q_a_proj: Option<Linear>,
    /// Norm of the query latent.
    pub q_a_norm: Option<RmsNorm>,
    /// Query up-projection `[q_lora_rank, heads * qk_head_dim]`.
    pub q_b_proj: Option<Linear>,
    /// `[hidden, kv_lora_rank + rope_dim]`.
    pub kv_a_proj: Linear,
    /// Norm of the key/value latent.
    pub kv_a_norm: RmsNorm,
    /// `[kv_lora_rank, heads * (nope_dim + v_dim)]`.
    pub kv_b_proj: Linear,
    /// `[heads * v_dim, hidden]`.
    pub o_proj: Linear,
    #[module(skip)]
    pub(crate) cfg: MlaConfig,
}

/// The attention kinds.
#[derive(Module, Debug)]
pub enum AttentionKind {
    /// Grouped-query attention.
    Gqa(GqaAttention),
    /// Multi-head latent attention.
    Mla(MlaAttention),
}

/// One layer's self-attention.
#[derive(Module, Debug)]
pub struct Attention {
    /// The weights.
    pub kind: AttentionKind,
    #[module(skip)]
    pub(crate) rope: Option<Rope>,
    #[module(skip)]
    pub(crate) mask: MaskKind,
    #[module(skip)]
    pub(crate) scale: f64,
    #[module(skip)]
    pub(crate) eps: f64,
}

fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

fn rms(d: usize, eps: f64, device: &Device) -> RmsNorm {
    RmsNormConfig::new(d).with_epsilon(eps).init(device)
}

impl Attention {
    /// Random-initialised attention for one layer of `cfg`.
    pub fn new(cfg: &ModelConfig, layer: &LayerConfig, device: &Device) -> Self {
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        match &cfg.attention {
            AttentionConfig::Gqa(g) => {
                let (q, kv) = (g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim);
                let (q_norm, k_norm) = match g.qk_norm {
                    QkNorm::PerHead => (
                        Some(rms(g.head_dim, eps, device)),
                        Some(rms(g.head_dim, eps, device)),
                    ),
                    QkNorm::Whole => (Some(rms(q, eps, device)), Some(rms(kv, eps, device))),
                    QkNorm::None | QkNorm::L2AfterRope => (None, None),
                };
                Self {
                    kind: AttentionKind::Gqa(GqaAttention {
                        q_proj: linear(h, q, g.qkv_bias, device),
                        k_proj: linear(h, kv, g.qkv_bias, device),
                        v_proj: linear(h, kv, g.qkv_bias, device),
                        o_proj: linear(q, h, g.o_bias, device),
                        q_norm,
                        k_norm,
                        cfg: g.clone(),
                        local_heads: None,
                    }),
                    rope: layer.use_rope.then(|| Rope::new(&cfg.rope, g.head_dim)),
                    mask: layer.mask,
                    scale: (g.head_dim as f64).powf(-0.5),
                    eps,
                }
            }
            AttentionConfig::Mla(m) => {
                let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
                let (q_proj, q_a_proj, q_a_norm, q_b_proj) = match m.q_lora_rank {
                    None => (
                        Some(linear(h, m.num_heads * qk, false, device)),
                        None,
                        None,
                        None,
                    ),
                    Some(r) => (
                        None,
                        Some(linear(h, r, false, device)),
                        Some(rms(r, m.latent_norm_eps, device)),
                        Some(linear(r, m.num_heads * qk, false, device)),
                    ),
                };
                Self {
                    kind: AttentionKind::Mla(MlaAttention {
                        q_proj,
                        q_a_proj,
                        q_a_norm,
                        q_b_proj,
                        kv_a_proj: linear(h, m.kv_lora_rank + m.qk_rope_head_dim, false, device),
                        kv_a_norm: rms(m.kv_lora_rank, m.latent_norm_eps, device),
                        kv_b_proj: linear(
                            m.kv_lora_rank,
                            m.num_heads * (m.qk_nope_head_dim + m.v_head_dim),
                            false,
                            device,
                        ),
                        o_proj: linear(m.num_heads * m.v_head_dim, h, false, device),
                        cfg: m.clone(),
                    }),
                    rope: layer
                        .use_rope
                        .then(|| Rope::new(&cfg.rope, m.qk_rope_head_dim)),
                    mask: layer.mask,
                    scale: (qk as f64).powf(-0.5) * Rope::softmax_scale_multiplier(&cfg.rope),
                    eps,
                }
            }
        }
    }

    /// Both sub-steps: [`Self::project`] then [`Self::attend`].
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` (already normalised)
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        offset: usize,
        mut cache: Option<&mut LayerKvCache>,
    ) -> Tensor<3> {
        if let Some(c) = cache.as_deref_mut()
            && let Some(out) = self.decode_one(&x, offset, c)
        {
            return out;
        }
        let qkv = self.project(x, offset, cache);
        self.attend(qkv)
    }

    /// One position of one sequence with a cache, grouped-query attention on plain flex: the whole step on the
    /// host (projections through [`crate::matvec::products`], norms, rope, the cache written in place, the
    /// scores and softmax, the output projection), the same maths as [`Self::project`] + [`Self::attend`]
    /// without their ~40 burn ops and the cache's concatenation. `None` (the caller takes the tensor path) for
    /// anything else: several positions or sequences, MLA, tensor-parallel heads, autodiff, another device.
    fn decode_one(
        &self,
        x: &Tensor<3>,
        offset: usize,
        cache: &mut LayerKvCache,
    ) -> Option<Tensor<3>> {
        use crate::matvec::{Product, Weights, flex_primitive, host_f32, products, rms_norm_rows};
        let [b, t, hidden] = x.dims();
        let AttentionKind::Gqa(a) = &self.kind else {
            return None;
        };
        if b != 1 || t != 1 || a.local_heads.is_some() || x.is_autodiff() || cache.len() != offset {
            if b != 1 || t != 1 {
                cache.move_to_tensors();
            }
            return None;
        }
        let g = &a.cfg;
        let (heads, kv_heads, hd) = (g.num_heads, g.num_kv_heads, g.head_dim);
        let prims =
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj].map(|l| flex_primitive(&l.weight.val()));
        let [Some(wq), Some(wk), Some(wv), Some(wo)] = &prims else {
            return None;
        };
        let weights = [
            Weights::of(wq)?,
            Weights::of(wk)?,
            Weights::of(wv)?,
            Weights::of(wo)?,
        ];
        let bias = |l: &Linear| match &l.bias {
            Some(b) => host_f32(&b.val()).map(Some),
            None => Some(None),
        };
        let biases = [
            bias(&a.q_proj)?,
            bias(&a.k_proj)?,
            bias(&a.v_proj)?,
            bias(&a.o_proj)?,
        ];
        let gamma = |n: &Option<RmsNorm>| match n {
            Some(n) => host_f32(&n.gamma.val()).map(|g| Some((g, n.epsilon))),
            None => Some(None),
        };
        let (q_norm, k_norm) = (gamma(&a.q_norm)?, gamma(&a.k_norm)?);
        let xs = host_f32(x)?;
        crate::host_reads::note_read();
        let device = x.device();
        let cached = cache.host(kv_heads, hd, hd, &device)?;

        let dims = [heads * hd, kv_heads * hd, kv_heads * hd];
        let list: Vec<Product<'_>> = (0..3)
            .map(|i| Product {
                x: &xs,
                rows: 1,
                w: weights[i],
                k: hidden,
                n: dims[i],
            })
            .collect();
        let mut qkv = products(&list);
        for (y, b) in qkv.iter_mut().zip(&biases) {
            if let Some(b) = b {
                y.iter_mut().zip(b).for_each(|(y, &b)| *y += b);
            }
        }
        let [mut q, mut k, v]: [Vec<f32>; 3] = qkv.try_into().ok()?;
        if matches!(g.qk_norm, QkNorm::Whole | QkNorm::PerHead) {
            for (y, n) in [(&mut q, &q_norm), (&mut k, &k_norm)] {
                if let Some((gamma, eps)) = n {
                    rms_norm_rows(y, gamma, *eps);
                }
            }
        }
        if let Some(r) = &self.rope {
            let (cos, sin) = r.table_rows(offset, 1);
            for y in [&mut q, &mut k] {
                for head in y.chunks_mut(hd) {
                    r.rotate_row(head, &cos, &sin);
                }
            }
            if g.qk_norm == QkNorm::L2AfterRope {
                for y in [&mut q, &mut k] {
                    for head in y.chunks_mut(hd) {
                        let mean = head.iter().map(|&v| v * v).sum::<f32>() / hd as f32;
                        let rms = (mean + self.eps as f32).sqrt();
                        head.iter_mut().for_each(|v| *v /= rms);
                    }
                }
            }
        }
        if let (Some((floor_scale, attn_scale)), None) = (g.temperature_tuning, &self.rope) {
            let s =
                ((((offset + 1) as f64 / floor_scale).floor()).ln_1p() * attn_scale + 1.0) as f32;
            q.iter_mut().for_each(|v| *v *= s);
        }
        cached.push(&k, &v, 1);

        let s = cached.len;
        let visible = |j: usize| {
            let i = offset;
            !(j > i
                || match self.mask {
                    MaskKind::Causal => false,
                    MaskKind::Chunked { size } => j / size != i / size,
                    MaskKind::SlidingWindow { window } => i >= window && j <= i - window,
                })
        };
        let mut out = vec![0.0f32; heads * hd];
        let first = (0..s).find(|&j| visible(j)).unwrap_or(s);
        let last = (first..s).find(|&j| !visible(j)).unwrap_or(s);
        debug_assert!(
            (last..s).all(|j| !visible(j)),
            "one query sees a contiguous run of keys"
        );
        // Heads split between this thread and the decode helper, whole key/value groups on each side (each
        // head's sums are the same whichever thread computes them); short caches stay on this thread.
        let group = heads / cached.heads;
        let cut = (heads / 2).div_ceil(group) * group;
        let keys = first..last;
        if cut > 0 && cut < heads && keys.len() * heads * hd >= ONE_QUERY_SPLIT_MIN {
            let (a, b) = out.split_at_mut(cut * hd);
            let halves = [std::sync::Mutex::new(a), std::sync::Mutex::new(b)];
            let job = |half: usize| {
                let hs = match half {
                    0 => 0..cut,
                    _ => cut..heads,
                };
                let mut o = halves[half].lock().unwrap_or_else(|e| e.into_inner());
                one_query(&q, cached, hs, hd, self.scale as f32, keys.clone(), &mut o);
            };
            if !crate::matvec::pair::run(&job) {
                job(0);
                job(1);
            }
        } else {
            one_query(&q, cached, 0..heads, hd, self.scale as f32, keys, &mut out);
        }
        let mut y = products(&[Product {
            x: &out,
            rows: 1,
            w: weights[3],
            k: heads * hd,
            n: hidden,
        }])
        .remove(0);
        if let Some(b) = &biases[3] {
            y.iter_mut().zip(b).for_each(|(y, &b)| *y += b);
        }
        Some(Tensor::from_data(
            TensorData::new(y, [1, 1, hidden]),
            &device,
        ))
    }

    /// Part 1: projections, q/k norms, rope, and the KV cache update.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; `offset`: absolute position of `x[:, 0]` (= cached length)
    ///
    /// Without autodiff on flex, long inputs are cut into runs of positions that are projected side by side on
    /// [`lanes`] (every op here acts on each position alone), each single-threaded.
    pub fn project(
        &self,
        x: Tensor<3>,
        offset: usize,
        cache: Option<&mut LayerKvCache>,
    ) -> ProjectedQkv {
        let [_, t, _] = x.dims();
        let mut parts = lanes::ranges(&self.lane_device(&x), t, LANE_POSITIONS, |r| {
            self.project_positions(x.clone().narrow(1, r.start, r.len()), offset + r.start)
        });
        let (q, k, v) = match parts.len() {
            1 => parts.remove(0),
            _ => {
                let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
                for (q, k, v) in parts {
                    qs.push(q);
                    ks.push(k);
                    vs.push(v);
                }
                (Tensor::cat(qs, 2), Tensor::cat(ks, 2), Tensor::cat(vs, 2))
            }
        };
        let (k, v) = match cache {
            Some(c) => c.append(k, v),
            None => (k, v),
        };
        ProjectedQkv { q, k, v, offset }
    }

    /// The device [`lanes`] judge the projections of `x` by ([`lanes::work_device`]).
    fn lane_device(&self, x: &Tensor<3>) -> Device {
        let weights = match &self.kind {
            AttentionKind::Gqa(a) => a.o_proj.weight.device(),
            AttentionKind::Mla(a) => a.o_proj.weight.device(),
        };
        lanes::work_device(x.device(), weights)
    }

    /// [`Self::project`] without the cache: `(q, k, v)` for the positions `offset..offset + seq` of `x`.
    fn project_positions(&self, x: Tensor<3>, offset: usize) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, t, _] = x.dims();
        let device = x.device();
        let tables = self.rope.as_ref().map(|r| r.tables(offset, t, &device));
        let rope = |x: Tensor<4>| match (&self.rope, &tables) {
            (Some(r), Some((cos, sin))) => r.apply(x, cos, sin),
            _ => x,
        };
        match &self.kind {
            AttentionKind::Gqa(a) => {
                let g = &a.cfg;
                let mut q = lin(&a.q_proj, x.clone());
                let mut k = lin(&a.k_proj, x.clone());
                let v = lin(&a.v_proj, x);
                let mut v = v;
                if g.qk_norm == QkNorm::Whole {
                    q = a.q_norm.as_ref().map_or(q.clone(), |n| n.forward(q));
                    k = a.k_norm.as_ref().map_or(k.clone(), |n| n.forward(k));
                }
                if let Some((qs, ql, ks, kl)) = a.local_heads {
                    let hd = g.head_dim;
                    q = q.narrow(2, qs * hd, ql * hd);
                    k = k.narrow(2, ks * hd, kl * hd);
                    v = v.narrow(2, ks * hd, kl * hd);
                }
                let heads =
                    |x: Tensor<3>, n: usize| x.reshape([b, t, n, g.head_dim]).swap_dims(1, 2);
                let mut q = heads(q, g.num_heads);
                let mut k = heads(k, g.num_kv_heads);
                let v = heads(v, g.num_kv_heads);
                if g.qk_norm == QkNorm::PerHead {
                    q = a.q_norm.as_ref().map_or(q.clone(), |n| n.forward(q));
                    k = a.k_norm.as_ref().map_or(k.clone(), |n| n.forward(k));
                }
                q = rope(q);
                k = rope(k);
                if g.qk_norm == QkNorm::L2AfterRope && self.rope.is_some() {
                    q = l2_norm(q, self.eps);
                    k = l2_norm(k, self.eps);
                }
                if let (Some((floor_scale, attn_scale)), None) = (g.temperature_tuning, &self.rope)
                {
                    let scales: Vec<f32> = (offset..offset + t)
                        .map(|p| {
                            ((((p + 1) as f64 / floor_scale).floor()).ln_1p() * attn_scale + 1.0)
                                as f32
                        })
                        .collect();
                    let scales = Tensor::<1>::from_data(TensorData::new(scales, [t]), &device);
                    q = q * scales.reshape([1, 1, t, 1]);
                }
                (q, k, v)
            }
            AttentionKind::Mla(a) => {
                let m = &a.cfg;
                let (nope, rd) = (m.qk_nope_head_dim, m.qk_rope_head_dim);
                let q = match (&a.q_proj, &a.q_a_proj, &a.q_a_norm, &a.q_b_proj) {
                    (Some(p), ..) => lin(p, x.clone()),
                    (None, Some(qa), Some(qn), Some(qb)) => lin(qb, qn.forward(lin(qa, x.clone()))),
                    _ => unreachable!("MLA built without a query projection"),
                };
                let q = q.reshape([b, t, m.num_heads, nope + rd]).swap_dims(1, 2);
                let q_nope = q.clone().narrow(3, 0, nope);
                let q_rot = rope(q.narrow(3, nope, rd));
                let ckv = lin(&a.kv_a_proj, x);
                let latent = ckv.clone().narrow(2, 0, m.kv_lora_rank);
                let k_rot = rope(ckv.narrow(2, m.kv_lora_rank, rd).reshape([b, 1, t, rd]));
                let kv = lin(&a.kv_b_proj, a.kv_a_norm.forward(latent))
                    .reshape([b, t, m.num_heads, nope + m.v_head_dim])
                    .swap_dims(1, 2);
                let k_nope = kv.clone().narrow(3, 0, nope);
                let v = kv.narrow(3, nope, m.v_head_dim);
                let q = Tensor::cat(vec![q_nope, q_rot], 3);
                let k = Tensor::cat(vec![k_nope, k_rot.expand([b, m.num_heads, t, rd])], 3);
                (q, k, v)
            }
        }
    }

    /// Part 2: scores, mask, softmax, weighted values and the output projection.
    ///
    /// Long inputs run in blocks of 128 queries, each against the keys up to its last query only (every mask
    /// kind is causal), which skips most of the masked triangle: 3/8 of all scores at 512 tokens. Without
    /// autodiff on flex each block is flex's fused attention kernel (no score tensor, grouped K/V heads read in
    /// place, the causal mask computed on the fly). Otherwise the query heads are grouped by the K/V head they
    /// share (`[batch, kv_heads, group * seq, dim]`), so K and V are never repeated per query head.
    ///
    /// # Shapes
    /// - output: `[batch, seq, hidden]`
    pub fn attend(&self, qkv: ProjectedQkv) -> Tensor<3> {
        let ProjectedQkv { q, k, v, offset } = qkv;
        let [b, heads, t, _] = q.dims();
        let s = k.dims()[2];
        let dv = v.dims()[3];
        let out = if t >= 2 * QUERY_BLOCK && offset + t == s {
            let block = |i: usize| {
                let start = i * QUERY_BLOCK;
                let len = QUERY_BLOCK.min(t - start);
                let keys = offset + start + len;
                self.attend_block(
                    q.clone().narrow(2, start, len),
                    k.clone().narrow(2, 0, keys),
                    v.clone().narrow(2, 0, keys),
                    offset + start,
                )
            };
            // Later blocks see more keys: `map_increasing` spreads them so every lane gets equal work.
            let outs = lanes::map_increasing(&q.device(), t.div_ceil(QUERY_BLOCK), block);
            Tensor::cat(outs, 2)
        } else {
            self.attend_block(q, k, v, offset)
        };
        let out = out.swap_dims(1, 2).reshape([b * t, heads * dv]);
        let o_proj = match &self.kind {
            AttentionKind::Gqa(a) => &a.o_proj,
            AttentionKind::Mla(a) => &a.o_proj,
        };
        let out = lanes::rows(out, LANE_POSITIONS, |x| lin(o_proj, x));
        let h = out.dims()[1];
        out.reshape([b, t, h])
    }

    /// Softmax attention of queries at positions `offset..` over keys at positions `0..`.
    ///
    /// # Shapes
    /// - `q`: `[batch, heads, seq, dim]`; `k`: `[batch, kv_heads, keys, dim]`; `v`: `[batch, kv_heads, keys,
    ///   value_dim]` -> `[batch, heads, seq, value_dim]`
    fn attend_block(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, offset: usize) -> Tensor<4> {
        let q_dims = q.dims();
        let t = q_dims[2];
        let s = k.dims()[2];
        let device = q.device();
        if !device.is_autodiff() && device == Device::flex() {
            let causal = self.mask == MaskKind::Causal && offset + t == s;
            let mask = match causal {
                true => None,
                false => self
                    .mask_tensor(offset, t, s, &device)
                    .map(|m| m.unsqueeze::<4>()),
            };
            let options = AttentionModuleOptions {
                scale: Some(self.scale),
                softcap: None,
                is_causal: causal,
            };
            return attention(q, k, v, mask, None, options);
        }
        if device.is_autodiff()
            && let Some(out) = crate::attention_core::attention(&q, &k, &v, self.scale, |dev| {
                self.mask_tensor(offset, t, s, dev)
            })
        {
            return out;
        }
        let (_, p) = crate::attention_core::probabilities(
            q,
            k,
            self.scale,
            self.mask_tensor(offset, t, s, &device),
        );
        crate::attention_core::weighted_values(p, v, q_dims)
    }

    /// `true` where query `offset + i` may NOT see key `j`; `None` when everything is visible.
    fn mask_tensor(
        &self,
        offset: usize,
        t: usize,
        s: usize,
        device: &Device,
    ) -> Option<Tensor<2, Bool>> {
        let hidden = |i: usize, j: usize| {
            let i = offset + i;
            j > i
                || match self.mask {
                    MaskKind::Causal => false,
                    MaskKind::Chunked { size } => j / size != i / size,
                    MaskKind::SlidingWindow { window } => i >= window && j <= i - window,
                }
        };
        let data: Vec<bool> = (0..t)
            .flat_map(|i| (0..s).map(move |j| hidden(i, j)))
            .collect();
        data.iter()
            .any(|&m| m)
            .then(|| Tensor::from_data(TensorData::new(data, [t, s]), device))
    }
}

/// Query elements × keys from which [`Attention::decode_one`] splits the heads with the decode helper.
const ONE_QUERY_SPLIT_MIN: usize = 1 << 14;

/// Softmax attention of one query per head (`q`: `[heads, dim]`) over the keys `keys` of a host cache, for the
/// query heads `heads` (a range of them) into `out` (`[heads.len(), dim]`), compiled for the widest vector unit
/// found at run time. Query head `h` reads K/V head `h / (heads / kv_heads)`.
fn one_query(
    q: &[f32],
    cache: &HostKv,
    heads: std::ops::Range<usize>,
    hd: usize,
    scale: f32,
    keys: std::ops::Range<usize>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above); the function is safe code otherwise.
            unsafe { one_query_avx512(q, cache, heads, hd, scale, keys, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { one_query_avx2(q, cache, heads, hd, scale, keys, out) };
            return;
        }
    }
    one_query_portable(q, cache, heads, hd, scale, keys, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn one_query_avx512(
    q: &[f32],
    cache: &HostKv,
    heads: std::ops::Range<usize>,
    hd: usize,
    scale: f32,
    keys: std::ops::Range<usize>,
    out: &mut [f32],
) {
    one_query_portable(q, cache, heads, hd, scale, keys, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn one_query_avx2(
    q: &[f32],
    cache: &HostKv,
    heads: std::ops::Range<usize>,
    hd: usize,
    scale: f32,
    keys: std::ops::Range<usize>,
    out: &mut [f32],
) {
    one_query_portable(q, cache, heads, hd, scale, keys, out)
}

#[inline(always)]
fn one_query_portable(
    q: &[f32],
    cache: &HostKv,
    heads: std::ops::Range<usize>,
    hd: usize,
    scale: f32,
    keys: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let group = q.len() / hd / cache.heads;
    let mut p = vec![0.0f32; keys.len()];
    let first = heads.start;
    for h in heads {
        let qh = &q[h * hd..(h + 1) * hd];
        let kh = &cache.keys(h / group)[keys.start * hd..keys.end * hd];
        let vh = &cache.values(h / group)[keys.start * hd..keys.end * hd];
        let mut max = f32::NEG_INFINITY;
        for (pj, kj) in p.iter_mut().zip(kh.chunks_exact(hd)) {
            *pj = dot(qh, kj) * scale;
            max = max.max(*pj);
        }
        // The vectorisable exp of the softmax in flex's attention kernel (the prefill's), in 16 partial sums.
        let sum = burn_flex::simd::exp::exp_shifted_sum_inplace_f32(&mut p, max);
        let oh = &mut out[(h - first) * hd..(h - first + 1) * hd];
        for (&pj, vj) in p.iter().zip(vh.chunks_exact(hd)) {
            let w = pj / sum;
            oh.iter_mut().zip(vj).for_each(|(o, &v)| *o += w * v);
        }
    }
}

/// `Σ a[i] · b[i]` in 16 running sums (one vector register's worth).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    for (x, y) in a16.zip(b16) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Weightless RMS norm over the last dim (Llama-4's `L2Norm`).
fn l2_norm(x: Tensor<4>, eps: f64) -> Tensor<4> {
    let rms = (x.clone().square().mean_dim(3) + eps).sqrt();
    x / rms
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::activation::softmax;

    /// The straightforward form: K/V repeated per query head, the whole score matrix, an explicit mask.
    fn reference(attn: &Attention, qkv: ProjectedQkv) -> Tensor<3> {
        let ProjectedQkv { q, k, v, offset } = qkv;
        let [b, heads, t, _] = q.dims();
        let [_, kv_heads, s, d] = k.dims();
        let dv = v.dims()[3];
        let g = heads / kv_heads;
        let rep = |x: Tensor<4>, d: usize| {
            x.unsqueeze_dim::<5>(2)
                .expand([b, kv_heads, g, s, d])
                .reshape([b, heads, s, d])
        };
        let mut scores = q.matmul(rep(k, d).swap_dims(2, 3)).mul_scalar(attn.scale);
        if let Some(mask) = attn.mask_tensor(offset, t, s, &scores.device()) {
            scores = scores.mask_fill(mask.unsqueeze::<4>(), f32::NEG_INFINITY);
        }
        let out = softmax(scores, 3)
            .matmul(rep(v, dv))
            .swap_dims(1, 2)
            .reshape([b, t, heads * dv]);
        match &attn.kind {
            AttentionKind::Gqa(a) => a.o_proj.forward(out),
            AttentionKind::Mla(a) => a.o_proj.forward(out),
        }
    }

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Positions decoded one at a time (the host path, [`Attention::decode_one`]) with a prefill before and a
    /// two-position step between them (the cache moves from tensors to the host and back), against one
    /// forward over all positions, for every mask kind and q/k norm variant.
    #[test]
    fn host_decoding_matches_the_tensor_path() {
        let cfg = ModelConfig::small_moe(32, 32, 1, 4, 2, 8, 4, 2, 16, None);
        let device = Device::flex();
        device.seed(5);
        let mut attn = Attention::new(&cfg, &cfg.layers[0], &device);
        for (mask, norm) in [
            (MaskKind::Causal, QkNorm::PerHead),
            (MaskKind::Chunked { size: 5 }, QkNorm::None),
            (MaskKind::SlidingWindow { window: 4 }, QkNorm::L2AfterRope),
            (MaskKind::Causal, QkNorm::Whole),
        ] {
            attn.mask = mask;
            if let AttentionKind::Gqa(a) = &mut attn.kind {
                a.cfg.qk_norm = norm;
                let (q, kv) = (a.cfg.num_heads * 8, a.cfg.num_kv_heads * 8);
                (a.q_norm, a.k_norm) = match norm {
                    QkNorm::PerHead => (Some(rms(8, 1e-6, &device)), Some(rms(8, 1e-6, &device))),
                    QkNorm::Whole => (Some(rms(q, 1e-6, &device)), Some(rms(kv, 1e-6, &device))),
                    _ => (None, None),
                };
            }
            let t = 12;
            let x = Tensor::<3>::random([1, t, 32], Distribution::Normal(0.0, 1.0), &device);
            let want = attn.forward(x.clone(), 0, None);
            let mut cache = LayerKvCache::default();
            let mut outs = vec![attn.forward(x.clone().narrow(1, 0, 3), 0, Some(&mut cache))];
            for (start, len) in [
                (3, 1),
                (4, 1),
                (5, 1),
                (6, 2),
                (8, 1),
                (9, 1),
                (10, 1),
                (11, 1),
            ] {
                outs.push(attn.forward(x.clone().narrow(1, start, len), start, Some(&mut cache)));
                assert_eq!(cache.len(), start + len);
            }
            let diff = max_diff(Tensor::cat(outs, 1), want);
            assert!(diff < 1e-5, "{mask:?}, {norm:?}: off by {diff}");
        }
    }

    /// Decode steps over a cache long enough for the heads to be split with the decode helper (whole K/V
    /// groups on each side), against one forward over all positions.
    #[test]
    fn host_decoding_with_split_heads_matches_the_tensor_path() {
        let cfg = ModelConfig::small_moe(32, 32, 1, 4, 2, 8, 4, 2, 16, None);
        let device = Device::flex();
        device.seed(6);
        let mut attn = Attention::new(&cfg, &cfg.layers[0], &device);
        let (prompt, steps) = (ONE_QUERY_SPLIT_MIN / (4 * 8) + 8, 3);
        for mask in [
            MaskKind::Causal,
            MaskKind::SlidingWindow { window: prompt - 4 },
        ] {
            attn.mask = mask;
            let t = prompt + steps;
            let x = Tensor::<3>::random([1, t, 32], Distribution::Normal(0.0, 1.0), &device);
            let want = attn.forward(x.clone(), 0, None);
            let mut cache = LayerKvCache::default();
            let mut outs = vec![attn.forward(x.clone().narrow(1, 0, prompt), 0, Some(&mut cache))];
            for start in prompt..t {
                outs.push(attn.forward(x.clone().narrow(1, start, 1), start, Some(&mut cache)));
            }
            let diff = max_diff(Tensor::cat(outs, 1), want);
            assert!(diff < 1e-5, "{mask:?}: off by {diff}");
        }
    }

    /// Long inputs (query blocks), grouped heads, a cache offset and every mask kind, on the fused path (plain
    /// flex) and the composite path (autodiff, gradients included).
    #[test]
    fn blocked_and_fused_attention_match_the_reference() {
        let cfg = ModelConfig::small_moe(32, 32, 1, 4, 2, 8, 4, 2, 16, None);
        for device in [Device::flex(), Device::flex().autodiff()] {
            device.seed(3);
            let mut attn = Attention::new(&cfg, &cfg.layers[0], &device);
            for mask in [
                MaskKind::Causal,
                MaskKind::Chunked { size: 100 },
                MaskKind::SlidingWindow { window: 70 },
            ] {
                attn.mask = mask;
                for (t, offset) in [(2 * QUERY_BLOCK + 44, 0), (2 * QUERY_BLOCK + 4, 40), (5, 7)] {
                    let s = offset + t;
                    let r = |shape: [usize; 4]| {
                        let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
                        match device.is_autodiff() {
                            true => x.require_grad(),
                            false => x,
                        }
                    };
                    let (q, k, v) = (r([1, 4, t, 8]), r([1, 2, s, 8]), r([1, 2, s, 8]));
                    let qkv = ProjectedQkv {
                        q: q.clone(),
                        k: k.clone(),
                        v: v.clone(),
                        offset,
                    };
                    let probe =
                        Tensor::<3>::random([1, t, 32], Distribution::Normal(0.0, 1.0), &device);
                    let got = attn.attend(qkv.clone());
                    let want = reference(&attn, qkv);
                    let diff = max_diff(got.clone(), want.clone());
                    assert!(
                        diff < 1e-5,
                        "{mask:?}, t {t}, offset {offset}: output differs by {diff}"
                    );
                    if device.is_autodiff() {
                        let g_got = (got * probe.clone()).sum().backward();
                        let g_want = (want * probe).sum().backward();
                        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                            let diff = max_diff(x.grad(&g_got).unwrap(), x.grad(&g_want).unwrap());
                            assert!(
                                diff < 1e-5,
                                "{mask:?}, t {t}, offset {offset}: d{name} differs by {diff}"
                            );
                        }
                    }
                }
            }
        }
    }
}
