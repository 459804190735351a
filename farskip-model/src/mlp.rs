//! The SwiGLU MLP: dense layers and shared experts. `down(silu(gate(x)) * up(x))`.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{sigmoid, silu};

use crate::matvec::linear;

/// A SwiGLU MLP.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `[hidden, intermediate]`.
    pub gate_proj: Linear,
    /// `[hidden, intermediate]`.
    pub up_proj: Linear,
    /// `[intermediate, hidden]`.
    pub down_proj: Linear,
}

impl Mlp {
    /// Random-initialised MLP.
    pub fn new(hidden: usize, intermediate: usize, device: &Device) -> Self {
        let l = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Self {
            gate_proj: l(hidden, intermediate),
            up_proj: l(hidden, intermediate),
            down_proj: l(intermediate, hidden),
        }
    }

    /// # Shapes
    /// - `x`: `[..., hidden]` -> `[..., hidden]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let g = silu(linear(&self.gate_proj, x.clone()));
        linear(&self.down_proj, g * linear(&self.up_proj, x))
    }
}

/// A shared expert: an MLP, optionally gated by `sigmoid(x · w_g)` (Qwen2-MoE).
#[derive(Module, Debug)]
pub struct SharedExpert {
    /// The MLP.
    pub mlp: Mlp,
    /// `[hidden, 1]` gate, if any.
    pub gate: Option<Linear>,
}

impl SharedExpert {
    /// # Shapes
    /// - `x`: `[tokens, hidden]` -> `[tokens, hidden]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = self.mlp.forward(x.clone());
        match &self.gate {
            Some(g) => sigmoid(linear(g, x)) * y,
            None => y,
        }
    }
}
