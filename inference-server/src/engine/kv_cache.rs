//! The key/value cache of one sequence: a contiguous run of rows in its model's [`KvPool`].
//!
//! Every sequence owns its cache, so a scheduler can add a sequence to the running batch or
//! drop it between two forward steps without touching the others; dropping the cache gives its
//! rows back. The run grows by doubling, in place where the rows after it are free, else by
//! copying the filled rows to a new run, so appending a token writes only that token; a cache
//! that knows the most tokens it will hold ([`KvCache::with_limit`]) never takes more rows
//! than that.

use std::sync::Arc;

use candle_core::Tensor;

use super::error::{EngineError, Result};
use super::kv_pool::{Extent, KvPool};

/// Smallest run, in tokens, a cache takes.
const MIN_CAPACITY: usize = 64;

/// Keys and values of every layer for the tokens a sequence has seen so far.
#[derive(Debug)]
pub struct KvCache {
    pool: Arc<KvPool>,
    /// The rows this cache holds; the first `len` are filled.
    extent: Extent,
    len: usize,
    /// The most tokens the owner expects to append: doubling stops there (more still fits,
    /// by doubling again).
    limit: Option<usize>,
}

impl KvCache {
    /// An empty cache whose rows come from `pool`.
    pub fn new(pool: Arc<KvPool>) -> Self {
        Self {
            pool,
            extent: Extent { start: 0, len: 0 },
            len: 0,
            limit: None,
        }
    }

    /// An empty cache that expects at most `tokens` tokens: its run grows by doubling but
    /// never past `tokens` (a sequence's prompt plus its `max_tokens`), so no memory is held
    /// for tokens that never come.
    pub fn with_limit(pool: Arc<KvPool>, tokens: usize) -> Self {
        let mut cache = Self::new(pool);
        cache.limit = Some(tokens);
        cache
    }

    /// Tokens cached so far; also the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Layers this cache was made for.
    pub fn num_layers(&self) -> usize {
        self.pool.num_layers()
    }

    /// True before the first forward step.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows this cache holds (filled or not).
    pub fn capacity(&self) -> usize {
        self.extent.len
    }

    /// Whether this cache and `other` share a pool.
    pub(crate) fn uses_pool_of(&self, other: &KvCache) -> bool {
        self.uses(&other.pool)
    }

    /// A new empty cache of the same pool.
    pub(crate) fn emptied(&self) -> Self {
        Self::new(self.pool.clone())
    }

    /// Whether this cache's rows are in `pool`.
    pub(crate) fn uses(&self, pool: &Arc<KvPool>) -> bool {
        Arc::ptr_eq(&self.pool, pool)
    }

    /// Makes room for `new` more tokens and returns the pool row of the first of them; the
    /// cache's rows are `start() .. start() + len()` afterwards as before. The pool may grow
    /// past its cap for it.
    pub(crate) fn reserve(&mut self, new: usize) -> Result<usize> {
        self.reserve_rows(new, false)?.ok_or_else(|| {
            EngineError::InvalidInput(format!("no room for {new} tokens in the key/value pool"))
        })
    }

    /// Like [`Self::reserve`], but within the pool's row cap: false (and nothing changed)
    /// when only growing the pool past its cap would make room.
    pub(crate) fn try_reserve(&mut self, new: usize) -> Result<bool> {
        Ok(self.reserve_rows(new, true)?.is_some())
    }

    fn reserve_rows(&mut self, new: usize, capped: bool) -> Result<Option<usize>> {
        let needed = self.len + new;
        if self.extent.len >= needed {
            return Ok(Some(self.extent.start + self.len));
        }
        let doubled = (self.extent.len * 2).max(MIN_CAPACITY);
        let target = match self.limit {
            // Within one doubling of the limit, the limit itself: the run then never moves
            // for its last few tokens (a prompt of 2,048 tokens with 16 to generate takes
            // 2,064 rows at once, not 2,048 and then a move to 2,064).
            Some(limit) if needed <= limit && doubled.saturating_mul(2) >= limit => limit,
            Some(limit) if needed <= limit => doubled.min(limit),
            _ => doubled,
        };
        // Within the cap, a run of just the rows needed is the fallback of a longer one.
        let sizes = [needed.max(target), needed];
        let tries = if capped { &sizes[..] } else { &sizes[..1] };
        for &want in tries {
            if self.extent.len > 0
                && let Some(longer) = self.pool.extend(self.extent, want, capped)?
            {
                self.extent = longer;
                return Ok(Some(self.extent.start + self.len));
            }
            let Some(run) = self.pool.allocate(want, capped)? else {
                continue;
            };
            if let Err(err) = self.pool.copy_rows(self.extent, run, self.len) {
                self.pool.release(run);
                return Err(err);
            }
            self.pool.release(std::mem::replace(&mut self.extent, run));
            return Ok(Some(self.extent.start + self.len));
        }
        Ok(None)
    }

    /// The pool row of this cache's first token.
    pub(crate) fn start(&self) -> usize {
        self.extent.start
    }

    /// Records `new` tokens as written (after a forward step wrote their rows).
    pub(crate) fn advance(&mut self, new: usize) -> Result<()> {
        if self.len + new > self.extent.len {
            return Err(EngineError::InvalidInput(format!(
                "{new} tokens do not fit a cache of {} rows holding {}",
                self.extent.len, self.len
            )));
        }
        self.len += new;
        Ok(())
    }

    /// Writes the keys and values of `new` tokens (`[kv_heads, new, head_dim]`) of one layer
    /// and returns that layer's whole history, as views into the pool. The length advances
    /// when the last layer is written.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let new = k.dim(1)?;
        if layer >= self.num_layers() {
            return Err(EngineError::InvalidInput(format!(
                "layer {layer} is outside a cache of {} layers",
                self.num_layers()
            )));
        }
        let row = self.reserve(new)?;
        let (keys, values) = self.pool.layer(layer)?;
        keys.slice_set(&k.to_dtype(keys.dtype())?.contiguous()?, 1, row)?;
        values.slice_set(&v.to_dtype(values.dtype())?.contiguous()?, 1, row)?;
        let (start, total) = (self.extent.start, self.len + new);
        let views = (
            keys.narrow(1, start, total)?,
            values.narrow(1, start, total)?,
        );
        if layer + 1 == self.num_layers() {
            self.advance(new)?;
        }
        Ok(views)
    }

    /// An independent copy with rows of its own: what a beam that branches needs.
    pub fn fork(&self) -> Result<Self> {
        let mut copy = Self {
            pool: self.pool.clone(),
            extent: Extent { start: 0, len: 0 },
            len: 0,
            limit: self.limit,
        };
        if self.extent.len > 0 {
            copy.extent = self.pool.allocate(self.extent.len, false)?.ok_or_else(|| {
                EngineError::InvalidInput("no room in the key/value pool for a fork".into())
            })?;
            self.pool.copy_rows(self.extent, copy.extent, self.len)?;
            copy.len = self.len;
        }
        Ok(copy)
    }

    /// Fills this empty cache with the first `len` tokens `source` holds (a cache of the same
    /// pool): a prompt that starts with tokens another sequence has already seen skips
    /// computing their keys and values. On an error the cache is still empty.
    pub(crate) fn copy_prefix_of(&mut self, source: &KvCache, len: usize) -> Result<()> {
        if !self.is_empty() || len > source.len || !self.uses_pool_of(source) {
            return Err(EngineError::InvalidInput(format!(
                "cannot copy {len} tokens of a cache holding {} into one holding {} (it must \
                 be empty and of the same pool)",
                source.len, self.len
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let row = self.reserve(len)?;
        self.pool
            .copy_rows(source.extent, Extent { start: row, len }, len)?;
        self.advance(len)
    }

    /// Keeps only the first `len` tokens (their rows stay this cache's).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Gives the rows past the filled ones back to the pool: a cache kept only for its
    /// tokens holds no more rows than it has tokens.
    pub(crate) fn shrink_to_fit(&mut self) {
        if self.extent.len > self.len {
            self.pool.release(Extent {
                start: self.extent.start + self.len,
                len: self.extent.len - self.len,
            });
            self.extent.len = self.len;
        }
    }

    /// Sets the most tokens the owner expects (see [`KvCache::with_limit`]).
    pub(crate) fn set_limit(&mut self, tokens: usize) {
        self.limit = Some(tokens);
    }

    /// Forgets every cached token, keeping the rows.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        self.pool.release(self.extent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn pool(layers: usize) -> Arc<KvPool> {
        Arc::new(KvPool::new(layers, 2, 3, DType::F32, &Device::Cpu))
    }

    fn tokens(start: f32, n: usize) -> Result<Tensor> {
        Ok(
            Tensor::arange(start, start + (2 * n * 3) as f32, &Device::Cpu)?
                .reshape((2, n, 3))?
                .to_dtype(DType::F32)?,
        )
    }

    fn values(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.contiguous()?.flatten_all()?.to_vec1::<f32>()?)
    }

    #[test]
    fn appends_across_growth_keep_every_token_in_order() -> Result<()> {
        let pool = pool(2);
        // Another cache in the same pool, so growth has to move past its rows.
        let mut neighbour = KvCache::new(pool.clone());
        let mut cache = KvCache::new(pool.clone());
        let mut expected: Vec<Tensor> = Vec::new();
        let mut start = 0.0;
        for n in [5, 1, 70, 1, 200] {
            let k = tokens(start, n)?;
            start += 1000.0;
            for layer in 0..2 {
                let (all_k, all_v) = cache.append(layer, &k, &k)?;
                neighbour.append(layer, &tokens(-1.0, 1)?, &tokens(-1.0, 1)?)?;
                let mut parts = expected.clone();
                parts.push(k.clone());
                let want = Tensor::cat(&parts, 1)?;
                assert_eq!(all_k.dims3()?, want.dims3()?);
                assert_eq!(values(&all_k)?, values(&want)?);
                assert_eq!(values(&all_v)?, values(&want)?);
            }
            expected.push(k);
            let total: usize = expected.iter().map(|t| t.dim(1).unwrap_or(0)).sum();
            assert_eq!(cache.len(), total);
        }
        assert!(cache.append(2, &tokens(0.0, 1)?, &tokens(0.0, 1)?).is_err());
        cache.clear();
        assert!(cache.is_empty());
        Ok(())
    }

    #[test]
    fn a_limited_cache_grows_to_its_limit_and_past_it_only_when_needed() -> Result<()> {
        let mut cache = KvCache::with_limit(pool(1), 250);
        cache.append(0, &tokens(0.0, 5)?, &tokens(0.0, 5)?)?;
        assert_eq!(cache.capacity(), MIN_CAPACITY);
        cache.append(0, &tokens(0.0, 70)?, &tokens(0.0, 70)?)?;
        // Doubling gives 128, and the next doubling would pass the limit: 250 at once.
        assert_eq!(cache.capacity(), 250);
        cache.append(0, &tokens(0.0, 25)?, &tokens(0.0, 25)?)?;
        assert_eq!((cache.len(), cache.capacity()), (100, 250));
        let mut cache = KvCache::with_limit(pool(1), 100);
        cache.append(0, &tokens(0.0, 75)?, &tokens(0.0, 75)?)?;
        // Past the limit, doubling again.
        cache.append(0, &tokens(0.0, 30)?, &tokens(0.0, 30)?)?;
        assert_eq!((cache.len(), cache.capacity()), (105, 200));
        // Alone in its pool, the run grew in place each time.
        assert_eq!(cache.start(), 0);
        Ok(())
    }

    #[test]
    fn a_cache_moves_when_another_run_follows_it_and_keeps_its_tokens() -> Result<()> {
        let pool = pool(1);
        let mut first = KvCache::new(pool.clone());
        first.append(0, &tokens(0.0, 5)?, &tokens(0.0, 5)?)?;
        let mut second = KvCache::new(pool.clone());
        second.append(0, &tokens(100.0, 5)?, &tokens(100.0, 5)?)?;
        assert_eq!((first.start(), second.start()), (0, MIN_CAPACITY));
        // `second` lies right after `first`: growing past 64 moves `first` to a new run.
        let (k, _) = first.append(0, &tokens(200.0, 60)?, &tokens(200.0, 60)?)?;
        assert_ne!(first.start(), 0);
        assert_eq!(values(&k.narrow(1, 0, 5)?)?, values(&tokens(0.0, 5)?)?);
        assert_eq!(values(&k.narrow(1, 5, 60)?)?, values(&tokens(200.0, 60)?)?);
        // `first`'s new run now follows `second`, so `second` moves too; its tokens stay.
        let (k, _) = second.append(0, &tokens(300.0, 60)?, &tokens(300.0, 60)?)?;
        assert_eq!(values(&k.narrow(1, 0, 5)?)?, values(&tokens(100.0, 5)?)?);
        assert_eq!(values(&k.narrow(1, 5, 60)?)?, values(&tokens(300.0, 60)?)?);
        drop((first, second));
        assert_eq!(pool.free_rows(), pool.rows());
        Ok(())
    }

    #[test]
    fn a_prefix_copies_into_an_empty_cache_and_kept_caches_shrink_to_their_tokens() -> Result<()> {
        let pool = pool(2);
        let mut source = KvCache::new(pool.clone());
        for layer in 0..2 {
            source.append(layer, &tokens(0.0, 10)?, &tokens(50.0, 10)?)?;
        }
        let mut copy = KvCache::with_limit(pool.clone(), 20);
        copy.copy_prefix_of(&source, 6)?;
        assert_eq!(copy.len(), 6);
        assert_ne!(copy.start(), source.start());
        for layer in 0..2 {
            let (k, v) = copy.append(layer, &tokens(900.0, 1)?, &tokens(900.0, 1)?)?;
            assert_eq!(
                values(&k.narrow(1, 0, 6)?)?,
                values(&tokens(0.0, 10)?.narrow(1, 0, 6)?)?
            );
            assert_eq!(
                values(&v.narrow(1, 0, 6)?)?,
                values(&tokens(50.0, 10)?.narrow(1, 0, 6)?)?
            );
            assert_eq!(values(&k.narrow(1, 6, 1)?)?, values(&tokens(900.0, 1)?)?);
        }
        // The source is untouched by the copy's new token.
        let (k, _) = source.append(0, &tokens(0.0, 1)?, &tokens(0.0, 1)?)?;
        assert_eq!(values(&k.narrow(1, 0, 10)?)?, values(&tokens(0.0, 10)?)?);
        // Only an empty cache of the same pool takes a prefix, and no more than the source has.
        assert!(copy.copy_prefix_of(&source, 2).is_err());
        let mut other = KvCache::new(pool.clone());
        assert!(other.copy_prefix_of(&source, 12).is_err());
        assert!(other.is_empty());
        let mut foreign = KvCache::new(self::pool(2));
        assert!(foreign.copy_prefix_of(&source, 2).is_err());
        // Truncated and shrunk, a cache holds rows for its tokens only.
        copy.truncate(4);
        copy.shrink_to_fit();
        assert_eq!((copy.len(), copy.capacity()), (4, 4));
        let held = pool.rows() - pool.free_rows();
        assert_eq!(held, source.capacity() + 4);
        drop((source, copy));
        assert_eq!(pool.free_rows(), pool.rows());
        Ok(())
    }

    #[test]
    fn dropped_caches_give_their_rows_back_and_forks_are_independent() -> Result<()> {
        let pool = pool(1);
        let mut cache = KvCache::new(pool.clone());
        cache.append(0, &tokens(0.0, 3)?, &tokens(0.0, 3)?)?;
        let mut fork = cache.fork()?;
        fork.append(0, &tokens(500.0, 1)?, &tokens(500.0, 1)?)?;
        let (k, _) = cache.append(0, &tokens(900.0, 1)?, &tokens(900.0, 1)?)?;
        let (fk, _) = fork.append(0, &tokens(700.0, 1)?, &tokens(700.0, 1)?)?;
        // Both share the first three tokens and differ after them.
        assert_eq!(values(&k.narrow(1, 0, 3)?)?, values(&fk.narrow(1, 0, 3)?)?);
        assert_eq!(values(&k.narrow(1, 3, 1)?)?, values(&tokens(900.0, 1)?)?);
        assert_eq!(values(&fk.narrow(1, 3, 1)?)?, values(&tokens(500.0, 1)?)?);
        drop(cache);
        drop(fork);
        assert_eq!(pool.free_rows(), pool.rows());
        Ok(())
    }
}
