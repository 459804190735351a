//! Greedy generation with a KV cache (either connectivity).

use burn::prelude::*;

use crate::error::{ModelError, Result};
use crate::model::{KvCache, Model};

/// The result of [`Model::generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// `[batch, prompt + new]`: the prompt, then the generated tokens.
    pub ids: Tensor<2, Int>,
    /// `[batch, new, vocab]`: the logits that chose each generated token.
    pub step_logits: Tensor<3>,
}

impl Model {
    /// Greedy decoding of `max_new_tokens` tokens after `prompt`, with a KV cache and no EOS stop.
    ///
    /// # Shapes
    /// - `prompt`: `[batch, prompt_len]`
    pub fn generate(&self, prompt: Tensor<2, Int>, max_new_tokens: usize) -> Result<Generation> {
        self.check_input(&prompt)?;
        if max_new_tokens == 0 {
            return Err(ModelError::InvalidInput(
                "max_new_tokens must be > 0".into(),
            ));
        }
        let mut cache = KvCache::new(self.layers.len());
        let mut ids = vec![prompt.clone()];
        let mut step_logits = Vec::with_capacity(max_new_tokens);
        let mut input = prompt;
        for _ in 0..max_new_tokens {
            let logits = self.forward_unchecked(input, Some(&mut cache));
            let [b, t, v] = logits.dims();
            let last = logits.narrow(1, t - 1, 1).reshape([b, v]);
            let next = last.clone().argmax(1); // [b, 1]
            step_logits.push(last.unsqueeze_dim::<3>(1));
            ids.push(next.clone());
            input = next;
        }
        Ok(Generation {
            ids: Tensor::cat(ids, 1),
            step_logits: Tensor::cat(step_logits, 1),
        })
    }
}
