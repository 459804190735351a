//! The decoder: embeddings, layers (attention + dense MLP or MoE), final norm and LM head, driven by a
//! [`Connectivity`]. The layer exposes its sub-steps so distributed schedules can reorder them.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;

use crate::attention::{Attention, LayerKvCache};
use crate::config::{FfnKind, ModelConfig};
use crate::connectivity::{Connectivity, Residual};
use crate::error::{ModelError, Result};
use crate::matvec::rms_norm;
use crate::mlp::Mlp;
use crate::moe::MoeBlock;

/// The feed-forward block of a layer.
#[derive(Module, Debug)]
pub enum Ffn {
    /// A dense SwiGLU MLP.
    Dense(Mlp),
    /// A mixture of experts.
    Moe(MoeBlock),
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Norm before attention (`input_layernorm`).
    pub input_norm: RmsNorm,
    /// Self-attention.
    pub attention: Attention,
    /// Norm before the feed-forward block (`post_attention_layernorm`).
    pub post_norm: RmsNorm,
    /// Dense MLP or MoE.
    pub ffn: Ffn,
    #[module(skip)]
    index: usize,
}

impl DecoderLayer {
    /// Random-initialised layer `index` of `cfg`.
    pub fn new(cfg: &ModelConfig, index: usize, device: &Device) -> Self {
        let layer = &cfg.layers[index];
        let norm = || {
            RmsNormConfig::new(cfg.hidden_size)
                .with_epsilon(cfg.rms_norm_eps)
                .init(device)
        };
        let ffn = match (&layer.ffn, &cfg.moe) {
            (FfnKind::Dense { intermediate_size }, _) => {
                Ffn::Dense(Mlp::new(cfg.hidden_size, *intermediate_size, device))
            }
            (FfnKind::Moe, Some(moe)) => Ffn::Moe(MoeBlock::new(moe, cfg.hidden_size, device)),
            (FfnKind::Moe, None) => unreachable!("validated: MoE layers need an MoE config"),
        };
        Self {
            input_norm: norm(),
            attention: Attention::new(cfg, layer, device),
            post_norm: norm(),
            ffn,
            index,
        }
    }

    /// Position of this layer in the model.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Runs the layer on one rank.
    ///
    /// # Shapes
    /// - the state's tensors: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        state: Residual,
        connectivity: &Connectivity,
        offset: usize,
        cache: Option<&mut LayerKvCache>,
    ) -> Residual {
        let inputs = connectivity.layer_inputs(self.index, state);
        let attn =
            self.attention
                .forward(rms_norm(&self.input_norm, inputs.attn_in), offset, cache);
        let post_attention = inputs.residual + attn;
        let x = rms_norm(&self.post_norm, inputs.ffn_in.stream(&post_attention));
        match &self.ffn {
            Ffn::Dense(mlp) => {
                connectivity.dense_output(post_attention, mlp.forward(x), inputs.in_flight)
            }
            Ffn::Moe(moe) => {
                let [b, t, h] = x.dims();
                let out = moe.forward(x.reshape([b * t, h]));
                let back = |y: Tensor<2>| y.reshape([b, t, h]);
                connectivity.moe_output(
                    post_attention,
                    back(out.routed),
                    out.shared.map(back),
                    inputs.in_flight,
                )
            }
        }
    }
}

/// A key/value cache for every layer.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    /// One entry per layer.
    pub layers: Vec<LayerKvCache>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKvCache::default(); num_layers],
        }
    }
    /// Cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKvCache::len)
    }
    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A causal MoE language model.
#[derive(Module, Debug)]
pub struct Model {
    /// Token embeddings `[vocab, hidden]`.
    pub embed: Embedding,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// LM head `[hidden, vocab]`; `None` when tied to the embeddings.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    config: ModelConfig,
    #[module(skip)]
    connectivity: Connectivity,
}

impl Model {
    /// A randomly initialised model (standard connectivity).
    ///
    /// Every weight is drawn before this returns. (burn initialises a new module's parameters lazily, on first
    /// use: a model made right after `device.seed(s)` would otherwise draw its weights whenever it is first
    /// used, from whatever state the process-wide RNG has reached by then — after another thread's draws, a
    /// different model each run.)
    pub fn new(config: &ModelConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let model = Self::new_lazy(config, device);
        struct Draw;
        impl ModuleVisitor for Draw {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let _ = param.val();
            }
        }
        model.visit(&mut Draw);
        Ok(model)
    }

    /// [`Self::new`] with burn's lazy parameters (drawn on first use); `config` already validated. A loader
    /// replaces every parameter, so none is ever drawn.
    pub(crate) fn new_lazy(config: &ModelConfig, device: &Device) -> Self {
        Self {
            embed: EmbeddingConfig::new(config.vocab_size, config.hidden_size)
                .with_initializer(burn::nn::Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device),
            layers: (0..config.num_layers())
                .map(|i| DecoderLayer::new(config, i, device))
                .collect(),
            norm: RmsNormConfig::new(config.hidden_size)
                .with_epsilon(config.rms_norm_eps)
                .init(device),
            lm_head: (!config.tie_word_embeddings).then(|| {
                LinearConfig::new(config.hidden_size, config.vocab_size)
                    .with_bias(false)
                    .with_initializer(burn::nn::Initializer::Normal {
                        mean: 0.0,
                        std: 0.02,
                    })
                    .init(device)
            }),
            config: config.clone(),
            connectivity: Connectivity::Standard,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the parameters live on (burn's CPU `flex` for a model without parameters).
    pub fn device(&self) -> Device {
        self.devices().first().cloned().unwrap_or_else(Device::flex)
    }

    /// The residual connectivity in use.
    pub fn connectivity(&self) -> &Connectivity {
        &self.connectivity
    }

    /// The same weights with another connectivity (e.g. [`Connectivity::farskip`]).
    pub fn with_connectivity(mut self, connectivity: Connectivity) -> Result<Self> {
        connectivity.validate(self.layers.len())?;
        self.connectivity = connectivity;
        Ok(self)
    }

    /// The model with only experts `range` of every MoE layer, and routers that choose among just those (the
    /// gate's columns and any correction bias narrowed; top-k capped at the experts kept; group-limited routing
    /// kept where the range is whole groups, dropped otherwise).
    ///
    /// This is the shape of one expert-parallel rank's expert work as a single-device model: rank `r` of `W`
    /// holds `E / W` experts and receives `T · k` rows for its `T` tokens, and this model's `T` tokens also
    /// route `T · k` rows over `E / W` experts. The planner times it to calibrate a rank's expert cost (an
    /// expert bank of all `E` experts at `E / W` times fewer rows each runs smaller, slower products). Its
    /// outputs are not the full model's.
    pub fn expert_block(&self, range: std::ops::Range<usize>) -> Result<Self> {
        let Some(moe) = self.config.moe.as_ref() else {
            return Ok(self.clone());
        };
        if range.is_empty() || range.end > moe.num_experts {
            return Err(ModelError::invalid(
                "num_experts",
                format!(
                    "expert block {range:?} is not inside the {} experts",
                    moe.num_experts
                ),
            ));
        }
        let n = range.len();
        let mut config = self.config.clone();
        let m = config.moe.as_mut().expect("checked above");
        m.num_experts = n;
        m.top_k = m.top_k.min(n);
        m.router.group_limit = m.router.group_limit.and_then(|g| {
            let per = moe.num_experts / g.num_groups;
            let whole = range.start.is_multiple_of(per) && n.is_multiple_of(per);
            let groups = n / per;
            let limit = crate::config::GroupLimit {
                num_groups: groups,
                topk_groups: g.topk_groups.min(groups),
                ..g
            };
            (whole && limit.topk_groups * per >= m.top_k).then_some(limit)
        });
        let (router, top_k) = (m.router.clone(), m.top_k);
        config.validate()?;
        let mut out = self.clone();
        for layer in out.layers.iter_mut() {
            if let Ffn::Moe(block) = &mut layer.ffn {
                block.experts = block.experts.slice(range.clone());
                let r = &mut block.router;
                r.gate = crate::shard::columns(&r.gate, range.start, n);
                r.correction_bias = r
                    .correction_bias
                    .as_ref()
                    .map(|b| Param::from_tensor(b.val().narrow(0, range.start, n)));
                r.cfg = router.clone();
                r.top_k = top_k;
            }
        }
        out.config = config;
        Ok(out)
    }

    /// Checks that every id is inside the vocabulary (one host read of the ids).
    pub fn check_input(&self, input_ids: &Tensor<2, Int>) -> Result<()> {
        let [b, t] = input_ids.dims();
        if b == 0 || t == 0 {
            return Err(ModelError::InvalidInput(format!(
                "input_ids has an empty shape [{b}, {t}]"
            )));
        }
        let ids = crate::host_reads::read_ints(input_ids.clone())
            .try_into_vec_as::<i64>()
            .map_err(|e| ModelError::InvalidInput(format!("input_ids: {e:?}")))?;
        let vocab = self.config.vocab_size;
        if let Some(pos) = ids.iter().position(|&id| id < 0 || id as usize >= vocab) {
            return Err(ModelError::TokenOutOfVocab {
                id: ids[pos],
                row: pos / t,
                col: pos % t,
                vocab,
            });
        }
        Ok(())
    }

    /// Logits for every position.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]` -> `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Result<Tensor<3>> {
        self.check_input(&input_ids)?;
        Ok(self.forward_unchecked(input_ids, None))
    }

    /// [`Self::forward`] without the vocabulary check (the ids must be in range), optionally with a cache.
    pub fn forward_unchecked(
        &self,
        input_ids: Tensor<2, Int>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let (h, _) = self.run_layers(input_ids, cache, false);
        self.logits(h)
    }

    /// Logits plus the full residual stream after every layer (for hidden-state losses).
    pub fn forward_with_hidden(&self, input_ids: Tensor<2, Int>) -> (Tensor<3>, Vec<Tensor<3>>) {
        let (h, hidden) = self.run_layers(input_ids, None, true);
        (self.logits(h), hidden)
    }

    /// Embedding lookup.
    pub fn embed(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        crate::matvec::widened(self.embed.forward(input_ids))
    }

    /// Final norm and LM head on the full stream.
    ///
    /// # Shapes
    /// - `h`: `[batch, seq, hidden]` -> `[batch, seq, vocab]`
    pub fn logits(&self, h: Tensor<3>) -> Tensor<3> {
        let h = rms_norm(&self.norm, h);
        match &self.lm_head {
            Some(head) => crate::matvec::linear(head, h),
            None => h.matmul(
                crate::matvec::widened(self.embed.weight.val())
                    .transpose()
                    .unsqueeze::<3>(),
            ),
        }
    }

    fn run_layers(
        &self,
        input_ids: Tensor<2, Int>,
        mut cache: Option<&mut KvCache>,
        keep_hidden: bool,
    ) -> (Tensor<3>, Vec<Tensor<3>>) {
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if let Some(c) = cache.as_deref_mut()
            && c.layers.len() != self.layers.len()
        {
            *c = KvCache::new(self.layers.len());
        }
        let mut state = Residual::Plain(self.embed(input_ids));
        let mut hidden = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            state = layer.forward(state, &self.connectivity, offset, layer_cache);
            if keep_hidden {
                hidden.push(state.clone().full());
            }
        }
        (state.full(), hidden)
    }
}
