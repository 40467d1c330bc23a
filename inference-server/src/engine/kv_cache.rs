//! The key/value cache of one sequence.
//!
//! Every sequence owns its cache, so a scheduler can add a sequence to the running batch or
//! drop it between two forward steps without touching the others. Each layer's buffer grows
//! by doubling, so appending a token copies only that token, not the whole history; a cache
//! that knows the most tokens it will hold ([`KvCache::with_limit`]) never grows past them.

use candle_core::Tensor;

use super::error::Result;

/// Smallest buffer, in tokens, a layer allocates.
const MIN_CAPACITY: usize = 64;

/// Keys and values of every layer for the tokens a sequence has seen so far.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: key and value buffers of shape `[kv_heads, capacity, head_dim]`; the first
    /// `len` positions are filled.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// The most tokens the owner expects to append: doubling stops there (more still fits,
    /// by doubling again).
    limit: Option<usize>,
}

impl KvCache {
    /// An empty cache for a model with `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
            limit: None,
        }
    }

    /// An empty cache that expects at most `tokens` tokens: its buffers grow by doubling but
    /// never past `tokens` (a sequence's prompt plus its `max_tokens`), so no memory is held
    /// for tokens that never come.
    pub fn with_limit(layers: usize, tokens: usize) -> Self {
        Self {
            limit: Some(tokens),
            ..Self::new(layers)
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

    /// Appends the keys and values `[kv_heads, new_tokens, head_dim]` (contiguous) of `layer`
    /// and returns views of that layer's full keys and values. Every layer appends at the
    /// same offset; the last layer's append advances `len`.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (kv_heads, new_tokens, head_dim) = k.dims3()?;
        let past = self.len;
        let needed = past + new_tokens;
        let last_layer = layer + 1 == self.layers.len();
        let Some(slot) = self.layers.get_mut(layer) else {
            return Err(super::error::EngineError::InvalidInput(format!(
                "layer {layer} is outside a cache of {} layers",
                self.layers.len()
            )));
        };
        let capacity = slot.as_ref().map_or(0, |(k, _)| k.dim(1).unwrap_or(0));
        if capacity < needed {
            let doubled = (capacity * 2).max(MIN_CAPACITY);
            let target = match self.limit {
                Some(limit) if needed <= limit => doubled.min(limit),
                _ => doubled,
            };
            let new_capacity = needed.max(target);
            let shape = (kv_heads, new_capacity, head_dim);
            let k_buf = Tensor::zeros(shape, k.dtype(), k.device())?;
            let v_buf = Tensor::zeros(shape, v.dtype(), v.device())?;
            if let Some((old_k, old_v)) = slot.as_ref()
                && past > 0
            {
                k_buf.slice_set(&old_k.narrow(1, 0, past)?.contiguous()?, 1, 0)?;
                v_buf.slice_set(&old_v.narrow(1, 0, past)?.contiguous()?, 1, 0)?;
            }
            *slot = Some((k_buf, v_buf));
        }
        let Some((k_buf, v_buf)) = slot.as_ref() else {
            return Err(super::error::EngineError::InvalidInput(
                "cache buffer missing".into(),
            ));
        };
        k_buf.slice_set(k, 1, past)?;
        v_buf.slice_set(v, 1, past)?;
        let views = (k_buf.narrow(1, 0, needed)?, v_buf.narrow(1, 0, needed)?);
        if last_layer {
            self.len = needed;
        }
        Ok(views)
    }

    /// An independent copy (buffers are written in place, so sharing them is not an option):
    /// what a beam that branches needs.
    pub fn fork(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|slot| match slot {
                Some((k, v)) => Ok(Some((k.copy()?, v.copy()?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: self.len,
            limit: self.limit,
        })
    }

    /// Forgets every cached token, keeping the allocated buffers.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn tokens(start: f32, n: usize) -> Result<Tensor> {
        Ok(
            Tensor::arange(start, start + (2 * n * 3) as f32, &Device::Cpu)?
                .reshape((2, n, 3))?
                .to_dtype(DType::F32)?,
        )
    }

    #[test]
    fn appends_across_growth_keep_every_token_in_order() -> Result<()> {
        let mut cache = KvCache::new(2);
        let mut expected: Vec<Tensor> = Vec::new();
        let mut start = 0.0;
        for n in [5, 1, 70, 1, 200] {
            let k = tokens(start, n)?;
            start += 1000.0;
            for layer in 0..2 {
                let (all_k, all_v) = cache.append(layer, &k, &k)?;
                let mut parts = expected.clone();
                parts.push(k.clone());
                let want = Tensor::cat(&parts, 1)?;
                assert_eq!(all_k.dims3()?, want.dims3()?);
                assert_eq!(
                    all_k.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
                    want.flatten_all()?.to_vec1::<f32>()?
                );
                assert_eq!(
                    all_v.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
                    want.flatten_all()?.to_vec1::<f32>()?
                );
            }
            expected.push(k);
            assert_eq!(
                cache.len(),
                expected
                    .iter()
                    .map(|t| t.dim(1).unwrap_or(0))
                    .sum::<usize>()
            );
        }
        assert!(cache.append(2, &tokens(0.0, 1)?, &tokens(0.0, 1)?).is_err());
        cache.clear();
        assert!(cache.is_empty());
        Ok(())
    }

    #[test]
    fn a_limited_cache_grows_to_its_limit_and_past_it_only_when_needed() -> Result<()> {
        let capacity = |cache: &KvCache| {
            cache.layers[0]
                .as_ref()
                .map_or(0, |(k, _)| k.dim(1).unwrap_or(0))
        };
        let mut cache = KvCache::with_limit(1, 100);
        cache.append(0, &tokens(0.0, 5)?, &tokens(0.0, 5)?)?;
        assert_eq!(capacity(&cache), MIN_CAPACITY);
        cache.append(0, &tokens(0.0, 70)?, &tokens(0.0, 70)?)?;
        // Doubling would give 128; the limit stops it at 100.
        assert_eq!(capacity(&cache), 100);
        // Past the limit, doubling again.
        cache.append(0, &tokens(0.0, 30)?, &tokens(0.0, 30)?)?;
        assert_eq!((cache.len(), capacity(&cache)), (105, 200));
        Ok(())
    }
}
