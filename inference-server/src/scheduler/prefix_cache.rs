//! The prefix cache: keys and values of sequences that have left the batch, kept for prompts
//! that start with the same tokens.
//!
//! A chat's next turn sends the whole conversation again, and requests of one application
//! share their system prompt; without a cache every prompt token is computed again each
//! time. Here a sequence that finishes (or whose client leaves) hands over its cache and the
//! token ids it holds. A new prompt that starts with an entry's tokens takes those keys and
//! values instead of computing them: copied when the entry is worth keeping for others,
//! taken over when the prompt continues all of it (the entry would be superseded anyway).
//!
//! Entries live in the KV-cache budget's free room: the scheduler evicts the least recently
//! used ones whenever an admission needs their tokens, so keeping them never delays a
//! request.

use crate::engine::KvCache;
use crate::generation::common_prefix;

/// Kept tokens and their keys and values.
struct Entry {
    /// Stable while the entry is kept (indices move as entries leave).
    id: u64,
    tokens: Vec<u32>,
    cache: KvCache,
    /// The clock at its last use (insertion or reuse).
    used: u64,
}

/// The kept caches, matched by their token ids.
#[derive(Default)]
pub(super) struct PrefixCache {
    entries: Vec<Entry>,
    /// Tokens held by all entries: their part of the KV-cache budget.
    held: usize,
    clock: u64,
    next_id: u64,
}

/// The longest match for a prompt among the entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Match {
    /// The entry's id.
    pub id: u64,
    /// Tokens the prompt shares with it, from the start.
    pub len: usize,
    /// The entry holds nothing beyond the shared tokens: the prompt continues all of it.
    pub whole: bool,
}

impl PrefixCache {
    /// Tokens kept, summed over the entries.
    pub(super) fn held(&self) -> usize {
        self.held
    }

    /// The entry sharing the most leading tokens with `prompt` (the most recently used on a
    /// tie); `None` when none shares any.
    pub(super) fn best(&self, prompt: &[u32]) -> Option<Match> {
        self.entries
            .iter()
            .map(|e| (common_prefix(&e.tokens, prompt), e))
            .filter(|(len, _)| *len > 0)
            .max_by_key(|(len, e)| (*len, e.used))
            .map(|(len, e)| Match {
                id: e.id,
                len,
                whole: len == e.tokens.len(),
            })
    }

    /// Entry `id`'s cache, to copy from; marks it used.
    pub(super) fn cache(&mut self, id: u64) -> Option<&KvCache> {
        self.clock += 1;
        let entry = self.entries.iter_mut().find(|e| e.id == id)?;
        entry.used = self.clock;
        Some(&entry.cache)
    }

    /// Removes entry `id` and hands its cache over.
    pub(super) fn take(&mut self, id: u64) -> Option<KvCache> {
        let index = self.entries.iter().position(|e| e.id == id)?;
        let entry = self.entries.swap_remove(index);
        self.held -= entry.tokens.len();
        Some(entry.cache)
    }

    /// Keeps `cache`, which holds keys and values for `tokens`, shrunk to those tokens.
    /// Entries it continues are dropped (it holds all they did, and more); when an entry
    /// already continues it, that entry is kept and marked used instead.
    pub(super) fn insert(&mut self, tokens: Vec<u32>, mut cache: KvCache) {
        self.clock += 1;
        if tokens.is_empty() || cache.len() != tokens.len() {
            return;
        }
        if let Some(longer) = self
            .entries
            .iter_mut()
            .find(|e| e.tokens.len() >= tokens.len() && e.tokens.starts_with(&tokens))
        {
            longer.used = self.clock;
            return;
        }
        let mut dropped = 0;
        self.entries.retain(|e| {
            let superseded = tokens.starts_with(&e.tokens);
            if superseded {
                dropped += e.tokens.len();
            }
            !superseded
        });
        self.held -= dropped;
        cache.shrink_to_fit();
        self.held += tokens.len();
        self.next_id += 1;
        self.entries.push(Entry {
            id: self.next_id,
            tokens,
            cache,
            used: self.clock,
        });
    }

    /// Drops least recently used entries, never entry `spare`, until at most `keep` tokens
    /// are held or only `spare` is left.
    pub(super) fn evict_to(&mut self, keep: usize, spare: Option<u64>) {
        while self.held > keep && self.evict_oldest(spare) {}
    }

    /// Drops the least recently used entry other than `spare`; false when there is none.
    pub(super) fn evict_oldest(&mut self, spare: Option<u64>) -> bool {
        let victim = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| Some(e.id) != spare)
            .min_by_key(|(_, e)| e.used)
            .map(|(i, _)| i);
        let Some(victim) = victim else {
            return false;
        };
        let entry = self.entries.swap_remove(victim);
        self.held -= entry.tokens.len();
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::engine::KvPool;

    fn pool() -> Arc<KvPool> {
        Arc::new(KvPool::new(1, 1, 2, DType::F32, &Device::Cpu))
    }

    /// A cache holding `n` tokens.
    fn filled(pool: &Arc<KvPool>, n: usize) -> KvCache {
        let mut cache = KvCache::new(pool.clone());
        let k = Tensor::zeros((1, n, 2), DType::F32, &Device::Cpu).expect("zeros");
        cache.append(0, &k, &k).expect("append");
        cache
    }

    fn keep(cache: &mut PrefixCache, pool: &Arc<KvPool>, tokens: &[u32]) {
        cache.insert(tokens.to_vec(), filled(pool, tokens.len()));
    }

    #[test]
    fn the_longest_shared_start_wins_and_says_whether_the_prompt_continues_it() {
        let pool = pool();
        let mut cache = PrefixCache::default();
        keep(&mut cache, &pool, &[1, 2, 3, 4]);
        keep(&mut cache, &pool, &[1, 2, 9]);
        assert_eq!(cache.held(), 7);
        assert_eq!(
            cache.best(&[1, 2, 3, 4, 5, 6]),
            Some(Match {
                id: 1,
                len: 4,
                whole: true
            })
        );
        assert_eq!(
            cache.best(&[1, 2, 3, 7]),
            Some(Match {
                id: 1,
                len: 3,
                whole: false
            })
        );
        assert_eq!(
            cache.best(&[1, 2, 9, 9]),
            Some(Match {
                id: 2,
                len: 3,
                whole: true
            })
        );
        // A tie goes to the most recently used.
        assert_eq!(cache.best(&[1, 2]).map(|m| m.id), Some(2));
        assert!(cache.cache(1).is_some());
        assert_eq!(cache.best(&[1, 2]).map(|m| m.id), Some(1));
        assert_eq!(cache.best(&[5, 1, 2]), None);
        assert_eq!(cache.best(&[]), None);
    }

    #[test]
    fn an_entry_supersedes_the_ones_it_continues_and_yields_to_one_that_continues_it() {
        let pool = pool();
        let mut cache = PrefixCache::default();
        keep(&mut cache, &pool, &[1, 2]);
        keep(&mut cache, &pool, &[1, 3]);
        // A later turn of the first conversation replaces it.
        keep(&mut cache, &pool, &[1, 2, 5, 6]);
        assert_eq!(cache.held(), 6);
        assert_eq!(cache.entries.len(), 2);
        // A shorter one that an entry already continues is not kept twice.
        keep(&mut cache, &pool, &[1, 2, 5]);
        assert_eq!(cache.held(), 6);
        // The rows of the dropped entries are back in the pool: only 6 tokens' rows are held.
        assert_eq!(pool.rows() - pool.free_rows(), 6);
        // A cache whose length does not match its tokens is refused.
        cache.insert(vec![7, 8, 9], filled(&pool, 2));
        assert_eq!(cache.held(), 6);
        drop(cache);
        assert_eq!(pool.free_rows(), pool.rows());
    }

    #[test]
    fn eviction_drops_the_least_recently_used_and_spares_the_one_being_reused() {
        let pool = pool();
        let mut cache = PrefixCache::default();
        keep(&mut cache, &pool, &[1; 10]);
        keep(&mut cache, &pool, &[2; 10]);
        keep(&mut cache, &pool, &[3; 10]);
        // The first is used again: the second is now the oldest.
        assert!(cache.cache(1).is_some());
        cache.evict_to(25, None);
        assert_eq!(cache.held(), 20);
        assert_eq!(cache.best(&[2, 2]), None);
        // Sparing the entry about to be copied keeps it even when it is the oldest.
        let spare = cache.best(&[3, 3]).map(|m| m.id);
        assert_eq!(spare, Some(3));
        cache.evict_to(0, spare);
        assert_eq!(cache.held(), 10);
        assert!(!cache.evict_oldest(spare), "only the spared one is left");
        assert_eq!(cache.best(&[3, 3]).map(|m| m.id), spare);
        let taken = cache.take(3);
        assert_eq!(taken.map(|c| c.len()), Some(10));
        assert_eq!(cache.held(), 0);
        assert!(cache.take(3).is_none());
        assert!(!cache.evict_oldest(None));
    }
}
