//! The key/value cache of one sequence.
//!
//! Every sequence owns its cache, so a scheduler can add a sequence to the running batch or
//! drop it between two forward steps without touching the others.

use candle_core::Tensor;

use super::error::Result;

/// Keys and values of every layer for the tokens a sequence has seen so far.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys and values of shape `[kv_heads, tokens, head_dim]`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model with `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// Tokens cached so far; also the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Layers this cache was made for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// True before the first forward step.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the keys and values `[kv_heads, new_tokens, head_dim]` of `layer` and returns the
    /// full keys and values of that layer. The last layer's append advances `len`.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let new_tokens = k.dim(1)?;
        let slot = &mut self.layers[layer];
        let (k, v) = match slot.take() {
            None => (k, v),
            Some((past_k, past_v)) => (
                Tensor::cat(&[&past_k, &k], 1)?,
                Tensor::cat(&[&past_v, &v], 1)?,
            ),
        };
        *slot = Some((k.clone(), v.clone()));
        if layer + 1 == self.layers.len() {
            self.len += new_tokens;
        }
        Ok((k, v))
    }

    /// Forgets every cached token, keeping the allocation of the layer list.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|slot| *slot = None);
        self.len = 0;
    }
}
